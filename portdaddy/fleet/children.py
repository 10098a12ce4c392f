"""Child processes in their own process group: start with output to a log file, stop with SIGTERM then SIGKILL.

Each run is a session leader (``start_new_session``), so its group id is its pid and one ``killpg`` reaches
every process it started (a shell's children, a CLI's workers). Output goes straight to the run's log file,
not through a pipe, so a child never blocks on a full pipe and does not die of SIGPIPE if the daemon does.
After a daemon SIGKILL, ``pid`` + the kernel's start time (``/proc/<pid>/stat`` field 22) tell an orphan of
ours from an unrelated process that reused the pid; and since every child carries its run's id in its
environment (``PD_RUN_ID``), the orphans of a run whose pid was never saved (the daemon died as it started the
child) are found by that.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

import trio

from portdaddy.procfs import GONE_STATES, start_time, stat_fields

_POLL_S = 0.05


async def start(argv: list[str], *, cwd: str, env: dict[str, str], log_path: Path, umask: int | None = None,
                stdin: bytes | None = None) -> trio.Process:  # fmt: skip
    """Start ``argv`` with its output appended to ``log_path``; ``umask`` None keeps this process's. ``stdin``: what
    the child reads on its standard input (else /dev/null).

    ``stdin`` is a file, not a pipe: written whole before the child starts, so the daemon never waits on a child
    that reads slowly or not at all. It has no name (O_TMPFILE, or unlinked at once; mode 0600, beside the log in
    the 0700 home): the child's descriptor is the one way in, and it is gone when the child exits, daemon or not."""
    with ExitStack() as files:
        log = files.enter_context(open(log_path, "ab"))  # the child keeps its own copy of each descriptor
        source: Any = subprocess.DEVNULL
        if stdin is not None:
            source = files.enter_context(tempfile.TemporaryFile(dir=log_path.parent))
            source.write(stdin)
            source.seek(0)
        return await trio.lowlevel.open_process(
            argv, cwd=cwd, env=env, stdin=source, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, umask=-1 if umask is None else umask,
        )  # fmt: skip


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
            fields = stat_fields(entry.name)
            if int(fields[2]) == pgid and fields[0] not in GONE_STATES:
                return True
    return False


def marked_groups(marker: str) -> set[int]:
    """The process groups of this user's live processes whose environment holds ``marker`` (``NAME=value``), never
    this process's own. A group is found by a live member, so its id cannot be one the kernel handed out again."""
    wanted, uid, own = marker.encode(), os.getuid(), os.getpgrp()
    groups = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with suppress(OSError, ValueError, IndexError):
            if entry.stat().st_uid != uid:
                continue  # another user's process: not ours to read or to stop
            if wanted not in Path(entry.path, "environ").read_bytes().split(b"\0"):
                continue
            fields = stat_fields(entry.name)
            if fields[0] not in GONE_STATES and int(fields[2]) != own:
                groups.add(int(fields[2]))
    return groups


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


async def stop_orphan(marker: str, pid: int | None, pid_start: int | None, grace_s: float) -> bool:
    """Stop what a run left behind when the daemon died under it: the group of its leader ``pid`` if that is still
    the process that started at ``pid_start`` (else it is gone, or the pid was reused), and the group of every
    process whose environment carries ``marker`` (its ``PD_RUN_ID=…``: when the daemon died as it started the
    run, no pid was saved). SIGTERM, ``grace_s``, then SIGKILL; False when nothing was left."""
    groups = marked_groups(marker)  # found and signalled in one go (no await between)
    if pid is not None and pid_start is not None and start_time(pid) == pid_start:
        groups.add(pid)
    for pgid in groups:
        signal_group(pgid, signal.SIGTERM)
    with trio.move_on_after(grace_s):
        while any(group_alive(pgid) for pgid in groups):
            await trio.sleep(_POLL_S)
    for pgid in groups:
        sweep(pgid)
    return bool(groups)
