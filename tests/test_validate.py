"""The name check remembers names it accepted; remembering must never change an answer."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portdaddy.core import validate
from portdaddy.core.clock import now_ms
from portdaddy.core.ops import load_table
from portdaddy.errors import PDError

# Mostly valid names with the characters that make them invalid mixed in: stars, spaces, colons, dots, slashes.
values = st.one_of(st.text(alphabet="ab:.* /-", max_size=6), st.integers(), st.none())


def answer(check: validate.Check, value: object) -> tuple[str, str]:
    try:
        return "ok", check("name", value)
    except PDError as e:
        return "refused", e.message


@given(st.lists(values, max_size=40), st.booleans())
def test_a_remembering_check_answers_as_a_fresh_one(seq: list[object], wildcard: bool) -> None:
    shared = validate.name("lock name", 5, wildcard=wildcard)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(validate, "NAME_MEMO", 4)  # overflow the memory often
        for value in seq:
            assert answer(shared, value) == answer(validate.name("lock name", 5, wildcard=wildcard), value)


def test_accepted_names_come_back_stripped_and_refusals_are_never_remembered() -> None:
    check = validate.name("channel", 20)
    assert check("c", " build:done ") == "build:done"
    assert check("c", " build:done ") == "build:done"
    for _ in range(2):
        with pytest.raises(PDError, match="may not contain"):
            check("c", "build:*")
    with pytest.raises(PDError, match="starts with '-'"):  # pd would take it for an option
        check("c", "-dash")
    assert check("c", "a-dash") == "a-dash"


# The IPC server binds a repeated fire-and-forget frame once and hands the same arguments to every copy
# (spec/ipc.md, "The server"). That is safe only while a flat frame binds to values nobody can change.
FLAT_FIRE_AND_FORGET = {
    "agent.heartbeat": {"agentId": "agent-1", "pid": 42},
    "pheromone.spray": {"table": "services", "id": "bench:api", "key": "load", "strength": 0.5, "harbor": "h"},
    "msg.publish": {"channel": "build:done", "payload": "green", "sender": "ci"},
}
IMMUTABLE = (str, int, float, bool, type(None), tuple, frozenset)


@pytest.mark.parametrize("action", sorted(FLAT_FIRE_AND_FORGET))
def test_flat_fire_and_forget_frames_bind_to_immutable_values(action: str) -> None:
    table = load_table()
    assert {name for name, op in table.items() if op.fire_and_forget} == set(FLAT_FIRE_AND_FORGET), (
        "a fire-and-forget operation was added or removed: list a flat frame for it here"
    )
    op, raw = table[action], FLAT_FIRE_AND_FORGET[action]
    assert {p.name for p in op.params} == set(raw), f"give every parameter of {action} a value here"
    for name, value in op.bind({"action": action, **raw}).items():
        assert isinstance(value, IMMUTABLE), f"{action} binds {name} to a {type(value).__name__}, which can change"


@given(st.text(max_size=8) | st.sampled_from(["²", "--5", "٣", "1²", " 7 ", "-0", "9" * 30, "3s", "٣s", "1e3"]))
def test_numbers_in_text_are_accepted_or_refused_never_crashed_on(text: str) -> None:
    """str.isdigit() takes "²", which int() refuses: the check used to end in a ValueError (an HTTP 500)."""
    for check in (validate.integer(), validate.integer(0, 100), validate.duration()):
        verdict, value = answer(check, text)
        if verdict == "ok":
            assert isinstance(value, int) and text.strip().lstrip("-")[:1] in "0123456789"


def test_integers_and_durations_are_ascii_digits() -> None:
    assert validate.integer()("n", " -12 ") == -12
    assert validate.duration()("d", "90s") == 90_000 and validate.duration()("d", "250") == 250
    with pytest.raises(PDError, match="must be an integer"):  # \x1f is a space to re's \s, not to int()
        validate.integer()("n", "0\x1f")
    for text in ("٣", "²", "--5", "1.5", "٣s"):
        for check in (validate.integer(), validate.duration()):
            with pytest.raises(PDError):
                check("n", text)


@pytest.mark.parametrize("value", [2, -1, 2**64, 0.5, "maybe", [], {}])
def test_a_boolean_is_true_false_or_their_usual_spellings(value: object) -> None:
    """Any integer used to pass as a boolean: {"force": -1} forced a claim."""
    with pytest.raises(PDError, match="must be true or false"):
        validate.boolean("force", value)
    assert [validate.boolean("f", v) for v in (True, 1, "yes", "1", False, 0, "No", "0")] == [True] * 4 + [False] * 4


def test_a_since_is_epoch_ms_when_bare_and_a_look_back_with_a_unit() -> None:
    """A bare number used to be "milliseconds ago" in most places, so 0 meant "from now" rather than "from
    the beginning"; the arbiter counted digits to tell a timestamp from a look-back."""
    since = validate.time_or_ago
    assert [since("since", v) for v in (0, "0", " 1795000000000 ")] == [0, 0, 1_795_000_000_000]
    before, hour_ago, after = now_ms() - 3_600_000, since("since", "1h"), now_ms() - 3_600_000
    assert before <= hour_ago <= after and since("since", "100000000d") == 0  # past the epoch: the epoch
    for bad in (-1, "-5", "yesterday", 1.5, True):
        with pytest.raises(PDError):
            since("since", bad)


@pytest.mark.parametrize(("value", "hint"), [
    ("5", "did you mean 5m?"),  # 5 ms after 1970 is everything: surely five minutes ago was meant
    (86_400_000, "did you mean 1d?"),  # milliseconds ago, as a look-back without its unit
    ("-30", "is before 1970: did you mean 30m?"),  # a look-back written with a minus
    (-7_200_000, "is before 1970: did you mean 2h?"),
    ("1732000000", "looks like epoch seconds; in epoch ms that is 1732000000000"),
    (1_732_000_000_000_000, "looks like epoch microseconds; in epoch ms that is 1732000000000"),
    (99_999_999_999_999, "is after 2100 as epoch ms"),
])  # fmt: skip
def test_a_bare_since_that_is_no_plausible_time_is_refused_with_what_was_meant(value: object, hint: str) -> None:
    with pytest.raises(PDError, match=re.escape(hint)) as refused:
        validate.time_or_ago("since", value)
    assert refused.value.code == "VALIDATION_ERROR"


def test_a_lone_surrogate_is_refused_in_every_text_and_json_parameter() -> None:
    """JSON and YAML can spell one ("\\ud800"). Taken, it failed far from the request: a spawn's run when its agent
    was registered or its child started (a traceback in the daemon log), a stored value in every reply after. The
    op table's own checks refuse it, whichever transport (or the fleet, calling ops itself) brought it."""
    refusal = "holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text; send valid Unicode"
    cases = [  # check, parameter, value, what the refusal starts with
        (validate.text(100), "purpose", "a \ud800 b", f"purpose {refusal}"),
        (validate.text(100, lines=True), "content", "line\nand \udfff", f"content {refusal}"),
        (validate.text(100), "purpose", "\x01\ud800", "purpose contains the control character"),  # the first problem
        (validate.json_value(1000), "payload", {"a": ["ok", "\udc80"]}, f"payload.a[1] {refusal}"),
        (validate.json_value(1000), "payload", {"k\ud83d": 1}, f"a key in payload {refusal}"),
        (validate.json_object(1000), "env", {"X": "\ud800"}, f"env.X {refusal}"),
    ]
    for check, name, value, said in cases:
        with pytest.raises(PDError) as info:
            check(name, value)
        assert info.value.message.startswith(said) and info.value.code == "VALIDATION_ERROR", info.value.message
    # A character beyond the BMP is one code point in a str, never a pair: taken, as are escapes spelled out.
    assert validate.text(100)("p", "😀 \\ud800") == "😀 \\ud800"
    assert validate.json_value(1000)("p", {"😀": ["\\ud800", "é"]}) == {"😀": ["\\ud800", "é"]}
    # The same rule for every text parameter of every op (spawn.start's task among them), over any transport.
    table = load_table()
    with pytest.raises(PDError, match="task holds a lone UTF-16 surrogate"):
        table["spawn.start"].bind({"backend": "custom", "task": "echo \ud800"})
    with pytest.raises(PDError, match=r"env\.X holds a lone UTF-16 surrogate"):
        table["spawn.start"].bind({"backend": "custom", "task": "echo", "env": {"X": "\udfff"}})
    with pytest.raises(PDError, match="payload holds a lone UTF-16 surrogate"):
        table["msg.publish"].bind({"channel": "c", "payload": "\ud800"})
