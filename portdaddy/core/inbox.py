"""Direct messages to an agent: kept in its inbox (alive, dead or not yet registered), also published to the
channel ``inbox:<agent>`` so a live agent hears at once, and the sender is told whether the recipient is alive.

Retention (spec/sync.md): a read message is kept a week after it was read, an unread one a month after it was
sent, and an inbox holds at most MAX_PER_AGENT, the oldest read message making room for a new one. An unread
message is never pushed out by another: when all are unread, sends are refused."""

from __future__ import annotations

import json
from typing import Any

from portdaddy.core import validate as v
from portdaddy.core.broker import payload_check
from portdaddy.core.clock import now_ms
from portdaddy.core.ops import Ctx, Op, Param
from portdaddy.errors import NotFound, PDError

MAX_PER_AGENT = 1000
READ_RETENTION_MS = 7 * 86_400_000  # after it was read
# After it was sent: an inbox nobody read for a month belongs to no one coming back (fleet runs are agents of
# their own, so agent ids grow with throughput and their inboxes would be kept forever).
UNREAD_RETENTION_MS = 30 * 86_400_000
PRUNE_EVERY = 500  # sends between two prunes; the first send after a start prunes too


class Inbox:
    name = "inbox"

    def __init__(self, app: Any) -> None:
        self.app = app
        self.store = app.store
        self.sent = 0

    def stats(self) -> dict[str, Any]:
        return {"inboxSent": self.sent}

    def recipient_alive(self, agent_id: str) -> bool:
        """A registered agent that is not dead; messages to others are kept for whoever takes the id later."""
        agent = self.app.agents.get(agent_id)
        return agent is not None and agent.liveness != "dead"

    def send(self, agent_id: str, content: Any, *, sender: str | None, kind: str) -> dict[str, Any]:
        held, unread = self.counts(agent_id)
        if unread >= MAX_PER_AGENT:
            raise PDError("RESOURCE_LIMIT", f"the inbox of {agent_id} holds {unread} unread messages, the limit; "
                          "it must read or clear some first (pd inbox read|clear --agent ...)", current=unread,
                          max=MAX_PER_AGENT)  # fmt: skip
        content_type = "text" if isinstance(content, str) else "json"
        now = now_ms()
        with self.store.write() as db:
            if held >= MAX_PER_AGENT:  # full: the oldest read messages make room
                db.execute("DELETE FROM inbox WHERE id IN (SELECT id FROM inbox WHERE agent_id=? AND read=1 "
                           "ORDER BY id LIMIT ?)", (agent_id, held - MAX_PER_AGENT + 1))  # fmt: skip
            if self.sent % PRUNE_EVERY == 0:
                _prune(db, now)
            db.execute("INSERT INTO inbox (agent_id, sender, content, content_type, type, created_at) "
                       "VALUES (?,?,?,?,?,?)",
                       (agent_id, sender, json.dumps(content), content_type, kind, now))  # fmt: skip
            message = {"id": db.last_insert_rowid(), "agentId": agent_id, "from": sender, "content": content,
                       "contentType": content_type, "type": kind, "read": False, "createdAt": now}  # fmt: skip
        self.sent += 1
        alive = self.recipient_alive(agent_id)
        self.app.publish(f"inbox:{agent_id}", message, sender=sender or "inbox")
        self.app.bus.emit("inbox.send", to=agent_id, id=message["id"], recipientAlive=alive, **{"from": sender})
        return {**message, "recipientAlive": alive}

    def list(self, agent_id: str, *, unread: bool, since: int | None, limit: int) -> list[dict[str, Any]]:
        where, args = "agent_id=?", [agent_id]
        if since is not None:
            where, args = where + " AND created_at>=?", [*args, since]
        if unread:  # with since: the unread ones since then (the original let since win and showed read ones)
            where += " AND read=0"
        rows = self.store.all(f"SELECT id, sender, content, content_type, type, read, created_at FROM inbox "
                              f"WHERE {where} ORDER BY id DESC LIMIT ?", (*args, limit))  # fmt: skip
        return [{"id": i, "agentId": agent_id, "from": s, "content": json.loads(c), "contentType": ct, "type": t,
                 "read": bool(r), "createdAt": at} for i, s, c, ct, t, r, at in rows]  # fmt: skip

    def counts(self, agent_id: str) -> tuple[int, int]:
        total, unread = self.store.one("SELECT count(*), coalesce(sum(read=0), 0) FROM inbox WHERE agent_id=?",
                                       (agent_id,))  # fmt: skip
        return total, unread

    def mark_read(self, agent_id: str, message_id: int | None) -> int:
        with self.store.write() as db:
            now = now_ms()
            if message_id is None:
                db.execute("UPDATE inbox SET read=1, read_at=? WHERE agent_id=? AND read=0", (now, agent_id))
            else:
                db.execute("UPDATE inbox SET read=1, read_at=? WHERE agent_id=? AND id=? AND read=0",
                           (now, agent_id, message_id))  # fmt: skip
            marked = db.changes()
        if not marked and message_id is not None and not self.store.one(
                "SELECT 1 FROM inbox WHERE agent_id=? AND id=?", (agent_id, message_id)):  # fmt: skip
            raise NotFound("NOT_FOUND", f"message {message_id} is not in {agent_id}'s inbox; see pd inbox")
        return marked

    def clear(self, agent_id: str) -> int:
        """Delete an agent's inbox, and the copies on ``inbox:<agent>``: a cleared inbox is gone from history too."""
        with self.store.write() as db:
            db.execute("DELETE FROM inbox WHERE agent_id=?", (agent_id,))
            deleted = db.changes()
        self.app.broker.clear(f"inbox:{agent_id}")
        return deleted


def _prune(db: Any, now: int) -> None:
    """Drop read messages a week after they were read and unread ones a month after they were sent."""
    db.execute("DELETE FROM inbox WHERE read=1 AND coalesce(read_at, created_at) < ?", (now - READ_RETENTION_MS,))
    db.execute("DELETE FROM inbox WHERE read=0 AND created_at < ?", (now - UNREAD_RETENTION_MS,))


# -- operations ----------------------------------------------------------------------------------------------


def _send(ctx: Ctx, *, to, content, sender, type) -> dict[str, Any]:
    msg = ctx.app.inbox.send(to, content, sender=sender or ctx.agent_id, kind=type)
    alive = msg["recipientAlive"]
    state = "delivered to a live agent" if alive else f"{to} is not alive; kept in its inbox"
    return {"success": True, "messageId": msg["id"], "agentId": to, "recipientAlive": alive, "message": state}


def _list(ctx: Ctx, *, agentId, unread, since, limit) -> dict[str, Any]:
    found = ctx.app.inbox.list(agentId, unread=unread, since=since, limit=limit)
    return {"success": True, "agentId": agentId, "messages": found, "count": len(found)}


def _stats(ctx: Ctx, *, agentId) -> dict[str, Any]:
    total, unread = ctx.app.inbox.counts(agentId)
    return {"success": True, "agentId": agentId, "total": total, "unread": unread}


def _read(ctx: Ctx, *, agentId, messageId) -> dict[str, Any]:
    return {"success": True, "marked": ctx.app.inbox.mark_read(agentId, messageId)}


def _clear(ctx: Ctx, *, agentId) -> dict[str, Any]:
    return {"success": True, "deleted": ctx.app.inbox.clear(agentId)}


_AGENT = Param("agentId", v.name("agent id"), required=True, aliases=("agent", "to", "id"))
OPS = (
    Op(
        "inbox.send",
        _send,
        (
            # "to" first: over IPC a payload's agentId is also the sender's own identity, and took its place.
            Param("to", v.name("agent id"), required=True, aliases=("agentId", "agent", "id")),
            Param("content", payload_check, required=True, aliases=("message",)),
            Param("sender", v.text(200), aliases=("from",)),
            Param("type", v.text(50), default="message"),
        ),
        summary="send a direct message to an agent (kept even if it is dead or unknown; says whether it is alive)",
    ),
    Op(
        "inbox.list",
        _list,
        (
            _AGENT,
            Param("unread", v.boolean, default=False),
            Param("since", v.time_or_ago),
            Param("limit", v.integer(1, 1000), default=50),
        ),
        summary="an agent's inbox, newest first (unread only, since epoch ms or a duration ago, or both)",
    ),
    Op("inbox.stats", _stats, (_AGENT,), summary="how many messages an agent's inbox holds, and how many unread"),
    Op(
        "inbox.read",
        _read,
        (_AGENT, Param("messageId", v.integer(1))),
        summary="mark one message (or all) of an agent's inbox read",
    ),
    Op("inbox.clear", _clear, (_AGENT,), summary="delete every message of an agent's inbox"),
)
