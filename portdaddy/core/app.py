"""The daemon's assembled parts, handed to every operation through ``ctx.app``."""

from __future__ import annotations

import logging
import os
import time
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import trio

from portdaddy import __version__
from portdaddy.config import Settings
from portdaddy.core.events import EventBus
from portdaddy.core.ops import Op, load_table
from portdaddy.core.store import Store
from portdaddy.errors import StoreError
from portdaddy.source import fingerprint

if TYPE_CHECKING:
    from portdaddy.core.registry import Registry

log = logging.getLogger("portdaddy.app")


class Subsystem(Protocol):
    """A part of the daemon, reachable as ``app.<name>``. If it has a ``run(task_status=...)`` task, the
    daemon starts it with ``nursery.start`` in start order."""

    name: str

    def stats(self) -> dict[str, Any]: ...


class App:
    registry: Registry

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.bus = EventBus(store)
        self.ops: dict[str, Op] = load_table()
        self.version = __version__
        self.code = fingerprint()  # the files as loaded now: pd status tells a daemon older than them
        self.pid = os.getpid()
        self.started_at = time.time()
        self.tcp_port: int | None = None
        self.http_token = ""
        self.child_umask: int | None = None  # the umask spawned agents get; None: the daemon's own
        self.subsystems: list[Subsystem] = []
        # Set when shutdown begins, so long waits (SSE, blocking acquires) can finish promptly.
        self.stopping = trio.Event()
        self.http_stopped = trio.Event()
        self.http_ready = False  # IPC serves first; HTTP follows once its imports have loaded

    def add(self, subsystem: Subsystem) -> None:
        setattr(self, subsystem.name, subsystem)
        self.subsystems.append(subsystem)

    @property
    def uptime_s(self) -> float:
        return time.time() - self.started_at

    def publish(self, channel: str, payload: Any, *, sender: str = "daemon") -> None:
        """Post a channel message from inside the daemon (agents → ``resurrection``, fleet → ``fleet``). Like an
        event, it tells of a change: it is posted once the write making that change has committed (never if it
        rolls back). If the store refuses the message itself, it is logged and dropped: the change it tells of
        is kept, and the operation that made it has succeeded."""
        broker = getattr(self, "broker", None)
        if broker is not None:
            self.store.after_commit(partial(self._post, broker, channel, payload, sender))

    @staticmethod
    def _post(broker: Any, channel: str, payload: Any, sender: str) -> None:
        try:
            broker.publish(channel, payload, sender=sender)
        except StoreError as e:
            log.warning("a message to %s was not posted: %s", channel, e.message)

    def stats(self) -> dict[str, Any]:
        counts: dict[str, Any] = {}
        for sub in self.subsystems:
            counts.update(sub.stats())
        return counts
