"""The blocking client's poll before it sleeps (portdaddy/ipc/client.py ``Spin``): it polls only while that can
catch a reply, learns from how long replies take, and never where the daemon might need its CPU."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import PYTHON, Daemon

import portdaddy.sdk
from portdaddy.errors import PDError
from portdaddy.ipc.client import BlockingClient, Spin
from portdaddy.ipc.trio_client import _POLLER, _TrioSpin
from portdaddy.procfs import stat_fields
from tests.fleet_helpers import wait_for

SHORT, LONG = Spin.MAX_NS // 2, Spin.MAX_NS * 10


@pytest.fixture
def one_cpu() -> Iterator[None]:
    """This process restricted to one CPU, as `taskset -c 0` would start it."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs a machine with two CPUs")
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def time_out(c: BlockingClient, *, patient: bool = False) -> None:
    """A blocking take the daemon ends after 20 ms: a wait no poll catches."""
    with pytest.raises(PDError) as e:
        c.request("tuple.in", {"pattern": ["spin:none"], "wait": True, "timeout": "20ms"}, patient=patient)
    assert e.value.code == "TIMEOUT"


def stopped() -> Spin:
    spin = Spin()
    spin.waited(LONG)
    assert spin.budget_ns == 0
    return spin


def test_waits_a_longer_poll_would_catch_grow_the_budget_up_to_its_limit() -> None:
    spin = Spin()
    seen = []
    for _ in range(5):
        spin.waited(SHORT)
        seen.append(spin.budget_ns)
    assert seen == [2 * Spin.START_NS, 4 * Spin.START_NS, Spin.MAX_NS, Spin.MAX_NS, Spin.MAX_NS]


def test_waits_far_past_the_limit_halve_the_budget_down_to_no_polling() -> None:
    spin = Spin()
    spin.budget_ns = Spin.MAX_NS
    seen = []
    for _ in range(4):
        spin.waited(LONG)
        seen.append(spin.budget_ns)
    assert seen == [Spin.MAX_NS // 2, Spin.START_NS, 0, 0]


def test_a_client_that_stopped_polling_starts_again_only_after_a_run_of_short_waits() -> None:
    spin = stopped()
    for _ in range(Spin.RESUME_AFTER - 1):
        spin.waited(SHORT)
    spin.waited(LONG)  # the run is broken: it starts over
    for _ in range(Spin.RESUME_AFTER - 1):
        spin.waited(SHORT)
    assert spin.budget_ns == 0
    spin.waited(SHORT)
    assert spin.budget_ns == Spin.START_NS


def test_a_process_on_one_cpu_never_polls(one_cpu: None) -> None:
    assert Spin().usable() is None


def test_a_process_pinned_while_it_runs_stops_polling_within_a_bounded_number_of_waits() -> None:
    """The affinity is looked at every AFFINITY_EVERY waits, not every wait (a syscall per round trip)."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs a machine with two CPUs")
    spin = Spin()
    assert spin.usable() == Spin.START_NS
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        looks = [spin.usable() for _ in range(Spin.AFFINITY_EVERY + 1)]
    finally:
        os.sched_setaffinity(0, before)
    assert looks[-1] is None and all(looks[:-1])


def test_on_one_cpu_the_client_sleeps_at_once_and_learns_nothing(daemon: Daemon, one_cpu: None) -> None:
    with daemon.client() as c:
        for _ in range(3):
            time_out(c)
        assert c.request("port.claim", {"id": "spin:pinned"})["port"]
        assert c._spin.budget_ns == Spin.START_NS


def test_replies_that_take_long_stop_the_client_polling(daemon: Daemon) -> None:
    """Two waits no poll catches and the client sleeps at once, as it does beside many other clients."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs a machine with two CPUs")
    with daemon.client() as c:
        assert c._spin.usable() == Spin.START_NS
        for _ in range(2):
            time_out(c)
        assert c._spin.usable() == 0
        assert c.request("port.claim", {"id": "spin:after"})["port"]


def test_a_wait_the_caller_knows_is_long_neither_polls_nor_teaches_the_budget(daemon: Daemon) -> None:
    """Its length says how long the take waited, not how fast the daemon answers: the requests after it poll as
    before."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs a machine with two CPUs")
    with daemon.client() as c:
        for _ in range(2):
            time_out(c, patient=True)
        assert c._spin.usable() == Spin.START_NS
        assert c.receive(timeout=0.05, patient=True) is None  # nothing is pushed to a client that subscribed to nothing
        assert c._spin.usable() == Spin.START_NS


def voluntary_switches() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(line.split(":")[1]) for line in f if line.startswith("voluntary_ctxt_switches"))


def test_a_client_sharing_the_daemons_cpu_sleeps_once_per_request(daemon_factory: Callable[..., Daemon],
                                                                   one_cpu: None) -> None:  # fmt: skip
    """Its sleep is a poll for input: the daemon's read of the request, which frees its bytes and so wakes
    whoever sleeps on the socket to say it may send again, does not end it (a blocking recv woke, found
    nothing and slept again: 1.7 sleeps a request, measured)."""
    daemon = daemon_factory(PORT_DADDY_IPC_RATE="0")
    assert daemon.proc is not None
    before = os.sched_getaffinity(daemon.proc.pid)
    os.sched_setaffinity(daemon.proc.pid, os.sched_getaffinity(0))
    try:
        with daemon.client() as c:
            for _ in range(200):
                c.request("port.claim", {"id": "spin:api"})
            start = voluntary_switches()
            for _ in range(2000):
                c.request("port.claim", {"id": "spin:api"})
            sleeps = voluntary_switches() - start
    finally:
        os.sched_setaffinity(daemon.proc.pid, before)
    assert sleeps <= 2000 * 1.2, f"{sleeps / 2000:.2f} sleeps a request"


# pd as it runs, but with a client that would poll for up to 10 s before it sleeps: a wait that polls at all
# burns the whole time it waits, where the real budget (at most 100 µs a wake-up) is too small to measure.
_GREEDY_PD = ("import sys; from portdaddy.ipc import client; client.Spin.usable = lambda self: 10**10; "
              "from portdaddy.cli.entry import main; sys.argv[0] = 'pd'; main()")  # fmt: skip


def cpu_s(pid: int) -> float:
    """CPU time ``pid`` has used, user and system (proc(5) fields 14 and 15)."""
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize(("args", "waiting"), [
    (("sub", "idle:sub"), "printed"),  # a subscription's receive
    (("lock", "idle:lock1", "--wait"), "lockWaiters"),  # a request the daemon holds
    (("with-lock", "idle:lock2", "--wait", "--", "true"), "lockWaiters"),  # pd with-lock's own request
    (("tuple", "in", '["idle:none"]', "--wait", "--timeout", "1m"), "tupleWaiters"),
])  # fmt: skip
def test_a_pd_waiting_on_the_daemon_sleeps_without_polling(daemon: Daemon, args: tuple[str, ...],
                                                           waiting: str) -> None:  # fmt: skip
    """pd sub, a lock --wait, a blocking take wait seconds or days: a poll on each wake-up is CPU for nothing."""
    holder = daemon.client()
    if waiting == "printed":
        daemon.call("msg.publish", channel="idle:sub", payload="retained")
    elif waiting == "lockWaiters":
        holder.request("lock.acquire", {"name": args[1], "owner": "idle-holder", "connBound": True})
    before = daemon.call("daemon.status")["counts"]
    pd = subprocess.Popen([PYTHON, "-c", _GREEDY_PD, *args], env=daemon.env, cwd=daemon.workdir,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        if waiting == "printed":
            assert pd.stdout.readline() == "retained\n"
        else:
            wait_for(lambda: daemon.call("daemon.status")["counts"][waiting] > before[waiting], timeout=20,
                     what=f"pd {args[0]} to wait")  # fmt: skip
        start = cpu_s(pd.pid)
        time.sleep(2)
        used = cpu_s(pd.pid) - start
        assert pd.poll() is None, pd.communicate()
    finally:
        pd.kill()
        pd.communicate()
        holder.close()
    assert used < 0.5, f"pd {' '.join(args)} used {used:.2f} s of CPU in 2 s of waiting"


# -- the SDK's trio client polls the same way, in trio's hook before it sleeps for I/O ------------------------


def sdk(d: Daemon) -> Any:
    return portdaddy.sdk.connect(settings=d.settings, autostart=False)


async def test_an_sdk_request_finds_its_reply_awake(daemon_factory: Callable[..., Daemon],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Trio sleeps for I/O after each request is sent; the client polls for the reply first, so a reply that
    comes within the budget (here 10 ms, so that a loaded machine does not decide it) finds the process awake
    (each used to sleep at least once: 1.0 sleeps a request, measured)."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs a machine with two CPUs")
    monkeypatch.setattr(Spin, "usable", lambda self: 10_000_000)
    d = daemon_factory(PORT_DADDY_IPC_RATE="0")
    async with sdk(d) as pd:
        for _ in range(200):
            await pd.call("port.claim", id="spin:sdk")
        start = voluntary_switches()
        for _ in range(1000):
            await pd.call("port.claim", id="spin:sdk")
        sleeps = voluntary_switches() - start
    assert sleeps < 1000 * 0.5, f"{sleeps / 1000:.2f} sleeps a request"


async def test_sdk_replies_that_take_long_stop_it_polling(daemon: Daemon) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs a machine with two CPUs")
    async with sdk(daemon) as pd:
        spin = pd._client._spin
        assert spin.usable() == Spin.START_NS
        for _ in range(2):
            with pytest.raises(PDError) as e:
                await pd.call("tuple.in", pattern=["spin:none"], wait=True, timeout="20ms")
            assert e.value.code == "TIMEOUT"
        assert spin.usable() == 0
        assert (await pd.call("port.claim", id="spin:sdk-after"))["port"]


def test_the_sdk_counts_a_reply_woken_in_trio_as_short() -> None:
    """Its waits are timed when trio runs the reader, after the CPU woke: ~100-200 µs for a reply the daemon sent
    within the budget. Counted as long, the budget fell to nothing and never came back."""
    woken_in_trio = 2 * Spin.MAX_NS
    blocking, sdk_spin = Spin(), _TrioSpin()
    blocking.waited(woken_in_trio)
    sdk_spin.waited(woken_in_trio)
    assert blocking.budget_ns == 0 and sdk_spin.budget_ns == 2 * Spin.START_NS


async def test_the_sdk_hooks_trio_once_however_many_connections_a_run_has(daemon: Daemon) -> None:
    """Trio calls every instrument on every pass that may sleep: one per connection would cost a program with a
    hundred connections a hundred calls a pass."""
    async with sdk(daemon) as one, sdk(daemon) as two:
        poller = _POLLER.get()
        assert poller is not None and poller.clients == 2
        assert one._client._poller is poller is two._client._poller
        await one.call("port.claim", id="spin:one")
    assert _POLLER.get() is None
