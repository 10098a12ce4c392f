"""pd guard install | check: a git pre-commit hook that checks staged files against other sessions' claims.

Modes: ``advisory`` prints one line when staged files are claimed elsewhere, ``warn`` names every conflict,
``enforce`` names them and refuses the commit (``git commit --no-verify`` overrides, as for any hook). A daemon
that is not running never blocks a commit: coordination is advisory, and an outage must not stop work.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import click

from portdaddy.cli.context import repo_paths, resolve_agent, resolve_session, worktree_root
from portdaddy.cli.output import emit_json, json_option
from portdaddy.cli.sessions import warn_conflicts
from portdaddy.cli.transport import connect, fail
from portdaddy.errors import EXIT_REFUSED, DaemonUnavailable, PDError, bad_input
from portdaddy.text import plural

MODES = ("advisory", "warn", "enforce")
MARKER = "# port-daddy guard"


@click.group()
def guard() -> None:
    """Check commits against other agents' file claims with a git pre-commit hook.

    \b
    Examples:
      pd guard install --mode warn
      pd guard check --staged --mode enforce
    """


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout


def _hooks_dir(root: Path, as_json: bool) -> Path:
    try:
        return (root / _git(root, "rev-parse", "--git-path", "hooks").strip()).resolve()
    except (OSError, subprocess.CalledProcessError):
        fail(bad_input(f"{root} is not a git worktree; run pd guard install inside one"), as_json=as_json)


@guard.command("install")
@click.option("--mode", type=click.Choice(MODES), default="warn", show_default=True,
              help="What the hook does with files claimed elsewhere: advisory (one line), warn (name them), "
                   "enforce (refuse the commit).")  # fmt: skip
@click.option("--force", is_flag=True, help="Replace a pre-commit hook that is not ours.")
@json_option
def install(mode: str, force: bool, as_json: bool) -> None:
    """Write .git/hooks/pre-commit (of this worktree's repository) running pd guard check on staged files.

    \b
    Example:
      pd guard install --mode enforce
    """
    hooks = _hooks_dir(worktree_root(), as_json)
    hook = hooks / "pre-commit"
    if hook.exists() and MARKER not in hook.read_text(errors="replace") and not force:
        fail(PDError("CONFLICT", f"{hook} already exists; add '{sys.executable} -m portdaddy.cli guard check "
                     f"--staged --mode {mode}' to it, or replace it with --force"), as_json=as_json)  # fmt: skip
    hooks.mkdir(parents=True, exist_ok=True)
    hook.write_text(f"#!/bin/sh\n{MARKER} (pd guard install --mode {mode})\n"
                    f"exec \"{sys.executable}\" -m portdaddy.cli guard check --staged --mode {mode}\n")  # fmt: skip
    os.chmod(hook, 0o755)
    if as_json:
        emit_json({"success": True, "hook": str(hook), "mode": mode})
    else:
        click.echo(f"Installed {hook} (mode {mode})")


@guard.command("check")
@click.argument("paths", nargs=-1)
@click.option("--staged", is_flag=True, help="Check the files staged for commit.")
@click.option("--mode", type=click.Choice(MODES), default="warn", show_default=True,
              help="advisory (one line), warn (name every conflict), enforce (also exit 1).")  # fmt: skip
@json_option
def check(paths: tuple[str, ...], staged: bool, mode: str, as_json: bool) -> None:
    """Check PATHS (and with --staged the staged files) against other active sessions' claims.

    \b
    Examples:
      pd guard check src/middleware/auth.ts
      pd guard check --staged --mode enforce
    """
    files = repo_paths(paths)
    if staged:
        files += [f for f in _git(worktree_root(), "diff", "--cached", "--name-only", "-z").split("\0") if f]
    if not files:
        if as_json:
            emit_json({"success": True, "checked": True, "conflicts": []})
        return
    args = {"files": files, "sessionId": resolve_session(), "agentId": resolve_agent(),
            "worktree": str(worktree_root())}  # fmt: skip
    try:
        with connect(autostart=False) as client:
            result = client.request("file.check", args)
    except DaemonUnavailable:  # a commit hook must not stop commits because the daemon is down
        message = "Port Daddy is not running; file claims not checked"
        if as_json:
            emit_json({"success": True, "checked": False, "conflicts": [], "message": message})
        else:
            click.echo(f"pd guard: {message}", err=True)
        return
    except PDError as e:
        fail(e, as_json=as_json)
    conflicts = result["conflicts"]
    refused = bool(conflicts) and mode == "enforce"
    if as_json:
        emit_json({**result, "checked": True} if not refused else {
            **result, "checked": True, "success": False, "error": "FILE_CONFLICT",
            "message": "commit refused: files are claimed by other sessions"})  # fmt: skip
    elif conflicts and mode == "advisory":
        files = len({c["filePath"] for c in conflicts})
        click.echo(f"pd guard: {plural(files, 'file')} {'is' if files == 1 else 'are'} claimed by other sessions "
                   "(see pd who-owns PATH)", err=True)  # fmt: skip
    elif conflicts:
        warn_conflicts(conflicts)
    if refused:
        if not as_json:
            click.echo("Commit refused: coordinate with the holder first, or commit with --no-verify", err=True)
        sys.exit(EXIT_REFUSED)


COMMANDS = (guard,)
