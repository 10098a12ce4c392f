"""Thirty seconds of hostile bytes at the IPC socket from several connections at once, while a well-formed
client keeps asking for health: the daemon never crashes, answers the good client throughout, and its memory
stays bounded. ``PD_FUZZ_SECONDS`` shortens the run locally; the seed is printed for reproduction."""

from __future__ import annotations

import os
import random
import socket
import threading
import time

import apsw
import msgpack
from conftest import Daemon

from portdaddy.ipc.frame import HEADER, Performative

FUZZ_SECONDS = float(os.environ.get("PD_FUZZ_SECONDS", "30"))
ATTACKERS = 4
ACTIONS = ["port.claim", "port.release", "port.find", "port.get", "port.endpoint", "tuple.out", "tuple.in",
           "tuple.rd", "pheromone.spray", "harbor.enter", "arbiter.violations", "daemon.status"]  # fmt: skip
HOSTILE_VALUES = [None, True, -1, 2**64 - 1, -(2**63), 1e308, float("nan"), "", "../../etc/passwd", "a" * 60_000,
                  "\x00\x01", "💥" * 100, ";rm -rf /", "*", "**:**", [], {}, [[[]]], {"a": {"b": None}},
                  b"\xff" * 100, list(range(1000))]  # fmt: skip
FIELDS = ["id", "identity", "pattern", "fields", "harbor", "table", "key", "strength", "ttl", "limit", "wait",
          "timeout", "port", "range", "metadata", "env", "url", "agentId", "capabilities", "since"]  # fmt: skip


def deep_nesting(depth: int) -> bytes:
    """A payload map whose one value nests ``depth`` arrays (built by hand: msgpack refuses to pack it)."""
    return (b"\x82" + msgpack.packb("action") + msgpack.packb("port.claim") + msgpack.packb("id")
            + b"\x91" * depth + b"\xc0")  # fmt: skip


def frame(kind: int, conv: int, body: bytes) -> bytes:
    return HEADER.pack(kind, conv, len(body)) + body


def hostile_payload(rng: random.Random) -> bytes:
    payload: dict[str, object] = {"action": rng.choice([*ACTIONS, "no.such.op", "", "x" * 300, "daemon.stop"])}
    for name in rng.sample(FIELDS, rng.randint(0, 6)):
        payload[name] = rng.choice(HOSTILE_VALUES)
    body = msgpack.packb(payload, use_bin_type=True)
    return body if len(body) <= 65535 else body[:65535]  # truncated MessagePack is a malformed frame too


def attack_bytes(rng: random.Random) -> bytes:
    kinds = [int(p) for p in Performative] + [0x00, 0x7F, 0xFF]
    choice = rng.randrange(7)
    if choice == 0:  # noise
        return os.urandom(rng.randint(1, 8192))
    if choice == 1:  # a header promising more than arrives
        return HEADER.pack(Performative.REQUEST, rng.randrange(2**32), 65535) + os.urandom(rng.randint(0, 1000))
    if choice == 2:
        return frame(Performative.REQUEST, rng.randrange(1, 2**31), deep_nesting(10_000))
    if choice == 3:  # a valid frame cut short
        whole = frame(Performative.REQUEST, 1, hostile_payload(rng))
        return whole[: rng.randrange(1, len(whole))]
    batch = b"".join(frame(rng.choice(kinds), rng.choice([0, rng.randrange(2**32)]), hostile_payload(rng))
                     for _ in range(rng.randint(1, 20)))  # fmt: skip
    return batch


def attacker(path: str, seed: int, stop: threading.Event, errors: list[BaseException]) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1)
                s.connect(path)
                for _ in range(rng.randint(1, 5)):
                    s.sendall(attack_bytes(rng))
                    if rng.random() < 0.5:
                        try:
                            s.recv(65536)
                        except TimeoutError:
                            pass
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # cut off after three strikes, or the daemon stopped reading a flood: expected
        except BaseException as e:  # anything else is a test bug worth seeing
            errors.append(e)
            return


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_fuzz_the_ipc_socket(fresh_daemon: Daemon) -> None:
    d = fresh_daemon
    seed = int(os.environ.get("PD_FUZZ_SEED") or random.randrange(2**32))
    print(f"fuzz seed {seed} (PD_FUZZ_SEED={seed} reproduces the byte streams)")
    baseline = rss_mb(d.proc.pid)
    stop, errors = threading.Event(), []
    threads = [threading.Thread(target=attacker, args=(str(d.settings.ipc_sock), seed + i, stop, errors))
               for i in range(ATTACKERS)]  # fmt: skip
    for t in threads:
        t.start()
    peak, answered, slowest = baseline, 0, 0.0
    try:
        with d.client() as good:
            deadline = time.monotonic() + FUZZ_SECONDS
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                assert good.request("daemon.health", timeout=5)["status"] == "ok"
                slowest = max(slowest, time.monotonic() - t0)
                answered += 1
                assert d.proc.poll() is None, "the daemon died"
                peak = max(peak, rss_mb(d.proc.pid))
                time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors, errors
    assert answered > FUZZ_SECONDS * 5, f"only {answered} health answers in {FUZZ_SECONDS}s"
    assert slowest < 2.0, f"the good client waited {slowest:.2f}s for one answer"
    assert peak - baseline < 64, f"daemon memory grew {peak - baseline:.0f} MB under fuzz"
    counts = d.call("daemon.status")["counts"]
    assert counts["ipcMalformed"] > 0 and counts["ipcCutOff"] > 0  # the fuzz did reach the defences
    assert "Traceback" not in d.log(), "an operation crashed on hostile input instead of refusing it"
    db = apsw.Connection(str(d.settings.db))
    assert db.pragma("integrity_check") == "ok"
