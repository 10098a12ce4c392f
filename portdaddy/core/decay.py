"""Pheromone decay law. INTERIM stand-in written on branch issue-6 because main's module had not landed yet;
main's portdaddy/core/decay.py replaces it on merge."""

from __future__ import annotations

import math
from typing import Any

# The original multiplied by 0.95 once a minute: half-life = 60 s x ln 0.5 / ln 0.95 ≈ 13.5 min.
DEFAULT_HALF_LIFE_S = 60 * math.log(0.5) / math.log(0.95)
FLOOR = 0.01


def decayed(value: float, elapsed_s: float, half_life_s: float = DEFAULT_HALF_LIFE_S) -> float:
    return value * 0.5 ** (max(0.0, elapsed_s) / half_life_s)


def reinforce(current: float, strength: float) -> float:
    return min(1.0, current + strength)


def validate_strength(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError("strength must be a number from 0 to 1")
    return float(value)
