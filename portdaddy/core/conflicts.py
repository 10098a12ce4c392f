"""How a file-claim conflict reads, shared by the daemon's error and the CLI's warnings (no heavy imports)."""

from __future__ import annotations

from typing import Any


def _subject(c: dict[str, Any], lead: str = "") -> str:
    """``src/a.ts`` (with ``lead``), or ``src/* overlaps src/a.ts,`` for a glob overlap, which names both."""
    held = c.get("claimedPath") or c["filePath"]
    return f"{c['filePath']}{lead}" if held == c["filePath"] else f"{c['filePath']} overlaps {held},"


def conflict_line(c: dict[str, Any]) -> str:
    """``src/a.ts claimed by session-ab3 (backend-builder: Building payment API)``; a glob overlap names both."""
    holder = f"{c['agentId']}: {c['purpose']}" if c.get("agentId") else c.get("purpose")
    return f"{_subject(c)} claimed by {c['sessionId']} ({holder})"


def own_claim_line(c: dict[str, Any]) -> str:
    """A claim of the claiming agent's other active session, which is no conflict but keeps the path claimed:
    ``src/a.ts is also claimed by alice's session session-ab3 (first pass), …``."""
    sid = c["sessionId"]
    return (f"{_subject(c, ' is')} also claimed by {c['agentId']}'s session {sid} ({c['purpose']}), which holds it "
            f"until it ends: pd session end --session {sid}")  # fmt: skip
