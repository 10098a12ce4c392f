"""The journal's core in-process (no transport): claim conflicts against brute force, the note chain under
tampering, death and salvage through the seam the fleet uses."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from portdaddy.core import agents as agents_module
from portdaddy.core import globs
from portdaddy.core.agents import GRACE_MS, Agents
from portdaddy.core.app import App
from portdaddy.core.clock import now_ms
from portdaddy.core.sessions import Sessions
from portdaddy.errors import Conflict
from tests.swarm_app import PublishRecorder, make_app
from tests.test_globs import brute_common, claims_any, ref_matches


@pytest.fixture(scope="module")
def app() -> Iterator[App]:
    home = Path(tempfile.mkdtemp(prefix="pdj", dir="/tmp"))
    a = make_app(home)
    a.add(PublishRecorder())
    a.add(Sessions(a))
    a.add(Agents(a))
    yield a
    a.store.close()
    shutil.rmtree(home, ignore_errors=True)


_CLAIM = claims_any.map("/".join).map(globs.normalize_claim_path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_CLAIM, min_size=1, max_size=3, unique=True), _CLAIM)
def test_claim_conflicts_are_symmetric_and_agree_with_brute_force(app: App, held: list[str], new: str) -> None:
    sessions: Sessions = app.sessions
    holder = sessions.start("holder", agent_id=None, files=held, force=True, worktree=None, metadata=None)["id"]
    other = None
    try:
        found = {c["claimedPath"]: c["example"] for c in sessions.conflicts([new])}
        for h in held:
            if brute_common(h, new) is not None:  # a sample path both cover: the claim must be refused
                assert h in found, (h, new)
        for h, example in found.items():  # every reported conflict is real: the example is covered by both
            assert ref_matches(h, example) and ref_matches(new, example), (h, new, example)
        other = sessions.start("other", agent_id=None, files=[new], force=True, worktree=None, metadata=None)["id"]
        for h in held:  # and the other way round
            back = {c["claimedPath"] for c in sessions.conflicts([h], exclude=[holder])}
            assert (new in back) == (h in found), (h, new)
    finally:
        for sid in filter(None, (holder, other)):
            sessions.end(sid, note=None, status="completed", agent_id=None)


def test_conflicting_start_is_refused_and_creates_nothing(app: App) -> None:
    sessions: Sessions = app.sessions
    held = sessions.start("api", agent_id="api-agent", files=["src/api/*"], force=False, worktree=None, metadata=None)
    before = app.store.scalar("SELECT count(*) FROM sessions")
    with pytest.raises(Conflict) as refused:
        sessions.start("x", agent_id=None, files=["src/api/pay.ts"], force=False, worktree=None, metadata=None)
    assert refused.value.code == "FILE_CONFLICT" and refused.value.extra["conflicts"][0]["sessionId"] == held["id"]
    assert app.store.scalar("SELECT count(*) FROM sessions") == before
    sessions.end(held["id"], note=None, status="completed", agent_id=None)


# -- the note chain ------------------------------------------------------------------------------------------

_MUTATIONS = ("body", "type", "agent_id", "created_at", "seq", "hash", "prev_hash", "delete", "swap")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(min_size=1, max_size=40).filter(str.strip), min_size=1, max_size=8),
       st.sampled_from(_MUTATIONS), st.data())  # fmt: skip
def test_the_chain_detects_any_edited_or_removed_note(app: App, texts: list[str], mutation: str, data) -> None:
    sessions: Sessions = app.sessions
    sid = sessions.start("chain", agent_id="writer", files=[], force=False, worktree=None, metadata=None)["id"]
    for t in texts:
        sessions.add_note(sid, t.strip(), "note", "writer")
    assert sessions.verify(sid)["valid"]
    rows = [r[0] for r in app.store.all("SELECT id FROM notes WHERE session_id=? ORDER BY seq", (sid,))]
    if mutation == "swap" and len(rows) < 2:
        mutation = "delete"
    victim = data.draw(st.sampled_from(rows))
    db = app.store.db
    triggers = [r[0] for r in app.store.all("SELECT sql FROM sqlite_master WHERE type='trigger' AND tbl_name='notes'")]
    db.execute("DROP TRIGGER notes_append_only_update; DROP TRIGGER notes_append_only_delete")
    try:
        if mutation == "delete":
            db.execute("DELETE FROM notes WHERE id=?", (victim,))
        elif mutation == "swap":
            a, b = rows[0], rows[1]
            for note_id, seq in ((a, -1), (b, 1), (a, 2)):  # reorder the first two (seq is unique per session)
                db.execute("UPDATE notes SET seq=? WHERE id=?", (seq, note_id))
        elif mutation == "body":
            body = bytearray(app.store.scalar("SELECT body FROM notes WHERE id=?", (victim,)))
            body[-1] ^= 1  # one bit of the ciphertext
            db.execute("UPDATE notes SET body=? WHERE id=?", (bytes(body), victim))
        elif mutation in ("seq", "created_at"):
            db.execute(f"UPDATE notes SET {mutation} = {mutation} + 1000 WHERE id=?", (victim,))
        else:
            db.execute(f"UPDATE notes SET {mutation} = {mutation} || 'x' WHERE id=?", (victim,))
        result = sessions.verify(sid)
        assert not result["valid"], mutation
        assert all(p["sessionId"] == sid for p in result["problems"])
        if mutation == "body":
            note = next(n for n in sessions.notes(session_id=sid, limit=100) if n["id"] == victim)
            assert note["content"] is None and note["unreadable"]
    finally:
        # Leave the table as the other examples expect it (a tampered session stays tampered, on its own).
        for sql in triggers:
            db.execute(sql)


def test_notes_cannot_be_updated_or_deleted(app: App) -> None:
    sid = app.sessions.start("ro", agent_id=None, files=[], force=False, worktree=None, metadata=None)["id"]
    app.sessions.add_note(sid, "permanent", "note", None)
    for sql in ("UPDATE notes SET type='x' WHERE session_id=?", "DELETE FROM notes WHERE session_id=?"):
        with pytest.raises(Exception, match="append-only"):
            app.store.execute(sql, (sid,))


# -- death and salvage ---------------------------------------------------------------------------------------


def test_declare_dead_abandons_sessions_keeps_claims_and_queues_salvage(app: App) -> None:
    agents: Agents = app.agents
    sessions: Sessions = app.sessions
    agents.register("crashy", identity="fleet:worker", purpose="index the repo")
    sid = sessions.start("Index the repo", agent_id="crashy", files=["index/**"], force=False, worktree=None,
                         metadata=None)["id"]  # fmt: skip
    sessions.add_note(sid, "half the files indexed", "progress", "crashy")
    with app.bus.subscribe("agent.dead", "salvage.create", "session.end") as rx:
        assert agents.declare_dead("crashy", "fleet run exited 137")
        assert not agents.declare_dead("crashy", "again")  # once
        kinds = [rx.receive_nowait() for _ in range(3)]
    assert [e.kind for e in kinds] == ["session.end", "agent.dead", "salvage.create"]
    assert kinds[1].data["sessionIds"] == [sid] and kinds[1].data["reason"] == "fleet run exited 137"
    assert sessions.session(sid)["status"] == "abandoned"
    assert sessions.claimed_paths([sid]) == ["index/**"]  # kept for the salvager
    assert sessions.conflicts(["index/a.txt"]) == []  # but they block nobody
    [entry] = agents.salvage_entries(project="fleet")
    assert (entry["purpose"], entry["notes"], entry["files"]) == ("Index the repo", ["half the files indexed"],
                                                                 ["index/**"])  # fmt: skip
    assert agents.get("crashy").liveness == "dead"
    published = [(ch, p["type"]) for ch, p, _ in app.broker.published if p.get("agentId") == "crashy"]
    assert ("resurrection", "dead") in published and ("agents", "dead") in published
    agents.salvage_move("crashy", "claim", "rescuer")
    assert agents.get("crashy") is None
    with pytest.raises(Conflict):
        agents.salvage_move("crashy", "claim", "someone-else")
    done = agents.salvage_move("crashy", "complete", "rescuer")
    assert (done["status"], done["claimedBy"], done["completedBy"]) == ("completed", "rescuer", "rescuer")


def test_a_dead_agent_that_heartbeats_is_alive_again(app: App) -> None:
    agents: Agents = app.agents
    agents.register("lazarus")
    agents.declare_dead("lazarus", "test")
    assert agents.heartbeat("lazarus").liveness == "active"
    assert app.store.scalar("SELECT liveness FROM agents WHERE id='lazarus'") == "active"
    entry = agents.salvage_entry("lazarus")  # its work is its own again, not offered to others
    assert (entry["status"], entry["claimedBy"]) == ("claimed", "lazarus")


def test_unregister_ends_sessions_and_releases_files(app: App) -> None:
    app.agents.register("leaver")
    sid = app.sessions.start("leave", agent_id="leaver", files=["docs/*"], force=False, worktree=None,
                             metadata=None)["id"]  # fmt: skip
    assert app.agents.unregister("leaver")
    assert app.sessions.session(sid)["status"] == "abandoned"
    assert app.sessions.claimed_paths([sid]) == []
    assert app.store.scalar("SELECT count(*) FROM salvage WHERE agent_id='leaver'") == 0


class HostClock:
    """The wall clock the agents module reads, driven by the test: it follows trio's (mock) clock, plus however
    long the host has slept. A suspended host stops the monotonic clock; the wall clock keeps going."""

    def __init__(self) -> None:
        self.base, self.start, self.slept_ms = now_ms(), trio.current_time(), 0

    def __call__(self) -> int:
        return self.base + round((trio.current_time() - self.start) * 1000) + self.slept_ms


async def test_after_the_host_sleeps_no_agent_is_judged_until_the_grace_ends(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Two hours asleep is two hours without heartbeats, but the silence was the host's: the reaper waits a
    grace period for the agents to speak, then judges those that did not."""
    clock = HostClock()
    monkeypatch.setattr(agents_module, "now_ms", clock)
    app = make_app(tmp_path)
    app.add(PublishRecorder())
    app.add(Sessions(app))
    agents = Agents(app)
    app.add(agents)
    grace_s = GRACE_MS / 1000
    async with trio.open_nursery() as nursery:
        await nursery.start(agents.run)
        agents.register("sleeper")  # "ready": stale after 12 min of silence, dead after 20
        agents.register("waker")
        registered = trio.current_time()
        await trio.sleep(grace_s + 1)  # past the grace every start gets
        clock.slept_ms = 2 * 3600 * 1000  # the lid closes for two hours
        # The reaper wakes at its next deadline, the agents' stale check on the monotonic clock, and finds the
        # wall clock two hours further on than that.
        await trio.sleep_until(registered + agents.thresholds("ready")[0] / 1000 + 5)
        assert {agents.get(a).liveness for a in ("sleeper", "waker")} == {"active"}
        agents.heartbeat("waker")  # an agent that wakes with the host speaks within the grace
        await trio.sleep(grace_s + 1)
        assert agents.get("waker").liveness == "active"
        assert agents.get("sleeper").liveness == "dead"  # one that does not is judged once the grace is over
        assert "no heartbeat for 7" in app.store.scalar("SELECT reason FROM salvage WHERE agent_id='sleeper'")
        nursery.cancel_scope.cancel()
    app.store.close()


def test_the_session_key_cache_is_bounded_and_evicted_keys_still_open(tmp_path: Path, monkeypatch) -> None:
    """Every session's unwrapped key was cached for the daemon's life: memory grew with every session."""
    from portdaddy.core import sealing

    monkeypatch.setattr(sealing, "MAX_CACHED_KEYS", 4)
    sealer = sealing.Sealer(sealing.load_or_create_master_key(tmp_path / "master.key"))
    wrapped = {f"s{i}": sealer.new_session_key(f"s{i}") for i in range(10)}
    bodies = {sid: sealer.seal(sid, key, f"note of {sid}") for sid, key in wrapped.items()}
    assert len(sealer._boxes) == 4
    assert [sealer.open(sid, wrapped[sid], body) for sid, body in bodies.items()] == \
        [f"note of s{i}" for i in range(10)]  # fmt: skip
    assert list(sealer._boxes) == ["s6", "s7", "s8", "s9"]


def _add_sessions(app: App, first: int, count: int, *, runs_of: tuple[str, ...] = ()) -> None:
    """``count`` ended sessions, one a second from ``first`` (ms), each with a note: ordinary ones, or with
    ``runs_of``, runs of those fleet agents in turn (written as the fleet writes them)."""
    sessions, notes = [], []
    for n in range(first // 1000, first // 1000 + count):
        sid, at, fleet_agent = f"session-{n:012x}", n * 1000, runs_of[n % len(runs_of)] if runs_of else None
        agent = f"fleet-{fleet_agent}-{n:08x}" if fleet_agent else f"agent-{n % 7}"
        sessions.append((sid, "p", "completed" if n % 5 else "abandoned", agent, "/p", at, at, b"k", "h", fleet_agent))
        notes.append((n, sid, agent, at))  # ids in time order, as the daemon gives them
    with app.store.write() as db:
        db.executemany("INSERT INTO sessions (id, purpose, status, agent_id, worktree, created_at, updated_at, "
                       "wrapped_key, head_hash, fleet_agent, note_count) VALUES (?,?,?,?,?,?,?,?,?,?,1)",
                       sessions)  # fmt: skip
        db.executemany("INSERT INTO notes (id, session_id, seq, agent_id, type, created_at, body, prev_hash, hash) "
                       "VALUES (?, ?, 1, ?, 'note', ?, x'00', '', '')", notes)  # fmt: skip


def _vm_steps(app: App, view: Callable[[], Any]) -> tuple[int, Any]:
    """``view()``'s answer and its cost in SQLite's virtual machine, in tens of instructions (counted, not timed)."""
    steps = 0

    def count() -> bool:
        nonlocal steps
        steps += 1
        return False  # go on

    app.store.db.set_progress_handler(count, 10)
    try:
        answer = view()
        return steps, answer
    finally:
        app.store.db.set_progress_handler(None)


def test_the_journal_views_cost_what_their_limit_asks_for_not_what_the_table_holds(tmp_path: Path) -> None:
    """Sessions are kept for ever, so the views must not read them all: the fold of fleet runs ran json_extract and
    window functions over every session (0.2 s at 50k). Twenty thousand older sessions later, every view answers the
    same at the same cost; only a fleet agent's kept runs (a hundred by default) are counted whole."""
    a = make_app(tmp_path)
    a.add(PublishRecorder())
    sessions = Sessions(a)
    a.add(sessions)
    now = now_ms()
    _add_sessions(a, now - 600_000, 200)
    _add_sessions(a, now - 300_000, 120, runs_of=("tick", "tock"))
    _add_sessions(a, now - 100_000, 60)
    for n in range(3):
        sessions.start(f"active {n}", agent_id=None, files=[], force=False, worktree="/p", metadata=None)
    recent = now - 250_000
    listed = partial(sessions.list, agent=None, worktree=None, project=None)
    views = {
        "session.list": partial(listed, status="active", limit=50),
        "session.list --all": partial(listed, status=None, limit=100, fold_runs=True),
        "session.list --all --runs": partial(listed, status=None, limit=50),
        "session.list --status abandoned": partial(listed, status="abandoned", limit=50, fold_runs=True),
        "sitrep's sessions": partial(listed, status=None, limit=500, since=recent, fold_runs=True),
        "note.list": partial(sessions.notes, limit=50, fold_runs=True),
        "earlierRunNotes": sessions.earlier_run_notes,
        "sitrep's note count": partial(sessions.count_notes, since=recent, fold_runs=True),
    }
    before = {name: _vm_steps(a, view) for name, view in views.items()}
    folded = [s["fleetRuns"]["count"] for s in before["session.list --all"][1] if s["fleetRuns"]]
    assert folded == [60, 60] and before["earlierRunNotes"][1] == 118 and len(before["session.list"][1]) == 3
    _add_sessions(a, now - 40_000_000, 20_000)
    for name, view in views.items():
        steps, answer = _vm_steps(a, view)
        assert answer == before[name][1], name
        assert steps <= before[name][0] * 1.1 + 10, (name, before[name][0], steps)
    a.store.close()
