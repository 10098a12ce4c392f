"""The trio-native Python SDK.

    async with portdaddy.connect() as pd:
        claim = await pd.claim("myapp:api")
        print(claim.port)

It speaks IPC over one connection (many requests in flight), starts the daemon if none is running (unless
``PORT_DADDY_NO_AUTOSTART`` is set), and raises the exceptions of ``portdaddy.errors`` (``LockHeld``,
``Conflict``, ``NotFound``, ``BadInput``, ``Timeout``, ``DaemonUnavailable``) mapped from the daemon's codes.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, NoReturn

import trio

from portdaddy.caller import agent_from_env, check_agent_id
from portdaddy.config import Settings
from portdaddy.durations import parse_duration_ms
from portdaddy.errors import BadInput, Conflict, DaemonUnavailable, LockHeld, NotFound, PDError, Timeout, bad_input
from portdaddy.ipc.frame import Frame
from portdaddy.ipc.trio_client import GiveBack, TrioClient, Undo
from portdaddy.launcher import ensure_daemon

log = logging.getLogger("portdaddy.sdk")

__all__ = [
    "BadInput", "Claim", "Conflict", "DaemonUnavailable", "History", "LockGrant", "LockHeld", "Message", "NotFound",
    "PDError", "PortDaddy", "Service", "Subscription", "Timeout", "connect",
]  # fmt: skip

# Deliveries buffered per subscription in the client; past this the SDK drops and catches up from history.
SUBSCRIPTION_BUFFER = 1000
_HISTORY_PAGE = 1000
# How much longer than the daemon's own timeout the client waits for the reply of a request that waits.
_BACKSTOP_MARGIN_S = 5.0
# How long the end of a connect() block waits for give-backs under way (a grant on its way to a caller that
# gave up; one the rate limit refused, sent again a second later) before it closes the connection.
SETTLE_S = 3.0


def _write_back(taken: dict[str, Any]) -> list[GiveBack]:
    """Undo a take nobody received: each tuple written again, with what is left of its TTL. Once the daemon
    has answered the take, it gives nothing back by itself; a write is not safe to repeat (see GiveBack)."""
    now = int(time.time() * 1000)
    return [GiveBack("tuple.out", {"fields": t["fields"], "harbor": t["harbor"],
                                   "ttl": None if t["expiresAt"] is None else t["expiresAt"] - now},
                     what=f"the tuple {t['fields']!r:.200} of {_space(t['harbor'])}")
            for t in taken["taken"] if t["expiresAt"] is None or t["expiresAt"] > now]  # fmt: skip


def _space(harbor: str | None) -> str:
    return "the global space" if harbor is None else f"harbor {harbor}"


def _release(conn_bound: bool) -> Undo:
    """Undo a lock grant nobody received: a release by its token (and owner, which may not be this connection's
    agent), harmless to repeat; a connection-bound lock the daemon releases itself when the connection closes.
    A re-acquire of a lock the caller already held (``existing``) gave nothing new, and leaves it held."""

    def undo(granted: dict[str, Any]) -> list[GiveBack]:
        if granted.get("existing"):
            return []
        args = {"name": granted["name"], "token": granted["token"], "owner": granted["owner"]}
        return [GiveBack("lock.release", args, what=f"lock {granted['name']!r} (token {granted['token']})",
                         undone_on_close=conn_bound, idempotent=True, settled_by=("NOT_OWNER",))]  # fmt: skip

    return undo


def _ms(name: str, seconds: Any) -> int:
    """An SDK duration (seconds, a number) as the daemon's milliseconds. Checked here: the arithmetic on it
    would otherwise fail with a TypeError or ValueError, or a negative reach the daemon as milliseconds."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds < math.inf:
        raise BadInput("VALIDATION_ERROR", f"{name} is a number of seconds (>= 0, e.g. 2.5), got {seconds!r:.40}")
    return int(seconds * 1000)


def _timeout_ms(timeout: Any) -> int | None:
    """A ``timeout`` in seconds as milliseconds; None (wait without a limit) stays None."""
    return None if timeout is None else _ms("timeout", timeout)


def _absolute(worktree: Any) -> Any:
    """A worktree as the daemon needs it: absolute, resolved here in the caller's directory as pd does (symlinks
    followed, so one directory is one worktree however it is reached). Anything but text goes as given, for the
    daemon to refuse."""
    if not isinstance(worktree, str) or not worktree.strip():
        return worktree
    return os.path.realpath(os.path.expanduser(worktree.strip()))


def _backstop(args: dict[str, Any]) -> float | None:
    """How long the client waits for a reply: a request's own ``timeout`` (ms or a duration, which the daemon
    enforces) and a margin; without one, None: as long as the daemon shows it is alive (a request may wait by
    default, as ``msg.poll`` does for 30 s, and only the daemon knows for how long; see TrioClient)."""
    ms = parse_duration_ms(args.get("timeout"))
    return None if ms is None else ms / 1000 + _BACKSTOP_MARGIN_S


@dataclass(frozen=True, slots=True)
class Claim:
    id: str
    port: int
    existing: bool
    message: str


@dataclass(frozen=True, slots=True)
class Service:
    id: str
    port: int
    status: str
    pid: int | None
    urls: dict[str, str]
    created_at: int
    expires_at: int | None
    metadata: dict[str, Any] | None

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Service:
        return cls(d["id"], d["port"], d["status"], d.get("pid"), d.get("urls") or {}, d["createdAt"],
                   d.get("expiresAt"), d.get("metadata"))  # fmt: skip


@dataclass(frozen=True, slots=True)
class LockGrant:
    name: str
    owner: str
    token: int
    expires_at: int

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> LockGrant:
        return cls(d["name"], d["owner"], d["token"], d["expiresAt"])


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    channel: str
    payload: Any
    sender: str | None
    created_at: int

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Message:
        return cls(d["id"], d["channel"], d["payload"], d.get("sender"), d["createdAt"])


class History(list[Message]):
    """A page of history: its messages, oldest first (it is a list of them), and where it stopped. ``more`` says
    the page was cut, at ``limit`` or at the size of one reply: with ``after``, read on from ``last_id``; without,
    it holds the newest and older ones were left out. ``last_id`` is the id of its last message (``after``, or 0,
    when there is none)."""

    __slots__ = ("last_id", "more")

    def __init__(self, messages: list[Message], *, more: bool, last_id: int) -> None:
        super().__init__(messages)
        self.more = more
        self.last_id = last_id

    def __repr__(self) -> str:
        return f"History({list.__repr__(self)}, more={self.more}, last_id={self.last_id})"


class Subscription:
    """Messages on some channels, in id order: ``async for msg in sub``. When this client or the daemon had
        to drop deliveries (a slow reader), or the connection dropped (a daemon restart), the gap is filled from
    history, so nothing still in history is lost. Iteration ends when the ``subscribe`` block has."""

    def __init__(self, pd: PortDaddy, patterns: list[str]) -> None:
        self.patterns = patterns
        self.id: int | None = None
        self._pd = pd
        self._send, self._receive = trio.open_memory_channel[dict[str, Any]](SUBSCRIPTION_BUFFER)
        self._backlog: deque[Message] = deque()
        self._last = -1  # the last id handed to the reader
        self._last_queued = -1
        self._resume_after = -1  # the daemon's last id when it answered the subscribe
        self._gap_after: int | None = None  # set when the buffer overflowed: drop until the reader catches up

    def _offer(self, body: dict[str, Any]) -> None:
        if self._gap_after is not None:
            return
        try:
            self._send.send_nowait(body)
        except trio.WouldBlock:
            self._gap_after = self._last_queued
            return
        except trio.ClosedResourceError:  # its block has ended (a renewal may still have been in flight)
            return
        if body.get("action") == "msg.delivery":
            self._last_queued = body["id"]

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        while True:
            if self._backlog:
                msg = self._backlog.popleft()
            elif self._gap_after is not None and self._receive.statistics().current_buffer_used == 0:
                after, self._gap_after = self._gap_after, None
                await self._catch_up(after)
                continue
            else:
                try:
                    body = await self._receive.receive()
                except trio.EndOfChannel:  # the subscription's block has ended and its buffer is read
                    raise StopAsyncIteration from None
                if body.get("action") == "msg.missed":
                    await self._catch_up(body["after"])
                    continue
                msg = Message.from_wire(body)
            if msg.id > self._last:
                self._last = msg.id
                return msg

    async def _catch_up(self, after: int) -> None:
        while True:
            page = await self._pd.call("msg.history", channel=self.patterns, after=after, limit=_HISTORY_PAGE)
            self._backlog.extend(Message.from_wire(m) for m in page["messages"])
            if not page["more"]:
                return
            after = page["lastId"]


class PortDaddy:
    """A connected client. Use ``portdaddy.connect()`` rather than constructing it."""

    def __init__(self, client: TrioClient, nursery: trio.Nursery) -> None:
        self._client = client
        self._nursery = nursery
        self._subscriptions: dict[int, Subscription] = {}  # by the daemon's id, which a reconnect changes
        self._open: set[Subscription] = set()
        # Deliveries can arrive before the reply that names their subscription: held here until it does.
        self._unrouted: dict[int, list[dict[str, Any]]] = {}
        self._heartbeats: dict[str | None, bytes] = {}  # agent id -> its encoded heartbeat frame
        client.push_handlers.append(self._route_push)
        client.reconnect_handlers.append(self._renew_subscriptions)

    def _route_push(self, frame: Frame) -> None:
        body = frame.payload
        sub_id = body.get("subscription")
        if body.get("action") not in ("msg.delivery", "msg.missed") or not isinstance(sub_id, int):
            return
        sub = self._subscriptions.get(sub_id)
        if sub is not None:
            sub._offer(body)
        elif len(self._unrouted.setdefault(sub_id, [])) < SUBSCRIPTION_BUFFER:
            self._unrouted[sub_id].append(body)

    def _adopt(self, sub: Subscription, reply: dict[str, Any]) -> None:
        sub.id = reply["subscription"]
        sub._resume_after = max(sub._resume_after, reply["lastId"])
        self._subscriptions[sub.id] = sub
        for body in self._unrouted.pop(sub.id, ()):
            sub._offer(body)

    def _renew_subscriptions(self) -> None:
        """After a reconnect the daemon knows none of our subscriptions: renew each from its last message."""
        self._subscriptions.clear()
        self._unrouted.clear()
        for sub in self._open:
            self._nursery.start_soon(self._renew, sub)

    async def _renew(self, sub: Subscription) -> None:
        after = max(sub._last_queued, sub._resume_after)  # history fills the gap; ids are global, so no repeats
        try:
            await self._open_subscription(sub, new=False, after=after)
        except (DaemonUnavailable, PDError) as exc:
            log.warning("could not renew subscription to %s (%s); retrying at the next reconnect", sub.patterns, exc)

    async def _open_subscription(self, sub: Subscription, *, new: bool, after: int | None) -> None:
        """Subscribe ``sub`` with a daemon subscription of its own (``reuse`` false): readers sharing this
        connection each need every message and their own unsubscribe. One granted as its caller gave up (a
        cancelled subscribe) is unsubscribed when the reply comes, or it would hold one of the connection's 64."""
        args = {"channels": sub.patterns, "new": new, "after": after, "reuse": False}
        self._adopt(sub, await self._client.request("msg.subscribe", args, undo=self._unsubscribe_late))

    def _unsubscribe_late(self, reply: dict[str, Any]) -> list[GiveBack]:
        self._unrouted.pop(reply["subscription"], None)
        return [GiveBack("msg.unsubscribe", {"subscription": reply["subscription"]}, undone_on_close=True,
                         what=f"subscription {reply['subscription']}")]  # fmt: skip

    @property
    def agent_id(self) -> str | None:
        return self._client.agent_id

    async def call(self, action: str, /, **args: Any) -> Any:
        """Any operation by name with its arguments as on the wire (see spec/ipc.md), ``timeout`` included (ms
        or a duration; the daemon ends the wait); the typed methods below are sugar over this. To bound a call
        yourself, use ``trio.fail_after``: a cancelled request is withdrawn from the daemon."""
        return await self._client.request(action, args, timeout=_backstop(args))

    def send(self, action: str, **args: Any) -> None:
        """Fire-and-forget an operation that allows it; never waits for the daemon."""
        self._client.send_nowait(action, args)

    # -- daemon ---------------------------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        return await self.call("daemon.status")

    # -- services -------------------------------------------------------------------------------------------

    async def claim(
        self,
        identity: str,
        *,
        port: int | None = None,
        port_range: tuple[int, int] | None = None,
        expires: str | int | None = None,
        pid: int | None = None,
        cmd: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Claim:
        r = await self.call("port.claim", id=identity, port=port, range=port_range, expires=expires, pid=pid,
                            cmd=cmd, metadata=metadata)  # fmt: skip
        return Claim(r["id"], r["port"], r["existing"], r["message"])

    async def release(self, pattern: str | None = None, *, expired: bool = False) -> int:
        """Release an identity, a pattern's matches, or expired services; returns how many."""
        return (await self.call("port.release", id=pattern, expired=expired))["released"]

    async def find(self, pattern: str = "*") -> list[Service]:
        r = await self.call("port.find", pattern=pattern)
        return [Service.from_wire(s) for s in r["services"]]

    async def get(self, identity: str) -> Service:
        return Service.from_wire((await self.call("port.get", id=identity))["service"])

    # -- agents and the journal ----------------------------------------------------------------------------

    async def register_agent(self, agent_id: str | None = None, *, identity: str | None = None,
                             purpose: str | None = None, type: str | None = None,
                             capabilities: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
        """Register (or refresh) ``agent_id`` (default: this connection's agent)."""
        return await self.call("agent.register", agentId=agent_id, identity=identity, purpose=purpose, type=type,
                               capabilities=capabilities)  # fmt: skip

    def heartbeat(self, agent_id: str | None = None) -> None:
        """Fire-and-forget a sign of life, of the connection's agent or of ``agent_id``. An ``agent_id`` that is not
        valid, or not the connection's own agent, is BadInput at once: the daemon drops such a frame, and nobody
        waits for a heartbeat's reply to hear why."""
        self._client.send_frame(self._heartbeat_frame(agent_id))

    def _heartbeat_frame(self, agent_id: str | None) -> bytes:
        # A heartbeat's frame never changes: encoded (and its agent checked) once per agent, a beat costs one send().
        frame = self._heartbeats.get(agent_id)
        if frame is None:
            check_agent_id(agent_id)
            own = self._client.agent_id
            if agent_id is not None and own is not None and agent_id != own:
                raise bad_input(
                    f"this connection acts as agent {own!r}, and the daemon drops a frame of another; "
                    f"beat for {agent_id!r} on a connection of its own (connect(agent_id={agent_id!r}))"
                )
            frame = self._heartbeats[agent_id] = self._client.fire_and_forget_frame(
                "agent.heartbeat", {"agentId": agent_id}
            )
        return frame

    def start_heartbeat(self, interval: float = 30.0, *, agent_id: str | None = None) -> trio.CancelScope:
        """Heartbeat every ``interval`` seconds in the connection's nursery until the returned scope is cancelled
        (or the connection closes)."""
        self._client.ensure_open()
        # Checked here: in the background task a bad interval would end the connection, and 0 beat in a busy loop;
        # a bad agent id would be skipped at every beat as if the daemon were away.
        if _ms("interval", interval) < 1:
            raise BadInput("VALIDATION_ERROR", f"interval must be at least a millisecond, e.g. 30; got {interval!r}")
        self._heartbeat_frame(agent_id)
        scope = trio.CancelScope()

        async def beat() -> None:
            with scope:
                while True:
                    # While the daemon is away (a restart) a beat has nobody to reach: skip it rather than let
                    # the error end the connection, whose reconnection the next beats then ride on.
                    with suppress(PDError):
                        self.heartbeat(agent_id)
                    await trio.sleep(interval)

        self._nursery.start_soon(beat)
        return scope

    async def unregister_agent(self, agent_id: str | None = None) -> bool:
        return (await self.call("agent.unregister", agentId=agent_id))["unregistered"]

    async def begin(self, purpose: str, *, identity: str | None = None, files: list[str] | None = None,
                    force: bool = False, worktree: str | None = None) -> dict[str, Any]:  # fmt: skip
        """Register this connection's agent and start its session in one step (``Conflict`` on a file claim)."""
        return await self.call("agent.begin", purpose=purpose, identity=identity, files=files, force=force,
                               worktree=_absolute(worktree))  # fmt: skip

    async def done(self, note: str | None = None, *, session_id: str | None = None,
                   status: str = "completed") -> dict[str, Any]:  # fmt: skip
        return await self.call("agent.done", note=note, sessionId=session_id, status=status)

    async def start_session(self, purpose: str, *, files: list[str] | None = None, force: bool = False,
                            worktree: str | None = None, metadata: dict[str, Any] | None = None) -> str:  # fmt: skip
        """Start a session; returns its id. ``Conflict`` (FILE_CONFLICT, with ``conflicts``) where another agent's
        active session claims one of ``files``, unless ``force`` (this agent's own sessions are no conflict)."""
        r = await self.call("session.start", purpose=purpose, files=files, force=force, worktree=_absolute(worktree),
                            metadata=metadata)  # fmt: skip
        return r["id"]

    async def end_session(self, session_id: str, *, note: str | None = None, status: str = "completed") -> None:
        await self.call("session.end", sessionId=session_id, note=note, status=status)

    async def note(self, content: str, *, session_id: str | None = None, type: str = "note") -> int:
        """Append a note (to this agent's current session by default); returns its id."""
        return (await self.call("note.add", content=content, sessionId=session_id, type=type))["noteId"]

    async def notes(self, *, session_id: str | None = None, agent: str | None = None,
                    limit: int = 50) -> list[dict[str, Any]]:  # fmt: skip
        return (await self.call("note.list", sessionId=session_id, agent=agent, limit=limit))["notes"]

    async def claim_files(self, session_id: str, paths: list[str], *, force: bool = False) -> list[dict[str, Any]]:
        """Claim paths or globs; returns the conflicts recorded when ``force``."""
        return (await self.call("file.claim", sessionId=session_id, files=paths, force=force))["conflicts"]

    # -- tuple space ----------------------------------------------------------------------------------------

    async def out(self, fields: list[Any], *, harbor: str | None = None, ttl: str | int | None = None) -> int:
        """Write a tuple; returns its id."""
        return (await self.call("tuple.out", fields=fields, harbor=harbor, ttl=ttl))["id"]

    async def rd(self, pattern: list[Any], *, harbor: str | None = None, limit: int = 100, wait: bool = False,
                 timeout: float | None = None) -> list[dict[str, Any]]:  # fmt: skip
        """Matching tuples, newest first. ``wait=True`` blocks (cancellable) until one exists."""
        r = await self._blocking("tuple.rd", pattern, harbor, limit, wait, timeout)
        return r["tuples"]

    async def take(self, pattern: list[Any], *, harbor: str | None = None, wait: bool = False,
                   timeout: float | None = None) -> dict[str, Any] | None:  # fmt: skip
        """Take one matching tuple (exactly one caller gets it); None if none and not ``wait``.

        With ``wait=True`` it blocks until one is written; cancelling the calling task (or ``timeout``
        seconds, which raises ``Timeout``) withdraws the request from the daemon's queue of waiters. A tuple
        the daemon handed over just as the caller gave up is written back to the space (with a new id)."""
        return (await self._blocking("tuple.in", pattern, harbor, 1, wait, timeout, undo=_write_back))["tuple"]

    in_ = take

    async def scan(self, *, harbor: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
        return (await self.call("tuple.scan", harbor=harbor, limit=limit))["tuples"]

    async def count(self, pattern: list[Any] | None = None, *, harbor: str | None = None) -> int:
        return (await self.call("tuple.count", pattern=pattern, harbor=harbor))["count"]

    async def _blocking(self, action: str, pattern: list[Any], harbor: str | None, limit: int, wait: bool,
                        timeout: float | None, undo: Undo | None = None) -> dict[str, Any]:  # fmt: skip
        args = {"pattern": pattern, "harbor": harbor, "limit": limit, "wait": wait, "timeout": _timeout_ms(timeout)}
        return await self._client.request(action, args, timeout=_backstop(args), undo=undo)

    # -- locks --------------------------------------------------------------------------------------------

    async def lock(self, name: str, *, blocking: bool = True, timeout: float | None = None,
                   ttl: str | int | None = None, owner: str | None = None,
                   conn_bound: bool = False) -> LockGrant | None:  # fmt: skip
        """Take a lock; the grant's ``token`` only ever grows. ``blocking=False`` returns None when it is held;
        blocking waits in FIFO order (``timeout`` seconds, then ``Timeout``; cancelling withdraws the wait, and
        releases a grant that was already on its way)."""
        args = {"name": name, "ttl": ttl, "owner": owner, "wait": blocking, "connBound": conn_bound,
                "timeout": _timeout_ms(timeout)}  # fmt: skip
        try:
            r = await self._client.request("lock.acquire", args, timeout=_backstop(args), undo=_release(conn_bound))
        except LockHeld:
            return None
        return LockGrant.from_wire(r)

    async def unlock(self, name: str, *, token: int | None = None, owner: str | None = None,
                     force: bool = False) -> bool:  # fmt: skip
        """Release a lock; False if it was not held."""
        return (await self.call("lock.release", name=name, token=token, owner=owner, force=force))["released"]

    async def extend(self, name: str, *, ttl: str | int | None = None, token: int | None = None) -> LockGrant:
        return LockGrant.from_wire(await self.call("lock.extend", name=name, ttl=ttl, token=token))

    @asynccontextmanager
    async def with_lock(self, name: str, *, ttl: float = 60.0,
                        timeout: float | None = None) -> AsyncIterator[LockGrant]:  # fmt: skip
        """Hold ``name`` for the block: waits for it, renews the lease every third of ``ttl`` seconds, and
        releases it on exit; it is bound to this connection, so it is released if this process dies too. A
        renewal that fails (the lock was taken away, the daemon went) interrupts the block and its error is
        raised; an error of the block comes out as itself."""
        ttl_ms = _ms("ttl", ttl)
        grant = await self.lock(name, timeout=timeout, ttl=ttl_ms, conn_bound=True)
        assert grant is not None
        lost: list[PDError] = []
        renewing = trio.CancelScope()
        try:
            # A cancel scope, not a nursery, around the block: a nursery would wrap the block's own errors in
            # an ExceptionGroup. The renewal runs in the connection's nursery and cancels the block if it fails.
            with trio.CancelScope() as block:

                async def renew() -> None:
                    with renewing:
                        while True:
                            await trio.sleep(ttl / 3)
                            try:
                                await self.extend(name, ttl=ttl_ms, token=grant.token)
                            except PDError as e:
                                e.add_note(f"with_lock({name!r}) lost the lock and interrupted its block")
                                lost.append(e)
                                block.cancel()
                                return

                self._nursery.start_soon(renew)
                yield grant
        finally:
            renewing.cancel()
            with trio.CancelScope(shield=True), suppress(PDError if lost else ()):  # lost: the better error
                await self.unlock(name, token=grant.token)
        if lost:
            raise lost[0]

    # -- pub/sub --------------------------------------------------------------------------------------------

    def publish(self, channel: str, payload: Any, *, sender: str | None = None) -> None:
        """Publish any JSON value (a str is text), fire-and-forget like ``heartbeat()`` and ``spray()``: never
        waits for the daemon. What cannot be sent is refused at once; what the daemon refuses is not heard of
        (use ``publish_confirmed`` for that, or for the message id)."""
        self.send("msg.publish", channel=channel, payload=payload, sender=sender)

    async def publish_confirmed(self, channel: str, payload: Any, *, sender: str | None = None) -> int:
        """Publish and wait until the daemon has stored the message; returns its id (refusals raised)."""
        return (await self.call("msg.publish", channel=channel, payload=payload, sender=sender))["id"]

    @asynccontextmanager
    async def subscribe(self, *channels: str, new: bool = False,
                        after: int | None = None) -> AsyncIterator[Subscription]:  # fmt: skip
        """``async with pd.subscribe("payments:*") as sub: async for msg in sub: ...`` — the retained message
        of each matching channel first (unless ``new``), or every message after id ``after``."""
        sub = Subscription(self, list(channels))
        await self._open_subscription(sub, new=new, after=after)
        self._open.add(sub)
        try:
            yield sub
        finally:
            self._open.discard(sub)
            self._subscriptions.pop(sub.id, None)
            sub._send.close()  # a reader still iterating gets what arrived, then the end, not a wait forever
            if self._client.sock is not None:
                with trio.CancelScope(shield=True):
                    await self.call("msg.unsubscribe", subscription=sub.id)

    async def wait_for_signal(self, *channels: str, timeout: float | None = 30) -> Message:
        """The newest message on the channel (one already published counts); waits up to ``timeout`` s."""
        args = {"channels": list(channels), "timeout": _timeout_ms(timeout)}
        r = await self._client.request("msg.wait", args, timeout=_backstop(args))
        newest = max(r["messages"].values(), key=lambda m: m["id"])
        return Message.from_wire(newest)

    async def history(self, channel: str, *, after: int | None = None, limit: int = 50) -> History:
        """A page of a channel's (or pattern's) messages, oldest first: the newest ``limit``, or up to ``limit``
        after id ``after``. While ``page.more``, the next page is ``history(channel, after=page.last_id)``."""
        r = await self.call("msg.history", channel=channel, after=after, limit=limit)
        return History([Message.from_wire(m) for m in r["messages"]], more=r["more"], last_id=r["lastId"])

    # -- pheromones -----------------------------------------------------------------------------------------

    def spray(self, table: str, entity: str, key: str, strength: float, *, harbor: str | None = None) -> None:
        """Fire-and-forget a signal (the daemon applies it at once and stores it within a second)."""
        self.send("pheromone.spray", table=table, id=entity, key=key, strength=strength, harbor=harbor)

    async def sniff(self, table: str, entity: str, *, harbor: str | None = None) -> dict[str, float]:
        return (await self.call("pheromone.sniff", table=table, id=entity, harbor=harbor))["pheromones"]


@asynccontextmanager
async def connect(
    *,
    agent_id: str | None = None,
    settings: Settings | None = None,
    timeout: float = 5.0,
    reconnect: bool = True,
    autostart: bool = True,
) -> AsyncIterator[PortDaddy]:
    """Connect to the daemon of ``PORT_DADDY_HOME`` (starting it if needed) for the ``async with`` block, acting
    as ``agent_id``, else as the agent ``PORT_DADDY_AGENT`` (or ``AGENT_ID``) names, as ``pd`` does. One that is
    not a valid agent id is ``BadInput`` here, before anything is sent (one from the environment names the
    variable and how to fix it): the daemon refuses every frame that carries it, and a fire-and-forget send
    (``heartbeat()``, ``spray()``, ``publish()``) would be lost without a word."""
    cfg = settings or Settings.from_env()
    agent_var, from_env = (None, None) if agent_id else agent_from_env()
    check_agent_id(agent_id or from_env, agent_var)
    if autostart:
        await trio.to_thread.run_sync(ensure_daemon, cfg)
    client = TrioClient(cfg.ipc_sock, agent_id=agent_id or from_env, agent_var=agent_var, timeout=timeout,
                        reconnect=reconnect)  # fmt: skip
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            try:
                yield PortDaddy(client, nursery)
            finally:
                with trio.CancelScope(shield=True):  # the block may be ending because it was cancelled
                    await client.settle(SETTLE_S)
                client.close()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) > 1:
            raise
        _raise_as_itself(group.exceptions[0])


def _raise_as_itself(error: BaseException) -> NoReturn:
    """Raise the one error a nursery wrapped (the block's, or the connection's) as itself, so that ``except
    BadInput`` or ``except DaemonUnavailable`` around ``async with connect()`` matches; its own chaining is
    kept, not replaced by the group it came in."""
    chained = error.__cause__, error.__context__, error.__suppress_context__
    try:
        raise error
    finally:
        error.__cause__, error.__context__, error.__suppress_context__ = chained
