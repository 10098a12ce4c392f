"""Measurement helpers: percentiles, a daemon on a temporary home, CPU pinning, the raw floors."""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from portdaddy.config import Settings
from portdaddy.launcher import wait_healthy

PYTHON = sys.executable


@dataclass
class Figure:
    name: str
    samples_us: list[float]
    unit: str = "µs"
    floor: str | None = None  # name of the figure this one is compared to
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    def pct(self, p: float) -> float:
        s = sorted(self.samples_us)
        return s[min(len(s) - 1, int(p / 100 * len(s)))]

    @property
    def p50(self) -> float:
        return statistics.median(self.samples_us)


def timed(fn: Callable[[], object], n: int, warmup: int = 50) -> list[float]:
    """Per-call wall time of ``fn`` in µs."""
    for _ in range(warmup):
        fn()
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        fn()
        out.append((clock() - t0) / 1000)
    return out


def pin(pid: int = 0, cpu: int = 0) -> bool:
    """Pin a process to one CPU (DESIGN §5: cross-CPU wake-ups cost ~30 µs each way here)."""
    try:
        os.sched_setaffinity(pid, {cpu})
        return True
    except (AttributeError, OSError):
        return False


def unpin(pid: int = 0) -> None:
    try:
        os.sched_setaffinity(pid, set(range(os.cpu_count() or 1)))
    except (AttributeError, OSError):
        pass


def _echo_server(sock: socket.socket, size: int) -> None:
    while True:
        data = sock.recv(size)
        if not data:
            return
        sock.sendall(data)


def _trio_echo_server(sock: socket.socket, size: int) -> None:
    """The same echo as a trio task: what any trio server pays per request before doing any work of its own."""
    import trio

    async def serve() -> None:
        sock.setblocking(False)
        while True:
            await trio.lowlevel.wait_readable(sock)
            data = sock.recv(size)
            if not data:
                return
            sock.send(data)

    trio.run(serve)


def floor_pingpong(n: int, pinned: bool, server: Callable[[socket.socket, int], None] = _echo_server) -> list[float]:
    """A raw AF_UNIX blocking ping-pong of 16-byte messages between two Python processes; ``server`` echoes in
    the child (a blocking loop; ``trio_echo`` passes a trio task instead)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # child: echo until EOF
        a.close()
        if pinned:
            pin()
        server(b, 16)
        os._exit(0)
    b.close()
    if pinned:
        pin()
    msg = b"x" * 16

    def once() -> None:
        a.sendall(msg)
        a.recv(16)

    try:
        return timed(once, n, warmup=200)
    finally:
        unpin()
        a.close()
        os.waitpid(pid, 0)


def trio_echo(n: int) -> list[float]:
    """Pinned ping-pong against a trio echo task: the share of a round trip trio itself takes."""
    return floor_pingpong(n, pinned=True, server=_trio_echo_server)


def floor_send(n: int) -> list[float]:
    """A raw send loop of a prebuilt 41-byte frame to a process that drains it."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        a.close()
        while b.recv(1 << 16):
            pass
        os._exit(0)
    b.close()
    frame = b"\x01" + b"\x00" * 6 + b"y" * 34
    try:
        return timed(lambda: a.send(frame), n, warmup=500)
    finally:
        a.close()
        os.waitpid(pid, 0)


@contextmanager
def bench_daemon(**env: str) -> Iterator[tuple[Settings, subprocess.Popen[bytes], tuple[float, float]]]:
    """A daemon on a temporary home; yields (settings, process, seconds from spawn to (IPC healthy, HTTP ready))."""
    home = Path(tempfile.mkdtemp(prefix="pdb", dir="/tmp"))
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PORT_DADDY_")}
    full_env.update(PORT_DADDY_HOME=str(home), PORT_DADDY_NO_TCP="1", PORT_DADDY_NO_AUTOSTART="1", **env)
    cfg = Settings.from_env(full_env)
    log = open(home / "daemon.log", "ab")  # noqa: SIM115
    t0 = time.perf_counter()
    proc = subprocess.Popen([PYTHON, "-m", "portdaddy.daemon"], env=full_env, stdout=log, stderr=log)
    log.close()
    try:
        wait_healthy(cfg, proc, timeout=30)
        ipc_s = time.perf_counter() - t0
        wait_healthy(cfg, proc, timeout=30, http=True)
        yield cfg, proc, (ipc_s, time.perf_counter() - t0)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        shutil.rmtree(home, ignore_errors=True)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")
