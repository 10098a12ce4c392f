"""The journal through the real daemon: durability of notes, sealing at rest, bad input, HTTP, sugar, guard,
the reaper's grace period."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import threading
import time
from pathlib import Path

import apsw
import httpx
import pytest
import trio
from conftest import Daemon, linked_worktree, unix_client

import portdaddy
from portdaddy.errors import BadInput, Conflict, NotFound, PDError


def test_the_activity_log_is_written_within_a_second_of_each_burst_without_a_read(fresh_daemon: Daemon) -> None:
    """Rows are batched, not held until someone reads the log: the store has a change's row about a second
    later (what a SIGKILL would find), for the first burst and for one after a batch was written."""
    d = fresh_daemon

    def stored(kind: str) -> bool:  # the store itself, so that no read of the daemon's writes the batch first
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with apsw.Connection(str(d.settings.db), flags=apsw.SQLITE_OPEN_READONLY) as db:
                if db.execute("SELECT count(*) FROM activity WHERE type = ?", (kind,)).fetchone()[0]:
                    return True
            time.sleep(0.1)
        return False

    token = d.call("lock.acquire", name="activity:batched", owner="batcher")["token"]
    assert stored("lock.acquire")
    d.call("lock.release", name="activity:batched", token=token)
    assert stored("lock.release")


def test_sigkill_after_acknowledged_notes_loses_nothing(fresh_daemon: Daemon) -> None:
    d = fresh_daemon
    sid = d.call("session.start", purpose="durable", agentId="scribe")["id"]
    texts = [f"note {i}: {'x' * (i % 7)}." for i in range(60)]
    with d.client("scribe") as c:
        for t in texts:
            c.request("note.add", {"sessionId": sid, "content": t, "type": "progress"})
    d.kill9()
    d.start()
    notes = d.call("note.list", sessionId=sid, limit=100)["notes"]
    assert [n["content"] for n in reversed(notes)] == texts
    assert [n["seq"] for n in reversed(notes)] == list(range(1, 61))
    assert d.call("note.verify")["valid"]
    assert d.call("session.get", sessionId=sid)["session"]["noteCount"] == 60
    with apsw.Connection(str(d.settings.db)) as db:
        assert db.pragma("integrity_check") == "ok"


def test_raw_database_shows_no_note_plaintext(fresh_daemon: Daemon) -> None:
    d = fresh_daemon
    secret = "the staging password is hunter2-correct-horse"
    sid = d.call("session.start", purpose="secrets", agentId="sealer")["id"]
    d.call("note.add", sessionId=sid, content=secret)
    assert d.call("note.list", sessionId=sid)["notes"][0]["content"] == secret  # plaintext through the daemon
    key = d.settings.master_key
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) == 32
    with apsw.Connection(str(d.settings.db), flags=apsw.SQLITE_OPEN_READONLY) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for row in db.execute(f"SELECT * FROM {table}"):
                for value in row:
                    raw = value if isinstance(value, bytes) else str(value).encode()
                    assert b"hunter2" not in raw, (table, row)
    for path in d.settings.home.iterdir():
        if path.name.startswith("portdaddy.db"):
            assert b"hunter2" not in path.read_bytes(), path


@pytest.mark.parametrize("args, fragment", [
    (("session", "start", ""), "purpose must not be empty"),
    (("session", "start", "   "), "purpose must not be empty"),
    (("session", "start", "x", "--files", "../outside.ts"), "leaves the worktree"),
    (("session", "start", "x", "--files", "/etc/passwd"), "absolute"),
    (("note", "", "--session", "session-000000000000"), "content must not be empty"),
    (("note", "x" * 20_000, "--session", "session-000000000000"), "the limit is 16000"),
    (("note", "hello", "--type", "Not A Type", "--session", "session-000000000000"), "short lowercase word"),
    (("agent", "register", "--agent", "bad agent"), "agent id"),
    (("agent", "register", "--agent", "ok", "--identity", "a::b"), "empty segment"),
    (("notes", "--since", "yesterday"), "not a duration"),
])  # fmt: skip
def test_bad_input_exits_2_with_one_line_and_changes_nothing(daemon: Daemon, args, fragment) -> None:
    before = daemon.call("daemon.status")["counts"]
    r = daemon.pd(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1 and fragment in r.stderr
    after = daemon.call("daemon.status")["counts"]
    assert {k: after[k] for k in ("agents", "sessionsActive", "notes")} == \
        {k: before[k] for k in ("agents", "sessionsActive", "notes")}  # fmt: skip


def test_a_one_megabyte_note_is_refused_with_its_limit(daemon: Daemon) -> None:
    sid = daemon.call("session.start", purpose="big notes")["id"]
    r = daemon.pd("note", "-", "--session", sid, input="y" * 1_000_000)
    assert r.returncode == 2 and "limit" in r.stderr, r.stderr
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.settings.http_sock)), base_url="http://pd") as h:
        big = h.post(f"/sessions/{sid}/notes", json={"content": "y" * 1_000_000})
        assert big.status_code == 413 and big.json()["code"] == "PAYLOAD_TOO_LARGE"
        over = h.post(f"/sessions/{sid}/notes", json={"content": "y" * 16_001})
        assert over.status_code == 413 and "the limit is 16000" in over.json()["error"]
    assert daemon.call("session.get", sessionId=sid)["session"]["noteCount"] == 0


def test_unknown_session_and_no_session(daemon: Daemon, tmp_path: Path) -> None:
    r = daemon.pd("note", "hello", "--session", "session-doesnotexist")
    assert r.returncode == 1 and "session session-doesnotexist does not exist" in r.stderr
    nobody = linked_worktree(tmp_path, "nobody")
    r = daemon.pd("note", "hello", cwd=nobody)
    assert r.returncode == 1 and f"no active session in {nobody};" in r.stderr and "pd session start" in r.stderr
    r = daemon.pd("session", "show", cwd=nobody)
    assert r.returncode == 1 and "no active session in" in r.stderr
    assert daemon.pd("session", "end", "--session", "session-doesnotexist").returncode == 1


def test_heartbeat_for_an_unknown_agent_registers_it(daemon: Daemon) -> None:
    r = daemon.pd("agent", "heartbeat", "--agent", "newcomer", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["registered"] is True
    assert daemon.call("agent.get", id="newcomer")["agent"]["liveness"] == "active"
    with daemon.client("newcomer") as c:  # fire-and-forget heartbeats are accepted and applied
        before = daemon.call("agent.get", id="newcomer")["agent"]["lastHeartbeat"]
        time.sleep(0.01)
        c.send("agent.heartbeat")
        deadline = time.monotonic() + 5
        while daemon.call("agent.get", id="newcomer")["agent"]["lastHeartbeat"] == before:
            assert time.monotonic() < deadline
            time.sleep(0.02)


def test_begin_whoami_done_through_the_cli(daemon: Daemon, tmp_path: Path) -> None:
    tree = linked_worktree(tmp_path, "sugar")
    r = daemon.pd("begin", "Refactor auth", "--identity", "sugar:api", "--files", "src/auth.ts", "-q", cwd=tree)
    assert r.returncode == 0, r.stderr
    agent = r.stdout.strip()
    assert agent.startswith("agent-")
    current = json.loads((tree / ".portdaddy" / "current.json").read_text())
    assert current["agentId"] == agent and current["sessionId"].startswith("session-")
    assert daemon.pd("note", "JWT refresh done", "--type", "progress", cwd=tree).returncode == 0
    who = daemon.pd("whoami", cwd=tree).stdout
    assert f"Agent:    {agent}" in who and "Purpose:  Refactor auth" in who and "Files:    src/auth.ts" in who
    assert "Notes:    1" in who and re.search(r"^Duration: \d+s$", who, re.M), who
    clash = daemon.pd("begin", "Also auth", "--files", "src/*", cwd=linked_worktree(tmp_path, "other"))
    assert clash.returncode == 1 and "Use --force to claim anyway" in clash.stderr
    done = daemon.pd("done", "Auth refactor complete", "--json", cwd=tree)
    body = json.loads(done.stdout)
    assert (body["sessionStatus"], body["agentUnregistered"], body["notesCount"]) == ("completed", True, 2)
    assert not (tree / ".portdaddy" / "current.json").exists()
    assert "No active session" in daemon.pd("whoami", cwd=tree).stdout
    notes = daemon.call("note.list", sessionId=current["sessionId"])["notes"]
    assert (notes[0]["type"], notes[0]["content"]) == ("handoff", "Auth refactor complete")
    assert daemon.call("file.owners", path="src/auth.ts")["claimed"] is False
    log = daemon.pd("log", "--agent", agent, "--json").stdout
    assert {"agent.register", "session.start", "note.add", "session.end", "agent.unregister"} <= \
        {e["type"] for e in json.loads(log)["entries"]}  # fmt: skip


def test_agents_sharing_a_worktree_each_act_on_their_own_session(daemon: Daemon, tmp_path: Path) -> None:
    """One current.json per worktree, several agents told apart by PORT_DADDY_AGENT: the file holds whoever
    wrote it last, and nobody else's note, session end or done may land on that session."""
    tree = linked_worktree(tmp_path, "shared")

    def pd(agent: str, *args: str) -> subprocess.CompletedProcess[str]:
        r = daemon.pd(*args, cwd=tree, env={"PORT_DADDY_AGENT": agent})
        assert r.returncode == 0, r.stderr
        return r

    alice = json.loads(pd("alice", "begin", "Alice work", "--files", "a.ts", "--json").stdout)["sessionId"]
    bob_started = pd("bob", "session", "start", "Bob work", "--files", "b.ts", "-q")
    bob = bob_started.stdout.strip()
    assert json.loads((tree / ".portdaddy" / "current.json").read_text())["agentId"] == "bob"
    assert bob_started.stderr == ""  # alice is named by her PORT_DADDY_AGENT: nothing of hers was taken over
    assert f"to session {alice}" in pd("alice", "note", "from alice").stdout
    assert json.loads(pd("alice", "session", "show", "--json").stdout)["session"]["id"] == alice
    assert "Agent:    alice" in pd("alice", "whoami").stdout
    done = json.loads(pd("alice", "done", "alice finished", "--json").stdout)
    assert (done["agentId"], done["sessionId"]) == ("alice", alice)
    assert daemon.call("session.get", sessionId=bob)["session"]["status"] == "active"
    assert daemon.call("file.owners", path="b.ts")["claimed"] is True
    assert json.loads((tree / ".portdaddy" / "current.json").read_text())["sessionId"] == bob  # bob's, kept
    assert f"to session {bob}" in pd("bob", "note", "from bob").stdout
    # Registering another agent here does not hand it bob's session.
    pd("carol", "agent", "register", "--agent", "carol")
    assert "sessionId" not in json.loads((tree / ".portdaddy" / "current.json").read_text())
    assert f"to session {bob}" in pd("bob", "note", "bob again").stdout


def test_a_worktree_says_when_it_stops_using_someone_elses_session(daemon: Daemon, tmp_path: Path) -> None:
    """The tutorial's agents share one repo without ids: the second session start takes the worktree over."""
    tree = linked_worktree(tmp_path, "shared")
    first = daemon.pd("session", "start", "Building checkout UI", "-q", cwd=tree).stdout.strip()
    second = daemon.pd("session", "start", "Building payment API", cwd=tree)
    assert f"Warning: this worktree's current session was {first} (Building checkout UI);" in second.stderr
    assert "give each its own PORT_DADDY_AGENT" in second.stderr
    note = daemon.pd("note", "Built CheckoutForm component", cwd=tree)  # agent 1's note, in agent 2's session:
    assert note.stdout.endswith("(Building payment API)\n"), note.stdout  # the reply names where it went
    registered = daemon.pd("agent", "register", "--agent", "shared-frontend", cwd=tree)
    assert "current session was session-" in registered.stderr and "(Building payment API)" in registered.stderr
    for purpose in ("Own work", "More own work"):  # an agent's own next session is no one else's business
        own = daemon.pd("session", "start", purpose, cwd=tree)
        assert own.returncode == 0 and own.stderr == "", own.stderr
    # The environment outranks what a worktree remembers: an --agent that it overrides is said to be so.
    other = linked_worktree(tmp_path, "env")
    begun = daemon.pd("begin", "Finish the schema", "--agent", "db-2", cwd=other, env={"PORT_DADDY_AGENT": "backend"})
    assert "Warning: PORT_DADDY_AGENT=backend is set, so later pd commands here act as that agent, not db-2" in (
        begun.stderr)  # fmt: skip
    plain = daemon.pd("begin", "Same agent", cwd=linked_worktree(tmp_path, "env2"), env={"PORT_DADDY_AGENT": "backend"})
    assert plain.returncode == 0 and "Warning" not in plain.stderr, plain.stderr


def test_begin_again_without_done_says_the_earlier_session_is_still_active(daemon: Daemon, tmp_path: Path) -> None:
    tree = linked_worktree(tmp_path, "twice")
    daemon.pd("begin", "task A", "--files", "a.ts", cwd=tree)
    again = daemon.pd("begin", "task B", "--files", "b.ts", cwd=tree)
    first = daemon.call("file.owners", path="a.ts")["owners"][0]["sessionId"]
    assert again.returncode == 0 and f"still has session {first} (task A) active, claiming 1 file" in again.stderr
    assert f"pd session end --session {first}" in again.stderr
    assert daemon.pd("session", "end", "--session", first, cwd=tree).returncode == 0
    third = daemon.pd("begin", "task C", cwd=tree).stderr
    assert "(task B) active" in third and "(task A)" not in third  # an ended session is not named
    daemon.pd("done", cwd=tree)


def test_an_agent_is_not_in_conflict_with_its_own_earlier_session(daemon: Daemon, tmp_path: Path) -> None:
    """A conflict warns other agents. An agent that starts a second session on files its first still claims is
    told so plainly and gets them, by every door (session start, a claim, begin); another agent is still refused."""
    tree = linked_worktree(tmp_path, "own")

    def pd(agent: str, *args: str) -> subprocess.CompletedProcess[str]:
        return daemon.pd(*args, cwd=tree, env={"PORT_DADDY_AGENT": agent})

    first = pd("alice", "session", "start", "first pass", "--files", "src/pay.ts", "-q").stdout.strip()
    second = pd("alice", "session", "start", "second pass", "--files", "src/*", "--json")
    assert second.returncode == 0, second.stderr
    reply = json.loads(second.stdout)
    assert reply["conflicts"] == [] and [c["sessionId"] for c in reply["ownClaims"]] == [first]
    again = pd("alice", "session", "files", "claim", "src/pay.ts", "--session", reply["id"])
    assert again.returncode == 0, again.stderr
    assert f"src/pay.ts is also claimed by alice's session {first} (first pass)" in again.stderr
    assert "--force" not in again.stderr
    begun = pd("alice", "begin", "third pass", "--files", "src/pay.ts")
    assert begun.returncode == 0 and f"still has session {first} (first pass) active" in begun.stderr
    claims = daemon.call("file.list", path="src/pay.ts", worktree=str(tree))["claims"]
    assert len(claims) == 4 and not any(c["forced"] for c in claims)  # src/pay.ts twice, src/* once, begin's
    other = pd("bob", "session", "start", "bob's pass", "--files", "src/pay.ts")
    assert other.returncode == 1 and f"claimed by {first} (alice: first pass)" in other.stderr
    assert "Use --force to claim anyway" in other.stderr
    for sid in (first, reply["id"]):
        daemon.call("session.end", sessionId=sid)
    assert pd("alice", "done").returncode == 0


def test_sitrep_files_who_owns(daemon: Daemon, tmp_path: Path) -> None:
    tree = linked_worktree(tmp_path, "sit")
    daemon.pd("agent", "register", "--agent", "sitter", "--identity", "sit:web", cwd=tree)
    daemon.pd("session", "start", "Sit UI", "--files", "web/components/*", cwd=tree)
    daemon.pd("note", "buttons done", cwd=tree)
    rep = daemon.pd("sitrep", "--since", "5m", "--project", "sit")
    assert rep.returncode == 0 and "[sitter] buttons done" in rep.stdout and "web/components/*" in rep.stdout
    lone = daemon.pd("session", "start", "Nobody's work", "-q", cwd=linked_worktree(tmp_path, "lone")).stdout.strip()
    assert f"active    {lone} Nobody's work\n" in daemon.pd("sitrep", "--since", "5m").stdout  # no agent, no "-:"
    owners = daemon.pd("who-owns", "web/components/Button.tsx", cwd=tree)
    assert "claimed by 1 session" in owners.stdout and "sitter: Sit UI" in owners.stdout
    assert daemon.pd("who-owns", "web/components/Button.tsx", "-q").stdout.strip() == "unclaimed"  # another repo
    assert daemon.pd("who-owns", "web/pages/x.ts", "-q", cwd=tree).stdout.strip() == "unclaimed"
    assert "web/components/*" in daemon.pd("files", "web", cwd=tree).stdout
    released = daemon.pd("session", "files", "release", "web/components/*", cwd=tree)
    unclaimed = daemon.pd("who-owns", "web/components/a", "-q", cwd=tree).stdout.strip()
    assert released.returncode == 0 and unclaimed == "unclaimed"


def test_counts_pd_prints_agree_with_their_nouns(fresh_daemon: Daemon, tmp_path: Path) -> None:
    """pd printed "1 notes", "1 active sessions", "1 file(s)": every count it prints has its noun in the right
    number for 0, 1 and many. The sitrep's wire summary keeps the original's wording; pd writes its own."""
    d = fresh_daemon
    tree = linked_worktree(tmp_path, "count")
    d.pd("begin", "Counting", "--agent", "counter", "--files", "a.py", cwd=tree)
    d.pd("note", "the first", cwd=tree)
    first = d.pd("sitrep").stdout.splitlines()[0]
    assert re.fullmatch(r"Last 30m: \d+ events, 1 note, 1 active session, 0 dead agents awaiting salvage, "
                        r"1 file claimed", first), first  # fmt: skip
    assert ", 1 notes, 1 active sessions, " in d.call("journal.sitrep")["summary"]
    counts = d.pd("status").stdout
    assert "1 note," in counts and "1 active session," in counts and "1 agent," in counts, counts
    assert d.pd("notes", "--verify").stdout.strip() == "Note chain intact: 1 note in 1 session"
    assert d.pd("session", "files", "claim", "b.py", "c.py", cwd=tree).stdout.strip().startswith("Claimed 2 paths ")
    assert d.pd("session", "files", "release", "a.py", cwd=tree).stdout.strip() == "Released 1 path"
    d.pd("note", "the second", cwd=tree)
    d.pd("session", "start", "Another", "--agent", "counter", cwd=tree)
    again = d.pd("sitrep").stdout.splitlines()[0]
    assert ", 2 notes, 2 active sessions, 0 dead agents awaiting salvage, 2 files claimed" in again, again
    assert "2 notes," in d.pd("status").stdout
    assert d.pd("who-owns", "zzz.py", cwd=tree).stdout.strip() == "zzz.py: claimed by 0 sessions"


def test_sitrep_counts_what_happened_not_what_fits_in_its_lists(fresh_daemon: Daemon) -> None:
    """The counts (and the summary line pd prints) were the lengths of lists cut at --limit: "20 notes" when
    there were 25."""
    d = fresh_daemon
    sid = d.call("session.start", purpose="Busy", agentId="busy")["id"]
    for n in range(25):
        d.call("note.add", sessionId=sid, content=f"note {n}")
    for n in range(3):
        d.call("session.start", purpose=f"Still on it {n}", agentId=f"steady-{n}")
    for n in range(501):  # sessions ended since, more than the daemon ever lists at once
        ended = d.call("session.start", purpose=f"Quick {n}", agentId="quick")["id"]
        d.call("session.end", sessionId=ended, status="completed")
    rep = d.call("journal.sitrep", limit=4)
    assert (len(rep["sessions"]), rep["counts"]["activeSessions"]) == (4, 4)
    rep = d.call("journal.sitrep", limit=20)
    assert (len(rep["notes"]), rep["counts"]["notes"]) == (20, 25)
    assert len(rep["activity"]) == 20 and rep["counts"]["events"] >= 26  # the session and its notes, at least
    assert re.match(r"Last 30m: [\d,]+ events, 25 notes, 4 active sessions", d.pd("sitrep").stdout)


def test_claims_are_listed_with_their_sessions_in_a_column(daemon: Daemon, tmp_path: Path) -> None:
    tree = linked_worktree(tmp_path, "column")
    daemon.pd("begin", "Columns", "--agent", "columnist", "--files", "a.py", "src/api/payments/*", cwd=tree)
    lines = daemon.pd("files", cwd=tree).stdout.splitlines()
    assert len(lines) == 2 and len({line.index("session-") for line in lines}) == 1, lines
    daemon.pd("done", cwd=tree)


HUGE_AGO = "100000000d"  # 270,000 years back, before the epoch


def test_since_0_is_the_beginning_in_every_command(daemon: Daemon, tmp_path: Path) -> None:
    """A bare number was "milliseconds ago" for most sinces, so `pd sitrep --since 0` showed nothing (from
    now). Every since is one grammar: a bare number is a time in epoch ms (0 is the beginning), a duration with
    its unit is that long ago."""
    tree = linked_worktree(tmp_path, "zero")
    agent = daemon.pd("begin", "From the start", "--identity", "zero:api", "-q", cwd=tree).stdout.strip()
    daemon.pd("note", "at the start", cwd=tree)
    daemon.call("inbox.send", agentId="zero-agent", content="hello")
    daemon.call("arbiter.test", name="LOCK_OWNER_VALID")
    later = str(int(time.time() * 1000) + 3_600_000)  # a time to come: nothing yet
    commands = [(("notes", "--project", "zero"), "count"), (("log", "--agent", agent), "count"),
                (("inbox", "--agent", "zero-agent"), "count"), (("arbiter", "violations"), "total")]  # fmt: skip
    for args, counted in commands:
        shown = {since: json.loads(daemon.pd(*args, "--since", since, "--json").stdout)[counted]
                 for since in ("0", "1h", later)}  # fmt: skip
        everything = json.loads(daemon.pd(*args, "--json").stdout)[counted]
        assert shown == {"0": everything, "1h": everything, later: 0} and everything >= 1, args
    sitrep = json.loads(daemon.pd("sitrep", "--since", "0", "--project", "zero", "--json").stdout)
    assert sitrep["since_ms"] == 0 and sitrep["summary"].startswith("Since the beginning: ")
    assert [n["content"] for n in sitrep["notes"]] == ["at the start"]
    assert "epoch ms (0: from the beginning)" in daemon.pd("sitrep", "--help").stdout
    with unix_client(daemon) as c:
        assert c.get("/activity/summary", params={"since": "0"}).json()["total"] == \
            daemon.call("activity.summary")["total"]  # fmt: skip
        assert c.get("/notes", params={"since": "0", "project": "zero"}).json()["count"] == 1
        assert c.get("/notes", params={"since": "5"}).status_code == 400
    # A bare number that cannot be a time anyone means (5 ms after 1970) is a unit left out: said so, exit 2.
    for args, _ in commands:
        five = daemon.pd(*args, "--since", "5")
        assert five.returncode == 2 and five.stderr.startswith("error: since 5 ") and five.stdout == "", five
        assert "did you mean 5m?" in five.stderr and len(five.stderr.splitlines()) == 1, five.stderr
    daemon.pd("done", cwd=tree)


def test_a_look_back_past_the_epoch_reaches_the_epoch(daemon: Daemon, tmp_path: Path) -> None:
    """Every `since` that is a duration back from now: one longer than the time since 1970 asks for everything,
    and says so with `since` 0, not with a time before the epoch (a negative since_ms, before)."""
    tree = linked_worktree(tmp_path, "ago")
    daemon.pd("begin", "Look back", "--identity", "ago:api", cwd=tree)
    daemon.pd("note", "long ago", cwd=tree)
    summary = daemon.call("activity.summary", since=HUGE_AGO)
    assert summary["since"] == 0 and summary["total"] == daemon.call("activity.summary")["total"] > 0
    sitrep = daemon.call("journal.sitrep", since=HUGE_AGO, project="ago")
    assert sitrep["since_ms"] == 0 and sitrep["since_minutes"] > 29_000_000  # minutes since 1970
    assert "long ago" in [n["content"] for n in daemon.call("note.list", since=HUGE_AGO, project="ago")["notes"]]
    log = daemon.pd("log", "--since", HUGE_AGO, "--type", "note.*", "--json")
    assert log.returncode == 0 and json.loads(log.stdout)["count"] >= 1
    with unix_client(daemon) as c:
        assert c.get("/activity/summary", params={"since": "100000000d"}).json()["since"] == 0
        r = c.get("/arbiter/violations", params={"since": "100000000d"})
        assert r.status_code == 200 and r.json()["total"] == daemon.call("arbiter.violations")["total"]
    daemon.pd("done", cwd=tree)


def test_done_after_the_session_ended_still_lets_the_agent_go(daemon: Daemon, tmp_path: Path) -> None:
    tree = linked_worktree(tmp_path, "ended")
    agent = daemon.pd("begin", "Short job", "-q", cwd=tree).stdout.strip()
    assert daemon.pd("session", "end", cwd=tree).returncode == 0
    between = daemon.pd("whoami", cwd=tree)  # it said "Use pd begin to start", as if nobody were here
    assert between.returncode == 0 and between.stdout == (
        f'Agent:    {agent}\nSession:  none; start one with pd session start "what you are doing"\n')  # fmt: skip
    done = daemon.pd("done", "late note", cwd=tree)
    assert done.returncode == 0 and "No active session to end (the note was not kept)" in done.stderr
    assert f"Agent {agent} unregistered" in done.stderr
    assert agent not in [a["id"] for a in daemon.call("agent.list")["agents"]]
    again = daemon.pd("done", cwd=tree)
    assert again.returncode == 1 and "no active session" in again.stderr  # nothing left to end or let go
    assert daemon.pd("whoami", "-q", cwd=tree).stdout == ""


def test_the_worktrees_agent_speaks_on_channels(daemon: Daemon, tmp_path: Path) -> None:
    tree = linked_worktree(tmp_path, "speaker")
    agent = daemon.pd("begin", "Announce things", "-q", cwd=tree).stdout.strip()
    published = json.loads(daemon.pd("pub", "speaker:news", "hi", "--json", cwd=tree).stdout)
    assert daemon.call("msg.history", channel="speaker:news")["messages"][0]["sender"] == agent
    assert published["success"] is True
    assert daemon.pd("done", cwd=tree).returncode == 0


def test_paths_are_typed_relative_to_where_you_stand(daemon: Daemon, tmp_path: Path) -> None:
    """Claims are repo-relative; pd turns paths typed in a subdirectory, or absolute inside the worktree, into
    them (who-owns auth.ts inside src/ said 'unclaimed' about src/auth.ts)."""
    tree = linked_worktree(tmp_path, "rel")
    (tree / "src").mkdir()
    env = {"PORT_DADDY_AGENT": "relative"}
    daemon.pd("begin", "Relative paths", "--files", "src/auth.ts", cwd=tree, env=env)
    src = tree / "src"
    for typed in ("auth.ts", "../src/auth.ts", str(src / "auth.ts")):
        assert daemon.pd("who-owns", typed, "-q", cwd=src).stdout.strip() == "claimed", typed
    assert daemon.pd("who-owns", "other.ts", "-q", cwd=src).stdout.strip() == "unclaimed"
    assert daemon.pd("session", "files", "claim", "api/", cwd=src, env=env).returncode == 0
    assert "src/api/**" in daemon.pd("files", "src", cwd=tree).stdout
    outside = daemon.pd("who-owns", "../../elsewhere.ts", cwd=src)
    assert outside.returncode == 2 and "leaves the worktree" in outside.stderr
    assert daemon.pd("done", cwd=tree, env=env).returncode == 0  # the module's daemon: give src/ back


def _git(tree: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**(env or os.environ), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    return subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True, env=env)


@pytest.mark.parametrize("mode, blocked", [("advisory", False), ("warn", False), ("enforce", True)])
def test_guard_checks_staged_files_against_other_sessions(daemon: Daemon, tmp_path: Path, mode: str,
                                                          blocked: bool) -> None:  # fmt: skip
    repo = tmp_path / "repo"
    repo.mkdir()
    assert _git(repo, "init", "-q").returncode == 0
    (repo / "src").mkdir()
    (repo / "src" / "auth.ts").write_text("x\n")
    (repo / "README").write_text("r\n")
    holder = daemon.call("session.start", purpose=f"guard {mode}", agentId=f"holder-{mode}", files=["src/*"])["id"]
    r = daemon.pd("guard", "install", "--mode", mode, cwd=repo)
    assert r.returncode == 0 and (repo / ".git" / "hooks" / "pre-commit").exists(), r.stderr
    _git(repo, "add", "README")
    ok = _git(repo, "commit", "-qm", "unclaimed file", env=daemon.env)
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    _git(repo, "add", "src/auth.ts")
    commit = _git(repo, "commit", "-qm", "claimed file", env=daemon.env)
    assert (commit.returncode != 0) == blocked, commit.stderr
    if mode == "advisory":
        assert "pd guard: 1 file is claimed by other sessions" in commit.stderr
    else:
        assert "Warning: src/auth.ts overlaps src/*, claimed by session-" in commit.stderr
    as_json = daemon.pd("guard", "check", "src/auth.ts", "--mode", mode, "--json", cwd=repo)
    assert (as_json.returncode, json.loads(as_json.stdout)["success"]) == ((1, False) if blocked else (0, True))
    daemon.call("session.end", sessionId=holder)


def test_claims_meet_only_claims_of_the_same_repository(daemon: Daemon, tmp_path: Path) -> None:
    """`src/index.ts` in two unrelated projects is two files; in two worktrees of one repository it is one."""
    shop, blog = tmp_path / "shop", tmp_path / "blog"
    for repo in (shop, blog):
        repo.mkdir()
        _git(repo, "init", "-q")
        (repo / "src").mkdir()
        (repo / "src" / "index.ts").write_text("x\n")
        _git(repo, "add", ".")
        _git(repo, "commit", "-qm", "first")
    twin = tmp_path / "shop-twin"
    assert _git(shop, "worktree", "add", "-q", str(twin)).returncode == 0
    agents = {tree: {"PORT_DADDY_AGENT": f"repo-{tree.name}"} for tree in (shop, blog, twin)}
    r = daemon.pd("begin", "shop checkout", "--files", "src/index.ts", cwd=shop, env=agents[shop])
    assert r.returncode == 0, r.stderr
    try:
        r = daemon.pd("begin", "blog layout", "--files", "src/index.ts", cwd=blog, env=agents[blog])
        assert r.returncode == 0 and "Warning" not in r.stderr + r.stdout, r.stderr
        assert daemon.pd("who-owns", "src/index.ts", "--json", cwd=blog).stdout.count("shop checkout") == 0
        twin_claim = daemon.pd("begin", "shop refactor", "--files", "src/*", cwd=twin, env=agents[twin])
        assert twin_claim.returncode == 1 and "shop checkout" in twin_claim.stderr  # the blog's claim is not named
        assert "blog layout" not in twin_claim.stderr
        check = daemon.pd("guard", "check", "src/index.ts", "--mode", "enforce", "--json", cwd=twin)
        assert [c["purpose"] for c in json.loads(check.stdout)["conflicts"]] == ["shop checkout"]
        owners = json.loads(daemon.pd("who-owns", "src/index.ts", "--json", cwd=blog).stdout)["owners"]
        assert [o["purpose"] for o in owners] == ["blog layout"]
    finally:
        for tree in (shop, blog):
            daemon.pd("done", cwd=tree, env=agents[tree])


def test_guard_install_keeps_a_foreign_hook(daemon: Daemon, tmp_path: Path) -> None:
    repo = tmp_path / "foreign"
    repo.mkdir()
    _git(repo, "init", "-q")
    hook = repo / ".git" / "hooks" / "pre-commit"
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text("#!/bin/sh\necho mine\n")
    r = daemon.pd("guard", "install", cwd=repo)
    assert r.returncode == 1 and "--force" in r.stderr and hook.read_text() == "#!/bin/sh\necho mine\n"


def test_http_routes(daemon: Daemon) -> None:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.settings.http_sock)), base_url="http://pd") as h:
        r = h.post("/agents", json={"agentId": "http-a", "identity": "http:api"}, headers={"X-PID": "1"})
        assert r.json()["registered"] is True
        assert h.post("/agents/http-a/heartbeat").json()["message"] == "heartbeat recorded"
        assert h.get("/agents/http-a").json()["agent"]["identity"] == "http:api"
        s = h.post("/sessions", json={"purpose": "HTTP work", "agentId": "http-a", "files": ["http/a.ts"]}).json()
        clash = h.post("/sessions", json={"purpose": "other", "files": ["http/*"]})
        assert clash.status_code == 409 and clash.json()["code"] == "FILE_CONFLICT"
        assert clash.json()["conflicts"][0]["sessionId"] == s["id"] and "force" in clash.json()["hint"]
        assert h.post(f"/sessions/{s['id']}/notes", json={"content": "from http"}).json()["seq"] == 1
        quick = h.post("/notes", json={"content": "quick"}, headers={"X-Agent-Id": "http-a"}).json()
        assert quick["sessionId"] == s["id"]
        assert [n["content"] for n in h.get(f"/sessions/{s['id']}/notes").json()["notes"]] == ["quick", "from http"]
        assert h.get("/files/who-owns", params={"path": "http/a.ts"}).json()["claimed"] is True
        assert h.get("/notes/verify").json()["valid"] is True
        assert h.get("/sessions/nope").status_code == 404
        for path in ("/sessions/session-typo/notes", "/notes?sessionId=session-typo"):  # not "no notes"
            r = h.get(path)
            assert r.status_code == 404 and r.json()["code"] == "SESSION_NOT_FOUND", (path, r.text)
        ended = h.put(f"/sessions/{s['id']}", json={"note": "bye"}).json()
        assert ended["releasedFiles"] == ["http/a.ts"]
        begun = h.post("/sugar/begin", json={"purpose": "sugar over http", "agentId": "http-b"}).json()
        assert h.get("/sugar/whoami", params={"agentId": "http-b"}).json()["sessionId"] == begun["sessionId"]
        assert h.post("/sugar/done", json={"agentId": "http-b"}).json()["agentUnregistered"] is True
        assert h.delete("/agents/http-a").json()["unregistered"] is True
        assert h.get("/activity", params={"agent": "http-b"}).json()["count"] >= 3
        assert "summary" in h.get("/sitrep").json() and h.get("/salvage/pending").json()["count"] >= 0


async def test_sdk_heartbeats_in_the_background(daemon: Daemon) -> None:
    async with portdaddy.connect(agent_id="sdk-agent", settings=daemon.settings, autostart=False) as pd:
        await pd.register_agent(identity="sdk:worker", purpose="sdk test")
        first = (await pd.call("agent.get", id="sdk-agent"))["agent"]["lastHeartbeat"]
        scope = pd.start_heartbeat(0.05)
        with trio.fail_after(5):
            while (await pd.call("agent.get", id="sdk-agent"))["agent"]["lastHeartbeat"] == first:
                await trio.sleep(0.05)
        scope.cancel()
        before = (await pd.status())["counts"]["agentHeartbeats"]
        for _ in range(3):
            pd.heartbeat()  # the same pre-encoded frame each time: every one still counts
        assert (await pd.status())["counts"]["agentHeartbeats"] == before + 3
        sid = await pd.start_session("sdk session", files=["sdk/*"])
        assert await pd.note("from the sdk") > 0
        assert (await pd.notes(session_id=sid))[0]["content"] == "from the sdk"
        async with portdaddy.connect(agent_id="sdk-other", settings=daemon.settings, autostart=False) as other:
            with pytest.raises(Conflict):  # another agent's claim; this agent's own are no conflict to it
                await other.start_session("clash", files=["sdk/x.py"])
        with pytest.raises(BadInput):
            await pd.note("")
        with pytest.raises(NotFound):
            await pd.note("x", session_id="session-unknown")
        result = await pd.done("sdk done")
        assert result["agentUnregistered"] and result["sessionId"] == sid


def test_grace_after_restart_then_death(daemon_factory) -> None:
    d = daemon_factory(PORT_DADDY_STALE_AFTER="2s", PORT_DADDY_DEAD_AFTER="3s")
    d.call("agent.register", agentId="sleeper", identity="grace:x")
    d.stop()
    time.sleep(3.5)  # silent past the dead threshold, but the daemon was not there to hear it
    d.start()
    assert d.call("agent.get", id="sleeper")["agent"]["liveness"] == "active"
    deadline = time.monotonic() + 15
    while d.call("agent.get", id="sleeper")["agent"]["liveness"] != "dead":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert d.call("salvage.list", project="grace")["count"] == 1


def test_an_agents_quotas_bound_its_locks_and_services(daemon: Daemon) -> None:
    """A registered agent holds, or waits for, at most ``maxLocks`` locks and claims at most ``maxServices``
    services (20 and 50 unless it registered others). Over the limit: exit 1, HTTP 429, and nothing changes."""
    r = daemon.pd("agent", "register", "--agent", "quota-a", "--max-locks", "2", "--max-services", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert (json.loads(r.stdout)["agent"]["maxLocks"], json.loads(r.stdout)["agent"]["maxServices"]) == (2, 1)
    for name in ("quota:one", "quota:two"):
        assert daemon.pd("lock", name, "--owner", "quota-a").returncode == 0
    over = daemon.pd("lock", "quota:three", "--owner", "quota-a")
    assert over.returncode == 1 and "--max-locks" in over.stderr, over.stderr
    assert daemon.call("lock.get", name="quota:three")["held"] is False
    assert daemon.pd("lock", "quota:one", "--owner", "quota-a").returncode == 0  # re-acquiring is not a new lock
    assert daemon.pd("lock", "quota:free", "--owner", "not-an-agent").returncode == 0  # only agents are limited

    # A queued acquire counts: one held and one waited for is the limit of two.
    daemon.call("lock.release", name="quota:two", owner="quota-a")
    daemon.call("lock.acquire", name="quota:busy", owner="someone-else")
    waiter = daemon.client()
    pending = threading.Thread(
        target=waiter.request,
        args=("lock.acquire", {"name": "quota:busy", "owner": "quota-a", "wait": True, "timeout": 20_000}),
        kwargs={"timeout": 30},
    )
    pending.start()
    deadline = time.monotonic() + 10
    while daemon.call("daemon.status")["counts"]["lockWaiters"] == 0:
        assert time.monotonic() < deadline, "the acquire never queued"
        time.sleep(0.02)
    with pytest.raises(PDError) as refused:
        daemon.call("lock.acquire", name="quota:three", owner="quota-a")
    assert refused.value.code == "RESOURCE_LIMIT" and "has 2 locks" in refused.value.message
    daemon.call("lock.release", name="quota:busy", owner="someone-else")
    pending.join(10)
    assert daemon.call("lock.get", name="quota:busy")["owner"] == "quota-a"
    waiter.close()

    with daemon.client("quota-a") as c:
        port = c.request("port.claim", {"id": "quota:api"})["port"]
        with pytest.raises(PDError) as refused:
            c.request("port.claim", {"id": "quota:web"})
        assert refused.value.code == "RESOURCE_LIMIT" and "--max-services" in refused.value.message
        assert c.request("port.claim", {"id": "quota:api"})["port"] == port  # a re-claim is not a new service
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.settings.http_sock)), base_url="http://pd") as h:
        r = h.post("/claim", json={"id": "quota:web"}, headers={"X-Agent-Id": "quota-a"})
        assert r.status_code == 429 and (r.json()["current"], r.json()["max"]) == (1, 1)
    assert [s["id"] for s in daemon.call("port.find", pattern="quota:*")["services"]] == ["quota:api"]
