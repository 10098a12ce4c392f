"""The store's write-ahead log is copied into its main file from a worker thread, not in the commit that fills it
(core/checkpointer.py), and the log stays short under churn without losing anything acknowledged."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import apsw
import trio
from conftest import Daemon, make_env

from portdaddy.config import Settings
from portdaddy.core.app import App
from portdaddy.core.checkpointer import CHECKPOINT_PAGES, Checkpointer
from portdaddy.core.store import RETRY_S, Store
from portdaddy.errors import PDError
from tests.swarm_app import make_app
from tests.test_storage_failures import _mount

_FILL = "INSERT INTO activity (timestamp, type, agent_id, target_id, details, metadata) VALUES (?,?,?,?,?,?)"


def _fill(app: App) -> None:
    """One commit of ~1,650 pages (6.8 MB): past the mark."""
    with app.store.write() as db:
        db.executemany(_FILL, [(i, "test.fill", None, None, None, "x" * 3000) for i in range(1500)])


def _copies(checkpointer: Checkpointer, monkeypatch) -> list[bool]:
    """For each copy the checkpointer makes from now on, in order: whether it ran on the reactor's thread."""
    on_main_thread: list[bool] = []
    copy = checkpointer._copy

    def spy(db: apsw.Connection) -> bool:
        on_main_thread.append(threading.current_thread() is threading.main_thread())
        return copy(db)

    monkeypatch.setattr(checkpointer, "_copy", spy)
    return on_main_thread


async def _until(check: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not check():
            await trio.sleep(0.01)


async def test_a_long_log_is_copied_from_a_worker_thread_and_then_starts_over(tmp_path: Path, monkeypatch) -> None:
    app = make_app(tmp_path)
    checkpointer = Checkpointer(app)
    on_main_thread = _copies(checkpointer, monkeypatch)
    db = app.store.db
    async with trio.open_nursery() as nursery:
        await nursery.start(checkpointer.run)
        assert db.pragma("wal_autocheckpoint") == 0  # SQLite's own, in the commit, is off
        _fill(app)
        await _until(lambda: checkpointer.done > 0)
        nursery.cancel_scope.cancel()
    # The bulk was copied off the reactor, the rest on it (here nothing was committed in between).
    assert on_main_thread == [False, True] and checkpointer.stats() == {"storeCheckpoints": 1}
    assert db.pragma("wal_autocheckpoint") == CHECKPOINT_PAGES  # stopped: SQLite's own is back
    # Copied to its end, the log starts over at the next commit instead of growing past its 1,650 pages.
    with app.store.write():
        db.execute(_FILL, (0, "test.small", None, None, None, "{}"))
    in_log, _ = db.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
    assert 0 < in_log < 10
    app.store.close()


async def test_a_checkpoint_the_disk_refuses_is_said_once_and_tried_again_after_a_pause(
    tmp_home: Path, caplog, monkeypatch
) -> None:
    """The log fits on the disk, the copy of it into the main file does not: the store goes on taking writes,
    the log says why once, and the checkpoint is made when there is room (not on the reactor meanwhile)."""
    disk = tmp_home / "disk"
    disk.mkdir()
    _mount(disk, "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs")
    try:
        room = disk / "room"
        room.write_bytes(bytes(5_000_000))  # the log fits beside it; a copy of the log as well does not
        app = App(Settings.from_env({"PORT_DADDY_HOME": str(tmp_home)}), Store(disk / "portdaddy.db"))
        checkpointer = Checkpointer(app)
        on_main_thread = _copies(checkpointer, monkeypatch)
        async with trio.open_nursery() as nursery:
            await nursery.start(checkpointer.run)
            _fill(app)
            await _until(lambda: "could not be copied" in caplog.text)
            room.unlink()
            await trio.sleep(RETRY_S)
            with app.store.write() as db:  # the next commit past the mark wakes it again
                db.execute(_FILL, (0, "test.small", None, None, None, "{}"))
            await _until(lambda: checkpointer.done > 0)
            nursery.cancel_scope.cancel()
        assert caplog.text.count("could not be copied") == 1 and checkpointer.done == 1
        assert on_main_thread == [False, False, True]  # the refused copy was not tried again on the reactor
        app.store.close()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_under_lock_churn_the_log_stays_short_and_acknowledged_claims_survive_sigkill(tmp_home: Path) -> None:
    """Six connections' lock cycles fill the log with activity rows (a checkpoint every few hundred ms) while
    a seventh claims ports; the daemon is killed with SIGKILL in the middle of it."""
    d = Daemon(tmp_home, make_env(tmp_home, PORT_DADDY_IPC_RATE="0")).start()  # churn as fast as it goes
    wal = Path(f"{d.settings.db}-wal")
    stop = threading.Event()

    def churn(i: int) -> None:
        try:
            with d.client() as c:
                while not stop.is_set():
                    token = c.request("lock.acquire", {"name": f"churn{i}", "owner": f"o{i}"})["token"]
                    c.request("lock.release", {"name": f"churn{i}", "token": token})
        except PDError:  # the daemon was killed
            pass

    workers = [threading.Thread(target=churn, args=(i,)) for i in range(6)]
    claimed: dict[str, int] = {}
    longest = 0
    try:
        for w in workers:
            w.start()
        with d.client() as c:
            deadline = time.monotonic() + 60
            while c.request("daemon.status")["counts"]["storeCheckpoints"] < 3:
                assert time.monotonic() < deadline, "no checkpoints under churn"
                for _ in range(20):
                    sid = f"ckpt:svc:{len(claimed)}"
                    claimed[sid] = c.request("port.claim", {"id": sid})["port"]
                longest = max(longest, os.path.getsize(wal))
        d.kill9()
        stop.set()
        for w in workers:
            w.join(timeout=30)
        # SQLite's own mark, and what a checkpoint's time lets in: a log never copied to its end would grow past it.
        assert 0 < longest < 3 * CHECKPOINT_PAGES * (4096 + 24)
        d.start()
        with d.client() as c:
            lost = {sid for sid, port in claimed.items()
                    if c.request("port.get", {"id": sid})["service"]["port"] != port}  # fmt: skip
        assert not lost, f"{len(lost)} of {len(claimed)} acknowledged claims lost"
    finally:
        stop.set()
        d.stop()
