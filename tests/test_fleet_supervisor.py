"""The supervisor in-process (tests/swarm_app.py): channel triggers through ``msg.publish`` bus events, chaining
through on_success, project-scoped git messages, and cron fired under trio's MockClock."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from portdaddy.core.app import App
from portdaddy.daemon import start_subsystems
from portdaddy.fleet import citizen
from portdaddy.fleet.backends import Task
from portdaddy.fleet.supervisor import Fleet, FleetSettings
from tests.fleet_helpers import make_project
from tests.swarm_app import make_app


class Published:
    """Every channel message, as the bus carries it (``msg.publish`` is hot: only named subscribers see it)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, Any, str]] = []

    async def record(self, app: App, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with app.bus.subscribe("msg.publish") as rx:
            task_status.started()
            async for ev in rx:
                self.messages.append((ev.data["channel"], ev.data["payload"], ev.data["sender"]))

    async def seen(self, channel: str, timeout: float = 10) -> None:
        """Wait for a message on ``channel``: a run is marked ended before its on_success/on_failure goes out."""
        with trio.fail_after(timeout):
            while channel not in [c for c, _p, _s in self.messages]:
                await trio.sleep(0.02)


FAST = FleetSettings(grace_s=0.5, heartbeat_s=3600, respawn_delay_s=0.01)
BASE = datetime(2030, 1, 1, 0, 0, 30, tzinfo=UTC)


@pytest.fixture
def home() -> Iterator[Path]:
    # Short, under /tmp, as the daemon's homes are (a Unix socket's path is at most 107 bytes); removed after.
    home = Path(tempfile.mkdtemp(prefix="pdf", dir="/tmp"))
    yield home
    shutil.rmtree(home, ignore_errors=True)


@asynccontextmanager
async def start(home: Path, *, now: Any = None) -> AsyncIterator[tuple[App, Fleet, Published]]:
    """The daemon's subsystems in-process, with a fleet on fast settings and an injectable wall clock."""
    app = make_app(home)
    fleet = Fleet(app, now=now, settings=FAST)
    published = Published()
    async with trio.open_nursery() as nursery:
        await nursery.start(published.record, app)
        await start_subsystems(app, nursery, {Fleet: fleet})
        yield app, fleet, published
        for project_dir in list(fleet.fleets):
            await fleet.down(project_dir)
        nursery.cancel_scope.cancel()


async def settled(fleet: Fleet, project: Path, agent: str, n: int, timeout: float = 10, poll: float = 0.02) -> list:
    """The first ``n`` ended runs of ``agent``, looked for at each run's exit event and every ``poll`` s (a run
    ended on a path that announces nothing is still seen). Under the MockClock each wake-up is a jump that costs
    0.2 s of real idleness, so the cron tests poll seldom and wake at the exits."""
    with trio.fail_after(timeout), fleet.app.bus.subscribe("fleet.run.exit") as exits:
        while True:
            runs = [r for r in fleet.runs.recent(project_dir=str(project), agent=agent)
                    if r.status not in ("queued", "running")]  # fmt: skip
            if len(runs) >= n:
                return runs
            with trio.move_on_after(poll):
                await exits.receive()


CHAINED = """
agents:
  qa:
    trigger: git:committed
    backend: custom
    command: echo "qa saw $PD_TRIGGER_PAYLOAD"
    on_success: publish qa:passed
  review:
    trigger: qa:passed
    backend: custom
    command: echo "review after $PD_TRIGGER_CHANNEL"; exit 1
    on_failure: publish review:failed
channels:
  qa:passed: ok
  review:failed: not ok
"""


async def test_a_commit_message_fires_qa_and_its_success_chains_review(home: Path) -> None:
    project = make_project(home, CHAINED)
    async with start(home) as (app, fleet, published):
        await fleet.up(str(project))
        app.publish("git:committed", {"sha": "abc123", "projectDir": str(project)}, sender="git:proj")
        [qa] = await settled(fleet, project, "qa", 1)
        assert qa.status == "completed"
        assert qa.trigger["channel"] == "git:committed" and qa.trigger["payload"]["sha"] == "abc123"
        assert "qa saw" in fleet.output_tail(qa) and "abc123" in fleet.output_tail(qa)
        [review] = await settled(fleet, project, "review", 1)
        assert review.status == "failed" and review.trigger["channel"] == "qa:passed"
        assert review.trigger["sender"] == "proj:fleet:qa"
        await published.seen("review:failed")
        channels = [c for c, _p, _s in published.messages if c not in ("agents", "resurrection")]
        assert channels == ["git:committed", "qa:passed", "review:failed"]
        # Each run was a citizen: qa's session ended with its result; review's crash went to salvage.
        qa_session = app.sessions.session(qa.session_id)
        assert qa_session["status"] == "completed" and qa_session["agentId"] == qa.agent_id
        assert app.agents.salvage_entry(review.agent_id)["sessionIds"] == [review.session_id]
        assert "resurrection" in [c for c, _p, _s in published.messages]
        payloads = {c: p for c, p, _s in published.messages}
        passed = payloads["qa:passed"]
        assert passed["agent"] == "qa" and passed["runId"] == qa.id and "abc123" in passed["output"]
        failed = payloads["review:failed"]
        assert failed["status"] == "failed" and failed["exitCode"] == 1


async def test_git_messages_are_scoped_to_their_project(home: Path) -> None:
    one = make_project(home, CHAINED, name="one")
    two = make_project(home, CHAINED, name="two")
    async with start(home) as (_app, fleet, _published):
        await fleet.up(str(one))
        await fleet.up(str(two))
        queued = fleet.on_message("git:committed", {"sha": "x", "projectDir": str(two)}, sender="git")
        assert [(r.project_dir, r.agent) for r in queued] == [(str(two), "qa")]
        unscoped = fleet.on_message("git:committed", "plain text", sender="someone")
        assert sorted(r.project_dir for r in unscoped) == sorted([str(one), str(two)])
        assert fleet.on_message("nobody:listens", {}, sender="x") == []
        await settled(fleet, two, "qa", 2)


async def test_disabled_agents_never_fire(home: Path) -> None:
    project = make_project(
        home,
        CHAINED.replace("    on_success: publish qa:passed", "    on_success: publish qa:passed\n    enabled: false"),
    )
    async with start(home) as (_app, fleet, _published):
        await fleet.up(str(project))
        assert fleet.on_message("git:committed", {}, sender="git") == []


CRON = """
agents:
  docs:
    schedule: "*/5 * * * *"
    backend: custom
    command: echo "docs at $PD_TRIGGER_SOURCE"
"""


@pytest.fixture
def jumpy_clock() -> trio.testing.MockClock:
    # Jumps only after 0.2 s of real idleness: a child process running is I/O the clock must not skip past.
    return trio.testing.MockClock(autojump_threshold=0.2)


async def test_cron_fires_on_schedule_under_a_mock_clock(home: Path, jumpy_clock: trio.testing.MockClock) -> None:
    project = make_project(home, CRON)
    assert trio.lowlevel.current_clock() is jumpy_clock
    start_at = trio.current_time()

    def now() -> datetime:
        return BASE + timedelta(seconds=trio.current_time() - start_at)

    async with start(home, now=now) as (_app, fleet, _published):
        await fleet.up(str(project))
        state = fleet.fleets[str(project)].state("docs")
        await trio.sleep(0)  # let the cron task compute its first fire
        assert state.next_fire == BASE.replace(minute=5, second=0)
        runs = await settled(fleet, project, "docs", 2, timeout=1200, poll=600)
        fired = sorted(r.trigger["firedAt"] for r in runs)
        assert fired == [BASE.replace(minute=5, second=0).isoformat(), BASE.replace(minute=10, second=0).isoformat()]
        assert all(r.status == "completed" and r.trigger["source"] == "schedule" for r in runs)
        assert "docs at schedule" in fleet.output_tail(runs[0])


async def test_a_cron_fleet_whose_directory_was_deleted_fires_nothing_until_it_is_back(
    home: Path, jumpy_clock: trio.testing.MockClock
) -> None:
    project = make_project(home, CRON)
    start_at = trio.current_time()

    def now() -> datetime:
        return BASE + timedelta(seconds=trio.current_time() - start_at)

    async with start(home, now=now) as (_app, fleet, published):
        await fleet.up(str(project))
        shutil.rmtree(project)
        await trio.sleep(16 * 60)  # past three slots: 0:05, 0:10, 0:15
        # Was (before the directory check): a run per slot, each failing at once and going to salvage.
        assert fleet.runs.recent(project_dir=str(project)) == []
        [view] = fleet.status(str(project))
        assert view["problem"].startswith(f"project directory {project} is gone")
        said = [p["event"] for c, p, _s in published.messages if c == "fleet"]
        assert said == ["project-missing"]  # once, not once per slot

        make_project(home, CRON)  # the directory is back: the next slot fires
        [run] = await settled(fleet, project, "docs", 1, timeout=1200, poll=600)
        assert run.status == "completed" and run.trigger["firedAt"] == BASE.replace(minute=20, second=0).isoformat()
        assert fleet.status(str(project))[0]["problem"] is None


PER_COMMIT = """
agents:
  qa:
    trigger: git:committed
    backend: custom
    command: echo "qa of {sha} on {branch}"
    on_success: publish qa:passed
  review:
    trigger: qa:passed
    backend: custom
    command: echo "review of {sha} on {branch}"
channels:
  qa:passed: ok
"""


async def test_sha_and_branch_are_the_commit_that_fired_the_run(home: Path) -> None:
    project = make_project(home, PER_COMMIT)
    async with start(home) as (app, fleet, _published):
        await fleet.up(str(project))  # no commit yet: loaded as sha "unknown" on main
        for n, branch in ((1, "feature/a"), (2, "fix-b")):
            app.publish("git:committed", {"sha": f"{n}" * 40, "shortSha": f"{n}" * 7, "branch": branch,
                                          "projectDir": str(project)}, sender="git:proj")  # fmt: skip
        outputs = sorted(fleet.output_tail(r) for r in await settled(fleet, project, "qa", 2))
        assert outputs == ["qa of 1111111 on feature/a", "qa of 2222222 on fix-b"]
        # A chained agent gets the commit that started the chain.
        reviews = sorted(fleet.output_tail(r) for r in await settled(fleet, project, "review", 2))
        assert reviews == ["review of 1111111 on feature/a", "review of 2222222 on fix-b"]
        # A run no commit fired gets the values read at load time.
        fleet.fire(fleet.get(str(project)), "qa", {"source": "manual"})
        manual = [r for r in await settled(fleet, project, "qa", 3) if r.trigger["source"] == "manual"]
        assert [fleet.output_tail(r) for r in manual] == ["qa of unknown on main"]


async def test_a_stop_while_a_run_registers_leaves_no_agent_or_session_behind(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = make_project(home, "agents:\n  slow: {trigger: work, backend: custom, command: 'sleep 30'}\n")
    registering = trio.Event()
    enter = citizen.enter

    async def slow_enter(app: App, run: Any) -> str | None:
        # A journal slow to answer (a busy store) holds the run between registering and starting, long enough for
        # the stop to land there; the window is otherwise a few ms wide.
        session_id = await enter(app, run)
        registering.set()
        with trio.CancelScope(shield=True):  # citizen's own journal calls are shielded too
            await trio.sleep(0.3)
        return session_id

    monkeypatch.setattr(citizen, "enter", slow_enter)
    app = make_app(home)
    fleet = Fleet(app, settings=FAST)
    async with trio.open_nursery() as daemon:
        await start_subsystems(app, daemon, {Fleet: fleet})
        await fleet.up(str(project))
        run = fleet.fire(fleet.get(str(project)), "slow", {"source": "manual"})
        assert run is not None
        await registering.wait()
        daemon.cancel_scope.cancel()  # the daemon stops (pd stop) while the run is registered but not started
    # Was: the row stayed queued while its agent and session stayed active until a restart ran it again.
    assert run.session_id is not None and app.sessions.session(run.session_id)["status"] == "abandoned"
    assert fleet.runs.get(run.id).status == "lost"  # it had started: ended like any run the stop interrupts
    assert app.agents.salvage_entry(run.agent_id)["sessionIds"] == [run.session_id]


async def test_a_run_whose_exec_linux_would_refuse_fails_before_it_is_registered(home: Path) -> None:
    """Whatever made the task (pd spawn and the fleet file refuse such a one up front; a run queued before they
    did comes back after a restart), a string of its exec over 128 KiB fails the run with the reason before it is
    registered, not with E2BIG after (an agent, a session and a salvage entry for a run that never ran)."""
    big = "é" * (64 * 1024)
    async with start(home) as (app, fleet, _published):
        cases = (
            (Task(backend="custom", command=f"echo {big}"), "the command is 131,077 bytes; "),
            (Task(backend="custom", command="echo", env={"BIG": big}), "env BIG is 131,072 bytes; "),
        )
        for task, said in cases:
            run = fleet.spawn(task, identity="spawned:custom")
            await run.done.wait()
            assert run.status == "failed" and run.error.startswith(said), run.error
            assert run.session_id is None and app.agents.get(run.agent_id) is None
            assert Path(run.log_path).read_text() == f"# {run.id}: not started: {run.error}\n"
