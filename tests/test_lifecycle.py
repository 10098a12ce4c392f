"""The agent lifecycle as users meet it through the real daemon, on shrunken thresholds: death, coming back,
salvage, and the sugar commands in the orders a distracted user types them."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from conftest import Daemon, linked_worktree

FAST = {"PORT_DADDY_STALE_AFTER": "1s", "PORT_DADDY_DEAD_AFTER": "2s"}
# Where an agent need stay alive only for one quick step after it registered or came back: deaths in a second.
FASTER = {"PORT_DADDY_STALE_AFTER": "500ms", "PORT_DADDY_DEAD_AFTER": "1s"}


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
    assert "1 agent silent past the heartbeat interval" in status.stdout, status.stdout
    assert "see pd agents" in status.stdout and "invariant" not in status.stdout  # the arbiter's warning is this
    wait_dead(d, "quiet")
    assert "silent past" not in d.pd("status").stdout  # dead now: the salvage warning's turn
    d.call("arbiter.test", name="LOCK_OWNER_VALID")  # a violation proper does call for a look
    assert "1 invariant violation recorded: see pd arbiter violations" in d.pd("status").stdout


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
    d = daemon_factory(**FASTER)
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
    d = daemon_factory(**FASTER)
    wt = linked_worktree(tmp_path, "wt")
    assert d.pd("begin", "build db", "--agent", "ghost", cwd=wt).returncode == 0
    wait_dead(d, "ghost")
    who = d.pd("whoami", cwd=wt)
    assert "Agent:    ghost (dead)" in who.stdout and "pd salvage --all" in who.stderr, (who.stdout, who.stderr)
    heir = d.pd("salvage", "claim", "ghost", "--agent", "heir", cwd=wt)
    assert heir.returncode == 0 and heir.stdout.endswith('Continue with: pd session start "build db"\n'), heir.stdout
    listing = d.pd("salvage", "--all", cwd=wt).stdout
    assert "ghost (claimed by heir," in listing and "1 salvage entry" in listing, listing


def test_salvage_entries_expire_a_month_after_they_last_changed_and_their_dead_agents_leave(daemon_factory) -> None:
    """Salvage entries, and the dead agents nobody salvaged, were kept forever: fleet runs are agents of their
    own, and every crash left one. An entry now goes a month after it last changed, and its dead agent with it;
    the work itself stays in the journal, and the agent may come back as a new one."""
    from portdaddy.config import DEFAULT_SALVAGE_KEEP_MS

    d = daemon_factory(**FASTER)
    sid = d.call("agent.begin", agentId="forgotten", purpose="build db", identity="pay:db")["sessionId"]
    d.call("note.add", sessionId=sid, agentId="forgotten", content="schema half done")
    for agent in ("recent", "handed-over", "settled"):
        d.call("agent.register", agentId=agent)
    for agent in ("forgotten", "recent", "handed-over", "settled"):
        wait_dead(d, agent)
    d.call("salvage.claim", id="handed-over", newAgentId="heir")
    d.call("salvage.complete", id="settled", newAgentId="heir")
    d.stop()
    month_ago = int(time.time() * 1000) - DEFAULT_SALVAGE_KEEP_MS - 60_000
    with sqlite3.connect(d.settings.db) as db:
        db.execute("UPDATE salvage SET changed_at=? WHERE agent_id IN ('forgotten', 'handed-over')", (month_ago,))
    d = daemon_factory()  # the same home, on thresholds nobody reaches during the test
    entries = {e["id"]: e for e in d.call("salvage.list", all=True)["agents"]}
    assert {k: e["status"] for k, e in entries.items()} == {"recent": "pending", "settled": "completed"}
    assert entries["settled"]["completedBy"] == "heir"  # lineage is kept with its entry
    assert [a["id"] for a in d.call("agent.list")["agents"]] == ["recent"]  # dead, awaiting salvage
    assert d.call("daemon.status")["counts"]["agents"] == 1
    assert [n["content"] for n in d.call("note.list", agent="forgotten")["notes"]] == ["schema half done"]
    assert d.call("session.get", sessionId=sid)["session"]["status"] == "abandoned"
    back = d.call("agent.heartbeat", agentId="forgotten")
    assert back["registered"] is True and back["deathNotice"] is None  # a new agent by that name


def test_a_running_daemon_lets_a_salvage_entry_go_when_it_is_due(daemon_factory) -> None:
    """The reaper wakes for an entry's expiry as for a heartbeat deadline. An agent alive again keeps its place
    when the entry of its death expires; a dead one leaves the registry and the arbiter's memory."""
    # Nothing here needs an agent alive before its death: shorter thresholds than FAST.
    d = daemon_factory(PORT_DADDY_STALE_AFTER="300ms", PORT_DADDY_DEAD_AFTER="600ms", PORT_DADDY_SALVAGE_KEEP="2s")
    for agent in ("crashed", "steady"):
        d.call("agent.register", agentId=agent)
    for agent in ("crashed", "steady"):
        wait_dead(d, agent)
    assert d.call("arbiter.status")["tracking"]["agents"] == 2

    def all_expired() -> bool:
        d.call("agent.heartbeat", agentId="steady")  # back, and kept alive: its entry is claimed by itself
        return d.call("salvage.list", all=True)["count"] == 0

    wait_until(all_expired)
    assert [(a["id"], a["liveness"]) for a in d.call("agent.list")["agents"]] == [("steady", "active")]
    assert d.call("arbiter.status")["tracking"]["agents"] == 1
    logged = [e["metadata"] for e in d.call("activity.list", type="salvage.expire")["entries"]]
    assert sorted(a for e in logged for a in e["agentIds"]) == ["crashed", "steady"]
    assert [a for e in logged for a in e["forgotten"]] == ["crashed"]


def test_the_salvage_queue_shows_each_note_as_the_start_of_it_on_one_line(daemon_factory) -> None:
    d = daemon_factory(**FASTER)
    sid = d.call("agent.begin", agentId="wordy", purpose="migrations")["sessionId"]
    d.call("note.add", sessionId=sid, agentId="wordy", content="Tables done.\nNext: " + "refunds " * 30)
    wait_dead(d, "wordy")
    listing = d.pd("salvage").stdout
    [line] = [ln for ln in listing.splitlines() if ln.startswith("    - ")]
    assert line.startswith("    - Tables done. Next: refunds refunds") and line.endswith("…"), listing
    assert len(line) == len("    - ") + 100
