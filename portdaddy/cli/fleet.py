"""pd fleet init | validate | up | down | status | logs | reset | run | runs | show: background agents from
pd-fleet.yml.

``validate`` and ``init`` work without the daemon (they read and write files in the project); the rest ask the
daemon, which supervises the fleet (it survives the terminal that ran ``pd fleet up``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from portdaddy.cli.context import worktree_root
from portdaddy.cli.output import age, emit_json, json_option, quiet_option, table, warning
from portdaddy.cli.spawn import echo_log
from portdaddy.cli.transport import STOPPING_S, call, fail, spinning
from portdaddy.errors import PDError, bad_input
from portdaddy.fleet import hook
from portdaddy.text import clip, plural, span


def project_dir(explicit: str | None) -> str:
    """``--dir``, else the enclosing git worktree of the current directory."""
    return str(Path(explicit).resolve() if explicit else worktree_root())


_DIR = click.option("--dir", "-C", "directory", metavar="DIR", type=click.Path(exists=True, file_okay=False),
                    help="The project (default: the current git worktree).")  # fmt: skip
# For commands about a fleet that is up: its directory may have been deleted since, and it must still be stoppable.
_UP_DIR = click.option("--dir", "-C", "directory", metavar="DIR", type=click.Path(file_okay=False),
                       help="The project (default: the current git worktree), even one deleted since.")  # fmt: skip


# init and validate work on files alone: --json prints their own result, not a daemon's reply.
_LOCAL_JSON = click.option("--json", "-j", "as_json", is_flag=True, help="Print the result as JSON.")


@click.group()
def fleet() -> None:
    """Background agents declared in pd-fleet.yml, supervised by the daemon.

    Agents fire on a channel (trigger: git:committed, or another agent's on_success), or on a
    five-field cron (schedule: "*/10 * * * *"). Each run is a registered agent with a session;
    a crash goes to salvage; respawn with a circuit breaker; limits queue bursts.

    \b
    Examples:
      pd fleet init            write a starter pd-fleet.yml and the git post-commit hook
      pd fleet validate        check the file (cycles, cron, missing backend programs)
      pd fleet up              start (or reload) the fleet in the daemon
      pd fleet status          agents, queues, breakers, last runs
      pd fleet logs qa         output of qa's latest run
      pd fleet runs qa         qa's recent runs; pd fleet show RUN: one in full, its prompt too
      pd fleet down            stop it; children get SIGTERM, then SIGKILL
    """


@fleet.command("init")
@_DIR
@click.option("--force", is_flag=True, help="Overwrite an existing fleet file with the starter.")
@click.option("--no-hook", is_flag=True, help="Do not install the git post-commit hook.")
@_LOCAL_JSON
def init(directory: str | None, force: bool, no_hook: bool, as_json: bool) -> None:
    """Write a starter pd-fleet.yml and install the git post-commit hook (merged with an existing one).

    \b
    Examples:
      pd fleet init
      pd fleet init --no-hook -C ~/src/myapp
    """
    from portdaddy.fleet.config import STARTER_FLEET, find_fleet_file

    root = Path(project_dir(directory))
    if not no_hook:
        try:
            hook.hooks_dir(root)  # before writing anything: a refused init leaves nothing behind
        except ValueError as exc:
            fail(bad_input(f"{exc}; run git init first, or pass --no-hook"), as_json=as_json)
    existing = find_fleet_file(root)
    wrote = None
    if existing is None or force:
        wrote = existing or root / "pd-fleet.yml"
        wrote.write_text(STARTER_FLEET)
    hook_path, action = None, None
    if not no_hook:
        hook_path, action = hook.install(root, home=hook.pinned_home())
    if as_json:
        emit_json({"success": True, "fleetFile": str(wrote or existing), "written": wrote is not None,
                   "hook": str(hook_path) if hook_path else None, "hookAction": action})  # fmt: skip
        return
    if wrote is not None:
        click.echo(f"Wrote {wrote}")
    else:
        click.echo(f"Kept {existing} (use --force to replace it with the starter)")
    if hook_path is not None:
        click.echo(f"Hook {action}: {hook_path} (publishes git:committed after each commit)")
    click.echo("Next: edit the file, then pd fleet validate && pd fleet up")


@fleet.command("validate")
@_DIR
@click.option("--file", "-f", "file", metavar="PATH", help="A fleet file (default: the project's).")
@_LOCAL_JSON
def validate(directory: str | None, file: str | None, as_json: bool) -> None:
    """Check the fleet file: schema, cron, the trigger graph (no cycles), backend programs on PATH.

    Works without the daemon. Exit 2 with every problem (file:line: field: what is wrong) if invalid.

    \b
    Examples:
      pd fleet validate
      pd fleet validate -f ci/pd-fleet.yml --json
    """
    from portdaddy.fleet.config import FleetConfigError, check_backends, load_fleet
    from portdaddy.fleet.loader import load_checked

    try:
        if file:
            cfg = load_fleet(Path(file))
            problems = check_backends(cfg)
            if problems:
                raise FleetConfigError([f"{file}: {p}" for p in problems], file)
        else:
            cfg = load_checked(project_dir(directory), os.environ.get("PATH"))
    except FleetConfigError as exc:
        exc.extra["valid"] = False  # the field a valid file's reply carries
        fail(exc, as_json=as_json)
    except PDError as exc:
        fail(exc, as_json=as_json)
    if as_json:
        emit_json({"success": True, "valid": True, "file": str(cfg.path), "name": cfg.name,
                   "agents": sorted(cfg.agents), "channels": sorted(cfg.channels),
                   "warnings": cfg.warnings})  # fmt: skip
        return
    for line in cfg.warnings:
        warning(line)
    click.echo(f"{cfg.path}: fleet {cfg.name!r} is valid: {plural(len(cfg.agents), 'agent')} "
               f"({', '.join(cfg.agents) or 'none'}), {plural(len(cfg.channels), 'channel')}")  # fmt: skip


@fleet.command("up")
@_DIR
@json_option
def up(directory: str | None, as_json: bool) -> None:
    """Start the project's fleet in the daemon (or reload it after editing the file).

    The fleet's children get this shell's PATH. Refused (exit 2) if the file is invalid.

    \b
    Example:
      pd fleet up
    """
    with spinning("starting the fleet…"):
        result = call("fleet.up", {"projectDir": project_dir(directory), "path": os.environ.get("PATH")},
                      as_json=as_json, takes=STOPPING_S)  # fmt: skip
    if as_json:
        emit_json(result)
        return
    for line in result["warnings"]:
        warning(line)
    view = result["fleet"]
    click.echo(f"Fleet {view['name']!r} is up: {plural(len(view['agents']), 'agent')} in {view['projectDir']}")


@fleet.command("down")
@_UP_DIR
@json_option
def down(directory: str | None, as_json: bool) -> None:
    """Stop the fleet: queued runs are cancelled, running children get SIGTERM, then SIGKILL after a grace period.

    pd waits up to 5 minutes for them to stop, then PORT_DADDY_TIMEOUT (10s) for the daemon's reply.

    \b
    Examples:
      pd fleet down
      PORT_DADDY_TIMEOUT=1m pd fleet down    # on a slow machine
    """
    with spinning("stopping the fleet…"):
        result = call("fleet.down", {"projectDir": project_dir(directory)}, as_json=as_json,
                      takes=STOPPING_S)  # fmt: skip
    if as_json:
        emit_json(result)
    elif result["stopped"]:
        click.echo(
            f"Fleet stopped: {plural(result['killed'], 'run')} stopped, "
            f"{plural(result['cancelled'], 'queued run')} cancelled"
        )
    else:
        click.echo("No fleet was up for this project")


def _agent_state(agent: dict[str, Any]) -> str:
    if agent["circuit"]["open"]:
        return "circuit open"
    if not agent["enabled"]:
        return "disabled"
    if agent["running"]:
        return "running"
    return "queued" if agent["queued"] else "idle"


@fleet.command("status")
@_UP_DIR
@click.option("--all", "-a", "all_", is_flag=True, help="Every fleet that is up, not just this project's.")
@json_option
def status(directory: str | None, all_: bool, as_json: bool) -> None:
    """Agents of the fleet: state, trigger, queue, failures, circuit breaker, last run.

    \b
    Examples:
      pd fleet status
      pd fleet status --all --json
    """
    result = call("fleet.status", {} if all_ else {"projectDir": project_dir(directory)}, as_json=as_json)
    if as_json:
        emit_json(result)
        return
    for view in result["fleets"]:
        limits = view["limits"]
        click.echo(
            f"Fleet {view['name']!r} ({view['projectDir']}): {view['running']} running, {view['queued']} "
            f"queued; limits {limits['maxConcurrentSpawns']} at once, {limits['maxSpawnsPerHour']}/hour"
        )
        rows = []
        for a in view["agents"]:
            last = a["lastRun"]
            rows.append(
                [
                    a["name"],
                    _agent_state(a),
                    a["trigger"] or f"cron {a['schedule']}",
                    a["backend"],
                    a["queued"],
                    f"{a['failures']}/{a['maxRespawns']}" if a["respawn"] else a["failures"],
                    f"{last['status']} {age(last['endedAt'] or last['createdAt'])} ago" if last else "-",
                ]
            )
        table(rows, ["AGENT", "STATE", "FIRES ON", "BACKEND", "QUEUED", "FAILURES", "LAST RUN"])
        if view["problem"]:
            click.echo(f"  problem: {view['problem']}")
        for a in view["agents"]:
            if a["circuit"]["open"]:
                click.echo(f"  {a['name']}: circuit open: {a['circuit']['reason']} (pd fleet reset {a['name']})")


@fleet.command("logs")
@click.argument("agent", required=False)
@_UP_DIR
@click.option("--run", "run_id", metavar="ID", help="A particular run (see pd fleet runs).")
@click.option("--tail", type=int, default=64_000, show_default=True, help="Bytes from the end of the log.")
@json_option
def logs(agent: str | None, directory: str | None, run_id: str | None, tail: int, as_json: bool) -> None:
    """Output of the latest run of the fleet, of AGENT, or of --run ID.

    \b
    Examples:
      pd fleet logs qa
      pd fleet logs --run fleet-qa-1a2b3c4d
    """
    args = {"projectDir": project_dir(directory), "agent": agent, "runId": run_id, "tail": tail}
    result = call("fleet.logs", args, as_json=as_json)
    if as_json:
        emit_json(result)
        return
    run = result["run"]
    click.echo(f"== {run['id']} ({run['agent']}) {run['status']}", err=True)
    echo_log(result)


@fleet.command("runs")
@click.argument("agent", required=False)
@_UP_DIR
@click.option("--limit", type=int, default=20, show_default=True, help="Show at most this many.")
@json_option
@quiet_option
def runs(agent: str | None, directory: str | None, limit: int, as_json: bool, quiet: bool) -> None:
    """Recent runs of the fleet's agents, newest first. -q prints how many. pd fleet show RUN shows one in full.

    \b
    Example:
      pd fleet runs qa --limit 5
    """
    result = call("fleet.runs", {"projectDir": project_dir(directory), "agent": agent, "limit": limit},
                  as_json=as_json)  # fmt: skip
    if as_json:
        emit_json(result)
        return
    if quiet:
        click.echo(result["count"])
        return
    if not result["runs"]:
        click.echo(f"No runs of {agent} yet" if agent else "No runs yet")
        return
    table([[r["id"], r["agent"], r["status"], r["attempt"], (r["trigger"] or {}).get("source", "-"),
            r["exitCode"], age(r["createdAt"])] for r in result["runs"]],
          ["RUN", "AGENT", "STATUS", "ATTEMPT", "TRIGGER", "EXIT", "AGE"])  # fmt: skip


def _fired_by(trigger: dict[str, Any] | None) -> str:
    """What fired a run, on one line; the message itself is in the prompt, and whole under --json."""
    trigger = trigger or {}
    source = trigger.get("source", "-")
    if source == "channel":
        said = f"channel {trigger.get('channel')} from {trigger.get('sender') or 'unknown'}"
        return said + (f" (message {trigger['messageId']})" if trigger.get("messageId") is not None else "")
    if source == "schedule":
        return f"schedule {trigger.get('schedule')} (due {trigger.get('firedAt')})"
    if source == "manual":
        return f"pd fleet run (by {trigger.get('by') or 'unknown'})"
    return source


def _took(start: int | None, end: int | None) -> str:
    return span(max(0, (end - start) // 1000)) if start and end else "-"


@fleet.command("show")
@click.argument("run_id", metavar="RUN")
@json_option
@quiet_option
def show(run_id: str, as_json: bool, quiet: bool) -> None:
    """One run in full: the prompt it was sent (with its Trigger context block), or a custom agent's command, what
    fired it, when, how it ended, its log. RUN is an id from pd fleet runs (or pd spawned). -q prints its status.

    Exit 1 for a run the daemon does not know (never made, or past keeping: an agent keeps its last 100 runs).

    \b
    Examples:
      pd fleet show fleet-qa-1a2b3c4d
      pd fleet show fleet-qa-1a2b3c4d --json | jq -r .prompt
    """
    result = call("fleet.show", {"runId": run_id}, as_json=as_json)
    if as_json:
        emit_json(result)
        return
    run = result["run"]
    if quiet:
        click.echo(run["status"])
        return
    whose = f"agent {run['agent']} of fleet {run['fleet']}" if run["kind"] == "fleet" else "pd spawn"
    ended = run["status"] + (f", exit {run['exitCode']}" if run["exitCode"] is not None else "")
    backend = ", ".join(f"{k} {v}" for k, v in (("model", run["model"]), ("tools", result["allowedTools"])) if v)
    timeout = f"; timeout {span(result['timeout'] // 1000)}" if result["timeout"] else ""
    log = run["logPath"] or "-"
    if run["logDropped"]:
        log += f" ({run['logDropped']:,} bytes cut from its middle)"
    rows = [("Run", f"{run['id']} ({whose}, attempt {run['attempt']})"), ("Status", ended), ("Error", run["error"]),
            ("Backend", run["backend"] + (f" ({backend})" if backend else "")),
            ("Fired by", _fired_by(run["trigger"])), ("Queued", f"{age(run['createdAt'])} ago"),
            ("Started", run["startedAt"] and f"{age(run['startedAt'])} ago"),
            ("Ended", run["endedAt"] and f"{age(run['endedAt'])} ago (ran "
                                         f"{_took(run['startedAt'], run['endedAt'])}{timeout})"),
            ("Workdir", result["workdir"]), ("Log", log), ("Session", run["sessionId"]),
            ("Values", " ".join(f"{k}={v}" for k, v in result["variables"].items()) or None)]  # fmt: skip
    payload = (run["trigger"] or {}).get("payload")
    if payload is not None:
        rows.append(("Message", clip(json.dumps(payload, separators=(",", ":")), 300) + " (whole: --json)"))
    for label, value in rows:
        if value:
            click.echo(f"{label + ':':10}{value}")
    if result["command"] is not None:  # its own block: a command may be several lines
        click.echo("Command (run by /bin/sh -c, the values above in its environment):")
        click.echo(result["command"])
    prompt = result["prompt"]
    if prompt is None:
        why = "not sent yet: the run is queued" if run["status"] == "queued" else (
            "none kept: the run never started, or ran before prompts were kept")  # fmt: skip
        click.echo(f"Prompt:   {why}")
        return
    if result["command"] and not prompt:
        return  # a custom command with no prompt: PD_PROMPT was empty
    cut = f"; {result['promptDropped']:,} characters cut from its middle" if result["promptDropped"] else ""
    click.echo(f"Prompt (as sent{', in PD_PROMPT' if result['command'] else ''}{cut}):")
    click.echo(prompt)


@fleet.command("run")
@click.argument("agent")
@_DIR
@json_option
@quiet_option
def run_now(agent: str, directory: str | None, as_json: bool, quiet: bool) -> None:
    """Queue one run of AGENT now (limits still apply).

    \b
    Example:
      pd fleet run docs -q
    """
    result = call("fleet.run", {"projectDir": project_dir(directory), "agent": agent}, as_json=as_json)
    if as_json:
        emit_json(result)
    else:
        click.echo(result["run"]["id"] if quiet else f"Queued {result['run']['id']}")


@fleet.command("reset")
@click.argument("agent")
@_UP_DIR
@json_option
@quiet_option
def reset(agent: str, directory: str | None, as_json: bool, quiet: bool) -> None:
    """Close AGENT's circuit breaker (opened after too many failed respawns) and forget its failures.

    -q prints closed, or not-open if it was not open.

    \b
    Example:
      pd fleet reset qa
    """
    result = call("fleet.reset", {"projectDir": project_dir(directory), "agent": agent}, as_json=as_json)
    if as_json:
        emit_json(result)
    elif quiet:
        click.echo("closed" if result["wasOpen"] else "not-open")
    else:
        click.echo(f"Circuit of {agent} closed" if result["wasOpen"] else f"Circuit of {agent} was not open")


@fleet.group("hook", hidden=True)
def hook_group() -> None:
    """Entry points of the git hooks pd fleet init installs."""


@hook_group.command("post-commit")
@click.argument("sha", required=False)
@click.argument("branch", required=False)
@json_option
def post_commit(sha: str | None, branch: str | None, as_json: bool) -> None:
    """Publish git:committed for the commit SHA on BRANCH, as the hook read them (default: HEAD now).

    Called by .git/hooks/post-commit; silent unless --json.
    """
    payload = hook.commit_payload(Path.cwd(), sha, branch)
    result = call("msg.publish", {"channel": "git:committed", "payload": payload,
                                  "sender": f"git:{payload['project']}"}, as_json=as_json)  # fmt: skip
    if as_json:
        emit_json(result)


COMMANDS = [fleet]
