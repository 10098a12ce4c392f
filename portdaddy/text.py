"""Text for people, written alike by the daemon and by pd: values cut to fit a line.

Leaf-level (no imports): pd loads it on every run, through errors.py.
"""

from __future__ import annotations


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
