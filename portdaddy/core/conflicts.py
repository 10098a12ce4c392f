"""How a file-claim conflict reads, shared by the daemon's error and the CLI's warnings (no heavy imports)."""

from __future__ import annotations

from typing import Any


def conflict_line(c: dict[str, Any]) -> str:
    """``src/a.ts claimed by session-ab3 (backend-builder: Building payment API)``; a glob overlap names both."""
    holder = f"{c['agentId']}: {c['purpose']}" if c.get("agentId") else c.get("purpose")
    held = c.get("claimedPath") or c["filePath"]
    what = c["filePath"] if held == c["filePath"] else f"{c['filePath']} overlaps {held},"
    return f"{what} claimed by {c['sessionId']} ({holder})"
