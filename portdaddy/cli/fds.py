"""What pd does with its own output descriptors when their reader goes away.

Standard library ``os`` only: the ``pd claim -q`` fast path (entry.py) uses it before click is imported, and
output.py, below every command, uses it too.
"""

from __future__ import annotations

import os


def discard(fd: int) -> None:
    """Send what pd still holds for ``fd``, and all it prints there from now on, nowhere: its reader went away."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, fd)
    os.close(null)
