"""The activity log: one row per state change, written from the event bus (reference §13).

Every event becomes a row except the hot kinds (``msg.publish``, ``pheromone.spray``, ``agent.heartbeat``: too
chatty). Rows are written in batches at most ``BATCH_S`` apart (a commit per event was a quarter of a lock round
trip), or as soon as ``BATCH_ROWS`` wait (a second of lock churn from a few agents is ~25,000 rows: writing them
at once held every connection for ~150 ms), after the change they describe has committed, so a SIGKILL can lose
the last second of log rows but never acknowledged state. An event is taken inline at emit (an observer
appending to a list: a memory channel's send cost ~1 µs of every lock grant and release), and the first one
after a write sets when the next is due. Reads write what is pending first, so the log a caller reads is never
behind.
Retention as the original: 7 days and the newest 10,000 rows.
"""

from __future__ import annotations

import json
import math
from contextlib import suppress
from typing import Any

import trio

from portdaddy.core import validate as v
from portdaddy.core.clock import now_ms
from portdaddy.core.events import Event
from portdaddy.core.ops import Ctx, Op, Param
from portdaddy.errors import StoreError

RETENTION_MS = 7 * 86_400_000
MAX_ROWS = 10_000
PRUNE_EVERY = 500
BATCH_S = 1.0
BATCH_ROWS = 250  # a batch this long is written at once: ~1 ms of the reactor's time, not a second's worth
# Where an event's subject is, in order of preference.
_TARGET_KEYS = (
    "sessionId",
    "salvageId",
    "serviceId",
    "name",
    "harbor",
    "channel",
    "to",
    "tupleId",
    "rule",
    "webhookId",
    "runId",
    "agentId",
)
_AGENT_KEYS = ("agentId", "owner", "agent", "by", "from")
MAX_DETAILS = 500
MAX_METADATA = 4000


_SCALARS = (str, int, float, bool)
_NOT_DETAILS = frozenset({"hash", "prevHash"})
# The C encoder behind json.dumps, made once: dumps makes one per call, a third of what a row cost to build.
_encode = json.encoder.c_make_encoder(None, str, json.encoder.encode_basestring_ascii, None, ":", ",", False, False,
                                      True)  # fmt: skip


def _to_json(data: dict[str, Any]) -> str:
    return "".join(_encode(data, 0))


def _first(data: dict[str, Any], keys: tuple[str, ...], kinds: type | tuple[type, ...]) -> Any:
    for k in keys:
        value = data.get(k)
        if isinstance(value, kinds):
            return value
    return None


def _scalar(value: Any) -> bool:
    return isinstance(value, _SCALARS)


def details_of(data: dict[str, Any]) -> str:
    """The event's data as a line for people: ``k=v`` for its scalars, then ``k=a,b`` for its lists of them."""
    scalars, lists = [], []
    for k, val in data.items():
        if isinstance(val, _SCALARS):
            if k not in _NOT_DETAILS:
                scalars.append(f"{k}={val}")
        elif isinstance(val, list) and val and all(map(_scalar, val)):  # an empty one says nothing
            lists.append(f"{k}={','.join(map(str, val))}")
    details = ", ".join(scalars)
    if lists:
        details = "; ".join(filter(None, [details, *lists]))
    return details[:MAX_DETAILS]


def row_of(ev: Event) -> tuple[Any, ...]:
    """The log row of ``ev``. Its details are made from its metadata when read (the log is written far more than
    read); only an event whose metadata is too long to keep has them written."""
    d = ev.data
    target = _first(d, _TARGET_KEYS, _SCALARS)
    details, metadata = None, _to_json(d)
    if len(metadata) > MAX_METADATA:
        details, metadata = details_of(d), '{"truncated":true}'
    return (ev.at, ev.kind, _first(d, _AGENT_KEYS, str), None if target is None else str(target), details, metadata)


class Activity:
    name = "activity"

    def __init__(self, app: Any) -> None:
        self.app = app
        self.store = app.store
        self.written = 0
        self._pending: list[Event] = []
        self._due: trio.CancelScope | None = None  # ends when the pending events are to be written

    def stats(self) -> dict[str, Any]:
        return {"activityRows": self.store.scalar("SELECT count(*) FROM activity")}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with self.app.bus.observe(self._take):
            task_status.started()
            try:
                while True:
                    # The burst gathers for BATCH_S after its first event: one commit for all of it.
                    with trio.CancelScope(deadline=trio.current_time() + BATCH_S if self._pending else math.inf) as due:
                        self._due = due
                        await trio.sleep_forever()
                    self._due = None
                    await self.store.background(self.flush)
            finally:
                self._due = None
                with suppress(StoreError):  # the store said why in the log; these events are not kept
                    self.flush()

    def _take(self, ev: Event) -> None:
        pending, due = self._pending, self._due
        if due is not None:
            if not pending:
                due.deadline = trio.current_time() + BATCH_S
            elif len(pending) == BATCH_ROWS - 1:
                due.cancel()
        pending.append(ev)

    def flush(self) -> None:
        """Write every event received so far (one transaction). While the store refuses them they wait, the
        newest MAX_ROWS of them (what the log keeps at most anyway)."""
        events = self._pending
        try:
            if events:
                self.write(events)
        except StoreError:
            if len(events) > MAX_ROWS:
                self.store.drop("activity", len(events) - MAX_ROWS)
            self._pending = events[-MAX_ROWS:]
            raise
        self._pending = []

    def _settle(self) -> None:
        """Before a read: store what has arrived, unless the store refuses it (then the read shows what is stored)."""
        with suppress(StoreError):
            self.flush()

    def write(self, events: list[Event]) -> None:
        with self.store.write() as db:
            db.executemany("INSERT INTO activity (timestamp, type, agent_id, target_id, details, metadata) "
                           "VALUES (?,?,?,?,?,?)", [row_of(e) for e in events])  # fmt: skip
            before = self.written // PRUNE_EVERY
            self.written += len(events)
            if self.written // PRUNE_EVERY != before:
                self._prune(db)

    def _prune(self, db: Any) -> None:
        db.execute("DELETE FROM activity WHERE timestamp < ?", (now_ms() - RETENTION_MS,))
        # Ids only grow (AUTOINCREMENT; a rolled-back insert takes its id back) and rows leave from the oldest
        # end, so the ids above max - MAX_ROWS are the newest MAX_ROWS rows, or fewer if the clock went back
        # and the age rule took some among them. Counting them off the index cost ~1 µs for each row written.
        db.execute("DELETE FROM activity WHERE id <= (SELECT max(id) FROM activity) - ?", (MAX_ROWS,))

    def entries(self, *, limit: int, type: str | None = None, agent: str | None = None, target: str | None = None,
                since: int | None = None) -> list[dict[str, Any]]:  # fmt: skip
        self._settle()
        where, args = ["1"], []
        for column, value in (("type", type), ("agent_id", agent), ("target_id", target)):
            if value is None:
                continue
            if value.endswith("*"):
                where.append(f"substr({column}, 1, ?) = ?")
                args += [len(value) - 1, value[:-1]]
            else:
                where.append(f"{column} = ?")
                args.append(value)
        if since is not None:
            where.append("timestamp >= ?")
            args.append(since)
        rows = self.store.all("SELECT id, timestamp, type, agent_id, target_id, details, metadata FROM activity "
                              f"WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?", (*args, limit))  # fmt: skip
        entries = []
        for i, ts, t, a, tg, d, m in rows:
            metadata = json.loads(m) if m else None
            if d is None:
                d = details_of(metadata) if isinstance(metadata, dict) else ""
            entries.append({"id": i, "timestamp": ts, "type": t, "agentId": a, "targetId": tg, "details": d,
                            "metadata": metadata})  # fmt: skip
        return entries

    def summary(self, since: int) -> dict[str, int]:
        self._settle()
        return dict(self.store.all("SELECT type, count(*) FROM activity WHERE timestamp >= ? GROUP BY type ORDER BY 2 "
                                   "DESC", (since,)))  # fmt: skip


def list_op(ctx: Ctx, *, limit, type, agent, target, since) -> dict[str, Any]:
    found = ctx.app.activity.entries(limit=limit, type=type, agent=agent, target=target, since=since)
    return {"success": True, "entries": found, "count": len(found)}


def summary_op(ctx: Ctx, *, since) -> dict[str, Any]:
    start = since or 0
    summary = ctx.app.activity.summary(start)
    return {"success": True, "summary": summary, "total": sum(summary.values()), "since": start}


_FILTER = v.text(200)
OPS = (
    Op(
        "activity.list",
        list_op,
        (
            Param("limit", v.integer(1, 1000), default=100),
            Param("type", _FILTER),
            Param("agent", _FILTER),
            Param("target", _FILTER),
            Param("since", v.time_or_ago),
        ),
        summary="activity log, newest first (type/agent/target: exact or a prefix ending in *; "
        "since: 30m ago or epoch ms)",
    ),
    Op(
        "activity.summary",
        summary_op,
        (Param("since", v.time_or_ago),),
        summary="activity counts by type (since: a duration ago like 1h, or epoch ms; default all)",
    ),
)
