"""Serve the quart-trio app with hypercorn on the Unix socket and on loopback TCP.

Two fixes to hypercorn 0.18 (pinned in pyproject) are installed on its per-connection ``TCPServer``:
- the peer's uid is checked (SO_PEERCRED) on Unix-socket connections, as on the IPC socket;
- ``_close`` runs shielded: otherwise, after a ``Connection: close`` request, the close runs in a task
  quart-trio has just cancelled, and the connection (and its fd) is never closed;
- an error escaping one connection ends that connection, not the server: hypercorn lets some out (a body cut
  short by the peer's close makes it send a 400 while another task is sending: ``BusyResourceError``), and
  trio's serve_listeners would carry it up through the daemon's nursery: one such request stopped the daemon.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import hypercorn.trio.run
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.trio.tcp_server import TCPServer

from portdaddy.config import TCP_PORT_ATTEMPTS
from portdaddy.http.app import create_app
from portdaddy.ipc.peer import peer_credentials

log = logging.getLogger("portdaddy.http")


class _GuardedTCPServer(TCPServer):
    async def run(self) -> None:
        sock = getattr(self.stream, "socket", None)
        if sock is not None and sock.family == socket.AF_UNIX:
            _, uid, _ = peer_credentials(sock)
            if uid != os.getuid():
                log.warning("refused HTTP connection from uid %d", uid)
                await self.stream.aclose()
                return
        try:
            await super().run()
        except Exception as e:  # Cancelled is not an Exception: shutdown still goes through
            log.warning("HTTP connection failed: %s", _first_error(e))
            with trio.CancelScope(shield=True):
                await self.stream.aclose()

    async def _close(self) -> None:
        with trio.CancelScope(shield=True):
            await super()._close()


def _first_error(e: BaseException) -> str:
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return f"{type(e).__name__}: {e}"


hypercorn.trio.run.TCPServer = _GuardedTCPServer  # type: ignore[misc]


def pick_tcp_port(first: int) -> int | None:
    """The first port from ``first`` that we can bind on loopback (9876..9886, as the original)."""
    for port in range(first, first + TCP_PORT_ATTEMPTS):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return None


async def serve_http(core: Any, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    settings = core.settings
    config = Config()
    config.bind = [f"unix:{settings.http_sock}"]
    config.umask = 0o177
    config.accesslog = None
    config.errorlog = log
    config.graceful_timeout = 1.0
    config.keep_alive_max_requests = 100_000
    config.backlog = 512  # as the IPC socket: a burst of agents connecting at once is not refused (EAGAIN)
    if settings.tcp_enabled:
        port = pick_tcp_port(settings.tcp_port)
        if port is None:
            log.warning("no free TCP port in %d..%d; serving on the Unix sockets only",
                        settings.tcp_port, settings.tcp_port + TCP_PORT_ATTEMPTS - 1)  # fmt: skip
        else:
            config.bind.append(f"127.0.0.1:{port}")
            core.tcp_port = port
    try:
        os.unlink(settings.http_sock)
    except FileNotFoundError:
        pass
    try:
        await serve(create_app(core), config, shutdown_trigger=core.stopping.wait, task_status=task_status)
    finally:  # its socket file and daemon.port are removed by the daemon's exit, if they are still its own
        core.http_stopped.set()
