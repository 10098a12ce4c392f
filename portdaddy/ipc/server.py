"""The binary IPC server: frames in, operations run, frames out, on ``daemon.ipc``.

Each connection reads straight from a non-blocking stdlib socket (``wait_readable`` then one large ``recv``),
parses every whole frame in the buffer, runs synchronous operations inline (they are atomic on the trio
thread) and flushes all replies with one ``send``. Operations that wait (blocking acquires, ``tuple in
--wait``) run as tasks in the connection's nursery so the connection keeps serving. Limits (reference §20.5):
connection cap, per-connection rate, a three-strike budget for malformed frames, bounded output, one agent
identity per connection.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from portdaddy.core.ops import Ctx, Later, Op
from portdaddy.errors import PDError, bad_input, performative
from portdaddy.ipc.frame import Decoder, Encoder, Frame, FrameTooLarge, Malformed, Performative

log = logging.getLogger("portdaddy.ipc")

MAX_STRIKES = 3
RECV_SIZE = 256 * 1024
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

_REPLY_TYPES = {Performative.REQUEST, Performative.QUERY_IF, Performative.QUERY_REF, Performative.SUBSCRIBE,
                Performative.UNSUBSCRIBE}  # fmt: skip


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))


def bind_unix(path: os.PathLike[str] | str) -> socket.socket:
    """A listening Unix socket created 0600 (umask around bind, so there is no window where it is wider)."""
    path = os.fspath(path)
    if len(path.encode()) > 107:
        raise OSError(f"socket path is {len(path)} bytes; Unix sockets allow 107: {path}")
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
    """One client. Ops see it as ``ctx.conn``: ``push`` deliveries, ``on_close`` cleanups, ``data`` slots."""

    def __init__(self, server: IpcServer, sock: socket.socket, peer_pid: int) -> None:
        self.server = server
        self.sock = sock
        self.peer_pid = peer_pid
        self.ctx = Ctx(server.app, "ipc", pid=peer_pid, conn=self)
        self.decoder = Decoder()
        self.encoder = Encoder()
        self.out = bytearray()
        self.strikes = 0
        self.dropped_pushes = 0
        self.data: dict[str, Any] = {}  # per-connection state owned by subsystems (subscriptions, …)
        self._closers: list[Callable[[], None]] = []
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._drained_lot = trio.lowlevel.ParkingLot()
        self._pending: dict[int, trio.CancelScope] = {}
        self._waiting_ops = 0
        self._window = 0
        self._window_count = 0
        self._nursery: trio.Nursery | None = None
        self.hangup = False  # stop reading: the connection is being cut off
        self.closed = False

    # -- what operations use -------------------------------------------------------------------------------

    @property
    def agent_id(self) -> str | None:
        return self.ctx.agent_id

    def on_close(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once when the connection ends (subscriptions dropped, connection-bound locks released)."""
        self._closers.append(fn)

    def push(self, payload: dict[str, Any]) -> bool:
        """Queue a server-initiated INFORM (conv 0). False if dropped: closed, too large, or the client is not
        reading (more than MAX_PUSH_BACKLOG queued)."""
        if self.closed:
            return False
        if len(self.out) > MAX_PUSH_BACKLOG:
            self._drop_push()
            return False
        try:
            frame = self.encoder.encode(Performative.INFORM, 0, payload)
        except FrameTooLarge:
            log.warning("dropped a %s push larger than one frame", payload.get("action"))
            self._drop_push()
            return False
        self.out += frame
        self._flush()
        return True

    def _drop_push(self) -> None:
        self.dropped_pushes += 1
        self.server.dropped_pushes += 1

    # -- the loop ------------------------------------------------------------------------------------------

    async def serve(self) -> None:
        sock = self.sock
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                while not self.hangup:
                    if self.decoder.buffered:
                        # Half a frame holds a connection slot: the rest must follow promptly.
                        with trio.move_on_after(self.server.partial_timeout) as wait:
                            await trio.lowlevel.wait_readable(sock)
                        if wait.cancelled_caught:
                            self.server.cut_off += 1
                            self._reply(Performative.REFUSE, 0, {
                                "action": "", "error": "disconnected",
                                "message": f"a partial frame waited {self.server.partial_timeout:g}s for its rest",
                            })  # fmt: skip
                            break
                    else:
                        await trio.lowlevel.wait_readable(sock)
                    try:
                        data = sock.recv(RECV_SIZE)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        break
                    if not data:
                        break
                    self.decoder.feed(data)
                    await self._handle_all(self.decoder.events())
                nursery.cancel_scope.cancel()
        finally:
            self.close()

    async def _handle_all(self, events: list[Frame | Malformed]) -> None:
        handle = self._handle
        for event in events:
            handle(event)
            if self.hangup:
                break
            if len(self.out) > OUT_HIGH_WATER:
                self._flush()
                while len(self.out) > OUT_LOW_WATER and not self.hangup:
                    await self._drained_lot.park()
        self._flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fn in reversed(self._closers):
            try:
                fn()
            except Exception:
                log.exception("connection cleanup failed")
        self._closers.clear()
        self.server.connections.discard(self)
        # Best effort: let the last frames (a REFUSE before disconnect) reach the client.
        if self.out:
            try:
                self.sock.send(self.out)
            except OSError:
                pass
        self.sock.close()

    async def _writer(self) -> None:
        """Drains output the non-blocking send in ``_flush`` could not write at once."""
        out = self.out
        while True:
            if not out:
                await self._writer_lot.park()
                continue
            await trio.lowlevel.wait_writable(self.sock)
            try:
                sent = self.sock.send(out)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                self._lost()
                return
            del out[:sent]
            if len(out) <= OUT_LOW_WATER:
                self._drained_lot.unpark_all()

    def _lost(self) -> None:
        """The peer is gone (EPIPE, ECONNRESET): nothing more can be written."""
        self.out.clear()
        self.hangup = True
        self._drained_lot.unpark_all()

    def _flush(self) -> None:
        out = self.out
        if not out:
            return
        try:
            sent = self.sock.send(out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._lost()
            return
        del out[:sent]
        if out:
            self._writer_lot.unpark_all()

    # -- frames --------------------------------------------------------------------------------------------

    def _reply(self, kind: int, conv_id: int, payload: dict[str, Any]) -> None:
        try:
            self.out += self.encoder.encode(kind, conv_id, payload)
        except FrameTooLarge as e:
            body = {"action": payload.get("action") or "", "error": "PAYLOAD_TOO_LARGE", "message": str(e)}
            self.out += self.encoder.encode(Performative.FAILURE, conv_id, body)

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
            self.hangup = True  # the read loop stops and close() runs
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
        if not (isinstance(agent, str) and 0 < len(agent) <= 100):
            return bad_input("agentId must be a string of 1-100 characters")
        self.ctx.agent_id = agent
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
            kwargs = op.bind(payload)
            if op.is_async:
                self._start_waiting_op(action, functools.partial(op.handler, self.ctx, **kwargs), conv_id)
                return
            self.ctx.acknowledged = wants_reply
            result = op.handler(self.ctx, **kwargs)
            if result.__class__ is Later:
                self._start_waiting_op(action, result.run, conv_id)
                return
        except PDError as e:
            self._error(conv_id, action, e)
            return
        except Exception:
            log.exception("operation %s failed", action)
            self._error(conv_id, action, PDError("INTERNAL", f"{action} failed; see daemon.log"))
            return
        if wants_reply:
            self._reply(Performative.INFORM_DONE, conv_id, {"action": action, "result": result})

    def _start_waiting_op(self, action: str, run: Callable[[], Awaitable[Any]], conv_id: int) -> None:
        if self._waiting_ops >= MAX_WAITING_OPS:
            message = f"{MAX_WAITING_OPS} waiting operations are in flight on this connection; wait or open another"
            raise PDError("RESOURCE_LIMIT", message)
        assert self._nursery is not None
        self._waiting_ops += 1
        self._nursery.start_soon(self._run_waiting_op, action, run, conv_id)

    async def _run_waiting_op(self, action: str, run: Callable[[], Awaitable[Any]], conv_id: int) -> None:
        try:
            with trio.CancelScope() as scope:
                if conv_id:
                    self._pending[conv_id] = scope
                try:
                    result = await run()
                except PDError as e:
                    self._error(conv_id, action, e)
                except Exception:
                    log.exception("operation %s failed", action)
                    self._error(conv_id, action, PDError("INTERNAL", f"{action} failed; see daemon.log"))
                else:
                    if conv_id:
                        self._reply(Performative.INFORM_DONE, conv_id, {"action": action, "result": result})
                finally:
                    self._pending.pop(conv_id, None)
                self._flush()
            if scope.cancelled_caught and conv_id and not self.closed:
                self._error(conv_id, action, PDError("CANCELLED", f"{action} was cancelled"))
                self._flush()
        finally:
            self._waiting_ops -= 1


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
                task_status.started()
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
                    self._admit(sock, nursery)
        finally:
            listener.close()
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def _admit(self, sock: socket.socket, nursery: trio.Nursery) -> None:
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
            nursery.start_soon(conn.serve)

    def _refuse(self, conn: Connection, code: str, message: str) -> None:
        self.refused += 1
        conn._reply(Performative.REFUSE, 0, {"action": "", "error": code, "message": message})
        conn.close()
