"""The git ``post-commit`` hook ``pd fleet init`` installs: it publishes ``git:committed`` after every commit.

The hook body is a marked block, so installing again updates it in place, and an existing hook is merged,
never overwritten: a shell hook gets the block right after its shebang (before any ``exit`` it may have); a
hook in another language is kept as ``post-commit.pd-chained`` and run by ours. The block runs ``pd fleet
hook post-commit`` in the background with its output discarded, so the hook can never slow or fail a commit.
Standard library only: this runs in the ``pd`` process.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

BEGIN = "# >>> port-daddy fleet >>>"
END = "# <<< port-daddy fleet <<<"
CHAINED = "post-commit.pd-chained"
_SHELLS = ("sh", "bash", "dash", "zsh", "ksh")


def pd_command() -> str:
    """How the hook calls ``pd``: the one on PATH now, else this interpreter (a venv not on PATH later)."""
    found = shutil.which("pd")
    return shlex.quote(found) if found else f"{shlex.quote(sys.executable)} -m portdaddy.cli"


def block(pd: str) -> str:
    return (f"{BEGIN}\n"
            "# Publishes git:committed (sha, branch, changed files) for the Port Daddy fleet; from `pd fleet init`.\n"
            "# In the background, output discarded: it never slows down or fails a commit.\n"
            f"( {pd} fleet hook post-commit >/dev/null 2>&1 & ) || true\n"
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


def install(project_dir: Path, pd: str | None = None) -> tuple[Path, str]:
    """Install or update the hook; returns its path and what happened (created, updated, merged, chained)."""
    directory = hooks_dir(project_dir)
    directory.mkdir(parents=True, exist_ok=True)
    hook = directory / "post-commit"
    ours = block(pd or pd_command())
    if not hook.exists():
        hook.write_text("#!/bin/sh\n" + ours)
        action = "created"
    else:
        text = hook.read_text()
        if BEGIN in text and END in text:
            start, end = text.index(BEGIN), text.index(END) + len(END)
            hook.write_text(text[:start] + ours.rstrip("\n") + text[end:])
            action = "updated"
        elif _shebang_shell(text):
            first, _, rest = text.partition("\n") if text.startswith("#!") else ("", "", text)
            hook.write_text((first + "\n" if first else "#!/bin/sh\n") + ours + rest)
            action = "merged"
        else:
            os.replace(hook, directory / CHAINED)
            hook.write_text(f'#!/bin/sh\n{ours}exec "$(dirname "$0")/{CHAINED}" "$@"\n')
            action = "chained"
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return hook, action


def _git(project_dir: Path, *args: str) -> str:
    out = subprocess.run(["git", "-C", str(project_dir), *args], capture_output=True, text=True, timeout=10,
                         check=False)  # fmt: skip
    return out.stdout.strip() if out.returncode == 0 else ""


def commit_payload(cwd: Path, max_files: int = 500) -> dict[str, object]:
    """What ``git:committed`` carries: the commit just made, and the project it belongs to."""
    top = Path(_git(cwd, "rev-parse", "--show-toplevel") or cwd).resolve()
    files = _git(top, "diff-tree", "--no-commit-id", "--name-only", "-r", "--root", "HEAD").splitlines()
    return {
        "sha": _git(top, "rev-parse", "HEAD"),
        "shortSha": _git(top, "rev-parse", "--short", "HEAD"),
        "branch": _git(top, "symbolic-ref", "--short", "-q", "HEAD") or "HEAD",
        "message": _git(top, "log", "-1", "--format=%s"),
        "files": files[:max_files],
        "project": top.name,
        "projectDir": str(top),
    }
