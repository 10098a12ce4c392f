"""Which agent the caller is, as its environment names it: one rule for every ``pd`` command and the SDK.

Standard library ``os`` and ``portdaddy.errors`` only: the ``pd claim -q`` fast path reads it before anything
heavier is imported.
"""

from __future__ import annotations

import os

from portdaddy.errors import BadInput, PDError, bad_input

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

# Where an agent's id comes from when none is given, first match wins (AGENT_ID as the original).
AGENT_VARS = ("PORT_DADDY_AGENT", "AGENT_ID")


def agent_from_env(env: Mapping[str, str] = os.environ) -> tuple[str, str] | tuple[None, None]:
    """The variable that names the caller's agent and the id it holds: the first of ``AGENT_VARS`` set to
    something; (None, None) if neither is."""
    for var in AGENT_VARS:
        if env.get(var):
            return var, env[var]
    return None, None


def blame_agent_variable(err: PDError, var: str | None, agent_id: str | None) -> PDError:
    """``err``, unless it refuses ``agent_id``, which the variable ``var`` held: then an error that names the
    variable and says how to fix it, which the daemon cannot, not knowing where the id came from. It is the
    variable's when the daemon's own check says the very same of its value."""
    if var is None or not isinstance(err, BadInput):
        return err
    from portdaddy.core.validate import AGENT_ID  # ~37 ms: paid by a request refused as bad input, not by every pd

    try:
        AGENT_ID(var, agent_id)
    except PDError as why:
        if why.message == err.message:
            return bad_input(f"the {var} environment variable is not a valid agent id: {why.message}; set it to "
                             f"one (e.g. export {var}=backend) or unset it")  # fmt: skip
    return err
