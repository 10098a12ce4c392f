"""The service registry: stable, hash-seeded ports for semantic identities.

A claim's first candidate port is ``start + sha256(identity) mod size``; we probe upward (wrapping) past
ports held by another identity, reserved ports and ports the OS shows in use. The assignment is persisted, so
a re-claim returns it, and the same identity lands on the same port on every machine unless that port is
genuinely taken (DESIGN §3). The live set is held in memory (a segment trie for ``find`` and a port map) and
rebuilt from the store at boot; every change is committed before the reply.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from portdaddy.config import RESERVED_PORTS
from portdaddy.core import validate as v
from portdaddy.core.clock import now_ms
from portdaddy.core.ops import Ctx, Op, Param
from portdaddy.core.trie import SegmentTrie
from portdaddy.core.writebehind import WriteBehind
from portdaddy.errors import NotFound, PDError, bad_input

_ENV_NAME = re.compile(r"^[a-z0-9_-]{1,50}$")
# Printable ASCII only: a URL is shown in terminals (pd url, pd find) and exported by pd env.
_URL = re.compile(r"^(https?|wss?)://[!-~]+$")


@dataclass(slots=True)
class Service:
    id: str
    port: int
    pid: int | None
    cmd: str | None
    cwd: str | None
    status: str
    agent_id: str | None
    created_at: int
    last_seen: int
    expires_at: int | None
    metadata: dict[str, Any] | None
    urls: dict[str, str] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "port": self.port,
            "pid": self.pid,
            "status": self.status,
            "cmd": self.cmd,
            "cwd": self.cwd,
            "agentId": self.agent_id,
            "createdAt": self.created_at,
            "lastSeen": self.last_seen,
            "expiresAt": self.expires_at,
            "urls": dict(self.urls),
            "metadata": self.metadata,
        }


def seed_port(identity: str, lo: int, hi: int) -> int:
    """The first candidate: the same on every machine, spread evenly over the range."""
    digest = hashlib.sha256(identity.encode()).digest()
    return lo + int.from_bytes(digest[:8], "big") % (hi - lo + 1)


def os_port_free(port: int) -> bool:
    """A bind test on both loopbacks: fails if anything listens on the port (loopback or wildcard).

    ``::1`` too: a dev server told to listen on ``localhost`` often binds only ``::1`` (Node 17+, Vite), and
    ``http://localhost:<port>`` would reach it rather than the service we hand the port to.
    """
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((host, port))
        except OSError as e:  # no IPv6 here (EAFNOSUPPORT, EADDRNOTAVAIL) says nothing about the port
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
    return True


class Registry:
    name = "registry"

    def __init__(self, app: Any) -> None:
        self.app = app
        self.store = app.store
        self.bus = app.bus
        self._by_id: SegmentTrie[Service] = SegmentTrie()
        self._by_port: dict[int, str] = {}
        self._expiry_changed = trio.Event()
        # A re-claim that changes nothing but last_seen (and the claimant's pid) is answered from memory; they
        # are written behind.
        self._seen: WriteBehind[str] = WriteBehind(self.store, self._write_seen)
        self._load()

    def _load(self) -> None:
        rows = self.store.all(
            "SELECT id, port, pid, cmd, cwd, status, agent_id, created_at, last_seen, expires_at, metadata "
            "FROM services"
        )
        for row in rows:
            svc = Service(*row[:10], metadata=json.loads(row[10]) if row[10] else None)
            self._index(svc)
        for service_id, env, url in self.store.all("SELECT service_id, env, url FROM endpoints"):
            svc = self._by_id.get(service_id)
            if svc is not None:
                svc.urls[env] = url

    def _index(self, svc: Service) -> None:
        self._by_id.insert(svc.id, svc)
        self._by_port[svc.port] = svc.id

    def _unindex(self, svc: Service) -> None:
        self._by_id.remove(svc.id)
        self._by_port.pop(svc.port, None)

    def __len__(self) -> int:
        return len(self._by_id)

    def stats(self) -> dict[str, Any]:
        return {"services": len(self._by_id)}

    # -- port choice ---------------------------------------------------------------------------------------

    def _reserved(self) -> frozenset[int]:
        own = {self.app.tcp_port} if self.app.tcp_port else set()
        return RESERVED_PORTS | own

    def _usable(self, port: int, reserved: frozenset[int]) -> bool:
        return port not in self._by_port and port not in reserved and os_port_free(port)

    def _choose(self, identity: str, lo: int, hi: int) -> int:
        reserved = self._reserved()
        size = hi - lo + 1
        first = seed_port(identity, lo, hi) - lo
        for step in range(size):
            port = lo + (first + step) % size
            if self._usable(port, reserved):
                return port
        raise PDError("PORT_EXHAUSTED", f"no free port in range {lo}-{hi}; release some with pd release")

    # -- operations ----------------------------------------------------------------------------------------

    def _check_quota(self, agent_id: str | None) -> None:
        """A registered agent claims at most its ``maxServices`` services; re-claims do not count."""
        agents = getattr(self.app, "agents", None)
        if agents is not None:
            agents.check_quota(
                agent_id, "services", lambda: sum(s.agent_id == agent_id for _, s in self._by_id.items())
            )

    def claim(
        self,
        identity: str,
        *,
        port: int | None = None,
        port_range: tuple[int, int] | None = None,
        expires_ms: int | None = None,
        pid: int | None = None,
        cmd: str | None = None,
        cwd: str | None = None,
        metadata: dict[str, Any] | None = None,
        agent_id: str | None = None,
        peer_pid: int | None = None,
    ) -> dict[str, Any]:
        """``pid`` is the caller's word and is committed before the reply; ``peer_pid`` (the process at the other
        end of the socket) stands in when no ``pid`` is given, and on a re-claim it is bookkeeping like
        ``last_seen``: written behind."""
        now = now_ms()
        expires_at = now + expires_ms if expires_ms else None
        svc = self._by_id.get(identity)
        if svc is not None:
            if (
                (pid and pid != svc.pid)
                or (cmd and cmd != svc.cmd)
                or (cwd and cwd != svc.cwd)
                or expires_at
                or (metadata is not None and metadata != svc.metadata)
            ):
                # Stored first, then kept: a write the store refuses leaves the service as it was.
                changed = {"pid": pid or peer_pid or svc.pid,
                           "cmd": cmd or svc.cmd, "cwd": cwd or svc.cwd, "expires_at": expires_at or svc.expires_at,
                           "metadata": metadata if metadata is not None else svc.metadata}  # fmt: skip
                with self.store.write() as db:
                    db.execute(
                        "UPDATE services SET last_seen=?, pid=?, cmd=?, cwd=?, expires_at=?, metadata=? WHERE id=?",
                        (now, changed["pid"], changed["cmd"], changed["cwd"], changed["expires_at"],
                         v.optional_json(changed["metadata"]), identity),
                    )  # fmt: skip
                for attr, value in changed.items():
                    setattr(svc, attr, value)
                svc.last_seen = now
                if expires_at:
                    self._expiry_changed.set()
            else:
                svc.last_seen = now
                if not pid and peer_pid:
                    svc.pid = peer_pid
                self._seen.mark(identity)
            message = "reusing existing service"
            if port is not None and port != svc.port:  # said, not silent: the caller asked for another port
                message = f"preferred port {port} ignored: {identity} keeps port {svc.port}; pd release it to move"
            return {"success": True, "id": identity, "port": svc.port, "existing": True, "message": message}

        self._check_quota(agent_id)
        message = "assigned new port"
        chosen = None
        if port is not None:
            if port in self._reserved():
                raise bad_input(f"port {port} is reserved ({sorted(self._reserved())}); pick another")
            if self._usable(port, frozenset()):
                chosen, message = port, "assigned preferred port"
            else:
                holder = self._by_port.get(port)
                message = f"preferred port {port} is taken by {holder or 'another process'}; assigned a free one"
        if chosen is None:
            lo, hi = port_range or self.app.settings.port_range
            chosen = self._choose(identity, lo, hi)

        pid = pid or peer_pid
        svc = Service(identity, chosen, pid, cmd, cwd, "assigned", agent_id, now, now, expires_at, metadata)
        svc.urls["local"] = f"http://localhost:{chosen}"
        with self.store.write() as db:
            db.execute(
                "INSERT INTO services (id, port, pid, cmd, cwd, status, agent_id, created_at, last_seen, "
                "expires_at, metadata) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    identity,
                    chosen,
                    pid,
                    cmd,
                    cwd,
                    "assigned",
                    agent_id,
                    now,
                    now,
                    expires_at,
                    v.optional_json(metadata),
                ),
            )
            db.execute(
                "INSERT INTO endpoints (service_id, env, url, created_at, updated_at) VALUES (?,?,?,?,?)",
                (identity, "local", svc.urls["local"], now, now),
            )
        self._index(svc)
        if expires_at:
            self._expiry_changed.set()
        self.bus.emit("service.claim", serviceId=identity, port=chosen, agentId=agent_id, pid=pid)
        return {"success": True, "id": identity, "port": chosen, "existing": False, "message": message}

    def _delete(self, services: list[Service], reason: str) -> None:
        if not services:
            return
        with self.store.write() as db:
            db.executemany("DELETE FROM services WHERE id=?", [(s.id,) for s in services])
        for svc in services:
            self._unindex(svc)
        self.bus.emit(
            f"service.{reason}", serviceIds=[s.id for s in services], releasedPorts=[s.port for s in services]
        )

    def release(self, pattern: str | None = None, *, expired: bool = False) -> dict[str, Any]:
        if expired:
            now = now_ms()
            gone = [s for _, s in self._by_id.items() if s.expires_at is not None and s.expires_at <= now]
            self._delete(gone, "release")
            return {
                "success": True, "released": len(gone), "releasedPorts": [s.port for s in gone],
                "message": f"released {len(gone)} expired service(s)",
            }  # fmt: skip
        if pattern is None:
            raise bad_input("give an identity, a pattern like 'myapp:*', or expired=true")
        gone = [s for _, s in self._by_id.find(pattern)]
        self._delete(gone, "release")
        if "*" not in pattern:
            msg = f"released {pattern} (port {gone[0].port})" if gone else "service not found"
        else:
            msg = f"released {len(gone)} service(s) matching {pattern}"
        result: dict[str, Any] = {"success": True, "released": len(gone), "message": msg}
        result["releasedPorts"] = [s.port for s in gone]
        if gone and "*" not in pattern:
            result["port"] = gone[0].port
        return result

    def find(
        self,
        pattern: str = "*",
        *,
        status: str | None = None,
        port: int | None = None,
        expired: bool | None = None,
        limit: int = 1000,
    ) -> list[Service]:
        now = now_ms()
        out = []
        for _, svc in self._by_id.find(pattern):
            if status is not None and svc.status != status:
                continue
            if port is not None and svc.port != port:
                continue
            if expired is not None and (svc.expires_at is not None and svc.expires_at <= now) != expired:
                continue
            out.append(svc)
            if len(out) >= limit:
                break
        return out

    def get(self, identity: str) -> Service:
        svc = self._by_id.get(identity)
        if svc is None:
            raise NotFound("SERVICE_NOT_FOUND", f"no service {identity!r}; claim it with: pd claim {identity}")
        return svc

    def set_endpoint(self, identity: str, env: str, url: str) -> dict[str, Any]:
        svc = self.get(identity)
        now = now_ms()
        with self.store.write() as db:
            db.execute(
                "INSERT INTO endpoints (service_id, env, url, created_at, updated_at) VALUES (?,?,?,?,?) "
                "ON CONFLICT(service_id, env) DO UPDATE SET url=excluded.url, updated_at=excluded.updated_at",
                (identity, env, url, now, now),
            )
        svc.urls[env] = url
        self.bus.emit("service.endpoint", serviceId=identity, env=env, url=url)
        return {"success": True, "message": f"set {env} URL for {identity}"}

    # -- background ----------------------------------------------------------------------------------------

    def _write_seen(self, db: Any, identities: Iterable[str]) -> None:
        rows = [(svc.last_seen, svc.pid, svc.id) for svc in map(self._by_id.get, identities) if svc is not None]
        db.executemany("UPDATE services SET last_seen=?, pid=? WHERE id=?", rows)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self._seen.run)
            await nursery.start(self._expire)
            task_status.started()

    async def _expire(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Release expired services at their deadline (not on a fixed tick)."""
        task_status.started()
        while True:
            deadlines = [s.expires_at for _, s in self._by_id.items() if s.expires_at is not None]
            wait_s = (min(deadlines) - now_ms()) / 1000 if deadlines else float("inf")
            with trio.move_on_after(max(wait_s, 0)):
                await self._expiry_changed.wait()
            self._expiry_changed = trio.Event()
            now = now_ms()
            gone = [s for _, s in self._by_id.items() if s.expires_at is not None and s.expires_at <= now]
            await self.store.background(partial(self._delete, gone, "expire"))  # refused: they stay due


# -- operations ----------------------------------------------------------------------------------------------


def _check_endpoint_env(name: str, value: Any) -> str:
    if not isinstance(value, str) or not _ENV_NAME.match(value):
        raise bad_input(f"{name} must be 1-50 of a-z, 0-9, '_', '-' (e.g. local, staging)")
    return value


def _check_url(name: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) > 2048 or not _URL.match(value):
        raise bad_input(f"{name} must be an http(s) or ws(s) URL of at most 2048 printable ASCII characters "
                        "(percent-encode others)")  # fmt: skip
    return value


def _claim(ctx: Ctx, *, id: str, port, range, expires, pid, cmd, cwd, metadata) -> dict[str, Any]:
    return ctx.app.registry.claim(
        id, port=port, port_range=range, expires_ms=expires, pid=pid, cmd=cmd, cwd=cwd,
        metadata=metadata, agent_id=ctx.agent_id, peer_pid=ctx.pid,
    )  # fmt: skip


def _release(ctx: Ctx, *, id: str | None, expired: bool) -> dict[str, Any]:
    return ctx.app.registry.release(id, expired=expired)


def _find(ctx: Ctx, *, pattern: str, status: str | None, port: int | None, expired, limit: int) -> dict:
    services = [s.to_wire() for s in ctx.app.registry.find(pattern, status=status, port=port, expired=expired,
                                                          limit=limit)]  # fmt: skip
    return {"success": True, "services": services, "count": len(services)}


def _get(ctx: Ctx, *, id: str) -> dict[str, Any]:
    return {"success": True, "service": ctx.app.registry.get(id).to_wire()}


def _endpoint(ctx: Ctx, *, id: str, env: str, url: str) -> dict[str, Any]:
    return ctx.app.registry.set_endpoint(id, env, url)


_ID = Param("id", v.identity, required=True, aliases=("identity",))
OPS = (
    Op(
        "port.claim",
        _claim,
        (
            _ID,
            Param("port", v.integer(1024, 65535)),
            Param("range", v.port_range),
            Param("expires", v.lifetime()),
            Param("pid", v.pid),
            Param("cmd", v.text(1000)),
            Param("cwd", v.text(4096)),
            Param("metadata", v.json_object(10_000)),
        ),
        summary="claim a stable port for an identity (re-claims return the same port)",
    ),
    Op(
        "port.release",
        _release,
        (Param("id", v.identity_pattern, aliases=("identity", "pattern")), Param("expired", v.boolean, default=False)),
        summary="release an identity, every identity matching a pattern, or every expired one",
    ),
    Op(
        "port.find",
        _find,
        (
            Param("pattern", v.identity_pattern, default="*"),
            Param("status", v.one_of("assigned", "running", "stopped", "crashed")),
            Param("port", v.integer(1, 65535)),
            Param("expired", v.boolean),
            Param("limit", v.integer(1, 10_000), default=1000),
        ),
        summary="list services matching an identity pattern",
    ),
    Op("port.get", _get, (_ID,), summary="one service with its endpoints"),
    Op(
        "port.endpoint",
        _endpoint,
        (_ID, Param("env", _check_endpoint_env, required=True), Param("url", _check_url, required=True)),
        summary="set a service's URL for an environment",
    ),
)
