"""Parameter checks for the operation table: ``check(name, value) -> clean value`` or a clear PDError.

Messages name the field, say what was wrong and what is accepted, in one line.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from portdaddy.core import identity as _identity
from portdaddy.core.clock import now_ms
from portdaddy.durations import parse_duration_ms
from portdaddy.errors import PDError, bad_input

Check = Callable[[str, Any], Any]

# The compact JSON the daemon checks sizes with and stores. json.dumps with options builds a new JSONEncoder on
# every call (a third of its cost for a small payload); this one is built once.
compact_json = json.JSONEncoder(separators=(",", ":")).encode
# What input must be: JSON proper, so NaN and Infinity (which Python's json writes and reads) are refused.
_strict_json = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def optional_json(value: Any) -> str | None:
    """A nullable JSON column's text: None stays NULL."""
    return None if value is None else compact_json(value)


# Names that travel in URLs, channels and file names: no spaces, no slashes, no `..` tricks.
NAME_CHARS = re.compile(r"^[A-Za-z0-9._:*-]+$")
NAME_MEMO = 512  # per check: bounded memory (~100 KB) whatever names a client sends


def _type_name(value: Any) -> str:
    return type(value).__name__


# Control characters (C0 but tab, DEL, C1): stored, a line break or a terminal escape in a lock's owner or a
# session's purpose came back inside other agents' error lines and listings (spec/decisions.md, "Text fields").
# Lone UTF-16 surrogates too (JSON and YAML can spell one, "\ud800"): no UTF-8 encoder takes them, so the store,
# msgpack and exec each failed on one later, far from the request. In one search: it costs a text check nothing.
_CONTROL_IN_LINE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff]")
_CONTROL_IN_LINES = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")  # line breaks are text here
_SURROGATE = re.compile(r"[\ud800-\udfff]")  # in a str, a character outside the BMP is one code point: any is lone


# What is wrong with a value holding a lone surrogate, after the name of that value.
NOT_TEXT = ("holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text; send valid Unicode (a character "
            "beyond U+FFFF as itself, or as both halves of its pair)")  # fmt: skip


def not_text(where: str) -> PDError:
    """The refusal of a value holding a lone surrogate, ``where`` naming it."""
    return bad_input(f"{where} {NOT_TEXT}")


def surrogate_in(value: Any, where: str) -> str | None:
    """Where in ``value`` (JSON-like) a string holds a lone surrogate, as ``where.key[1]``; None when none does. A key
    is checked before it goes into a path, so the path itself is always text."""
    stack = [(value, where)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return at
        elif isinstance(item, dict):
            for key, inner in item.items():
                if isinstance(key, str) and _SURROGATE.search(key):
                    return f"a key in {at}" if at else "a key"
                stack.append((inner, f"{at}.{key}" if at else str(key)))
        elif isinstance(item, list | tuple):
            stack.extend((inner, f"{at}[{i}]") for i, inner in enumerate(item))
    return None


def text(max_len: int = 10_000, *, allow_empty: bool = False, strip: bool = True, lines: bool = False) -> Check:
    """A string of printable characters: one line (tabs allowed), or with ``lines`` line breaks too (notes,
    prompts)."""
    control = _CONTROL_IN_LINES if lines else _CONTROL_IN_LINE
    kind = "text" if lines else "one line of text"

    def check(name: str, value: Any) -> str:
        if not isinstance(value, str):
            raise bad_input(f"{name} must be a string, got {_type_name(value)}")
        if strip:
            value = value.strip()
        if not value and not allow_empty:
            raise bad_input(f"{name} must not be empty")
        if len(value) > max_len:
            raise bad_input(f"{name} is {len(value)} characters; the limit is {max_len}", code="PAYLOAD_TOO_LARGE")
        if (found := control.search(value)) is not None:
            if _SURROGATE.match(found.group()):
                raise not_text(name)
            raise bad_input(f"{name} contains the control character {found.group()!r}; send {kind}")
        return value

    return check


def name(what: str, max_len: int = 100, *, wildcard: bool = False) -> Check:
    """Lock names, channels, agent ids: 1..max_len of letters, digits, ``. _ : -`` (``*`` if allowed).

    Names accepted before are remembered (at most NAME_MEMO of them): heartbeats, sprays and publishes repeat
    the same few names hundreds of thousands of times a second, and a dict lookup is a fraction of the checks."""
    accepted: dict[str, str] = {}

    def check(field: str, value: Any) -> str:
        if value.__class__ is str:
            clean = accepted.get(value)
            if clean is not None:
                return clean
        clean = checked(field, value)
        if len(accepted) >= NAME_MEMO:
            accepted.clear()
        accepted[value] = clean
        return clean

    def checked(field: str, value: Any) -> str:
        if not isinstance(value, str):
            raise bad_input(f"{field} must be a string, got {_type_name(value)}")
        value = value.strip()
        if not value or len(value) > max_len:
            raise bad_input(f"{what} must be 1-{max_len} characters, got {len(value)}")
        if not NAME_CHARS.match(value):
            raise bad_input(
                f"{what} {value[:60]!r} has characters outside letters, digits, '.', '_', ':', '-'"
                + (" and '*'" if wildcard else "")
            )
        if "*" in value and not wildcard:
            raise bad_input(f"{what} {value!r} may not contain '*'")
        if "::" in value or value.startswith(":") or value.endswith(":"):
            raise bad_input(f"{what} {value!r} has an empty ':' segment")
        if not value.strip("."):
            raise bad_input(f"{what} {value!r} is not a name")
        if value.startswith("-"):  # pd would read it as an option everywhere it is typed
            raise bad_input(f"{what} {value!r} starts with '-'; start it with a letter or digit")
        return value

    return check


# Who a caller acts as (an IPC frame's or HTTP's agent id) and every parameter naming an agent. Here, not with the
# agents, so that pd can tell a bad PORT_DADDY_AGENT by the daemon's own rule without importing the daemon.
AGENT_ID = name("agent id")


# SQLite stores 64-bit integers; a larger one would crash the query instead of being refused.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# ASCII digits only: str.isdigit() also takes "²" (which int() refuses) and int() takes "٣".
# ASCII spaces too: \s takes \x1c-\x1f, which int() refuses ("0\x1f" was an INTERNAL error, found by hypothesis).
_INTEGER_TEXT = re.compile(r"\s*-?[0-9]+\s*", re.ASCII)


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    lo = INT64_MIN if lo is None else lo
    hi = INT64_MAX if hi is None else hi

    def check(name: str, value: Any) -> int:
        if isinstance(value, str):
            if not _INTEGER_TEXT.fullmatch(value):
                raise bad_input(f"{name} must be an integer, got {value[:40]!r}")
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad_input(f"{name} must be an integer, got {_type_name(value)}")
        if not lo <= value <= hi:
            raise bad_input(f"{name} must be between {lo} and {hi}, got {value}")
        return value

    return check


# A process id: Linux's pid_max is at most 2**22.
pid = integer(1, 2**22)


def number(lo: float, hi: float) -> Check:
    def check(name: str, value: Any) -> float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad_input(f"{name} must be a number, got {value[:40]!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise bad_input(f"{name} must be a finite number")
        if not lo <= value <= hi:
            raise bad_input(f"{name} must be between {lo} and {hi}, got {value}")
        return float(value)

    return check


def boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.lower() in ("true", "1", "yes")
    if value in (0, 1) and isinstance(value, int):  # JSON and IPC clients that have no boolean send 0/1
        return bool(value)
    raise bad_input(f"{name} must be true or false, got {str(value)[:40]!r}")


def duration(max_ms: int | None = None, *, code: str = "VALIDATION_ERROR") -> Check:
    """``2h30m``, ``90s`` or a number of milliseconds."""

    def check(name: str, value: Any) -> int:
        ms = parse_duration_ms(value)
        if ms is None:
            raise bad_input(
                f"{name} {str(value)[:40]!r} is not a duration; use e.g. 90s, 5m, 2h30m or milliseconds",
                code=code,
            )
        limit = INT64_MAX // 2 if max_ms is None else max_ms  # half: callers add it to now
        if ms > limit:
            raise bad_input(f"{name} {str(value)[:40]!r} is over the limit of {limit // 1000}s", code=code)
        return ms

    return check


_any_duration = duration()


def ago(name: str, value: Any) -> int:
    """A duration back from now (``30m``, ``2d`` or milliseconds) as the epoch-ms time it reaches back to. One
    longer than the time since the epoch reaches the epoch (0: everything there is): "the last 5,000 years"
    asks for all of it, not for a time before 1970 (a negative ``since`` in replies, before)."""
    return max(0, now_ms() - _any_duration(name, value))


_whole = integer()
# The times a bare ``since`` may name, in epoch ms: 2000-01-01 to 2100-01-01. Every time a client got from us
# (a note's createdAt, Date.now()) is inside; a number outside is a unit mistake, not a time anyone means.
EARLIEST_SINCE_MS, LATEST_SINCE_MS = 946_684_800_000, 4_102_444_800_000
_LOOK_BACK = "a look-back takes its unit (30m, 2h, 1d); 0 is the beginning"


def time_or_ago(name: str, value: Any) -> int:
    """Every ``since``: a point in time as epoch ms, a whole number (the original's HTTP form; a query string
    carries it as digits), so ``0`` is the beginning; or a duration back from now with its unit (``30m``,
    ``2h``), as ``pd`` users write it. A bare number is never "milliseconds ago": ``--since 0`` meant "from
    now" that way, and showed nothing. Nor is it taken when it cannot be a time anyone means: ``--since 5``
    (5 ms after 1970: everything) was meant as ``5m``, and epoch seconds read as ms are January 1970."""
    if isinstance(value, str) and not _INTEGER_TEXT.fullmatch(value):
        return ago(name, value)
    ms = _whole(name, value)
    if ms == 0 or EARLIEST_SINCE_MS <= ms < LATEST_SINCE_MS:
        return ms
    raise bad_input(f"{name} {ms} {_unlikely_time(ms)}")


def _unlikely_time(n: int) -> str:
    """Why the bare number ``n`` is not taken as a time, and what was likely meant."""
    if EARLIEST_SINCE_MS // 1000 <= n < LATEST_SINCE_MS // 1000:
        return f"looks like epoch seconds; in epoch ms that is {n * 1000}"
    if EARLIEST_SINCE_MS * 1000 <= n < LATEST_SINCE_MS * 1000:
        return f"looks like epoch microseconds; in epoch ms that is {n // 1000}"
    if n < 0:
        return f"is before 1970: did you mean {_guess_look_back(-n)}? {_LOOK_BACK}"
    if n >= LATEST_SINCE_MS:
        return f"is after 2100 as epoch ms; {_LOOK_BACK}"
    return f"would be epoch ms in 1970: did you mean {_guess_look_back(n)}? {_LOOK_BACK}"


def _guess_look_back(n: int) -> str:
    """A small count is likely minutes (``5``: ``5m``); a large one milliseconds ago, in the largest unit that
    divides it (``86400000``: ``1d``)."""
    if n < 10_000:
        return f"{n}m"
    return next(f"{n // size}{unit}" for unit, size in _LOOK_BACK_UNITS if n % size == 0)


_LOOK_BACK_UNITS = (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1))


def lifetime(max_ms: int | None = None) -> Check:
    """A TTL or expiry: a positive duration, refused with INVALID_TTL otherwise. Zero (or under a millisecond)
    is refused rather than read as "never expires": a caller who wrote 0 may well have meant "at once"."""
    within = duration(max_ms, code="INVALID_TTL")
    # Only the lifetimes without a cap (claims, tuples, harbors) may be left out to last forever.
    hint = "; leave it out to never expire" if max_ms is None else f" (at most {max_ms // 1000}s)"

    def check(name: str, value: Any) -> int:
        ms = within(name, value)
        if ms <= 0:
            raise bad_input(f"{name} must be positive, e.g. 30s or 5m{hint}", code="INVALID_TTL")
        return ms

    return check


# Whole numbers a value may hold: what MessagePack carries. JSON (HTTP) spells any size; a larger one, stored,
# failed every IPC reply that carried it, and stopped the daemon's IPC server (the reply encoder raised).
WIRE_INT_MIN, WIRE_INT_MAX = INT64_MIN, 2**64 - 1
_LONG_DIGITS = re.compile(r"[0-9]{19}")  # every number outside the wire's range has at least 19 digits


def wire_int(where: str, value: int) -> int:
    """A whole number inside a JSON value, refused when the IPC wire cannot carry it."""
    if not WIRE_INT_MIN <= value <= WIRE_INT_MAX:
        raise bad_input(f"{where} holds a whole number outside 64 bits (-2**63 to 2**64-1); send it as text")
    return value


def _check_wire_ints(name: str, value: Any) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if item.__class__ is int:
            wire_int(name, item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


def json_value(max_bytes: int) -> Check:
    """Any JSON-serialisable value whose encoding fits ``max_bytes`` and whose numbers fit 64 bits."""

    def check(name: str, value: Any) -> Any:
        try:
            encoded = _strict_json(value)
        except (TypeError, ValueError, RecursionError):
            raise bad_input(f"{name} must be JSON: objects, arrays, text, numbers (not NaN or Infinity), "
                            "true, false or null") from None  # fmt: skip
        if len(encoded) > max_bytes:
            raise bad_input(f"{name} is {len(encoded)} bytes; the limit is {max_bytes}", code="PAYLOAD_TOO_LARGE")
        if _LONG_DIGITS.search(encoded):  # rare (long numbers, or digits in text): only then look closer
            _check_wire_ints(name, value)
        # Every surrogate is escaped in the ASCII encoding, lone or half of a pair: only then look closer.
        if "\\ud" in encoded and (where := surrogate_in(value, name)) is not None:
            raise not_text(where)
        return value

    return check


def json_object(max_bytes: int) -> Check:
    inner = json_value(max_bytes)

    def check(name: str, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise bad_input(f"{name} must be an object, got {_type_name(value)}")
        return inner(name, value)

    return check


def str_list(item: Check, max_items: int = 100, *, example: str | None = None) -> Check:
    """A list of strings (a lone string or comma-separated string is accepted too); with ``example``, one that
    may not be empty (blank items do not count)."""

    def check(name: str, value: Any) -> list[Any]:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise bad_input(f"{name} must be a list of strings, got {_type_name(value)}")
        if len(value) > max_items:
            raise bad_input(f"{name} has {len(value)} items; the limit is {max_items}")
        if example is not None and not value:
            raise bad_input(f"{name} is empty; name at least one, e.g. {example}")
        return [item(f"{name}[{i}]", v) for i, v in enumerate(value)]

    return check


def one_of(*choices: str) -> Check:
    def check(name: str, value: Any) -> str:
        if value.__class__ is not str or value not in choices:
            raise bad_input(f"{name} must be one of {', '.join(choices)}, got {str(value)[:40]!r}")
        return value

    return check


def identity(name: str, value: Any) -> str:
    """An exact identity (no wildcards): what a claim names."""
    if value.__class__ is str:
        return _identity.exact(value)
    return _identity.parse(value, wildcard=False).text  # refuses the type


def identity_pattern(name: str, value: Any) -> str:
    return _identity.validate_pattern(value)


def port_range(name: str, value: Any) -> tuple[int, int]:
    """``[min, max]`` or ``"min-max"``, within 1024-65535 like an explicit port (no privileged ports)."""
    if isinstance(value, str) and "-" in value:
        value = value.split("-", 1)
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise bad_input(f"{name} must be [min, max] or 'min-max', e.g. 4000-4999")
    lo, hi = (integer(1024, 65535)(name, v) for v in value)
    if lo > hi:
        raise bad_input(f"{name} {lo}-{hi} is empty; min must be <= max")
    return lo, hi
