"""The benchmark suites. Each returns Figures; latency figures name the floor they are divided by.

One daemon serves every suite (rate limiting off, PORT_DADDY_IPC_RATE=0: these measure the path, not the
limiter), so its RSS after all of them is the "after load" figure.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

import portdaddy
from bench.harness import PYTHON, Figure, bench_daemon, floor_pingpong, floor_send, pin, rss_mb, timed, trio_echo, unpin
from portdaddy.config import Settings
from portdaddy.ipc.client import BlockingClient
from portdaddy.ipc.frame import Encoder, Performative

PINGPONG = "floor: unix ping-pong 16B (pinned)"
PINGPONG_UNPINNED = "floor: unix ping-pong 16B (unpinned)"
SEND = "floor: send prebuilt 41B frame"
SPRAY = {"table": "services", "id": "bench:api", "key": "load", "strength": 0.5}


def floors(quick: bool) -> list[Figure]:
    n = 2000 if quick else 20000
    return [
        Figure(PINGPONG, floor_pingpong(n, pinned=True)),
        Figure(PINGPONG_UNPINNED, floor_pingpong(n, pinned=False)),
        Figure(SEND, floor_send(n * 5)),
        # Not a floor: the bare trio echo shows what a trio daemon pays per request before any work of its own.
        Figure("reference: trio echo task 16B (pinned)", trio_echo(n), floor=PINGPONG),
    ]


# -- IPC request/response --------------------------------------------------------------------------------


def ipc_round_trips(cfg: Settings, daemon_pid: int, quick: bool) -> list[Figure]:
    n = 2000 if quick else 20000
    figures = []
    with BlockingClient(cfg.ipc_sock) as c, BlockingClient(cfg.ipc_sock) as subscriber:
        c.request("port.claim", {"id": "bench:api"})
        subscriber.request("msg.subscribe", {"channels": ["bench:*"], "new": True})

        def tuple_out_in() -> None:
            c.request("tuple.out", {"fields": ["job", 1]})
            c.request("tuple.in", {"pattern": ["job", "*"]})

        def lock_cycle(conn_bound: bool = False) -> None:
            token = c.request("lock.acquire", {"name": "bench:lock", "owner": "bench", "connBound": conn_bound})
            c.request("lock.release", {"name": "bench:lock", "token": token["token"]})

        def publish_to_receipt() -> None:  # fire-and-forget publish, timed until the subscriber has it
            c.send("msg.publish", {"channel": "bench:ready", "payload": 1})
            subscriber.receive(timeout=5)

        cases = {"port.claim existing": lambda: c.request("port.claim", {"id": "bench:api"}),
                 "tuple.out + tuple.in": tuple_out_in, "lock.acquire + lock.release": lock_cycle,
                 "lock.acquire + lock.release, connection-bound": lambda: lock_cycle(conn_bound=True),
                 "msg.publish (ff) to subscriber receipt": publish_to_receipt}  # fmt: skip
        for label, fn in cases.items():
            for pinned in (True, False):
                if pinned:
                    pin(daemon_pid)
                    pin()
                try:
                    samples = timed(fn, n, warmup=500)
                finally:
                    unpin(daemon_pid)
                    unpin()
                where = "pinned" if pinned else "unpinned"
                floor = PINGPONG if pinned else PINGPONG_UNPINNED
                figures.append(Figure(f"ipc: {label} ({where})", samples, floor=floor))
    return figures


def ipc_beside_busy_process(cfg: Settings, daemon_pid: int, quick: bool) -> list[Figure]:
    """A claim round trip while a busy process shares the daemon's CPU and the client runs on the other: a
    daemon that gave its CPU away between requests (a ``sched_yield``) answered the next one a time slice
    later, ~4 ms at p90 (spec/ipc.md, "The server")."""
    if (os.cpu_count() or 1) < 2:
        return []
    n = 500 if quick else 3000
    busy = subprocess.Popen([PYTHON, "-c", "while True: pass"])
    try:
        pin(busy.pid)
        pin(daemon_pid)
        pin(cpu=1)
        with BlockingClient(cfg.ipc_sock) as c:
            samples = timed(lambda: c.request("port.claim", {"id": "bench:api"}), n, warmup=200)
    finally:
        busy.kill()
        busy.wait()
        unpin(daemon_pid)
        unpin()
    return [Figure("ipc: port.claim, a busy process on the daemon's CPU", samples, floor=PINGPONG)]


def _concurrent_case(c: BlockingClient, case: str, worker: int) -> Callable[[], object]:
    """One worker's operation for ``case``, on names of its own: the figure measures the daemon's path for many
    connections at once, not contention for one lock or channel."""
    if case == "port.claim":
        return lambda: c.request("port.claim", {"id": "bench:api"})
    if case == "lock.acquire + lock.release":
        name = f"bench:lock:{worker}"

        def lock_cycle() -> None:
            token = c.request("lock.acquire", {"name": name, "owner": f"bench{worker}"})["token"]
            c.request("lock.release", {"name": name, "token": token})

        return lock_cycle
    channel = f"bench:w{worker}"
    c.request("msg.subscribe", {"channels": [channel], "new": True})

    def publish_to_receipt() -> None:  # the worker's own connection publishes and receives the delivery
        c.send("msg.publish", {"channel": channel, "payload": 1})
        c.receive(timeout=5)

    return publish_to_receipt


def _concurrent_worker(path: str, case: str, worker: int, n: int, start: Any, out: Any) -> None:
    with BlockingClient(path) as c:
        fn = _concurrent_case(c, case, worker)
        for _ in range(20):
            fn()
        start.wait()
        t0 = time.perf_counter()
        samples = timed(fn, n, warmup=0)
        out.put((time.perf_counter() - t0, samples))


# case -> what one operation is, for the throughput unit (a lock cycle is two requests)
CONCURRENT_CASES = {
    "port.claim": "req/s",
    "lock.acquire + lock.release": "cyc/s",
    "msg.publish (ff) to own receipt": "msg/s",
}


def ipc_concurrent(cfg: Settings, quick: bool, conns: int = 16) -> list[Figure]:
    """``conns`` processes, one connection each, running each case as fast as they can."""
    n = 300 if quick else 3000
    ctx = multiprocessing.get_context("fork")
    figures = []
    for case, unit in CONCURRENT_CASES.items():
        start, out = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_concurrent_worker, args=(str(cfg.ipc_sock), case, i, n, start, out))
                 for i in range(conns)]  # fmt: skip
        for p in procs:
            p.start()
        time.sleep(0.3)  # every worker connected and warmed up
        start.set()
        results = [out.get(timeout=300) for _ in procs]
        for p in procs:
            p.join()
        wall = max(elapsed for elapsed, _ in results)
        samples = [s for _, per in results for s in per]
        figures += [
            Figure(f"ipc: {case}, {conns} connections (latency)", samples, floor=PINGPONG_UNPINNED),
            Figure(f"ipc: {case}, {conns} connections (throughput)", [conns * n / wall], unit=unit),
        ]
    return figures


# -- fire-and-forget ---------------------------------------------------------------------------------------


def sdk_fire_and_forget(cfg: Settings, quick: bool) -> list[Figure]:
    """What an SDK caller pays for ``pd.heartbeat()`` / ``pd.spray(...)``: encode and a non-blocking send."""
    n = 20000 if quick else 200000

    async def run() -> dict[str, list[float]]:
        clock = time.perf_counter_ns
        samples: dict[str, list[float]] = {"heartbeat()": [], "spray()": []}
        async with portdaddy.connect(settings=cfg, agent_id="bench-agent", autostart=False) as pd:
            await pd.register_agent(identity="bench:sdk", purpose="benchmark")
            calls = {"heartbeat()": pd.heartbeat, "spray()": lambda: pd.spray("services", "bench:api", "load", 0.5)}
            for label, fn in calls.items():
                out = samples[label]
                for i in range(n):
                    t0 = clock()
                    fn()
                    out.append((clock() - t0) / 1000)
                    if i % 64 == 0:
                        await trio.sleep(0)  # let the writer task drain anything the socket did not take
                await pd.status()  # everything sent before it has been handled
        return {label: s[1000:] for label, s in samples.items()}

    return [Figure(f"sdk: fire-and-forget {label}, client cost", s, floor=SEND) for label, s in trio.run(run).items()]


def sdk_round_trip(cfg: Settings, quick: bool) -> list[Figure]:
    """``await pd.call("port.claim", ...)``: a request through the trio client, its reply woken in trio
    (unpinned: the SDK polls for the reply before trio sleeps, which needs a second CPU)."""
    n = 2000 if quick else 20000

    async def run() -> list[float]:
        clock = time.perf_counter_ns
        samples = []
        async with portdaddy.connect(settings=cfg, autostart=False) as pd:
            for _ in range(n + 500):
                t0 = clock()
                await pd.call("port.claim", id="bench:api")
                samples.append((clock() - t0) / 1000)
        return samples[500:]

    return [Figure("sdk: port.claim existing, round trip (unpinned)", trio.run(run), floor=PINGPONG_UNPINNED)]


def _flood_worker(path: str, payload: dict[str, Any], batches: int, start: Any, stop: Any) -> None:
    """Send ``payload`` as fire-and-forget frames, 512 to a send, ``batches`` times or until ``stop`` is set."""
    batch = Encoder().encode(Performative.INFORM, 0, payload) * 512
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    start.wait()
    for _ in range(batches):
        if stop.is_set():
            break
        sock.sendall(batch)
    sock.close()


def daemon_ingest(cfg: Settings, quick: bool, conns: int = 4) -> list[Figure]:
    """Fire-and-forget frames the daemon handles per second, from ``conns`` connections at once."""
    per_conn = 512 * (40 if quick else 400)
    kinds = {  # label: (payload for connection i, the status counter that counts them)
        "heartbeats": (lambda i: {"action": "agent.heartbeat", "agentId": f"bench-ingest-{i}"}, "agentHeartbeats"),
        "sprays": (lambda i: {"action": "pheromone.spray", **SPRAY}, "pheromoneSprays"),
    }
    figures = []
    with BlockingClient(cfg.ipc_sock) as c:
        for i in range(conns):
            c.request("agent.register", {"id": f"bench-ingest-{i}", "purpose": "benchmark"})
        for label, (payload, counter) in kinds.items():
            count = lambda: c.request("daemon.status")["counts"][counter]  # noqa: B023, E731
            before = count()
            ctx = multiprocessing.get_context("fork")
            start, never = ctx.Event(), ctx.Event()
            procs = [ctx.Process(target=_flood_worker, args=(str(cfg.ipc_sock), payload(i), per_conn // 512, start,
                                                             never)) for i in range(conns)]  # fmt: skip
            for p in procs:
                p.start()
            time.sleep(0.3)
            t0 = time.perf_counter()
            start.set()
            target = before + conns * per_conn
            deadline = t0 + 120
            while (done := count()) < target and time.perf_counter() < deadline:
                time.sleep(0.02)  # a daemon.status costs the daemon ~0.3 ms: polled every 5 ms, it took ~5% of it
            elapsed = time.perf_counter() - t0
            for p in procs:
                p.join()
            figures.append(Figure(f"daemon ingest: fire-and-forget {label}, {conns} connections",
                                  [(done - before) / elapsed], unit="fr/s",
                                  note="" if done >= target else "INCOMPLETE: frames lost"))  # fmt: skip
    return figures


def ipc_behind_flood(cfg: Settings, quick: bool, flooders: int = 2) -> list[Figure]:
    """A claim round trip while other connections flood the daemon with fire-and-forget frames: what one agent's
    burst costs everyone else (spec/ipc.md, "Fairness"; unbounded, it was ~100 times a quiet claim)."""
    n = 500 if quick else 3000
    ctx = multiprocessing.get_context("fork")
    start, stop = ctx.Event(), ctx.Event()
    payload = {"action": "pheromone.spray", **SPRAY}
    procs = [ctx.Process(target=_flood_worker, args=(str(cfg.ipc_sock), payload, 1 << 40, start, stop))
             for _ in range(flooders)]  # fmt: skip
    for p in procs:
        p.start()
    try:
        with BlockingClient(cfg.ipc_sock) as c:
            claim = lambda: c.request("port.claim", {"id": "bench:api"})  # noqa: E731
            start.set()
            time.sleep(0.3)  # the flood is under way
            samples = timed(claim, n)
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
    return [Figure(f"ipc: port.claim behind {flooders} flooding connections", samples, floor=PINGPONG_UNPINNED)]


# -- HTTP on the Unix socket --------------------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(self.unix_path)


def http_round_trips(cfg: Settings, quick: bool) -> list[Figure]:
    n = 500 if quick else 5000
    conn = _UnixHTTPConnection(str(cfg.http_sock))
    body = json.dumps({"id": "bench:api"})
    headers = {"Content-Type": "application/json"}

    def claim() -> None:
        conn.request("POST", "/claim", body, headers)
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status

    def lock_cycle() -> None:
        for method in ("POST", "DELETE"):
            conn.request(method, "/locks/bench:http", json.dumps({"owner": "bench"}), headers)
            response = conn.getresponse()
            response.read()
            assert response.status == 200, response.status

    stream_conn = _UnixHTTPConnection(str(cfg.http_sock))
    stream_conn.request("GET", "/msg/bench:sse/subscribe?new=true")
    stream = stream_conn.getresponse()
    assert stream.status == 200, stream.status

    def publish_to_sse() -> None:  # POST a message, timed until the SSE subscriber has read its data line
        conn.request("POST", "/msg/bench:sse", json.dumps({"payload": 1}), headers)
        response = conn.getresponse()
        response.read()
        while not stream.fp.readline().startswith(b"data:"):
            pass

    figures = [Figure("http/unix: POST /claim existing (keep-alive)", timed(claim, n, warmup=50),
                      floor=PINGPONG_UNPINNED),
               Figure("http/unix: POST + DELETE /locks/<name>", timed(lock_cycle, n, warmup=50),
                      floor=PINGPONG_UNPINNED),
               Figure("http/unix: POST /msg to SSE subscriber receipt", timed(publish_to_sse, n, warmup=50),
                      floor=PINGPONG_UNPINNED)]  # fmt: skip
    stream_conn.close()
    conn.close()
    return figures


# -- whole processes -----------------------------------------------------------------------------------------


def cli(cfg: Settings, quick: bool) -> list[Figure]:
    n = 10 if quick else 40
    env = {**os.environ, "PORT_DADDY_HOME": str(cfg.home), "PORT_DADDY_NO_AUTOSTART": "1"}
    pd = str(Path(PYTHON).parent / "pd")  # the console script a user runs

    def wall(*argv: str) -> list[float]:
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)
            out.append((time.perf_counter() - t0) * 1000)
        return out

    return [
        Figure("process: python -c pass", wall(PYTHON, "-c", "pass"), unit="ms"),
        Figure("process: pd claim -q (existing)", wall(pd, "claim", "bench:api", "-q"), unit="ms",
               floor="process: python -c pass"),
        Figure("process: pd version", wall(pd, "version"), unit="ms", floor="process: python -c pass"),
    ]  # fmt: skip


def daemon_start(quick: bool) -> list[Figure]:
    """Spawn to healthy: to IPC answering (what ``pd``'s auto-start waits for) and to HTTP listening too."""
    ipc, http = [], []
    for _ in range(2 if quick else 5):
        with bench_daemon() as (_cfg, _proc, (ipc_s, http_s)):
            ipc.append(ipc_s * 1000)
            http.append(http_s * 1000)
    return [Figure("daemon start to healthy (IPC)", ipc, unit="ms"),
            Figure("daemon start to HTTP ready", http, unit="ms")]  # fmt: skip


def run_all(quick: bool = False) -> list[Figure]:
    figures = floors(quick) + daemon_start(quick)
    with bench_daemon(PORT_DADDY_IPC_RATE="0") as (cfg, proc, _started):
        figures.append(Figure("daemon RSS idle", [rss_mb(proc.pid)], unit="MB"))
        figures += ipc_round_trips(cfg, proc.pid, quick)
        figures += ipc_beside_busy_process(cfg, proc.pid, quick)
        figures += ipc_concurrent(cfg, quick)
        figures += sdk_fire_and_forget(cfg, quick)
        figures += sdk_round_trip(cfg, quick)
        figures += daemon_ingest(cfg, quick)
        figures += ipc_behind_flood(cfg, quick)
        figures += http_round_trips(cfg, quick)
        figures += cli(cfg, quick)
        figures.append(Figure("daemon RSS after load", [rss_mb(proc.pid)], unit="MB"))
    return figures
