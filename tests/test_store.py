"""The store's transaction helper: nesting, rollback, and callbacks that must not run ahead of the disk."""

from __future__ import annotations

import os
import time
from pathlib import Path

import apsw
import pytest
from conftest import traceback_frames

from portdaddy.core.store import FILE_CHECK_S, Reserved, Store, autoincrement_ids, migrations
from portdaddy.errors import StoreError


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "portdaddy.db")
    s.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
    s.execute("CREATE TABLE child (pid INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)")
    return s


def test_after_commit_runs_once_after_the_outermost_commit(store: Store) -> None:
    ran: list[bool] = []
    with store.write() as db:
        with store.write():
            store.after_commit(lambda: ran.append(store.db.in_transaction))
        assert ran == []  # leaving the inner block commits nothing
        db.execute("INSERT INTO parent VALUES (1)")
    assert ran == [False]  # after COMMIT, outside any transaction
    with store.write():
        pass
    assert ran == [False]


def test_rollback_drops_the_callbacks_and_the_writes(store: Store) -> None:
    ran: list[int] = []
    with pytest.raises(ValueError), store.write() as db:
        db.execute("INSERT INTO parent VALUES (1)")
        store.after_commit(lambda: ran.append(1))
        raise ValueError
    assert ran == [] and store.scalar("SELECT count(*) FROM parent") == 0


def test_on_rollback_undoes_memory_of_a_refused_write_only(store: Store) -> None:
    memory = {"agent": "old"}
    store.on_rollback(lambda: memory.update(agent="never"))  # outside a write: nothing to undo, ever
    with store.write():
        memory["agent"] = "new"
        store.on_rollback(lambda: memory.update(agent="old"))
    assert memory == {"agent": "new"}
    with pytest.raises(ValueError), store.write():
        with store.write():
            memory["agent"] = "newer"
            store.on_rollback(lambda: memory.update(agent="new"))
        raise ValueError
    assert memory == {"agent": "new"}
    store.after_commit(lambda: memory.update(agent="now"))  # outside a write: at once
    assert memory == {"agent": "now"}


def test_a_failed_commit_rolls_back_and_the_store_stays_usable(store: Store) -> None:
    ran: list[int] = []
    # A deferred foreign key fails at COMMIT, which leaves SQLite's transaction open unless we roll it back.
    with pytest.raises(apsw.ConstraintError), store.write() as db:
        db.execute("INSERT INTO child VALUES (42)")
        store.after_commit(lambda: ran.append(1))
    assert ran == [] and not store.db.in_transaction
    with store.write() as db:
        db.execute("INSERT INTO parent VALUES (42)")
        db.execute("INSERT INTO child VALUES (42)")
    assert store.scalar("SELECT count(*) FROM child") == 1


def test_reserved_numbers_raise_the_mark_once_per_block_and_only_when_committed(store: Store) -> None:
    store.execute("CREATE TABLE mark (top INTEGER)")
    store.execute("INSERT INTO mark VALUES (0)")
    written: list[int] = []

    def write_mark(db, top: int) -> None:
        written.append(top)
        db.execute("UPDATE mark SET top = ?", (top,))

    numbers = Reserved(store, store.scalar("SELECT top FROM mark"), 4, write_mark)
    with pytest.raises(RuntimeError), store.write() as db:
        assert numbers.take() == 1
        numbers.cover(db)
        raise RuntimeError("the write fails")
    assert numbers.mark == 0 and store.scalar("SELECT top FROM mark") == 0  # rolled back: not trusted
    got = []
    for _ in range(6):
        got.append(numbers.take())
        with store.write() as db:
            numbers.cover(db)
        assert numbers.covered
    assert got == [2, 3, 4, 5, 6, 7]  # 1 went out once; never again
    assert written == [4, 5, 9]  # one mark per block once committed (the failed write's 4 did not count)
    again = Reserved(store, store.scalar("SELECT top FROM mark"), 4, write_mark)  # a restart
    assert again.take() == 10


def _database_before(path: Path, migration: int) -> apsw.Connection:
    """A database as a daemon from before ``migration`` left it."""
    db = apsw.Connection(str(path))
    for number, _name, sql in migrations():
        if number < migration:
            with db:
                db.execute(sql)
                db.pragma("user_version", number)
    return db


def test_locks_move_to_a_table_keyed_by_name_and_keep_their_rows(tmp_path: Path) -> None:
    """Migration 009 rebuilds ``locks`` WITHOUT ROWID (one page per acquire or release instead of two)."""
    path = tmp_path / "portdaddy.db"
    db = _database_before(path, 9)
    row = ("deploy", "agent-a", 7, 123, 1000, 2000, 1, '{"why":"release"}')
    db.execute("INSERT INTO locks (name, owner, token, pid, acquired_at, expires_at, conn_bound, metadata) "
               "VALUES (?,?,?,?,?,?,?,?)", row)  # fmt: skip
    db.close()
    store = Store(path)
    assert store.user_version >= 9
    columns = "name, owner, token, pid, acquired_at, expires_at, conn_bound, metadata"
    assert store.all(f"SELECT {columns} FROM locks") == [row]
    assert "WITHOUT ROWID" in store.scalar("SELECT sql FROM sqlite_schema WHERE name = 'locks'")
    with pytest.raises(apsw.ConstraintError), store.write() as w:  # the name is still the key
        w.execute("INSERT INTO locks (name, owner, token, acquired_at, expires_at) VALUES ('deploy','b',8,1,2)")
    assert store.integrity_check() == "ok"


def test_stored_sessions_are_a_fleet_runs_only_when_the_fleets_own_run_row_says_so(tmp_path: Path) -> None:
    """Migration 020: the views fold a fleet agent's ended runs by ``sessions.fleet_agent``, which only the fleet
    writes. A stored session gets it when a fleet run's row names it as its session, not for metadata that a
    client could have sent (spec/journal.md, "Fleet runs in the views")."""
    path = tmp_path / "portdaddy.db"
    db = _database_before(path, 20)
    for run_id, kind, agent, session in (("fleet-tick-1", "fleet", "tick", "session-run"),
                                         ("spawned-1", "spawn", "spawn", "session-spawn")):  # fmt: skip
        db.execute("INSERT INTO fleet_runs (id, kind, project_dir, agent, identity, backend, spec, status, session_id, "
                   "created_at) VALUES (?, ?, '/p', ?, 'p:x', 'custom', '{}', 'completed', ?, 1)",
                   (run_id, kind, agent, session))  # fmt: skip
    for sid, agent, kind in (("session-run", "fleet-tick-1", "fleet"), ("session-forged", "fleet-tick-2", "fleet"),
                             ("session-spawn", "spawned-1", "spawn")):  # fmt: skip
        metadata = f'{{"kind": "{kind}", "runId": "{agent}", "agent": "tick"}}'
        db.execute("INSERT INTO sessions (id, purpose, status, agent_id, worktree, created_at, updated_at, metadata, "
                   "wrapped_key, head_hash) VALUES (?, 'p', 'completed', ?, '/p', 1, 1, ?, x'00', '')",
                   (sid, agent, metadata))  # fmt: skip
    db.close()
    store = Store(path)
    assert dict(store.all("SELECT id, fleet_agent FROM sessions")) == {
        "session-run": "tick", "session-forged": None, "session-spawn": None}  # fmt: skip
    store.close()


def test_autoincrement_ids_reserve_a_block_in_sqlite_sequence(store: Store) -> None:
    store.execute("CREATE TABLE items (id INTEGER PRIMARY KEY AUTOINCREMENT, v TEXT)")
    ids = autoincrement_ids(store, "items", 8)
    taken = []
    for n in range(10):
        taken.append(ids.take())
        with store.write() as db:
            db.execute("INSERT INTO items (id, v) VALUES (?, ?)", (taken[-1], str(n)))
            ids.cover(db)
        assert ids.covered
        seq = store.scalar("SELECT seq FROM sqlite_sequence WHERE name='items'")
        assert seq == (8 if n < 8 else 16)  # raised once per block; inserts below it leave it alone
    assert taken == list(range(1, 11))
    store.execute("DELETE FROM items")
    again = autoincrement_ids(store, "items", 8)  # a restart: above every id reserved, taken or not
    assert again.take() == 17


def test_migrations_leave_no_gap_a_database_could_skip() -> None:
    """A database is at the number of the last migration it applied and applies only higher ones: a migration
    later put in a gap below that number would never run on it. 002 and 003 went before any database kept them."""
    numbers = [number for number, _name, _sql in migrations()]
    assert numbers == [1, *range(4, numbers[-1] + 1)], numbers


def test_a_storage_failure_met_inside_a_transaction_never_commits_it(store: Store) -> None:
    """A nested write that meets a full disk, whose error the body catches (as EventBus.emit does an
    observer's): the transaction around it must still roll back, and say why, rather than commit half of it."""
    store.execute("CREATE TABLE big (v TEXT)")
    store.db.pragma("max_page_count", store.db.pragma("page_count") + 2)  # a disk with two pages left
    with pytest.raises(StoreError) as refused, store.write() as db:
        db.execute("INSERT INTO parent VALUES (1)")
        try:
            with store.write() as inner:
                inner.execute("INSERT INTO big VALUES (?)", ("x" * 100_000,))
        except apsw.FullError:
            pass  # swallowed
        db.execute("INSERT INTO parent VALUES (3)")  # and the operation goes on
    assert refused.value.code == "STORE_FULL" and store.failure is refused.value
    assert store.scalar("SELECT count(*) FROM parent") == 0 and not store.db.in_transaction
    store.db.pragma("max_page_count", 1_000_000)  # space again
    with store.write() as db:
        db.execute("INSERT INTO parent VALUES (2)")
    assert store.failure is None and store.health() == {"ok": True}


def test_a_write_ahead_log_deleted_refuses_every_write_and_keeps_nothing_of_the_refused_ones(store: Store) -> None:
    """The deleted log's refusal was one exception raised again for every write, keeping every earlier raise's
    traceback (and the frames of every refused call) while the daemon ran on."""
    os.unlink(store.path + "-wal")
    time.sleep(FILE_CHECK_S)  # writes look at the files that often
    frames = []
    for n in range(20):
        with pytest.raises(StoreError) as refused, store.write() as db:
            db.execute("INSERT INTO parent VALUES (?)", (n,))
        assert refused.value.code == "STORE_GONE"
        frames.append(traceback_frames(refused.value))
    assert len(set(frames)) == 1, frames
