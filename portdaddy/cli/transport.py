"""How a ``pd`` process reaches the daemon: one blocking IPC connection, auto-starting the daemon if needed.

Errors leave here as one stderr line (or a JSON object with ``--json``) and the exit code of their class:
0 done, 1 refused, 2 bad input, 3 daemon unreachable.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

import click

from portdaddy.cli.output import one_line
from portdaddy.config import Settings
from portdaddy.errors import DaemonUnavailable, PDError, exit_code
from portdaddy.ipc.client import BlockingClient

if TYPE_CHECKING:
    import subprocess


def settings() -> Settings:
    return Settings.from_env()


def fail(err: PDError, *, as_json: bool = False) -> NoReturn:
    """Print ``err`` (as JSON when asked, or when the running command was given ``--json``) and exit. A refusal
    listing several problems (``errors``, e.g. of a fleet file) gets an ``error:`` line for each."""
    ctx = click.get_current_context(silent=True)
    if as_json or (ctx is not None and ctx.params.get("as_json")):
        click.echo(_json({"success": False, "error": err.code, "message": err.message, **err.extra}))
    else:
        for problem in err.extra.get("errors") or [err.message]:
            click.echo(f"error: {one_line(str(problem))}", err=True)
    sys.exit(exit_code(err.code))


def refuse_reply(code: str, message: str, reply: dict[str, Any]) -> NoReturn:
    """Fail with ``code`` for a daemon reply whose answer is a no (a broken chain, a failed run), the reply's
    fields kept as details: under --json an exit 1 is a refusal object like any other."""
    details = {k: v for k, v in reply.items() if k not in ("success", "error", "message")}
    fail(PDError(code, message, **details))


def _json(value: Any) -> str:
    import json

    return json.dumps(value, indent=2, default=str)


class Spinner:
    """A stderr spinner that appears only if a wait passes one second, and only on a terminal."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.start = time.monotonic()
        self.frames = itertools.cycle("|/-\\")
        self.shown = False
        self.tty = sys.stderr.isatty()

    def tick(self) -> None:
        if self.tty and time.monotonic() - self.start > 1.0:
            sys.stderr.write(f"\r{next(self.frames)} {self.label}")
            sys.stderr.flush()
            self.shown = True

    def done(self) -> None:
        if self.shown:
            sys.stderr.write("\r" + " " * (len(self.label) + 2) + "\r")
            sys.stderr.flush()


def wait_healthy(cfg: Settings, proc: subprocess.Popen[bytes] | None, *, http: bool = False) -> dict[str, Any]:
    from portdaddy import launcher  # only when the daemon must be started: it pulls in subprocess

    spinner = Spinner("starting the Port Daddy daemon…")
    try:
        return launcher.wait_healthy(cfg, proc, tick=spinner.tick, http=http)
    finally:
        spinner.done()


def connect(cfg: Settings | None = None, *, agent_id: str | None = None, autostart: bool = True,
            timeout: float = 10.0) -> BlockingClient:  # fmt: skip
    cfg = cfg or settings()
    client = BlockingClient(cfg.ipc_sock, agent_id=agent_id, timeout=timeout)
    try:
        return client.connect()
    except DaemonUnavailable as e:
        if not (autostart and cfg.autostart):
            e.message += "; start it with: pd start (or unset PORT_DADDY_NO_AUTOSTART)"
            raise
    from portdaddy import launcher

    wait_healthy(cfg, launcher.spawn_daemon(cfg))
    return client.connect()


def request(action: str, args: dict[str, Any] | None = None, *, agent_id: str | None = None,
            timeout: float = 10.0) -> Any:  # fmt: skip
    """One request; raises PDError."""
    with connect(agent_id=agent_id or os.environ.get("PORT_DADDY_AGENT"), timeout=timeout) as client:
        return client.request(action, args, timeout=timeout)


def call(action: str, args: dict[str, Any] | None = None, *, as_json: bool = False, agent_id: str | None = None,
         timeout: float = 10.0) -> Any:  # fmt: skip
    """One request; on error print it and exit with its class's code."""
    try:
        return request(action, args, agent_id=agent_id, timeout=timeout)
    except PDError as e:
        fail(e, as_json=as_json)


# A blocking call without a timeout may wait for days; the daemon ends it, not the client.
FOREVER_S = 10**7


@contextmanager
def spinning(label: str) -> Iterator[None]:
    """Show ``Spinner(label)`` from a ticker thread while the body blocks (e.g. in a socket read)."""
    spinner, done = Spinner(label), threading.Event()

    def tick() -> None:
        while not done.wait(0.1):
            spinner.tick()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
        spinner.done()


def blocking_call(action: str, args: dict[str, Any], *, label: str, timeout_ms: int | None,
                  as_json: bool = False) -> Any:  # fmt: skip
    """A call the daemon may hold (``wait``), with a spinner; the client waits a little past the daemon."""
    try:
        with spinning(label):  # cleared before an error is printed, so the error gets a line of its own
            return request(action, args, timeout=timeout_ms / 1000 + 10 if timeout_ms is not None else FOREVER_S)
    except PDError as e:
        fail(e, as_json=as_json)
