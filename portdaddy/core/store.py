"""The daemon's store: one apsw connection, WAL, explicit ``BEGIN IMMEDIATE`` writes, migrations.

Durability: WAL with ``synchronous=NORMAL`` makes a committed transaction survive the death of the process
(SIGKILL) — the WAL frames are in the OS before COMMIT returns; only an OS crash or power loss can drop the
last transactions. Callers reply "done" only after ``write()`` has returned.

Migrations are ``migrations/NNN_name.sql`` files in this package, applied in order; ``PRAGMA user_version``
holds the highest number applied. A migration runs in the same transaction as its version bump. A new
migration therefore takes the next number after the highest one on main when it lands: a lower number would
never run on a database that is already past it.

Storage failures (spec/decisions.md, "Storage failures"): every write goes through ``write()``, which turns
what the disk or another process does to the store (a held write lock, a full disk, a read-only file system,
a file deleted under the daemon, an I/O error) into one ``StoreError`` saying what is wrong and what to do, and
never commits a transaction that met one. The daemon is one thread: a write must not wait long for a lock
another process holds, or every client waits with it.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import apsw
import trio

from portdaddy.errors import StoreError

log = logging.getLogger("portdaddy.store")

_MIGRATION_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")

# How long a write waits for a write lock another process holds. Only the daemon writes its store, so the
# lock is someone's `sqlite3` shell or a tool with a write transaction open: a short wait lets a quick one (a
# checkpoint, a one-line UPDATE) finish, a long one would stall every client of the single-threaded daemon.
# WAL readers never take it, and our own checkpoints are PASSIVE, so readers cost no wait either.
BUSY_TIMEOUT_MS = 100
# A background task (write-behind, expiry, the reaper) whose write the store refused tries again this much later.
RETRY_S = 1.0
# How often a write looks whether the store's files are still the ones it writes (a stat and a readlink: ~5 µs,
# a tenth of a lock grant's SQL, so not every write). Writes in the moment after a deletion are lost with the
# rest of the file (a deleted write-ahead log: saved, see _gone).
FILE_CHECK_S = 0.5
# The first byte of SQLite's WAL locks in the -shm file is the write lock (WAL_WRITE_LOCK, os_unix.c).
_WAL_WRITE_LOCK_BYTE = "120"


def migrations() -> list[tuple[int, str, str]]:
    """(number, file name, sql) for every packaged migration, in order."""
    found = []
    for entry in resources.files("portdaddy.core").joinpath("migrations").iterdir():
        m = _MIGRATION_NAME.match(entry.name)
        if m:
            found.append((int(m.group(1)), entry.name, entry.read_text()))
    found.sort()
    numbers = [n for n, _, _ in found]
    if len(set(numbers)) != len(numbers):
        raise RuntimeError(f"two migrations share a number: {[name for _, name, _ in found]}")
    return found


def lock_holder(db_path: str) -> tuple[int, str] | None:
    """(pid, program) of another process holding the write lock of the WAL database at ``db_path``, read from
    /proc/locks (Linux); None where that cannot be told."""
    files: dict[str, str | None] = {}  # "maj:min:inode" as /proc/locks writes it -> the byte locked, or any
    for path, byte in ((f"{db_path}-shm", _WAL_WRITE_LOCK_BYTE), (db_path, None)):
        try:
            st = os.stat(path)
        except OSError:
            continue
        files[f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"] = byte
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        # "4: POSIX  ADVISORY  WRITE 7342 fe:00:2146398 120 120"; a waiter's line has "->" after the number
        parts = line.split()
        if len(parts) != 8 or parts[3] != "WRITE" or parts[5] not in files:
            continue
        byte, pid = files[parts[5]], int(parts[4]) if parts[4].isdigit() else -1
        if pid > 0 and pid != os.getpid() and (byte is None or parts[6] == byte):
            try:
                with open(f"/proc/{pid}/comm") as f:
                    return pid, f.read().strip()
            except OSError:
                return pid, "?"
    return None


class Store:
    """Narrow interface over the connection so another backend could stand in later."""

    def __init__(self, path: Path | str, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self.path = str(path)
        self.busy_timeout_ms = busy_timeout_ms
        self._depth = 0
        self._after_commit: list[Callable[[], None]] = []
        self._undo: list[Callable[[], None]] = []  # see on_rollback
        self._contended = False  # a write found the lock held by another process: the next ones do not wait
        self._spoiled: StoreError | None = None  # a failure met inside the open transaction (it must not commit)
        self.failure: StoreError | None = None  # why the last write failed, until one succeeds
        self.failed_since: int | None = None  # ms since the epoch
        # Changes nobody was promised (fire-and-forget frames, activity rows) dropped because the store refused
        # them, by what they were, since the daemon started (spec/decisions.md, "Storage failures").
        self.dropped: dict[str, int] = {}
        self._dropping: set[str] = set()  # what the log said is being dropped, since writes began to be refused
        self.db = apsw.Connection(self.path)
        try:
            self.db.set_busy_timeout(busy_timeout_ms)
            self.db.pragma("journal_mode", "wal")
            self.db.pragma("synchronous", "NORMAL")
            self.db.pragma("foreign_keys", True)
        except apsw.Error as e:
            # On a read-only file system SQLite cannot make the -wal and -shm files: it says "unable to open".
            failure = self._read_only() if _unwritable(self.path) else self._storage_failure(e)
            raise self._failed(failure or StoreError("STORE_FAILED", f"cannot open the store {path}: {e}")) from e
        if self.db.readonly("main"):
            raise self._failed(self._read_only())
        self._file = _file_id(self.path)  # the file this connection writes: writes check it is still there
        self._file_checked = time.monotonic()
        self.migrate()
        self._wal = os.path.realpath(self.path) + "-wal"  # as /proc names the write-ahead log SQLite has open
        self._wal_fd = _open_fd(self._wal)  # None where that cannot be told (not Linux): not checked
        self._wal_lost: StoreError | None = None  # the log was deleted: for good, as for the main file

    # -- schema ------------------------------------------------------------------------------------------

    @property
    def user_version(self) -> int:
        return int(self.db.pragma("user_version"))

    def migrate(self) -> list[str]:
        """Apply every migration newer than ``user_version``; returns the names applied."""
        applied = []
        current = self.user_version
        for number, name, sql in migrations():
            if number <= current:
                continue
            with self.write():
                self.db.execute(sql)
                self.db.pragma("user_version", number)
            applied.append(name)
        return applied

    # -- access ------------------------------------------------------------------------------------------

    @contextmanager
    def write(self) -> Iterator[apsw.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction; nested uses join the outer one. A storage failure anywhere in it
        (even one the body caught, such as an observer's) rolls it all back and raises a ``StoreError``."""
        if self._depth:
            self._depth += 1
            try:
                yield self.db
            except apsw.Error as e:
                if self._spoiled is None:
                    self._spoiled = self._storage_failure(e)
                if self._spoiled is not None and not self.db.in_transaction:
                    # SQLite rolled the whole transaction back (a full disk, an I/O error): what the outer body still
                    # does, if it goes on, must not be committed statement by statement.
                    with suppress(apsw.Error):
                        self.db.execute("BEGIN")
                raise
            finally:
                self._depth -= 1
            return
        self._begin()
        self._depth = 1
        try:
            yield self.db
            if self._spoiled is not None:
                raise self._spoiled
            self.db.execute("COMMIT")
        except BaseException as e:
            self._after_commit.clear()
            failure = self._spoiled or (self._storage_failure(e) if isinstance(e, apsw.Error) else None)
            self._rollback()
            undo, self._undo = self._undo, []
            for fn in reversed(undo):
                fn()
            if failure is not None:
                raise self._failed(failure) from (None if e is failure else e)
            raise
        finally:
            self._depth = 0
            self._spoiled = None
            self._undo.clear()
        if self.failure is not None:
            self._recovered()
        callbacks, self._after_commit = self._after_commit, []
        for fn in callbacks:
            fn()

    def _begin(self) -> None:
        """Open the write transaction, or raise a StoreError saying why the store cannot take one."""
        # Once a file was found gone, every write looks again (a stat and a readlink, on the refusing path only):
        # a write let through until the next look would be acknowledged into a deleted file, lost at the next start.
        gone_before = self.failure is not None and self.failure.code == "STORE_GONE"
        if gone_before or time.monotonic() - self._file_checked >= FILE_CHECK_S:
            gone = self._gone()
            if gone is not None:
                raise self._failed(gone)
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except apsw.Error as e:
            failure = self._storage_failure(e)
            if failure is None:
                raise
            if failure.code == "STORE_LOCKED" and not self._contended:
                self._contended = True  # waited once; until the lock is free again, fail at once
                self.db.set_busy_timeout(0)
            raise self._failed(failure) from e
        if self._contended:
            self._contended = False
            self.db.set_busy_timeout(self.busy_timeout_ms)

    def _gone(self) -> StoreError | None:
        """STORE_GONE if a file this connection writes is not the store's any more: the main file at its path, or
        the write-ahead log SQLite has open (Linux: /proc/self/fd; it is never reopened while the connection is)."""
        self._file_checked = time.monotonic()
        if _file_id(self.path) not in (self._file, None):
            return StoreError("STORE_GONE", f"the store {self.path} was deleted or replaced while the daemon ran, so "
                              "nothing more can be saved; restart the daemon (pd stop && pd start) to use the file "
                              "now there")  # fmt: skip
        if self._wal_fd is None or self._wal_lost is not None:
            return None if self._wal_lost is None else _again(self._wal_lost)
        try:
            target = os.readlink(f"/proc/self/fd/{self._wal_fd}")
        except OSError:
            target = None
        if target == self._wal:
            return None
        if target != f"{self._wal} (deleted)":  # not the log's descriptor any more: find it again
            self._wal_fd = _open_fd(self._wal)
            return None
        # Commits since the last checkpoint are only in the deleted log, which a crash or the next start would
        # lose: copy them into the main file now, while the open descriptor still reads them.
        try:
            in_log, copied = self.db.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
            saved = in_log == copied
        except apsw.Error:
            saved = False
        then = ("what it held was saved into the store; restart the daemon (pd stop && pd start)" if saved else
                "stop the daemon cleanly (pd stop saves what it held into the store), then pd start")  # fmt: skip
        self._wal_lost = StoreError("STORE_GONE", f"the store's write-ahead log {self.path}-wal was deleted while the "
                                    f"daemon ran, so nothing more can be saved; {then}")  # fmt: skip
        return _again(self._wal_lost)

    def _rollback(self) -> None:
        if self.db.in_transaction:  # a failed COMMIT may leave the transaction open (SQLITE_BUSY) or not
            try:
                self.db.execute("ROLLBACK")
            except apsw.Error as e:  # SQLite rolls back by itself when it cannot go on (a full disk, I/O)
                log.warning("rolling back a failed write failed too: %s", e)

    def _storage_failure(self, e: apsw.Error) -> StoreError | None:
        """What the disk or another process did to a write, said for the user; None for a bug (SQL, constraint)."""
        path = self.path
        os_errno = self.db.system_errno
        if isinstance(e, (apsw.BusyError, apsw.LockedError)):
            holder = lock_holder(path)
            who = (f"{holder[1]}, pid {holder[0]}" if holder
                   else "a sqlite3 shell or a backup tool, with a write transaction open")  # fmt: skip
            return StoreError("STORE_LOCKED", f"the store {path} is locked by another process ({who}); end its "
                              "transaction or close it, then try again",
                              **({"holderPid": holder[0]} if holder else {}))  # fmt: skip
        if isinstance(e, apsw.FullError) or os_errno in (errno.ENOSPC, errno.EDQUOT):
            return StoreError("STORE_FULL", f"the disk holding the store {path} is full; free some space, then try "
                              "again")  # fmt: skip
        if isinstance(e, apsw.ReadOnlyError) or os_errno == errno.EROFS:
            return StoreError("STORE_READONLY", f"the store {path} cannot be written: its file system is read-only "
                              "(remounted so after a disk error? dmesg says why); make it writable again, then restart "
                              "the daemon")  # fmt: skip
        if isinstance(e, (apsw.IOError, apsw.CantOpenError, apsw.CorruptError, apsw.NotADBError)):
            why = f"{e}: {os.strerror(os_errno)}" if os_errno else str(e)
            return StoreError("STORE_FAILED", f"the store {path} could not be written ({why}); check the disk "
                              "(dmesg) and the file, then restart the daemon")  # fmt: skip
        return None

    def _read_only(self) -> StoreError:
        return StoreError(
            "STORE_READONLY",
            f"the store {self.path} can only be opened read-only (its mode, or a "
            "read-only file system); make it writable (chmod u+w), or point PORT_DADDY_DB elsewhere",
        )

    def _failed(self, failure: StoreError) -> StoreError:
        """Remember why writes fail (pd status shows it); log when that begins or changes, not every write."""
        if self.failure is None or self.failure.code != failure.code:
            log.warning("writes refused: %s", failure.message)
            self.failed_since = int(time.time() * 1000)
        self.failure = failure
        return failure

    def _recovered(self) -> None:
        log.info("the store takes writes again")
        self.failure = self.failed_since = None
        self._dropping.clear()

    def refusal(self) -> StoreError:
        """Why writes are refused now (``failure``), as a new error to raise where no write is tried."""
        assert self.failure is not None, "refusal() belongs where the store refuses writes"
        return _again(self.failure)

    def drop(self, what: str, n: int = 1) -> None:
        """Count ``n`` changes of kind ``what`` nobody was promised, dropped because the store refuses writes and
        memory will not hold more of them; the log says so once per kind while writes are refused."""
        self.dropped[what] = self.dropped.get(what, 0) + n
        if what not in self._dropping:
            self._dropping.add(what)
            log.warning("writes refused: %s are being dropped (pd status counts them)", what)

    def probe(self) -> None:
        """Raise the StoreError a write would meet now, as far as can be told without writing (a lock another
        process holds, a deleted file), without waiting: for what cannot be undone (stopping a process) before the
        write that records it. A full or read-only disk shows only when written to."""
        if self._depth:
            return
        self._file_checked = -math.inf  # look at the file now
        self.db.set_busy_timeout(0)
        try:
            self._begin()
            self.db.execute("ROLLBACK")  # an empty transaction: it only proved the lock could be taken
        finally:
            self.db.set_busy_timeout(0 if self._contended else self.busy_timeout_ms)
        if self.failure is not None and self.failure.code in ("STORE_LOCKED", "STORE_GONE"):
            self._recovered()

    def health(self) -> dict[str, Any]:
        """For ``pd status``: ``{"ok": true}``, or what stops writes now (``error``, ``message``, ``since``). A
        lock another process holds and a deleted file are looked for now; a full or read-only disk is the last
        write's failure, until a write succeeds. ``dropped``, once anything was: what ``drop()`` counted."""
        with suppress(StoreError):
            self.probe()
        dropped = {"dropped": dict(self.dropped)} if self.dropped else {}
        if self.failure is None:
            return {"ok": True, **dropped}
        return {"ok": False, "error": self.failure.code, "message": self.failure.message, "since": self.failed_since,
                **self.failure.extra, **dropped}  # fmt: skip

    @property
    def writing(self) -> bool:
        """Whether a write transaction is open (what is done now commits, or not, with it)."""
        return self._depth > 0

    def after_commit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the open transaction has committed, never if it rolls back; outside a write, at once
        (what it follows is on disk already). For memory that must not run ahead of the disk (see the
        fencing-token reservation in locks.py), and for what a change tells others: events (``EventBus.emit``)
        and the daemon's own channel messages (``App.publish``)."""
        if self._depth:
            self._after_commit.append(fn)
        else:
            fn()

    def on_rollback(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` if the open transaction rolls back; outside a write, never. For memory that a later step of
        the same write must already see (an agent ``pd begin`` registers, then starts a session of): changed at
        once, and changed back by ``fn`` if the write is refused."""
        if self._depth:
            self._undo.append(fn)

    async def background(self, write: Callable[[], Any]) -> bool:
        """A background task's write: True once done. False if the store refused it (``failure`` says why, and
        the log said so once), after RETRY_S, so that a task trying again at once does not spin."""
        try:
            write()
        except StoreError:
            await trio.sleep(RETRY_S)
            return False
        return True

    @contextmanager
    def unless_refused(self, what: str) -> Iterator[None]:
        """For a write nobody waits for that has no later attempt (a fleet trigger, a run's bookkeeping): a
        StoreError is logged, as ``what`` not done, and swallowed, so that the task doing it goes on."""
        try:
            yield
        except StoreError as e:
            log.warning("%s: not done: %s", what, e.message)

    def execute(self, sql: str, args: Sequence[Any] | dict[str, Any] = ()) -> apsw.Cursor:
        return self.db.execute(sql, args)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.db.executemany(sql, rows)

    def all(self, sql: str, args: Sequence[Any] | dict[str, Any] = ()) -> list[tuple[Any, ...]]:
        return self.db.execute(sql, args).fetchall()

    def one(self, sql: str, args: Sequence[Any] | dict[str, Any] = ()) -> tuple[Any, ...] | None:
        return self.db.execute(sql, args).fetchone()

    def scalar(self, sql: str, args: Sequence[Any] | dict[str, Any] = ()) -> Any:
        row = self.db.execute(sql, args).fetchone()
        return None if row is None else row[0]

    def integrity_check(self) -> str:
        return str(self.db.pragma("integrity_check"))

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close (clean shutdown). A checkpoint the store refuses (a
        lock held by another process, a full disk) is left to the next start, which finds the WAL as it is."""
        try:
            self.db.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE)
        except apsw.Error as e:
            log.warning("the store was closed without its checkpoint (%s); the next start replays the WAL", e)
        finally:
            self.db.close()


def _unwritable(path: str) -> bool:
    """Whether the daemon may not write the file at ``path`` (or, if there is none, create one beside it)."""
    return not os.access(path if os.path.exists(path) else os.path.dirname(path) or ".", os.W_OK)


def _again(error: StoreError) -> StoreError:
    """``error`` to raise once more, as a new exception: one raised again keeps the traceback of every earlier
    raise, and with it the frames (and their payloads) of every call it refused, for as long as writes are."""
    return StoreError(error.code, error.message, **error.extra)


def _open_fd(path: str) -> int | None:
    """The descriptor this process has open on ``path`` (Linux: /proc/self/fd), or None."""
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return None
    for fd in fds:
        with suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == path:
                return int(fd)
    return None


def _file_id(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``; (0, 0) if there is none; None if that cannot be told (a
    directory on the way that the daemon may not search)."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return (0, 0)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class Reserved:
    """Numbers handed out from memory (fencing tokens, message ids) whose durable mark is written once per
    ``block``: a write that uses a number above the mark calls ``cover(db)`` to raise it in the same
    transaction, and memory trusts the new mark only once that has committed. After a restart numbers resume
    above the mark: a gap, never a number handed out twice."""

    def __init__(self, store: Store, mark: int, block: int, write_mark: Callable[[Any, int], None]) -> None:
        self.store = store
        self.block = block
        self._write_mark = write_mark
        self.mark = mark  # the highest number durably reserved
        self.last = mark  # the highest number handed out

    def take(self) -> int:
        self.last += 1
        return self.last

    @property
    def exhausted(self) -> bool:
        """The next number needs a new block reserved on disk."""
        return self.last >= self.mark

    @property
    def covered(self) -> bool:
        """Every number handed out is below the durable mark."""
        return self.last <= self.mark

    def cover(self, db: Any) -> None:
        """Inside an open write: raise the durable mark past ``last`` if it is not already."""
        if self.last > self.mark:
            top = self.last + self.block - 1
            self._write_mark(db, top)
            self.store.after_commit(partial(self._raised, top))

    def _raised(self, top: int) -> None:
        self.mark = max(self.mark, top)


def autoincrement_ids(store: Store, table: str, block: int) -> Reserved:
    """Ids for an AUTOINCREMENT table handed out from memory, its ``sqlite_sequence`` row the durable mark. An
    insert below the mark leaves that row alone, so most inserts write one page fewer. Insert the rows before
    ``cover(db)``: the first insert is what creates the row the mark updates."""

    def write_mark(db: Any, top: int) -> None:
        db.execute("UPDATE sqlite_sequence SET seq=? WHERE name=?", (top, table))

    mark = store.scalar("SELECT seq FROM sqlite_sequence WHERE name=?", (table,)) or 0
    return Reserved(store, mark, block, write_mark)
