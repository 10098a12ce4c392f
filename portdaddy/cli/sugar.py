"""pd begin | done | whoami | sitrep | log: the agent lifecycle in one command each, and "catch me up"."""

from __future__ import annotations

import time
from typing import Any

import click

from portdaddy.cli.agents import repeated_failures, warn_if_declared_dead
from portdaddy.cli.context import (
    forget,
    load_current,
    remember,
    repo_paths,
    resolve_agent,
    resolve_session,
    worktree_root,
)
from portdaddy.cli.output import age, emit_json, json_option, quiet_option, since_option, until, warn, warning
from portdaddy.cli.sessions import claim_lines, claiming_call, folded_runs, hint_if_folded, holder, note_line
from portdaddy.cli.transport import call, fail
from portdaddy.errors import bad_input
from portdaddy.text import plural


@click.command("begin")
@click.argument("purpose", required=False)
@click.argument("paths", nargs=-1)
@click.option("--purpose", "-p", "purpose_opt", help="What this agent is about to do.")
@click.option("--identity", "-i", metavar="PROJECT:STACK[:CTX]", help="Semantic identity, e.g. payments:api.")
@click.option("--agent", "-a", metavar="ID", help="Agent id (default: a new agent-xxxxxxxx).")
@click.option("--type", "-t", "type_", help="ai, human, cli, ...")
@click.option("--files", "files", multiple=True, metavar="PATH", help="A path or glob to claim (repeatable).")
@click.option("--force", "-f", is_flag=True, help="Claim even where another session holds the files.")
@json_option
@quiet_option
def begin(purpose: str | None, paths: tuple[str, ...], purpose_opt: str | None, identity: str | None,
          agent: str | None, type_: str | None, files: tuple[str, ...], force: bool, as_json: bool,
          quiet: bool) -> None:  # fmt: skip
    """Register an agent and start its session in one step; this worktree remembers both.

    \b
    Examples:
      pd begin "Refactor auth" --identity myapp:api --files src/auth.ts
      pd begin -p "Write integration tests" --agent tester -q
    """
    if not (purpose_opt or purpose):
        fail(bad_input('say what this agent is about to do: pd begin "Refactor auth" (or --purpose)'))
    args = {"purpose": purpose_opt or purpose, "identity": identity, "agentId": resolve_agent(agent),
            "type": type_, "files": repo_paths([*paths, *files]), "force": force,
            "worktree": str(worktree_root())}  # fmt: skip
    result = claiming_call("agent.begin", args, as_json=as_json)
    warn(remember(result["agentId"], sessionId=result["sessionId"], purpose=result["purpose"],
                  identity=result["identity"], startedAt=result["startedAt"]), as_json=as_json)  # fmt: skip
    warn_if_declared_dead(result, as_json=as_json)
    if as_json:
        emit_json(result)
        return
    if quiet:
        click.echo(result["agentId"])
        return
    click.echo(f"Agent {result['agentId']} ready", err=True)
    click.echo(f"  Session:  {result['sessionId']}", err=True)
    click.echo(f"  Purpose:  {result['purpose']}", err=True)
    if result["identity"]:
        click.echo(f"  Identity: {result['identity']}", err=True)
    if result["fileClaims"]:
        click.echo(f"  Files:    {len(result['fileClaims'])} claimed", err=True)
    if result["salvageHint"]:
        warning(result["salvageHint"])
    for s in result["stillActive"]:
        warning(
            f"{result['agentId']} still has session {s['sessionId']} ({s['purpose']}) active, claiming "
            f"{plural(len(s['files']), 'file')}; end it with: pd session end --session {s['sessionId']}"
        )


@click.command("done")
@click.argument("note", required=False)
@click.option("--note", "-n", "note_opt", help="The handoff note.")
@click.option("--status", type=click.Choice(["completed", "abandoned"]), default="completed", show_default=True,
              help="How the session ends.")  # fmt: skip
@click.option("--agent", "-a", metavar="ID", help="The agent that is done (default: this worktree's).")
@click.option("--session", "-s", metavar="ID", help="The session to end (default: the agent's active one).")
@json_option
@quiet_option
def done(note: str | None, note_opt: str | None, status: str, agent: str | None, session: str | None,
         as_json: bool, quiet: bool) -> None:  # fmt: skip
    """End the session with a handoff NOTE, release its files and unregister the agent.

    \b
    Examples:
      pd done "Auth refactor complete; tokens rotate every 15m"
      pd done --status abandoned
    """
    args = {"agentId": resolve_agent(agent), "sessionId": resolve_session(session, agent), "note": note_opt or note,
            "status": status, "worktree": str(worktree_root())}  # fmt: skip
    result = call("agent.done", args, as_json=as_json)
    forget(agent_id=result["agentId"] if result["agentUnregistered"] else None, session_id=result["sessionId"])
    if as_json:
        emit_json(result)
        return
    if quiet:
        click.echo(result["sessionId"] or "")
        return
    if result["alreadyEnded"]:
        click.echo(f"Session {result['sessionId']} was already abandoned (its agent was declared dead)"
                   + ("; the note was added to it" if result["finalNote"] else ""), err=True)  # fmt: skip
    elif result["sessionId"]:
        click.echo(f"Session {result['sessionId']} {result['sessionStatus']}", err=True)
    else:
        click.echo("No active session to end" + (" (the note was not kept)" if note_opt or note else ""), err=True)
    if result["agentUnregistered"]:
        click.echo(f"Agent {result['agentId']} unregistered", err=True)
    click.echo(f"Notes: {result['notesCount']}", err=True)


@click.command("whoami")
@click.option("--agent", "-a", metavar="ID", help="Ask about this agent (default: this worktree's).")
@json_option
@quiet_option
def whoami(agent: str | None, as_json: bool, quiet: bool) -> None:
    """Who this worktree is working as: agent, session, purpose, claimed files, notes, duration.

    \b
    Example:
      pd whoami
    """
    agent_id, session_id = resolve_agent(agent), resolve_session(agent=agent)
    if not (agent_id or session_id):
        result: dict[str, Any] = {"success": True, "active": False, "hint": "No active session. Use pd begin to start."}
    else:
        result = call("agent.whoami", {"agentId": agent_id, "sessionId": session_id,
                                       "worktree": str(worktree_root())}, as_json=as_json)  # fmt: skip
    if as_json:
        emit_json({**result, "localContext": load_current()})
    elif "sessionId" not in result and result.get("agentId") and not quiet:  # registered, between sessions
        click.echo(f"Agent:    {result['agentId']}")
        click.echo('Session:  none; start one with pd session start "what you are doing"')
    elif "sessionId" not in result:
        click.echo(result["hint"], err=quiet)  # -q prints the value, and there is none
    elif quiet:
        click.echo(f"{result['agentId']}:{result['sessionId']}")
    else:
        agent_label = result["agentId"]
        if result["liveness"] not in (None, "active"):  # a stale or dead agent must not read as all is well
            agent_label += f" ({result['liveness']})"
        for label, value in (("Agent", agent_label), ("Session", f"{result['sessionId']} ({result['status']})"),
                             ("Purpose", result["purpose"]), ("Identity", result["identity"]),
                             ("Duration", age(result["startedAt"])), ("Notes", result["noteCount"]),
                             ("Files", ", ".join(result["files"]) or "-")):  # fmt: skip
            if value is not None:
                click.echo(f"{label + ':':10}{value}")
        if result["status"] == "abandoned":
            click.echo("Hint: this session was abandoned (its agent left, or was declared dead); pd salvage --all "
                       "shows whose its work is, pd begin starts afresh", err=True)  # fmt: skip


@click.command("sitrep")
@since_option("what happened", default="30m")
@click.option("--project", "-p", metavar="P", help="Only this project's notes, sessions and dead agents.")
@click.option("--runs", is_flag=True, help="Every fleet run on its own (a fleet agent's ended runs are one "
              "session line, and its newest run's notes).")  # fmt: skip
@click.option("--limit", type=int, help="At most this many of each (default 20).")
@json_option
def sitrep(since: str, project: str | None, runs: bool, limit: int | None, as_json: bool) -> None:
    """Catch me up: recent notes, sessions, dead agents awaiting salvage, file claims.

    \b
    Examples:
      pd sitrep
      pd sitrep --since 2h --project payments --json
      pd sitrep --since 0          # everything, from the beginning
    """
    result = call("journal.sitrep", {"since": since, "project": project, "runs": runs, "limit": limit},
                  as_json=as_json)  # fmt: skip
    if as_json:
        emit_json(result)
        return
    click.echo(_summary(result))
    sections = (("Notes", [note_line(n) for n in result["notes"]]),
                ("Sessions", [f"{s['status']:9} {s['id']} {holder(s['agentId'], s['purpose'])}{folded_runs(s)}"
                              for s in result["sessions"]]),
                ("Dead agents awaiting salvage", [_salvage_line(e) for e in result["salvage_queue"]]),
                ("File claims", claim_lines(result["claims"])))  # fmt: skip
    for title, lines in sections:
        if lines:
            click.echo(f"\n{title}:")
            for line in lines:
                click.echo(f"  {line}")
    hint_if_folded(result["sessions"])


def _summary(result: dict[str, Any]) -> str:
    """``Last 30m: 4 events, 1 note, 1 active session, 0 dead agents awaiting salvage, 2 files claimed`` (the
    daemon's ``summary`` keeps the original's wording, "1 notes" too)."""
    c = result["counts"]
    window = "Since the beginning" if result["since_ms"] == 0 else f"Last {result['since_minutes']}m"
    return (
        f"{window}: {plural(c['events'], 'event')}, {plural(c['notes'], 'note')}, "
        f"{plural(c['activeSessions'], 'active session')}, {plural(c['deadAgents'], 'dead agent')} awaiting "
        f"salvage, {plural(c['filesClaimed'], 'file')} claimed"
    )


def _salvage_line(e: dict[str, Any]) -> str:
    """``fleet-qa-1a2b3c4d (proj:fleet:qa): Fleet agent: qa [1,440 failed runs, the first 16h ago]``."""
    repeats = repeated_failures(e)
    return f"{e['id']} ({e['identity'] or '-'}): {e['purpose'] or '-'}" + (f" [{repeats}]" if repeats else "")


@click.command("log")
@click.option("--limit", "-n", type=int, default=30, show_default=True, help="Show at most this many.")
@click.option("--type", "-t", "type_", help="Only this event type (a prefix ending in * too, e.g. 'session.*').")
@click.option("--agent", metavar="ID", help="Only this agent's activity.")
@since_option("activity")
@json_option
@quiet_option
def log(limit: int, type_: str | None, agent: str | None, since: str | None, as_json: bool, quiet: bool) -> None:
    """The activity log: every state change, newest first. -q prints how many entries.

    \b
    Examples:
      pd log
      pd log --type 'agent.*' --since 1h
    """
    result = call("activity.list", {"limit": limit, "type": type_, "agent": agent, "since": since}, as_json=as_json)
    if as_json:
        emit_json(result)
        return
    if quiet:
        click.echo(result["count"])
        return
    if not result["entries"]:
        click.echo("No activity", err=True)  # stderr: scripts read stdout as entries
    for e in result["entries"]:
        click.echo(f"{age(e['timestamp']):>4}  {e['type']:18} {e['agentId'] or '-':20} {_details(e)}")


def _details(entry: dict[str, Any]) -> str:
    """An entry's details with its times (epoch ms: ``expiresAt=1795537013881``) shown as every listing shows a
    time, ``expiresAt=in 5m``, ``lastHeartbeat=3m ago``. The daemon's ``details`` stay as they are for --json."""
    details = entry["details"] or ""
    for key, value in (entry.get("metadata") or {}).items():
        if (key.endswith("At") or key == "lastHeartbeat") and type(value) is int:  # spec/events.md: the times
            details = details.replace(f"{key}={value}", f"{key}={_when(value)}")
    return details


def _when(ms_timestamp: int) -> str:
    return until(ms_timestamp) if ms_timestamp > time.time() * 1000 else f"{age(ms_timestamp)} ago"


COMMANDS = (begin, done, whoami, sitrep, log)
