"""The daemon's SQLite store: one apsw connection, WAL, explicit ``BEGIN IMMEDIATE`` writes, migrations.

Durability: WAL with ``synchronous=NORMAL`` makes a committed transaction survive the death of the process
(SIGKILL) — the WAL frames are in the OS before COMMIT returns; only an OS crash or power loss can drop the
last transactions. Callers reply "done" only after ``write()`` has returned.

Migrations are ``migrations/NNN_name.sql`` files in this package, applied in order; ``PRAGMA user_version``
holds the highest number applied. A migration runs in the same transaction as its version bump. A new
migration therefore takes the next number after the highest one on main when it lands: a lower number would
never run on a database that is already past it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import apsw

_MIGRATION_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


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


class Store:
    """Narrow interface over the connection so another backend could stand in later."""

    def __init__(self, path: Path | str, *, busy_timeout_ms: int = 5000) -> None:
        self.path = str(path)
        self.db = apsw.Connection(self.path)
        self.db.set_busy_timeout(busy_timeout_ms)
        self.db.pragma("journal_mode", "wal")
        self.db.pragma("synchronous", "NORMAL")
        self.db.pragma("foreign_keys", True)
        self._depth = 0
        self._after_commit: list[Callable[[], None]] = []
        self.migrate()

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
        """A ``BEGIN IMMEDIATE`` transaction; nested uses join the outer one."""
        if self._depth:
            self._depth += 1
            try:
                yield self.db
            finally:
                self._depth -= 1
            return
        self.db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException:
            self._after_commit.clear()
            if self.db.in_transaction:  # a failed COMMIT may leave the transaction open (SQLITE_BUSY) or not
                self.db.execute("ROLLBACK")
            raise
        finally:
            self._depth = 0
        callbacks, self._after_commit = self._after_commit, []
        for fn in callbacks:
            fn()

    def after_commit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the open transaction has committed; never if it rolls back. For memory that must not
        run ahead of the disk (see the fencing-token reservation in locks.py)."""
        assert self._depth, "after_commit() belongs inside write()"
        self._after_commit.append(fn)

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
        """Checkpoint the WAL into the main file and close (clean shutdown)."""
        try:
            self.db.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE)
        finally:
            self.db.close()


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
