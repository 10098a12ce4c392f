"""Where the daemon's runtime files are, from the environment alone.

Standard library ``os`` only: the ``pd claim -q`` fast path finds the socket with it before anything heavier
(``config.Settings`` with pathlib and dataclasses) is imported, and ``Settings.from_env`` uses the same rule.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping


def home_dir(env: Mapping[str, str]) -> str:
    """``PORT_DADDY_HOME``, else ``~/.port-daddy``."""
    return os.path.expanduser(env.get("PORT_DADDY_HOME") or os.path.join("~", ".port-daddy"))


def runtime_path(env: Mapping[str, str], var: str, name: str) -> str:
    """``$var`` if set, else ``name`` in the home directory."""
    return os.path.expanduser(env[var]) if env.get(var) else os.path.join(home_dir(env), name)
