"""pd spawn | spawned | spawn kill | spawn logs: one-off agents the daemon supervises like fleet agents."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from portdaddy.cli.output import age, emit_json, json_option, quiet_option, table
from portdaddy.cli.transport import STOPPING_S, call, refuse_reply, spinning
from portdaddy.durations import parse_duration_ms

_BACKENDS = ("claude-cli", "claude", "codex", "gemini", "aider", "ollama", "custom")


class SpawnGroup(click.Group):
    """``pd spawn [options] -- TASK`` runs; ``pd spawn kill|logs|wait ID`` are subcommands."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = ["start", *args]
        return super().parse_args(ctx, args)


@click.group(cls=SpawnGroup)
def spawn() -> None:
    """Start a one-off background agent, supervised by the daemon (its own process group, a log file,
    registered as an agent with a session; a crash goes to salvage).

    \b
    Examples:
      pd spawn --backend claude -- "find flaky tests in tests/"
      pd spawn --backend custom --wait -- make lint
      pd spawned
      pd spawn logs spawned-1a2b3c4d5e6f
      pd spawn kill spawned-1a2b3c4d5e6f
    """


def echo_log(result: dict[str, Any]) -> None:
    """A ``spawn.logs`` / ``fleet.logs`` reply: the log on stdout; on stderr, whether output was cut from it."""
    dropped = result["run"].get("logDropped")
    if dropped:
        click.echo(f"note: {dropped:,} bytes of output were cut from the middle of this run's log (a log keeps the "
                   "start and the end of a run's output; the cut is marked in it)", err=True)  # fmt: skip
    click.echo(result["log"], nl=False)


def _print_run(run: dict[str, Any]) -> None:
    click.echo(f"{run['id']}: {run['status']} ({run['backend']})" + (f": {run['error']}" if run["error"] else ""))


@spawn.command("start")
@click.argument("task", nargs=-1, required=True)
@click.option("--backend", "-b", type=click.Choice(_BACKENDS), default="claude-cli", show_default=True,
              help="The agent CLI to run (custom: TASK is a shell command).")  # fmt: skip
@click.option("--model", "-m", help="Model name for the backend.")
@click.option("--identity", "-i", help="Semantic identity of the agent (default spawned:BACKEND).")
@click.option("--timeout", "-t", metavar="DURATION",
              help="Stop it after e.g. 90s, 10m, 1h (default 5m). A bare number is milliseconds, as everywhere in "
                   "pd (in pd-fleet.yml it is seconds); under 1s is refused as a likely unit mistake.")  # fmt: skip
@click.option("--allowed-tools", help="claude-cli --allowedTools, e.g. 'Read,Grep'.")
@click.option("--workdir", "-w", type=click.Path(file_okay=False, exists=True), help="Run it here (default: .).")
@click.option("--wait", is_flag=True, help="Wait until it ends; print its output; exit 1 unless it completed.")
@json_option
@quiet_option
def start(task: tuple[str, ...], backend: str, model: str | None, identity: str | None, timeout: str | None,
          allowed_tools: str | None, workdir: str | None, wait: bool, as_json: bool, quiet: bool) -> None:  # fmt: skip
    """Start an agent on TASK (a prompt; for --backend custom, a shell command). Prints its id.

    \b
    Examples:
      pd spawn -- "summarise TODO comments"
      pd spawn -b custom -q -- ./scripts/nightly.sh
    """
    args = {
        "backend": backend,
        "task": " ".join(task),
        "model": model,
        "identity": identity,
        "timeout": timeout,
        "allowedTools": allowed_tools,
        "workdir": os.path.abspath(workdir or "."),
        "path": os.environ.get("PATH"),
    }
    result = call("spawn.start", args, as_json=as_json)
    if wait:
        ms = parse_duration_ms(timeout) if timeout else None
        with spinning(f"waiting for {result['agentId']}…"):
            result = call("spawn.wait", {"id": result["agentId"]}, as_json=as_json,
                          takes=None if ms is None else ms / 1000 + STOPPING_S)  # fmt: skip
        run = result["run"]
        if as_json and run["status"] != "completed":
            why = f": {run['error']}" if run["error"] else ""
            refuse_reply("RUN_FAILED", f"{run['id']} ended {run['status']}{why}", result)
        if as_json:
            emit_json(result)
        else:
            if not quiet:
                _print_run(run)
            click.echo(result["output"])
        sys.exit(0 if run["status"] == "completed" else 1)
    if as_json:
        emit_json(result)
    else:
        click.echo(result["agentId"] if quiet else f"Spawned {result['agentId']} ({backend})")


@spawn.command("kill")
@click.argument("run_id", metavar="ID")
@json_option
@quiet_option
def kill(run_id: str, as_json: bool, quiet: bool) -> None:
    """Stop a spawned agent (or a fleet run): SIGTERM to its process group, then SIGKILL after a grace period.

    -q prints the run's status afterwards (killed, or how it had already ended). pd waits up to 5 minutes for
    it to stop, then PORT_DADDY_TIMEOUT (10s) for the daemon's reply.

    \b
    Examples:
      pd spawn kill spawned-1a2b3c4d5e6f
      PORT_DADDY_TIMEOUT=1m pd spawn kill spawned-1a2b3c4d5e6f    # on a slow machine
    """
    with spinning(f"stopping {run_id}…"):
        result = call("spawn.kill", {"id": run_id}, as_json=as_json, takes=STOPPING_S)
    if as_json:
        emit_json(result)
    elif quiet:
        click.echo(result["run"]["status"])
    else:
        _print_run(result["run"])


@spawn.command("logs")
@click.argument("run_id", metavar="ID")
@click.option("--tail", type=int, default=64_000, show_default=True, help="Bytes from the end of the log.")
@json_option
def logs(run_id: str, tail: int, as_json: bool) -> None:
    """Output of a spawned agent (or a fleet run).

    \b
    Example:
      pd spawn logs spawned-1a2b3c4d5e6f
    """
    result = call("spawn.logs", {"id": run_id, "tail": tail}, as_json=as_json)
    if as_json:
        emit_json(result)
    else:
        echo_log(result)


@click.command("spawned")
@click.option("--limit", type=int, default=50, show_default=True, help="Show at most this many.")
@json_option
@quiet_option
def spawned(limit: int, as_json: bool, quiet: bool) -> None:
    """Spawned agents, newest first. -q prints how many.

    \b
    Example:
      pd spawned --json
    """
    result = call("spawn.list", {"limit": limit}, as_json=as_json)
    if as_json:
        emit_json(result)
        return
    if quiet:
        click.echo(result["count"])
        return
    if not result["agents"]:
        click.echo("No spawned agents")
        return
    table([[a["id"], a["backend"], a["model"] or "-", a["status"], age(a["createdAt"])] for a in result["agents"]],
          ["AGENT ID", "BACKEND", "MODEL", "STATUS", "AGE"])  # fmt: skip


COMMANDS = [spawn, spawned]
