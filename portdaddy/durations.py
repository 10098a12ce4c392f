"""The duration grammar every knob and parameter takes (``90s``, ``2h30m``, milliseconds), and how long ``pd``
waits for the daemon's reply.

Standard library ``os`` only: the ``pd claim -q`` fast path reads ``PORT_DADDY_TIMEOUT`` before
anything heavier (``config.Settings`` with pathlib and dataclasses) is imported.
"""

from __future__ import annotations

import os

from portdaddy.errors import bad_input

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration_ms(value: object) -> int | None:
    """``90s``, ``2h30m``, ``1d`` or a bare number of milliseconds → ms; None if it is not a duration."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float):
        return int(value) if value >= 0 and value == value and value != float("inf") else None
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    if not text or len(text) > 50:
        return None
    if text.isascii() and text.isdigit():  # isdigit() alone takes "²", which int() refuses
        return int(text)
    total, rest = 0, text
    while rest:  # number-unit pairs, by hand: importing re would cost the fast path ~5 ms (enum and all)
        number = rest[: len(rest) - len(rest.lstrip("0123456789"))]  # ASCII digits: isdigit() would take "٣"
        unit = "ms" if rest.startswith("ms", len(number)) else rest[len(number) : len(number) + 1]
        if not number or unit not in _UNIT_MS:
            return None
        total += int(number) * _UNIT_MS[unit]
        rest = rest[len(number) + len(unit) :]
    return total


REPLY_TIMEOUT_VAR = "PORT_DADDY_TIMEOUT"
DEFAULT_REPLY_TIMEOUT_S = 10.0
_REPLY_TIMEOUT_LIMITS_MS = (1000, 86_400_000)
# Said when pd gave up on a reply: a slow machine is one reason, a stopped or stuck daemon (pd status) another.
SLOW_HINT = f"; if it is only slow, wait longer with {REPLY_TIMEOUT_VAR}=1m"


def reply_timeout_s(env: Mapping[str, str] = os.environ) -> float:
    """How long ``pd`` waits for the daemon's reply beyond what the operation itself may take:
    ``PORT_DADDY_TIMEOUT`` (a duration), else 10 s. Under a second is refused as a likely unit mistake
    (``60`` is 60 ms), as ``pd spawn --timeout`` refuses it."""
    raw = env.get(REPLY_TIMEOUT_VAR, "").strip()
    if not raw:
        return DEFAULT_REPLY_TIMEOUT_S
    ms = parse_duration_ms(raw)
    lo, hi = _REPLY_TIMEOUT_LIMITS_MS
    if ms is None or not lo <= ms <= hi:
        why = "is not a duration" if ms is None else f"is {ms} ms" if ms < lo else "is over a day"
        raise bad_input(f"{REPLY_TIMEOUT_VAR}={raw[:40]!r} {why}; give 1s to 1d, e.g. {REPLY_TIMEOUT_VAR}=60s "
                        "(how long pd waits for the daemon's reply)")  # fmt: skip
    return ms / 1000
