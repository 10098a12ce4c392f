"""pd session start | end | list | show | files, pd note, pd notes, pd files, pd who-owns.

The current session and agent are remembered per worktree in ``.portdaddy/current.json`` (cli/context.py), so
``pd session start "…" --files …`` then ``pd note "…"`` needs no ids.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from portdaddy.cli.context import forget, remember, repo_paths, resolve_agent, resolve_session, worktree_root
from portdaddy.cli.output import age, emit_json, json_option, quiet_option, since_option, table, warn, warning
from portdaddy.cli.transport import call, connect, fail, refuse_reply
from portdaddy.core.conflicts import conflict_line, own_claim_line
from portdaddy.errors import EXIT_REFUSED, PDError
from portdaddy.text import plural

_AGENT = click.option("--agent", "-a", metavar="ID", help="Act as this agent (default: the worktree's current one).")
_SESSION = click.option("--session", "-s", "session", metavar="ID",
                        help="The session (default: the worktree's current one).")  # fmt: skip
_FORCE = click.option("--force", "-f", is_flag=True, help="Claim even where another session holds the files.")


def where() -> dict[str, Any]:
    """Who is asking, for ops that default to the caller's current session."""
    return {"sessionId": resolve_session(), "agentId": resolve_agent(), "worktree": str(worktree_root())}


def warn_conflicts(conflicts: list[dict[str, Any]]) -> None:
    for c in conflicts:
        warning(conflict_line(c))


def claiming_call(action: str, args: dict[str, Any], *, as_json: bool) -> Any:
    """A call that claims files: conflicts print as warnings; a refused claim says how to force it (exit 1)."""
    try:
        with connect() as client:
            result = client.request(action, args)
    except PDError as e:
        if e.code == "FILE_CONFLICT" and not as_json:
            warn_conflicts(e.extra.get("conflicts") or [])
            click.echo("Use --force to claim anyway", err=True)
            sys.exit(EXIT_REFUSED)
        fail(e, as_json=as_json)
    if not as_json:
        warn_conflicts(result.get("conflicts") or result.get("fileConflicts") or [])
        for c in result.get("ownClaims") or []:
            warning(own_claim_line(c))
    return result


@click.group()
def session() -> None:
    """Sessions: declare what you are working on, claim files, leave notes.

    \b
    Examples:
      pd session start "Building payment API" --files "src/api/payments/*" src/types/Payment.ts
      pd note "Created POST /api/payments endpoint" --type commit
      pd session end "API ready for integration tests"
    """


@session.command("start")
@click.argument("purpose")
@click.argument("paths", nargs=-1)
@click.option("--files", "files", multiple=True, metavar="PATH", help="A path or glob to claim (repeatable).")
@_FORCE
@_AGENT
@json_option
@quiet_option
def start(purpose: str, paths: tuple[str, ...], files: tuple[str, ...], force: bool, agent: str | None,
          as_json: bool, quiet: bool) -> None:  # fmt: skip
    """Start a session for PURPOSE, claiming PATHS (paths or globs) for it; it becomes this worktree's current.

    \b
    Examples:
      pd session start "Building checkout UI" --files "src/components/checkout/*" src/pages/checkout.tsx
      pd session start "OAuth integration" --files src/middleware/auth.ts --force
    """
    agent_id = resolve_agent(agent)
    args = {"purpose": purpose, "files": repo_paths([*paths, *files]), "force": force, "agentId": agent_id,
            "worktree": str(worktree_root())}  # fmt: skip
    result = claiming_call("session.start", args, as_json=as_json)
    warn(remember(agent_id, sessionId=result["id"], purpose=purpose), as_json=as_json)
    if as_json:
        emit_json(result)
    elif quiet:
        click.echo(result["id"])
    else:
        click.echo(f"Started session: {result['id']}")
        click.echo(f"Purpose: {purpose}")
        if result["files"]:
            click.echo(f"Files claimed: {len(result['files'])}")


@session.command("end")
@click.argument("note", required=False)
@click.option("--status", type=click.Choice(["completed", "abandoned"]), default="completed", show_default=True,
              help="How the session ends.")  # fmt: skip
@_SESSION
@json_option
@quiet_option
def end(note: str | None, status: str, session: str | None, as_json: bool, quiet: bool) -> None:
    """End the current session with an optional handoff NOTE; its files are released.

    \b
    Examples:
      pd session end "Schema merged; refunds table still TODO"
      pd session end --status abandoned
    """
    result = call("session.end", {**where(), "sessionId": resolve_session(session), "note": note, "status": status},
                  as_json=as_json)  # fmt: skip
    forget(session_id=result["id"])
    if as_json:
        emit_json(result)
    else:
        click.echo(result["id"] if quiet else f"Session {result['id']} {result['status']}; "
                   f"released {plural(len(result['releasedFiles']), 'file claim')}")  # fmt: skip


_RUNS = click.option(
    "--runs",
    is_flag=True,
    help="Every fleet run's session on its own line (a fleet agent's ended runs are one, its newest).",
)


def folded_runs(s: dict[str, Any]) -> str:
    """`` [newest of 1,440 ended runs, 39 abandoned, the first 1d ago]`` for a session standing for its fleet
    agent's ended runs (spec/journal.md, "Fleet runs in the views"); else nothing."""
    runs = s.get("fleetRuns")
    if not runs or runs["count"] < 2:
        return ""
    abandoned = f", {runs['abandoned']:,} abandoned" if runs["abandoned"] else ""
    return f" [newest of {plural(runs['count'], 'ended run')}{abandoned}, the first {age(runs['firstAt'])} ago]"


def hint_if_folded(sessions: list[dict[str, Any]]) -> None:
    if any(folded_runs(s) for s in sessions):
        click.echo("(a fleet agent's ended runs are one line, its newest run's; --runs lists every run)", err=True)


@session.command("list")
@click.option("--all", "all_", is_flag=True, help="Include completed and abandoned sessions.")
@click.option("--status", type=click.Choice(["active", "completed", "abandoned"]), help="Only sessions in this state.")
@click.option("--agent", metavar="ID", help="Only this agent's sessions.")
@click.option("--here", is_flag=True, help="Only sessions of this worktree.")
@_RUNS
@click.option("--limit", type=int, help="At most this many (default 50).")
@json_option
@quiet_option
def list_(all_: bool, status: str | None, agent: str | None, here: bool, runs: bool, limit: int | None,
          as_json: bool, quiet: bool) -> None:  # fmt: skip
    """List sessions (active ones unless --all or --status), most recently updated first. A fleet agent's ended
    runs are one line, its newest run's session, unless --runs.

    \b
    Examples:
      pd session list
      pd session list --all --agent backend-builder --json
      pd session list --all --runs
    """
    result = call("session.list", {"all": all_, "status": status, "agent": agent, "limit": limit, "runs": runs,
                                   "worktree": str(worktree_root()) if here else None}, as_json=as_json)  # fmt: skip
    if as_json:
        emit_json(result)
    elif quiet:
        click.echo(result["count"])
    elif not result["sessions"]:
        click.echo("No sessions")
    else:
        table([(s["id"], s["status"], s["agentId"] or "-", s["noteCount"], len(s["files"]), age(s["updatedAt"]),
               s["purpose"] + folded_runs(s)) for s in result["sessions"]],
              ("SESSION", "STATUS", "AGENT", "NOTES", "FILES", "LAST ACTIVE", "PURPOSE"))  # fmt: skip
        hint_if_folded(result["sessions"])


@session.command("show")
@click.argument("session_id", required=False)
@json_option
@quiet_option
def show(session_id: str | None, as_json: bool, quiet: bool) -> None:
    """Show a session (default: the current one) with its notes and file claims. -q prints its status.

    \b
    Examples:
      pd session show session-1a2b3c4d5e6f
      [ "$(pd session show -q)" = active ] || pd session start "Next task"
    """
    result = call("session.get", {**where(), "sessionId": resolve_session(session_id)}, as_json=as_json)
    if as_json:
        emit_json(result)
        return
    s = result["session"]
    if quiet:
        click.echo(s["status"])
        return
    click.echo(f"{s['id']} ({s['status']}) {s['purpose']}")
    click.echo(f"  Agent: {s['agentId'] or '-'}   started {age(s['createdAt'])} ago")
    for f in result["files"]:
        click.echo(f"  file: {f['filePath']}{' (released)' if f['releasedAt'] else ''}")
    for n in result["notes"]:
        click.echo(f"  [{age(n['createdAt'])}] [{n['type']}] {n['content']}")


@session.group("files")
def files_group() -> None:
    """Claim or release files for the current session.

    \b
    Examples:
      pd session files claim "src/api/*" src/types/Payment.ts
      pd session files release src/types/Payment.ts
    """


@files_group.command("claim")
@click.argument("paths", nargs=-1, required=True)
@_FORCE
@_SESSION
@json_option
@quiet_option
def files_claim(paths: tuple[str, ...], force: bool, session: str | None, as_json: bool, quiet: bool) -> None:
    """Claim PATHS (paths or globs) for the session; a path another session holds is refused unless --force.

    -q prints how many paths were claimed.

    \b
    Example:
      pd session files claim "src/components/checkout/*" --force
    """
    args = {**where(), "sessionId": resolve_session(session), "files": repo_paths(paths), "force": force}
    result = claiming_call("file.claim", args, as_json=as_json)
    if as_json:
        emit_json(result)
    else:
        claimed = len(result["claimed"])
        click.echo(claimed if quiet else f"Claimed {plural(claimed, 'path')} for {result['sessionId']}")


@files_group.command("release")
@click.argument("paths", nargs=-1)
@_SESSION
@json_option
@quiet_option
def files_release(paths: tuple[str, ...], session: str | None, as_json: bool, quiet: bool) -> None:
    """Release PATHS (all of the session's claims when none are given). -q prints how many were released.

    \b
    Example:
      pd session files release src/types/Payment.ts
    """
    args = {**where(), "sessionId": resolve_session(session), "files": repo_paths(paths) or None}
    result = call("file.release", args, as_json=as_json)
    if as_json:
        emit_json(result)
    else:
        released = len(result["released"])
        click.echo(released if quiet else f"Released {plural(released, 'path')}")


@click.command("note")
@click.argument("content")
@click.option("--type", "-t", "type_", default="note", show_default=True,
              help="note, commit, progress, decision, blocker, handoff, question, ...")  # fmt: skip
@_SESSION
@json_option
@quiet_option
def note(content: str, type_: str, session: str | None, as_json: bool, quiet: bool) -> None:
    """Add a note to the current session (CONTENT '-' reads it from stdin). Notes are permanent.

    \b
    Examples:
      pd note "Installed Stripe React library"
      pd note "Created POST /api/payments endpoint" --type commit
      git log -1 --format=%B | pd note - --type commit
    """
    text = sys.stdin.read() if content == "-" else content
    result = call("note.add", {**where(), "sessionId": resolve_session(session), "content": text, "type": type_},
                  as_json=as_json)  # fmt: skip
    if as_json:
        emit_json(result)
    else:
        click.echo(result["noteId"] if quiet else f"Note added to session {result['sessionId']} ({result['purpose']})")


def note_line(n: dict[str, Any]) -> str:
    """``[frontend-builder] Built CheckoutForm component`` (the type is shown unless it is a plain note)."""
    kind = "" if n["type"] == "note" else f"[{n['type']}] "
    text = n["content"] if n["content"] is not None else "(unreadable: sealed body does not open)"
    return f"[{n['agentId'] or n['sessionId']}] {kind}{text}"


@click.command("notes")
@click.option("--limit", "-n", type=int, default=20, show_default=True, help="Show at most this many.")
@_SESSION
@click.option("--agent", metavar="ID", help="Only this agent's notes.")
@click.option("--project", metavar="P", help="Only sessions of agents whose identity is in P.")
@click.option("--type", "-t", "type_", help="Only this type of note.")
@since_option("notes")
@click.option("--runs", is_flag=True, help="Also the notes of fleet agents' earlier runs (only the newest run's by "
              "default).")  # fmt: skip
@click.option("--verify", is_flag=True, help="Check every session's note chain instead (exit 1 if broken).")
@json_option
@quiet_option
def notes(limit: int, session: str | None, agent: str | None, project: str | None, type_: str | None,
          since: str | None, runs: bool, verify: bool, as_json: bool, quiet: bool) -> None:  # fmt: skip
    """The timeline of notes across agents, newest first. -q prints how many (with --verify: intact or broken).

    Of a fleet agent's ended runs only the newest run's notes are shown, unless --runs, --session or --agent.

    \b
    Examples:
      pd notes --limit 20
      pd notes --agent backend-builder --type commit
      pd notes --since 10m -q
      pd notes --verify
    """
    if verify:
        result = call("note.verify", {"sessionId": session}, as_json=as_json)
        if as_json and not result["valid"]:
            refuse_reply("CHAIN_BROKEN", f"{plural(len(result['problems']), 'problem')} in note chains", result)
        if as_json:
            emit_json(result)
        elif quiet:
            click.echo("intact" if result["valid"] else "broken")
        elif result["valid"]:
            click.echo(
                f"Note chain intact: {plural(result['notes'], 'note')} in {plural(result['sessions'], 'session')}"
            )
        else:
            for p in result["problems"]:
                click.echo(f"{p['sessionId']}: {p['problem']}", err=True)
        sys.exit(0 if result["valid"] else EXIT_REFUSED)
    result = call("note.list", {"limit": limit, "sessionId": session, "agent": agent, "project": project,
                                "type": type_, "since": since, "runs": runs}, as_json=as_json)  # fmt: skip
    if as_json:
        emit_json(result)
        return
    if quiet:
        click.echo(result["count"])
        return
    if not result["notes"]:
        click.echo("No notes")
    for n in result["notes"]:
        click.echo(note_line(n))
    if result["earlierRunNotes"]:
        click.echo(f"({plural(result['earlierRunNotes'], 'note')} of fleet agents' earlier runs not shown; "
                   "pd notes --runs shows them)", err=True)  # fmt: skip


def holder(agent_id: str | None, purpose: str) -> str:
    """``backend-builder: Building payment API``, or the purpose alone for a session without an agent."""
    return f"{agent_id}: {purpose}" if agent_id else purpose


def claim_lines(claims: list[dict[str, Any]]) -> list[str]:
    """One line per claim, the sessions in a column (a path longer than 60 characters pushes only its own)."""
    width = min(60, max((len(c["filePath"]) for c in claims), default=0))
    return [f"{c['filePath']:{width}}  {c['sessionId']} ({holder(c['agentId'], c['purpose'])})"
            + (" [forced]" if c["forced"] else "") for c in claims]  # fmt: skip


@click.command("files")
@click.argument("path", required=False)
@click.option("--agent", metavar="ID", help="Only this agent's claims.")
@json_option
@quiet_option
def files(path: str | None, agent: str | None, as_json: bool, quiet: bool) -> None:
    """Files claimed by active sessions (only those overlapping PATH when given).

    \b
    Examples:
      pd files
      pd files "src/api/*" --json
    """
    result = call("file.list", {"path": repo_paths([path])[0] if path else None, "agent": agent,
                                    "worktree": str(worktree_root())}, as_json=as_json)  # fmt: skip
    if as_json:
        emit_json(result)
    elif quiet:
        click.echo(result["count"])
    elif not result["claims"]:
        click.echo("No files claimed")
    else:
        click.echo("\n".join(claim_lines(result["claims"])))


@click.command("who-owns")
@click.argument("path")
@json_option
@quiet_option
def who_owns(path: str, as_json: bool, quiet: bool) -> None:
    """Which active sessions claim PATH (a path or glob; overlapping globs count).

    \b
    Examples:
      pd who-owns src/middleware/auth.ts
      pd who-owns "src/api/*" -q
    """
    result = call("file.owners", {"path": repo_paths([path])[0], "worktree": str(worktree_root())}, as_json=as_json)
    if as_json:
        emit_json(result)
    elif quiet:
        click.echo("claimed" if result["claimed"] else "unclaimed")
    else:
        click.echo(f"{result['filePath']}: claimed by {plural(len(result['owners']), 'session')}")
        for line in claim_lines(result["owners"]):
            click.echo(f"  {line}")


COMMANDS = (session, note, notes, files, who_owns)
