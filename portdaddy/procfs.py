"""What Linux's /proc says of a process: its state, parent, group and start time. Standard library only, since
the CLI reads it as well as the daemon; where /proc cannot tell, callers get an ``OSError`` or None."""

from __future__ import annotations

import os

# A process that has exited but is not yet reaped (a zombie) still has an entry, and still takes signals.
GONE_STATES = ("Z", "X")


def stat_fields(pid: int | str) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` from the state on: state, ppid, pgrp, …, the start time (field 22 of
    proc(5)) at index 19. The command name before them may hold spaces and ')'. OSError when there is no such
    process."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return stat[stat.rindex(")") + 2 :].split()


def state(pid: int) -> str:
    """``pid``'s state letter: R, S, T (stopped), Z (exited, not reaped)…; "" if there is no such process; "?"
    where /proc cannot tell (another system: callers take it as alive)."""
    try:
        return stat_fields(pid)[0]
    except FileNotFoundError:
        return ""
    except (OSError, ValueError, IndexError):
        return "?"


def alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited: a zombie (in a container whose init does not reap, for
    good) still takes signals, yet is as gone as one that no longer exists."""
    return state(pid) not in ("", *GONE_STATES)


def start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` in clock ticks since boot; None when it is gone or a zombie."""
    try:
        fields = stat_fields(pid)
    except OSError:
        return None
    return None if fields[0] in GONE_STATES else int(fields[19])


def seconds_running(pid: int) -> float | None:
    """How long ``pid`` has been running; None when it is gone or /proc cannot tell."""
    started = start_time(pid)
    try:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return None if started is None else uptime - started / os.sysconf("SC_CLK_TCK")
