"""The lock journal (core/lockjournal.py): a lock held by name is kept by one append, folded into the store
within a second, and replayed at start, exactly, whatever the daemon died in the middle of."""

from __future__ import annotations

import os
import sqlite3
import struct
import time
from pathlib import Path
from typing import Any

from conftest import Daemon

from portdaddy.core import lockjournal
from portdaddy.core.lockjournal import LockJournal, journal_path, replay
from portdaddy.core.locks import FENCE_BLOCK
from tests.fleet_helpers import wait_for
from tests.test_storage_failures import refused, write_lock_held

Held = dict[str, tuple[str, int, int]]  # name: (owner, token, expiresAt)


def _journal(d: Daemon) -> Path:
    return Path(journal_path(str(d.settings.db)))


def _stored(d: Daemon) -> Held:
    """The store's locks table, read as another process would."""
    db = sqlite3.connect(d.settings.db)
    try:
        return {n: (o, t, e) for n, o, t, e in db.execute("SELECT name, owner, token, expires_at FROM locks")}
    finally:
        db.close()


def _held(d: Daemon) -> Held:
    return {lk["name"]: (lk["owner"], lk["token"], lk["expiresAt"]) for lk in d.call("lock.list")["locks"]}


def _warm(d: Daemon) -> int:
    """Reserve a block of tokens (a grant that needs one writes it to the store itself), and let it be folded:
    what follows goes to the journal. Returns the size of the journal's header."""
    header = _journal(d).stat().st_size  # a daemon starts its journal empty
    d.call("lock.release", name="warm", token=d.call("lock.acquire", name="warm")["token"])
    wait_for(lambda: "warm" not in _stored(d) and _journal(d).stat().st_size == header, timeout=10)
    return header


def test_named_locks_outlive_a_sigkill_before_their_fold(daemon_factory: Any) -> None:
    """Grants, extensions and releases answered in the second before the daemon is killed are in the journal
    only (the store still shows the state before them); the next start replays them exactly and folds them."""
    d = daemon_factory(PORT_DADDY_IPC_RATE="0")
    header = _warm(d)
    want: Held = {}
    with d.client() as c:
        for n in range(40):
            got = c.request("lock.acquire", {"name": f"j:{n}", "owner": f"o{n}", "ttl": "10m"})
            want[f"j:{n}"] = (f"o{n}", got["token"], got["expiresAt"])
        for n in range(0, 40, 3):
            c.request("lock.release", {"name": f"j:{n}", "owner": f"o{n}"})
            del want[f"j:{n}"]
        for n in range(1, 40, 3):
            got = c.request("lock.extend", {"name": f"j:{n}", "owner": f"o{n}", "ttl": "50m"})
            want[f"j:{n}"] = (f"o{n}", got["token"], got["expiresAt"])
        d.kill9()
    assert _journal(d).stat().st_size > header and _stored(d) != want
    d.start()
    assert _held(d) == want
    assert _stored(d) == want and _journal(d).stat().st_size == header  # folded at start
    assert d.call("lock.acquire", name="next", owner="x")["token"] > max(t for _, t, _ in want.values())


def test_the_journal_is_folded_into_the_store_soon_and_at_a_clean_stop(daemon_factory: Any) -> None:
    d = daemon_factory()
    header = _warm(d)
    got = d.call("lock.acquire", name="soon", owner="a", ttl="10m")
    wait_for(lambda: _stored(d) == {"soon": ("a", got["token"], got["expiresAt"])}, timeout=5)
    assert _journal(d).stat().st_size == header
    late = d.call("lock.acquire", name="late", owner="b", ttl="10m")
    assert d.stop() == 0
    assert _stored(d)["late"] == ("b", late["token"], late["expiresAt"])
    assert _journal(d).stat().st_size == header


def test_a_journal_cut_short_is_replayed_up_to_the_cut(daemon_factory: Any) -> None:
    d = daemon_factory()
    _warm(d)
    kept = d.call("lock.acquire", name="kept", owner="a", ttl="10m")
    d.kill9()
    with open(_journal(d), "ab") as f:  # a frame the daemon died writing: its length says more than there is
        f.write(struct.pack("<II", 64, 0) + b"\x93\x07")
    d.start()
    assert _held(d) == {"kept": ("a", kept["token"], kept["expiresAt"])}
    assert "ends with 10 bytes cut short" in d.log()
    assert "Traceback" not in d.log()


def test_a_journal_ending_in_zeros_is_replayed_up_to_them(daemon_factory: Any) -> None:
    """A file whose size grew before its data reached the disk (an OS crash; XFS, ext4 data=writeback) ends in
    zeros. Eight zero bytes are a frame of length 0 whose CRC-32 (that of no bytes) is 0: they passed the
    checks, failed to decode, and the daemon could not start until the journal was deleted by hand."""
    d = daemon_factory()
    _warm(d)
    kept = d.call("lock.acquire", name="kept", owner="a", ttl="10m")
    d.kill9()
    with open(_journal(d), "ab") as f:
        f.write(bytes(4096))
    d.start()
    assert _held(d) == {"kept": ("a", kept["token"], kept["expiresAt"])}
    assert "ends with 4096 bytes cut short" in d.log()
    assert "Traceback" not in d.log()


def test_the_journal_beside_a_deleted_store_is_not_replayed_into_a_new_one(daemon_factory: Any) -> None:
    d = daemon_factory()
    _warm(d)
    d.call("lock.acquire", name="old", owner="a")
    d.kill9()
    assert _journal(d).stat().st_size > 0
    for suffix in ("", "-wal", "-shm"):
        Path(f"{d.settings.db}{suffix}").unlink(missing_ok=True)
    d.start()
    assert _held(d) == {}
    assert "belongs to another store; ignored" in d.log()


def test_a_journal_deleted_under_the_daemon_is_started_again_and_loses_nothing(daemon_factory: Any) -> None:
    d = daemon_factory()
    _warm(d)
    want: Held = {}
    for name in ("before", "after", "later"):
        got = d.call("lock.acquire", name=name, owner="a", ttl="10m")
        want[name] = ("a", got["token"], got["expiresAt"])
        if name == "before":
            _journal(d).unlink()
            time.sleep(lockjournal.CHECK_S + 0.1)  # the next append looks whether its file is still there
    assert _journal(d).exists()
    d.kill9()
    d.start()
    assert _held(d) == want


def test_a_journal_found_deleted_takes_no_more_appends_even_if_the_store_refused_the_change(
    daemon_factory: Any,
) -> None:
    """An append that finds its file deleted sends the change to the store, whose fold starts a new journal. If
    the store refused that change, the journal forgot what it had found: once the store took writes again, the
    next appends within CHECK_S went into the deleted file, acknowledged, and a SIGKILL lost them."""
    d = daemon_factory()
    _warm(d)
    _journal(d).unlink()
    time.sleep(lockjournal.CHECK_S + 0.1)
    with write_lock_held(d):  # the append looks at its file, which is gone: the change goes to the store
        assert refused(d.call, "lock.acquire", name="first", owner="a").code == "STORE_LOCKED"
    d.call("port.claim", id="app:api")  # the store takes writes again
    got = d.call("lock.acquire", name="second", owner="a", ttl="10m")  # well within CHECK_S of that look
    d.kill9()
    d.start()
    assert _held(d) == {"second": ("a", got["token"], got["expiresAt"])}


# -- the file format, without a daemon -----------------------------------------------------------------------


def test_replay_takes_every_whole_frame_and_stops_at_any_cut(tmp_path: Path) -> None:
    path = str(tmp_path / "portdaddy.db-locks")
    journal = LockJournal.start(path, "store-1")
    assert journal is not None
    records = [(1, "a", ["o", 1, None, 10, 20, None]), (2, "b", ["p", 2, 7, 11, 21, '{"k":1}']), (3, "a", None)]
    ends = [os.path.getsize(path)]
    for seq, name, row in records:
        assert journal.append(seq, name, row)
        ends.append(os.path.getsize(path))
    journal.close()
    whole = Path(path).read_bytes()
    for cut in range(ends[0], len(whole) + 1):
        Path(path).write_bytes(whole[:cut])
        complete = sum(end <= cut for end in ends[1:])
        assert replay(path, "store-1", 0) == records[:complete], cut
    assert replay(path, "store-1", 2) == records[2:]  # what the store has folded is not replayed again
    assert replay(path, "store-2", 0) == []
    assert replay(str(tmp_path / "none"), "store-1", 0) == []


def test_an_append_is_refused_once_its_file_is_not_the_journal(tmp_path: Path) -> None:
    path = str(tmp_path / "portdaddy.db-locks")
    journal = LockJournal.start(path, "s")
    assert journal is not None
    assert journal.append(1, "a", None)
    os.unlink(path)
    journal._checked = -1e9  # as if CHECK_S had passed
    assert not journal.append(2, "a", None)
    assert not journal.empty()
    journal.close()


def test_tokens_go_on_above_what_the_journal_replays_over_a_store_restored_from_a_backup(
    daemon_factory: Any,
) -> None:
    """A store put back from a backup holds an older reservation of tokens; grants its journal replays may be
    above it. The next token is above every one replayed, never one handed out already."""
    d = daemon_factory(PORT_DADDY_IPC_RATE="0")
    _warm(d)
    assert d.stop() == 0
    backup = Path(d.settings.db).read_bytes()
    d.start()
    with d.client() as c:
        for _ in range(FENCE_BLOCK + 10):  # past the backup's reservation: a new block is reserved
            c.request("lock.release", {"name": "churn", "token": c.request("lock.acquire", {"name": "churn"})["token"]})
        top = c.request("lock.acquire", {"name": "kept", "owner": "a", "ttl": "10m"})["token"]
        d.kill9()
    Path(d.settings.db).write_bytes(backup)
    for suffix in ("-wal", "-shm"):
        Path(f"{d.settings.db}{suffix}").unlink(missing_ok=True)
    d.start()
    assert _held(d)["kept"][1] == top  # replayed from the journal
    assert d.call("lock.acquire", name="next", owner="b")["token"] > top
