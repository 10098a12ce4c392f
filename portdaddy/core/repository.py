"""Which repository a worktree belongs to, so file claims (paths relative to a worktree's root) are compared
only with claims made in the same repository: `src/index.ts` in two unrelated projects is two files, while
two linked worktrees of one repository share their files' future, and so their claims.
"""

from __future__ import annotations

from pathlib import Path


def repository_of(worktree: str | None) -> str | None:
    """The repository's git directory as an absolute path (the common one for linked worktrees), the worktree
    itself when it is not under git, or None when the caller named no worktree (its claims meet everyone's)."""
    if not worktree:
        return None
    root = Path(worktree)
    dot_git = root / ".git"
    try:
        if dot_git.is_file():  # a linked worktree or a submodule: "gitdir: <its own git dir>"
            text = dot_git.read_text(errors="replace").strip()
            if text.startswith("gitdir:"):
                git_dir = (root / text.removeprefix("gitdir:").strip()).resolve()
                common = git_dir / "commondir"  # only linked worktrees have one, pointing at the main .git
                if common.is_file():
                    return str((git_dir / common.read_text(errors="replace").strip()).resolve())
                return str(git_dir)
        if dot_git.is_dir():
            return str(dot_git.resolve())
        return str(root.resolve())
    # Unreadable, gone, or a symlink loop (resolve() raises RuntimeError for one until Python 3.13): the path
    # as given still tells this worktree from others.
    except (OSError, RuntimeError):
        return str(root)
