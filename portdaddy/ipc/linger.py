"""Waiting for the next request outside trio's scheduler, while trio has nothing else to do.

A client in a request loop sends its next request a few µs after it reads a reply. Going back to trio to wait
for it costs a scheduler pass: an ``epoll_ctl`` to re-arm the server's epoll fd (trio registers EPOLLONESHOT),
trio's ``epoll_wait``, its event and deadline processing, and resuming the reactor task. Instead the reactor
polls its own epoll fd and trio's: anything a trio task waits for (a socket, a thread's ``run_sync_soon``, a
signal's wake-up fd) makes trio's epoll fd readable and ends the wait. It waits so only while no trio task is
runnable, never past trio's next deadline, and at most ``STREAK_S`` after the reactor's last pass through
trio: tasks that trio woke in the same batch as the reactor are in no queue it can see, and they run at the
latest then.

Before it blocks it spins for up to ``SPIN_S``. A client on another CPU sends its next request within that
time, and the daemon's CPU has not gone idle in between: waking an idle CPU costs tens of µs on a virtual
machine. A client on the same CPU usually preempts the daemon as the reply wakes it, so its request is there
when the spin looks. A claim round trip went from 60 to 23 µs unpinned and from 41 to 34 µs with client and
daemon pinned to one CPU (spec/performance.md). The spin does not yield the CPU: a yield hands it to whatever
else runs there for the rest of that process's time slice, and with a busy process on the daemon's CPU a
request that came meanwhile waited ~4 ms (p90; 60 µs without the spin, 40 µs with it, measured). It costs at
most ``SPIN_S`` of CPU each time requests stop.

It reads three attributes of trio's runner that are not public API (``runq``, ``deadlines``, the epoll
manager's ``_epoll``); on a trio without them ``Linger.start`` returns None and the reactor always waits
through trio (tests/test_ipc_linger.py then fails, so an upgrade does not lose this unnoticed).
"""

from __future__ import annotations

import select
import time
from typing import Any

import trio

STREAK_S = 0.002
SPIN_S = 50e-6

_IN = select.POLLIN


class Linger:
    def __init__(self, own_fd: int, runner: Any) -> None:
        self._own_fd = own_fd
        self._runq = runner.runq
        self._next_deadline = runner.deadlines.next_deadline
        self._poll = select.poll()
        self._poll.register(own_fd, _IN)
        self._poll.register(runner.io_manager._epoll.fileno(), _IN)
        self._until = 0.0  # trio time when the streak ends

    @classmethod
    def start(cls, own_fd: int) -> Linger | None:
        """A Linger for the reactor's epoll fd, or None where trio's runner is not the one this was built for."""
        try:
            from trio._core._run import GLOBAL_RUN_CONTEXT

            return cls(own_fd, GLOBAL_RUN_CONTEXT.runner)
        except (ImportError, AttributeError):
            return None

    def passed_through_trio(self) -> None:
        """Every task trio had to run has had its turn: a new streak begins."""
        self._until = trio.current_time() + STREAK_S

    def wait(self) -> bool:
        """Wait until the own fd is readable. True when it alone became readable; False when the caller must
        go through trio (a task is runnable, a deadline or the streak's end comes first, or trio has I/O)."""
        if self._runq:
            return False
        timeout_ms = int((min(self._until, self._next_deadline()) - trio.current_time()) * 1000)
        if timeout_ms <= 0:
            return False
        poll = self._poll.poll
        spin_until = time.perf_counter() + SPIN_S
        ready = poll(0)
        while not ready and time.perf_counter() < spin_until:
            ready = poll(0)
        if not ready:
            ready = poll(timeout_ms)
        return len(ready) == 1 and ready[0][0] == self._own_fd
