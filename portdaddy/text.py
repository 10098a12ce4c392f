"""Text for people, written alike by the daemon and by pd: counts with their nouns, and values cut to fit a line.

Leaf-level (no imports): pd loads it on every run, through errors.py.
"""

from __future__ import annotations


def plural(n: int, noun: str, many: str | None = None) -> str:
    """``0 notes``, ``1 note``, ``1,440 notes``: a count with its noun in the right number (``many``: the plural
    when it is not ``noun`` + s, e.g. ``entries``)."""
    return f"{n:,} {noun if n == 1 else many or noun + 's'}"


def clip(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` characters: a longer one keeps its start and its end around ``…``, since a
    message says what was wrong first and what to do last, and a path's last parts tell it apart."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return f"{text[:head]}…{text[len(text) - (limit - 1 - head) :]}"


def quoted(text: str, limit: int = 60) -> str:
    """A value as a message quotes it: ``repr`` (quotes, control characters escaped, so the message stays one
    line) of the value cut to ``limit`` characters, so a 60 KB value cannot flood it."""
    return repr(clip(text, limit))
