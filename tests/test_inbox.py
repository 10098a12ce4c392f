"""The inbox through the real daemon: messages to dead or unknown agents are kept and retrievable, the sender
is told whether the recipient is alive, live delivery on inbox:<agent>, read/clear, limits and bad input."""

from __future__ import annotations

import json
import sqlite3
import time

import httpx
import pytest
from conftest import unix_client


def test_message_to_an_unknown_agent_is_kept_and_retrievable(fresh_daemon) -> None:
    sent = fresh_daemon.pd("inbox", "send", "ghost-agent", "schema v2 is in", "--from", "db-agent", "--json")
    assert sent.returncode == 0, sent.stderr
    reply = json.loads(sent.stdout)
    assert reply["recipientAlive"] is False and "kept" in reply["message"]
    fresh_daemon.kill9()
    fresh_daemon.start()
    listed = fresh_daemon.pd("inbox", "--agent", "ghost-agent", "--json")
    [msg] = json.loads(listed.stdout)["messages"]
    assert (msg["content"], msg["from"], msg["read"]) == ("schema v2 is in", "db-agent", False)
    # Also on the agent's channel, retained for when it comes back.
    assert fresh_daemon.call("msg.history", channel="inbox:ghost-agent")["messages"][0]["payload"]["id"] == msg["id"]


def test_sender_learns_whether_the_recipient_is_alive(daemon) -> None:
    daemon.call("agent.register", agentId="live-agent")
    assert daemon.call("inbox.send", agentId="live-agent", content="hi")["recipientAlive"] is True
    daemon.call("agent.unregister", agentId="live-agent")
    assert daemon.call("inbox.send", agentId="live-agent", content="hi")["recipientAlive"] is False


def test_unread_read_and_clear(daemon) -> None:
    env = {"PORT_DADDY_AGENT": "reader"}
    for text in ("one", '{"n": 2}'):
        assert daemon.pd("inbox", "send", "reader", text).returncode == 0
    assert daemon.pd("inbox", "--unread", "-q", env=env).stdout.strip() == "2"
    listed = json.loads(daemon.pd("inbox", "--json", env=env).stdout)["messages"]
    assert [m["content"] for m in listed] == [{"n": 2}, "one"]  # newest first; JSON comes back as JSON
    assert daemon.pd("inbox", "read", str(listed[1]["id"]), env=env).returncode == 0
    assert daemon.call("inbox.stats", agentId="reader") | {"success": True} == \
        {"success": True, "agentId": "reader", "total": 2, "unread": 1}  # fmt: skip
    assert "Marked 1" in daemon.pd("inbox", "read", env=env).stdout
    assert daemon.pd("inbox", "read", str(listed[1]["id"]), env=env).returncode == 0  # already read: fine
    missing = daemon.pd("inbox", "read", "999999", env=env)
    assert missing.returncode == 1 and "message 999999 is not in reader's inbox" in missing.stderr
    assert "Deleted 2" in daemon.pd("inbox", "clear", env=env).stdout
    assert "No messages" in daemon.pd("inbox", env=env).stdout
    assert daemon.call("msg.history", channel="inbox:reader")["messages"] == []  # nor are the channel's copies


def test_http_inbox_routes(daemon) -> None:
    transport = httpx.HTTPTransport(uds=str(daemon.settings.http_sock))
    with httpx.Client(transport=transport, base_url="http://x") as c:
        r = c.post("/agents/web-agent/inbox", json={"content": "hi", "from": "curl"})
        assert r.status_code == 200
        mid = r.json()["messageId"]
        c.post("/agents/web-agent/inbox", json={"content": "later"})
        assert c.get("/agents/web-agent/inbox", params={"unread": "true"}).json()["count"] == 2
        # Marking one message read marked the whole inbox: the route's <int:messageId> never reached the op.
        assert c.put(f"/agents/web-agent/inbox/{mid}/read").json()["marked"] == 1
        assert c.get("/agents/web-agent/inbox/stats").json()["unread"] == 1
        r = c.put("/agents/web-agent/inbox/999999/read")
        assert r.status_code == 404 and r.json()["code"] == "NOT_FOUND"
        r = c.put("/agents/web-agent/inbox/abc/read")
        assert r.status_code == 400 and "messageId must be an integer" in r.json()["error"]
        assert c.get("/agents/web-agent/inbox/stats").json()["unread"] == 1
        assert c.put("/agents/web-agent/inbox/read-all").json()["marked"] == 1
        assert c.delete("/agents/web-agent/inbox").json()["deleted"] == 2
        assert c.post("/agents/web-agent/inbox", json={}).status_code == 400


@pytest.mark.parametrize("args", [
    ("inbox", "send", "bad agent", "hi"),
    ("inbox", "send", "ok-agent", "x" * 70_000),
    ("inbox", "send", "ok-agent", " "),
    ("inbox",),  # no agent known
    ("inbox", "--agent", "ok-agent", "--since", "yesterday"),
])  # fmt: skip
def test_bad_input_exits_2_and_changes_nothing(daemon, args) -> None:
    before = daemon.call("inbox.stats", agentId="ok-agent")["total"]
    r = daemon.pd(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert daemon.call("inbox.stats", agentId="ok-agent")["total"] == before


def test_an_agent_bound_connection_sends_to_the_named_recipient(daemon) -> None:
    """Over IPC a payload's agentId is the sender's identity; the recipient used to share that field, so an
    agent's DM "to" bob landed in its own inbox."""
    with daemon.client("alice") as alice:
        sent = alice.request("inbox.send", {"to": "bob", "content": "rebase please"})
        assert sent["agentId"] == "bob"
        assert alice.request("inbox.list", {"agentId": "alice"})["count"] == 0
    bob = daemon.call("inbox.list", agentId="bob")["messages"]
    assert [(m["from"], m["content"]) for m in bob] == [("alice", "rebase please")]


def test_unread_since_gives_the_unread_messages_since_then(daemon) -> None:
    """since used to win over unread: asking for the unread messages of the last hour listed read ones too."""
    ids = [daemon.call("inbox.send", agentId="since-agent", content=text)["messageId"] for text in ("a", "b", "c")]
    daemon.call("inbox.read", agentId="since-agent", messageId=ids[0])
    first = daemon.call("inbox.list", agentId="since-agent")["messages"][-1]["createdAt"]
    unread_since = daemon.call("inbox.list", agentId="since-agent", since=first, unread=True)["messages"]
    assert [m["id"] for m in unread_since] == [ids[2], ids[1]]
    assert len(daemon.call("inbox.list", agentId="since-agent", since=first)["messages"]) == 3
    later = daemon.call("inbox.list", agentId="since-agent", since=first + 60_000, unread=True)["messages"]
    assert later == []
    with unix_client(daemon) as c:  # over HTTP the original's epoch ms, as query text
        assert c.get(f"/agents/since-agent/inbox?since={first}&unread=true").json()["count"] == 2
    # pd inbox --since takes a duration back from now, as pd notes does
    shown = daemon.pd("inbox", "--agent", "since-agent", "--since", "1h", "--unread", "--json")
    assert [m["id"] for m in json.loads(shown.stdout)["messages"]] == [ids[2], ids[1]]
    old = daemon.call("inbox.send", agentId="old-agent", content="x")["messageId"]
    with sqlite3.connect(daemon.settings.db) as db:  # the inbox keeps nothing in memory: a live update is seen
        db.execute("UPDATE inbox SET created_at = created_at - 7200000 WHERE id = ?", (old,))
    assert json.loads(daemon.pd("inbox", "--agent", "old-agent", "--since", "1h", "--json").stdout)["count"] == 0


def test_read_messages_go_a_week_after_reading_unread_ones_a_month_after_sending(fresh_daemon) -> None:
    from portdaddy.core.inbox import READ_RETENTION_MS, UNREAD_RETENTION_MS

    d = fresh_daemon
    names = ("read-long-ago", "read-yesterday", "unread-too-old", "unread-recent", "read-before-016")
    ids = {name: d.call("inbox.send", agentId="keeper", content=name)["messageId"] for name in names}
    d.call("inbox.read", agentId="keeper")
    d.stop()
    day, now = 86_400_000, int(time.time() * 1000)
    ages = {  # (created_at, read, read_at) as they would be after that long
        "read-long-ago": (now - 10 * day, 1, now - READ_RETENTION_MS - day),
        "read-yesterday": (now - 10 * day, 1, now - day),  # sent long ago, but read only yesterday: kept
        "unread-too-old": (now - UNREAD_RETENTION_MS - day, 0, None),
        "unread-recent": (now - UNREAD_RETENTION_MS + day, 0, None),
        "read-before-016": (now - READ_RETENTION_MS - day, 1, None),  # no read_at: judged by when it was sent
    }
    with sqlite3.connect(d.settings.db) as db:
        for name, row in ages.items():
            db.execute("UPDATE inbox SET created_at=?, read=?, read_at=? WHERE id=?", (*row, ids[name]))
    d.start()
    d.call("inbox.send", agentId="someone-else", content="the first send after a start prunes")
    kept = {m["content"] for m in d.call("inbox.list", agentId="keeper")["messages"]}
    assert kept == {"read-yesterday", "unread-recent"}


def test_a_full_inbox_makes_room_from_read_messages_never_unread_ones(daemon_factory) -> None:
    from portdaddy.core.inbox import MAX_PER_AGENT

    d = daemon_factory(PORT_DADDY_IPC_RATE="1000000")
    with d.client() as c:
        ids = [c.request("inbox.send", {"agentId": "busy", "content": f"m{i}"})["messageId"]
               for i in range(MAX_PER_AGENT)]  # fmt: skip
        r = d.pd("inbox", "send", "busy", "one more")
        assert r.returncode == 1 and f"holds {MAX_PER_AGENT} unread messages" in r.stderr
        for message_id in ids[:2]:
            c.request("inbox.read", {"agentId": "busy", "messageId": message_id})
        c.request("inbox.read", {"agentId": "busy", "messageId": ids[500]})
        for text in ("new 1", "new 2", "new 3"):
            assert d.pd("inbox", "send", "busy", text).returncode == 0
        assert d.pd("inbox", "send", "busy", "new 4").returncode == 1  # all unread again
        stats = c.request("inbox.stats", {"agentId": "busy"})
        assert (stats["total"], stats["unread"]) == (MAX_PER_AGENT, MAX_PER_AGENT)
        kept = {m["id"] for m in c.request("inbox.list", {"agentId": "busy", "limit": 1000})["messages"]}
        assert not kept & {ids[0], ids[1], ids[500]} and set(ids[2:500]) <= kept
