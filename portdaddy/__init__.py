"""Port Daddy: a per-machine coordination daemon for AI coding agents.

``import portdaddy`` stays light (the CLI imports this package); the trio SDK is loaded on first use of
``portdaddy.connect``.
"""

from __future__ import annotations

# Not imported at run time: ``pd`` never loads typing (see portdaddy/errors.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "connect"]


def __getattr__(name: str) -> Any:
    if name == "connect":
        from portdaddy.sdk import connect

        return connect
    raise AttributeError(name)
