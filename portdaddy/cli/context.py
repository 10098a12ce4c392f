"""Who the caller is, remembered per worktree: ``<worktree>/.portdaddy/current.json`` (DESIGN §3).

Precedence: an explicit ``--agent``/``--session`` flag, then ``PORT_DADDY_AGENT``/``PORT_DADDY_SESSION`` (and
``AGENT_ID``, as the original), then the worktree's current.json written by ``pd begin``/``pd session start``.

Several agents may share a worktree, each with its own ``PORT_DADDY_AGENT``, while the worktree has one
current.json: it holds one agent and that agent's session, whoever wrote it last. Its session is used only by
that agent; another agent's commands name no session and the daemon finds that agent's latest active one by
agent and worktree. Writing the file for another agent starts it afresh, and only the agent or session it
holds can clear it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from portdaddy.caller import agent_from_env


def worktree_root(start: Path | None = None) -> Path:
    """The nearest directory holding ``.git`` (a dir, or a file in linked worktrees); else the cwd."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / ".git").exists():
            return d
    return here


def repo_paths(paths: Iterable[str], root: Path | None = None) -> list[str]:
    """Paths or globs as typed in the current directory (or absolute), made relative to the worktree root,
    which is what claims are. One that leads out of the worktree is left as typed: the daemon refuses it."""
    root = root or worktree_root()
    cwd = Path.cwd().resolve()
    out = []
    for typed in paths:
        full = os.path.normpath(os.path.join(cwd, typed.strip()))
        rel = os.path.relpath(full, root)
        if rel == ".." or rel.startswith("../"):
            out.append(typed)
        else:
            out.append(rel + "/" if typed.endswith("/") and rel != "." else rel)  # a trailing / claims a subtree
    return out


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
        _write_whole(gitignore, "*\n")  # runtime state, never committed
    _write_whole(path, json.dumps(data, indent=2) + "\n")
    return path


def _write_whole(path: Path, text: str) -> None:
    """Replace ``path`` in one step. Agents sharing a worktree run ``pd`` at once: writing in place, one
    process reads the file empty (truncated, not yet written) and forgets the current agent, and two writers
    of different lengths leave the tail of the longer behind the shorter."""
    part = path.with_name(f".{path.name}.{os.getpid()}")
    part.write_text(text)
    os.replace(part, path)


def clear_current(root: Path | None = None) -> None:
    try:
        current_path(root).unlink()
    except FileNotFoundError:
        pass


def remember(agent_id: str | None, **fields: Any) -> list[str]:
    """Record what this worktree's current agent is doing. What the file held for another agent (its session,
    its identity) is dropped first: none of it is this agent's.

    Returns warnings for the caller to print: the worktree stops using a session that is someone else's (another
    agent's, or one of two started without agent ids, which cannot be told apart), or the environment names
    another agent, which later commands will act as instead of this one. An agent the environment named when
    it wrote the file (``agentFromEnv``) is named by it in its next commands too, so losing the file costs it
    nothing and is not worth a warning: agents that each have their PORT_DADDY_AGENT hear nothing."""
    current = load_current()
    held, other_agent = current.get("sessionId"), current.get("agentId") != agent_id
    warnings = []
    taken_over = held and (other_agent or (agent_id is None and fields.get("sessionId", held) != held))
    if taken_over and not current.get("agentFromEnv"):
        warnings.append(f"this worktree's current session was {held} ({current.get('purpose')}); pd here "
                        "no longer uses it. Agents sharing a worktree: give each its own PORT_DADDY_AGENT")  # fmt: skip
    var, from_env = agent_from_env()
    if from_env and agent_id and from_env != agent_id:
        warnings.append(f"{var}={from_env} is set, so later pd commands here act as that agent, "
                        f"not {agent_id}; pass them --agent {agent_id}, or change {var}")  # fmt: skip
    if other_agent:
        current = {}
    current.pop("agentFromEnv", None)
    named = {"agentFromEnv": True} if from_env and from_env == agent_id else {}
    save_current({**current, **({"agentId": agent_id} if agent_id else {}), **named, **fields})
    return warnings


def forget(*, agent_id: str | None = None, session_id: str | None = None) -> None:
    """The agent is gone (everything the file holds goes) or the session ended (the session goes); a file that
    holds another agent's or session is left alone."""
    current = load_current()
    if agent_id and current.get("agentId") == agent_id:
        clear_current()
    elif session_id and current.get("sessionId") == session_id:
        save_current({k: v for k, v in current.items() if k not in ("sessionId", "purpose")})


def resolve_agent(explicit: str | None = None) -> str | None:
    return explicit or agent_from_env()[1] or load_current().get("agentId")


def resolve_session(explicit: str | None = None, agent: str | None = None) -> str | None:
    """The session to act on: ``explicit``, ``PORT_DADDY_SESSION``, or current.json's when it belongs to the
    acting agent (``agent``: its ``--agent`` flag, if any). None lets the daemon find the agent's own."""
    chosen = explicit or os.environ.get("PORT_DADDY_SESSION")
    if chosen:
        return chosen
    current = load_current()
    return current.get("sessionId") if current.get("agentId") == resolve_agent(agent) else None
