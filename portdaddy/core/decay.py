"""The pheromone decay law: pure functions of a value and the time elapsed since it was last written.

The original multiplied every value by 0.95 once a minute and dropped values under 0.01. Stepping a timer
makes values depend on when the timer ran; here a value is stored with the time it was written and decayed
continuously on read, ``value * 0.5 ** (elapsed / half_life)``, with the same half-life (~13.5 minutes), so
reads at any moment agree with the original's per-minute steps exactly at whole minutes.
"""

from __future__ import annotations

import math

from portdaddy.errors import bad_input

# 0.95 per minute expressed as a half-life: 0.95 ** (t / 60) == 0.5 ** (t / DEFAULT_HALF_LIFE_S).
DEFAULT_HALF_LIFE_S = 60 * math.log(0.5) / math.log(0.95)  # ~ 810.7 s
# Below this a trail is noise; callers delete values that decay to 0.0.
FLOOR = 0.01


def decayed(value: float, elapsed_s: float, half_life_s: float = DEFAULT_HALF_LIFE_S) -> float:
    """``value`` after ``elapsed_s`` seconds of decay; 0.0 once it falls below ``FLOOR``.

    A negative (or NaN) elapsed time means the clock went backwards or is unknown: nothing decays, rather
    than a trail growing stronger by itself.
    """
    if not half_life_s > 0:
        raise ValueError(f"half_life_s must be positive, got {half_life_s!r}")
    if not elapsed_s > 0:
        elapsed_s = 0.0
    result = value * 0.5 ** (elapsed_s / half_life_s)
    return result if result >= FLOOR else 0.0


def validate_strength(x: object) -> float:
    """A spray strength: a finite number in [0, 1] (bool refused: ``true`` is not a strength)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise bad_input(f"strength must be a number from 0 to 1, got {type(x).__name__}")
    # Compare before converting: float() of a huge int overflows; NaN fails the comparison.
    if not 0 <= x <= 1:
        raise bad_input(f"strength must be from 0 to 1, got {x!r}")
    return float(x)
