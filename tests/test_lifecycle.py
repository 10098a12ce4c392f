"""The agent lifecycle as users meet it through the real daemon, on shrunken thresholds: death, coming back,
salvage, and the sugar commands in the orders a distracted user types them."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import Daemon, linked_worktree

FAST = {"PORT_DADDY_STALE_AFTER": "1s", "PORT_DADDY_DEAD_AFTER": "2s"}


def wait_until(check: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def wait_dead(d: Daemon, agent_id: str) -> None:
    wait_until(lambda: d.call("agent.get", id=agent_id)["agent"]["liveness"] == "dead")


def test_status_warns_of_a_silent_agent_before_it_is_declared_dead(daemon_factory) -> None:
    d = daemon_factory(**FAST)
    d.call("agent.register", agentId="quiet")
    wait_until(lambda: d.call("agent.get", id="quiet")["agent"]["liveness"] == "stale")
    status = d.pd("status")
    assert "1 agent(s) silent past their heartbeat interval" in status.stdout, status.stdout
    assert "see pd agents" in status.stdout and "invariant" not in status.stdout  # the arbiter's warning is this
    wait_dead(d, "quiet")
    assert "silent past" not in d.pd("status").stdout  # dead now: the salvage warning's turn
    d.call("arbiter.test", name="LOCK_OWNER_VALID")  # a violation proper does call for a look
    assert "1 invariant violation(s) recorded: see pd arbiter violations" in d.pd("status").stdout


def test_a_dead_agent_that_comes_back_takes_its_work_back(daemon_factory) -> None:
    """Declared dead, then heard from again: the salvage queue stops offering its work (pd salvage, sitrep and
    status agree with pd agents), and the agent is told what it lost. If someone took its work over first, it is
    told who, and the work stays theirs."""
    d = daemon_factory(**FAST)
    d.call("agent.begin", agentId="slowpoke", purpose="build db", identity="pay:db", files=["src/db.ts"])
    wait_dead(d, "slowpoke")
    r = d.pd("agent", "heartbeat", "--agent", "slowpoke")
    assert r.returncode == 0, r.stderr
    assert "slowpoke was declared dead" in r.stderr and "its own again" in r.stderr, r.stderr
    assert d.call("agent.get", id="slowpoke")["agent"]["liveness"] == "active"
    assert d.call("salvage.list")["count"] == 0
    [entry] = d.call("salvage.list", all=True)["agents"]
    assert (entry["status"], entry["claimedBy"]) == ("claimed", "slowpoke")
    assert "left work behind" not in d.pd("status").stdout
    assert "0 dead agents awaiting salvage" in d.call("journal.sitrep")["summary"]
    assert d.call("agent.heartbeat", agentId="slowpoke")["deathNotice"] is None  # told once

    d.call("agent.register", agentId="late", identity="pay:api")
    wait_dead(d, "late")
    d.call("salvage.claim", id="late", newAgentId="rescuer")
    notice = d.call("agent.heartbeat", agentId="late")["deathNotice"]
    assert "rescuer took its work over" in notice, notice
    entries = {e["id"]: e for e in d.call("salvage.list", all=True)["agents"]}
    assert entries["late"]["claimedBy"] == "rescuer"


def test_done_after_being_declared_dead_keeps_the_note_and_settles_the_work(daemon_factory, tmp_path: Path) -> None:
    """The agent was declared dead while it worked (its session abandoned); its pd done must not fail: the
    handoff note is kept, the agent leaves, and its own salvage entry is settled (completed, or back to the
    queue when it gives up)."""
    d = daemon_factory(**FAST)
    wt = linked_worktree(tmp_path, "wt")
    assert d.pd("begin", "build db", "--agent", "dbb", "--files", "src/db.ts", cwd=wt).returncode == 0
    wait_dead(d, "dbb")
    r = d.pd("done", "finished anyway", cwd=wt)
    assert r.returncode == 0 and "already abandoned" in r.stderr, r.stderr
    assert not (wt / ".portdaddy" / "current.json").exists()
    assert d.call("agent.list")["count"] == 0 and d.call("salvage.list")["count"] == 0
    [entry] = d.call("salvage.list", all=True)["agents"]
    assert (entry["status"], entry["completedBy"], entry["notes"]) == ("completed", "dbb", ["finished anyway"])

    d.call("agent.begin", agentId="quitter", purpose="give up later")
    wait_dead(d, "quitter")
    d.call("agent.heartbeat", agentId="quitter")  # back, its work its own again
    r = d.pd("done", "--agent", "quitter", "--status", "abandoned", cwd=wt)
    assert r.returncode == 0, r.stderr
    assert [e["id"] for e in d.call("salvage.list")["agents"]] == ["quitter"]  # offered to others again


def test_a_second_done_never_ends_another_agents_session(daemon: Daemon, tmp_path: Path) -> None:
    """Alice's first pd done forgets her; a second one used to end the worktree's latest active session,
    which was bob's, and unregister bob."""
    wt = linked_worktree(tmp_path, "wt")
    assert daemon.pd("begin", "bob work", env={"PORT_DADDY_AGENT": "twice-bob"}, cwd=wt).returncode == 0
    assert daemon.pd("begin", "alice work", "--agent", "twice-alice", cwd=wt).returncode == 0
    assert daemon.pd("done", "all done", cwd=wt).returncode == 0
    again = daemon.pd("done", "all done", cwd=wt)
    assert again.returncode == 1 and "pd done --agent twice-bob" in again.stderr, again.stderr
    assert daemon.call("agent.get", id="twice-bob")["agent"]["liveness"] == "active"
    assert daemon.call("session.get", agentId="twice-bob")["session"]["status"] == "active"


def test_after_a_death_whoami_and_salvage_say_what_is_true(daemon_factory, tmp_path: Path) -> None:
    """pd whoami of a dead agent named it with no hint that anything was wrong; pd salvage --all showed a
    claimed entry without saying who claimed it."""
    d = daemon_factory(**FAST)
    wt = linked_worktree(tmp_path, "wt")
    assert d.pd("begin", "build db", "--agent", "ghost", cwd=wt).returncode == 0
    wait_dead(d, "ghost")
    who = d.pd("whoami", cwd=wt)
    assert "Agent:    ghost (dead)" in who.stdout and "pd salvage --all" in who.stderr, (who.stdout, who.stderr)
    assert d.pd("salvage", "claim", "ghost", "--agent", "heir", cwd=wt).returncode == 0
    listing = d.pd("salvage", "--all", cwd=wt).stdout
    assert "ghost (claimed by heir," in listing and "1 salvage entry" in listing, listing
