"""Linda tuple patterns: validation of tuples and patterns, and a compiled matcher.

A tuple is a non-empty JSON array. A pattern is a JSON array compared position by position:

* a pattern **shorter** than the tuple matches on its positions (extra tuple fields are ignored); a pattern
  longer than the tuple never matches, even if its extra elements are wildcards; ``[]`` matches every tuple;
* ``"*"`` or ``null`` matches any value;
* ``">N"`` / ``"<N"`` (N a decimal number in ASCII digits: ``">5"``, ``"<-0.5"``, ``">1e3"``) matches numbers
  strictly greater / less than N. Against a non-number the element falls back to equality (as the original does), so
  ``">5"`` matches the string ``">5"`` and nothing else that is not a number. If the text after ``>``/``<``
  is not a number, the element is a plain string;
* a string whose ``:``-segments include a lone ``*`` is an identity-style pattern (same rule as
  ``identity.matches``): if the last segment is ``*`` it stands for one or more further segments
  (``"myapp:*"`` matches ``"myapp:api"`` and ``"myapp:api:main"``, not ``"myapp"``), otherwise the segment
  counts must be equal; every other ``*`` segment matches any one segment (including an empty one: tuple
  strings are arbitrary text, split on ``:``). Only whole ``*`` segments are special (``"my*"`` is literal),
  and these patterns match strings only. Unlike the original, a leading ``*`` segment (``"*:api"``) counts;
* anything else is JSON equality: numbers by value (``1 == 1.0``), ``true``/``false`` never equal a number,
  arrays and objects by deep equality under the same rule (wildcards inside them are literal).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from portdaddy.core.validate import wire_int
from portdaddy.errors import bad_input
from portdaddy.text import quoted

WILDCARD = "*"
MAX_FIELDS = 64
MAX_BYTES = 64_000  # UTF-8 JSON of a tuple or pattern (spec/swarm.md)
MAX_DEPTH = 32  # nesting bound, so hostile input cannot exhaust the recursion limit

Predicate = Callable[[Any], bool]

# A JSON-style decimal number (sign allowed, as users type "<-1" and "<+1" alike). ASCII digits only: a str
# pattern's \d also takes "\u0663" (Arabic-Indic three), which int() and float() would then read as 3.
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_INTEGER = re.compile(r"[+-]?\d+", re.ASCII)


def _is_number(v: Any) -> bool:
    # bool is a subclass of int in Python but not a number in JSON.
    return isinstance(v, int | float) and not isinstance(v, bool)


def json_equal(a: Any, b: Any) -> bool:
    """JSON equality: numbers by value, bool distinct from numbers, arrays and objects deeply."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_number(a) or _is_number(b):
        return _is_number(a) and _is_number(b) and a == b
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(json_equal, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(json_equal(v, b[k]) for k, v in a.items())
    if a is None or b is None:
        return a is b
    return isinstance(a, str) and isinstance(b, str) and a == b


# --- validation -------------------------------------------------------------------------------------------


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]{1,40}")


def _key(key: str) -> str:
    """An object key as a refusal names it: as is when plain, else quoted and cut short, so that a key with a
    line break or 60 KB long cannot make the refusal several lines or that long."""
    return key if _PLAIN_KEY.fullmatch(key) else quoted(key, 40)


def _clean(value: Any, where: str, depth: int) -> Any:
    """A plain-JSON copy of ``value`` (list/dict/str/int/float/bool/None), or a clear error."""
    if depth > MAX_DEPTH:
        raise bad_input(f"{where} nests deeper than {MAX_DEPTH} levels; flatten it")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return wire_int(where, int(value))
    if isinstance(value, float):
        if not math.isfinite(value):
            raise bad_input(f"{where} is {value!r}; JSON numbers must be finite")
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, list | tuple):
        return [_clean(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise bad_input(f"{where} has a {type(k).__name__} key; JSON object keys are strings")
            out[str(k)] = _clean(v, f"{where}.{_key(k)}", depth + 1)
        return out
    raise bad_input(f"{where} is a {type(value).__name__}; use JSON values (null, bool, number, string, "
                    "array, object)")  # fmt: skip


def _check_array(value: object, what: str, max_fields: int, max_bytes: int, *, allow_empty: bool) -> list:
    if not isinstance(value, list | tuple):
        raise bad_input(f'{what} must be a JSON array, got {type(value).__name__}; e.g. ["task", 3]')
    if not value and not allow_empty:
        raise bad_input(f"{what} is empty; a tuple needs at least one field")
    if len(value) > max_fields:
        raise bad_input(f"{what} has {len(value)} fields; the limit is {max_fields}")
    clean = [_clean(v, f"{what}[{i}]", 1) for i, v in enumerate(value)]
    try:
        size = len(json.dumps(clean, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    except UnicodeEncodeError:
        raise bad_input(f"{what} contains a string that is not valid Unicode (a lone surrogate)") from None
    if size > max_bytes:
        raise bad_input(f"{what} is {size} bytes as JSON; the limit is {max_bytes}", code="PAYLOAD_TOO_LARGE")
    return clean


def validate_tuple(value: object, max_fields: int = MAX_FIELDS, max_bytes: int = MAX_BYTES) -> list:
    """A clean copy of a tuple: a non-empty JSON array of JSON values within the field and byte limits.

    Python tuples are accepted as arrays (SDK callers); the copy holds only list/dict/str/int/float/bool/None.
    """
    return _check_array(value, "tuple", max_fields, max_bytes, allow_empty=False)


def validate_pattern(value: object, max_fields: int = MAX_FIELDS, max_bytes: int = MAX_BYTES) -> list:
    """A clean copy of a pattern: a JSON array (``[]`` allowed: it matches every tuple)."""
    return _check_array(value, "pattern", max_fields, max_bytes, allow_empty=True)


# --- matching ---------------------------------------------------------------------------------------------


def _parse_threshold(text: str) -> int | float | None:
    # Parsed as JSON would parse the same digits (int if integral), so a threshold compares exactly with the
    # tuple values it was copied from, even beyond 2**53.
    if _INTEGER.fullmatch(text):
        return int(text)
    if _NUMBER.fullmatch(text):
        number = float(text)
        return None if math.isnan(number) else number
    return None


def _equal_to(expected: Any) -> Predicate:
    if isinstance(expected, str):
        return lambda v: isinstance(v, str) and v == expected
    return lambda v: json_equal(expected, v)


def _segments_predicate(pattern: str) -> Predicate | None:
    segs = pattern.split(":")
    if len(segs) < 2 or WILDCARD not in segs:
        return None
    if segs[-1] == WILDCARD:
        fixed = segs[:-1]
        n = len(fixed)

        def prefix(v: Any) -> bool:
            if not isinstance(v, str):
                return False
            parts = v.split(":")
            return len(parts) > n and all(p in (WILDCARD, s) for p, s in zip(fixed, parts, strict=False))

        return prefix
    n = len(segs)

    def segmentwise(v: Any) -> bool:
        if not isinstance(v, str):
            return False
        parts = v.split(":")
        return len(parts) == n and all(p in (WILDCARD, s) for p, s in zip(segs, parts, strict=True))

    return segmentwise


def _string_predicate(element: str) -> Predicate | None:
    """The test for a pattern string with a meaning of its own (a threshold, an identity-style pattern); None
    when the string stands for itself."""
    if element[:1] in (">", "<"):
        threshold = _parse_threshold(element[1:])
        if threshold is not None:
            greater = element[0] == ">"

            def compare(v: Any) -> bool:
                if _is_number(v):
                    return v > threshold if greater else v < threshold
                return isinstance(v, str) and v == element  # non-numbers: plain equality

            return compare
    return _segments_predicate(element)


def _element_predicate(element: Any) -> Predicate | None:
    """The test for one pattern position; None means "matches anything"."""
    if element is None or element == WILDCARD:
        return None
    if isinstance(element, str):
        return _string_predicate(element) or _equal_to(element)
    return _equal_to(element)


def literal_head(pattern: list) -> str | None:
    """The pattern's first element when only a tuple whose first field is that very string can match it (the
    key of the tuple space's index by first field), else None."""
    head = pattern[0] if pattern else None
    if isinstance(head, str) and head != WILDCARD and _string_predicate(head) is None:
        return head
    return None


def compile_pattern(pattern: list) -> Callable[[list], bool]:
    """Compile a (validated) pattern once into ``tuple -> bool``; wildcard positions cost nothing."""
    n = len(pattern)
    checks = [(i, p) for i, element in enumerate(pattern) if (p := _element_predicate(element)) is not None]

    def match_tuple(tup: list) -> bool:
        if len(tup) < n:
            return False
        return all(check(tup[i]) for i, check in checks)

    return match_tuple


def match(pattern: list, tup: list) -> bool:
    """Whether ``tup`` matches ``pattern``; compile with ``compile_pattern`` when testing many tuples."""
    return compile_pattern(pattern)(tup)
