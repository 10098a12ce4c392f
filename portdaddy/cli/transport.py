"""How a ``pd`` process reaches the daemon: one blocking IPC connection, auto-starting the daemon if needed.

Errors leave here as one stderr line (or a JSON object with ``--json``) and the exit code of their class:
0 done, 1 refused, 2 bad input, 3 daemon unreachable.

How long pd waits for a reply is what the operation itself may take (a lock's ``--timeout``, a run's grace
period; nothing for most) plus ``PORT_DADDY_TIMEOUT`` (10 s by default) for the daemon to answer. Past that
the request is withdrawn and pd exits 3 (``NO_REPLY``): the daemon is stopped, stuck, or too slow.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, NoReturn

import click

from portdaddy.caller import agent_from_env, blame_agent_variable
from portdaddy.cli.output import ReaderGone, echo_exact
from portdaddy.config import Settings
from portdaddy.durations import SLOW_HINT, reply_timeout_s
from portdaddy.errors import DaemonUnavailable, NoReply, PDError, exit_code
from portdaddy.ipc.client import BlockingClient
from portdaddy.text import one_line

if TYPE_CHECKING:
    import subprocess


def settings() -> Settings:
    return Settings.from_env()


def fail(err: PDError, *, as_json: bool = False) -> NoReturn:
    """Print ``err`` (as JSON when asked, or when the running command was given ``--json``) and exit. A refusal
    listing several problems (``errors``, e.g. of a fleet file) gets an ``error:`` line for each."""
    if isinstance(err, NoReply):
        err.message += SLOW_HINT
    err = blame_agent_variable(err, *agent_from_env())
    ctx = click.get_current_context(silent=True)
    with suppress(ReaderGone):  # a refusal nobody reads is a refusal still: its exit code says so
        if as_json or (ctx is not None and ctx.params.get("as_json")):
            echo_exact(_json({"success": False, "error": err.code, "message": err.message, **err.extra}))
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
            echo_exact(f"\r{next(self.frames)} {self.label}", err=True, nl=False)
            self.shown = True

    def done(self) -> None:
        if self.shown:
            echo_exact("\r" + " " * (len(self.label) + 2) + "\r", err=True, nl=False)


def wait_healthy(cfg: Settings, proc: subprocess.Popen[bytes] | None, *, http: bool = False) -> dict[str, Any]:
    from portdaddy import launcher  # only when the daemon must be started: it pulls in subprocess

    spinner = Spinner("starting Port Daddy…")
    try:
        return launcher.wait_healthy(cfg, proc, tick=spinner.tick, http=http)
    except DaemonUnavailable as e:
        if proc is None or proc.poll() != 0:
            raise
        # Ours stepped aside (exit 0) for a daemon that holds the home, which never answered: say what is wrong
        # with that one, not only that "the daemon did not become healthy".
        from portdaddy.cli.daemon_cmds import diagnose_down

        why, fix, _ = diagnose_down(cfg)
        raise DaemonUnavailable(f"a daemon holds {cfg.home} but does not answer: {why}; fix: {fix}") from e
    finally:
        spinner.done()


def connect(cfg: Settings | None = None, *, agent_id: str | None = None, autostart: bool = True,
            timeout: float | None = None) -> BlockingClient:  # fmt: skip
    """A connection whose requests wait ``timeout`` seconds for their reply (default PORT_DADDY_TIMEOUT), acting
    as ``agent_id``, else as the agent the environment names: a command that opens its own connection (pd sub,
    pd watch, pd with-lock) acts as the same agent as every other."""
    cfg = cfg or settings()
    wait_s = reply_timeout_s() if timeout is None else timeout
    client = BlockingClient(cfg.ipc_sock, agent_id=agent_id or agent_from_env()[1], timeout=wait_s)
    try:
        return client.connect()
    except DaemonUnavailable as e:
        if not (autostart and cfg.autostart):
            e.message += "; start it with: pd start (or unset PORT_DADDY_NO_AUTOSTART)"
            raise
    from portdaddy import launcher

    wait_healthy(cfg, launcher.spawn_daemon(cfg))
    return client.connect()


# A blocking call without a timeout may wait for days; the daemon ends it, not the client.
FOREVER_S = 10**7
# What stopping agents may take: SIGTERM, their grace period (PORT_DADDY_FLEET_GRACE), SIGKILL, for a fleet's
# every run at once.
STOPPING_S = 300.0


def reply_wait_s(takes: float | None) -> float:
    """How long to wait for the reply to an operation that itself may take ``takes`` seconds (None: no limit)."""
    return FOREVER_S if takes is None else takes + reply_timeout_s()


def request(action: str, args: dict[str, Any] | None = None, *, agent_id: str | None = None,
            takes: float | None = 0.0) -> Any:  # fmt: skip
    """One request for an operation that may take ``takes`` seconds (None: no limit); raises PDError. One that may
    take any time is waited for asleep, not polled for (``patient``)."""
    wait_s = reply_wait_s(takes)
    with connect(agent_id=agent_id, timeout=wait_s) as client:
        return client.request(action, args, timeout=wait_s, patient=takes != 0)


def call(action: str, args: dict[str, Any] | None = None, *, as_json: bool = False, agent_id: str | None = None,
         takes: float | None = 0.0) -> Any:  # fmt: skip
    """One request (see ``request``); on error print it and exit with its class's code."""
    try:
        return request(action, args, agent_id=agent_id, takes=takes)
    except PDError as e:
        fail(e, as_json=as_json)


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
    """A call the daemon may hold (``wait``) up to ``timeout_ms`` (None: no limit), with a spinner."""
    try:
        with spinning(label):  # cleared before an error is printed, so the error gets a line of its own
            return request(action, args, takes=None if timeout_ms is None else timeout_ms / 1000)
    except PDError as e:
        fail(e, as_json=as_json)
