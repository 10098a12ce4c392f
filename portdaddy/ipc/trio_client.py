"""The trio IPC client the SDK stands on: many requests in flight on one connection, fire-and-forget sends
that never await, server pushes routed to handlers, and reconnection with backoff (after which the
``reconnect_handlers`` run, so the layer above can renew what the daemon forgot, like subscriptions).

A request without a time limit of its own is waited for while the daemon shows it is alive, not for a fixed
time: some operations wait by design (``msg.poll`` 30 s by default, ``msg.wait`` and ``spawn.wait`` without
a limit, ``spawn.kill`` through a grace period), and the daemon answers every request it received on an open
connection. What the connection's ``timeout`` guards against is a daemon that stopped answering at all.
"""

from __future__ import annotations

import functools
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import trio
from outcome import Value

from portdaddy.caller import blame_agent_variable
from portdaddy.errors import BadInput, DaemonUnavailable, NoReply, PDError
from portdaddy.ipc.client import Spin, is_parting, parting_refusal, reply_result, request_frame
from portdaddy.ipc.frame import RECV_SIZE, Decoder, Encoder, Frame, Parts, Performative, next_conv_id
from portdaddy.ipc.peer import check_daemon_uid

log = logging.getLogger("portdaddy.client")

BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0


# What a waiting request holds when its time runs out (None means the connection was lost).
_NO_REPLY: Any = object()


@dataclass(frozen=True, slots=True)
class GiveBack:
    """A request that gives back what a call nobody received was granted (a taken tuple written again, a lock
    released), and what to do with it if the connection closes before the daemon has done it."""

    action: str
    args: dict[str, Any]
    what: str  # for the log: "the tuple ['job', 7] of harbor h"
    # The daemon does it by itself when the connection closes (it releases connection-bound locks and drops
    # subscriptions), so a give-back of one is never sent on another connection.
    undone_on_close: bool = False
    # Doing it twice does no harm (a release by token), so one left unanswered by a lost connection is sent
    # again on the next; one that is not (a write) might land twice, and is logged instead.
    idempotent: bool = False
    # Refusals that mean there is nothing left to give back (a release whose token is stale: the lease ended
    # and the lock moved on).
    settled_by: tuple[str, ...] = ()


# What gives back a granted result: the requests to send, e.g. a taken tuple written again.
Undo = Callable[[Any], list[GiveBack]]
# A give-back refused for the connection's rate limit is sent again once the daemon's one-second window has moved on.
RESEND_AFTER_S = 1.0
SETTLE_POLL_S = 0.01
# The watchdog looks every third of the connection's timeout, but not in a busy loop for a timeout of 0.
MIN_WATCH_S = 0.01


class _TrioSpin(Spin):
    # A reply the poll missed is timed when trio runs the reader, after its idle CPU was woken (~100 µs on a virtual
    # machine): timed so, a reply the daemon sent within the budget was taken for a long wait, and once the budget
    # was down to nothing it never came back.
    LONG_NS = 3 * Spin.MAX_NS


class _PollBeforeSleep(trio.abc.Instrument):
    """Trio's hook before it sleeps for I/O, where a client that has just sent a request polls for its reply.
    One per trio run, however many clients it has: trio calls every instrument's hook on every pass that may
    sleep, and only the clients that sent a request since are looked at."""

    def __init__(self) -> None:
        self.clients = 0  # connected clients of the run: the hook goes with the last
        self.armed: list[TrioClient] = []  # clients that sent a request since the last sleep

    def before_io_wait(self, timeout: float) -> None:
        if self.armed and timeout > 0:  # 0: trio has tasks to run, and the replies may come meanwhile
            armed, self.armed = self.armed, []
            for client in armed:
                client._poll_for_reply(timeout)


_POLLER: trio.lowlevel.RunVar[_PollBeforeSleep | None] = trio.lowlevel.RunVar("portdaddy_poller", default=None)


class TrioClient:
    def __init__(
        self,
        path: os.PathLike[str] | str,
        *,
        agent_id: str | None = None,
        agent_var: str | None = None,
        timeout: float = 5.0,
        reconnect: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        self.agent_id = agent_id
        self.agent_var = agent_var  # the environment variable agent_id came from, named if the daemon refuses it
        self.timeout = timeout
        self.reconnect = reconnect
        self.sock: socket.socket | None = None
        self.connected = trio.Event()
        self.push_handlers: list[Callable[[Frame], None]] = []
        self.reconnect_handlers: list[Callable[[], None]] = []
        self.reconnects = 0
        self.closed = False  # set by close(): from then on every use says so, not "not connected"
        self._encoder = Encoder()
        self._conv = 0
        # conv id -> the task waiting for its reply; the reader reschedules it with the reply frame, or with None
        # when the connection is lost. A task parked by hand, not a trio.Event: a request is two task switches,
        # and an Event with its parking lot per request was a measurable part of the rest.
        self._pending: dict[int, trio.lowlevel.Task] = {}
        # conv id -> the deadline of a request with no limit of its own, moved on while the daemon shows life.
        self._watched: dict[int, trio.CancelScope] = {}
        self._heard = False  # something came from the daemon since the watchdog last looked
        # conv id -> what to do with a reply nobody waits for: give back a take or a lock the daemon granted as
        # its caller left, or see that such a give-back went through.
        self._orphans: dict[int, Callable[[Frame], None]] = {}
        # conv id -> a give-back sent and not answered yet.
        self._giving: dict[int, GiveBack] = {}
        # Give-backs surely not done yet (the rate limit refused them, or their connection closed before they were
        # answered and sending them again is safe), sent again by the connection's resender, on this connection
        # or the next one.
        self._resend: list[GiveBack] = []
        self._resend_lot = trio.lowlevel.ParkingLot()
        self._out = bytearray()
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._parting: Frame | None = None  # the REFUSE the daemon sent before closing the connection
        self._parts = Parts()  # replies and pushes in parts, per connection
        # Polling for a reply before trio sleeps (see _poll_for_reply): the socket's input, the budget learned as
        # the blocking client learns it, and the request polled for, with when it was sent.
        self._readable = select.poll()
        self._spin = _TrioSpin()
        self._poll_until = 0  # perf_counter_ns; 0: nothing to poll for
        self._poller: _PollBeforeSleep | None = None  # the run's, while run() runs
        self._polled: tuple[int, int] | None = None  # (conv id, sent at) of the request polled for, until caught

    # -- public --------------------------------------------------------------------------------------------

    async def request(
        self,
        action: str,
        args: dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
        kind: int = Performative.REQUEST,
        undo: Undo | None = None,
    ) -> Any:
        """One request and its reply. ``undo`` turns a success that arrives after the caller gave up (cancelled,
        or its timeout) into the requests that give back what was granted."""
        if self.sock is None:
            raise self._gone(f"not connected to {self.path}")
        conv = self._conv = next_conv_id(self._conv)
        self._pending[conv] = trio.lowlevel.current_task()
        if timeout is None:  # as long as the daemon lives: the watchdog moves the deadline on
            scope = self._watched[conv] = trio.CancelScope(deadline=trio.current_time() + self.timeout)
        else:
            scope = trio.move_on_after(timeout)
        frame = _NO_REPLY
        try:
            self._write(request_frame(self._encoder, kind, conv, action, self.agent_id, args))
            if self._poller is not None and (budget := self._spin.usable()) is not None:
                sent = time.perf_counter_ns()
                self._poll_until, self._polled = sent + budget, (conv, sent)
                self._poller.armed.append(self)
            with scope:
                frame = await trio.lowlevel.wait_task_rescheduled(functools.partial(self._give_up, conv, undo))
        except trio.Cancelled:
            self._withdraw(conv, action)  # Cancelled must propagate as it is
            raise
        finally:
            self._pending.pop(conv, None)
            if timeout is None:
                self._watched.pop(conv, None)
        if frame is None:
            raise DaemonUnavailable(f"lost the daemon while waiting for {action}")
        if frame is _NO_REPLY:
            self._withdraw(conv, action)
            if timeout is None:
                raise NoReply(f"no reply to {action}, and no sign of life for {self.timeout:g}s")
            raise NoReply(f"no reply to {action} within {timeout:g}s")
        try:
            return reply_result(frame)
        except BadInput as e:  # blame_agent_variable gives e back unless the refused id was the variable's
            raise blame_agent_variable(e, self.agent_var, self.agent_id) from None

    def _poll_for_reply(self, timeout: float) -> None:
        """Trio is about to sleep for up to ``timeout`` s: first poll the socket, within the budget of the request
        just sent, so the reply finds this process awake. On a virtual machine waking an idle CPU costs tens
        of µs on each side, what the blocking client's ``Spin`` saves (spec/ipc.md, "Clients"). Only when trio
        has nothing else to run, once per request, and never past trio's own timeout: what trio waits for
        waits at most the budget (100 µs). A reply the poll missed teaches the budget how long it took."""
        until = self._poll_until
        if not until:  # armed twice, or its reply came while trio ran other tasks
            return
        self._poll_until = 0
        poll, clock = self._readable.poll, time.perf_counter_ns
        until = min(until, clock() + int(timeout * 1e9))
        while clock() < until:
            if poll(0):
                self._polled = None
                return

    def _withdraw(self, conv: int, action: str) -> None:
        """Tell the daemon nobody waits for ``conv`` any more, so a blocked take does not win a tuple nobody
        receives. Best effort: a daemon that is gone has nothing to cancel."""
        if self.sock is not None:
            with suppress(PDError):
                self._write(self._encoder.encode(Performative.CANCEL, conv, {"action": action}))

    def _give_back(self, undo: Undo, frame: Frame) -> None:
        try:
            result = reply_result(frame)
        except PDError:  # refused or cancelled: nothing was granted
            return
        for give_back in undo(result):
            self._send_give_back(give_back)

    def _send_give_back(self, give_back: GiveBack) -> None:
        conv = self._conv = next_conv_id(self._conv)
        frame = request_frame(self._encoder, Performative.REQUEST, conv, give_back.action, self.agent_id,
                              give_back.args)  # fmt: skip
        try:
            self._write(frame)
        except PDError:  # not sent: the connection is going, and the next one may send it
            self._resend.append(give_back)
            return
        self._giving[conv] = give_back
        self._orphans[conv] = functools.partial(self._gave_back, conv)

    def _gave_back(self, conv: int, frame: Frame) -> None:
        give_back = self._giving.pop(conv)
        try:
            reply_result(frame)
        except PDError as e:
            if e.code == "rate_limited":  # the caller's own burst used up the second: not lost, only late
                self._resend.append(give_back)
                self._resend_lot.unpark_all()
            elif e.code not in give_back.settled_by:
                log.warning("could not give back %s, which a cancelled call was granted: %s", give_back.what, e)

    def _carry_over_give_backs(self) -> None:
        """The connection closed: of the give-backs not done, keep for the next connection those still needed
        and safe to send; say which the daemon did itself, and which may be lost."""
        unanswered, self._giving = self._giving, {}
        pending = [(g, False) for g in self._resend] + [(g, True) for g in unanswered.values()]
        self._resend = []
        for give_back, maybe_done in pending:
            if give_back.undone_on_close:
                log.info("%s was given back by the daemon as the connection closed", give_back.what)
            elif maybe_done and not give_back.idempotent:
                log.warning("%s, which a cancelled call was granted, may be lost: the connection closed before "
                            "the daemon answered its give-back, and sending it again could do it twice; see "
                            "whether it is there, and restore it if not", give_back.what)  # fmt: skip
            else:
                self._resend.append(give_back)

    async def settle(self, within: float) -> None:
        """Wait up to ``within`` seconds for what is under way to give back (a grant on its way to a caller that
        gave up, a give-back waiting to be sent again), so that closing the connection does not lose it."""
        with trio.move_on_after(within):
            while self.sock is not None and (self._orphans or self._resend):
                await trio.sleep(SETTLE_POLL_S)

    def _give_up(self, conv: int, undo: Undo | None, _: Any) -> trio.lowlevel.Abort:
        """A waiting request was cancelled (its timeout, or its caller's scope): a late reply finds nobody, but
        the daemon may have granted it already, so ``undo`` gives that back when it arrives. Registered here,
        as the wait ends: the reader may dispatch the reply before the cancelled task runs again."""
        self._pending.pop(conv, None)
        if undo is not None:
            self._orphans[conv] = functools.partial(self._give_back, undo)
        return trio.lowlevel.Abort.SUCCEEDED

    def send_nowait(self, action: str, args: dict[str, Any] | None = None) -> None:
        """Fire-and-forget: written now if the socket takes it, else queued for the writer. Never awaits."""
        self.send_frame(self.fire_and_forget_frame(action, args))

    def fire_and_forget_frame(self, action: str, args: dict[str, Any] | None = None) -> bytes:
        """The encoded frame ``send_nowait`` would write, for a caller that sends the same one again and again."""
        return request_frame(self._encoder, Performative.INFORM, 0, action, self.agent_id, args)

    def send_frame(self, frame: bytes) -> None:
        """Write an already encoded fire-and-forget frame (see ``fire_and_forget_frame``). Never awaits."""
        self._write(frame)

    # -- connection lifecycle ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the connection: connect (failing fast the first time), read, and reconnect with backoff."""
        self._connect()
        self._poller = poller = _POLLER.get() or _PollBeforeSleep()
        if not poller.clients:
            _POLLER.set(poller)
            trio.lowlevel.add_instrument(poller)
        poller.clients += 1
        task_status.started()
        try:
            await self._serve_and_reconnect()
        finally:
            self._poller = None
            poller.clients -= 1
            if not poller.clients:
                _POLLER.set(None)
                with suppress(KeyError):  # trio removed it already if it raised
                    trio.lowlevel.remove_instrument(poller)
            for give_back in self._resend:
                log.warning("%s, which a cancelled call was granted, is lost: the client closed before it could be "
                            "given back", give_back.what)  # fmt: skip
            self._resend.clear()

    async def _serve_and_reconnect(self) -> None:
        backoff = BACKOFF_START_S
        while True:
            await self._serve_connection()
            if not self.reconnect:
                return
            # A connection the daemon closed saying why (its connection cap, another uid) connects again at once
            # and is turned away again: only one that was lost starts the backoff over.
            if self._parting is None:
                backoff = BACKOFF_START_S
            while True:
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
                try:
                    self._connect()
                except DaemonUnavailable:
                    continue
                break
            self.reconnects += 1
            for handler in self.reconnect_handlers:
                handler()

    def _connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except OSError as e:
            sock.close()
            raise DaemonUnavailable(f"no daemon at {self.path}: {e.strerror or e}; start it with: pd start") from None
        try:
            check_daemon_uid(sock, self.path)
        except PDError:
            sock.close()
            raise
        sock.setblocking(False)
        self.sock = sock
        self._readable = select.poll()
        self._readable.register(sock, select.POLLIN)
        self._parting = None
        self._parts = Parts()
        self._out.clear()
        self.connected.set()

    async def _serve_connection(self) -> None:
        sock = self.sock
        assert sock is not None
        decoder = Decoder(from_daemon=True)
        # One reused read buffer (see RECV_SIZE).
        buffer = bytearray(RECV_SIZE)
        view = memoryview(buffer)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, sock)
                nursery.start_soon(self._resender)
                nursery.start_soon(self._watchdog)
                while True:
                    await trio.lowlevel.wait_readable(sock)
                    try:
                        size = sock.recv_into(buffer)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        break
                    if not size:
                        break
                    self._heard = True
                    decoder.feed(view[:size])
                    while (event := decoder.next_event()) is not None:
                        if event.__class__ is Frame:
                            self._dispatch(event)
                nursery.cancel_scope.cancel()
        finally:
            self.sock = None
            self.connected = trio.Event()
            sock.close()
            # A closed connection answers none of them. The daemon gives back, as it closes, a tuple it took for
            # a waiting taker and had not answered, a connection-bound lock, a subscription.
            self._orphans.clear()
            self._carry_over_give_backs()
            waiting, self._pending = self._pending, {}
            for task in waiting.values():
                # The waiter raises the daemon's parting REFUSE, or DaemonUnavailable when there was none.
                trio.lowlevel.reschedule(task, Value(self._parting))

    def close(self) -> None:
        """Mark the client as done with (its owner stops ``run``): later uses fail saying so."""
        self.closed = True

    def ensure_open(self) -> None:
        if self.closed:
            raise self._gone("closed")

    def _gone(self, message: str) -> PDError:
        """Why there is no connection: closed by its owner; the REFUSE the daemon sent as it closed the last one,
        if it sent one; else ``message``."""
        if self.closed:
            return DaemonUnavailable("this connection is closed (the block that opened it has ended); open a new "
                                     "one, e.g. async with portdaddy.connect()")  # fmt: skip
        if self._parting is not None:
            return PDError.from_wire(self._parting.payload)
        return DaemonUnavailable(message)

    def _dispatch(self, frame: Frame) -> None:
        frame = self._parts.feed(frame)  # a reply, or a push (a large delivery), may come in parts
        if frame is None:
            return
        if frame.conv_id:
            if self._polled is not None and self._polled[0] == frame.conv_id:
                self._spin.waited(time.perf_counter_ns() - self._polled[1])
                self._polled = None
            task = self._pending.pop(frame.conv_id, None)
            if task is not None:
                trio.lowlevel.reschedule(task, Value(frame))
            elif (on_reply := self._orphans.pop(frame.conv_id, None)) is not None:
                on_reply(frame)
            return
        if is_parting(frame):
            self._parting = frame
        for handler in self.push_handlers:
            handler(frame)

    # -- output --------------------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        sock = self.sock
        if sock is None:
            raise self._gone(f"not connected to {self.path}")
        if not self._out:
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                if self._parting is None:  # the reader has not seen it yet: it may still be in the socket
                    self._parting = parting_refusal(sock, Decoder(from_daemon=True))
                raise self._gone(f"lost the daemon: {e}") from None
            if sent == len(data):
                return
            data = data[sent:]
        self._out += data
        self._writer_lot.unpark_all()

    async def _resender(self) -> None:
        while True:
            if not self._resend:
                await self._resend_lot.park()
                continue
            await trio.sleep(RESEND_AFTER_S)
            again, self._resend = self._resend, []
            for give_back in again:
                self._send_give_back(give_back)

    async def _watchdog(self) -> None:
        """Keep requests without a limit of their own waiting while the daemon shows life. Every third of the
        timeout: if anything came from the daemon since the last look, their deadlines move to a whole timeout
        from now; if nothing did, ask it for a sign (``daemon.health``, whose reply counts as one). So a
        daemon that answers nothing for ``timeout`` seconds fails them, and one still working never does."""
        while True:
            await trio.sleep(max(self.timeout / 3, MIN_WATCH_S))
            if self._watched:
                if self._heard:
                    deadline = trio.current_time() + self.timeout
                    for scope in self._watched.values():
                        scope.deadline = max(scope.deadline, deadline)
                else:
                    conv = self._conv = next_conv_id(self._conv)  # nobody waits for the reply: it is dropped
                    with suppress(PDError):
                        self._write(request_frame(self._encoder, Performative.REQUEST, conv, "daemon.health",
                                                  self.agent_id, None))  # fmt: skip
            self._heard = False

    async def _writer(self, sock: socket.socket) -> None:
        while True:
            if not self._out:
                await self._writer_lot.park()
                continue
            await trio.lowlevel.wait_writable(sock)
            try:
                sent = sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return
            del self._out[:sent]
