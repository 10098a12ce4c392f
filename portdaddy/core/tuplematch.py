"""Tuple pattern matching (ref §19). INTERIM stand-in written on branch issue-6 because main's module had not
landed yet; main's portdaddy/core/tuplematch.py replaces it on merge (same four names)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

Matcher = Callable[[list[Any]], bool]


def validate_tuple(value: Any) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise ValueError("a tuple is a non-empty JSON array")
    return value


def validate_pattern(value: Any) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise ValueError("a pattern is a non-empty JSON array")
    return value


def _element(p: Any) -> Callable[[Any], bool]:
    if p is None or p == "*":
        return lambda _: True
    if isinstance(p, str) and len(p) > 1 and p[0] in "<>":
        try:
            bound = float(p[1:])
        except ValueError:
            bound = math.nan
        greater = p[0] == ">"

        def compare(x: Any) -> bool:
            if isinstance(x, int | float) and not isinstance(x, bool):
                return False if math.isnan(bound) else (x > bound if greater else x < bound)
            return x == p

        return compare
    if isinstance(p, str) and p.endswith(":*"):
        prefix = p[:-1]
        return lambda x: isinstance(x, str) and x.startswith(prefix)
    if isinstance(p, str) and ":*:" in p:
        segs = p.split(":")

        def segments(x: Any) -> bool:
            if not isinstance(x, str):
                return False
            parts = x.split(":")
            return len(parts) == len(segs) and all(s == "*" or s == q for s, q in zip(segs, parts, strict=True))

        return segments
    if isinstance(p, dict | list):
        return lambda _: False
    return lambda x: type(x) is type(p) and x == p if isinstance(p, bool) or isinstance(x, bool) else x == p


def compile_pattern(pattern: list[Any]) -> Matcher:
    checks = [_element(p) for p in pattern]
    n = len(checks)
    return lambda fields: len(fields) >= n and all(c(f) for c, f in zip(checks, fields, strict=False))


def match(pattern: list[Any], fields: list[Any]) -> bool:
    return compile_pattern(pattern)(fields)
