"""Rendering helpers shared by every command: ``--json``/``-q`` options, tables, ages, and the one place where
what pd prints has its control characters escaped."""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

import click

from portdaddy.cli.fds import discard
from portdaddy.text import shown, span

F = TypeVar("F", bound=Callable[..., Any])


class ReaderGone(Exception):
    """What pd prints has nobody to read it any more (``pd notes | head -1``, once head has its line). pd stops
    there and exits 0, not 1, which would say it was refused (spec/decisions.md, "Exit codes and errors")."""


class _Shown(io.TextIOWrapper):
    """stdout or stderr of pd. What pd prints for people comes from other agents (notes, purposes, lock owners,
    payloads, paths), some stored before the daemon refused control characters in them, and reaches a terminal
    directly or through a pipe (``| less -R``, ``| head``): their escape sequences must not retitle, recolour or
    overwrite the reader's terminal, so every write is ``shown()``. What programs read (``--json``) and the
    spinner's own carriage returns go through ``exact()``. A write its reader is gone for raises ReaderGone."""

    def write(self, text: str) -> int:
        self.exact(shown(text))
        return len(text)

    def exact(self, text: str) -> None:
        try:
            super().write(text)
        except BrokenPipeError:
            self._gone()

    def flush(self) -> None:
        try:
            super().flush()
        except BrokenPipeError:
            self._gone()

    def _gone(self) -> NoReturn:
        discard(self.fileno())
        raise ReaderGone from None


def guard_output() -> None:
    """Escape control characters in everything pd prints from here on but ``echo_exact`` (call before any
    output)."""
    for name in ("stdout", "stderr"):
        out = getattr(sys, name)
        if out is not None and hasattr(out, "buffer"):
            setattr(sys, name, _Shown(out.buffer, encoding=out.encoding, errors=out.errors,
                                      line_buffering=out.line_buffering, write_through=out.write_through))  # fmt: skip


def echo_exact(text: str, *, err: bool = False, nl: bool = True) -> None:
    """Print ``text`` unchanged (JSON, whose own escapes keep it one value; the spinner's ``\\r``)."""
    out = sys.stderr if err else sys.stdout
    text += "\n" if nl else ""
    if isinstance(out, _Shown):
        out.exact(text)
    else:
        out.write(text)
    out.flush()


def json_option(f: F) -> F:
    return click.option("--json", "-j", "as_json", is_flag=True, help="Print the daemon's reply as JSON.")(f)


def quiet_option(f: F) -> F:
    return click.option("--quiet", "-q", is_flag=True, help="Print only the essential value.")(f)


def since_option(what: str, default: str | None = None) -> Callable[[F], F]:
    """``--since``, read alike by every command that has it (spec/decisions.md): the daemon parses it."""
    return click.option("--since", metavar="WHEN", default=default, show_default=default is not None,
                        help=f"Only {what} since WHEN: a duration ago (30m, 2h, 1d) or a time in epoch ms "
                        "(0: from the beginning).")  # fmt: skip


def warning(text: str) -> None:
    """A warning: one line on stderr, like conflicts, spelled alike by every command."""
    click.echo(f"Warning: {text}", err=True)


def warn(lines: list[str], *, as_json: bool) -> None:
    """Warnings, but under --json, where the reply alone is printed."""
    if not as_json:
        for line in lines:
            warning(line)


def emit_json(value: Any) -> None:
    echo_exact(json.dumps(value, indent=2, default=str))


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
    cells = [[str(c) for c in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            click.echo("  ".join("-" * w for w in widths))


def age(ms_timestamp: int | None, now_ms: int | None = None) -> str:
    """``42s``, ``8m``, ``3h``, ``2d`` since a ms timestamp."""
    if not ms_timestamp:
        return "-"
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    return span(max(0, (now_ms - ms_timestamp) // 1000))


def until(ms_timestamp: int | None) -> str:
    """``in 5m`` to a ms timestamp, rounded up: a lock just taken for 5 minutes expires "in 5m", not "in 4m"."""
    if not ms_timestamp:
        return "never"
    return "in " + span(max(0, -((int(time.time() * 1000) - ms_timestamp) // 1000)))
