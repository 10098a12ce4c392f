"""Channels that remember: durable capped history with global ids, a retained last message per channel,
IPC push subscriptions, and cursor waits (long-poll, SSE, ``pd wait``) woken by publish, never by a tick.

A publish that is answered commits its row before it pushes it to every matching IPC subscription and wakes
every matching cursor waiter, on the trio thread, so a subscriber sees messages in id order. A fire-and-forget
publish (nobody is told it was stored) is pushed at once and written behind, within a second, with the ones
around it. Ids come from memory: each block of ``ID_BLOCK`` ids is reserved durably (``sqlite_sequence``)
before the first of them is handed out, so a message lost with a killed daemon leaves a gap in the ids, never
an id that names two messages. So while the store refuses writes, at most the rest of the current block of
fire-and-forget publishes waits in memory; later ones are dropped (counted: ``Store.drop``).

Patterns follow the identity rules: ``payments:*`` matches ``payments:api`` and deeper (not ``payments``), ``*``
matches everything, a ``*`` inside a segment globs that segment.

Slow subscribers never stall the daemon. A cursor waiter holds no queue: it reads the history after its last
id. An IPC subscription pushes into the connection's bounded output; when that refuses (the client is not
reading), the subscription stops pushing and, once the client reads again, sends one ``msg.missed`` notice
with the last id it delivered, so the client can resume from history.

Retention (spec/sync.md): a channel keeps its newest HISTORY_PER_CHANNEL messages of the last week, and its
retained message until it has been silent for a month; then the channel is forgotten, in the store and in
memory, so what the broker holds follows the channels in use (fleet runs are agents of their own, and each
has an ``inbox:<agent>`` channel). Pruned at start and hourly. Ids stay monotonic across forgetting and restarts:
``sqlite_sequence`` keeps the highest id even when no message is left.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from portdaddy.core import validate as v
from portdaddy.core.clock import now_ms
from portdaddy.core.identity import WILDCARD, matches
from portdaddy.core.ops import Ctx, Op, Param
from portdaddy.core.store import autoincrement_ids
from portdaddy.core.writebehind import WriteBehind
from portdaddy.errors import PDError, StoreError, bad_input
from portdaddy.ipc.frame import MAX_PAYLOAD, MAX_REPLY

HISTORY_PER_CHANNEL = 1000  # messages kept per channel (the newest); trimmed in batches
HISTORY_RETENTION_MS = 7 * 86_400_000  # a message other than its channel's retained one is kept a week
CHANNEL_RETENTION_MS = 30 * 86_400_000  # a channel silent this long is forgotten, retained message and all
PRUNE_INTERVAL_S = 3600.0
MAX_PAYLOAD_BYTES = 60_000  # JSON-encoded (a delivery larger than an IPC frame goes in parts: floats pack to 9 bytes)
MAX_SUBSCRIPTIONS = 64  # per IPC connection (DESIGN §4)
LAG_RETRY_S = 0.05  # how often a lagging subscriber's connection is re-checked while any lags
# Bytes of history in one page (one reply to msg.history); a page cut there says more: true. Over IPC, packed: a
# reply goes in parts, up to MAX_REPLY (16 MiB), less room for the rest.
IPC_REPLY_BUDGET = MAX_REPLY - MAX_PAYLOAD
# Over HTTP (and any other caller), JSON: what curl or a browser takes in one go; a page of 1,000 large messages
# was a 60 MB response. Still ~70 messages of the largest payload, and 1,000 of a few KB.
HTTP_REPLY_BUDGET = 4 * 1024 * 1024
ID_BLOCK = 1024  # message ids reserved per durable write of sqlite_sequence


@dataclass(slots=True)
class Message:
    id: int
    channel: str
    payload: Any
    content_type: str
    sender: str | None
    created_at: int

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, "channel": self.channel, "payload": self.payload, "contentType": self.content_type,
                "sender": self.sender, "createdAt": self.created_at}  # fmt: skip


@dataclass(slots=True)
class _Channel:
    count: int
    last: Message  # the retained message


@dataclass(eq=False, slots=True)
class Subscription:
    """An IPC connection's interest in some patterns; deliveries carry its ``id``."""

    id: int
    patterns: tuple[str, ...]
    conn: Any
    last_id: int = 0  # the last id pushed (or the id the subscription was caught up to)
    lagging: bool = False
    missed: int = 0

    def wants(self, channel: str) -> bool:
        return any(matches(p, channel) for p in self.patterns)


@dataclass(eq=False, slots=True)
class _Waiter:
    patterns: tuple[str, ...]
    event: trio.Event = field(default_factory=trio.Event)


def _subscription_id(sub: Subscription) -> int:
    return sub.id


def _row(r: tuple[Any, ...]) -> Message:
    return Message(r[0], r[1], json.loads(r[2]), r[3], r[4], r[5])


_COLS = "id, channel, payload, content_type, sender, created_at"


def _newest_id_before(db: Any, last_id: int, cutoff: int) -> int:
    """The id of the newest message created before ``cutoff`` (0 if none), by bisection: ids are handed out in
    publish order, so ``created_at`` grows with them. A clock set back can mislead it by that much; callers
    still check ``created_at``, so it never makes them drop a message too young."""
    lo, hi = 0, last_id + 1  # lo: a message older than cutoff (or 0); hi: the first message from hi on is not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        row = db.execute("SELECT id, created_at FROM messages WHERE id >= ? ORDER BY id LIMIT 1", (mid,)).fetchone()
        if row is not None and row[1] < cutoff:
            lo = row[0]
        else:
            hi = mid
    return lo


def _glob(pattern: str) -> str:
    """An SQL GLOB that admits at least every channel ``pattern`` matches (it may admit more)."""
    return pattern  # names hold no '?', '[' or ']', and GLOB's '*' spans ':' (so it over-admits only)


class Broker:
    name = "broker"

    def __init__(self, app: Any) -> None:
        self.app = app
        self.store = app.store
        self._channels: dict[str, _Channel] = {}
        self._exact: dict[str, set[Subscription]] = {}  # subscriptions by literal channel
        self._wild: set[Subscription] = set()  # subscriptions with at least one '*' pattern
        self._waiters: set[_Waiter] = set()
        self._lagging: set[Subscription] = set()
        self._lag_started = trio.Event()
        self._sub_ids = itertools.count(1)
        self.published = 0
        self._ids = autoincrement_ids(self.store, "messages", ID_BLOCK)
        self._unwritten: list[tuple[Any, ...]] = []  # rows of fire-and-forget publishes, in id order
        self._writes = WriteBehind(self.store, self._write_messages)  # keyed by channel, for trimming
        for channel, count, last_id in self.store.all(
            "SELECT channel, count(*), max(id) FROM messages GROUP BY channel"
        ):
            last = _row(self.store.one(f"SELECT {_COLS} FROM messages WHERE id=?", (last_id,)))
            self._channels[channel] = _Channel(count, last)
        self.prune()

    @property
    def last_id(self) -> int:
        """The newest message id handed out."""
        return self._ids.last

    def stats(self) -> dict[str, Any]:
        return {"channels": len(self._channels), "messagesPublished": self.published,
                "subscriptions": len(self._wild) + len({s for subs in self._exact.values() for s in subs}),
                "lagging": len(self._lagging)}  # fmt: skip

    # -- publish -------------------------------------------------------------------------------------------

    def publish(self, channel: str, payload: Any, *, sender: str | None = None) -> int:
        """Store and deliver a message (the in-daemon seam: ``app.publish``); returns its id."""
        return self.post(channel, payload, sender=sender).id

    def post(self, channel: str, payload: Any, *, sender: str | None = None, durable: bool = True) -> Message:
        """Store and deliver a message. ``durable=False`` (fire-and-forget) writes it within a second."""
        if not durable and self._ids.exhausted and self.store.failure is not None:
            # Its id needs a new block reserved on disk, which the store refuses (the write-behind tries again each
            # second): dropped without a try per frame, neither delivered nor kept; nobody was promised it.
            self.store.drop("messages")
            raise self.store.refusal()
        content_type = "text" if isinstance(payload, str) else "json"
        msg = Message(self._ids.take(), channel, payload, content_type, sender, now_ms())
        self._unwritten.append((msg.id, channel, v.compact_json(payload), content_type, sender,
                                msg.created_at))  # fmt: skip
        info = self._channels.get(channel)
        before = None if info is None else (info.count, info.last)
        if info is None:
            info = self._channels[channel] = _Channel(0, msg)
        info.count += 1
        info.last = msg
        self._writes.mark(channel)
        if durable or not self._ids.covered:  # an id goes out only once its block is reserved on disk
            try:
                self._writes.flush()
            except BaseException as e:  # not stored, so it never happened: the caller hears the error, nobody it
                if not durable and isinstance(e, StoreError):
                    self.store.drop("messages")
                self._unwritten.pop()
                self._ids.last -= 1  # nobody saw the id: hand it out again
                if before is None:
                    del self._channels[channel]
                else:
                    info.count, info.last = before
                raise
        self.published += 1
        self._deliver(msg)
        self.app.bus.emit("msg.publish", channel=channel, id=msg.id, sender=sender, payload=payload)
        return msg

    def _write_messages(self, db: Any, channels: Iterable[str]) -> None:
        rows = self._unwritten
        if not rows:
            return
        # Rows leave the list only once committed (a rollback keeps them for the next write); OR IGNORE skips the
        # ones a flush nested in the same open transaction has already inserted.
        db.executemany("INSERT OR IGNORE INTO messages (id, channel, payload, content_type, sender, created_at) "
                       "VALUES (?,?,?,?,?,?)", rows)  # fmt: skip
        self._ids.cover(db)
        for channel in channels:
            info = self._channels.get(channel)
            if info is not None and info.count > HISTORY_PER_CHANNEL + HISTORY_PER_CHANNEL // 10:
                self._trim(db, channel, info)
        self.store.after_commit(partial(self._written, rows[-1][0]))

    def _written(self, last_id: int) -> None:
        """Rows up to ``last_id`` are on disk (by id: a nested flush may have written some of them twice)."""
        rows = self._unwritten
        n = 0
        while n < len(rows) and rows[n][0] <= last_id:
            n += 1
        del rows[:n]

    def _trim(self, db: Any, channel: str, info: _Channel) -> None:
        keep_from = db.execute("SELECT id FROM messages WHERE channel=? ORDER BY id DESC LIMIT 1 OFFSET ?",
                               (channel, HISTORY_PER_CHANNEL - 1)).fetchone()[0]  # fmt: skip
        db.execute("DELETE FROM messages WHERE channel=? AND id<?", (channel, keep_from))
        info.count = HISTORY_PER_CHANNEL

    def prune(self, now: int | None = None) -> int:
        """Delete history older than HISTORY_RETENTION_MS (each channel's retained message excepted) and forget
        every channel silent for CHANNEL_RETENTION_MS; returns how many messages went."""
        now = now_ms() if now is None else now
        self._writes.flush()
        silent = [n for n, c in self._channels.items() if c.last.created_at < now - CHANNEL_RETENTION_MS]
        aged = now - HISTORY_RETENTION_MS
        with self.store.write() as db:
            bound = _newest_id_before(db, self.last_id, aged)
            retained = [c.last.id for c in self._channels.values() if c.last.id <= bound]
            # Only rows up to the bound are read: after the first prune, the old retained ones and what aged since.
            gone = Counter(ch for (ch,) in db.execute(
                "DELETE FROM messages WHERE id <= ? AND created_at < ? AND id NOT IN (SELECT value FROM json_each(?)) "
                "RETURNING channel", (bound, aged, json.dumps(retained))))  # fmt: skip
            for name in silent:
                db.execute("DELETE FROM messages WHERE channel=?", (name,))
        for name, n in gone.items():
            self._channels[name].count -= n
        for name in silent:
            gone[name] += self._channels.pop(name).count
        return sum(gone.values())

    def _deliver(self, msg: Message) -> None:
        channel = msg.channel
        subs = [*self._exact.get(channel, ()), *(s for s in self._wild if s.wants(channel))]
        if len(subs) > 1:  # one copy each (a subscription can match both ways), in subscription order
            subs = sorted(set(subs), key=_subscription_id)
        for sub in subs:
            self._push(sub, msg)
        if self._waiters:
            woken = [w for w in self._waiters if any(matches(p, channel) for p in w.patterns)]
            for w in woken:
                self._waiters.discard(w)
                w.event.set()

    def _push(self, sub: Subscription, msg: Message) -> None:
        if sub.lagging:
            sub.missed += 1
            return
        try:
            pushed = sub.conn.push({"action": "msg.delivery", "subscription": sub.id, **msg.to_wire()})
        except ValueError:  # not encodable: the client must read it from history
            pushed = False
        if pushed:
            sub.last_id = msg.id
            return
        sub.lagging, sub.missed = True, 1
        self._lagging.add(sub)
        self._lag_started.set()

    # -- reading -------------------------------------------------------------------------------------------

    def retained(self, patterns: Iterable[str]) -> list[Message]:
        """The last message of every channel matching any pattern, oldest first."""
        pats = tuple(patterns)
        found = [c.last for name, c in self._channels.items() if any(matches(p, name) for p in pats)]
        return sorted(found, key=lambda m: m.id)

    def since(self, patterns: Iterable[str], after: int, limit: int = 200) -> list[Message]:
        """Messages on any pattern with id > ``after``, oldest first."""
        self._writes.settle()
        pats = tuple(patterns)
        if WILDCARD in pats:
            where, args = "1", []
        else:
            where = " OR ".join("channel GLOB ?" if WILDCARD in p else "channel = ?" for p in pats)
            args = [_glob(p) for p in pats]
        found: list[Message] = []
        cursor = after
        while len(found) < limit:
            rows = self.store.all(f"SELECT {_COLS} FROM messages WHERE id > ? AND ({where}) ORDER BY id LIMIT ?",
                                  (cursor, *args, limit))  # fmt: skip
            found += [m for m in map(_row, rows) if any(matches(p, m.channel) for p in pats)]
            if len(rows) < limit:
                break
            cursor = rows[-1][0]
        return found[:limit]

    def latest(self, patterns: Iterable[str], limit: int) -> list[Message]:
        """The newest ``limit`` messages on any pattern, oldest first."""
        self._writes.settle()
        pats = tuple(patterns)
        if len(pats) == 1 and WILDCARD not in pats[0]:
            rows = self.store.all(f"SELECT {_COLS} FROM messages WHERE channel=? ORDER BY id DESC LIMIT ?",
                                  (pats[0], limit))  # fmt: skip
            return [_row(r) for r in reversed(rows)]
        found: list[Message] = []
        before = self.last_id + 1
        while len(found) < limit:
            rows = self.store.all(f"SELECT {_COLS} FROM messages WHERE id < ? ORDER BY id DESC LIMIT 500", (before,))
            found += [m for m in map(_row, rows) if any(matches(p, m.channel) for p in pats)]
            if len(rows) < 500:
                break
            before = rows[-1][0]
        return list(reversed(found[:limit]))

    def channels(self) -> list[dict[str, Any]]:
        infos = sorted(self._channels.items(), key=lambda kv: kv[1].last.id, reverse=True)
        return [{"channel": name, "count": c.count, "lastId": c.last.id, "lastActivity": c.last.created_at,
                 "lastMessage": c.last.to_wire()} for name, c in infos]  # fmt: skip

    def clear(self, pattern: str) -> int:
        names = [n for n in self._channels if matches(pattern, n)]
        self._writes.flush()
        with self.store.write() as db:
            for name in names:
                db.execute("DELETE FROM messages WHERE channel=?", (name,))
        return sum(self._channels.pop(n).count for n in names)

    # -- waiting on a cursor -------------------------------------------------------------------------------

    async def next_after(self, patterns: tuple[str, ...], after: int, limit: int = 200) -> list[Message]:
        """Messages after ``after`` on the patterns; waits (woken by publish) until there is at least one."""
        while True:
            found = self.since(patterns, after, limit)
            if found:
                return found
            await self._wait(patterns)

    async def wait_all(self, patterns: tuple[str, ...], after: int) -> dict[str, Message]:
        """Wait until every pattern has a message with id > ``after``; its newest message per pattern."""
        while True:
            newest: dict[str, Message] = {}
            for p in patterns:
                found = [c.last for n, c in self._channels.items() if c.last.id > after and matches(p, n)]
                if found:
                    newest[p] = max(found, key=lambda m: m.id)
            missing = tuple(p for p in patterns if p not in newest)
            if not missing:
                return newest
            await self._wait(missing)

    async def _wait(self, patterns: tuple[str, ...]) -> None:
        if self.app.stopping.is_set():
            raise PDError("CANCELLED", "the daemon is shutting down")
        waiter = _Waiter(patterns)
        self._waiters.add(waiter)
        try:
            await waiter.event.wait()
        finally:
            self._waiters.discard(waiter)

    # -- IPC subscriptions ---------------------------------------------------------------------------------

    def subscribe(self, conn: Any, patterns: tuple[str, ...], *, after: int | None, new: bool,
                  reuse: bool = True) -> tuple[Subscription, bool]:  # fmt: skip
        """Subscribe ``conn``; replays history after ``after``, else the retained messages unless ``new``. With
        ``reuse``, the connection's subscription to the same patterns is returned instead of a second one."""
        subs: dict[int, Subscription] = conn.data.setdefault("msg.subscriptions", {})
        for sub in subs.values():
            if reuse and sorted(sub.patterns) == sorted(patterns):
                return sub, True
        if len(subs) >= MAX_SUBSCRIPTIONS:
            raise PDError("RESOURCE_LIMIT", f"this connection has {len(subs)} subscriptions, the limit; "
                          "unsubscribe some or open another connection")  # fmt: skip
        if not subs:
            conn.on_close(lambda: self._connection_closed(conn))
        sub = Subscription(next(self._sub_ids), patterns, conn)
        subs[sub.id] = sub
        if after is not None:
            cursor = after
            while not sub.lagging and (batch := self.since(patterns, cursor, 500)):
                for msg in batch:
                    self._push(sub, msg)
                cursor = batch[-1].id
        elif not new:
            for msg in self.retained(patterns):
                self._push(sub, msg)
        if not sub.lagging:
            sub.last_id = self.last_id
        for p in patterns:
            if WILDCARD in p:
                self._wild.add(sub)
            else:
                self._exact.setdefault(p, set()).add(sub)
        return sub, False

    def unsubscribe(self, conn: Any, sub_id: int | None) -> int:
        subs: dict[int, Subscription] = conn.data.get("msg.subscriptions", {})
        ids = [sub_id] if sub_id is not None else list(subs)
        dropped = [subs.pop(i) for i in ids if i in subs]
        for sub in dropped:
            self._forget(sub)
        return len(dropped)

    def _forget(self, sub: Subscription) -> None:
        self._wild.discard(sub)
        self._lagging.discard(sub)
        for p in sub.patterns:
            exact = self._exact.get(p)
            if exact is not None:
                exact.discard(sub)
                if not exact:
                    del self._exact[p]

    def _connection_closed(self, conn: Any) -> None:
        for sub in conn.data.pop("msg.subscriptions", {}).values():
            self._forget(sub)

    def _notify_laggards(self) -> None:
        for sub in list(self._lagging):
            if sub.conn.closed:
                self._lagging.discard(sub)
                continue
            # fmt: off
            notice = {"action": "msg.missed", "subscription": sub.id, "channels": list(sub.patterns),
                      "after": sub.last_id, "missed": sub.missed,
                      "message": f"missed {sub.missed} message(s) after id {sub.last_id}; read msg.history"}
            # fmt: on
            if sub.conn.push(notice):
                sub.lagging, sub.missed = False, 0
                sub.last_id = self.last_id
                self._lagging.discard(sub)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Tell lagging subscribers what they missed once they read again; end cursor waits at shutdown."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._wake_waiters_at_shutdown)
            nursery.start_soon(self._prune_hourly)
            await nursery.start(self._writes.run)
            task_status.started()
            while True:
                await self._lag_started.wait()
                while self._lagging:
                    await trio.sleep(LAG_RETRY_S)
                    self._notify_laggards()
                self._lag_started = trio.Event()

    async def _prune_hourly(self) -> None:
        while True:
            await trio.sleep(PRUNE_INTERVAL_S)
            await self.store.background(self.prune)  # refused: the next hour's prune takes it all

    async def _wake_waiters_at_shutdown(self) -> None:
        await self.app.stopping.wait()
        for w in list(self._waiters):
            w.event.set()


# -- operations ----------------------------------------------------------------------------------------------

channel_name = v.name("channel", 120)
channel_pattern = v.name("channel", 120, wildcard=True)
_patterns = v.str_list(channel_pattern, max_items=20, example="build:*")
_payload_size = v.json_value(MAX_PAYLOAD_BYTES)


def payload_check(name: str, value: Any) -> Any:
    value = _payload_size(name, value)
    if isinstance(value, str) and not value.strip():
        raise bad_input(f"{name} must not be an empty string; send text, or any JSON value")
    return value


def _publish(ctx: Ctx, *, channel, payload, sender) -> dict[str, Any]:
    msg = ctx.app.broker.post(channel, {} if payload is None else payload, sender=sender or ctx.agent_id,
                              durable=ctx.acknowledged)  # fmt: skip
    return {"success": True, "id": msg.id, "channel": channel, "message": f"published to {channel}"}


def _subscribe(ctx: Ctx, *, channels, after, new, reuse) -> dict[str, Any]:
    if ctx.conn is None:
        raise bad_input("msg.subscribe needs an IPC connection; over HTTP use GET /msg/<channel>/subscribe (SSE)")
    sub, existing = ctx.app.broker.subscribe(ctx.conn, tuple(dict.fromkeys(channels)), after=after, new=new,
                                             reuse=reuse)  # fmt: skip
    return {"success": True, "subscription": sub.id, "channels": list(sub.patterns), "existing": existing,
            "lastId": sub.last_id}  # fmt: skip


def _unsubscribe(ctx: Ctx, *, subscription) -> dict[str, Any]:
    dropped = ctx.app.broker.unsubscribe(ctx.conn, subscription) if ctx.conn is not None else 0
    return {"success": True, "unsubscribed": dropped}


def _fit_reply(found: list[Message], budget: int, packed: bool) -> list[Message]:
    """The first messages that surely fit a reply of ``budget`` bytes (always at least one). In JSON a message is
    its payload's, channel's and sender's JSON and at most 120 bytes more. Packed, a payload is at most 9/4 of its
    JSON (``1.5,`` is 4 bytes, a float packs to 9; text, whole numbers and the rest pack smaller), the rest smaller."""
    size = 0
    for n, m in enumerate(found):
        payload = len(v.compact_json(m.payload))
        size += (payload * 9 // 4 if packed else payload) + len(v.compact_json([m.channel, m.sender])) + 120
        if size > budget and n:
            return found[:n]
    return found


def _history(ctx: Ctx, *, channel, after, limit) -> dict[str, Any]:
    broker: Broker = ctx.app.broker
    found = broker.since(channel, after, limit) if after is not None else broker.latest(channel, limit)
    packed = ctx.transport == "ipc"
    fit = partial(_fit_reply, budget=IPC_REPLY_BUDGET if packed else HTTP_REPLY_BUDGET, packed=packed)
    page = fit(found) if after is not None else fit(found[::-1])[::-1]  # without after: the newest, as asked
    wire = [m.to_wire() for m in page]
    last_id = wire[-1]["id"] if wire else (after or 0)
    # more: cut at the size of a reply, or a cursor read stopped at the limit; read again after lastId.
    more = len(page) < len(found) or (after is not None and len(found) == limit)
    return {"success": True, "channel": ",".join(channel), "messages": wire, "count": len(wire), "lastId": last_id,
            "more": more}  # fmt: skip


def _channels(ctx: Ctx) -> dict[str, Any]:
    found = ctx.app.broker.channels()
    return {"success": True, "channels": found, "count": len(found)}


def _clear(ctx: Ctx, *, channel) -> dict[str, Any]:
    deleted = ctx.app.broker.clear(channel)
    return {"success": True, "deleted": deleted, "message": f"cleared {deleted} message(s) from {channel}"}


async def _poll(ctx: Ctx, *, channel, after, timeout) -> dict[str, Any]:
    found: list[Message] = []
    with trio.move_on_after(timeout / 1000):
        found = await ctx.app.broker.next_after(tuple(channel), after, limit=1)
    return {"success": True, "channel": ",".join(channel), "message": found[0].to_wire() if found else None,
            "lastId": found[0].id if found else after}  # fmt: skip


async def _wait(ctx: Ctx, *, channels, after, timeout) -> dict[str, Any]:
    patterns = tuple(dict.fromkeys(channels))
    with trio.move_on_after(timeout / 1000 if timeout is not None else float("inf")):
        got = await ctx.app.broker.wait_all(patterns, after)
        return {"success": True, "messages": {p: m.to_wire() for p, m in got.items()}}
    have = ctx.app.broker.retained(patterns)
    missing = [p for p in patterns if not any(m.id > after and matches(p, m.channel) for m in have)]
    raise PDError("TIMEOUT", f"no message on {', '.join(missing)} within {timeout / 1000:g}s; wait longer with "
                  "--timeout, or see what was published with pd channels", timedOut=True,
                  missing=missing)  # fmt: skip


_CHANNELS = Param("channel", _patterns, required=True, aliases=("channels",))
OPS = (
    Op(
        "msg.publish",
        _publish,
        (Param("channel", channel_name, required=True), Param("payload", payload_check), Param("sender", v.text(200))),
        fire_and_forget=True,
        summary="publish a message (any JSON value; a string is text) to a channel; the reply carries its id",
    ),
    Op(
        "msg.subscribe",
        _subscribe,
        (
            Param("channels", _patterns, required=True, aliases=("channel",)),
            Param("after", v.integer(0)),
            Param("new", v.boolean, default=False),
            # False for a client whose readers share a connection (the SDK): each needs its own subscription.
            Param("reuse", v.boolean, default=True),
        ),
        summary="IPC only: push `msg.delivery` INFORM frames for channels (wildcards); retained messages first "
        "unless new, or history after id `after`; `msg.missed` tells a subscriber that fell behind; the "
        "connection's subscription to the same channels is returned (existing) unless reuse is false",
    ),
    Op(
        "msg.unsubscribe",
        _unsubscribe,
        (Param("subscription", v.integer(1)),),
        summary="end one subscription of this connection (all when none is given)",
    ),
    Op(
        "msg.history",
        _history,
        (_CHANNELS, Param("after", v.integer(0)), Param("limit", v.integer(1, 1000), default=50)),
        summary="a channel's (or pattern's) messages: the newest `limit`, or those after id `after`, oldest first",
    ),
    Op("msg.channels", _channels, summary="every channel with its message count and retained message"),
    Op(
        "msg.clear",
        _clear,
        (Param("channel", channel_pattern, required=True),),
        summary="delete the history of a channel (or pattern)",
    ),
    Op(
        "msg.poll",
        _poll,
        (_CHANNELS, Param("after", v.integer(0), default=0), Param("timeout", v.duration(60_000), default=30_000)),
        summary="long-poll: the first message after id `after`, waiting (woken by publish) up to `timeout`",
    ),
    Op(
        "msg.wait",
        _wait,
        (
            Param("channels", _patterns, required=True, aliases=("channel",)),
            Param("after", v.integer(0), default=0),
            Param("timeout", v.duration(24 * 3600_000)),
        ),
        summary="wait until every named channel (or pattern) has a message after id `after` (retained ones count)",
    ),
)
