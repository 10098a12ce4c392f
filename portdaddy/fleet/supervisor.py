"""The fleet supervisor: fleets that are up, their triggers, limits, runs, respawns and circuit breakers.

One subsystem (``app.fleet``) inside the daemon's nursery, so a fleet survives the terminal that started it.
Each fleet that is up has a task with its own nursery (its dispatcher, its cron loop, its runs); ``down``
cancels that nursery, and each run's cleanup stops its process group (SIGTERM, grace, SIGKILL). ``pd spawn``
runs live directly in the supervisor's nursery, outside any fleet's limits.

Triggers: every ``msg.publish`` bus event (the broker's, with ``channel`` and ``payload``) is offered to
``on_message``; a message whose payload names a ``projectDir`` (the git hook's does) only fires that project's
fleet. Schedules: real cron via croniter, evaluated against ``now()`` (injectable, so tests drive it with a
mock clock). Limits: a fleet starts at most ``max_concurrent_spawns`` runs at once and
``max_spawns_per_hour`` in any rolling hour; the rest wait in a FIFO queue (persisted with the run rows).
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import trio

from portdaddy.config import env_int, env_ms, without_caller
from portdaddy.core.clock import now_ms
from portdaddy.core.sessions import new_session_id
from portdaddy.core.store import RETRY_S
from portdaddy.errors import PDError, StoreError, bad_input
from portdaddy.fleet import children, citizen
from portdaddy.fleet.backends import (
    STDIN_BACKENDS,
    Task,
    argv_for,
    exec_problem,
    prompt_fits,
    with_trigger_context,
)
from portdaddy.fleet.runs import Run, RunTable, cap_log, new_id
from portdaddy.fleet.spec import AgentSpec, FleetConfig, next_fire, render_template, run_variables, variable_env
from portdaddy.procfs import start_time
from portdaddy.text import plural

log = logging.getLogger("portdaddy.fleet")

HOUR_S = 3600.0
OUTPUT_TAIL = 2000  # bytes of a run's output put into its on_success/on_failure message
CRON_RECHECK_S = 60.0  # re-read the wall clock at least this often (it may jump: suspend, NTP)
SHUTTING_DOWN = "daemon shutting down"  # the stop reason of runs the daemon's own shutdown interrupts


def _env_seconds(env: dict[str, str], var: str, default: float) -> float:
    ms = env_ms(env, var)
    return default if ms is None else ms / 1000


@dataclass(frozen=True, slots=True)
class FleetSettings:
    """Knobs from the environment (tests shrink them): ``PORT_DADDY_FLEET_*``, durations like ``2s``."""

    enabled: bool = True
    grace_s: float = 5.0  # SIGTERM → SIGKILL
    heartbeat_s: float = 15.0
    respawn_delay_s: float = 2.0
    respawn_window_s: float = HOUR_S  # failures older than this no longer count toward the breaker
    default_timeout_s: float = 1800.0  # a fleet agent without timeout:
    spawn_timeout_s: float = 300.0  # pd spawn without --timeout (the original's default)
    max_queued: int = 100  # per fleet; beyond it a trigger is dropped with a `fleet` channel message
    keep_runs: int = 100  # finished runs kept per agent, with their logs and sessions (spec/fleet.md, "Retention")
    # Tests only (PORT_DADDY_TEST_FLEET_STARTING_PAUSE): hold each run this long between its child starting and its
    # row saying so, to make the window a daemon SIGKILL can land in wide enough to hit. 0 costs nothing.
    test_starting_pause_s: float = 0.0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> FleetSettings:
        env = dict(os.environ if env is None else env)
        defaults = cls()
        return cls(
            enabled=env.get("PORT_DADDY_NO_FLEET", "").lower() not in ("1", "true", "yes", "on"),
            grace_s=_env_seconds(env, "PORT_DADDY_FLEET_GRACE", defaults.grace_s),
            heartbeat_s=_env_seconds(env, "PORT_DADDY_FLEET_HEARTBEAT", defaults.heartbeat_s),
            respawn_delay_s=_env_seconds(env, "PORT_DADDY_FLEET_RESPAWN_DELAY", defaults.respawn_delay_s),
            respawn_window_s=_env_seconds(env, "PORT_DADDY_FLEET_RESPAWN_WINDOW", defaults.respawn_window_s),
            keep_runs=max(1, env_int(env, "PORT_DADDY_FLEET_KEEP_RUNS", defaults.keep_runs)),
            test_starting_pause_s=_env_seconds(env, "PORT_DADDY_TEST_FLEET_STARTING_PAUSE", 0.0),
        )


@dataclass(slots=True)
class AgentState:
    failures: deque[float] = field(default_factory=deque)  # trio times of recent failed runs
    circuit: str | None = None  # why the breaker is open; None = closed
    circuit_at: int | None = None
    skipped: int = 0  # triggers ignored while the breaker was open
    next_fire: datetime | None = None


@dataclass(eq=False, slots=True)
class LiveFleet:
    config: FleetConfig
    project_dir: str
    path_env: str | None
    agents: dict[str, AgentState] = field(default_factory=dict)
    queue: deque[Run] = field(default_factory=deque)
    running: dict[str, Run] = field(default_factory=dict)
    starts: deque[float] = field(default_factory=deque)  # trio times of starts in the last hour
    wake: trio.Event = field(default_factory=trio.Event)  # the queue or a limit changed
    reloaded: trio.Event = field(default_factory=trio.Event)  # the config changed (cron must recompute)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    finished: trio.Event = field(default_factory=trio.Event)
    nursery: trio.Nursery | None = None
    up_at: int = field(default_factory=now_ms)
    going_down: bool = False  # pd fleet down, as opposed to the daemon stopping (the fleet comes back then)
    gone_at: int | None = None  # when its project directory was found missing (it fires nothing until back)

    def state(self, agent: str) -> AgentState:
        return self.agents.setdefault(agent, AgentState())


class Fleet:
    name = "fleet"

    def __init__(self, app: Any, *, now: Callable[[], datetime] | None = None,
                 settings: FleetSettings | None = None) -> None:  # fmt: skip
        self.app = app
        self.store = app.store
        self.settings = settings or FleetSettings.from_env()
        self.now = now or (lambda: datetime.now().astimezone())
        self.runs = RunTable(app.store)
        self.logs_dir = Path(app.settings.home) / "fleet" / "logs"
        self.fleets: dict[str, LiveFleet] = {}
        self.live: dict[str, Run] = {}  # every queued or running run, fleet or spawn, by id
        self._nursery: trio.Nursery | None = None

    def stats(self) -> dict[str, Any]:
        return {"fleets": len(self.fleets), "fleetRuns": sum(r.status == "running" for r in self.live.values())}

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.logs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self._reconcile()
        with self.app.bus.subscribe("msg.publish", wants=self._is_trigger) as messages:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._listen, messages)
                if self.settings.enabled:
                    await self._restore()  # before "started": a status asked right after start is truthful
                task_status.started()

    def _is_trigger(self, kind: str, data: dict[str, Any]) -> bool:
        """Only messages on a channel some fleet that is up listens to (publishes come by the thousand)."""
        channel = data.get("channel")
        return any(spec.trigger == channel for lf in self.fleets.values() for spec in lf.config.agents.values())

    async def _listen(self, messages: trio.MemoryReceiveChannel[Any]) -> None:
        async for event in messages:
            data = event.data
            with self.store.unless_refused(f"fleet: the runs {data.get('channel')!r} fires"):
                self.on_message(data.get("channel", ""), data.get("payload"), sender=data.get("sender"),
                                message_id=data.get("id"))  # fmt: skip

    async def _reconcile(self) -> None:
        """After a daemon death: runs that were running, or being registered and started, are lost (orphans
        stopped, sessions ended, salvage made); spawns that never started are cancelled."""
        for run in self.runs.with_status("running"):
            await self._found_lost(run, "running")
        for run in self.runs.with_status("queued"):
            if citizen.registered(self.app, run):
                # The daemon died as it registered the run and started its child (one step, see _supervise): its
                # agent and session were made, perhaps its child started, and the row was not yet told. Lost, as a
                # running run: not run a second time, and its session ended.
                await self._found_lost(run, "starting")
            elif run.kind == "spawn":  # a spawn starts as it is asked for: one still queued never got to (or a stop)
                self._finish_unstarted(run, "cancelled", "the daemon stopped before this spawn started; spawn it again")
        self._forget_old_runs()

    def _forget_old_runs(self) -> None:
        """Forget the finished runs not kept (past the newest ``keep_runs`` of their agent, or ended longer ago than
        a salvage entry is kept), each whole: its row, its log, its ended sessions with their notes and claims, its
        settled salvage entry. Not one whose work the journal still holds (its agent registered, or its salvage
        entry pending or claimed): it waits for that to settle or expire; nor one started in the last hour, which
        the hourly limit counts after a restart (``_recall``). At start and as each run ends."""
        now = now_ms()
        candidates = dict(self.runs.past_keeping(self.settings.keep_runs, now - self.app.settings.salvage_keep_ms,
                                                 now - int(HOUR_S * 1000)))  # fmt: skip
        holding = self.app.agents.holding_work(list(candidates))
        ids = [run_id for run_id in candidates if run_id not in holding]  # a run's agent id is its run id
        if not ids:
            return
        with self.store.write():
            sessions = self.app.sessions.forget_ended(ids)
            self.app.agents.forget_settled(ids)
            self.runs.delete(ids)
        for run_id in ids:
            if candidates[run_id]:
                Path(candidates[run_id]).unlink(missing_ok=True)
        log.info("fleet: forgot %d finished runs (%d sessions) no longer kept", len(ids), sessions)

    async def _found_lost(self, run: Run, doing: str) -> None:
        """A run the daemon died under (``doing`` what): its orphan group stopped, its log capped, its agent
        declared dead and its sessions ended, so their file claims stop blocking others."""
        await children.stop_orphan(f"PD_RUN_ID={run.id}", run.pid, run.pid_start, self.settings.grace_s)
        run.status, run.ended_at = "lost", now_ms()
        run.error = f"the daemon stopped while this run was {doing}; its session went to salvage"
        log_path = self.logs_dir / f"{run.id}.log"
        if run.log_path is None and log_path.exists():  # written as it started, before the row said so
            run.log_path = str(log_path)
        run.session_id = run.session_id or next(iter(self.app.sessions.session_ids_of(run.agent_id)), None)
        run.log_dropped = cap_log(run)
        self.runs.update(run)
        self._crashed(run, f"fleet run {run.id} lost: the daemon died while it was {doing}")
        self.app.bus.emit("fleet.run.exit", agent=run.agent, runId=run.id, status=run.status,
                          projectDir=run.project_dir, exitCode=None)  # fmt: skip

    async def _restore(self) -> None:
        """Bring back the fleets that were up when the daemon stopped, with their queued runs."""
        for project_dir, path_env in self.store.all("SELECT project_dir, path_env FROM fleets ORDER BY up_at"):
            try:
                await self.up(project_dir, path_env=path_env)
            except PDError as exc:
                log.error("fleet in %s not restored: %s", project_dir, exc.message)

    # -- fleets up and down --------------------------------------------------------------------------------

    async def up(self, project_dir: str, *, path_env: str | None = None) -> LiveFleet:
        """Load, check and start (or reload) the fleet of ``project_dir``. Raises BadInput with every problem."""
        if not self.settings.enabled:
            raise PDError("CONFLICT", "the fleet supervisor is disabled (PORT_DADDY_NO_FLEET); unset it and restart")
        from portdaddy.fleet.loader import load_checked  # blocking file + git work, run in a thread

        cfg = await trio.to_thread.run_sync(load_checked, project_dir, path_env)
        assert self._nursery is not None
        lf = self.fleets.get(project_dir)
        while lf is not None and lf.going_down:
            # A `pd fleet down` is stopping it (its children get their grace period). Reloading the fleet that
            # is about to go would answer "up" and leave nothing up: start afresh once it has gone.
            await lf.finished.wait()
            lf = self.fleets.get(project_dir)
        with self.store.write() as db:
            db.execute(
                "INSERT INTO fleets (project_dir, name, config_path, path_env, up_at) VALUES (?,?,?,?,?) "
                "ON CONFLICT(project_dir) DO UPDATE SET name=excluded.name, config_path=excluded.config_path, "
                "path_env=excluded.path_env",
                (project_dir, cfg.name, str(cfg.path), path_env, now_ms()),
            )
        self._ensure_harbor(cfg)
        if lf is not None:
            lf.config, lf.path_env = cfg, path_env
            lf.reloaded.set()
            lf.wake.set()
            return lf
        lf = LiveFleet(cfg, project_dir, path_env)
        self._recall(lf)
        self.fleets[project_dir] = lf
        await self._nursery.start(self._fleet_task, lf)
        for run in self.runs.with_status("queued"):
            if run.kind == "fleet" and run.project_dir == project_dir:
                self._requeue(lf, run)
        for spec in cfg.agents.values():
            if spec.enabled and spec.schedule and spec.run_on_start:
                self.fire(lf, spec.name, {"source": "start"})
        return lf

    def _recall(self, lf: LiveFleet) -> None:
        """What the limits and breakers count, read back from the store: a restart (or a down and up) neither
        closes a breaker, nor forgets an agent's failures, nor gives the fleet a fresh hourly budget."""
        now, clock = now_ms(), trio.current_time()

        def on_clock(ms: int) -> float:  # a wall-clock time in the store, on trio's clock like the live ones
            return clock - (now - ms) / 1000

        lf.starts.extend(map(on_clock, self.runs.started_since(lf.project_dir, now - int(HOUR_S * 1000))))
        for agent, opened_at, reason in self.store.all(
            "SELECT agent, opened_at, reason FROM fleet_circuits WHERE project_dir=?", (lf.project_dir,)
        ):
            state = lf.state(agent)
            state.circuit, state.circuit_at = reason, opened_at
        resets = dict(self.store.all("SELECT agent, reset_at FROM fleet_resets WHERE project_dir=?",
                                     (lf.project_dir,)))  # fmt: skip
        window_start = now - int(self.settings.respawn_window_s * 1000)
        for agent in lf.config.agents:
            since = window_start
            if agent in resets:
                since = max(since, resets[agent] + 1)  # failures up to a reset were forgiven
            lf.state(agent).failures.extend(map(on_clock, self.runs.failures_since(lf.project_dir, agent, since)))

    def _ensure_harbor(self, cfg: FleetConfig) -> None:
        harbors = getattr(self.app, "harbors", None)
        if cfg.harbor and harbors is not None:
            harbors.ensure(cfg.harbor, capabilities=list(cfg.agents), channels=list(cfg.channels),
                           agent_patterns=sorted({a.identity for a in cfg.agents.values()}))  # fmt: skip

    async def _fleet_task(self, lf: LiveFleet, *, task_status: trio.TaskStatus[None]) -> None:
        try:
            with lf.scope:
                async with trio.open_nursery() as nursery:
                    lf.nursery = nursery
                    nursery.start_soon(self._dispatch, lf)
                    nursery.start_soon(self._cron, lf)
                    task_status.started()
        finally:
            for run in list(lf.queue):
                if lf.going_down:
                    self._finish_unstarted(run, "cancelled", "the fleet went down before this run started")
                else:  # the daemon is stopping: the row stays queued and comes back with the fleet
                    self.live.pop(run.id, None)
            lf.queue.clear()
            if self.fleets.get(lf.project_dir) is lf:
                del self.fleets[lf.project_dir]
            lf.finished.set()

    async def down(self, project_dir: str) -> dict[str, Any]:
        """Stop a fleet: queued runs cancelled, running ones stopped (SIGTERM, grace, SIGKILL); waits for all."""
        lf = self.fleets.get(project_dir)
        if lf is not None and lf.going_down:
            # Another `pd fleet down` is stopping it: reply when it is down too, but the stopping is that one's.
            await lf.finished.wait()
            return {"stopped": False, "killed": 0, "cancelled": 0}
        with self.store.write() as db:
            db.execute("DELETE FROM fleets WHERE project_dir=?", (project_dir,))
        if lf is None:
            return {"stopped": False, "killed": 0, "cancelled": 0}
        killed, cancelled = len(lf.running), len(lf.queue)
        lf.going_down = True
        for run in lf.running.values():
            run.stop_reason = "the fleet was brought down (pd fleet down)"
        lf.scope.cancel()
        with trio.CancelScope(shield=True):
            await lf.finished.wait()
        return {"stopped": True, "killed": killed, "cancelled": cancelled}

    def get(self, project_dir: str) -> LiveFleet:
        lf = self.fleets.get(project_dir)
        if lf is None:
            raise PDError("NOT_FOUND", f"no fleet is up for {project_dir}; start it with: pd fleet up")
        return lf

    def reset(self, project_dir: str, agent: str) -> bool:
        """Close an agent's circuit breaker and forget its failures; True if it was open."""
        lf = self.get(project_dir)
        if agent not in lf.config.agents:
            raise PDError("NOT_FOUND", f"fleet {lf.config.name!r} has no agent {agent!r}; see pd fleet status")
        state = lf.state(agent)
        was_open = state.circuit is not None
        with self.store.write() as db:
            db.execute("DELETE FROM fleet_circuits WHERE project_dir=? AND agent=?", (project_dir, agent))
            db.execute("INSERT OR REPLACE INTO fleet_resets (project_dir, agent, reset_at) VALUES (?,?,?)",
                       (project_dir, agent, now_ms()))  # fmt: skip
        state.failures.clear()
        state.circuit = state.circuit_at = None
        state.skipped = 0
        return was_open

    # -- triggers ------------------------------------------------------------------------------------------

    def on_message(self, channel: str, payload: Any, *, sender: str | None = None,
                   message_id: Any = None) -> list[Run]:  # fmt: skip
        """A channel message: queue a run of every enabled agent of every up fleet triggered by ``channel``."""
        target = payload.get("projectDir") if isinstance(payload, dict) else None
        queued = []
        for lf in list(self.fleets.values()):
            if target is not None and str(target) != lf.project_dir:
                continue  # a project-scoped message (the git hook's) fires only that project's fleet
            for spec in lf.config.agents.values():
                if spec.trigger == channel and spec.enabled:
                    trigger = {"source": "channel", "channel": channel, "sender": sender, "messageId": message_id,
                               "payload": payload}  # fmt: skip
                    run = self.fire(lf, spec.name, trigger)
                    if run is not None:
                        queued.append(run)
        return queued

    def fire(self, lf: LiveFleet, agent: str, trigger: dict[str, Any], *, attempt: int = 0,
             delay_s: float = 0.0) -> Run | None:  # fmt: skip
        """Queue one run of ``agent``, to start no sooner than ``delay_s`` from now (None when its breaker is open
        or the queue is full)."""
        spec = lf.config.agents.get(agent)
        if spec is None:
            raise PDError("NOT_FOUND", f"fleet {lf.config.name!r} has no agent {agent!r}; see pd fleet status")
        state = lf.state(agent)
        if state.circuit is not None:
            state.skipped += 1
            return None
        if self._project_gone(lf):
            return None
        if len(lf.queue) >= self.settings.max_queued:
            self.app.publish("fleet", {"event": "dropped", "fleet": lf.config.name, "agent": agent,
                                       "reason": f"queue full ({self.settings.max_queued} runs waiting)"},
                             sender="fleet")  # fmt: skip
            return None
        variables = {**lf.config.variables, **run_variables(trigger, lf.config.variables)}
        # The command refers to the values (spec.shell_template); the run's environment holds them.
        task = Task(backend=spec.backend, prompt=render_template(spec.prompt, variables), command=spec.command,
                    model=spec.model, allowed_tools=spec.allowed_tools, env=dict(spec.env), cwd=lf.project_dir,
                    timeout_s=spec.timeout_s or self.settings.default_timeout_s, path=lf.path_env,
                    variables=variables)  # fmt: skip
        run = Run(new_id("fleet", agent), "fleet", agent, spec.identity, task, trigger, attempt, lf.project_dir,
                  lf.config.name)  # fmt: skip
        if delay_s > 0:
            run.not_before = run.created_at + math.ceil(delay_s * 1000)
        self.runs.insert(run)
        self._requeue(lf, run)
        return run

    def _project_gone(self, lf: LiveFleet) -> bool:
        """Whether the fleet's project directory is missing; said once (log, ``fleet`` channel) when found so.
        Its runs could only fail (each one more salvage entry, every minute for a cron), so it fires nothing."""
        if os.path.isdir(lf.project_dir):
            lf.gone_at = None
            return False
        if lf.gone_at is None:
            lf.gone_at = now_ms()
            log.warning("fleet %s: %s", lf.config.name, _gone_reason(lf))
            self.app.publish("fleet", {"event": "project-missing", "fleet": lf.config.name,
                                       "projectDir": lf.project_dir, "reason": _gone_reason(lf)},
                             sender="fleet")  # fmt: skip
        return True

    def _requeue(self, lf: LiveFleet, run: Run) -> None:
        if run.not_before is not None:  # stored on the wall clock (it outlives the daemon), waited for on trio's
            run.ready_at = trio.current_time() + max(0, run.not_before - now_ms()) / 1000
        lf.queue.append(run)
        self.live[run.id] = run
        lf.wake.set()

    # -- limits --------------------------------------------------------------------------------------------

    async def _dispatch(self, lf: LiveFleet) -> None:
        while True:
            lf.wake = trio.Event()
            wait_s = RETRY_S
            with self.store.unless_refused(f"fleet {lf.config.name}: starting queued runs"):
                wait_s = self._start_admitted(lf)
            with trio.move_on_after(wait_s):
                await lf.wake.wait()

    def _start_admitted(self, lf: LiveFleet) -> float:
        """Start queued runs while the limits allow; seconds until the hourly window admits more (inf: never)."""
        now = trio.current_time()
        while lf.starts and lf.starts[0] <= now - HOUR_S:
            lf.starts.popleft()
        limits = lf.config.limits
        if lf.queue and self._project_gone(lf):
            return CRON_RECHECK_S  # queued runs wait for the directory to come back (or pd fleet down)
        while lf.queue and len(lf.running) < limits.max_concurrent_spawns:
            # The first run that may start: a respawn waiting out its delay lets the runs behind it pass.
            run = next((r for r in lf.queue if r.ready_at <= now), None)
            if run is None:
                return min(r.ready_at for r in lf.queue) - now
            if len(lf.starts) >= limits.max_spawns_per_hour:
                return lf.starts[0] + HOUR_S - now
            spec = lf.config.agents.get(run.agent)
            if spec is None or not spec.enabled:  # a reload removed or disabled the agent since the run was queued
                gone = "is no longer in the fleet file" if spec is None else "was disabled in the fleet file"
                self._finish_unstarted(run, "cancelled", f"agent {run.agent!r} {gone}")
                lf.queue.remove(run)
                continue
            lf.queue.remove(run)
            lf.starts.append(now)
            lf.running[run.id] = run
            assert lf.nursery is not None
            lf.nursery.start_soon(self._execute, run, lf)
        return math.inf

    # -- cron ----------------------------------------------------------------------------------------------

    async def _cron(self, lf: LiveFleet) -> None:
        while True:
            lf.reloaded = trio.Event()
            now = self.now()
            scheduled = [s for s in lf.config.agents.values() if s.enabled and s.schedule]
            for spec in scheduled:
                state = lf.state(spec.name)
                if state.next_fire is None:
                    state.next_fire = next_fire(spec.schedule or "", now)
            for spec in scheduled:
                state = lf.state(spec.name)
                assert state.next_fire is not None
                if state.next_fire <= now:
                    with self.store.unless_refused(f"fleet {lf.config.name}: the scheduled run of {spec.name}"):
                        self.fire(lf, spec.name, {"source": "schedule", "schedule": spec.schedule,
                                                  "firedAt": state.next_fire.isoformat()})  # fmt: skip
                    # From now, not from the missed time: a suspended laptop fires once, not a burst.
                    state.next_fire = next_fire(spec.schedule or "", now)
            soonest = min((lf.state(s.name).next_fire for s in scheduled), default=None)
            delay = CRON_RECHECK_S if soonest is None else (soonest - now).total_seconds()
            with trio.move_on_after(max(0.0, min(delay, CRON_RECHECK_S))):
                await lf.reloaded.wait()
                for state in lf.agents.values():
                    state.next_fire = None  # schedules may have changed: recompute all

    # -- spawn ---------------------------------------------------------------------------------------------

    def spawn(self, task: Task, *, identity: str, agent: str = "spawn") -> Run:
        if not self.settings.enabled:
            raise PDError("CONFLICT", "the fleet supervisor is disabled (PORT_DADDY_NO_FLEET); unset it and restart")
        if task.timeout_s is None:
            task = replace(task, timeout_s=self.settings.spawn_timeout_s)
        run = Run(new_id("spawn", agent), "spawn", agent, identity, task)
        self.runs.insert(run)
        self.live[run.id] = run
        assert self._nursery is not None
        self._nursery.start_soon(self._execute, run, None)
        return run

    def find(self, run_id: str) -> Run:
        run = self.live.get(run_id) or self.runs.get(run_id)
        if run is None:
            raise PDError("NOT_FOUND", f"no run {run_id!r}; list them with pd fleet runs or pd spawned")
        return run

    async def kill(self, run_id: str) -> Run:
        """Stop one run (queued: cancelled; running: SIGTERM, grace, SIGKILL) and wait until it has ended."""
        run = self.find(run_id)
        if run.id not in self.live:
            return run  # already finished
        lf = self.fleets.get(run.project_dir or "")
        if lf is not None and run in lf.queue:
            self._finish_unstarted(run, "cancelled", "cancelled before it started (pd spawn kill)")
            lf.queue.remove(run)
            return run
        self.store.probe()  # a store that cannot record the kill refuses it before the process is stopped
        run.stop_reason = "killed (pd spawn kill)"
        run.scope.cancel()
        with trio.CancelScope(shield=True):
            await run.done.wait()
        return run

    # -- one run -------------------------------------------------------------------------------------------

    def _finish_unstarted(self, run: Run, status: str, error: str) -> None:
        ended = replace(run, status=status, error=error, ended_at=now_ms())
        self.runs.update(ended)  # stored first: a refused write leaves the run as it was
        run.status, run.error, run.ended_at = ended.status, ended.error, ended.ended_at
        self.live.pop(run.id, None)
        run.done.set()

    def _child_env(self, run: Run, prompt: str | None) -> dict[str, str]:
        """What a run's child gets (spec/fleet.md, "An agent's environment"): the daemon's environment less any
        caller's identity (a daemon started from an agent's shell has that agent's), the agent's ``env:``, the
        PATH it was started with, then who it is and what fired it, which nothing before may change. ``prompt``
        None: too large for ``PD_PROMPT`` (it went on stdin), which is then unset (an ``env:`` one included)."""
        trigger = run.trigger or {}
        env = {**without_caller(os.environ), **run.task.env}
        if run.task.path:
            env["PATH"] = run.task.path
        env.update({variable_env(name): value for name, value in run.task.variables.items()})
        env.update({
            "PORT_DADDY_HOME": str(self.app.settings.home), "PORT_DADDY_AGENT": run.agent_id,
            "PD_RUN_ID": run.id, "PD_AGENT_NAME": run.agent, "PD_IDENTITY": run.identity,
            "PD_TRIGGER_SOURCE": str(trigger.get("source", "manual")),
            "PD_TRIGGER_CHANNEL": trigger.get("channel") or "", "PD_TRIGGER_PAYLOAD": _dumps(trigger.get("payload")),
            "PD_ATTEMPT": str(run.attempt),
        })  # fmt: skip
        if prompt is not None:
            env["PD_PROMPT"] = prompt
        else:
            env.pop("PD_PROMPT", None)
        if run.session_id:
            env["PORT_DADDY_SESSION"] = run.session_id
        if run.fleet:
            env["PD_FLEET"] = run.fleet
        if run.project_dir:
            env["PD_PROJECT_DIR"] = run.project_dir
        return env

    def _exec_env(self, run: Run, prompt: str, *, command: str = "the command") -> tuple[dict[str, str], str | None]:
        """The environment ``run``'s child gets, and why its exec would be refused (``exec_problem``; None: it would
        not). ``PD_PROMPT`` holds the prompt when it fits, in one string and in the exec as a whole: a backend that
        has it on stdin goes without rather than be refused; a custom command (its only way) is refused. Asked
        before the run is registered, so a session id's worth of ``PORT_DADDY_SESSION`` is counted for the one it
        gets then."""

        def problem_with(env: dict[str, str]) -> str | None:
            session = {} if run.session_id else {"PORT_DADDY_SESSION": new_session_id()}  # one of the same length
            return exec_problem(run.task, prompt, command=command, env={**env, **session})

        env = self._child_env(run, prompt if prompt_fits(prompt) else None)
        problem = problem_with(env)
        if problem is not None and "PD_PROMPT" in env and run.task.backend in STDIN_BACKENDS:
            env = self._child_env(run, None)
            problem = problem_with(env)
        return env, problem

    def exec_problem(self, task: Task, *, identity: str) -> str | None:
        """Why a ``pd spawn`` of ``task`` could not start (``_exec_env``), asked before it is spawned."""
        run = Run(new_id("spawn", "spawn"), "spawn", "spawn", identity, task)  # as spawn makes it, ids of one length
        return self._exec_env(run, task.prompt, command="task")[1]

    async def _execute(self, run: Run, lf: LiveFleet | None) -> None:
        try:
            await self._supervise(run)
        except Exception as exc:  # a bug in one run's bookkeeping, or the store refusing it, must not stop the daemon
            if isinstance(exc, StoreError):
                log.warning("fleet: run %s: %s", run.id, exc.message)
            else:
                log.exception("fleet: run %s failed in the supervisor", run.id)
            if run.status in ("queued", "running"):
                run.status, run.error, run.ended_at = "failed", f"supervisor error: {exc}", now_ms()
                # Refused too (the store refused its start): tried again until it is taken, the run live meanwhile
                # so that pd spawn kill is refused as other writes are, not told of a run the store says is
                # queued. A daemon stopping meanwhile leaves the row as it was, for the next start to settle.
                while not await self.store.background(partial(self.runs.update, run)):
                    pass
        finally:
            if lf is not None:
                lf.running.pop(run.id, None)
                lf.wake.set()
            self.live.pop(run.id, None)
            run.done.set()
            if lf is not None and run.stop_reason is None:
                with self.store.unless_refused(f"fleet: what follows run {run.id} (respawn, chain)"):
                    self._after(lf, run)
            with self.store.unless_refused("fleet: forgetting the runs no longer kept"):
                self._forget_old_runs()

    async def _supervise(self, run: Run) -> None:
        task = run.task
        run.log_path = str(self.logs_dir / f"{run.id}.log")
        prompt = with_trigger_context(task.prompt, run.trigger)
        # Kept as sent, not rebuilt when asked: the block this appends has changed before (pd fleet show).
        self.runs.record_prompt(run, prompt)
        # On stdin, never an argument, which any local user can read (spec/fleet.md, "The prompt goes on stdin"); in
        # PD_PROMPT too when it fits (a custom command's only way).
        on_stdin = task.backend in STDIN_BACKENDS
        stdin = prompt.encode("utf-8", "surrogateescape") if on_stdin else None  # as an exec would encode it
        env, problem = self._exec_env(run, prompt)
        try:
            if problem is not None:  # else E2BIG, after the run was registered
                raise bad_input(problem)
            argv = argv_for(task)
        except PDError as exc:
            Path(run.log_path).write_text(f"# {run.id}: not started: {exc.message}\n")
            run.status, run.error, run.started_at, run.ended_at = "failed", exc.message, now_ms(), now_ms()
            self.runs.update(run)
            self._emit_exit(run)
            return
        # Registering and starting are one step a stop cannot cut in two: cut between them, the run would stay
        # queued with an agent and a session already made, left behind until a restart. Both steps are quick; a
        # stop that comes meanwhile finds a running run and ends it as it ends any (lost, or killed by down).
        with trio.CancelScope(shield=True):
            run.session_id = await citizen.enter(self.app, run)
            self._enter_harbor(run)
            with open(run.log_path, "a") as header:
                how = f"; its prompt ({len(stdin):,} bytes) on stdin" if stdin is not None else ""
                header.write(f"# {run.id} ({run.identity}) attempt {run.attempt}: {' '.join(argv[:2])} …{how}\n")
            try:
                env = self._child_env(run, prompt if "PD_PROMPT" in env else None)  # now with its session
                proc = await children.start(argv, cwd=task.cwd, env=env, log_path=Path(run.log_path),
                                            umask=self.app.child_umask, stdin=stdin)  # fmt: skip
            except OSError as exc:
                run.status, run.error = "failed", f"cannot start: {exc}"
                run.started_at = run.ended_at = now_ms()
                self.runs.update(run)
                self._emit_exit(run)
                self._crashed(run, run.error)
                return
            if self.settings.test_starting_pause_s:
                await trio.sleep(self.settings.test_starting_pause_s)
        run.pid, run.pid_start = proc.pid, start_time(proc.pid)
        run.status, run.started_at = "running", now_ms()
        self.runs.update(run)
        self.app.bus.emit("fleet.run.start", agent=run.agent, runId=run.id, status=run.status, pid=run.pid,
                          projectDir=run.project_dir, attempt=run.attempt)  # fmt: skip
        timed_out = False
        try:
            with run.scope, trio.move_on_after(task.timeout_s or math.inf) as deadline:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._heartbeat, run)
                    await proc.wait()
                    nursery.cancel_scope.cancel()
            timed_out = deadline.cancelled_caught
        except* trio.Cancelled:
            # Not our own scope (caught above): the fleet is going down (stop_reason set) or the daemon is stopping.
            # except*: out of the nursery, Cancelled comes wrapped in an exception group.
            run.stop_reason = run.stop_reason or SHUTTING_DOWN
            raise
        finally:
            with trio.CancelScope(shield=True):
                await children.stop(proc, self.settings.grace_s)
                await self._record_end(run, proc.returncode, timed_out)

    async def _heartbeat(self, run: Run) -> None:
        while True:
            await trio.sleep(self.settings.heartbeat_s)
            await citizen.heartbeat(self.app, run)

    def _enter_harbor(self, run: Run) -> None:
        lf = self.fleets.get(run.project_dir or "")
        harbors = getattr(self.app, "harbors", None)
        if lf is not None and lf.config.harbor and harbors is not None:
            harbors.enter(lf.config.harbor, run.agent_id, identity=run.identity, capabilities=[run.agent])

    def _leave_harbor(self, run: Run) -> None:
        harbors = getattr(self.app, "harbors", None)
        if harbors is None:
            return
        for harbor in harbors.of_agent(run.agent_id):
            harbors.leave(harbor.name, run.agent_id)

    async def _record_end(self, run: Run, code: int | None, timed_out: bool) -> None:
        run.exit_code, run.ended_at = code, now_ms()
        run.log_dropped = cap_log(run)
        if run.stop_reason == SHUTTING_DOWN:
            # As after a daemon SIGKILL: the work was cut off, not finished or refused, so it goes to salvage.
            run.status, run.error = "lost", f"{SHUTTING_DOWN}: stopped while it ran; its session went to salvage"
        elif run.stop_reason is not None:
            run.status, run.error = "killed", run.stop_reason
        elif timed_out:
            run.status, run.error = "timeout", f"ran past its timeout of {run.task.timeout_s:g}s and was stopped"
        elif code == 0:
            run.status = "completed"
        else:
            run.status = "failed"
            run.error = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        self.runs.update(run)
        self._emit_exit(run)
        self._leave_harbor(run)
        if run.status == "completed":
            await citizen.done(self.app, run, f"Completed: {self.output_tail(run, citizen.NOTE_OUTPUT_MAX)}",
                               fixes=self.runs.same_agent(run, created_before=True))  # fmt: skip
        elif run.status == "killed":  # stopped on purpose: says nothing of the agent's earlier failures
            await citizen.done(self.app, run, f"Stopped: {self.output_tail(run, citizen.NOTE_OUTPUT_MAX)}")
        else:
            self._crashed(run, f"fleet run {run.id} {run.status}: {run.error}")

    def _crashed(self, run: Run, reason: str) -> None:
        """The run died: to salvage, its entry standing for its fleet agent's earlier pending ones (spec/fleet.md,
        "Repeated failures")."""
        citizen.crashed(self.app, run, reason, supersedes=self.runs.same_agent(run))

    def _emit_exit(self, run: Run) -> None:
        self.app.bus.emit("fleet.run.exit", agent=run.agent, runId=run.id, status=run.status,
                          projectDir=run.project_dir, exitCode=run.exit_code)  # fmt: skip

    def output_tail(self, run: Run, limit: int = OUTPUT_TAIL) -> str:
        """The end of a run's output (without our header lines)."""
        if not run.log_path:
            return ""
        try:
            with open(run.log_path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - limit * 4))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        lines = [line for line in text.splitlines() if not line.startswith(f"# {run.id}")]
        return "\n".join(lines).strip()[-limit:]

    # -- chaining, respawn, circuit breaker ----------------------------------------------------------------

    def _after(self, lf: LiveFleet, run: Run) -> None:
        spec = lf.config.agents.get(run.agent)
        if spec is None:
            return
        state = lf.state(run.agent)
        if run.status == "completed":
            state.failures.clear()
            self._publish_result(spec, run, spec.on_success)
            return
        now = trio.current_time()
        state.failures.append(now)
        while state.failures and state.failures[0] <= now - self.settings.respawn_window_s:
            state.failures.popleft()
        if spec.respawn and len(state.failures) <= spec.max_respawns:
            # Queued at once, to start after the backoff: a daemon stop meanwhile keeps it, as it keeps any queued run.
            self.fire(lf, run.agent, run.trigger or {"source": "respawn"}, attempt=run.attempt + 1,
                      delay_s=self.settings.respawn_delay_s * 2 ** min(run.attempt, 5))  # fmt: skip
            return
        if spec.respawn:
            self._open_circuit(lf, spec, run, len(state.failures))
        self._publish_result(spec, run, spec.on_failure)

    def _open_circuit(self, lf: LiveFleet, spec: AgentSpec, run: Run, failures: int) -> None:
        state = lf.state(spec.name)
        state.circuit = (f"{plural(failures, 'failure')} within {self.settings.respawn_window_s:g}s "
                         f"(max_respawns {spec.max_respawns}); last: {run.error}")  # fmt: skip
        state.circuit_at = now_ms()
        with self.store.write() as db:
            db.execute(
                "INSERT OR REPLACE INTO fleet_circuits (project_dir, agent, opened_at, reason) VALUES (?,?,?,?)",
                (lf.project_dir, spec.name, state.circuit_at, state.circuit),
            )
        for queued in [r for r in lf.queue if r.agent == spec.name]:  # a pending respawn among them: none may run
            self._finish_unstarted(queued, "cancelled", f"its agent's circuit opened: {state.circuit}")
            lf.queue.remove(queued)
        self.app.bus.emit("fleet.circuit.open", agent=spec.name, runId=run.id, status="open",
                          projectDir=lf.project_dir, reason=state.circuit)  # fmt: skip
        self.app.publish("fleet", {"event": "circuit-open", "fleet": lf.config.name, "agent": spec.name,
                                   "runId": run.id, "reason": state.circuit,
                                   "reset": f"pd fleet reset {spec.name}"}, sender="fleet")  # fmt: skip

    def _publish_result(self, spec: AgentSpec, run: Run, channel: str | None) -> None:
        if not channel:
            return
        payload = {"agent": spec.name, "runId": run.id, "status": run.status, "exitCode": run.exit_code,
                   "error": run.error, "output": self.output_tail(run), "fleet": run.fleet,
                   "projectDir": run.project_dir, "trigger": run.trigger}  # fmt: skip
        self.app.publish(channel, payload, sender=run.identity)

    # -- views ---------------------------------------------------------------------------------------------

    def status(self, project_dir: str | None = None) -> list[dict[str, Any]]:
        fleets = [self.get(project_dir)] if project_dir else list(self.fleets.values())
        return [self._fleet_view(lf) for lf in fleets]

    def _fleet_view(self, lf: LiveFleet) -> dict[str, Any]:
        agents = []
        for spec in lf.config.agents.values():
            state = lf.state(spec.name)
            last = self.runs.recent(kind="fleet", project_dir=lf.project_dir, agent=spec.name, limit=1)
            agents.append({
                "name": spec.name, "identity": spec.identity, "backend": spec.backend, "enabled": spec.enabled,
                "trigger": spec.trigger, "schedule": spec.schedule,
                "nextRun": state.next_fire.isoformat() if state.next_fire and spec.schedule else None,
                "running": sum(r.agent == spec.name for r in lf.running.values()),
                "queued": sum(r.agent == spec.name for r in lf.queue),
                "failures": len(state.failures), "maxRespawns": spec.max_respawns, "respawn": spec.respawn,
                "circuit": {"open": state.circuit is not None, "reason": state.circuit, "openedAt": state.circuit_at,
                            "skipped": state.skipped},
                "lastRun": last[0].to_wire() if last else None,
            })  # fmt: skip
        limits = lf.config.limits
        return {"name": lf.config.name, "projectDir": lf.project_dir, "config": str(lf.config.path),
                "harbor": lf.config.harbor, "upAt": lf.up_at,
                "limits": {"maxConcurrentSpawns": limits.max_concurrent_spawns,
                           "maxSpawnsPerHour": limits.max_spawns_per_hour},
                "running": len(lf.running), "queued": len(lf.queue), "agents": agents,
                "warnings": lf.config.warnings,
                "problem": _gone_reason(lf) if self._project_gone(lf) else None}  # fmt: skip


def _dumps(value: Any) -> str:
    import json

    return "" if value is None else json.dumps(value, separators=(",", ":"), default=str)


def _gone_reason(lf: LiveFleet) -> str:
    return (f"project directory {lf.project_dir} is gone: nothing fires until it is back; "
            f"stop the fleet with: pd fleet down -C {lf.project_dir}")  # fmt: skip


_PATH_MAX = 4096  # Linux's: a longer path names nothing


def require_dir(project_dir: Any, *, exists: bool = True, field: str = "projectDir") -> str:
    """A project directory as the fleet keys it: absolute and resolved. ``exists=False`` also takes one that is
    gone (a fleet that is up can still be seen and brought down after its directory was deleted)."""
    if not isinstance(project_dir, str) or not project_dir.strip():
        hint = "; run pd fleet from inside the project" if field == "projectDir" else ""
        raise bad_input(f"{field} must be a directory path{hint}")
    if len(project_dir) > _PATH_MAX:
        raise bad_input(f"{field} is {len(project_dir)} characters; the limit is {_PATH_MAX}", code="PAYLOAD_TOO_LARGE")
    if "\x00" in project_dir:  # os.stat and realpath raise ValueError on one
        raise bad_input(f"{field} contains a NUL byte")
    shown = project_dir[:200]
    path = Path(project_dir).expanduser()
    if not path.is_absolute():
        raise bad_input(f"{field} must be absolute, got {shown!r}")
    try:
        is_dir, resolved = path.is_dir(), path.resolve()
    except OSError as e:  # is_dir is False for a missing path, but raises for a name over NAME_MAX
        raise bad_input(f"{field} {shown!r} cannot be looked at: {e.strerror}") from None
    except RuntimeError:  # resolve's symlink loop (until Python 3.13)
        raise bad_input(f"{field} {shown!r} runs into a symlink loop") from None
    if exists and not is_dir:
        raise bad_input(f"{field} {shown!r} is not a directory")
    return str(resolved)
