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
    why = _refusal(agent_id)
    return _blamed(var, why) if why is not None and why.message == err.message else err


def check_agent_id(agent_id: str | None, var: str | None = None) -> None:
    """Raise what the daemon would of ``agent_id`` (BadInput), named as the variable ``var``'s if it came from
    one. For a client that holds a connection: every frame carries the id, and the daemon refuses every frame
    with a bad one, saying so to nobody for a fire-and-forget send."""
    if agent_id is not None and (why := _refusal(agent_id)) is not None:
        raise why if var is None else _blamed(var, why)


def _refusal(agent_id: str | None) -> PDError | None:
    """The daemon's own check of an agent id (portdaddy/core/validate.py): its refusal, or None."""
    from portdaddy.core.validate import AGENT_ID  # ~37 ms: pd pays it for a refused request only, the SDK at connect

    try:
        AGENT_ID("agentId", agent_id)
    except PDError as why:
        return why
    return None


def _blamed(var: str, why: PDError) -> PDError:
    return bad_input(f"the {var} environment variable is not a valid agent id: {why.message}; set it to one (e.g. "
                     f"export {var}=backend) or unset it")  # fmt: skip
