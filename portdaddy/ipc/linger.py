"""Waiting for the next request outside trio's scheduler, while trio has nothing else to do.

A client in a request loop sends its next request a few µs after it reads a reply. Going back to trio to wait
for it costs a scheduler pass: an ``epoll_ctl`` to re-arm the server's epoll fd (trio registers EPOLLONESHOT),
trio's ``epoll_wait``, its event and deadline processing, and resuming the reactor task. Instead the reactor
looks at its own epoll, and sleeps in a poll of its epoll fd and trio's: anything a trio task waits for (a
socket, a thread's ``run_sync_soon``, a signal's wake-up fd) makes trio's epoll fd readable and ends the sleep.
It waits so only while no trio task is runnable, never past trio's next deadline, and at most ``STREAK_S``
after the reactor's last pass through trio: tasks that trio woke in the same batch as the reactor are in no
queue it can see, and they run at the latest then. A look that finds sockets ready hands their events over
without a look at trio's epoll fd (a second syscall per request, ~1 µs): what trio waits for waits too, while
requests keep coming, for at most that streak.

Before it blocks it spins for up to ``SPIN_S``. A client on another CPU sends its next request within that
time, and the daemon's CPU has not gone idle in between: waking an idle CPU costs tens of µs on a virtual
machine. A claim round trip went from 60 to 23 µs unpinned (spec/performance.md). The spin does not yield the
CPU: a yield hands it to whatever else runs there for the rest of that process's time slice, and with a busy
process on the daemon's CPU a request that came meanwhile waited ~4 ms (p90; 60 µs without the spin, 40 µs
with it, measured).

A spin pays only while the request comes during it. A client on the daemon's own CPU (pinned there, or put
there by the kernel, which likes to keep two processes that wake each other together) cannot send while the
daemon spins: its request comes either before the spin (it preempted the daemon as the reply woke it) or only
once the daemon stops, and every spin was 50 µs lost, a fifth of all requests. After ``MISSES`` spins in a row
that caught nothing the linger yields the CPU once instead, which lets such a client run at once (a pinned
claim's p90 went from ~95 to ~46 µs, a lock cycle's p50 from ~140 to ~112 µs). It goes on yielding while the
request is there right after the yield; otherwise the client is elsewhere and it spins again. A yield that
took longer than a spin gave the CPU to some other busy process for its time slice, so it spins again then too:
with a busy process on the daemon's CPU, the spins catch the requests of a client on the other CPU.

It reads three attributes of trio's runner that are not public API (``runq``, ``deadlines``, the epoll
manager's ``_epoll``); on a trio without them ``Linger.start`` returns None and the reactor always waits
through trio (tests/test_ipc_linger.py then fails, so an upgrade does not lose this unnoticed).
"""

from __future__ import annotations

import os
import select
import time
from typing import Any

import trio

STREAK_S = 0.002
SPIN_S = 50e-6
MISSES = 4  # spins in a row that caught nothing, before the linger yields instead

_IN = select.POLLIN


Events = list[tuple[int, int]]


class Linger:
    def __init__(self, own: select.epoll, runner: Any) -> None:
        self._own_fd = own.fileno()
        self._look = own.poll  # the reactor's ready sockets, with a timeout of 0
        self._runq = runner.runq
        self._next_deadline = runner.deadlines.next_deadline
        self._poll = select.poll()
        self._poll.register(self._own_fd, _IN)
        self._poll.register(runner.io_manager._epoll.fileno(), _IN)
        self._until = 0.0  # trio time when the streak ends
        self._misses = 0  # spins in a row that caught nothing; MISSES while yielding instead

    @classmethod
    def start(cls, own: select.epoll) -> Linger | None:
        """A Linger for the reactor's epoll, or None where trio's runner is not the one this was built for."""
        try:
            from trio._core._run import GLOBAL_RUN_CONTEXT

            return cls(own, GLOBAL_RUN_CONTEXT.runner)
        except (ImportError, AttributeError):
            return None

    def passed_through_trio(self) -> None:
        """Every task trio had to run has had its turn: a new streak begins."""
        self._until = trio.current_time() + STREAK_S

    def wait(self) -> Events | None:
        """Wait for the own epoll's events and return them; None when the caller must go through trio (a task
        is runnable, a deadline or the streak's end comes first, or trio has I/O)."""
        if self._runq:
            return None
        timeout_ms = int((min(self._until, self._next_deadline()) - trio.current_time()) * 1000)
        if timeout_ms <= 0:
            return None
        if ready := self._look(0) or (self._yield() if self._misses >= MISSES else self._spin()):
            return ready
        woke = self._poll.poll(timeout_ms)
        if len(woke) == 1 and woke[0][0] == self._own_fd:
            return self._look(0) or None
        return None

    def _spin(self) -> Events:
        look, clock = self._look, time.perf_counter
        until = clock() + SPIN_S
        while clock() < until:
            if ready := look(0):
                self._misses = 0
                return ready
        self._misses += 1
        return []

    def _yield(self) -> Events:
        start = time.perf_counter()
        os.sched_yield()
        ready = self._look(0)
        if not ready or time.perf_counter() - start > SPIN_S:
            self._misses = 0
        return ready
