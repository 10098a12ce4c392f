"""The store's write-ahead log is copied into its main file from a worker thread, not in the commit that fills it
(core/checkpointer.py), and the log stays short under churn without losing anything acknowledged."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import apsw
import trio
from conftest import Daemon, make_env

from portdaddy.core.checkpointer import CHECKPOINT_PAGES, Checkpointer
from portdaddy.errors import PDError
from tests.swarm_app import make_app

_FILL = "INSERT INTO activity (timestamp, type, agent_id, target_id, details, metadata) VALUES (?,?,?,?,?,?)"


async def test_a_long_log_is_copied_from_a_worker_thread_and_then_starts_over(tmp_path: Path, monkeypatch) -> None:
    app = make_app(tmp_path)
    checkpointer = Checkpointer(app)
    on_main_thread = []
    copy = checkpointer._copy

    def spy(db: apsw.Connection) -> bool:
        on_main_thread.append(threading.current_thread() is threading.main_thread())
        return copy(db)

    monkeypatch.setattr(checkpointer, "_copy", spy)
    db = app.store.db
    async with trio.open_nursery() as nursery:
        await nursery.start(checkpointer.run)
        assert db.pragma("wal_autocheckpoint") == 0  # SQLite's own, in the commit, is off
        with app.store.write():
            db.executemany(_FILL, [(i, "test.fill", None, None, None, "x" * 3000) for i in range(1500)])
        with trio.fail_after(10):
            while not checkpointer.done:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    # The bulk was copied off the reactor, the rest on it (here nothing was committed in between).
    assert on_main_thread == [False, True] and checkpointer.stats() == {"storeCheckpoints": 1}
    assert db.pragma("wal_autocheckpoint") == CHECKPOINT_PAGES  # stopped: SQLite's own is back
    # Copied to its end, the log starts over at the next commit instead of growing past its 1,100 pages.
    with app.store.write():
        db.execute(_FILL, (0, "test.small", None, None, None, "{}"))
    in_log, _ = db.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
    assert 0 < in_log < 10
    app.store.close()


def test_under_lock_churn_the_log_stays_short_and_acknowledged_claims_survive_sigkill(tmp_home: Path) -> None:
    """Six connections' lock cycles fill the log with activity rows (a checkpoint every few hundred ms) while
    a seventh claims ports; the daemon is killed with SIGKILL in the middle of it."""
    d = Daemon(tmp_home, make_env(tmp_home, PORT_DADDY_IPC_RATE="0")).start()  # churn as fast as it goes
    try:
        _churn_claim_and_kill(d)
    finally:
        d.stop()


def _churn_claim_and_kill(d: Daemon) -> None:
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
    for w in workers:
        w.start()
    claimed: dict[str, int] = {}
    longest = 0
    try:
        with d.client() as c:
            deadline = time.monotonic() + 60
            while c.request("daemon.status")["counts"]["storeCheckpoints"] < 3:
                assert time.monotonic() < deadline, "no checkpoints under churn"
                for _ in range(20):
                    sid = f"ckpt:svc:{len(claimed)}"
                    claimed[sid] = c.request("port.claim", {"id": sid})["port"]
                longest = max(longest, os.path.getsize(wal))
        d.kill9()
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=30)
    # SQLite's own mark, and what a checkpoint's time lets in: a log never copied to its end would grow past it.
    assert 0 < longest < 3 * CHECKPOINT_PAGES * (4096 + 24)
    d.start()
    with d.client() as c:
        lost = {sid for sid, port in claimed.items() if c.request("port.get", {"id": sid})["service"]["port"] != port}
    assert not lost, f"{len(lost)} of {len(claimed)} acknowledged claims lost"
