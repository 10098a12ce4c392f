"""Starting the daemon from a client (the CLI's auto-start, ``pd start``, the SDK). Standard library only."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from portdaddy.config import Settings, without_caller
from portdaddy.errors import DaemonUnavailable
from portdaddy.ipc.client import BlockingClient
from portdaddy.procfs import seconds_running

START_TIMEOUT_S = 15.0


def spawn_daemon(cfg: Settings) -> subprocess.Popen[bytes]:
    """Start ``python -m portdaddy.daemon`` in its own session (it outlives this terminal), logging to
    daemon.log. If another daemon wins the race for the home, this one exits 0 at once.

    The daemon serves every caller, and its fleet agents inherit its environment: it gets this shell's less who
    this caller is (``PORT_DADDY_AGENT``, ``PORT_DADDY_SESSION``, ``PD_*``), or each agent would act as them."""
    try:
        cfg.ensure_home()
        # 0600 from the start: created by this client, whose umask may be 022 (the daemon sets its own to 077).
        log = os.open(cfg.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError as e:
        raise DaemonUnavailable(f"cannot start the daemon: {e}") from None
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "portdaddy.daemon"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
            env=without_caller(os.environ),
        )
    finally:
        os.close(log)


def probe(cfg: Settings, action: str = "daemon.health", timeout: float = 3.0) -> Any:
    """The daemon's answer to ``action``, or None if no daemon answers. A daemon that answers with a refusal
    (over its connection cap) raises it: it is running, and starting another would not help."""
    try:
        with BlockingClient(cfg.ipc_sock, timeout=timeout) as c:
            return c.request(action)
    except DaemonUnavailable:
        return None


def wait_healthy(
    cfg: Settings,
    proc: subprocess.Popen[bytes] | None = None,
    *,
    timeout: float = START_TIMEOUT_S,
    tick: Callable[[], None] | None = None,
    http: bool = False,
) -> dict[str, Any]:
    """The daemon's health once its IPC socket answers; with ``http``, once its HTTP server listens too (it
    starts a few hundred ms after IPC: what ``pd start`` and anyone about to speak HTTP wait for)."""
    deadline = time.monotonic() + timeout
    while True:
        health = probe(cfg, timeout=2.0)
        if health is not None and not (http and health.get("http") == "starting"):
            return health
        # Exit status 0 means "another daemon is already running": keep waiting for that one, while it may still
        # be starting (two clients auto-started at once); one that has run longer than a start may take and does
        # not answer will not by waiting (its socket deleted, or stopped).
        if proc is not None and proc.poll() not in (None, 0):
            raise DaemonUnavailable(f"the daemon exited with status {proc.returncode}{_why_not_started(cfg)}; "
                                    f"see {cfg.log}")  # fmt: skip
        if proc is not None and proc.returncode == 0 and (stuck := _holder_past_start(cfg, timeout)) is not None:
            raise DaemonUnavailable(f"process {stuck}, which holds {cfg.home}, has run over {timeout:g}s and does "
                                    f"not answer; see {cfg.log}")  # fmt: skip
        if time.monotonic() > deadline:
            raise DaemonUnavailable(f"the daemon did not become healthy in {timeout:g}s; see {cfg.log}")
        if tick is not None:
            tick()
        time.sleep(0.01 if health is None else 0.03)  # a daemon loading HTTP's imports has no GIL to spare


def _holder_past_start(cfg: Settings, timeout: float) -> int | None:
    """The pid of the daemon holding the home (the pid file's) if it has run longer than ``timeout``."""
    pid = cfg.recorded_pid()
    running = None if pid is None else seconds_running(pid)
    return pid if running is not None and running > timeout else None


def _why_not_started(cfg: Settings) -> str:
    """The reason a daemon that refused to start gave as its last log line (``cannot start the daemon: …``)."""
    try:
        with open(cfg.log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            last = f.read().decode(errors="replace").rstrip().rsplit("\n", 1)[-1]
    except OSError:
        return ""
    _, found, why = last.partition("cannot start the daemon: ")
    return f": {why}" if found else ""


def ensure_daemon(cfg: Settings) -> dict[str, Any]:
    """Health of the running daemon, starting one first if none answers (and auto-start is allowed)."""
    health = probe(cfg)
    if health is not None:
        return health
    if not cfg.autostart:
        raise DaemonUnavailable(f"no daemon at {cfg.ipc_sock} and PORT_DADDY_NO_AUTOSTART is set; run: pd start")
    return wait_healthy(cfg, spawn_daemon(cfg))
