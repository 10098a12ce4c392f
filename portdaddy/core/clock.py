"""Wall-clock milliseconds, the unit every timestamp on the wire uses."""

from __future__ import annotations

import time


def now_ms() -> int:
    return int(time.time() * 1000)
