"""The daemon process: single-instance guard, the nursery tree, signals, clean shutdown.

Start order is explicit: the store, then each subsystem (``nursery.start`` returns once it is ready), then
the IPC server (the hot path, and what ``pd`` probes for health), then HTTP. HTTP's imports (hypercorn, quart
and flask under it) are over half of the start time, so they load in a thread while IPC already answers;
``daemon.health`` says ``"http": "starting"`` until HTTP listens. A crash in any of them cancels the tree;
the store is still closed cleanly and the daemon exits non-zero.
"""

from __future__ import annotations

import fcntl
import gc
import importlib
import logging
import os
import secrets
import signal
import sys
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any

import trio

from portdaddy.config import Settings
from portdaddy.core.activity import Activity
from portdaddy.core.agents import Agents
from portdaddy.core.app import App
from portdaddy.core.arbiter import Arbiter
from portdaddy.core.broker import Broker
from portdaddy.core.checkpointer import Checkpointer
from portdaddy.core.harbors import Harbors
from portdaddy.core.inbox import Inbox
from portdaddy.core.locks import Locks
from portdaddy.core.pheromones import Pheromones
from portdaddy.core.registry import Registry
from portdaddy.core.sessions import Sessions
from portdaddy.core.store import Store
from portdaddy.core.tuples import TupleSpace
from portdaddy.core.webhooks import Webhooks
from portdaddy.errors import StoreError
from portdaddy.fleet.supervisor import Fleet
from portdaddy.ipc.server import IpcServer

log = logging.getLogger("portdaddy")

HOME_CHECK_S = 2.0  # how often the daemon looks whether its home is still there

# The subsystems, in start order. Each takes the App and may have a ``run`` task.
# The checkpointer first, so that no commit checkpoints on the reactor; activity next, so that it logs every other
# subsystem's events from the start; the broker before the journal, whose agents publish on `agents` and
# `resurrection`; locks before agents, whose deaths release them; the fleet last, as its runs are citizens of all
# the others.
SUBSYSTEMS = (
    Checkpointer,
    Activity,
    Registry,
    Broker,
    Locks,
    Sessions,
    Agents,
    Inbox,
    Harbors,
    TupleSpace,
    Pheromones,
    Arbiter,
    Webhooks,
    Fleet,
)


async def start_subsystems(app: App, nursery: trio.Nursery, prebuilt: dict[type, Any] | None = None) -> None:
    """Add every subsystem to ``app`` and start its task, in order (``prebuilt``: instances tests configure)."""
    for cls in SUBSYSTEMS:
        subsystem = (prebuilt or {}).get(cls) or cls(app)
        app.add(subsystem)
        if hasattr(subsystem, "run"):
            await nursery.start(subsystem.run)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _read_or_create_token(path: Path) -> str:
    with suppress(FileNotFoundError):
        token = path.read_text().strip()
        if token:
            return token
    token = secrets.token_urlsafe(32)
    _write_private(path, token + "\n")
    return token


def acquire_instance_lock(settings: Settings) -> int | None:
    """An flock held for the daemon's life. None if another daemon (or one starting) holds it."""
    fd = os.open(settings.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def acquire_store_lock(settings: Settings) -> int | None:
    """An flock on ``<store>-owner``, held for the daemon's life, whose file holds its pid. None if another daemon
    holds it: two daemons on one store (``PORT_DADDY_DB`` naming the same file from two homes) would each keep
    its locks, ports and tuples in memory and grant the same lock twice, and write one lock journal over the
    other's. Beside the store, not in the home, for that reason."""
    fd = os.open(f"{settings.db}-owner", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _store_owner(settings: Settings) -> str:
    try:
        return Path(f"{settings.db}-owner").read_text().strip() or "?"
    except OSError:
        return "?"


def _still_ours(fd: int, lock_file: Path) -> bool:
    """Whether ``lock_file`` is still the file ``fd`` holds open: not once the home was deleted, even if it was
    made again (a file held open keeps its inode, so the new one cannot have the same)."""
    held = os.fstat(fd)
    try:
        there = os.stat(lock_file)
    except OSError:
        return False
    return (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino)


async def _leave_when_home_goes(lock_file: Path, waiting: trio.CancelScope) -> None:
    """The home deleted under the daemon (``rm -rf ~/.port-daddy``): no new client can reach it, its store is
    gone, and the next ``pd`` starts another daemon there. This one shuts down (``waiting`` waits for a signal)."""
    try:
        fd = os.open(lock_file, os.O_RDONLY)  # another open file: closing it leaves the instance flock alone
    except OSError:
        return
    try:
        while _still_ours(fd, lock_file):
            await trio.sleep(HOME_CHECK_S)
    finally:
        os.close(fd)
    log.warning("%s was deleted under the daemon; shutting down", lock_file.parent)
    waiting.cancel()


def _remove_runtime_files(settings: Settings) -> None:
    for path in (settings.ipc_sock, settings.http_sock, settings.pid_file, settings.port_file):
        with suppress(FileNotFoundError):
            os.unlink(path)


async def run_daemon(settings: Settings, *, child_umask: int | None = None,
                     task_status: trio.TaskStatus[App] = trio.TASK_STATUS_IGNORED) -> None:  # fmt: skip
    store = Store(settings.db)
    app = App(settings, store)
    app.child_umask = child_umask
    app.http_token = _read_or_create_token(settings.token_file)
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await start_subsystems(app, nursery)
                if settings.ipc_enabled:
                    ipc = IpcServer(app)
                    app.add(ipc)
                    await nursery.start(ipc.serve)
                http = await trio.to_thread.run_sync(importlib.import_module, "portdaddy.http.server")
                await nursery.start(http.serve_http, app)
                app.http_ready = True
                # Everything loaded so far (modules, routes, the op table: ~55,000 objects) lives as long as the
                # daemon. Frozen, the collector stops walking it: each full collection was a ~40 ms pause.
                gc.freeze()
                if app.tcp_port:
                    settings.port_file.write_text(f"{app.tcp_port}\n")
                app.bus.emit("daemon.start", pid=app.pid, version=app.version)
                log.info("port daddy %s ready (pid %d) in %s", app.version, app.pid, settings.home)
                task_status.started(app)
                with trio.CancelScope() as waiting:
                    nursery.start_soon(_leave_when_home_goes, settings.lock_file, waiting)
                    async for signum in signals:
                        log.info("received %s; shutting down", signal.Signals(signum).name)
                        break
                app.bus.emit("daemon.stop", pid=app.pid)
                app.stopping.set()
                # Give the HTTP server its graceful close, then stop everything else.
                with trio.move_on_after(2):
                    await app.http_stopped.wait()
                nursery.cancel_scope.cancel()
    finally:
        store.close()


def _store_refusal(e: BaseException) -> StoreError | None:
    """The StoreError ``e`` is, or the one every exception of its group is (a subsystem's write at start)."""
    if isinstance(e, BaseExceptionGroup):
        rest = e.split(StoreError)[1]
        return None if rest is not None else _store_refusal(e.exceptions[0])
    return e if isinstance(e, StoreError) else None


def main(argv: list[str] | None = None) -> int:
    # Everything the daemon creates is its user's alone, wherever PORT_DADDY_DB and the other overrides put it
    # (a store in /tmp was world-readable under umask 022, -wal and -shm too). Spawned agents get the caller's
    # umask back: the files they write in the user's repository are not the daemon's.
    caller_umask = os.umask(0o077)
    settings = Settings.from_env()
    try:
        settings.ensure_home()
    except OSError as e:
        print(f"error: cannot start the daemon: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.CRITICAL if settings.silent else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    lock_fd = acquire_instance_lock(settings)
    if lock_fd is None:
        print(f"Port Daddy is already running (pid {settings.recorded_pid() or '?'}) in {settings.home}")
        return 0
    try:
        store_fd = acquire_store_lock(settings)
    except OSError:  # a directory the store cannot be written in either: the store's own open says what to do
        store_fd = -1
    if store_fd is None:
        log.error("cannot start the daemon: another daemon (pid %s) uses the store %s; give each home its own "
                  "PORT_DADDY_DB", _store_owner(settings), settings.db)  # fmt: skip
        os.close(lock_fd)
        return 1
    try:
        _remove_runtime_files(settings)  # stale leftovers of a daemon that died without cleaning up
        _write_private(settings.pid_file, f"{os.getpid()}\n")
        trio.run(partial(run_daemon, settings, child_umask=caller_umask))
        return 0
    except Exception as e:
        refused = _store_refusal(e)
        if refused is None:
            log.exception("daemon failed")
        else:  # at start (a lock held since before, a read-only file): said in one line, no traceback
            log.error("cannot start the daemon: %s", refused.message)
        return 1
    finally:
        if _still_ours(lock_fd, settings.lock_file):  # else they are another daemon's, in a home made since
            _remove_runtime_files(settings)
        if store_fd >= 0:
            os.close(store_fd)
        os.close(lock_fd)


if __name__ == "__main__":
    sys.exit(main())
