"""The blocking IPC client the CLI uses: connect, send a request, read its reply.

Standard library plus the sans-IO codec only — ``pd`` must not pay for trio. Server-pushed frames (conv id 0,
e.g. ``msg.delivery``) that arrive while a reply is awaited are kept for ``receive``. Replies and pushes larger
than a frame arrive in parts and are put together before anyone sees them.
"""

from __future__ import annotations

import math
import os
import select
import socket
import struct
import time
from collections import deque

from portdaddy.errors import DaemonUnavailable, NoReply, PDError, bad_input
from portdaddy.ipc.frame import (
    MAX_REQUEST,
    Decoder,
    Encoder,
    Frame,
    FrameTooLarge,
    Malformed,
    Parts,
    Performative,
    next_conv_id,
)
from portdaddy.ipc.peer import check_daemon_uid

# Not imported at run time: ``pd`` never loads typing (see portdaddy/errors.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_OK = frozenset(map(int, (Performative.INFORM_DONE, Performative.INFORM_REF, Performative.AGREE)))
_TIMEVAL = struct.Struct("@ll")
_POLL_MAX_MS = 2**31 - 1  # poll(2) takes a C int of ms


def _timeval(seconds: float | None) -> bytes:
    """A ``struct timeval`` for SO_SNDTIMEO: None is "forever" (0), anything else at least 1 µs."""
    if seconds is None:
        return _TIMEVAL.pack(0, 0)
    return _TIMEVAL.pack(*divmod(max(1, int(seconds * 1_000_000)), 1_000_000))


class Spin:
    """How long the client polls its socket for a reply before it sleeps until it is readable, learned as it goes.

    A client asleep is woken by the daemon's send; on a virtual machine waking an idle vCPU costs
    both sides tens of µs (a lock cycle's two round trips took ~160 µs asleep, ~85 µs polling). Polling pays
    only while the daemon answers from another CPU, so, as the kernel's haltpoll governor does: a wait a
    longer poll would have caught grows the budget, up to MAX_NS; a wait far past it (many clients sharing the
    CPUs, a slow operation) halves it, down to nothing, and only a run of short waits starts it again. Never
    while this process may run on one CPU only: the daemon may need that CPU, and polling would hold it up
    for the whole budget (spec/ipc.md, "Clients")."""

    MAX_NS = 100_000
    LONG_NS = MAX_NS  # a wait past this (as timed by its client) was not caught by a longer poll
    START_NS = 25_000
    RESUME_AFTER = 8  # short waits in a row before a client that stopped polling starts again

    # Waits between looks at this process's CPU affinity: a look is a syscall, ~2 µs a pinned round trip.
    AFFINITY_EVERY = 256

    def __init__(self) -> None:
        self.budget_ns = self.START_NS
        self._short = 0  # waits in a row that a poll of MAX_NS would have caught
        self._one_cpu = False
        self._until_look = 0

    def usable(self) -> int | None:
        """The budget for the next wait; None while this process may run on one CPU only (nothing to learn)."""
        if self._until_look:
            self._until_look -= 1
        else:
            self._until_look = self.AFFINITY_EVERY
            self._one_cpu = len(os.sched_getaffinity(0)) < 2
        return None if self._one_cpu else self.budget_ns

    def waited(self, ns: int) -> None:
        """A wait that a poll of the current budget did not catch took ``ns``."""
        if ns > self.LONG_NS:
            self._short = 0
            self.budget_ns = 0 if self.budget_ns <= self.START_NS else self.budget_ns // 2
            return
        self._short += 1
        if self.budget_ns:
            self.budget_ns = min(self.MAX_NS, self.budget_ns * 2)
        elif self._short >= self.RESUME_AFTER:
            self.budget_ns = self.START_NS


def request_payload(action: str, agent_id: str | None, args: dict[str, Any] | None) -> dict[str, Any]:
    """A request's payload: its action, the agent it speaks for, and the arguments that are not None."""
    payload = {"action": action}
    if agent_id:
        payload["agentId"] = agent_id
    if args:
        for k, v in args.items():  # a loop, not a generator: ~2 µs less per request under load
            if v is not None:
                payload[k] = v
    return payload


def request_frame(encoder: Encoder, kind: int, conv: int, action: str, agent_id: str | None,
                  args: dict[str, Any] | None) -> bytes:  # fmt: skip
    """A request encoded: one frame, or for a larger one its parts (spec/ipc.md, "Requests in parts"). What
    msgpack cannot carry is the caller's bad input, said in one line, not a crash from its C code: text that is
    not UTF-8 (a lone surrogate, as Python makes of an argument's undecodable bytes or as JSON can spell), a
    whole number outside 64 bits, a value of no wire type (a set, an object), a request over MAX_REQUEST."""
    payload = request_payload(action, agent_id, args)
    try:
        try:
            return encoder.encode(kind, conv, payload)
        except FrameTooLarge:  # packed twice, but only when it is this large
            return encoder.encode_in_parts(kind, conv, payload, MAX_REQUEST)
    except UnicodeEncodeError:
        raise bad_input("the request holds text that is not valid Unicode (a lone surrogate, or an argument "
                        "whose bytes are not UTF-8); send UTF-8 text") from None  # fmt: skip
    except OverflowError:
        raise bad_input("the request holds a whole number outside 64 bits (-2**63 to 2**64-1); quote it to "
                        "send it as text") from None  # fmt: skip
    except FrameTooLarge as e:  # HTTP takes no more either
        raise bad_input(f"the {action[:64]} request is {e.size:,} bytes, over the {e.limit:,}-byte limit of one "
                        "request (IPC or HTTP); send less", code="PAYLOAD_TOO_LARGE") from None  # fmt: skip
    except TypeError as e:  # msgpack: "can not serialize 'set' object"
        raise bad_input(f"the request holds a value that cannot be sent ({e}); send JSON-like values: dict, "
                        "list, str, int, float, bool or None") from None  # fmt: skip


def reply_result(frame: Frame) -> Any:
    """The result of a reply frame, or the PDError it carries."""
    if frame.type in _OK:
        return frame.payload.get("result")
    raise PDError.from_wire(frame.payload)


def is_parting(frame: Frame) -> bool:
    """A REFUSE outside any conversation: the daemon sends one only as it closes the connection, saying why
    (over its connection cap, another uid, three malformed frames, a partial frame left hanging)."""
    return frame.conv_id == 0 and frame.type == Performative.REFUSE


def parting_refusal(sock: socket.socket, decoder: Decoder) -> Frame | None:
    """After a send found the daemon gone: the REFUSE it sent before hanging up (over its connection cap, another
    uid), read from what is already in the socket, so the caller learns why instead of "connection reset"."""
    sock.setblocking(False)
    try:
        while data := sock.recv(65536):
            decoder.feed(data)
    except OSError:
        pass
    for event in decoder.events():
        if isinstance(event, Frame) and is_parting(event):
            return event
    return None


class BlockingClient:
    def __init__(self, path: os.PathLike[str] | str, *, agent_id: str | None = None, timeout: float = 5.0) -> None:
        self.path = os.fspath(path)
        self.agent_id = agent_id
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self._decoder = Decoder(from_daemon=True)
        self._encoder = Encoder()
        self._parts = Parts()
        self._conv = 0
        self._pushed: deque[Frame] = deque()
        self._readable = select.poll()  # the socket's input, that a wait for a reply sleeps on (see connect)
        self._spin = Spin()

    def connect(self) -> BlockingClient:
        # The socket stays in blocking mode, its sends bounded by the kernel's SO_SNDTIMEO; reads never block
        # (see _recv). Python's own timeout mode polls before every send and every recv: two more syscalls per
        # request, ~a fifth of a client's CPU per request under load. It also fails a connect at once (EAGAIN)
        # when a Unix socket's listen backlog is full, instead of waiting for the daemon to accept.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(self.timeout))
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            raise DaemonUnavailable(f"no daemon at {self.path} ({e.strerror})") from None
        except BlockingIOError:
            sock.close()
            raise DaemonUnavailable(f"the daemon at {self.path} did not accept a connection within "
                                    f"{self.timeout:g}s") from None  # fmt: skip
        except OSError as e:
            sock.close()
            raise DaemonUnavailable(f"cannot reach the daemon at {self.path}: {e}") from None
        try:
            check_daemon_uid(sock, self.path)
        except PDError:
            sock.close()
            raise
        self._readable = select.poll()
        self._readable.register(sock, select.POLLIN)
        self.sock = sock
        return self

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> BlockingClient:
        return self if self.sock is not None else self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, data: bytes) -> None:
        assert self.sock is not None, "connect() first"
        try:
            self.sock.sendall(data)  # bounded by SO_SNDTIMEO, which stays self.timeout
        except OSError as e:
            refusal = parting_refusal(self.sock, self._decoder)
            if refusal is not None:
                raise PDError.from_wire(refusal.payload) from None
            raise DaemonUnavailable(f"lost the daemon while sending: {e}") from None

    def send(self, action: str, args: dict[str, Any] | None = None) -> None:
        """Fire-and-forget (conv id 0): no reply comes, even on error."""
        self._send(request_frame(self._encoder, Performative.INFORM, 0, action, self.agent_id, args))

    def request(
        self,
        action: str,
        args: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        kind: int = Performative.REQUEST,
        patient: bool = False,
    ) -> Any:
        """One request and its reply. ``patient``: the caller knows the operation may wait for seconds or more
        (a lock or take with ``wait``, ``msg.wait``, a run's stopping), so the reply is slept for at once, not
        polled for (see ``Spin``), and how long it took teaches the poll nothing."""
        self._conv = next_conv_id(self._conv)
        conv = self._conv
        self._send(request_frame(self._encoder, kind, conv, action, self.agent_id, args))
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            frame = self._next_frame(deadline, patient)
            if frame is None:
                self._withdraw(conv, action)
                raise NoReply(f"no reply to {action} within {timeout or self.timeout:g}s")
            if frame.conv_id == conv:
                return reply_result(frame)
            if frame.conv_id == 0:
                self._check_pushed(frame)
                self._pushed.append(frame)

    def _withdraw(self, conv: int, action: str) -> None:
        """Tell the daemon nobody waits for ``conv`` any more, as the SDK does, so a blocked take does not win a
        tuple nobody receives. Best effort: a daemon that is gone has nothing to cancel."""
        try:
            self._send(self._encoder.encode(Performative.CANCEL, conv, {"action": action}))
        except PDError:
            pass

    def receive(self, timeout: float | None = None, *, patient: bool = False) -> Frame | None:
        """The next server-pushed frame, or None when ``timeout`` (seconds; None = forever) passes. ``patient``:
        the frame may be long in coming (a subscription waiting for whoever publishes next): slept for at once,
        as a patient ``request`` is. A caller that has just made the daemon push one polls for it."""
        if self._pushed:
            return self._pushed.popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            frame = self._next_frame(deadline, patient)
            if frame is None or frame.conv_id == 0:
                if frame is not None:
                    self._check_pushed(frame)
                return frame

    @staticmethod
    def _check_pushed(frame: Frame) -> None:
        if is_parting(frame):
            raise PDError.from_wire(frame.payload)

    def _recv(self, remaining: float | None, patient: bool = False) -> bytes:
        """The next bytes from the daemon: polled for within the spin budget (see ``Spin``), unless ``patient``,
        then slept for until the socket is readable, for at most ``remaining`` seconds (None: forever;
        BlockingIOError when they run out).

        The sleep is a ``poll`` for input, not a blocking ``recv``: the daemon's read of the request frees its
        bytes, which wakes whoever sleeps on this socket to say it can send again. A ``poll`` for input sleeps
        through that; a ``recv`` wakes, finds nothing and sleeps again, two context switches more per request
        when client and daemon share a CPU (1.7 switches per request, measured, against 1)."""
        sock, clock = self.sock, time.perf_counter_ns
        assert sock is not None, "connect() first"
        budget = None if patient else self._spin.usable()
        start = clock()
        if budget:
            if remaining is not None:
                budget = min(budget, int(remaining * 1e9))
            end = start + budget
            while True:
                try:
                    return sock.recv(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    if clock() >= end:
                        break
        while True:
            left_ms = -1
            if remaining is not None:  # a wait of weeks (or inf) sleeps in turns of poll's longest
                left_ms = max(0, math.ceil(min(_POLL_MAX_MS, (remaining - (clock() - start) / 1e9) * 1000)))
            if self._readable.poll(left_ms):
                try:
                    data = sock.recv(65536, socket.MSG_DONTWAIT)
                    break
                except BlockingIOError:
                    continue
            elif left_ms != _POLL_MAX_MS:
                raise BlockingIOError("no reply in time")
        if budget is not None:
            self._spin.waited(clock() - start)
        return data

    def _next_frame(self, deadline: float | None, patient: bool = False) -> Frame | None:
        """The next whole frame: a reply or a push sent in parts comes back put together."""
        assert self.sock is not None, "connect() first"
        while True:
            event = self._decoder.next_event()
            if isinstance(event, Frame):
                whole = self._parts.feed(event)
                if whole is not None:
                    return whole
                continue
            if isinstance(event, Malformed):
                raise PDError("frame_decode_error", f"the daemon sent a malformed frame: {event.reason}")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            try:
                data = self._recv(remaining, patient)
            except BlockingIOError:  # the time ran out
                return None
            except OSError as e:
                raise DaemonUnavailable(f"lost the daemon: {e}") from None
            if not data:
                raise DaemonUnavailable("the daemon closed the connection")
            self._decoder.feed(data)
