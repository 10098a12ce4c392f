"""Webhooks: bus events POSTed to registered URLs, HMAC-signed, retried, and durable across restarts.

Each matching event becomes a delivery row (the exact body that will be sent and signed) before any attempt,
so a restart resumes pending and retrying deliveries. Attempts run at their due time (no sweep tick): after a
failure the next is due 1, 2, 4, 8 s later (``PORT_DADDY_WEBHOOK_RETRY_BASE`` doubles); after 5 attempts the
delivery is ``failed``. A 2xx reply is ``delivered``; redirects count as failures. A webhook whose deliveries
all failed for long enough (``DISABLE_FAILURES`` of them over ``PORT_DADDY_WEBHOOK_DISABLE_AFTER``, an hour) is
disabled, its endpoint being gone or broken, until it is enabled again.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import logging
import uuid
from functools import partial
from typing import Any

import trio

from portdaddy.core import httppost
from portdaddy.core import validate as v
from portdaddy.core.clock import now_ms
from portdaddy.core.events import Event
from portdaddy.core.ops import Ctx, Op, Param
from portdaddy.errors import NotFound, PDError, bad_input

log = logging.getLogger("portdaddy.webhooks")

MAX_ATTEMPTS = 5
# Failed deliveries in a row that disable a webhook, once the run has also lasted the daemon's
# webhook_disable_after_ms (an hour): retrying deliveries take turns, so a burst of events to an endpoint that
# is down for a minute fails 20 in a row as well. A success starts the run again.
DISABLE_FAILURES = 20
MAX_WEBHOOKS = 100
# Settled deliveries (delivered or failed) are history: kept a week, and at most this many (each holds its body).
SETTLED_RETENTION_MS = 7 * 86_400_000
MAX_SETTLED = 10_000
GIVEN_UP = "given up: the webhook was disabled"  # the response body of what was queued for a disabled hook
PRUNE_EVERY = 500  # deliveries written between two prunes
MAX_IN_FLIGHT = 16  # in all; and one per webhook, so a slow or silent endpoint delays only its own deliveries
# Event kinds a webhook may ask for, with what they mean (GET /webhooks/events).
EVENTS = {
    "service.claim": "a port was claimed", "service.release": "services were released",
    "service.expire": "claims expired", "agent.register": "an agent registered",
    "agent.unregister": "an agent unregistered", "agent.stale": "an agent missed its heartbeats",
    "agent.dead": "an agent was declared dead", "lock.acquire": "a lock was granted",
    "lock.release": "a lock was released (release, expire, owner death, disconnect)",
    "msg.publish": "a channel message was published", "inbox.send": "a direct message was sent",
    "session.start": "a session started", "session.end": "a session ended",
    "salvage.create": "a dead agent's work was queued for salvage",
    "salvage.claim": "an agent took a dead agent's work over", "salvage.complete": "salvaged work was finished",
    "salvage.abandon": "salvaged work went back to the queue", "salvage.dismiss": "a salvage entry was dismissed",
    "salvage.supersede": "a fleet run's death or success settled its agent's earlier pending salvage entries",
    "arbiter.violation": "an invariant was broken",
    "fleet.run.start": "a fleet run started", "fleet.run.exit": "a fleet run exited",
    "fleet.circuit.open": "a fleet agent's circuit breaker opened",
    "daemon.start": "the daemon started", "daemon.stop": "the daemon is stopping",
    "webhook.test": "a test delivery (pd webhook test)",
    "webhook.disable": "a webhook was disabled: its deliveries kept failing",
}  # fmt: skip
_ALIASES = {"message.publish": "msg.publish"}  # the original's name
# The field an event's filterPattern is matched against (its target).
_TARGETS = ("serviceId", "name", "agentId", "channel", "to", "sessionId")


def _target(data: dict[str, Any]) -> str | None:
    for key in _TARGETS:
        if isinstance(data.get(key), str):
            return data[key]
    return None


class Webhooks:
    name = "webhooks"

    def __init__(self, app: Any) -> None:
        self.app = app
        self.store = app.store
        self.allow_private = app.settings.webhook_allow_private
        self.retry_base_ms = app.settings.webhook_retry_base_ms
        self.disable_after_ms = app.settings.webhook_disable_after_ms
        self._changed = trio.Event()  # a delivery became due earlier than the sender's next wake-up
        self._in_flight: dict[str, str] = {}  # webhook id -> the delivery being sent to it
        self.written = 0  # deliveries queued since start, for pruning every PRUNE_EVERY
        self._active: list[tuple[str, set[str], str | None]] | None = None  # (id, events, filter); None: reload
        self.delivered = 0
        self.failed = 0

    def stats(self) -> dict[str, Any]:
        pending = self.store.scalar("SELECT count(*) FROM webhook_deliveries WHERE status IN ('pending','retrying')")
        disabled = self.store.scalar("SELECT count(*) FROM webhooks WHERE active=0 AND disabled_at IS NOT NULL")
        return {"webhooks": self.store.scalar("SELECT count(*) FROM webhooks"), "webhookPending": pending,
                "webhookDelivered": self.delivered, "webhookFailed": self.failed,
                "webhooksDisabled": disabled}  # fmt: skip

    # -- registry ------------------------------------------------------------------------------------------

    def register(self, url: str, events: list[str], *, secret: str | None, filter_pattern: str | None,
                 metadata: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
        httppost.check_url(url, allow_private=self.allow_private)
        if self.store.scalar("SELECT count(*) FROM webhooks") >= MAX_WEBHOOKS:
            raise PDError("RESOURCE_LIMIT", f"{MAX_WEBHOOKS} webhooks are registered, the limit; delete some first")
        hook_id = str(uuid.uuid4())
        with self.store.write() as db:
            db.execute("INSERT INTO webhooks (id, url, secret, events, filter_pattern, created_at, metadata) "
                       "VALUES (?,?,?,?,?,?,?)", (hook_id, url, secret, json.dumps(events), filter_pattern, now_ms(),
                                                  json.dumps(metadata) if metadata is not None else None))  # fmt: skip
        self._active = None
        return self.get(hook_id)

    def get(self, hook_id: str) -> dict[str, Any]:
        row = self.store.one(f"SELECT {_HOOK_COLS} FROM webhooks WHERE id=?", (hook_id,))
        if row is None:
            raise NotFound("NOT_FOUND", f"no webhook {hook_id!r}; list them with pd webhook ls")
        return _hook(row)

    def list(self, *, active_only: bool) -> list[dict[str, Any]]:
        where = "WHERE active=1" if active_only else ""
        return [_hook(r) for r in self.store.all(f"SELECT {_HOOK_COLS} FROM webhooks {where} ORDER BY created_at")]

    def update(self, hook_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Change fields; ``active: true``, or a new url for a hook the daemon disabled, enables it afresh."""
        hook = self.get(hook_id)
        if "url" in changes:
            httppost.check_url(changes["url"], allow_private=self.allow_private)
        columns = {"url": "url", "events": "events", "filterPattern": "filter_pattern", "active": "active",
                   "metadata": "metadata"}  # fmt: skip
        sets = [(columns[k], json.dumps(val) if k in ("events", "metadata") else val) for k, val in changes.items()]
        if changes.get("active", "url" in changes and hook["disabledAt"] is not None):
            sets += [("active", 1), ("consecutive_failures", 0), ("failing_since", None), ("disabled_at", None),
                     ("disabled_reason", None)]  # fmt: skip
        with self.store.write() as db:
            for column, val in sets:
                db.execute(f"UPDATE webhooks SET {column}=? WHERE id=?", (val, hook_id))
        self._active = None
        return self.get(hook_id)

    def delete(self, hook_id: str) -> None:
        self.get(hook_id)
        with self.store.write() as db:
            db.execute("DELETE FROM webhooks WHERE id=?", (hook_id,))
        self._active = None

    def deliveries(self, hook_id: str, limit: int) -> list[dict[str, Any]]:
        self.get(hook_id)
        rows = self.store.all("SELECT id, event, status, attempts, last_attempt, response_status, response_body, "
                              "created_at FROM webhook_deliveries WHERE webhook_id=? ORDER BY created_at DESC, "
                              "rowid DESC LIMIT ?", (hook_id, limit))  # fmt: skip
        keys = ("id", "event", "status", "attempts", "lastAttempt", "responseStatus", "responseBody", "createdAt")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    # -- events -> deliveries ------------------------------------------------------------------------------

    def _hooks(self) -> list[tuple[str, set[str], str | None]]:
        if self._active is None:  # kept in memory: asked for every publish
            rows = self.store.all("SELECT id, events, filter_pattern FROM webhooks WHERE active=1")
            self._active = [(hid, set(json.loads(evs)), pattern) for hid, evs, pattern in rows]
        return self._active

    def _wants(self, kind: str, data: dict[str, Any]) -> bool:
        """Only kinds some active webhook asks for: any other event would cost an ``Event`` built for nothing."""
        return kind in EVENTS and any(_asks_for(wanted, kind) for _, wanted, _ in self._hooks())

    def enqueue(self, events: list[Event]) -> int:
        """Write a delivery for every (event, webhook that wants it); returns how many."""
        hooks = self._hooks()
        if not hooks:
            return 0
        rows = []
        for ev in events:
            if ev.kind not in EVENTS:
                continue
            target = _target(ev.data)
            body = json.dumps({"event": ev.kind, "timestamp": ev.at, "data": ev.data}, separators=(",", ":"),
                              default=str)  # fmt: skip
            for hid, wanted, pattern in hooks:
                if _asks_for(wanted, ev.kind) and (
                    pattern is None or target is None or fnmatch.fnmatchcase(target, pattern)
                ):
                    rows.append((str(uuid.uuid4()), hid, ev.kind, body, "pending", ev.at, ev.at))
        if rows:
            with self.store.write() as db:
                db.executemany("INSERT INTO webhook_deliveries (id, webhook_id, event, body, status, next_attempt_at, "
                               "created_at) VALUES (?,?,?,?,?,?,?)", rows)  # fmt: skip
                before = self.written // PRUNE_EVERY
                self.written += len(rows)
                if self.written // PRUNE_EVERY != before:
                    _prune(db)
            self._changed.set()
        return len(rows)

    # -- sending -------------------------------------------------------------------------------------------

    def _headers(self, delivery_id: str, event: str, body: bytes, secret: str | None,
                 timestamp: int) -> list[tuple[str, str]]:  # fmt: skip
        headers = [("Content-Type", "application/json"), ("X-PortDaddy-Event", event),
                   ("X-PortDaddy-Delivery", delivery_id), ("X-PortDaddy-Timestamp", str(timestamp))]  # fmt: skip
        if secret:
            headers.append(("X-PortDaddy-Signature", "sha256=" + sign(secret, body)))
        return headers

    async def _attempt(self, delivery_id: str) -> None:
        row = self.store.one("SELECT d.event, d.body, d.attempts, d.created_at, w.id, w.url, w.secret FROM "
                             "webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id WHERE d.id=?",
                             (delivery_id,))  # fmt: skip
        if row is None:  # its webhook was deleted meanwhile
            return
        event, body, attempts, created, hook_id, url, secret = row
        data = body.encode()
        try:
            reply = await httppost.post(url, data, self._headers(delivery_id, event, data, secret, created),
                                        allow_private=self.allow_private)  # fmt: skip
            status, text = reply.status, reply.body
        except httppost.DeliveryError as e:
            status, text = None, str(e)
        except PDError as e:  # the URL itself became unacceptable (e.g. the allow option was dropped)
            status, text = None, e.message
        # Sent once: while the store refuses the outcome, it is written again later, not the POST sent again.
        while not await self.store.background(partial(self._record, delivery_id, event, hook_id, attempts + 1,
                                                      status, text)):  # fmt: skip
            pass

    def _record(self, delivery_id: str, event: str, hook_id: str, attempts: int, status: int | None,
                text: str) -> None:  # fmt: skip
        ok = status is not None and 200 <= status < 300
        now = now_ms()
        final = ok or attempts >= MAX_ATTEMPTS
        new_status = "delivered" if ok else "failed" if final else "retrying"
        with self.store.write() as db:
            db.execute("UPDATE webhook_deliveries SET status=?, attempts=?, last_attempt=?, next_attempt_at=?, "
                       "response_status=?, response_body=? WHERE id=?",
                       (new_status, attempts, now, now + self.retry_base_ms * 2 ** (attempts - 1), status, text,
                        delivery_id))  # fmt: skip
            if ok:
                db.execute("UPDATE webhooks SET success_count=success_count+1, consecutive_failures=0, "
                           "failing_since=NULL, last_triggered=? WHERE id=?", (now, hook_id))  # fmt: skip
            elif final:
                self._count_failure(db, hook_id, now, f"HTTP {status}" if status is not None else text)
        if ok:
            self.delivered += 1
        elif final:
            self.failed += 1
            log.warning("webhook delivery %s of %s failed after %d attempts: %s", delivery_id, event, attempts, text)

    def _count_failure(self, db: Any, hook_id: str, now: int, last_error: str) -> None:
        """One more failed delivery in a row; a long enough run disables the hook (if it is still active)."""
        row = db.execute(
            "UPDATE webhooks SET failure_count=failure_count+1, consecutive_failures=consecutive_failures+1, "
            "failing_since=coalesce(failing_since, ?1), last_triggered=?1 WHERE id=?2 "
            "RETURNING consecutive_failures, failing_since, active, url", (now, hook_id),
        ).fetchone()  # fmt: skip
        if row is None:  # deleted while this delivery was being sent
            return
        failures, since, active, url = row
        if failures < DISABLE_FAILURES or now - since < self.disable_after_ms or not active:
            return
        reason = f"{failures} deliveries in a row failed, the last with {last_error[:200]}"
        db.execute("UPDATE webhooks SET active=0, disabled_at=?, disabled_reason=? WHERE id=?", (now, reason, hook_id))
        # What is still queued would fail the same way: settle it, visibly, rather than hold it for a re-enable
        # that may come days later (or never: queued rows are never pruned).
        db.execute("UPDATE webhook_deliveries SET status='failed', response_body=? WHERE webhook_id=? AND status IN "
                   "('pending','retrying')", (GIVEN_UP, hook_id))  # fmt: skip
        self._active = None
        log.warning("webhook %s (%s) disabled: %s; pd webhook enable %s", hook_id, url, reason, hook_id)
        self.app.bus.emit("webhook.disable", webhookId=hook_id, url=url, reason=reason, failures=failures)

    async def test(self, hook_id: str) -> dict[str, Any]:
        """Send a ``webhook.test`` event now, outside the queue; the reply says what the endpoint answered."""
        hook = self.get(hook_id)
        secret = self.store.scalar("SELECT secret FROM webhooks WHERE id=?", (hook_id,))
        now = now_ms()
        body = json.dumps({"event": "webhook.test", "timestamp": now,
                           "data": {"message": "test delivery from Port Daddy", "webhookId": hook_id}},
                          separators=(",", ":")).encode()  # fmt: skip
        delivery_id = f"test-{uuid.uuid4()}"
        headers = self._headers(delivery_id, "webhook.test", body, secret, now)
        try:
            reply = await httppost.post(hook["url"], body, headers, allow_private=self.allow_private)
        except httppost.DeliveryError as e:
            return {"success": False, "error": str(e)}
        return {"success": 200 <= reply.status < 300, "status": reply.status, "statusText": reply.reason,
                "body": reply.body}  # fmt: skip

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Deliveries are queued inline (observe; msg.publish is a hot kind, sent only to those that name it):
        # from a task woken after the operation answered, a SIGKILL in between lost the delivery of a change
        # that was kept. One commit per event a hook asks for, which is small beside the POST it leads to.
        with self.app.bus.observe(self._enqueue_one, "*", "msg.publish", wants=self._wants):
            await self._deliver(task_status)

    async def _deliver(self, task_status: trio.TaskStatus[None]) -> None:
        """Send each delivery at its due time: one at a time per webhook, MAX_IN_FLIGHT in all. Of a webhook's due
        deliveries the oldest event's goes first (rowid: the order they were queued in, which is the events'),
        whatever their due times say: first attempts of events of one millisecond tie on it, and a retry due
        again goes before the events that came after it.

        A task is started only for a free slot: queued behind a shared limiter, a webhook that never answers
        held every slot for 10 s an attempt while the others waited, and the queue of waiting tasks grew with
        the backlog."""
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                now = now_ms()
                free = MAX_IN_FLIGHT - len(self._in_flight)
                if free > 0:
                    busy = list(self._in_flight) or [""]
                    due = self.store.all(
                        "SELECT webhook_id, id FROM webhook_deliveries WHERE rowid IN (SELECT min(rowid) FROM "
                        "webhook_deliveries WHERE status IN ('pending','retrying') AND next_attempt_at<=? AND "
                        f"webhook_id NOT IN ({','.join('?' * len(busy))}) GROUP BY webhook_id) ORDER BY rowid LIMIT ?",
                        (now, *busy, free),
                    )
                    for hook_id, delivery_id in due:
                        self._in_flight[hook_id] = delivery_id
                        nursery.start_soon(self._send, hook_id, delivery_id)
                nxt = self.store.scalar("SELECT min(next_attempt_at) FROM webhook_deliveries WHERE status IN "
                                        "('pending','retrying') AND next_attempt_at>?", (now,))  # fmt: skip
                with trio.move_on_after((nxt - now) / 1000 if nxt else float("inf")):
                    await self._changed.wait()
                self._changed = trio.Event()

    async def _send(self, hook_id: str, delivery_id: str) -> None:
        try:
            await self._attempt(delivery_id)
        except Exception:
            log.exception("webhook delivery %s crashed", delivery_id)
        finally:
            del self._in_flight[hook_id]
            self._changed.set()  # the slot is free, and this webhook's next delivery may be due

    def _enqueue_one(self, event: Event) -> None:
        self.enqueue([event])


def _asks_for(wanted: set[str], kind: str) -> bool:
    return "*" in wanted or kind in wanted or f"{kind.split('.', 1)[0]}.*" in wanted


def sign(secret: str, body: bytes) -> str:
    """The hex HMAC-SHA256 of the exact body bytes, as in ``X-PortDaddy-Signature: sha256=<hex>``."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _prune(db: Any) -> None:
    """Drop settled deliveries past their week, then all but the newest MAX_SETTLED (pending ones are the queue)."""
    settled = "status IN ('delivered','failed')"
    db.execute(f"DELETE FROM webhook_deliveries WHERE {settled} AND created_at < ?",
               (now_ms() - SETTLED_RETENTION_MS,))  # fmt: skip
    db.execute(f"DELETE FROM webhook_deliveries WHERE {settled} AND rowid <= (SELECT rowid FROM webhook_deliveries "
               f"WHERE {settled} ORDER BY rowid DESC LIMIT 1 OFFSET ?)", (MAX_SETTLED,))  # fmt: skip


_HOOK_COLS = ("id, url, secret IS NOT NULL, events, filter_pattern, active, created_at, last_triggered, "
              "success_count, failure_count, metadata, consecutive_failures, failing_since, disabled_at, "
              "disabled_reason")  # fmt: skip


def _hook(r: tuple[Any, ...]) -> dict[str, Any]:
    return {"id": r[0], "url": r[1], "hasSecret": bool(r[2]), "events": json.loads(r[3]), "filterPattern": r[4],
            "active": bool(r[5]), "createdAt": r[6], "lastTriggered": r[7], "successCount": r[8],
            "failureCount": r[9], "metadata": json.loads(r[10]) if r[10] else None, "consecutiveFailures": r[11],
            "failingSince": r[12], "disabledAt": r[13], "disabledReason": r[14]}  # fmt: skip


# -- operations ----------------------------------------------------------------------------------------------


def _events(name: str, value: Any) -> list[str]:
    kinds = v.str_list(v.text(60), max_items=len(EVENTS) + 1)(name, value)
    out = []
    for kind in kinds:
        kind = _ALIASES.get(kind, kind)
        area = kind[:-2] if kind.endswith(".*") else None
        if kind != "*" and kind not in EVENTS and not (area and any(e.startswith(area + ".") for e in EVENTS)):
            raise bad_input(f"unknown webhook event {kind!r}; see pd webhook events (or use 'lock.*', '*')")
        out.append(kind)
    return out or ["*"]


def _register(ctx: Ctx, *, url, events, secret, filterPattern, metadata) -> dict[str, Any]:
    hook = ctx.app.webhooks.register(url, events or ["*"], secret=secret, filter_pattern=filterPattern,
                                     metadata=metadata)  # fmt: skip
    return {"success": True, **hook, "message": "Webhook registered"}


def _list(ctx: Ctx, *, active) -> dict[str, Any]:
    hooks = ctx.app.webhooks.list(active_only=active)
    return {"success": True, "webhooks": hooks, "count": len(hooks)}


def _get(ctx: Ctx, *, id) -> dict[str, Any]:
    return {"success": True, "webhook": ctx.app.webhooks.get(id)}


def _update(ctx: Ctx, *, id, **changes: Any) -> dict[str, Any]:
    given = {k: val for k, val in changes.items() if val is not None}
    return {"success": True, "webhook": ctx.app.webhooks.update(id, given), "message": "Webhook updated"}


def _delete(ctx: Ctx, *, id) -> dict[str, Any]:
    ctx.app.webhooks.delete(id)
    return {"success": True, "deleted": True}


async def _test(ctx: Ctx, *, id) -> dict[str, Any]:
    return await ctx.app.webhooks.test(id)


def _deliveries(ctx: Ctx, *, id, limit) -> dict[str, Any]:
    found = ctx.app.webhooks.deliveries(id, limit)
    return {"success": True, "deliveries": found, "count": len(found)}


def _event_list(ctx: Ctx) -> dict[str, Any]:
    return {"success": True, "events": sorted(EVENTS), "descriptions": EVENTS}


_ID = Param("id", v.text(80), required=True, aliases=("webhookId",))
_URL = Param("url", v.text(2000))
_EVENTS = Param("events", _events)
_FILTER = Param("filterPattern", v.text(200), aliases=("filter",))
_META = Param("metadata", v.json_object(10_000))
OPS = (
    Op("webhook.register", _register,
       (Param("url", v.text(2000), required=True), _EVENTS, Param("secret", v.text(500)), _FILTER, _META),
       summary="register a URL for events (default all); HMAC-signed with secret; private targets refused"),
    Op("webhook.list", _list, (Param("active", v.boolean, default=False),), summary="registered webhooks"),
    Op("webhook.get", _get, (_ID,), summary="one webhook"),
    Op("webhook.update", _update, (_ID, _URL, _EVENTS, _FILTER, Param("active", v.boolean), _META),
       summary="change a webhook's url, events, filter, active flag or metadata; active: true (or a new url) "
               "re-enables a webhook the daemon disabled"),
    Op("webhook.delete", _delete, (_ID,), summary="delete a webhook and its deliveries"),
    Op("webhook.test", _test, (_ID,), summary="send a webhook.test event now; reports the endpoint's reply"),
    Op("webhook.deliveries", _deliveries, (_ID, Param("limit", v.integer(1, 500), default=50)),
       summary="a webhook's deliveries, newest first, with status and attempts"),
    Op("webhook.events", _event_list, summary="the event kinds a webhook may subscribe to"),
)  # fmt: skip
