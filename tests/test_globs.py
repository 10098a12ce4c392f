"""File-claim globs: normalisation tables, matching tables, and ``overlaps`` against brute force."""

from __future__ import annotations

import itertools
import re
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portdaddy.core.globs import matches, normalize_claim_path, overlaps, segment_witness, witness
from portdaddy.errors import PDError

# --- normalisation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("src/api/x.ts", "src/api/x.ts"),
        ("  src/api  ", "src/api"),
        ("./src/api", "src/api"),
        ("././src//api", "src/api"),
        ("src/./api", "src/api"),
        ("src/api/", "src/api/**"),
        ("src/api/**/", "src/api/**"),
        ("src/**/**/x", "src/**/x"),
        ("src/***", "src/**"),
        ("src/a**b", "src/a*b"),
        ("**", "**"),
        ("src/components/checkout/*", "src/components/checkout/*"),
        ("a?c", "a?c"),
    ],
)
def test_normalize(raw: str, clean: str) -> None:
    assert normalize_claim_path(raw) == clean
    assert normalize_claim_path(clean) == clean  # idempotent


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (None, "must be a string"),
        (b"src", "must be a string"),
        ("", "empty"),
        ("   ", "empty"),
        ("./", "names no file"),
        (".", "names no file"),
        ("/etc/passwd", "absolute"),
        ("x/../y", "leaves the worktree"),
        ("..", "leaves the worktree"),
        ("a/b\x00", "NUL"),
        ("a\nb", "line break"),
        ("a" * 1025, "limit is 1024"),
    ],
)
def test_normalize_refuses(raw: object, fragment: str) -> None:
    with pytest.raises(PDError) as info:
        normalize_claim_path(raw)
    assert info.value.code == "VALIDATION_ERROR"
    assert fragment in info.value.message


def test_dotdot_message_says_what_to_do() -> None:
    expected = r"path 'x/\.\./y' leaves the worktree; give paths inside it"
    with pytest.raises(PDError, match=expected):
        normalize_claim_path("x/../y")


def test_dots_inside_names_are_fine() -> None:
    assert normalize_claim_path("a/..b/c..") == "a/..b/c.."
    assert normalize_claim_path(".github/workflows/*") == ".github/workflows/*"


# --- matching ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claim", "path", "expected"),
    [
        ("src/api/*", "src/api/x.ts", True),
        ("src/api/*", "src/api/v1/x.ts", False),  # '*' stays in its segment
        ("src/api/*", "src/api", False),
        ("src/api/**", "src/api", True),  # '**' matches zero segments
        ("src/api/**", "src/api/v1/x.ts", True),
        ("src/api", "src/api", True),  # a plain path claims itself...
        ("src/api", "src/api/v1/x.ts", True),  # ...and everything under it
        ("src/api", "src/apis/x.ts", False),
        ("src/api", "src", False),
        ("src/middleware/auth.ts", "src/middleware/auth.ts", True),
        ("*.md", "README.md", True),
        ("*.md", "docs/x.md", False),
        ("**/*.md", "docs/x.md", True),
        ("**/*.md", "x.md", True),
        ("src/?.ts", "src/a.ts", True),
        ("src/?.ts", "src/ab.ts", False),
        ("a/**/b", "a/b", True),
        ("a/**/b", "a/x/y/b", True),
        ("a/**/b", "a/x/y/c", False),
        ("**", "anything/at/all", True),
        ("src/*", "", False),
        ("src/*", "src//x", False),
        ("a*", "a*", True),
        ("a?", "a*", True),  # path characters are literal, claim wildcards match them
    ],
)
def test_matches_table(claim: str, path: str, expected: bool) -> None:
    assert matches(claim, path) is expected


# --- overlaps ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("src/api/*", "src/api/x.ts", True),
        ("src/*.ts", "src/*.js", False),
        ("src/**", "src/a/b/c.py", True),
        ("a/*/c", "a/b/*", True),
        ("*.md", "docs/x.md", False),
        ("src/api", "src/api/x.ts", True),
        ("src/api", "src/api/**", True),
        ("src/api", "src/*", True),
        ("src/api", "src/web", False),
        ("src/api/*", "src/api/v1/*", False),
        ("src/api/**", "src/api/v1/*", True),
        ("**/test_*.py", "src/**/*_test.py", True),  # test_x_test.py
        ("*a", "b*", True),
        ("a*", "*b*c", True),
        ("a*b", "a*c", False),
        ("?", "??", False),
        ("??*", "*", True),
        ("**", "**", True),
        ("**/x", "**/y", False),
        ("**/x/**", "**/y/**", True),
        ("a/**/b", "a/b/**/c", False),  # a/b/.../b and a/b/.../c: the last segments differ
        ("a/**/b", "a/**/c/**", True),  # a/c/b
    ],
)
def test_overlaps_table(a: str, b: str, expected: bool) -> None:
    assert overlaps(a, b) is expected
    assert overlaps(b, a) is expected
    w = witness(a, b)
    if expected:
        assert w is not None and matches(a, w) and matches(b, w), w
    else:
        assert w is None


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [("a*", "*b", "ab"), ("?", "*", "x"), ("a*c", "ab*", "abc"), ("a", "b", None), ("*", "*", "x")],
)
def test_segment_witness(a: str, b: str, expected: str | None) -> None:
    assert segment_witness(a, b) == expected


def test_long_claims_stay_fast() -> None:
    # Many stars on both sides: the product search is polynomial, not exponential.
    a = "/".join(["*a*b*c*d*"] * 8) + "/**"
    b = "/".join(["*d*c*b*a*"] * 8) + "/z"
    w = witness(a, b)
    assert w is not None and matches(a, w) and matches(b, w)
    assert not overlaps("a*" * 200 + "x", "a*" * 200 + "y")


# --- brute force ------------------------------------------------------------------------------------------

SEG_CHOICES = ["a", "b", "ab", "*", "?", "**", "a*", "*b", "?*", "a?b"]
LETTERS = "ab"
MAX_DEPTH = 3
MAX_SEG_LEN = 3

claims_no_globstar = st.lists(st.sampled_from([s for s in SEG_CHOICES if s != "**"]), min_size=1, max_size=3)
claims_any = st.lists(st.sampled_from(SEG_CHOICES), min_size=1, max_size=3)


@cache
def universe() -> tuple[str, ...]:
    segs = ["".join(p) for n in range(1, MAX_SEG_LEN + 1) for p in itertools.product(LETTERS, repeat=n)]
    return tuple("/".join(p) for d in range(1, MAX_DEPTH + 1) for p in itertools.product(segs, repeat=d))


ANY = "[^/\\n]"  # one character of a segment


def regex_for(claim: str) -> re.Pattern[str]:
    """An independent reference for ``matches``: translate the grammar to a regular expression."""
    segs = claim.split("/")
    plain = not any(c in claim for c in "*?")
    parts = []
    for seg in segs:
        if seg == "**":
            parts.append(f"(?:{ANY}+/)*")
        else:
            body = "".join(f"{ANY}*" if c == "*" else ANY if c == "?" else re.escape(c) for c in seg)
            parts.append(f"(?={ANY})(?:{body})/")  # the lookahead keeps segments non-empty
    if plain:
        parts.append(f"(?:{ANY}+/)*")
    return re.compile("".join(parts))


def ref_matches(claim: str, path: str) -> bool:
    return regex_for(claim).fullmatch(path + "/") is not None


@cache
def universe_text() -> str:
    return "".join(f"{p}/\n" for p in universe())


@cache
def ref_set(claim: str) -> frozenset[str]:
    # One scan over all universe paths, one per line (hence no newline in ANY).
    found = re.findall(f"(?m)^({regex_for(claim).pattern})$", universe_text())
    return frozenset(p[:-1] for p in found)


def brute_common(a: str, b: str) -> str | None:
    common = ref_set(a) & ref_set(b)
    return min(common) if common else None


@given(claims_any, st.sampled_from(universe()))
def test_matches_agrees_with_regex(segs: list[str], path: str) -> None:
    claim = "/".join(segs)
    assert matches(claim, path) == ref_matches(claim, path)


@given(claims_any.map("/".join), st.text("ab*?/x", max_size=6))
def test_matches_agrees_with_regex_on_odd_paths(claim: str, path: str) -> None:
    # Empty paths and empty segments match nothing; '*' and '?' in a path are ordinary characters.
    assert matches(claim, path) == ("" not in path.split("/") and ref_matches(claim, path))


@settings(max_examples=300)
@given(claims_any.map("/".join), claims_any.map("/".join))
def test_overlaps_symmetric(a: str, b: str) -> None:
    assert overlaps(a, b) == overlaps(b, a)
    assert witness(a, b) == witness(b, a)


@given(claims_any.map("/".join))
def test_overlaps_reflexive(a: str) -> None:
    w = witness(a, a)
    assert w is not None and matches(a, w)


@settings(max_examples=400)
@given(claims_any.map("/".join), claims_any.map("/".join))
def test_overlaps_agrees_with_brute_force(a: str, b: str) -> None:
    w = witness(a, b)
    found = brute_common(a, b)
    if found is not None:
        assert w is not None, f"{a!r} and {b!r} both match {found!r}"
    if w is not None:
        # The witness is a real common path (checked by the regex reference, not only by ``matches``).
        assert ref_matches(a, w) and ref_matches(b, w), w
        assert matches(a, w) and matches(b, w), w


@settings(max_examples=400)
@given(claims_no_globstar.map("/".join), claims_no_globstar.map("/".join))
def test_overlaps_complete_without_globstar(a: str, b: str) -> None:
    # Plain paths add an implicit '**', but two plain paths meet at the longer one and a plain path meets a
    # fixed-depth glob at the glob's depth (<= 3), so brute force over the universe still finds any overlap.
    assert overlaps(a, b) == (brute_common(a, b) is not None)


@given(st.text("ab*?", min_size=1, max_size=4), st.text("ab*?", min_size=1, max_size=4))
def test_segment_witness_agrees_with_brute_force(a: str, b: str) -> None:
    ra = re.compile("".join("[^/]*" if c == "*" else "[^/]" if c == "?" else c for c in a))
    rb = re.compile("".join("[^/]*" if c == "*" else "[^/]" if c == "?" else c for c in b))
    # If a common non-empty string exists, one exists over {a, b, x} no longer than the non-'*' characters
    # of both globs (each character of a shortest witness is consumed by a non-'*' position of a or b), or 1.
    bound = max(1, len(a.replace("*", "")) + len(b.replace("*", "")))
    words = ("".join(p) for n in range(1, bound + 1) for p in itertools.product("abx", repeat=n))
    exists = any(ra.fullmatch(w) and rb.fullmatch(w) for w in words)
    w = segment_witness(a, b)
    assert (w is not None) == exists
    if w is not None:
        assert ra.fullmatch(w) and rb.fullmatch(w)
