"""Child processes in their own process group: start with output to a log file, stop with SIGTERM then SIGKILL.

Each run is a session leader (``start_new_session``), so its group id is its pid and one ``killpg`` reaches
every process it started (a shell's children, a CLI's workers). Output goes straight to the run's log file,
not through a pipe, so a child never blocks on a full pipe and does not die of SIGPIPE if the daemon does.
After a daemon SIGKILL, ``pid`` + the kernel's start time (``/proc/<pid>/stat`` field 22) tell an orphan of
ours from an unrelated process that reused the pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
from contextlib import suppress
from pathlib import Path

import trio

_POLL_S = 0.05


async def start(argv: list[str], *, cwd: str, env: dict[str, str], log_path: Path,
                umask: int | None = None) -> trio.Process:  # fmt: skip
    """Start ``argv`` with its output appended to ``log_path``; ``umask`` None keeps this process's."""
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        return await trio.lowlevel.open_process(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, umask=-1 if umask is None else umask,
        )  # fmt: skip


def start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` in clock ticks; None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and ')'
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to a process group; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # the pid was reused by someone else's session: not ours to signal
    return True


def group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in the group."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with suppress(OSError, ValueError, IndexError):
            stat = Path(entry.path, "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                return True
    return False


async def stop(proc: trio.Process, grace_s: float) -> None:
    """SIGTERM the run's group, wait up to ``grace_s`` for the leader, then SIGKILL whatever is left."""
    if proc.returncode is None:
        signal_group(proc.pid, signal.SIGTERM)
        with trio.move_on_after(grace_s):
            await proc.wait()
    sweep(proc.pid)
    if proc.returncode is None:
        await proc.wait()


def sweep(pgid: int) -> None:
    """SIGKILL what is left of a group whose leader has exited (or is being killed): no strays survive a run."""
    signal_group(pgid, signal.SIGKILL)


async def stop_orphan(pid: int, pid_start: int | None, grace_s: float) -> bool:
    """Stop the group of a run left behind by a daemon that died; False when it was already gone."""
    if pid_start is None or start_time(pid) != pid_start:
        return False  # gone, or the pid now belongs to an unrelated process
    signal_group(pid, signal.SIGTERM)
    with trio.move_on_after(grace_s):
        while group_alive(pid):
            await trio.sleep(_POLL_S)
    sweep(pid)
    return True
