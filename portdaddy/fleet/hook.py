"""The git ``post-commit`` hook ``pd fleet init`` installs: it publishes ``git:committed`` after every commit.

The hook body is a marked block, so installing again updates it in place, and an existing hook is merged,
never overwritten: a shell hook gets the block right after its shebang (before any ``exit`` it may have); a
hook in another language, or one that is not executable (disabled), is kept as ``post-commit.pd-chained`` and
run by ours only while it is executable. The block reads the new commit's sha and branch in the foreground (one
fast ``git`` call: a background read would see a later commit), then runs ``pd fleet hook post-commit SHA
BRANCH`` in the background with its output discarded, so the hook can never slow or fail a commit.
Standard library only: this runs in the ``pd`` process.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

BEGIN = "# >>> port-daddy fleet >>>"
END = "# <<< port-daddy fleet <<<"
CHAINED = "post-commit.pd-chained"
_SHELLS = ("sh", "bash", "dash", "zsh", "ksh")
# git:committed must fit a channel message (60,000 bytes of JSON, one IPC frame): a huge commit's file list is cut.
FILES_MAX_BYTES = 32_000
MESSAGE_MAX = 1000  # characters of the commit subject


def pd_command() -> str:
    """How the hook calls ``pd``: the one on PATH now, else this interpreter (a venv not on PATH later)."""
    found = shutil.which("pd")
    return shlex.quote(found) if found else f"{shlex.quote(sys.executable)} -m portdaddy.cli"


def pinned_home(env: Mapping[str, str] = os.environ) -> str | None:
    """A non-default ``PORT_DADDY_HOME`` to write into the hook: a commit from a shell without it must still reach
    the daemon the fleet is up in, not start another at ``~/.port-daddy``."""
    home = env.get("PORT_DADDY_HOME")
    if not home:
        return None
    resolved = os.path.abspath(os.path.expanduser(home))
    return None if resolved == os.path.abspath(os.path.expanduser("~/.port-daddy")) else resolved


def block(pd: str, home: str | None = None) -> str:
    pin = f"PORT_DADDY_HOME={shlex.quote(home)} " if home else ""
    return (f"{BEGIN}\n"
            "# Publishes git:committed (sha, branch, changed files) for the Port Daddy fleet; from `pd fleet init`.\n"
            "# The commit is read now (a quick next commit must not replace it); the rest runs in the background,\n"
            "# output discarded: it never slows down or fails a commit.\n"
            'pd_fleet_head=$(git rev-parse HEAD --abbrev-ref HEAD 2>/dev/null) || pd_fleet_head=""\n'
            f"( {pin}{pd} fleet hook post-commit $pd_fleet_head >/dev/null 2>&1 & ) || true\n"
            f"{END}\n")  # fmt: skip


def hooks_dir(project_dir: Path) -> Path:
    """The repository's hooks directory (honours ``core.hooksPath`` and linked worktrees)."""
    out = subprocess.run(["git", "-C", str(project_dir), "rev-parse", "--git-path", "hooks"],
                         capture_output=True, text=True, timeout=10, check=False)  # fmt: skip
    if out.returncode != 0:
        raise ValueError(f"{project_dir} is not inside a git repository ({out.stderr.strip() or 'git failed'})")
    path = Path(out.stdout.strip())
    return path if path.is_absolute() else Path(project_dir) / path


def _shebang_shell(text: str) -> bool:
    if not text.startswith("#!"):
        return True  # no shebang: git runs it with sh
    words = text.splitlines()[0][2:].split()
    program = Path(words[0]).name if words else ""
    if program == "env" and len(words) > 1:
        program = words[1]
    return program in _SHELLS


def install(project_dir: Path, pd: str | None = None, home: str | None = None) -> tuple[Path, str]:
    """Install or update the hook; returns its path and what happened (created, updated, merged, chained).
    ``home`` is pinned in the hook (see ``pinned_home``)."""
    directory = hooks_dir(project_dir)
    directory.mkdir(parents=True, exist_ok=True)
    hook = directory / "post-commit"
    ours = block(pd or pd_command(), home)
    if not hook.exists():
        hook.write_text("#!/bin/sh\n" + ours)
        action = "created"
    else:
        text = hook.read_text()
        if BEGIN in text and END in text:
            start, end = text.index(BEGIN), text.index(END) + len(END)
            hook.write_text(text[:start] + ours.rstrip("\n") + text[end:])
            action = "updated"
        elif os.access(hook, os.X_OK) and _shebang_shell(text):
            first, _, rest = text.partition("\n") if text.startswith("#!") else ("", "", text)
            hook.write_text((first + "\n" if first else "#!/bin/sh\n") + ours + rest)
            action = "merged"
        else:
            os.replace(hook, directory / CHAINED)
            # A disabled (non-executable) hook stays disabled until someone makes it executable again.
            chained = f'"$(dirname "$0")/{CHAINED}"'
            hook.write_text(f'#!/bin/sh\n{ours}if [ -x {chained} ]; then exec {chained} "$@"; fi\n')
            action = "chained"
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return hook, action


def _git(project_dir: Path, *args: str) -> str:
    out = subprocess.run(["git", "-C", str(project_dir), *args], capture_output=True, text=True, timeout=10,
                         check=False)  # fmt: skip
    return out.stdout.strip() if out.returncode == 0 else ""


def _capped(files: list[str], max_bytes: int) -> list[str]:
    """The first ``files`` whose JSON fits in ``max_bytes``."""
    used = 2  # []
    for n, name in enumerate(files):
        used += len(json.dumps(name)) + 1
        if used > max_bytes:
            return files[:n]
    return files


def commit_payload(cwd: Path, sha: str | None = None, branch: str | None = None,
                   max_bytes: int = FILES_MAX_BYTES) -> dict[str, object]:  # fmt: skip
    """What ``git:committed`` carries: the commit just made, and the project it belongs to.

    ``sha`` and ``branch`` are what the hook read in the foreground; without them (a hook from an older
    ``pd fleet init``) HEAD is read now. ``files`` is cut to ``max_bytes`` of JSON; ``fileCount`` counts them all.
    """
    top = Path(_git(cwd, "rev-parse", "--show-toplevel") or cwd).resolve()
    sha = sha or _git(top, "rev-parse", "HEAD")
    files = _git(top, "diff-tree", "--no-commit-id", "--name-only", "-r", "--root", sha).splitlines()
    kept = _capped(files, max_bytes)
    return {
        "sha": sha,
        "shortSha": _git(top, "rev-parse", "--short", sha),
        "branch": branch or _git(top, "symbolic-ref", "--short", "-q", "HEAD") or "HEAD",
        "message": _git(top, "log", "-1", "--format=%s", sha)[:MESSAGE_MAX],
        "files": kept,
        "fileCount": len(files),
        "truncated": len(kept) < len(files),
        "project": top.name,
        "projectDir": str(top),
    }
