"""Rendering helpers shared by every command: ``--json``/``-q`` options, tables, ages."""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


# C0 controls but tab and newline, DEL and C1 controls, shown as \x1b and the like.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(32), *range(0x7F, 0xA0)) if c not in (9, 10)}
_LINE_CONTROLS = {**_CONTROLS, 9: "\\t", 10: "\\n"}


def one_line(text: str) -> str:
    """``text`` with every control character escaped, line breaks too: for lines that must stay one line."""
    return text.translate(_LINE_CONTROLS)


class _TerminalText(io.TextIOWrapper):
    """stdout on a terminal. What pd prints comes from other agents (notes, payloads, purposes, paths): their
    escape sequences must not retitle, recolour or overwrite the reader's terminal, so controls are shown
    escaped. Piped output passes unchanged; --json escapes them as JSON does."""

    def write(self, text: str) -> int:
        return super().write(text.translate(_CONTROLS))


def guard_terminal() -> None:
    """Escape control characters in what pd prints to a terminal (call before any output)."""
    out = sys.stdout
    if out is not None and out.isatty() and hasattr(out, "buffer"):
        sys.stdout = _TerminalText(out.buffer, encoding=out.encoding, errors=out.errors, line_buffering=True)


def json_option(f: F) -> F:
    return click.option("--json", "-j", "as_json", is_flag=True, help="Print the daemon's reply as JSON.")(f)


def quiet_option(f: F) -> F:
    return click.option("--quiet", "-q", is_flag=True, help="Print only the essential value.")(f)


def since_option(what: str, default: str | None = None) -> Callable[[F], F]:
    """``--since``, read alike by every command that has it (spec/decisions.md): the daemon parses it."""
    return click.option("--since", metavar="WHEN", default=default, show_default=default is not None,
                        help=f"Only {what} since WHEN: a duration ago (30m, 2h, 1d) or a time in epoch ms "
                        "(0: from the beginning).")  # fmt: skip


def warn(lines: list[str], *, as_json: bool) -> None:
    """Warnings go to stderr, like conflicts; under --json the reply alone is printed."""
    if not as_json:
        for line in lines:
            click.echo(line, err=True)


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    cells = [[str(c) for c in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            click.echo("  ".join("-" * w for w in widths))


def _span(seconds: int) -> str:
    """``42s``, ``8m``, ``3h``, ``2d``: the largest whole unit."""
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def age(ms_timestamp: int | None, now_ms: int | None = None) -> str:
    """``42s``, ``8m``, ``3h``, ``2d`` since a ms timestamp."""
    if not ms_timestamp:
        return "-"
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    return _span(max(0, (now_ms - ms_timestamp) // 1000))


def until(ms_timestamp: int | None) -> str:
    """``in 5m`` to a ms timestamp, rounded up: a lock just taken for 5 minutes expires "in 5m", not "in 4m"."""
    if not ms_timestamp:
        return "never"
    return "in " + _span(max(0, -((int(time.time() * 1000) - ms_timestamp) // 1000)))
