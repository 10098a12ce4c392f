"""Text for people, written alike by the daemon and by pd: counts with their nouns, spans of time, values cut to
fit a line, and control characters shown escaped.

Leaf-level (no imports): pd loads it on every run, through errors.py.
"""

from __future__ import annotations


def plural(n: int, noun: str, many: str | None = None) -> str:
    """``0 notes``, ``1 note``, ``1,440 notes``: a count with its noun in the right number (``many``: the plural
    when it is not ``noun`` + s, e.g. ``entries``)."""
    return f"{n:,} {noun if n == 1 else many or noun + 's'}"


def span(seconds: int) -> str:
    """``42s``, ``8m``, ``3h``, ``2d``: the largest whole unit, as ages and lifetimes are shown everywhere."""
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def elapsed(seconds: float) -> str:
    """``1d 2h 5m 3s``: every unit, for an uptime."""
    s = int(seconds)
    d, s = divmod(s, 86_400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return " ".join([f"{d}d"] * bool(d) + [f"{h}h"] * bool(h) + [f"{m}m"] * bool(m) + [f"{s}s"])


def clip(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` characters: a longer one keeps its start and its end around ``…``, since a
    message says what was wrong first and what to do last, and a path's last parts tell it apart."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return f"{text[:head]}…{text[len(text) - (limit - 1 - head) :]}"


def gist(text: str, limit: int) -> str:
    """The start of ``text`` on one line, in at most ``limit`` characters: runs of whitespace (line breaks
    among them) become one space, and a longer text is cut with ``…`` (a prompt, a note in a summary)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def quoted(text: str, limit: int = 60) -> str:
    """A value as a message quotes it: ``repr`` (quotes, control characters escaped, so the message stays one
    line) of the value cut to ``limit`` characters, so a 60 KB value cannot flood it."""
    return repr(clip(text, limit))


# C0 controls but tab and newline, DEL and C1 controls, shown as \x1b and the like.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(32), *range(0x7F, 0xA0)) if c not in (9, 10)}
_LINE_CONTROLS = {**_CONTROLS, 9: "\\t", 10: "\\n"}


def shown(text: str) -> str:
    """``text`` as pd shows it to people: line breaks (LF, CRLF) and tabs kept, every other control character
    escaped (``\\x1b``), a bare CR too, since it lets a line overwrite what it says."""
    return text.replace("\r\n", "\n").translate(_CONTROLS)


def one_line(text: str) -> str:
    """``text`` with every control character escaped, line breaks too: for lines that must stay one line."""
    return text.translate(_LINE_CONTROLS)
