"""Who the caller is, remembered per worktree: ``<worktree>/.portdaddy/current.json`` (DESIGN §3).

Precedence: an explicit ``--agent``/``--session`` flag, then ``PORT_DADDY_AGENT``/``PORT_DADDY_SESSION`` (and
``AGENT_ID``, as the original), then the worktree's current.json written by ``pd begin``/``pd session start``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def worktree_root(start: Path | None = None) -> Path:
    """The nearest directory holding ``.git`` (a dir, or a file in linked worktrees); else the cwd."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / ".git").exists():
            return d
    return here


def current_path(root: Path | None = None) -> Path:
    return (root or worktree_root()) / ".portdaddy" / "current.json"


def load_current(root: Path | None = None) -> dict[str, Any]:
    try:
        data = json.loads(current_path(root).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_current(data: dict[str, Any], root: Path | None = None) -> Path:
    path = current_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    gitignore = path.parent / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text("*\n")  # runtime state, never committed
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def clear_current(root: Path | None = None) -> None:
    try:
        current_path(root).unlink()
    except FileNotFoundError:
        pass


def resolve_agent(explicit: str | None = None) -> str | None:
    return explicit or os.environ.get("PORT_DADDY_AGENT") or os.environ.get("AGENT_ID") or load_current().get("agentId")


def resolve_session(explicit: str | None = None) -> str | None:
    return explicit or os.environ.get("PORT_DADDY_SESSION") or load_current().get("sessionId")
