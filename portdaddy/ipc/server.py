"""The binary IPC server: frames in, operations run, frames out, on ``daemon.ipc``.

One task, the reactor, serves every connection: the sockets are registered once in an epoll of the server's
own, whose fd trio waits on. For each ready socket it does one large non-blocking ``recv``, decodes and
handles its whole frames one by one, running synchronous operations inline (they are atomic on the trio
thread), and flushes all replies with one ``send``; what the socket does not take waits for EPOLLOUT. A
connection gets at most FRAMES_PER_PASS frames handled per pass; the rest wait in its decoder, unread socket
behind them, until the next pass, so one client's burst cannot hold up the others. Between passes, while trio
has nothing else to run, the reactor waits for its epoll without a pass through trio's scheduler (linger.py).
Operations that wait (blocking acquires, ``tuple in --wait``) run as tasks in the server's nursery, cancelled
when their connection closes, so the connection keeps serving. Limits (reference §20.5): connection cap,
per-connection rate, a three-strike budget for malformed frames, bounded output, one agent identity per
connection.

A reply that hands something over (a taken tuple, a granted lock: its op has an ``undo``) is delivered once
its last byte is in the socket. Until then the connection keeps the op's ``undo`` beside it, and a reply that
cannot get there (the send fails, or the connection closes with it still queued) gives back what it handed
over (spec/decisions.md, "Durability"). Only such replies cost anything: a tuple in a list, cleared by the
send that takes them.
"""

from __future__ import annotations

import functools
import logging
import os
import select
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from portdaddy.core.ops import Ctx, Later, Op
from portdaddy.core.validate import AGENT_ID
from portdaddy.errors import PDError, bad_input, performative
from portdaddy.ipc.frame import MAX_REQUEST, RECV_SIZE, Decoder, Encoder, Frame, FrameTooLarge, Malformed, Performative
from portdaddy.ipc.linger import Linger
from portdaddy.ipc.peer import peer_credentials

log = logging.getLogger("portdaddy.ipc")

MAX_STRIKES = 3
# Backpressure: past this much queued output the connection stops handling frames until the client reads it
# down to OUT_LOW_WATER, so a client that sends but never reads blocks in its own send (kernel buffers full)
# instead of growing the daemon. Replies are never dropped.
OUT_HIGH_WATER = 1024 * 1024
OUT_LOW_WATER = 256 * 1024
# Pushed deliveries are dropped (and counted) once this much output is queued; ``push`` says so, and the
# pusher tells its client what it missed (the broker's ``msg.missed``) once it reads again.
MAX_PUSH_BACKLOG = 256 * 1024
# Operations that wait (blocking acquires, tuple waits) in flight at once on one connection.
MAX_WAITING_OPS = 256
# Frames one connection gets handled per reactor pass. The rest wait in its decoder for the next pass, so a
# client flooding the socket delays the others by one budget, not by a whole read (thousands of frames).
FRAMES_PER_PASS = 32

_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_IN_OR_GONE = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_REPLY_TYPES = {Performative.REQUEST, Performative.QUERY_IF, Performative.QUERY_REF, Performative.SUBSCRIBE,
                Performative.UNSUBSCRIBE}  # fmt: skip
# The one action each subscription performative carries (the original's clients re-subscribe with SUBSCRIBE).
_SUBSCRIPTION_ACTIONS = {Performative.SUBSCRIBE: "msg.subscribe", Performative.UNSUBSCRIBE: "msg.unsubscribe"}


def bind_unix(path: os.PathLike[str] | str) -> socket.socket:
    """A listening Unix socket created 0600 (umask around bind, so there is no window where it is wider)."""
    path = os.fspath(path)  # its length was checked with the home (Settings.home_problem)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(512)
    sock.setblocking(False)
    return sock


class Connection:
    """One client. Ops see it as ``ctx.conn``: ``push`` deliveries, ``on_close`` cleanups, ``data`` slots.

    It has no task of its own: the server's reactor calls ``on_readable`` / ``on_writable`` when epoll says so.
    """

    def __init__(self, server: IpcServer, sock: socket.socket, peer_pid: int) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.peer_pid = peer_pid
        self.ctx = Ctx(server.app, "ipc", pid=peer_pid, conn=self)
        self.decoder = Decoder(reuse_repeats=True, max_request=MAX_REQUEST)  # puts requests in parts together
        self.encoder = Encoder()
        self.out = bytearray()
        self.strikes = 0
        self.dropped_pushes = 0
        self.data: dict[str, Any] = {}  # per-connection state owned by subsystems (subscriptions, …)
        self._closers: list[Callable[[], None]] = []
        # Replies queued in ``out`` that hand something over: (where each ends in ``out``, its op's undo, the result).
        self._handed: list[tuple[int, Callable[[Ctx, Any], None], Any]] = []
        self._paused = False  # whole frames wait in the decoder until the client reads its replies down
        self.watching = _IN  # what the reactor watches this socket for
        self._pending: dict[int, trio.CancelScope] = {}  # conv id -> its waiting operation
        self._waiting: set[trio.CancelScope] = set()
        self._repeated: Frame | None = None  # the decoder's repeatable frame, once bound, and its kwargs
        self._repeated_kwargs: dict[str, Any] = {}
        self._window = 0
        self._window_count = 0
        self.hangup = False  # stop reading: the connection is being cut off
        self.backlogged = False  # whole frames wait in the decoder for the next pass (FRAMES_PER_PASS)
        self.closed = False

    # -- what operations use -------------------------------------------------------------------------------

    @property
    def agent_id(self) -> str | None:
        return self.ctx.agent_id

    def on_close(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once when the connection ends (subscriptions dropped, connection-bound locks released)."""
        self._closers.append(fn)

    def push(self, payload: dict[str, Any]) -> bool:
        """Queue a server-initiated INFORM (conv 0), in parts if it is larger than a frame. False if dropped:
        closed, over MAX_REPLY, or the client is not reading (more than MAX_PUSH_BACKLOG queued)."""
        if self.closed:
            return False
        if len(self.out) > MAX_PUSH_BACKLOG:
            self._drop_push()
            return False
        try:
            try:
                frame = self.encoder.encode(Performative.INFORM, 0, payload)
            except FrameTooLarge:  # a message of many floats: its parts go into the outbox back to back
                frame = self.encoder.encode_in_parts(Performative.INFORM, 0, payload)
        except (TypeError, ValueError, OverflowError) as e:  # over MAX_REPLY, or a value msgpack cannot carry
            log.warning("dropped a %s push: %s", payload.get("action"), e)
            self._drop_push()
            return False
        self.out += frame
        self._flush()
        return True

    def _drop_push(self) -> None:
        self.dropped_pushes += 1
        self.server.dropped_pushes += 1

    # -- what the reactor calls ----------------------------------------------------------------------------

    def on_readable(self) -> None:
        if self.backlogged:  # not read until the frames it sent are handled: the reactor carries on with those
            return
        try:
            size = self.sock.recv_into(self.server.read_buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            size = 0
        if not size:
            self.close()
            return
        self.decoder.feed(self.server.read_view[:size])
        self.handle_frames()

    def on_writable(self) -> None:
        self._flush()
        if self._paused and len(self.out) <= OUT_LOW_WATER:
            self._paused = False
            self.handle_frames()  # the client read its replies down: carry on with the frames it sent
        else:
            self._watch()  # level-triggered: a drained outbox must stop watching for output

    def handle_frames(self) -> None:
        """Handle whole frames in order, at most FRAMES_PER_PASS of them (the reactor calls again next pass while
        ``backlogged``); pause while the outbox is over OUT_HIGH_WATER.

        One frame is decoded, handled and dropped before the next: decoding a whole read first kept thousands
        of payloads alive at once, which the garbage collector then promoted and traversed (a third of the
        time per fire-and-forget frame under a flood)."""
        next_event, handle = self.decoder.next_event, self._handle
        budget = FRAMES_PER_PASS
        self.backlogged = False
        while (event := next_event()) is not None:
            handle(event)
            if self.hangup:
                self.close()
                return
            if len(self.out) > OUT_HIGH_WATER:
                self._flush()
                if len(self.out) > OUT_LOW_WATER:
                    # No second flush: one that drained the outbox would leave a paused connection watching
                    # nothing. Paused, it has output queued, so EPOLLOUT (on_writable) resumes it.
                    self._paused = True
                    break
            budget -= 1
            if not budget:
                self.backlogged = True
                self.server.backlog.append(self)
                self._flush()
                break
        else:
            self._flush()
        if self.out or self.watching != _IN or self._paused:
            self._watch()
        if self.decoder.buffered or self.server.partial:
            self.server.track_partial(self)

    def _watch(self) -> None:
        """Watch for input unless frames still wait on a full outbox; for output while some is queued."""
        mask = (0 if self._paused else _IN) | (_OUT if self.out else 0)
        if mask != self.watching and not self.closed:
            self.watching = mask
            self.server.epoll.modify(self.fd, mask)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.forget(self)
        for scope in self._waiting:
            scope.cancel()
        for fn in reversed(self._closers):
            try:
                fn()
            except Exception:
                log.exception("connection cleanup failed")
        self._closers.clear()
        # Best effort: let the last frames (a REFUSE before disconnect) reach the client. What the socket does not
        # take never reaches it.
        if self.out:
            try:
                sent = self.sock.send(self.out)
            except OSError:
                sent = 0
            if self._handed:
                self._delivered(sent)
        if self._handed:
            self._give_back_unsent()
        self.sock.close()

    def _flush(self) -> None:
        out = self.out
        if not out:
            return
        try:
            sent = self.sock.send(out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # the peer is gone (EPIPE, ECONNRESET): its hang-up wakes the reactor, which closes
            out.clear()
            self.hangup = True
            if self._handed:
                self._give_back_unsent()
            return
        del out[:sent]
        if self._handed:
            self._delivered(sent)
        if out and not self.watching & _OUT:
            self._watch()

    def _delivered(self, sent: int) -> None:
        """The first ``sent`` bytes of the outbox went into the socket: the replies they complete are delivered
        (all we can know: the kernel has them), and a reply cut short by ``sent`` is not."""
        handed = self._handed
        if handed[-1][0] <= sent:  # the usual case: the send took every one
            handed.clear()
        elif sent:
            self._handed = [(end - sent, undo, result) for end, undo, result in handed if end > sent]

    def _give_back_unsent(self) -> None:
        """The replies still queued will never reach the caller: give back what each handed over, in order."""
        handed, self._handed = self._handed, []
        for _, undo, result in handed:
            self._undo(undo, result)

    def _undo(self, undo: Callable[[Ctx, Any], None], result: Any) -> None:
        try:
            undo(self.ctx, result)
        except Exception:  # one failed give-back must not stop the others, nor the reactor
            log.exception("could not give back what an undelivered reply handed over: %.200r", result)

    # -- frames --------------------------------------------------------------------------------------------

    def _reply(self, kind: int, conv_id: int, payload: dict[str, Any]) -> bool:
        """Queue a reply; False if a FAILURE had to go in its place."""
        try:
            try:
                self.out += self.encoder.encode(kind, conv_id, payload)
            except FrameTooLarge:  # a long listing: in parts (spec/ipc.md "Replies")
                self.out += self.encoder.encode_in_parts(kind, conv_id, payload)
            return True
        except FrameTooLarge as e:
            body = {"action": payload.get("action") or "", "error": "PAYLOAD_TOO_LARGE", "message": str(e)}
            self.out += self.encoder.encode(Performative.FAILURE, conv_id, body)
        except (TypeError, ValueError, OverflowError) as e:
            # A value msgpack cannot carry (a lone surrogate, a number over 64 bits, stored before input refused
            # them): this reply fails, the reactor and every other connection carry on.
            log.error("could not encode a %s reply: %s", payload.get("action"), e)
            body = {"action": str(payload.get("action") or ""), "error": "INTERNAL",
                    "message": "the reply could not be encoded; see daemon.log"}  # fmt: skip
            self.out += self.encoder.encode(Performative.FAILURE, conv_id, body)
        return False

    def _hand_over(self, conv_id: int, action: str, result: Any, undo: Callable[[Ctx, Any], None]) -> None:
        """Queue the reply of an operation that handed something over, keeping ``undo`` until the reply is in the
        socket. A reply that cannot get there gives it back at once: the connection closed before it came (a
        grant woke a waiter whose caller had left), or a FAILURE went in its place."""
        if self._reply(Performative.INFORM_DONE, conv_id, {"action": action, "result": result}) and not self.closed:
            self._handed.append((len(self.out), undo, result))
        else:
            self._undo(undo, result)

    def _error(self, conv_id: int, action: str, err: PDError) -> None:
        # Every frame carries a str action (spec/ipc.md), replies included, or clients see it as malformed.
        if conv_id:
            self._reply(performative(err.code), conv_id, {"action": action, **err.to_wire()})
        else:
            self.server.dropped_frames += 1  # nobody waits for this reply; count what we could not do

    def _strike(self, conv_id: int, reason: str) -> None:
        self.strikes += 1
        self.server.malformed += 1
        if self.strikes >= MAX_STRIKES:
            self.server.cut_off += 1
            self._reply(Performative.REFUSE, 0, {
                "action": "", "error": "disconnected", "reason": f"{self.strikes} malformed frames; last: {reason}",
                "message": "too many malformed frames; connection closed",
            })  # fmt: skip
            self.hangup = True  # handle_frames stops and closes
            return
        self._reply(Performative.NOT_UNDERSTOOD, conv_id, {
            "action": "", "error": "frame_decode_error", "message": reason, "violations": self.strikes,
        })  # fmt: skip

    def _over_rate(self) -> bool:
        rate = self.server.rate
        if not rate:
            return False
        window = int(time.monotonic())
        if window != self._window:
            self._window, self._window_count = window, 0
        self._window_count += 1
        return self._window_count > rate

    def _bind_agent(self, agent: Any) -> PDError | None:
        """Trust on first frame: the first ``agentId`` binds the connection; another one later is refused."""
        if agent == self.ctx.agent_id:
            return None
        if self.ctx.agent_id is not None:
            return PDError("agent_mismatch", f"this connection is bound to agent {self.ctx.agent_id!r}; "
                                             f"open another connection to act as {str(agent)[:100]!r}")  # fmt: skip
        try:
            self.ctx.agent_id = AGENT_ID("agentId", agent)
        except PDError as e:
            return e
        return None

    def _handle(self, event: Frame | Malformed) -> None:
        if event.__class__ is Malformed:
            self._strike(event.conv_id, event.reason)
            return
        kind, conv_id, payload = event
        action = payload["action"]
        wants_reply = conv_id != 0 and kind in _REPLY_TYPES
        if self.server.rate and self._over_rate():
            self.server.rate_limited += 1
            if wants_reply:
                self._reply(Performative.REFUSE, conv_id, {
                    "action": action, "error": "rate_limited", "limit": self.server.rate, "window": "per_second",
                    "message": f"over {self.server.rate} frames/s on this connection; slow down",
                })  # fmt: skip
            else:
                self.server.dropped_frames += 1
            return
        if kind == Performative.CANCEL:
            scope = self._pending.get(conv_id)
            if scope is not None:
                scope.cancel()
            return
        if not wants_reply:
            conv_id = 0
        subscription_action = _SUBSCRIPTION_ACTIONS.get(kind)
        if subscription_action is not None and action != subscription_action:
            self._error(conv_id, action, bad_input(f"a {Performative(kind).name} frame carries {subscription_action}; "
                                                   f"send {action[:64]!r} as a REQUEST"))  # fmt: skip
            return
        agent = payload.get("agentId")
        if agent is not None:
            refusal = self._bind_agent(agent)
            if refusal is not None:
                self._error(conv_id, action, refusal)
                return
        op = self.server.ops.get(action)
        if op is None:
            self._error(conv_id, action, PDError("unknown_action", f"unknown action {action[:64]!r}"))
            return
        if not wants_reply and not op.fire_and_forget:
            self.server.dropped_frames += 1  # cannot report an error for a request nobody waits on
            return
        try:
            if event is self._repeated:  # the decoder handed back the last fire-and-forget frame: same kwargs
                kwargs = self._repeated_kwargs
            else:
                kwargs = op.bind(payload)
                if event is self.decoder.repeatable:  # only a frame the decoder may hand back is worth keeping
                    self._repeated, self._repeated_kwargs = event, kwargs
            if op.is_async:
                self._start_waiting_op(op, functools.partial(op.handler, self.ctx, **kwargs), conv_id)
                return
            self.ctx.acknowledged = wants_reply
            result = op.handler(self.ctx, **kwargs)
            if result.__class__ is Later:
                self._start_waiting_op(op, result.run, conv_id)
                return
        except PDError as e:
            self._error(conv_id, action, e)
            return
        except Exception:
            log.exception("operation %s failed", action)
            self._error(conv_id, action, PDError("INTERNAL", f"{action} failed; see daemon.log"))
            return
        if wants_reply:
            if op.undo is None:
                self._reply(Performative.INFORM_DONE, conv_id, {"action": action, "result": result})
            else:
                self._hand_over(conv_id, action, result, op.undo)

    def _start_waiting_op(self, op: Op, run: Callable[[], Awaitable[Any]], conv_id: int) -> None:
        if len(self._waiting) >= MAX_WAITING_OPS:
            message = f"{MAX_WAITING_OPS} waiting operations are in flight on this connection; wait or open another"
            raise PDError("RESOURCE_LIMIT", message)
        scope = trio.CancelScope()  # close() cancels it
        self._waiting.add(scope)
        if conv_id:
            self._pending[conv_id] = scope
        self.server.nursery.start_soon(self._run_waiting_op, op, run, conv_id, scope)

    async def _run_waiting_op(self, op: Op, run: Callable[[], Awaitable[Any]], conv_id: int,
                              scope: trio.CancelScope) -> None:  # fmt: skip
        action = op.name
        try:
            with scope:
                try:
                    result = await run()
                except PDError as e:
                    self._error(conv_id, action, e)
                except Exception:
                    log.exception("operation %s failed", action)
                    self._error(conv_id, action, PDError("INTERNAL", f"{action} failed; see daemon.log"))
                else:
                    if op.undo is not None:  # a request: only fire-and-forget ops come without a conv id
                        self._hand_over(conv_id, action, result, op.undo)
                    elif conv_id:
                        self._reply(Performative.INFORM_DONE, conv_id, {"action": action, "result": result})
            if scope.cancelled_caught and conv_id and not self.closed:
                self._error(conv_id, action, PDError("CANCELLED", f"{action} was cancelled"))
        finally:
            self._waiting.discard(scope)
            if self._pending.get(conv_id) is scope:
                del self._pending[conv_id]
        if not self.closed:
            self._flush()


class IpcServer:
    name = "ipc"

    def __init__(self, app: Any) -> None:
        self.app = app
        self.ops: dict[str, Op] = app.ops
        self.max_conn = app.settings.ipc_max_conn
        self.rate = app.settings.ipc_rate
        # A connection holding part of a frame is closed if the rest does not come within this long.
        self.partial_timeout = app.settings.ipc_partial_timeout_ms / 1000
        self.connections: set[Connection] = set()
        self.epoll = select.epoll()
        # Every read lands in this one buffer (see RECV_SIZE) and is copied straight into its connection's decoder.
        self.read_buffer = bytearray(RECV_SIZE)
        self.read_view = memoryview(self.read_buffer)
        self.nursery: trio.Nursery  # set by serve(); waiting operations run in it
        self._by_fd: dict[int, Connection] = {}
        self.partial: dict[Connection, float] = {}  # connection holding half a frame -> trio deadline
        self.backlog: list[Connection] = []  # connections with frames left over from this pass, in order
        self.uid = os.getuid()
        # Counters since start (daemon.status "counts"): what the limits refused or dropped.
        self.refused = 0  # connections refused: over the cap or another uid
        self.malformed = 0  # malformed frames (strikes)
        self.cut_off = 0  # connections closed on their third strike
        self.rate_limited = 0  # frames over the per-connection rate
        self.dropped_frames = 0  # fire-and-forget frames that could not be acted on
        self.dropped_pushes = 0  # deliveries not queued for clients that were not reading

    def stats(self) -> dict[str, Any]:
        return {
            "ipcConnections": len(self.connections), "ipcRefused": self.refused, "ipcMalformed": self.malformed,
            "ipcCutOff": self.cut_off, "ipcRateLimited": self.rate_limited, "ipcDroppedFrames": self.dropped_frames,
            "ipcDroppedPushes": self.dropped_pushes,
        }  # fmt: skip

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        path = self.app.settings.ipc_sock
        listener = bind_unix(path)
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._accept, listener)
                task_status.started()
                await self._react()
        finally:
            for conn in list(self.connections):
                conn.close()
            self.epoll.close()
            listener.close()  # its file is removed by the daemon's exit, if it is still this daemon's

    async def _react(self) -> None:
        """The reactor: one task serves every connection. A trio task per connection paid a scheduler pass
        and an epoll re-registration per request; here one wake-up serves every ready socket (level-triggered,
        registered once): 16 busy connections get ~1.5 times the requests through."""
        epoll, by_fd, epfd = self.epoll, self._by_fd, self.epoll.fileno()
        linger = Linger.start(epoll)
        while True:
            events = None
            if self.backlog:  # frames are waiting: let trio's other tasks (HTTP among them) run, then go on
                await trio.lowlevel.checkpoint()
            elif self.partial:
                with trio.move_on_at(min(self.partial.values())):
                    await trio.lowlevel.wait_readable(epfd)
            elif linger is not None:
                # Events the linger found while trio had nothing to run need no pass through its scheduler.
                if (events := linger.wait()) is None:
                    await trio.lowlevel.wait_readable(epfd)
                    linger.passed_through_trio()
            else:  # no cancel scope to enter and leave on the hot path
                await trio.lowlevel.wait_readable(epfd)
            backlog, self.backlog = self.backlog, []
            for fd, mask in events or epoll.poll(0):
                conn = by_fd.get(fd)
                if conn is None:  # closed earlier in this pass
                    continue
                if mask & _OUT:
                    conn.on_writable()
                if mask & _IN_OR_GONE and not conn.closed:
                    if conn.hangup or not conn.watching & _IN:  # cut off, or the peer left mid-backlog
                        conn.close()
                    else:
                        conn.on_readable()
            for conn in backlog:
                if conn.backlogged and not conn.closed:
                    conn.handle_frames()
            if self.partial:
                self._cut_off_partials()

    async def _accept(self, listener: socket.socket) -> None:
        while True:
            await trio.lowlevel.wait_readable(listener)
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:  # EMFILE and friends: back off instead of spinning
                log.warning("accept failed: %s", e)
                await trio.sleep(0.05)
                continue
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        pid, uid, _ = peer_credentials(sock)
        conn = Connection(self, sock, pid)
        if uid != self.uid:
            # The socket is 0600, so only root or a changed mode lets another user this far.
            self._refuse(conn, "FORBIDDEN", f"peer uid {uid} is not the daemon's uid {self.uid}")
        elif len(self.connections) >= self.max_conn:
            self._refuse(conn, "max_connections", f"the daemon serves at most {self.max_conn} IPC connections; "
                                                  "close idle ones or raise PORT_DADDY_IPC_MAX_CONN")  # fmt: skip
        else:
            self.connections.add(conn)
            self._by_fd[conn.fd] = conn
            self.epoll.register(conn.fd, _IN)

    def forget(self, conn: Connection) -> None:
        """A closing connection leaves the reactor (before its socket closes and its fd number is reused)."""
        self.connections.discard(conn)
        if self._by_fd.pop(conn.fd, None) is not None:
            self.epoll.unregister(conn.fd)
        self.partial.pop(conn, None)

    def track_partial(self, conn: Connection) -> None:
        """Half a frame holds a connection slot: its rest must follow within ``partial_timeout`` of the last
        bytes that came (a connection not being read, its outbox full, is not timed)."""
        if conn.decoder.buffered and conn.watching & _IN:
            self.partial[conn] = trio.current_time() + self.partial_timeout
        elif self.partial:
            self.partial.pop(conn, None)

    def _cut_off_partials(self) -> None:
        now = trio.current_time()
        for conn in [c for c, deadline in self.partial.items() if deadline <= now]:
            self.cut_off += 1
            conn._reply(Performative.REFUSE, 0, {
                "action": "", "error": "disconnected",
                "message": f"a partial frame waited {self.partial_timeout:g}s for its rest",
            })  # fmt: skip
            conn.close()

    def _refuse(self, conn: Connection, code: str, message: str) -> None:
        self.refused += 1
        conn._reply(Performative.REFUSE, 0, {"action": "", "error": code, "message": message})
        conn.close()
