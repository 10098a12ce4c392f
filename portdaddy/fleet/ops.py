"""Operations of the fleet (``fleet.*``) and of one-off supervised agents (``spawn.*``)."""

from __future__ import annotations

import os
from typing import Any

import trio

from portdaddy.core import validate as v
from portdaddy.core.ops import Ctx, Op, Param
from portdaddy.errors import PDError, bad_input
from portdaddy.fleet.backends import Task, find_binary, normalise_backend
from portdaddy.fleet.runs import Run
from portdaddy.fleet.spec import variable_env
from portdaddy.fleet.supervisor import require_dir

LOG_TAIL_DEFAULT = 64_000
LOG_TAIL_MAX = 1_000_000


def _dir(name: str, value: Any) -> str:
    return require_dir(value, field=name)


def _dir_or_gone(name: str, value: Any) -> str:
    return require_dir(value, exists=False, field=name)


_duration_up_to_a_week = v.duration(7 * 86_400_000)


def _spawn_timeout(name: str, value: Any) -> int:
    ms = _duration_up_to_a_week(name, value)
    if ms < 1000:  # `30` meaning 30 ms is almost always a unit mistake (`timeout: 30` in pd-fleet.yml is seconds)
        text = str(value).strip()
        raise bad_input(f"--timeout {text} is {ms} ms, too short for any agent; give a unit, e.g. --timeout "
                        f"{text}s or 10m (a bare number is milliseconds)")  # fmt: skip
    return ms


def _env_map(name: str, value: Any) -> dict[str, str]:
    value = v.json_object(16_000)(name, value)
    bad = [k for k, item in value.items() if not isinstance(item, str) or not k or "=" in k or "\x00" in k + item]
    if bad:
        raise bad_input(f"{name} must map variable names to text; bad: {', '.join(map(str, bad[:5]))}")
    return value


_PROJECT = Param("projectDir", _dir, required=True, aliases=("project_dir", "dir"))
# Down, status, runs, logs and reset also take a directory that is gone (its fleet may still be up).
_PROJECT_KNOWN = Param("projectDir", _dir_or_gone, required=True, aliases=("project_dir", "dir"))
_PROJECT_OPT = Param("projectDir", _dir_or_gone, aliases=("project_dir", "dir"))
_AGENT = Param("agent", v.name("agent name", 64), required=True, aliases=("agentName", "name"))
_TAIL = Param("tail", v.integer(1, LOG_TAIL_MAX), default=LOG_TAIL_DEFAULT)
_PATH = Param("path", v.text(10_000, strip=False))


def _log_reply(run: Run, tail: int) -> dict[str, Any]:
    text = ""
    if run.log_path:
        try:
            with open(run.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - tail))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            text = ""
    return {"success": True, "run": run.to_wire(), "log": text}


# -- fleet ------------------------------------------------------------------------------------------------


async def _up(ctx: Ctx, *, projectDir: str, path: str | None) -> dict[str, Any]:
    lf = await ctx.app.fleet.up(projectDir, path_env=path)
    return {"success": True, "fleet": ctx.app.fleet.status(lf.project_dir)[0], "warnings": lf.config.warnings}


async def _down(ctx: Ctx, *, projectDir: str) -> dict[str, Any]:
    return {"success": True, "projectDir": projectDir, **await ctx.app.fleet.down(projectDir)}


def _status(ctx: Ctx, *, projectDir: str | None) -> dict[str, Any]:
    fleets = ctx.app.fleet.status(projectDir)
    return {"success": True, "fleets": fleets, "count": len(fleets)}


def _run(ctx: Ctx, *, projectDir: str, agent: str) -> dict[str, Any]:
    fleet = ctx.app.fleet
    lf = fleet.get(projectDir)
    spec = lf.config.agents.get(agent)
    if spec is not None and not spec.enabled:
        raise PDError("CONFLICT", f"agent {agent!r} is disabled (enabled: false in {lf.config.path}); set enabled: "
                                  "true and reload with pd fleet up to run it")  # fmt: skip
    run = fleet.fire(lf, agent, {"source": "manual", "by": ctx.agent_id})
    if run is None:
        circuit = lf.state(agent).circuit
        if circuit is not None:
            raise PDError("CONFLICT", f"agent {agent!r} not run: its circuit is open ({circuit}); close it with "
                                      f"pd fleet reset {agent}")  # fmt: skip
        raise PDError("CONFLICT", f"agent {agent!r} not run: the fleet's queue is full ({len(lf.queue)} runs "
                                  "waiting); let it drain (pd fleet status), or cancel all: pd fleet down")  # fmt: skip
    return {"success": True, "run": run.to_wire()}


def _reset(ctx: Ctx, *, projectDir: str, agent: str) -> dict[str, Any]:
    return {"success": True, "agent": agent, "wasOpen": ctx.app.fleet.reset(projectDir, agent)}


def _known_agent(ctx: Ctx, project_dir: str | None, agent: str | None) -> None:
    """Refuse an agent name that neither the fleet that is up nor any past run knows (a typo, not "no runs")."""
    if agent is None:
        return
    fleet = ctx.app.fleet
    lf = fleet.fleets.get(project_dir or "")
    if lf is not None and agent in lf.config.agents:
        return
    if fleet.runs.recent(kind="fleet", project_dir=project_dir, agent=agent, limit=1):
        return  # an agent since removed from the file: its runs are still there
    where = f"fleet {lf.config.name!r}" if lf is not None else "any fleet that is up or has run"
    raise PDError("NOT_FOUND", f"agent {agent!r} does not exist in {where}; see pd fleet status")


def _runs(ctx: Ctx, *, projectDir: str | None, agent: str | None, limit: int) -> dict[str, Any]:
    _known_agent(ctx, projectDir, agent)
    runs = ctx.app.fleet.runs.recent(kind="fleet", project_dir=projectDir, agent=agent, limit=limit)
    return {"success": True, "runs": [r.to_wire() for r in runs], "count": len(runs)}


def _logs(ctx: Ctx, *, projectDir: str | None, agent: str | None, runId: str | None, tail: int) -> dict[str, Any]:
    fleet = ctx.app.fleet
    if runId is not None:
        return _log_reply(fleet.find(runId), tail)
    _known_agent(ctx, projectDir, agent)
    runs = fleet.runs.recent(kind="fleet", project_dir=projectDir, agent=agent, limit=1)
    if not runs:
        who = f"agent {agent!r}" if agent else "this fleet"
        raise PDError("NOT_FOUND", f"{who} has no runs yet; see pd fleet status")
    return _log_reply(fleet.live.get(runs[0].id, runs[0]), tail)


def _show(ctx: Ctx, *, runId: str) -> dict[str, Any]:
    """One run in full: what it was asked (the prompt as sent; a custom command and the values it refers to),
    with how it went (its wire shape: trigger, times, exit, log)."""
    fleet = ctx.app.fleet
    run = fleet.find(runId)
    prompt, dropped = fleet.runs.prompt_of(run.id)
    task = run.task
    return {
        "success": True, "run": run.to_wire(), "prompt": prompt, "promptDropped": dropped,
        "command": task.command if task.backend == "custom" else None,
        "variables": {variable_env(name): value for name, value in task.variables.items()},
        "allowedTools": task.allowed_tools, "workdir": task.cwd,
        "timeout": None if task.timeout_s is None else round(task.timeout_s * 1000),
    }  # fmt: skip


# -- spawn ------------------------------------------------------------------------------------------------


def _spawn(ctx: Ctx, *, backend: str, task: str, identity: str | None, model: str | None, timeout: int | None,
           allowedTools: str | None, workdir: str | None, env: dict[str, str] | None,
           path: str | None) -> dict[str, Any]:  # fmt: skip
    backend = normalise_backend(backend)
    custom = backend == "custom"
    spec = Task(backend=backend, prompt="" if custom else task, command=task if custom else None, model=model,
                allowed_tools=allowedTools, env=env or {}, cwd=workdir or str(ctx.app.settings.home),
                timeout_s=timeout / 1000 if timeout else None, path=path)  # fmt: skip
    find_binary(spec)
    identity = identity or f"spawned:{backend}"
    if (problem := ctx.app.fleet.exec_problem(spec, identity=identity)) is not None:  # refused before it is registered
        raise bad_input(problem)
    run = ctx.app.fleet.spawn(spec, identity=identity)
    return {"success": True, "agentId": run.agent_id, "status": "spawned", "run": run.to_wire()}


def _spawned(ctx: Ctx, *, limit: int) -> dict[str, Any]:
    fleet = ctx.app.fleet
    runs = [fleet.live.get(r.id, r) for r in fleet.runs.recent(kind="spawn", limit=limit)]
    return {"success": True, "agents": [r.to_wire() for r in runs], "count": len(runs)}


async def _kill(ctx: Ctx, *, id: str) -> dict[str, Any]:
    run = await ctx.app.fleet.kill(id)
    return {"success": True, "agentId": run.agent_id, "status": run.status, "run": run.to_wire()}


def _spawn_logs(ctx: Ctx, *, id: str, tail: int) -> dict[str, Any]:
    return _log_reply(ctx.app.fleet.find(id), tail)


async def _wait(ctx: Ctx, *, id: str, timeout: int | None) -> dict[str, Any]:
    run = ctx.app.fleet.find(id)
    if ctx.app.fleet.live.get(id) is run:
        with trio.move_on_after(timeout / 1000 if timeout is not None else float("inf")):
            await run.done.wait()
        if not run.done.is_set():
            raise PDError("TIMEOUT", f"run {id} is still {run.status}; wait longer or pd spawn kill {id}")
    return {"success": True, "run": run.to_wire(), "output": ctx.app.fleet.output_tail(run)}


_ID = Param("id", v.name("run id", 100), required=True, aliases=("agentId", "runId"))
_LIMIT = Param("limit", v.integer(1, 1000), default=50)

OPS = (
    Op("fleet.up", _up, (_PROJECT, _PATH), summary="load, check and start (or reload) a project's fleet"),
    Op(
        "fleet.down",
        _down,
        (_PROJECT_KNOWN,),
        summary="stop a fleet: queued runs cancelled, children SIGTERM then SIGKILL",
    ),
    Op("fleet.status", _status, (_PROJECT_OPT,), summary="fleets that are up, their agents, queues and breakers"),
    Op("fleet.run", _run, (_PROJECT, _AGENT), summary="queue one run of a fleet agent now"),
    Op("fleet.reset", _reset, (_PROJECT_KNOWN, _AGENT), summary="close an agent's circuit breaker"),
    Op(
        "fleet.runs",
        _runs,
        (_PROJECT_OPT, Param("agent", v.name("agent name", 64)), _LIMIT),
        summary="recent runs of fleet agents, newest first",
    ),
    Op(
        "fleet.logs",
        _logs,
        (_PROJECT_OPT, Param("agent", v.name("agent name", 64)), Param("runId", v.name("run id", 100)), _TAIL),
        summary="a run's output (latest run of the fleet or agent, or runId)",
    ),
    Op(
        "fleet.show",
        _show,
        (Param("runId", v.name("run id", 100), required=True, aliases=("id",)),),
        summary="one run (of a fleet agent or pd spawn) in full: the prompt it was sent, its trigger, times, exit",
    ),
    Op(
        "spawn.start",
        _spawn,
        (
            Param("backend", v.text(20), default="claude-cli"),
            Param("task", v.text(100_000, lines=True), required=True, aliases=("prompt",)),
            Param("identity", v.identity),
            Param("model", v.text(200)),
            Param("timeout", _spawn_timeout),
            Param("allowedTools", v.text(2000), aliases=("allowed_tools",)),
            Param("workdir", _dir, aliases=("cwd",)),
            Param("env", _env_map),
            _PATH,
        ),
        summary="start a one-off supervised agent; returns at once with its id",
    ),
    Op("spawn.list", _spawned, (_LIMIT,), summary="recent one-off agents, newest first"),
    Op("spawn.kill", _kill, (_ID,), summary="stop a run (spawned or fleet): SIGTERM, grace, SIGKILL"),
    Op("spawn.logs", _spawn_logs, (_ID, _TAIL), summary="a run's output"),
    Op("spawn.wait", _wait, (_ID, Param("timeout", v.duration())), summary="wait until a run has ended"),
)
