"""The IPC reactor's linger (portdaddy/ipc/linger.py): it waits outside trio's scheduler only while trio has
nothing else to do, so nothing trio runs is held up by it."""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import trio
import trio.testing
from conftest import Daemon, unix_client

from portdaddy.ipc import linger as linger_module
from portdaddy.ipc.linger import Linger

# A wait that is not ended by what should end it blocks until the streak ends; these tests make the streak
# long, so such a wait shows as a test that takes LONG seconds and fails.
LONG = 10.0


@pytest.fixture
def own() -> Iterator[tuple[socket.socket, socket.socket]]:
    """The linger's own fd (the first socket) and the peer that makes it readable."""
    a, b = socket.socketpair()
    with a, b:
        yield a, b


@pytest.fixture
async def linger(own: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Linger]:
    """A linger over an epoll that watches the first socket, as the reactor's watches its connections."""
    monkeypatch.setattr(linger_module, "STREAK_S", LONG)
    with select.epoll() as epoll:
        epoll.register(own[0].fileno(), select.EPOLLIN)
        made = Linger.start(epoll)
        assert made is not None, "Linger cannot read this trio's runner: the IPC reactor lost its fast wait"
        made.passed_through_trio()
        yield made


def timed_wait(linger: Linger) -> tuple[bool, float]:
    t0 = time.monotonic()
    return linger.wait() is not None, time.monotonic() - t0


async def test_a_request_on_its_own_fd_ends_the_wait(linger: Linger, own: tuple[socket.socket, socket.socket]) -> None:
    threading.Timer(0.05, own[1].send, [b"x"]).start()
    t0 = time.monotonic()
    events = linger.wait()
    assert events == [(own[0].fileno(), select.EPOLLIN)] and time.monotonic() - t0 < LONG / 2


async def test_a_runnable_task_sends_it_through_trio(linger: Linger) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 0)  # runnable, not yet run
        woke, took = timed_wait(linger)
    assert not woke and took < LONG / 2


async def test_a_deadline_ends_the_wait(linger: Linger) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 0.05)
        await trio.testing.wait_all_tasks_blocked()
        woke, took = timed_wait(linger)
    assert not woke and took < LONG / 2


async def test_io_a_trio_task_waits_for_ends_the_wait(linger: Linger) -> None:
    a, b = socket.socketpair()
    with a, b:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.lowlevel.wait_readable, a)
            await trio.testing.wait_all_tasks_blocked()
            threading.Timer(0.05, b.send, [b"x"]).start()
            woke, took = timed_wait(linger)
    assert not woke and took < LONG / 2


async def test_a_thread_handing_trio_work_ends_the_wait(linger: Linger) -> None:
    token = trio.lowlevel.current_trio_token()
    threading.Timer(0.05, token.run_sync_soon, [lambda: None]).start()
    woke, took = timed_wait(linger)
    assert not woke and took < LONG / 2


def wait_for_a_late_request(linger: Linger, own: tuple[socket.socket, socket.socket]) -> None:
    """A request that comes after any spin has given up: what a client on the daemon's own CPU looks like."""
    timer = threading.Timer(0.01, own[1].send, [b"x"])
    timer.start()
    assert timed_wait(linger)[0]
    own[0].recv(64)
    timer.join()


def wait_for_a_request(linger: Linger, own: tuple[socket.socket, socket.socket]) -> None:
    assert timed_wait(linger)[0]
    own[0].recv(64)


async def test_spins_that_catch_nothing_give_way_to_a_yield(
    linger: Linger, own: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client on the daemon's CPU cannot send while the daemon spins: after MISSES spins that caught nothing
    the linger yields the CPU instead, and goes on yielding while the request is there right after the yield."""
    yields = []

    def client_runs_in_the_yield() -> None:  # what a yield does for a client on the same CPU
        yields.append(1)
        own[1].send(b"x")

    monkeypatch.setattr(linger_module.os, "sched_yield", client_runs_in_the_yield)
    for _ in range(linger_module.MISSES):
        wait_for_a_late_request(linger, own)
    assert not yields
    for n in range(1, 4):
        wait_for_a_request(linger, own)
        assert len(yields) == n


async def test_a_yield_that_finds_nothing_goes_back_to_spinning(
    linger: Linger, own: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client is on another CPU after all (or was busy): the next waits spin again."""
    yields = []
    monkeypatch.setattr(linger_module.os, "sched_yield", lambda: yields.append(1))
    for _ in range(linger_module.MISSES + 1):
        wait_for_a_late_request(linger, own)
    assert len(yields) == 1
    wait_for_a_late_request(linger, own)
    assert len(yields) == 1


async def test_a_yield_that_lost_the_cpu_for_long_goes_back_to_spinning(
    linger: Linger, own: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A busy process took the CPU for its time slice in the yield: a request that came meanwhile waited for it,
    so the next waits spin (they catch a client on the other CPU) instead of yielding to it again."""
    yields = []

    def busy_process_runs_in_the_yield() -> None:
        yields.append(1)
        own[1].send(b"x")
        time.sleep(0.002)

    monkeypatch.setattr(linger_module.os, "sched_yield", busy_process_runs_in_the_yield)
    for _ in range(linger_module.MISSES):
        wait_for_a_late_request(linger, own)
    wait_for_a_request(linger, own)
    assert len(yields) == 1
    wait_for_a_late_request(linger, own)
    assert len(yields) == 1


def test_a_client_in_a_request_loop_holds_up_nothing(daemon_factory: Callable[..., Daemon]) -> None:
    """While one connection claims as fast as it can (the reactor lingers between its requests), HTTP answers,
    a lease runs out on time and the waiter behind it gets the lock."""
    busy = daemon_factory(PORT_DADDY_IPC_RATE="0")
    stop = threading.Event()
    claims = 0

    def claim_loop() -> None:
        nonlocal claims
        with busy.client() as c:
            while not stop.is_set():
                c.request("port.claim", {"id": "busy:api"})
                claims += 1

    looper = threading.Thread(target=claim_loop)
    looper.start()
    try:
        with unix_client(busy) as http:
            for _ in range(20):
                assert http.get("/health").json()["status"] == "ok"
        busy.call("lock.acquire", name="linger:x", owner="short", ttl=200)
        with busy.client() as c:
            got = c.request("lock.acquire", {"name": "linger:x", "owner": "next", "wait": True, "timeout": "10s"},
                            timeout=15)  # fmt: skip
        assert got["owner"] == "next"
    finally:
        stop.set()
        looper.join()
    assert claims > 100
