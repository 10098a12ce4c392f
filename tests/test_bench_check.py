"""``make bench-quick``'s check: which figures pass their limits (bench/thresholds.json)."""

from __future__ import annotations

from bench.__main__ import over_limits

FLOOR = "floor: unix ping-pong 16B (pinned)"


def _data(p50: float, p90: float) -> dict:
    return {FLOOR: {"unit": "µs", "p50": 4.0, "p90": 5.0, "floor": None},
            "claim": {"unit": "µs", "p50": p50, "p90": p90, "floor": FLOOR}}  # fmt: skip


def test_a_limit_is_on_the_median_unless_it_names_the_p90() -> None:
    """A daemon that gave its CPU to a busy process lost a time slice now and then: a p90 of ms, a median
    that the machine's speed moves as much (a faster machine read 11.9x its floor with no regression)."""
    assert over_limits(_data(p50=48, p90=52), {"claim": 10}) == {
        "claim": f"claim: p50 48.0 µs is 12.0x {FLOOR} (4.0 µs), limit 10x"
    }
    assert over_limits(_data(p50=48, p90=52), {"claim": {"p90": 100}}) == {}
    assert set(over_limits(_data(p50=48, p90=3900), {"claim": {"p90": 100}})) == {"claim"}
