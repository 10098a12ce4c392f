"""Copying the store's write-ahead log into its main file (a checkpoint) off the reactor.

SQLite checkpoints inside the commit that takes its log past 1,000 pages: under churn, a few ms of the reactor's
time every fraction of a second, in which no client of the daemon is answered (spec/performance.md). Here such a
commit wakes a task that checkpoints from a worker thread, on a connection of its own: apsw lets go of the GIL
while SQLite copies, and the reactor goes on serving. What was committed while it copied is still only in the
log, and a log never copied to its end never starts over: it would grow for as long as the churn lasts. So that
rest, a few pages, is copied on the reactor at once after.

Durability is SQLite's, as before: a checkpoint copies what has committed; until then the log holds it.
"""

from __future__ import annotations

import logging
from typing import Any

import apsw
import trio

from portdaddy.core.store import RETRY_S

log = logging.getLogger("portdaddy.store")

CHECKPOINT_PAGES = 1000  # SQLite's own mark (PRAGMA wal_autocheckpoint)


class Checkpointer:
    name = "checkpointer"

    def __init__(self, app: Any) -> None:
        self.store = app.store
        self.done = 0
        self._asleep: trio.CancelScope | None = None  # the task's wait while the log is short
        self._failing = False  # the log said checkpoints fail; it says so again only after one succeeded

    def stats(self) -> dict[str, Any]:
        return {"storeCheckpoints": self.done}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        db = self.store.db
        try:
            own = apsw.Connection(self.store.path)
            own.pragma("journal_mode")  # reads the header: a new connection knows the log is in use only then
        except apsw.Error as e:
            log.warning("checkpoints stay in the commits that call for them (no second connection: %s)", e)
            task_status.started()
            return
        db.set_wal_hook(self._committed)  # in place of SQLite's checkpoint in the commit
        try:
            task_status.started()
            while True:
                with trio.CancelScope() as self._asleep:
                    await trio.sleep_forever()
                self._asleep = None
                if not await trio.to_thread.run_sync(self._copy, own):
                    await trio.sleep(RETRY_S)  # not one try per commit while SQLite refuses
                    continue
                # What was committed meanwhile; only after the thread's copy, as all of it on the reactor is the
                # stall this task takes away.
                self._copy(db)
                self.done += 1
        finally:
            self._asleep = None
            db.set_wal_hook(None)
            db.wal_autocheckpoint(CHECKPOINT_PAGES)
            own.close()

    def _committed(self, db: apsw.Connection, name: str, pages: int) -> int:
        """SQLite's call after each commit: ``pages`` are in the log now."""
        if pages >= CHECKPOINT_PAGES and self._asleep is not None:
            self._asleep.cancel()
        return apsw.SQLITE_OK

    def _copy(self, db: apsw.Connection) -> bool:
        """A passive checkpoint: it copies what it can, waiting for nobody. False if SQLite refused it."""
        try:
            db.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
        except apsw.BusyError:
            return False  # another process checkpoints (a sqlite3 shell): the log is being copied anyway
        except apsw.Error as e:
            if not self._failing:
                self._failing = True
                log.warning("the store's write-ahead log could not be copied into %s (%s); it grows until it can",
                            self.store.path, e)  # fmt: skip
            return False
        self._failing = False
        return True
