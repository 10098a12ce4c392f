"""The benchmark suites. Each returns Figures; latency figures name the floor they are divided by."""

from __future__ import annotations

import os
import subprocess
import time

from bench.harness import PYTHON, Figure, bench_daemon, floor_pingpong, floor_send, pin, rss_mb, timed, unpin
from portdaddy.ipc.client import BlockingClient


def floors(quick: bool) -> list[Figure]:
    n = 2000 if quick else 20000
    return [
        Figure("floor: unix ping-pong 16B (pinned)", floor_pingpong(n, pinned=True)),
        Figure("floor: unix ping-pong 16B (unpinned)", floor_pingpong(n, pinned=False)),
        Figure("floor: send prebuilt 41B frame", floor_send(n * 5)),
    ]


def ipc_round_trips(quick: bool) -> list[Figure]:
    n = 2000 if quick else 20000
    figures = []
    # Rate limiting off: these measure the path, not the limiter (PORT_DADDY_IPC_RATE=0).
    with bench_daemon(PORT_DADDY_IPC_RATE="0") as (cfg, proc, started):
        figures.append(Figure("daemon start to healthy", [started * 1e6 / 1000], unit="ms"))
        figures.append(Figure("daemon RSS idle", [rss_mb(proc.pid)], unit="MB"))
        with BlockingClient(cfg.ipc_sock) as c:
            c.request("port.claim", {"id": "bench:api"})
            for pinned in (True, False):
                if pinned:
                    pin(proc.pid)
                    pin()
                samples = timed(lambda: c.request("port.claim", {"id": "bench:api"}), n, warmup=500)
                label = "pinned" if pinned else "unpinned"
                figures.append(Figure(f"ipc: port.claim existing ({label})", samples,
                                      floor=f"floor: unix ping-pong 16B ({label})"))  # fmt: skip
                unpin(proc.pid)
                unpin()
        cli = _cli_figures(cfg, quick)
        figures.extend(cli)
        figures.append(Figure("daemon RSS after load", [rss_mb(proc.pid)], unit="MB"))
    return figures


def _cli_figures(cfg, quick: bool) -> list[Figure]:
    n = 10 if quick else 40
    env = {**os.environ, "PORT_DADDY_HOME": str(cfg.home), "PORT_DADDY_NO_AUTOSTART": "1"}

    def run(*argv: str) -> None:
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)

    def wall(*argv: str) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            run(*argv)
            out.append((time.perf_counter() - t0) * 1000)
        return out

    pd = [PYTHON, "-m", "portdaddy.cli"]
    return [
        Figure("process: python -c pass", wall(PYTHON, "-c", "pass"), unit="ms"),
        Figure("process: pd claim -q (existing)", wall(*pd, "claim", "bench:api", "-q"), unit="ms",
               floor="process: python -c pass"),
        Figure("process: pd version", wall(*pd, "version"), unit="ms", floor="process: python -c pass"),
    ]


def run_all(quick: bool = False) -> list[Figure]:
    return floors(quick) + ipc_round_trips(quick)
