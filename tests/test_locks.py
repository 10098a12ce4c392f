"""Locks through the real daemon (CLI, IPC, HTTP) and in-process against a model: one holder, growing fencing
tokens, FIFO waits, expiry, owner death, connection-bound release, SIGKILL survival, pd with-lock."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from conftest import pd, race, winners
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from portdaddy.core import locks as locks_module
from portdaddy.core import ops
from portdaddy.core.locks import Locks
from portdaddy.core.ops import Ctx
from portdaddy.errors import LockHeld, PDError
from tests.swarm_app import make_app


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_cli_lock_unlock_and_token(daemon) -> None:
    first = daemon.pd("lock", "cli:db-migrations", "-q")
    assert first.returncode == 0, first.stderr
    token = int(first.stdout)
    held = daemon.pd("lock", "cli:db-migrations")  # another process: another owner
    assert held.returncode == 1
    assert "held by pid-" in held.stderr and held.stdout == ""
    assert re.search(r"\(expires in [45]m\); wait with --wait", held.stderr)  # as pd lock says it; was "in 299s"
    as_json = json.loads(daemon.pd("lock", "cli:db-migrations", "--json").stdout)
    assert as_json["success"] is False and as_json["error"] == "LOCK_HELD" and as_json["holder"].startswith("pid-")
    listed = json.loads(daemon.pd("locks", "--json").stdout)
    assert [lk["token"] for lk in listed["locks"] if lk["name"] == "cli:db-migrations"] == [token]
    unlocked = daemon.pd("unlock", "cli:db-migrations")
    assert unlocked.returncode == 0 and "Released" in unlocked.stdout
    assert "was not held" in daemon.pd("unlock", "cli:db-migrations").stderr
    again = json.loads(daemon.pd("lock", "cli:db-migrations", "--json", "--owner", "me").stdout)
    assert again["token"] > token
    same = json.loads(daemon.pd("lock", "cli:db-migrations", "--json", "--owner", "me", "--ttl", "10m").stdout)
    assert same["existing"] is True and same["token"] == again["token"]  # re-acquire is idempotent
    assert "expires in 10m)" in daemon.pd("lock", "cli:db-migrations", "--owner", "me", "--ttl", "10m").stdout
    refused = daemon.pd("unlock", "cli:db-migrations", "--owner", "someone-else")
    assert refused.returncode == 1 and "held by me" in refused.stderr
    assert daemon.pd("unlock", "cli:db-migrations", "--owner", "someone-else", "--force").returncode == 0
    assert daemon.call("lock.get", name="cli:db-migrations")["held"] is False


def test_thirty_two_processes_race_for_one_lock(daemon) -> None:
    outcomes = race(daemon, [pd("lock", "race:x", "-q")] * 32)
    won = winners(outcomes)
    assert len(won) == 1, outcomes
    assert all(o.code == 1 and "is held by" in o.stderr for o in outcomes if o.code != 0)
    assert daemon.call("lock.get", name="race:x")["token"] == int(won[0].stdout)


def test_sigkill_keeps_locks_and_the_token_counter(fresh_daemon) -> None:
    a = fresh_daemon.call("lock.acquire", name="keep:a", owner="alice", ttl="10m")
    b = fresh_daemon.call("lock.acquire", name="keep:b", owner="bob", ttl="10m")
    fresh_daemon.call("lock.release", name="keep:b", owner="bob")
    fresh_daemon.kill9()
    fresh_daemon.start()
    kept = fresh_daemon.call("lock.get", name="keep:a")
    assert kept["held"] and kept["owner"] == "alice" and kept["token"] == a["token"]
    with pytest.raises(LockHeld):
        fresh_daemon.call("lock.acquire", name="keep:a", owner="mallory")
    c = fresh_daemon.call("lock.acquire", name="keep:b", owner="carol")
    assert c["token"] > b["token"] > a["token"]


def test_tokens_keep_growing_across_sigkill_after_a_block_of_connection_bound_grants(daemon_factory) -> None:
    """Connection-bound grants write no lock row, but a grant past the reserved block of tokens still reserves
    the next one on disk before it is answered: after a SIGKILL, tokens resume above every one handed out."""
    d = daemon_factory(PORT_DADDY_IPC_RATE="0")
    with d.client() as c:
        for _ in range(locks_module.FENCE_BLOCK + 10):
            last = c.request("lock.acquire", {"name": "bound:churn", "connBound": True})["token"]
            c.request("lock.release", {"name": "bound:churn", "token": last})
    d.kill9()
    d.start()
    assert d.call("lock.acquire", name="bound:churn", owner="next")["token"] > last


def test_blocking_waiters_are_served_in_fifo_order_and_time_out(daemon) -> None:
    daemon.call("lock.acquire", name="fifo:x", owner="holder")
    order: list[str] = []

    def waiter(owner: str) -> None:
        with daemon.client() as c:
            c.request("lock.acquire", {"name": "fifo:x", "owner": owner, "wait": True, "timeout": "20s"},
                      timeout=30)  # fmt: skip
            order.append(owner)
            c.request("lock.release", {"name": "fifo:x", "owner": owner})

    threads = []
    for n, owner in enumerate(("w1", "w2", "w3"), 1):
        threads.append(threading.Thread(target=waiter, args=(owner,)))
        threads[-1].start()
        _wait_for(lambda n=n: daemon.call("daemon.status")["counts"]["lockWaiters"] == n)
    # A non-blocking caller does not barge in ahead of the queue when the lock is handed over.
    daemon.call("lock.release", name="fifo:x", owner="holder")
    for t in threads:
        t.join(timeout=30)
    assert order == ["w1", "w2", "w3"]
    daemon.call("lock.acquire", name="fifo:x", owner="holder")
    started = time.monotonic()
    r = daemon.pd("lock", "fifo:x", "--wait", "--timeout", "300ms")
    assert r.returncode == 1 and "not free within" in r.stderr
    assert 0.25 < time.monotonic() - started < 10
    daemon.call("lock.release", name="fifo:x", force=True)


def test_expiry_hands_the_lock_to_a_waiter(daemon) -> None:
    daemon.call("lock.acquire", name="exp:x", owner="short", ttl=200)
    with daemon.client() as c:
        got = c.request("lock.acquire", {"name": "exp:x", "owner": "next", "wait": True, "timeout": "10s"},
                        timeout=15)  # fmt: skip
    assert got["owner"] == "next"
    with pytest.raises(PDError) as e:
        daemon.call("lock.extend", name="exp:x", owner="short")
    assert e.value.code == "NOT_OWNER"
    daemon.call("lock.release", name="exp:x", owner="next")


def test_connection_bound_lock_is_released_when_the_connection_closes(daemon) -> None:
    with daemon.client() as c:
        c.request("lock.acquire", {"name": "bound:x", "owner": "sdk", "connBound": True})
        plain = c.request("lock.acquire", {"name": "bound:y", "owner": "sdk"})
        assert daemon.call("lock.get", name="bound:x")["connBound"] is True
    _wait_for(lambda: not daemon.call("lock.get", name="bound:x")["held"])
    assert daemon.call("lock.get", name="bound:y")["token"] == plain["token"]  # not bound: kept
    daemon.call("lock.release", name="bound:y")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_with_lock_runs_the_command_and_exits_with_its_status(daemon, tmp_path) -> None:
    out = tmp_path / "token"
    r = daemon.pd("with-lock", "wl:ok", "--", "sh", "-c", f'echo "$PD_LOCK_TOKEN" > {out}; exit 7')
    assert r.returncode == 7, r.stderr
    assert int(out.read_text()) > 0
    assert daemon.call("lock.get", name="wl:ok")["held"] is False
    daemon.call("lock.acquire", name="wl:held", owner="other")
    r = daemon.pd("with-lock", "wl:held", "--", "true")
    assert r.returncode == 1 and "held by other" in r.stderr
    r = daemon.pd("with-lock", "wl:held", "--json", "--", "true")
    assert r.returncode == 1 and json.loads(r.stdout)["holder"] == "other"
    daemon.call("lock.release", name="wl:held")
    r = daemon.pd("with-lock", "wl:zero", "--ttl", "0", "--", "touch", str(tmp_path / "ran"))  # was 1m, silently
    assert r.returncode == 2 and "ttl must be positive" in r.stderr and not (tmp_path / "ran").exists()


def test_with_lock_on_a_lock_its_caller_holds_leaves_it_held(daemon) -> None:
    """Nesting: the holder of a 10-minute lock runs `pd with-lock` on it; afterwards the lock is still theirs,
    with its token and its lease (the inner run bound it to its own connection and released it, before)."""
    me = {"PORT_DADDY_AGENT": "nester"}
    token = int(daemon.pd("lock", "wl:nested", "--ttl", "10m", "-q", env=me).stdout)
    before = daemon.call("lock.get", name="wl:nested")
    r = daemon.pd("with-lock", "wl:nested", "--", "sh", "-c", 'test "$PD_LOCK_TOKEN" = ' + str(token), env=me)
    assert r.returncode == 0, r.stderr
    after = daemon.call("lock.get", name="wl:nested")
    assert after["held"] and after["token"] == token and after["owner"] == "nester"
    assert after["expiresAt"] >= before["expiresAt"] and after["connBound"] is False
    daemon.call("lock.release", name="wl:nested")


@pytest.mark.parametrize("victim", ["child", "with-lock"])
def test_with_lock_releases_when_killed(daemon, victim) -> None:
    name = f"wl:kill-{victim}"
    proc = daemon.spawn_pd("with-lock", name, "--ttl", "1s", "--", "sleep", "60")
    try:
        _wait_for(lambda: daemon.call("lock.get", name=name)["held"] and _children(proc.pid))
        time.sleep(0.6)  # past one lease renewal
        assert daemon.call("lock.get", name=name)["held"]
        if victim == "child":
            os.kill(_children(proc.pid)[0], signal.SIGKILL)
            assert proc.wait(timeout=10) == 128 + signal.SIGKILL
        else:
            sleeper = _children(proc.pid)[0]
            proc.kill()
            proc.wait()
            os.kill(sleeper, signal.SIGKILL)
        _wait_for(lambda: not daemon.call("lock.get", name=name)["held"], timeout=3)  # well before the TTL
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_http_lock_routes(daemon) -> None:
    transport = httpx.HTTPTransport(uds=str(daemon.settings.http_sock))
    with httpx.Client(transport=transport, base_url="http://x") as c:
        r = c.post("/locks/http:deploy", json={"owner": "ci", "ttl": "1m"})
        assert r.status_code == 200 and r.json()["token"] > 0
        held = c.post("/locks/http:deploy", json={"owner": "dev"})
        assert held.status_code == 409 and held.json()["code"] == "LOCK_HELD" and held.json()["holder"] == "ci"
        assert c.put("/locks/http:deploy", json={"owner": "ci", "ttl": "2m"}).status_code == 200
        assert c.get("/locks/http:deploy").json()["owner"] == "ci"
        assert c.request("DELETE", "/locks/http:deploy", json={"owner": "dev"}).status_code == 403
        assert c.request("DELETE", "/locks/http:deploy", json={"owner": "ci"}).json()["released"] is True


@pytest.mark.parametrize("args", [
    ("lock", "has space"),
    ("lock", "x" * 1024),
    ("lock", "a::b"),
    ("lock", "ok:name", "--ttl", "abc"),
    ("lock", "ok:name", "--ttl", "2h"),
    ("lock", "ok:name", "--wait", "--timeout", "soon"),
    ("unlock", "has space"),
])  # fmt: skip
def test_bad_input_exits_2_and_changes_nothing(daemon, args) -> None:
    before = daemon.call("lock.list")["locks"]
    r = daemon.pd(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert daemon.call("lock.list")["locks"] == before


# -- in-process: owner death and a stateful model ---------------------------------------------------------------


@asynccontextmanager
async def _running_locks(tmp_path) -> AsyncIterator[tuple[Any, Locks, trio.MemoryReceiveChannel]]:
    """An in-process Locks with its expiry and owner-death task running, and the lock.release events it emits."""
    app = make_app(tmp_path)
    locks = Locks(app)
    app.add(locks)
    try:
        with app.bus.subscribe("lock.release") as released:
            async with trio.open_nursery() as nursery:
                await nursery.start(locks.run)
                yield app, locks, released
                nursery.cancel_scope.cancel()
    finally:
        app.store.close()


async def test_a_release_between_a_refusal_and_the_wait_hands_over_the_free_lock(tmp_path) -> None:
    """A queued acquire runs in a task the transport starts after the refusal, and requests of other
    connections run first: the holder's release may land in between, when nobody is queued yet. The waiter
    takes the free lock then; it used to queue on it and wait for a release that never came (one holder
    releasing as one waiter arrived, over IPC: 7 waiters in 100 timed out on a free lock)."""
    async with _running_locks(tmp_path) as (app, locks, _):
        locks.try_acquire("gap", "holder")

        async def the_holder_releases_first(run: Any) -> Any:
            locks.release("gap", owner="holder")
            return await run()

        args = {"name": "gap", "owner": "waiter", "wait": True, "timeout": "2s"}
        with trio.fail_after(5):
            reply = await ops.call(app.ops, "lock.acquire", args, Ctx(app, "ipc"), waiting=the_holder_releases_first)
        assert (reply["owner"], reply["existing"]) == ("waiter", False)
        assert locks.get("gap").owner == "waiter" and locks.stats()["lockWaiters"] == 0


def _releases(released: trio.MemoryReceiveChannel) -> list[tuple[str, str]]:
    """Every (name, reason) released so far, in order."""
    found = []
    with suppress(trio.WouldBlock):
        while True:
            event = released.receive_nowait()
            found.append((event.data["name"], event.data["reason"]))
    return found


async def test_agent_death_and_unregister_release_its_locks(tmp_path) -> None:
    async with _running_locks(tmp_path) as (app, locks, released):
        locks.try_acquire("db", "agent-a")
        locks.try_acquire("cache", "agent-a")
        locks.try_acquire("queue", "agent-b")
        app.bus.emit("agent.dead", agentId="agent-a", identity=None, lastHeartbeat=0, sessionIds=[])
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(lk.name for lk in locks.list()) == ["queue"]
        app.bus.emit("agent.unregister", agentId="agent-b")
        await trio.testing.wait_all_tasks_blocked()
        assert locks.list() == []
        assert sorted(_releases(released)) == [("cache", "owner-dead"), ("db", "owner-dead"), ("queue", "owner-dead")]


async def test_released_leases_do_not_pile_up_and_expiry_still_fires(tmp_path) -> None:
    async with _running_locks(tmp_path) as (_, locks, released):
        locks.try_acquire("steady", "holder")  # held throughout, 5-minute lease
        for _ in range(2000):  # churn: every lease released long before its deadline
            locks.try_acquire("churn", "worker")
            locks.release("churn", owner="worker")
        assert len(locks._deadlines) <= 2 * 1 + locks_module.COMPACT_SLACK + 1
        locks.try_acquire("short", "brief", ttl_ms=50)
        with trio.fail_after(5):
            while "short" in locks._held:  # not get(), which would expire it on the spot
                await trio.sleep(0.02)
        assert "steady" in locks._held
        assert set(_releases(released)) == {("churn", "release"), ("short", "expire")}


_NAMES = st.sampled_from(["a", "b:c"])
_OWNERS = st.sampled_from(["o1", "o2", "o3"])


class LockModel(RuleBasedStateMachine):
    """Acquire, release, force, expire (time moves), owner death and restart against a dict model."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile
        from pathlib import Path

        self.home = Path(tempfile.mkdtemp(prefix="pdlk", dir="/tmp"))
        self.now = 1_000_000
        self._real_now = locks_module.now_ms
        locks_module.now_ms = lambda: self.now
        self.app = make_app(self.home)
        self.locks = Locks(self.app)
        self.model: dict[str, tuple[str, int, int]] = {}  # name -> (owner, token, expires_at)
        self.last_token = 0

    def teardown(self) -> None:
        locks_module.now_ms = self._real_now
        self.app.store.close()
        import shutil

        shutil.rmtree(self.home, ignore_errors=True)

    def _live(self, name: str) -> tuple[str, int, int] | None:
        held = self.model.get(name)
        if held is not None and held[2] <= self.now:
            del self.model[name]
            return None
        return held

    @rule(name=_NAMES, owner=_OWNERS, ttl=st.integers(1, 100))
    def acquire(self, name: str, owner: str, ttl: int) -> None:
        held = self._live(name)
        if held is not None and held[0] != owner:
            with pytest.raises(LockHeld):
                self.locks.try_acquire(name, owner, ttl_ms=ttl)
            return
        lock, existing = self.locks.try_acquire(name, owner, ttl_ms=ttl)
        assert existing == (held is not None)
        if held is not None:
            assert lock.token == held[1]
        else:
            assert lock.token > self.last_token
            self.last_token = lock.token
        self.model[name] = (owner, lock.token, max(held[2] if held else 0, self.now + ttl))  # a lease never shrinks

    @rule(name=_NAMES, owner=_OWNERS)
    def release(self, name: str, owner: str) -> None:
        held = self._live(name)
        if held is not None and held[0] != owner:
            with pytest.raises(PDError):
                self.locks.release(name, owner=owner)
            return
        assert (self.locks.release(name, owner=owner) is not None) == (held is not None)
        self.model.pop(name, None)

    @rule(name=_NAMES)
    def force(self, name: str) -> None:
        held = self._live(name)
        assert (self.locks.release(name, owner="admin", force=True) is not None) == (held is not None)
        self.model.pop(name, None)

    @rule(ms=st.integers(1, 150))
    def time_passes(self, ms: int) -> None:
        self.now += ms

    @rule(owner=_OWNERS)
    def owner_dies(self, owner: str) -> None:
        self.locks.release_owner(owner, "owner-dead")
        for name in [n for n, h in self.model.items() if h[0] == owner]:
            del self.model[name]

    @rule()
    def restart(self) -> None:
        self.app.store.close()
        self.app = make_app(self.home)
        self.locks = Locks(self.app)

    @invariant()
    def matches_model(self) -> None:
        for name in ("a", "b:c"):
            held, lock = self._live(name), self.locks.get(name)
            assert (lock is None) == (held is None)
            if lock is not None:
                assert (lock.owner, lock.token, lock.expires_at) == held
        rows = self.app.store.all("SELECT name, count(*) FROM locks GROUP BY name HAVING count(*) > 1")
        assert rows == []
        # Every token handed out is covered by the durable reservation, so none is reused after a restart.
        assert self.app.store.scalar("SELECT last_token FROM lock_fence") >= self.last_token


TestLockModel = LockModel.TestCase
TestLockModel.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


def test_quiet_unlock_and_heartbeat_print_one_word(daemon) -> None:
    assert daemon.pd("lock", "cli:quiet", "-q").returncode == 0
    assert daemon.pd("unlock", "cli:quiet", "-q").stdout == "released\n"
    assert daemon.pd("unlock", "cli:quiet", "-q").stdout == "not-held\n"
    assert daemon.pd("agent", "heartbeat", "--agent", "quiet-one", "-q").stdout == "quiet-one\n"


def test_a_grant_racing_its_waiters_disconnect_is_released_bound_or_not(daemon) -> None:
    """The holder's release hands the lock to a waiter whose connection is closing at that very moment: nobody
    would know they hold it. It was released at once only when the lock was bound to the connection; otherwise
    it stayed held until its lease ran out (5 minutes by default). The daemon is stopped while the release is
    sent and the waiter hangs up, so that it finds both in one pass, the release first; had it run between
    them, it would have written the grant into the waiter's socket before the hang-up, and a grant the socket
    took is the waiter's (as one read and then abandoned would be), held until its lease."""
    import socket

    from portdaddy.ipc.frame import Performative, encode

    def connected() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(daemon.settings.ipc_sock))
        return sock

    with daemon.client() as c, connected() as releaser:
        releaser.sendall(encode(Performative.REQUEST, 1, {"action": "daemon.version"}))
        assert releaser.recv(65536)  # accepted and served: its next frame is read in the same pass as a hang-up
        for n in range(30):
            name = f"race-disconnect:{n}"
            token = c.request("lock.acquire", {"name": name, "owner": "holder"})["token"]
            waiter = connected()
            waiter.sendall(encode(Performative.REQUEST, 1, {"action": "lock.acquire", "name": name, "owner": "waiter",
                                                            "wait": True, "connBound": n % 2 == 1}))  # fmt: skip
            _wait_for(lambda: c.request("daemon.status")["counts"]["lockWaiters"] == 1)
            daemon.proc.send_signal(signal.SIGSTOP)
            try:
                releaser.sendall(encode(Performative.REQUEST, 2 + n, {"action": "lock.release", "name": name,
                                                                      "token": token}))  # fmt: skip
                waiter.close()
            finally:
                daemon.proc.send_signal(signal.SIGCONT)
            _wait_for(lambda name=name: c.request("lock.get", {"name": name})["held"] is False, timeout=5)
