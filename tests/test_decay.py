"""The pheromone decay law, and how a caller drives it from trio's clock."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from portdaddy.core.decay import DEFAULT_HALF_LIFE_S, FLOOR, decayed, validate_strength
from portdaddy.errors import PDError

unit = st.floats(0.0, 1.0)
elapsed = st.floats(0.0, 1e6)


def test_half_life_matches_original_rate() -> None:
    assert abs(DEFAULT_HALF_LIFE_S - 810.8) < 0.01  # 13.5 minutes
    # 0.95 per minute, as the original's timer stepped it.
    assert decayed(1.0, 60) == pytest.approx(0.95)
    assert decayed(1.0, 600) == pytest.approx(0.95**10)


def test_one_half_life_halves() -> None:
    assert decayed(0.8, DEFAULT_HALF_LIFE_S) == pytest.approx(0.4)
    assert decayed(0.8, 10, half_life_s=10) == pytest.approx(0.4)
    assert decayed(0.8, 20, half_life_s=10) == pytest.approx(0.2)


def test_no_time_no_decay() -> None:
    assert decayed(0.5, 0) == 0.5


@pytest.mark.parametrize("bad_elapsed", [-1.0, -1e9, math.nan])
def test_clock_going_backwards_decays_nothing(bad_elapsed: float) -> None:
    assert decayed(0.5, bad_elapsed) == 0.5


def test_floor() -> None:
    assert decayed(FLOOR, 0) == FLOOR
    assert decayed(FLOOR * 0.999, 0) == 0.0
    assert decayed(1.0, math.inf) == 0.0
    # The original: a value of 1.0 is gone after 90 one-minute steps, still there after 89.
    assert decayed(1.0, 89 * 60) > 0.0
    assert decayed(1.0, 90 * 60) == 0.0


def test_half_life_must_be_positive() -> None:
    with pytest.raises(ValueError):
        decayed(1.0, 1.0, half_life_s=0)


@given(unit, elapsed, elapsed)
def test_monotonic_in_elapsed(value: float, t1: float, t2: float) -> None:
    lo, hi = sorted((t1, t2))
    assert decayed(value, hi) <= decayed(value, lo) <= value


@given(unit, elapsed, elapsed)
def test_decay_composes(value: float, t1: float, t2: float) -> None:
    # Decaying in two reads equals decaying once (up to the floor), so read frequency does not matter.
    once = decayed(value, t1 + t2)
    twice = decayed(decayed(value, t1), t2)
    assert twice == pytest.approx(once, abs=FLOOR)


@pytest.mark.parametrize("good", [0, 1, 0.0, 0.5, 1.0])
def test_validate_strength_accepts(good: object) -> None:
    assert validate_strength(good) == float(good)  # type: ignore[arg-type]
    assert type(validate_strength(good)) is float


@pytest.mark.parametrize("bad", [True, False, None, "0.5", -0.1, 1.01, math.nan, math.inf, 10**400, [0.5]])
def test_validate_strength_refuses(bad: object) -> None:
    with pytest.raises(PDError) as info:
        validate_strength(bad)
    assert info.value.code == "VALIDATION_ERROR"


async def test_decay_under_mock_clock(autojump_clock: trio.testing.MockClock) -> None:
    # How the daemon uses the law: store (value, trio.current_time()) at spray time, decay on read with the
    # elapsed clock time. Under the autojump clock, sleeping a half-life takes no real time.
    sprayed_at = trio.current_time()
    value = 0.8
    await trio.sleep(DEFAULT_HALF_LIFE_S)
    now = trio.current_time()
    assert now - sprayed_at == pytest.approx(DEFAULT_HALF_LIFE_S)
    assert decayed(value, now - sprayed_at) == pytest.approx(0.4)

    # A second spray replaces the faded value (spec/swarm.md, ref §17.2), and the clock restarts from it.
    value, sprayed_at = 0.5, now
    await trio.sleep(2 * DEFAULT_HALF_LIFE_S)
    assert decayed(value, trio.current_time() - sprayed_at) == pytest.approx(0.125)
