"""The ``pd`` executable: ``pd claim ID -q`` without click, everything else through the click CLI.

``PORT=$(pd claim myapp:api -q)`` is what scripts and agents run most, often in loops, and importing click is
most of a ``pd`` process's life (~40 ms of ~100 ms). So that one shape is recognised here from argv and
answered with the blocking IPC client alone. Anything else, any other option, and every case the fast path
does not finish on its own (no daemon yet: auto-start and its spinner live in the click path) goes to
``portdaddy.cli.main``, which prints exactly the same for the same request.
"""

from __future__ import annotations

import os
import sys

from portdaddy.cli.fds import discard

_QUIET = ("-q", "--quiet")


def quick_claim_identity(argv: list[str]) -> str | None:
    """The identity if ``argv`` is ``claim ID -q`` (either order, either spelling) or ``ID -q`` with a colon."""
    if argv[:1] == ["claim"]:
        argv = argv[1:]
    elif not (argv and ":" in argv[0]):
        return None
    if len(argv) != 2:
        return None
    identity = argv[1] if argv[0] in _QUIET else argv[0] if argv[1] in _QUIET else None
    if identity is None or identity.startswith("-") or len(identity) > 1000:
        return None
    return identity


def _quick_claim(identity: str) -> int | None:
    """Claim and print the port; the exit code, or None to let the click path handle it (no daemon)."""
    from portdaddy.caller import agent_from_env, blame_agent_variable
    from portdaddy.durations import SLOW_HINT, reply_timeout_s
    from portdaddy.errors import DaemonUnavailable, NoReply, PDError, exit_code
    from portdaddy.ipc.client import BlockingClient
    from portdaddy.paths import runtime_path
    from portdaddy.text import one_line

    env = os.environ
    sock = runtime_path(env, "PORT_DADDY_IPC", "daemon.ipc")
    var, agent_id = agent_from_env(env)
    try:
        with BlockingClient(sock, agent_id=agent_id, timeout=reply_timeout_s(env)) as c:
            port = c.request("port.claim", {"id": identity})["port"]
    except DaemonUnavailable:
        return None  # claims are idempotent: the click path may safely ask again after starting the daemon
    except PDError as e:
        e = blame_agent_variable(e, var, agent_id)
        _say(f"error: {one_line(e.message)}{SLOW_HINT if isinstance(e, NoReply) else ''}", err=True)
        return exit_code(e.code)
    _say(str(port))
    return 0


def _say(line: str, *, err: bool = False) -> None:
    """Print ``line`` now, not at exit, where Python would report a reader that is gone (``pd claim x -q |
    true``): that changes nothing, the claim is made (spec/decisions.md, "Exit codes and errors")."""
    out = sys.stderr if err else sys.stdout
    try:
        print(line, file=out, flush=True)
    except BrokenPipeError:
        discard(out.fileno())


def main() -> None:
    identity = quick_claim_identity(sys.argv[1:])
    if identity is not None:
        code = _quick_claim(identity)
        if code is not None:
            sys.exit(code)
    from portdaddy.cli.main import main as click_main

    click_main()
