"""Tuple patterns: grammar tables, validation, and the compiled matcher against a reference written from the
grammar text."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portdaddy.core.tuplematch import (
    compile_pattern,
    json_equal,
    literal_head,
    match,
    validate_pattern,
    validate_tuple,
)
from portdaddy.errors import PDError

# --- tables -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "tup", "expected"),
    [
        (["task", "*"], ["task", "build"], True),
        (["task", None], ["task", 3], True),
        (["task"], ["task", "build", 3], True),  # shorter pattern: prefix on positions
        ([], ["anything"], True),
        (["task", "*", "*"], ["task", "build"], False),  # longer pattern never matches
        (["task"], ["other"], False),
        ([">5"], [6], True),
        ([">5"], [5], False),
        ([">5"], [5.0001], True),
        (["<5"], [4.5], True),
        (["<5"], [5], False),
        (["<-1"], [-2], True),
        ([">1e3"], [1001], True),
        ([">.5"], [0.75], True),
        ([">5"], ["6"], False),  # a numeric string is not a number
        ([">5"], [">5"], True),  # against a non-number: plain equality
        ([">5"], [True], False),  # bool is not a number
        ([">5"], [None], False),
        ([">abc"], [">abc"], True),  # not a threshold: a plain string
        ([">abc"], [10], False),
        ([">٣"], [5], False),  # non-ASCII digits are not a number: a plain string
        ([">٣"], [">٣"], True),
        (["<\uff13"], [1], False),  # fullwidth 3
        ([">9007199254740992"], [9007199254740993], True),  # integral thresholds compare exactly
        (["<9007199254740993"], [9007199254740993], False),
        (["myapp:*"], ["myapp:api"], True),
        (["myapp:*"], ["myapp:api:main"], True),
        (["myapp:*"], ["myapp"], False),
        (["myapp:*"], ["myapp2:api"], False),
        (["myapp:*"], [3], False),
        (["a:*:c"], ["a:b:c"], True),
        (["a:*:c"], ["a:b:b:c"], False),
        (["a:*:c"], ["a::c"], True),  # '*' matches any one segment, empty included
        (["a:*:c"], ["a:b:d"], False),
        (["*:api"], ["x:api"], True),
        (["a:*:*"], ["a:b:c:d"], True),  # trailing '*' spans one or more segments
        (["a:*:*"], ["a:b"], False),
        (["my*"], ["myapp"], False),  # only whole '*' segments are special
        (["my*"], ["my*"], True),
        ([1], [1.0], True),
        ([1], [True], False),
        ([True], [1], False),
        ([True], [True], True),
        ([0], [False], False),
        ([None], [0], True),  # null is a wildcard
        ([[1, 2]], [[1, 2]], True),
        ([[1, 2]], [[1.0, 2]], True),
        ([[1, 2]], [[True, 2]], False),
        ([["*"]], [[5]], False),  # wildcards inside arrays are literal
        ([{"a": 1}], [{"a": 1.0}], True),
        ([{"a": 1}], [{"a": 1, "b": 2}], False),
        ([{"a": [None]}], [{"a": [None]}], True),
        (["x"], [["x"]], False),
    ],
)
def test_match_table(pattern: list, tup: list, expected: bool) -> None:
    assert match(pattern, tup) is expected
    assert compile_pattern(pattern)(tup) is expected


@pytest.mark.parametrize(("pattern", "head"), [
    (["job", "*"], "job"), (["my*"], "my*"), ([">x"], ">x"), (["a:b"], "a:b"),
    ([], None), (["*"], None), ([None, "job"], None), ([">3"], None), (["<-1.5"], None), (["a:*"], None),
    (["*:b"], None), ([7], None), ([["job"]], None),
])  # fmt: skip
def test_literal_head_is_the_first_string_only_itself_can_match(pattern: list, head: str | None) -> None:
    assert literal_head(pattern) == head
    if head is not None:  # the index's promise: no tuple with another first field matches
        assert not match(pattern, ["other", "x"]) and match(pattern[:1], [head])


def test_compiled_pattern_is_reusable() -> None:
    m = compile_pattern(["job", ">2", "*"])
    tuples = [["job", 3, "x"], ["job", 2, "x"], ["job", 5], ["job", 9, "y", "extra"], ["jobs", 9, "y"]]
    assert [m(t) for t in tuples] == [True, False, False, True, False]


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [(1, 1.0, True), (True, 1, False), (False, 0, False), (None, None, True), ("1", 1, False),
     ([1, [2]], [1.0, [2.0]], True), ({"k": True}, {"k": 1}, False), ([], {}, False), (None, False, False)],
)  # fmt: skip
def test_json_equal(a: Any, b: Any, expected: bool) -> None:
    assert json_equal(a, b) is expected
    assert json_equal(b, a) is expected


# --- validation -------------------------------------------------------------------------------------------


def test_validate_tuple_returns_plain_copy() -> None:
    src = ("task", ("a", 1), {"k": [None, True, 1.5]})
    clean = validate_tuple(src)
    assert clean == ["task", ["a", 1], {"k": [None, True, 1.5]}]
    assert type(clean[1]) is list


@pytest.mark.parametrize(
    ("value", "fragment", "code"),
    [
        ("task", "must be a JSON array", "VALIDATION_ERROR"),
        ({"a": 1}, "must be a JSON array", "VALIDATION_ERROR"),
        (None, "must be a JSON array", "VALIDATION_ERROR"),
        ([], "is empty", "VALIDATION_ERROR"),
        (list(range(65)), "65 fields; the limit is 64", "VALIDATION_ERROR"),
        ([math.nan], "finite", "VALIDATION_ERROR"),
        ([math.inf], "finite", "VALIDATION_ERROR"),
        ([b"bytes"], "tuple[0] is a bytes", "VALIDATION_ERROR"),
        ([{1: "x"}], "int key", "VALIDATION_ERROR"),
        ([{"k": {1, 2}}], "tuple[0].k is a set", "VALIDATION_ERROR"),
        (["\ud800"], "not valid Unicode", "VALIDATION_ERROR"),
        (["x" * 70000], "the limit is 64000", "PAYLOAD_TOO_LARGE"),
    ],
)
def test_validate_tuple_refuses(value: object, fragment: str, code: str) -> None:
    with pytest.raises(PDError) as info:
        validate_tuple(value)
    assert info.value.code == code
    assert fragment in info.value.message


def test_validate_tuple_limits_are_parameters() -> None:
    assert validate_tuple([1, 2, 3], max_fields=3) == [1, 2, 3]
    with pytest.raises(PDError):
        validate_tuple([1, 2, 3], max_fields=2)
    with pytest.raises(PDError):
        validate_tuple(["abcdef"], max_bytes=8)  # ["abcdef"] is 10 bytes


def test_validate_tuple_refuses_deep_nesting() -> None:
    deep: list = [1]
    for _ in range(100):
        deep = [deep]
    with pytest.raises(PDError, match="nests deeper"):
        validate_tuple(deep)


def test_validate_pattern() -> None:
    assert validate_pattern([]) == []
    assert validate_pattern(["*", None, ">5"]) == ["*", None, ">5"]
    with pytest.raises(PDError, match="must be a JSON array"):
        validate_pattern("*")


# --- reference matcher, written from the grammar text -------------------------------------------------------


def ref_is_num(x: Any) -> bool:
    return type(x) in (int, float)


def ref_eq(a: Any, b: Any) -> bool:
    if type(a) is bool or type(b) is bool:
        return type(a) is type(b) and a == b
    if ref_is_num(a) and ref_is_num(b):
        return a == b
    if ref_is_num(a) or ref_is_num(b):
        return False
    if type(a) is list and type(b) is list:
        return len(a) == len(b) and all(ref_eq(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is dict and type(b) is dict:
        return set(a) == set(b) and all(ref_eq(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def ref_number(text: str) -> float | int | None:
    # "N a number": decimal digits with optional sign, point and exponent. Python's int()/float() also take
    # spaces, '_', "nan" and "inf", which the grammar does not mean, so filter the characters first.
    if not text or not all(c in "0123456789+-.eE" for c in text):
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return None


def ref_element(p: Any, v: Any) -> bool:
    if p is None or p == "*":
        return True
    if type(p) is str and p.startswith((">", "<")) and ref_is_num(v):
        n = ref_number(p[1:])
        if n is not None:
            return v > n if p[0] == ">" else v < n
    if type(p) is str and ":" in p and "*" in p.split(":"):
        if type(v) is not str:
            return False
        ps, vs = p.split(":"), v.split(":")
        if ps[-1] == "*":
            head = ps[:-1]
            return len(vs) >= len(head) + 1 and all(x in ("*", y) for x, y in zip(head, vs, strict=False))
        return len(ps) == len(vs) and all(x in ("*", y) for x, y in zip(ps, vs, strict=True))
    return ref_eq(p, v)


def reference_match(pattern: list, tup: list) -> bool:
    if len(pattern) > len(tup):
        return False
    return all(ref_element(p, v) for p, v in zip(pattern, tup, strict=False))


# Small alphabets so patterns and tuples collide often.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 8),
    st.sampled_from([0.0, 1.0, 2.5, -0.5, 5.0, 1e3]),
    st.sampled_from(["a", "b", "a:b", "a:b:c", "a::c", "b:a", "*", ">5", "x:*"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=2) | st.dictionaries(
    st.sampled_from(["k", "j"]), inner, max_size=2), max_leaves=4)  # fmt: skip
pattern_elements = st.one_of(
    values,
    st.sampled_from(
        ["*", ">5", "<5", ">-1", "<2.5", ">1e3", ">.5", ">abc", "<", ">", "> 5", ">nan", ">inf", ">\u0663", "<\uff13"]
    ),
    st.sampled_from(["a:*", "a:*:c", "*:b", "*:*", "a:*:*", "*:a:*", "a:b:*", "*"]),
)
tuples = st.lists(values, min_size=1, max_size=4)
patterns = st.lists(pattern_elements, max_size=4)


@settings(max_examples=500)
@given(patterns, tuples)
def test_compiled_agrees_with_reference(pattern: list, tup: list) -> None:
    pattern, tup = validate_pattern(pattern), validate_tuple(tup)
    assert compile_pattern(pattern)(tup) == reference_match(pattern, tup)


@settings(max_examples=500)
@given(patterns, tuples)
def test_a_literal_head_matches_only_tuples_starting_with_it(pattern: list, tup: list) -> None:
    head = literal_head(pattern)
    if head is not None and match(pattern, tup):
        assert tup[0] == head  # so the space may look only at tuples indexed under head


@given(st.integers(-10, 10) | st.floats(-10, 10, allow_nan=False), st.integers(-10, 10))
def test_thresholds(value: float, n: int) -> None:
    assert match([f">{n}"], [value]) == (value > n)
    assert match([f"<{n}"], [value]) == (value < n)
    # Strings never compare numerically, whatever they look like.
    assert match([f">{n}"], [str(value)]) is False


@given(st.booleans(), st.integers(0, 1))
def test_bool_is_not_a_number(b: bool, i: int) -> None:
    assert match([b], [i]) is False
    assert match([i], [b]) is False
    assert match([">-1"], [b]) is False
    assert match([[b]], [[i]]) is False


@given(tuples)
def test_a_tuple_matches_itself_as_a_pattern(tup: list) -> None:
    # Equality is reflexive for every value, and each string operator also matches its own text.
    assert match(tup, tup)
