"""Daemon-level operations: health, version, status."""

from __future__ import annotations

from typing import Any

from portdaddy.core.ops import Ctx, Op
from portdaddy.text import elapsed


def health(ctx: Ctx) -> dict[str, Any]:
    app = ctx.app
    return {
        "status": "ok",
        "version": app.version,
        "uptime_seconds": int(app.uptime_s),
        "active_ports": len(app.registry),
        "pid": app.pid,
        "http": "ready" if app.http_ready else "starting",
    }


def version(ctx: Ctx) -> dict[str, Any]:
    app = ctx.app
    return {
        "version": app.version,
        "service": "port-daddy",
        "api": "semantic",
        "code": app.code,
        "pid": app.pid,
        "startedAt": int(app.started_at * 1000),
        "uptime": int(app.uptime_s),
    }


def status(ctx: Ctx) -> dict[str, Any]:
    app = ctx.app
    s = app.settings
    return {
        "status": "ok",
        "version": app.version,
        "code": app.code,
        "pid": app.pid,
        "uptimeSeconds": int(app.uptime_s),
        "uptimeHuman": elapsed(app.uptime_s),
        "home": str(s.home),
        "sockets": {
            "http": str(s.http_sock),
            "ipc": str(s.ipc_sock) if s.ipc_enabled else None,
            "tcp": f"127.0.0.1:{app.tcp_port}" if app.tcp_port else None,
        },
        "db": s.db.as_posix(),
        "store": app.store.health(),
        "counts": app.stats(),
    }


OPS = (
    Op("daemon.health", health, summary="liveness probe"),
    Op("daemon.version", version, summary="daemon version"),
    Op("daemon.status", status, summary="pid, uptime, sockets, db path, whether the store takes writes, counts"),
)
