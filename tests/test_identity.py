"""Identity grammar, wildcard refusal and pattern semantics (``portdaddy.core.identity``)."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from portdaddy.core import identity
from portdaddy.core.identity import Identity, env_prefix, matches, parse, validate_pattern
from portdaddy.errors import PDError

# --- strategies (small alphabets, so shared prefixes and near-collisions are common) ---

SEG_ALPHABET = "ab.-_"
segments = st.text(alphabet=SEG_ALPHABET, min_size=1, max_size=3).filter(lambda s: s.strip(".") != "")
identities = st.lists(segments, min_size=1, max_size=3).map(":".join)
glob_segments = st.lists(st.text(alphabet=SEG_ALPHABET, max_size=2), min_size=2, max_size=3).map("*".join)
pattern_segments = st.one_of(segments, st.just("*"), glob_segments)
patterns = st.lists(pattern_segments, min_size=1, max_size=3).map(":".join)


def to_regex(pattern: str) -> re.Pattern[str]:
    """An independent translation of the documented pattern rules into a regex (for ``fullmatch``)."""
    segs = pattern.split(":")

    def seg_re(p: str) -> str:
        return "[^:]*".join(re.escape(chunk) for chunk in p.split("*"))

    if segs[-1] == "*":
        head = "".join(seg_re(s) + ":" for s in segs[:-1])
        return re.compile(head + r"[^:]+(?::[^:]+)*")
    return re.compile(":".join(seg_re(s) for s in segs))


def _refused(value: object, *, wildcard: bool = True) -> PDError:
    with pytest.raises(PDError) as info:
        parse(value, wildcard=wildcard)
    err = info.value
    assert err.code == "IDENTITY_INVALID"
    assert "\n" not in err.message and "\r" not in err.message
    assert len(err.message) < 300
    return err


# --- grammar tables ---

VALID = [
    "myapp",
    "myapp:api",
    "myapp:api:main",
    "MyApp:API:Feature-X",
    "a",
    "a.b_c-d:0:9",
    ".hidden",
    "v1.2.3",
    "a" * 64,
    ":".join(["a" * 64] * 3),
    "myapp:*",
    "*",
    "*:api:*",
    "qa-test*",
    "my*app:**",
]


@pytest.mark.parametrize("text", VALID)
def test_valid(text: str) -> None:
    ident = parse(text)
    assert ident.text == text
    assert ident.segments == tuple(text.split(":"))
    assert validate_pattern(text) == text


INVALID = [
    (None, "string"),
    (42, "string"),
    (b"myapp", "string"),
    (["myapp"], "string"),
    ("", "empty"),
    ("../etc", "'/'"),
    ("..", "only dots"),
    ("myapp:..", "only dots"),
    ("myapp:.:api", "only dots"),
    ("...:api", "only dots"),
    ("a b", "' '"),
    (" myapp", "' '"),
    ("myapp\n", "'\\n'"),
    ("myapp\x00", "'\\x00'"),
    ("caf\u00e9", "'\u00e9'"),
    ("\u0661\u0662", "'\u0661'"),  # Arabic-Indic digits: not ASCII
    ("\U0001f600", "'\U0001f600'"),
    ("a" * 65, "the limit is 64"),
    ("ok:" + "b" * 65, "the limit is 64"),
    ("a" * 201, "limit is 200"),
    ("a:b:c:d", "4 segments"),
    ("a::b", "empty segment"),
    ("a:", "empty segment"),
    (":a", "empty segment"),
    (":", "empty segment"),
    ("'; DROP TABLE", '"\'"'),
    ("a/b", "'/'"),
    ("a\\b", "'\\\\'"),
    ("$HOME", "'$'"),
    ("a?b", "'?'"),
    ("a[b]", "'['"),
]


@pytest.mark.parametrize(("value", "fragment"), INVALID)
def test_invalid(value: object, fragment: str) -> None:
    err = _refused(value)
    assert fragment in err.message
    with pytest.raises(PDError):
        validate_pattern(value)


def test_length_limit_is_on_the_whole_string() -> None:
    # 3 x 64 + 2 colons = 194 is fine; 201 characters is refused even before segments are looked at.
    assert len(parse(":".join(["a" * 64] * 3)).text) == 194
    _refused("a" * 200 + ":")
    _refused("a" * 201)


def test_case_is_verbatim() -> None:
    assert parse("MyApp:Api").text == "MyApp:Api"
    assert not matches("myapp:api", "MyApp:Api")
    assert not matches("myapp:*", "MyApp:api")


def test_str_subclass_becomes_plain_str() -> None:
    class S(str):
        pass

    ident = parse(S("myapp:api"))
    assert type(ident.text) is str and type(ident.segments[0]) is str


# --- Identity ---


def test_identity_parts() -> None:
    one, two, three = parse("p"), parse("p:s"), parse("p:s:c")
    assert (one.project, one.stack, one.context) == ("p", None, None)
    assert (two.project, two.stack, two.context) == ("p", "s", None)
    assert (three.project, three.stack, three.context) == ("p", "s", "c")
    assert str(three) == "p:s:c"
    assert three == Identity(("p", "s", "c"))
    assert hash(three) == hash(Identity(("p", "s", "c")))
    with pytest.raises(AttributeError):
        three.segments = ("x",)  # type: ignore[misc]


def test_has_wildcard() -> None:
    assert parse("myapp:*").has_wildcard
    assert parse("qa-test*").has_wildcard
    assert not parse("myapp:api").has_wildcard


# --- wildcard refusal ---


@pytest.mark.parametrize("text", ["myapp:*", "*", "qa-*", "a:b*c:d", "*:api"])
def test_wildcard_refused_for_claims(text: str) -> None:
    err = _refused(text, wildcard=False)
    assert err.message.startswith(f"cannot claim a wildcard identity {text!r}")
    assert "e.g. myapp:api" in err.message
    assert parse(text).text == text  # the same text is a fine pattern


def test_grammar_errors_win_over_wildcard_refusal() -> None:
    assert "empty segment" in _refused("a::*", wildcard=False).message


def test_wildcard_false_accepts_plain() -> None:
    assert parse("myapp:api", wildcard=False).text == "myapp:api"


# --- matching ---

MATCH_TABLE = [
    ("myapp:*", "myapp:api", True),
    ("myapp:*", "myapp:api:main", True),
    ("myapp:*", "myapp", False),
    ("myapp:*", "myapp2:api", False),
    ("*", "x", True),
    ("*", "x:y", True),
    ("*", "x:y:z", True),
    ("*:api:*", "x:api:y", True),
    ("*:api:*", "x:api", False),
    ("*:api:*", "x:web:y", False),
    ("*:api", "x:api", True),
    ("*:api", "x:api:y", False),
    ("myapp:*:main", "myapp:api:main", True),
    ("myapp:*:main", "myapp:api:dev", False),
    ("myapp:*:main", "myapp:main", False),
    ("qa-test*", "qa-test", True),
    ("qa-test*", "qa-test-17", True),
    ("qa-test*", "qa-test:x", False),
    ("qa-test*", "xqa-test", False),
    ("ap*", "api", True),
    ("*pi", "api", True),
    ("a*i", "ai", True),
    ("a*i", "api", True),
    ("a*i", "apx", False),
    ("a*a*a", "aa", False),
    ("a*a*a", "aaa", True),
    ("a**", "a", True),
    ("myapp:**", "myapp:api", True),
    ("myapp:**", "myapp:api:main", False),  # only a lone '*' spans segments
    ("my.app", "myxapp", False),  # '.' is literal
    ("my_app", "my-app", False),
    ("myapp:api", "myapp:api", True),
    ("myapp:api", "myapp:api:main", False),
    ("myapp", "myapp:api", False),
    ("myapp:api", "myapp", False),
]


@pytest.mark.parametrize(("pattern", "ident", "expected"), MATCH_TABLE)
def test_matches_table(pattern: str, ident: str, expected: bool) -> None:
    assert matches(pattern, ident) is expected
    assert bool(to_regex(pattern).fullmatch(ident)) is expected


@given(identities)
def test_literal_pattern_matches_only_itself(ident: str) -> None:
    assert matches(ident, ident)


@given(identities, identities)
def test_literal_pattern_is_equality(a: str, b: str) -> None:
    assert matches(a, b) is (a == b)


@given(patterns, identities)
@example("*", "a")
@example("a:*", "a")
@example("*:*", "a:b:c")
@example("**", "a:b")
@example("a*a", "a")
def test_matches_agrees_with_regex(pattern: str, ident: str) -> None:
    assert matches(pattern, ident) is bool(to_regex(pattern).fullmatch(ident))


@given(st.text(alphabet=SEG_ALPHABET + "*", max_size=6), st.text(alphabet=SEG_ALPHABET, max_size=6))
@example("*a*b*", "aba")  # the middle chunks must be placed leftmost-first
@example("a*a", "a")  # head and tail may not overlap
def test_glob_segment_agrees_with_regex(pat: str, seg: str) -> None:
    expected = bool(re.fullmatch("[^:]*".join(map(re.escape, pat.split("*"))), seg))
    assert identity.glob_segment(pat, seg) is expected


# --- round trips and fuzz ---


@given(st.one_of(identities, patterns))
def test_parse_round_trips(text: str) -> None:
    ident = parse(text)
    assert ident.text == text
    assert parse(ident.text) == ident
    assert ident.has_wildcard is ("*" in text)


_GRAMMAR = re.compile(r"(?:[A-Za-z0-9._*-]{1,64})(?::[A-Za-z0-9._*-]{1,64}){0,2}")


@given(
    st.one_of(
        st.text(max_size=80),
        st.text(alphabet="ab.:*-/ \n\x00\u00e9", max_size=12),
        st.from_regex(_GRAMMAR, fullmatch=True),
    )
)
def test_parse_accepts_exactly_the_grammar(text: str) -> None:
    in_grammar = _GRAMMAR.fullmatch(text) is not None
    ok = len(text) <= 200 and in_grammar and all(seg.strip(".") for seg in text.split(":"))
    if ok:
        assert parse(text).text == text
    else:
        _refused(text)


# --- env_prefix ---


@pytest.mark.parametrize(
    ("ident", "prefix"),
    [
        ("myapp", "MYAPP"),
        ("myapp:api", "MYAPP_API"),
        ("my-app:api.v2:main", "MY_APP_API_V2_MAIN"),
        ("My_App:Web", "MY_APP_WEB"),
        ("3d:api", "_3D_API"),
    ],
)
def test_env_prefix(ident: str, prefix: str) -> None:
    assert env_prefix(ident) == prefix


@given(st.lists(st.text(alphabet="a1.-_", min_size=1, max_size=3).filter(lambda s: s.strip(".") != ""),
                min_size=1, max_size=3).map(":".join))  # fmt: skip
def test_env_prefix_is_an_env_name(ident: str) -> None:
    assert re.fullmatch(r"[A-Z_][A-Z0-9_]*", env_prefix(ident))
