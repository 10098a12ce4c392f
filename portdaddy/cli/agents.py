"""pd agent register | heartbeat | unregister | show, pd agents, pd salvage: liveness and dead agents' work."""

from __future__ import annotations

from typing import Any

import click

from portdaddy.cli.context import forget, remember, resolve_agent, resolve_session
from portdaddy.cli.output import age, emit_json, json_option, quiet_option, warn, warning
from portdaddy.cli.transport import call
from portdaddy.text import gist, plural

_AGENT = click.option("--agent", "-a", "agent", metavar="ID",
                      help="Agent id (default: PORT_DADDY_AGENT, then this worktree's current agent).")  # fmt: skip


def warn_if_declared_dead(result: dict[str, Any], *, as_json: bool) -> None:
    """An agent back after it was declared dead hears what it lost and whose its work is now."""
    warn([result["deathNotice"]] if result.get("deathNotice") else [], as_json=as_json)


@click.group()
def agent() -> None:
    """Register an agent, send heartbeats, unregister.

    \b
    Examples:
      pd agent register --agent frontend-builder --identity payments:web --purpose "Building checkout UI" --type ai
      pd agent heartbeat --agent frontend-builder
      pd agent show frontend-builder
    """


@agent.command("register")
@_AGENT
@click.option("--identity", "-i", metavar="PROJECT:STACK[:CTX]", help="Semantic identity, e.g. payments:web.")
@click.option("--purpose", "-p", help="What the agent is doing.")
@click.option("--type", "-t", "type_", metavar="TYPE", help="ai, human, cli, ... (default cli).")
@click.option("--status", type=click.Choice(["starting", "ready", "busy", "draining"]),
              help="Declared status; sets how long silence is tolerated (default ready).")  # fmt: skip
@click.option("--cap", help="Capabilities, comma-separated (globs like db:*).")
@click.option("--max-locks", "--maxLocks", "max_locks", type=click.IntRange(1, 100_000), metavar="N",
              help="Locks the agent may hold or wait for at once (default 20).")  # fmt: skip
@click.option("--max-services", "--maxServices", "max_services", type=click.IntRange(1, 100_000), metavar="N",
              help="Services the agent may claim (default 50).")  # fmt: skip
@json_option
@quiet_option
def register(agent: str | None, identity: str | None, purpose: str | None, type_: str | None, status: str | None,
             cap: str | None, max_locks: int | None, max_services: int | None, as_json: bool,
             quiet: bool) -> None:  # fmt: skip
    """Register (or refresh) an agent; this worktree remembers it as the current agent.

    \b
    Examples:
      pd agent register --agent backend-builder --identity payments:api --purpose "Stripe API" --type ai
      pd agent register --agent migrator --max-locks 3    # a runaway loop cannot take every lock
    """
    caps = [c.strip() for c in cap.split(",") if c.strip()] if cap else None
    args = {"agentId": resolve_agent(agent), "identity": identity, "purpose": purpose, "type": type_,
            "status": status, "capabilities": caps, "maxLocks": max_locks, "maxServices": max_services}  # fmt: skip
    result = call("agent.register", args, as_json=as_json)
    warn(remember(result["agentId"]), as_json=as_json)
    if as_json:
        emit_json(result)
        return
    click.echo(result["agentId"] if quiet else f"{'Registered' if result['registered'] else 'Updated'} agent: "
               f"{result['agentId']}")  # fmt: skip
    if result.get("salvageHint"):
        warning(result["salvageHint"])
    warn_if_declared_dead(result, as_json=as_json)


@agent.command("heartbeat")
@_AGENT
@json_option
@quiet_option
def heartbeat(agent: str | None, as_json: bool, quiet: bool) -> None:
    """Tell the daemon the agent is alive (an unknown agent is registered).

    \b
    Example:
      pd agent heartbeat --agent frontend-builder
    """
    result = call("agent.heartbeat", {"agentId": resolve_agent(agent)}, as_json=as_json)
    if as_json:
        emit_json(result)
    else:
        click.echo(result["agentId"] if quiet else f"Heartbeat recorded: {result['agentId']}")
        warn_if_declared_dead(result, as_json=as_json)


@agent.command("unregister")
@_AGENT
@json_option
def unregister(agent: str | None, as_json: bool) -> None:
    """Remove an agent; its active sessions end abandoned and release their files.

    \b
    Example:
      pd agent unregister --agent frontend-builder
    """
    agent_id = resolve_agent(agent)
    result = call("agent.unregister", {"agentId": agent_id}, as_json=as_json)
    forget(agent_id=result["agentId"])
    emit_json(result) if as_json else click.echo(result["message"])


@agent.command("show")
@click.argument("agent_id")
@json_option
@quiet_option
def show(agent_id: str, as_json: bool, quiet: bool) -> None:
    """Show one agent: identity, purpose, liveness, last heartbeat. -q prints its liveness (active, stale, dead).

    \b
    Examples:
      pd agent show frontend-builder
      [ "$(pd agent show database-builder -q)" = dead ] && pd salvage --project payments
    """
    result = call("agent.get", {"id": agent_id}, as_json=as_json)
    if as_json:
        emit_json(result)
        return
    a = result["agent"]
    if quiet:
        click.echo(a["liveness"])
        return
    for label, value in (("Agent", a["id"]), ("Liveness", a["liveness"]), ("Identity", a["identity"]),
                         ("Purpose", a["purpose"]), ("Type", a["type"]), ("Status", a["status"]), ("PID", a["pid"]),
                         ("Last heartbeat", f"{age(a['lastHeartbeat'])} ago"),
                         ("Registered", f"{age(a['registeredAt'])} ago")):  # fmt: skip
        if value is not None:
            click.echo(f"{label + ':':16}{value}")


def failed_runs(failures: int | None) -> str | None:
    """``1,440 failed runs`` for a fleet agent's entry that stands for its earlier failed runs too; else None."""
    return plural(failures, "failed run") if failures and failures > 1 else None


def agent_line(a: dict[str, Any]) -> str:
    """``Active frontend-builder (payments:web, 30s ago)``; dead agents also show their salvage entry."""
    where = ", ".join(filter(None, [a.get("identity"), f"{age(a['lastHeartbeat'])} ago"]))
    line = f"{a['liveness'].capitalize():6} {a['id']} ({where})"
    if a["liveness"] == "dead" and a.get("salvageStatus"):
        runs = failed_runs(a.get("salvageFailures"))
        line += f" [salvage {a['salvageStatus']}{f', {runs}' if runs else ''}]"
    return line


def repeated_failures(e: dict[str, Any]) -> str | None:
    """``1,440 failed runs, the first 16h ago`` for an entry standing for its fleet agent's earlier runs too (not
    one superseded: the entry that superseded it stands for them now)."""
    runs = failed_runs(e.get("failures")) if e["status"] != "superseded" else None
    return f"{runs}, the first {age(e['failingSince'])} ago" if runs else None


@click.command("agents")
@click.option("--active", is_flag=True, help="Only agents heard from recently.")
@click.option("--identity", metavar="PATTERN", help="Only identities matching, e.g. 'payments:*'.")
@json_option
@quiet_option
def agents(active: bool, identity: str | None, as_json: bool, quiet: bool) -> None:
    """List agents with their liveness: Active, Stale (quiet too long) or Dead (work awaits salvage).

    \b
    Examples:
      pd agents
      pd agents --identity 'payments:*' --json
    """
    result = call("agent.list", {"active": active, "identity": identity}, as_json=as_json)
    if as_json:
        emit_json(result)
    elif quiet:
        click.echo(result["count"])
    elif not result["agents"]:
        click.echo("No agents registered")
    else:
        for a in result["agents"]:
            click.echo(agent_line(a))


@click.group("salvage", invoke_without_command=True)
@click.option("--project", "-p", metavar="P", help="Only dead agents whose identity is in P:* (globs allowed).")
@click.option("--stack", metavar="S", help="Only this stack (globs allowed).")
@click.option(
    "--all", "all_", is_flag=True, help="Every entry, also claimed, completed, dismissed and superseded ones."
)
@click.option("--limit", type=int, help="At most this many (default 50).")
@json_option
@quiet_option
@click.pass_context
def salvage(ctx: click.Context, project: str | None, stack: str | None, all_: bool, limit: int | None,
            as_json: bool, quiet: bool) -> None:  # fmt: skip
    """Dead agents' unfinished work: purpose, claimed files and last notes, ready to be taken over.

    \b
    Examples:
      pd salvage --project payments
      pd salvage claim database-builder --agent db-builder-2
      pd salvage complete database-builder
    """
    if ctx.invoked_subcommand is not None:
        return
    result = call("salvage.list", {"project": project, "stack": stack, "all": all_, "limit": limit},
                  as_json=as_json)  # fmt: skip
    if as_json:
        emit_json(result)
        return
    if quiet:
        click.echo(result["count"])
        return
    scope = f"{project}:*" if project else "all projects"
    if not result["agents"]:
        click.echo(f"No agents awaiting salvage in {scope}")
        return
    click.echo(f"Salvage queue ({scope})")
    for e in result["agents"]:
        by = e["claimedBy"] if e["status"] == "claimed" else e["completedBy"]
        click.echo(f"  {e['id']} ({e['status']}{f' by {by}' if by else ''}, dead {age(e['detectedAt'])} ago)")
        for label, value in (("Identity", e["identity"]), ("Purpose", e["purpose"]),
                             ("Failed", repeated_failures(e)),
                             ("Session", e["sessionId"]), ("Files", ", ".join(e["files"]))):  # fmt: skip
            if value:
                click.echo(f"    {label + ':':10}{value}")
        for note in e["notes"]:
            click.echo(f"    - {gist(note, 100)}")
        if e["status"] == "pending":
            click.echo(f"    Salvage:  pd salvage claim {e['id']}")
    # --all lists settled entries too, which are in no queue.
    click.echo(plural(result["count"], "salvage entry", "salvage entries") if all_
               else f"{plural(result['count'], 'agent')} in salvage queue")  # fmt: skip


def _move(action: str, dead_id: str, agent: str | None, as_json: bool) -> dict[str, Any]:
    return call(f"salvage.{action}", {"id": dead_id, "newAgentId": resolve_agent(agent)}, as_json=as_json)


@salvage.command("claim")
@click.argument("dead_agent")
@_AGENT
@json_option
def claim(dead_agent: str, agent: str | None, as_json: bool) -> None:
    """Take over DEAD_AGENT's work: prints its purpose, files and notes, and records who took it.

    \b
    Example:
      pd salvage claim database-builder --agent db-builder-2
    """
    result = _move("claim", dead_agent, agent, as_json)
    if as_json:
        emit_json(result)
        return
    context = result["context"]
    click.echo(f"Claimed {dead_agent}'s work")
    click.echo(f"  Purpose:  {context['purpose'] or '-'}")
    click.echo(f"  Session:  {context['sessionId'] or '-'}")
    if context["files"]:
        click.echo(f"  Files:    {', '.join(context['files'])}")
    for n in context["notes"]:
        click.echo(f"  [{n['type']}] {n['content']}")
    files = " ".join(f"'{f}'" for f in context["files"])
    if resolve_session(agent=agent):  # already at work here (pd begin first, as the README goes): files join it
        if files:
            click.echo(f"Continue with: pd session files claim {files}")
        return
    click.echo(
        f'Continue with: pd session start "{context["purpose"] or "continue"}"' + (f" --files {files}" if files else "")
    )


def _simple(action: str, done: str) -> click.Command:
    @json_option
    @_AGENT
    @click.argument("dead_agent")
    def command(dead_agent: str, agent: str | None, as_json: bool) -> None:
        result = _move(action, dead_agent, agent, as_json)
        emit_json(result) if as_json else click.echo(f"Salvage entry {dead_agent}: {done}")

    command.__doc__ = {
        "complete": "Mark DEAD_AGENT's salvaged work finished.\n\n\b\nExample:\n  pd salvage complete database-builder",
        "abandon": "Give a claimed entry back to the queue.\n\n\b\nExample:\n  pd salvage abandon database-builder",
        "dismiss": "Drop an entry without taking the work over.\n\n\b\nExample:\n  pd salvage dismiss database-builder",
    }[action]
    return click.command(action)(command)


for _action, _done in (("complete", "completed"), ("abandon", "back in the queue"), ("dismiss", "dismissed")):
    salvage.add_command(_simple(_action, _done))

COMMANDS = (agent, agents, salvage)
