"""The hash chain over a session's notes: each note's hash covers the previous one's, so an edit, a removal or
a reordering anywhere breaks every link after it. Pure functions, tested by property.

The hash covers the sealed body, not the text, so the chain can be audited without the keys. The session row
keeps the head (count and last hash): removing the newest note is caught too.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass

GENESIS = "0" * 64


@dataclass(frozen=True, slots=True)
class Link:
    seq: int
    agent_id: str | None
    type: str
    created_at: int
    body: bytes
    prev_hash: str
    hash: str


def link_hash(session_id: str, seq: int, agent_id: str | None, type: str, created_at: int, body: bytes,
              prev_hash: str) -> str:  # fmt: skip
    h = hashlib.sha256()
    for part in (prev_hash.encode(), session_id.encode(), (agent_id or "").encode(), type.encode(), body):
        h.update(struct.pack(">I", len(part)))  # length-prefixed: no two field splits hash alike
        h.update(part)
    h.update(struct.pack(">qq", seq, created_at))
    return h.hexdigest()


def verify(session_id: str, links: Iterable[Link], head_count: int, head_hash: str) -> list[str]:
    """Every problem with a session's chain (empty when intact). ``links`` in stored order."""
    problems = []
    expected_prev, expected_seq = GENESIS, 1
    for link in links:
        if link.seq != expected_seq:
            problems.append(f"note {expected_seq} is missing (found {link.seq})")
        if link.prev_hash != expected_prev:
            problems.append(f"note {link.seq} does not follow the note before it")
        digest = link_hash(session_id, link.seq, link.agent_id, link.type, link.created_at, link.body, link.prev_hash)
        if digest != link.hash:
            problems.append(f"note {link.seq} was altered after it was written")
        expected_prev, expected_seq = link.hash, link.seq + 1
    if expected_seq - 1 != head_count or expected_prev != head_hash:
        problems.append(f"the session records {head_count} notes; the chain ends at {expected_seq - 1} "
                        "(a note was removed)" if expected_seq - 1 != head_count else
                        "the newest note is not the one the session records")  # fmt: skip
    return problems
