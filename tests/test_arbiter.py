"""The arbiter: each invariant caught from (forged) events through app.bus in an in-process trio run, normal
traffic recording none, strict mode's man-overboard, and the CLI/IPC view. The events are those of
spec/events.md, so these tests hold once the journal and synchronization subsystems emit them for real."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time

import pytest
import trio
import trio.testing

from portdaddy.core import arbiter as arbiter_module
from portdaddy.core.arbiter import Arbiter
from portdaddy.core.clock import now_ms
from portdaddy.core.harbors import Harbors
from tests.fleet_helpers import wait_for
from tests.swarm_app import PublishRecorder, make_app


@pytest.fixture
def app(tmp_path):
    app = make_app(tmp_path)
    app.add(Harbors(app))
    yield app
    app.store.close()


@pytest.fixture
def child_pid():
    """A live process that is not an ancestor of this test process."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


async def _run(app, events, *, strict=False, after=None) -> list[dict]:
    """Feed events to a running arbiter; returns the violations it recorded."""
    arbiter = Arbiter(app, strict=strict, salvage_window_s=5)
    app.add(arbiter)
    async with trio.open_nursery() as nursery:
        await nursery.start(arbiter.run)
        for kind, data in events:
            app.bus.emit(kind, **data)
        await trio.testing.wait_all_tasks_blocked()
        if after is not None:
            await after()
        nursery.cancel_scope.cancel()
    return arbiter.violations(limit=1000)[0]


def _rules(found) -> list[str]:
    return sorted(v["rule"] for v in found)


async def test_pid_squatting(app, child_pid) -> None:
    found = await _run(app, [
        ("agent.register", {"agentId": "alice", "pid": child_pid, "capabilities": None}),
        ("service.claim", {"serviceId": "myapp:api", "port": 4100, "agentId": "alice", "pid": os.getpid()}),
    ])  # fmt: skip
    assert _rules(found) == ["PID_SQUATTING"]
    assert found[0]["severity"] == "critical" and found[0]["agentId"] == "alice"
    assert found[0]["details"]["registeredPid"] == child_pid


async def test_capability_escalation_lock_and_harbor(app) -> None:
    found = await _run(app, [
        ("agent.register", {"agentId": "bob", "pid": None, "capabilities": ["payments:*", "read"]}),
        ("lock.acquire", {"name": "payments:db", "owner": "bob", "token": 1, "expiresAt": None}),
        ("lock.release", {"name": "payments:db", "owner": "bob", "token": 1, "by": "bob", "forced": False,
                          "reason": "release"}),
        ("lock.acquire", {"name": "infra:deploy", "owner": "bob", "token": 2, "expiresAt": None}),
        ("harbor.enter", {"harbor": "myapp:fleet", "agentId": "bob", "capabilities": ["read", "admin"],
                          "harborCapabilities": []}),
    ])  # fmt: skip
    assert _rules(found) == ["CAP_ESCALATION", "CAP_ESCALATION"]
    assert {tuple(v["details"].get("capabilities") or ()) for v in found} == {("payments:*", "read"), ("admin",)}


async def test_capability_escalation_through_a_real_harbor_enter(app) -> None:
    async def enter() -> None:
        app.harbors.ensure("ops:fleet", capabilities=["deploy:*"])
        app.harbors.enter("ops:fleet", "carol", capabilities=["deploy:web", "db:drop"])
        await trio.testing.wait_all_tasks_blocked()

    found = await _run(app, [], after=enter)
    assert _rules(found) == ["CAP_ESCALATION"] and found[0]["details"]["capabilities"] == ["db:drop"]


async def test_note_monotonicity(app) -> None:
    note = {"sessionId": "s1", "agentId": "dave", "type": "note"}
    found = await _run(app, [
        ("note.add", {**note, "noteId": 1, "seq": 1, "hash": "h1", "prevHash": None}),
        ("note.add", {**note, "noteId": 2, "seq": 2, "hash": "h2", "prevHash": "h1"}),
        ("note.add", {**note, "noteId": 3, "seq": 2, "hash": "h3", "prevHash": "h2"}),   # count did not grow
        ("note.add", {**note, "noteId": 4, "seq": 3, "hash": "h4", "prevHash": "hX"}),   # chain broken
    ])  # fmt: skip
    assert _rules(found) == ["NOTE_MONOTONICITY", "NOTE_MONOTONICITY"]


async def test_note_chains_are_capped_least_recently_used_first(app, monkeypatch) -> None:
    """Notes may be added to a session after it ended, and then no session.end ever drops its chain."""
    monkeypatch.setattr(arbiter_module, "MAX_CHAINS", 3)

    def note(session: str, seq: int, prev: str | None) -> tuple[str, dict]:
        return "note.add", {"sessionId": session, "agentId": "x", "type": "note", "noteId": seq, "seq": seq,
                            "hash": f"{session}{seq}", "prevHash": prev}  # fmt: skip

    found = await _run(app, [
        note("busy", 1, None), note("s", 1, None), note("t", 1, None),
        note("busy", 2, "busy1"),  # used again: now the newest
        note("u", 1, None), note("w", 1, None),  # push out s and t, the least recently used
        note("busy", 3, "forged"),  # still remembered, so still checked
    ])  # fmt: skip
    assert _rules(found) == ["NOTE_MONOTONICITY"]
    assert app.arbiter.status()["tracking"]["noteChains"] == 3


async def test_escrow_positivity(app) -> None:
    found = await _run(app, [
        ("session.start", {"sessionId": "s1", "agentId": "erin", "purpose": "x", "files": [],
                           "metadata": {"escrow": 25}}),
        ("session.start", {"sessionId": "s2", "agentId": "erin", "purpose": "x", "files": [],
                           "metadata": {"bondUsd": 0}}),
        ("session.update", {"sessionId": "s1", "agentId": "erin", "metadata": {"escrowUsd": -3}}),
    ])  # fmt: skip
    assert _rules(found) == ["ESCROW_POSITIVE", "ESCROW_POSITIVE"]
    assert {v["details"]["sessionId"] for v in found} == {"s1", "s2"}


async def test_lock_owner_validity(app) -> None:
    found = await _run(app, [
        ("lock.acquire", {"name": "db", "owner": "frank", "token": 1, "expiresAt": None}),
        ("lock.release", {"name": "db", "owner": "frank", "token": 1, "by": "gina", "forced": False,
                          "reason": "release"}),
        ("lock.acquire", {"name": "cache", "owner": "frank", "token": 2, "expiresAt": None}),
        ("lock.acquire", {"name": "cache", "owner": "gina", "token": 3, "expiresAt": None}),
    ])  # fmt: skip
    assert _rules(found) == ["LOCK_OWNER_VALID", "LOCK_OWNER_VALID"]
    assert {v["severity"] for v in found} == {"violation", "critical"}


async def test_heartbeat_freshness_stale_and_unsalvaged_dead(app, mock_clock) -> None:
    async def pass_window() -> None:
        mock_clock.jump(6)
        await trio.testing.wait_all_tasks_blocked()

    found = await _run(app, [
        ("agent.stale", {"agentId": "hal", "identity": "x", "lastHeartbeat": now_ms() - 90_000}),
        ("agent.dead", {"agentId": "hal", "identity": "x", "lastHeartbeat": 1, "sessionIds": []}),
        ("agent.dead", {"agentId": "ivy", "identity": "y", "lastHeartbeat": 1, "sessionIds": []}),
        ("salvage.create", {"salvageId": 1, "agentId": "ivy", "by": "daemon"}),
    ], after=pass_window)  # fmt: skip
    assert [(v["rule"], v["severity"], v["agentId"]) for v in sorted(found, key=lambda v: v["id"])] == [
        ("HEARTBEAT_FRESHNESS", "warning", "hal"),
        ("HEARTBEAT_FRESHNESS", "critical", "hal"),
    ]
    stale = min(found, key=lambda v: v["id"])["details"]["message"]  # for people: how long, not an epoch
    assert re.fullmatch(r"agent hal is stale \(silent for 9[01]s\)", stale), stale


async def test_normal_traffic_records_nothing(app, mock_clock, tmp_path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    short_lived = int(gone.stdout)  # an agent registered by a `pd begin` that has exited
    me = os.getpid()
    note = {"sessionId": "s1", "agentId": "alice", "type": "note"}
    events = [
        ("agent.register", {"agentId": "alice", "pid": me, "capabilities": ["payments:*", "db:*"]}),
        ("agent.register", {"agentId": "bob", "pid": short_lived, "capabilities": []}),
        ("service.claim", {"serviceId": "pay:api", "port": 4100, "agentId": "alice", "pid": me}),
        ("service.claim", {"serviceId": "pay:web", "port": 4101, "agentId": "bob", "pid": me}),
        ("session.start", {"sessionId": "s1", "agentId": "alice", "purpose": "p", "files": [],
                           "metadata": {"escrow": 10}}),
        ("note.add", {**note, "noteId": 1, "seq": 1, "hash": "a", "prevHash": None}),
        ("note.add", {**note, "noteId": 2, "seq": 2, "hash": "b", "prevHash": "a"}),
        ("lock.acquire", {"name": "payments:db", "owner": "alice", "token": 1, "expiresAt": None}),
        ("lock.acquire", {"name": "payments:db", "owner": "alice", "token": 1, "expiresAt": None}),
        ("lock.release", {"name": "payments:db", "owner": "alice", "token": 1, "by": "alice", "forced": False,
                          "reason": "release"}),
        ("lock.acquire", {"name": "deploy", "owner": "bob", "token": 2, "expiresAt": None}),
        ("lock.release", {"name": "deploy", "owner": "bob", "token": 2, "by": "alice", "forced": True,
                          "reason": "release"}),
        ("lock.acquire", {"name": "deploy", "owner": "carl", "token": 3, "expiresAt": None}),
        ("lock.release", {"name": "deploy", "owner": "carl", "token": 3, "by": "daemon", "forced": True,
                          "reason": "owner-dead"}),
        ("harbor.enter", {"harbor": "pay:fleet", "agentId": "alice", "capabilities": ["db:read"],
                          "harborCapabilities": ["db:*"]}),
        ("agent.dead", {"agentId": "bob", "identity": "b", "lastHeartbeat": 1, "sessionIds": []}),
        ("salvage.create", {"salvageId": 1, "agentId": "bob", "by": "daemon"}),
        ("session.end", {"sessionId": "s1", "agentId": "alice", "status": "completed"}),
    ]  # fmt: skip

    async def pass_window() -> None:
        mock_clock.jump(60)
        await trio.testing.wait_all_tasks_blocked()

    assert await _run(app, events, after=pass_window) == []
    status = app.arbiter.status()
    assert all(r["coverage"] > 0 for r in status["ruleDetails"]), status["ruleDetails"]
    assert status["forcedReleases"] == 1


async def test_strict_mode_sends_critical_violations_overboard(app) -> None:
    app.add(PublishRecorder())
    seen = []
    with app.bus.subscribe("arbiter.violation") as rx:
        found = await _run(app, [
            ("lock.acquire", {"name": "db", "owner": "a", "token": 1, "expiresAt": None}),
            ("lock.acquire", {"name": "db", "owner": "b", "token": 2, "expiresAt": None}),   # critical
            ("session.start", {"sessionId": "s", "agentId": "a", "metadata": {"escrow": 0}}),  # not critical
        ], strict=True)  # fmt: skip
        while True:
            try:
                seen.append(rx.receive_nowait())
            except trio.WouldBlock:
                break
    assert len(found) == 2
    assert [(e.data["rule"], e.data["manOverboard"]) for e in seen] == [
        ("LOCK_OWNER_VALID", True),
        ("ESCROW_POSITIVE", False),
    ]
    channels = [(c, p["type"], p["rule"]) for c, p, _ in app.broker.published]
    assert channels == [("resurrection", "man_overboard", "LOCK_OWNER_VALID")]


def test_status_and_violations_through_the_cli(daemon_factory) -> None:
    d = daemon_factory(PORT_DADDY_ARBITER_STRICT="1")
    status = json.loads(d.pd("arbiter", "status", "--json").stdout)
    assert status["mode"] == "strict_enforcement" and status["rulesCount"] == 6
    # A member declaring capabilities beyond its harbor's: the public API provokes CAP_ESCALATION.
    d.call("harbor.create", name="ops:fleet", capabilities=["deploy:*"])
    d.call("harbor.enter", name="ops:fleet", agentId="mallory", capabilities=["db:drop"])
    deadline = time.monotonic() + 10
    while True:
        r = json.loads(d.pd("arbiter", "violations", "--since", "1h", "--json").stdout)
        if r["total"]:
            break
        assert time.monotonic() < deadline
    assert r["violations"][0]["rule"] == "CAP_ESCALATION" and r["violations"][0]["agentId"] == "mallory"
    assert d.pd("arbiter", "violations", "--since", "yesterday").returncode == 2
    assert "CAP_ESCALATION" in d.pd("arbiter", "violations").stdout
    # A synthetic violation exercises the alert path without sending anyone overboard, even in strict mode.
    found = json.loads(d.pd("arbiter", "test", "LOCK_OWNER_VALID", "--json").stdout)["violation"]
    assert found["rule"] == "LOCK_OWNER_VALID" and found["details"]["synthetic"] is True
    bad = d.pd("arbiter", "test", "NO_SUCH_RULE")
    assert bad.returncode == 2 and "LOCK_OWNER_VALID" in bad.stderr
    assert json.loads(d.pd("arbiter", "violations", "--rule", "LOCK_OWNER_VALID", "--json").stdout)["total"] == 1


def test_violations_are_kept_a_week_and_the_newest_ten_thousand(fresh_daemon) -> None:
    """Violations were never pruned, and each stale agent adds a warning. Now they go as activity rows do;
    the counts pd arbiter status and pd status show are of what is kept."""
    from portdaddy.core.arbiter import MAX_ROWS, RETENTION_MS

    d = fresh_daemon
    old = [d.call("arbiter.test", name="LOCK_OWNER_VALID")["violation"]["id"] for _ in range(2)]
    assert "2 invariant violations recorded" in d.pd("status").stdout
    d.stop()
    now = int(time.time() * 1000)
    with sqlite3.connect(d.settings.db) as db:
        db.execute("UPDATE arbiter_violations SET at=? WHERE id IN (?,?)", (now - RETENTION_MS - 60_000, *old))
        db.executemany("INSERT INTO arbiter_violations (at, rule, severity, agent_id, details) VALUES (?,?,?,?,?)",
                       [(now, "HEARTBEAT_FRESHNESS", "warning", f"a{i}", '{"message":"stale"}')
                        for i in range(MAX_ROWS + 1)])  # fmt: skip
        newest = db.execute("SELECT max(id) FROM arbiter_violations").fetchone()[0]
    d.start()
    kept = d.call("arbiter.violations", limit=1000)
    assert kept["total"] == MAX_ROWS and kept["violations"][0]["id"] == newest
    assert {v["rule"] for v in kept["violations"]} == {"HEARTBEAT_FRESHNESS"}
    status = d.call("arbiter.status")
    assert status["violationsCount"] == MAX_ROWS
    assert {r["name"]: r["violations"] for r in status["ruleDetails"]}["LOCK_OWNER_VALID"] == 0
    assert "invariant violation" not in d.pd("status").stdout  # the serious ones aged out
    assert d.call("arbiter.test", name="LOCK_OWNER_VALID")["violation"]["id"] > newest


def test_a_running_arbiter_prunes_every_so_many_violations(app, monkeypatch) -> None:
    monkeypatch.setattr(arbiter_module, "MAX_ROWS", 3)
    monkeypatch.setattr(arbiter_module, "PRUNE_EVERY", 5)
    arbiter = Arbiter(app)
    ids = [arbiter.violation("LOCK_OWNER_VALID", "x", "synthetic", synthetic=True)["id"] for _ in range(4)]
    assert arbiter.violations()[1] == 4
    fifth = arbiter.violation("LOCK_OWNER_VALID", "x", "synthetic", synthetic=True)["id"]
    assert [v["id"] for v in arbiter.violations()[0]] == [fifth, ids[3], ids[2]]
    assert arbiter.status()["violationsCount"] == 3 and arbiter.serious == 3


def test_memory_follows_sessions_agents_and_locks_as_they_come_and_go(daemon_factory) -> None:
    """The arbiter kept every session's note chain and every salvaged agent forever: a daemon that ran for
    weeks held one entry per session it had ever seen."""
    d = daemon_factory(PORT_DADDY_STALE_AFTER="300ms", PORT_DADDY_DEAD_AFTER="600ms")
    workers = 60
    for i in range(workers):
        agent = f"worker-{i}"
        with d.client(agent) as c:  # a connection acts for one agent
            c.request("agent.register", {"agentId": agent, "capabilities": ["work:*"]})
            sid = c.request("session.start", {"purpose": f"task {i}"})["sessionId"]
            for n in range(2):
                c.request("note.add", {"sessionId": sid, "content": f"step {n}"})
            c.request("lock.acquire", {"name": f"work:{i}"})
            c.request("lock.release", {"name": f"work:{i}"})
            c.request("session.end", {"sessionId": sid})
            if i % 2 == 0:
                c.request("agent.unregister", {})  # the odd ones fall silent and die
    wait_for(lambda: len(d.call("salvage.list")["agents"]) == workers // 2, what="the silent workers to die")
    tracking = d.call("arbiter.status")["tracking"]
    assert tracking == {"agents": workers // 2, "noteChains": 0, "lockHolders": 0}  # the dead await salvage
    for i, action in zip(range(1, workers, 2), ["claim", "complete", "dismiss"] * workers, strict=False):
        d.call(f"salvage.{action}", id=f"worker-{i}", newAgentId="rescuer")
    assert not [a for a in d.call("agent.list")["agents"] if a["agentId"].startswith("worker-")]
    assert d.call("arbiter.status")["tracking"] == {"agents": 0, "noteChains": 0, "lockHolders": 0}
    rules = {v["rule"] for v in d.call("arbiter.violations", limit=1000)["violations"]}
    assert rules <= {"HEARTBEAT_FRESHNESS"}  # the dying were stale first; no chain or lock false alarm
