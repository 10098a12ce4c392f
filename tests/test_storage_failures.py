"""What the daemon does when its store misbehaves under it (spec/decisions.md, "Storage failures").

Each case is real: a second SQLite connection holding the write lock, a small tmpfs filled to the last block,
an ext4 image whose kernel driver is told to remount it read-only (as after a disk error), the file or the
whole home deleted. A write the store cannot take is refused at once with one clear error and changes nothing,
memory included; reads go on being served; background tasks try again later instead of taking the daemon
down; and the daemon takes writes again once the condition is gone. The tests that mount a file system need
root, as here.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, make_env

from portdaddy.core.lockjournal import journal_path
from portdaddy.core.store import FILE_CHECK_S
from portdaddy.core.writebehind import MAX_PENDING_REFUSED
from portdaddy.errors import PDError
from tests.fleet_helpers import make_project, wait_for
from tests.test_durability import CASES, WORKTREE, Caller, State, daemon_after_deaths

# -- the conditions ------------------------------------------------------------------------------------------


@contextmanager
def write_lock_held(d: Daemon) -> Iterator[None]:
    """Another process's view of it: a connection with a write transaction open (this process holds the lock)."""
    db = sqlite3.connect(d.settings.db, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        yield
        db.execute("ROLLBACK")
    finally:
        db.close()


def _mount(target: Path, *args: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    done = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_home: Path) -> Iterator[Path]:
    """A 2 MB tmpfs for the store (and nothing else of the daemon's)."""
    mnt = tmp_home / "disk"
    mnt.mkdir()
    _mount(mnt, "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def ext4_disk(tmp_home: Path) -> Iterator[tuple[Path, Path]]:
    """An 8 MB ext4 image mounted ``errors=remount-ro``: (mount point, the driver's trigger_fs_error file)."""
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 is not installed")
    image, mnt = tmp_home / "disk.img", tmp_home / "disk"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True, capture_output=True)
    _mount(mnt, "-o", "loop,errors=remount-ro", str(image))
    try:
        dev = subprocess.run(["findmnt", "-no", "SOURCE", str(mnt)], capture_output=True, text=True).stdout.strip()
        trigger = Path("/sys/fs/ext4") / os.path.basename(dev) / "trigger_fs_error"
        if not trigger.exists():
            pytest.skip("this kernel's ext4 has no trigger_fs_error")
        yield mnt, trigger
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path) -> Path:
    """Take every free block of ``disk``; the file returned gives them back when deleted."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass
    assert os.statvfs(disk).f_bavail == 0
    return filler


# -- helpers -------------------------------------------------------------------------------------------------


def refused(call: Any, action: str, **args: Any) -> PDError:
    with pytest.raises(PDError) as e:
        call(action, **args)
    return e.value


def act(d: Daemon, case: Any, state: State) -> Any:
    """The case's operation (its arguments may name an ``agent``, so not through ``Caller``)."""
    agent, args = case.act(state)
    with d.client(agent) as c:
        return c.request(case.op, args, timeout=30)


def store_state(d: Daemon) -> dict[str, Any]:
    return d.call("daemon.status")["store"]


def alive(d: Daemon) -> bool:
    return d.proc is not None and d.proc.poll() is None


# -- another process holds the write lock --------------------------------------------------------------------


def test_a_write_lock_held_elsewhere_refuses_writes_at_once_and_reads_go_on(fresh_daemon: Daemon) -> None:
    d = fresh_daemon
    d.call("port.claim", id="app:api")
    d.call("agent.register", agentId="worker")
    with write_lock_held(d):
        started = time.monotonic()
        err = refused(d.call, "port.claim", id="app:web")
        assert err.code == "STORE_LOCKED" and err.extra["holderPid"] == os.getpid()
        assert err.message.startswith(f"the store {d.settings.db} is locked by another process (")
        assert f", pid {os.getpid()}); end its transaction or close it, then try again" in err.message
        for n in range(20):  # each refused without the wait: the daemon is not frozen for anyone
            assert refused(d.call, "lock.acquire", name=f"l{n}").code == "STORE_LOCKED"
        assert time.monotonic() - started < 1.5  # was 5 s a write, for every client
        # Reads, and a re-claim of what exists, are served.
        assert d.call("port.claim", id="app:api")["existing"] is True
        assert [s["id"] for s in d.call("port.find", pattern="*")["services"]] == ["app:api"]
        assert d.call("lock.list")["locks"] == [] and d.call("msg.history", channel=["x"])["messages"] == []
        state = store_state(d)
        assert state["ok"] is False and state["error"] == "STORE_LOCKED"
        out = d.pd("status")
        assert out.returncode == 0 and "warning:  writes are refused: the store" in out.stdout, out.stdout
        out = d.pd("claim", "app:db")
        assert out.returncode == 1 and out.stderr.count("\n") == 1 and "locked by another process" in out.stderr
        # Written behind meanwhile (fire-and-forget heartbeats, the re-claim's lastSeen, the activity log): the
        # flushes the store refuses are tried again later, and the daemon stays up.
        with d.client() as c:
            c.send("agent.heartbeat", {"agentId": "worker"})
        time.sleep(2.5)
        assert alive(d), d.log()[-2000:]
    assert store_state(d) == {"ok": True}
    assert d.call("port.claim", id="app:web")["existing"] is False
    assert "Traceback" not in d.log()
    d.restart()
    assert [s["id"] for s in d.call("port.find", pattern="*")["services"]] == ["app:api", "app:web"]


def test_the_daemon_does_not_start_on_a_store_another_process_holds(tmp_home: Path) -> None:
    d = Daemon(tmp_home, make_env(tmp_home)).start()
    d.stop()
    try:
        with write_lock_held(d):
            out = d.pd("start")
        assert out.returncode == 3 and "the daemon exited with status 1: the store" in out.stderr, out.stderr
        assert "is locked by another process" in out.stderr and "Traceback" not in d.log()
    finally:
        d.pd("stop")


# -- every write the store refuses changes nothing -----------------------------------------------------------


CLOCK = frozenset({"timeSinceHeartbeat", "graceRemaining", "duration", "uptime"})  # what time alone changes


def _steady(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _steady(v) for k, v in value.items() if k not in CLOCK}
    if isinstance(value, list):
        return [_steady(v) for v in value]
    return value


def _snapshot(call: Caller, states: list[State]) -> dict[str, Any]:
    """What the daemon says of everything the cases touch: memory, for the parts kept in memory."""
    harbors = [h["name"] for h in call("harbor.list", limit=200)["harbors"]]
    hooks = [h["id"] for h in call("webhook.list")["webhooks"]]
    channels = [c["channel"] for c in call("msg.channels")["channels"]]
    inboxes = sorted({args.get("to") or args.get("agentId") for case, s in zip(CASES, states, strict=True)
                      if case.op.startswith("inbox.") for args in [case.act(s)[1]]})  # fmt: skip
    said = {
        "services": call("port.find", pattern="*")["services"],
        "agents": call("agent.list")["agents"],
        "salvage": call("salvage.list", all=True)["agents"],
        "sessions": call("session.list", all=True, limit=1000)["sessions"],
        "notes": call("note.list", limit=1000)["notes"],
        "files": call("file.list")["claims"],
        "locks": call("lock.list")["locks"],
        "channels": call("msg.channels")["channels"],
        "history": call("msg.history", channel=channels, limit=1000)["messages"] if channels else [],
        "inboxes": [call("inbox.list", agentId=a)["messages"] for a in inboxes],
        "webhooks": [call("webhook.get", id=h)["webhook"] for h in hooks],
        "deliveries": [call("webhook.deliveries", id=h)["deliveries"] for h in hooks],
        "harbors": [call("harbor.members", name=h)["members"] for h in harbors],
        "tuples": [call("tuple.scan", harbor=h, limit=500)["tuples"] for h in [None, *harbors]],
        "pheromones": call("pheromone.list")["pheromones"],
        "heat": call("pheromone.files")["files"],
        "violations": call("arbiter.violations", limit=1000)["violations"],
        "fleets": call("fleet.status")["fleets"],
        "runs": call("spawn.list")["agents"],
    }
    return _steady(said)


def test_every_write_the_store_refuses_changes_nothing(tmp_home: Path) -> None:
    """Each acknowledged write of test_durability.py, made while another process holds the write lock, is
    refused with STORE_LOCKED (or the refusal it is there for) and leaves everything as it was; once the lock
    is let go, the same writes succeed."""
    d = daemon_after_deaths(tmp_home)
    try:
        call = Caller(d)
        (tmp_home / WORKTREE).mkdir()
        states = [{"k": f"c{n}", "home": tmp_home, "worktree": str(tmp_home / WORKTREE)} for n in range(len(CASES))]
        for case, state in zip(CASES, states, strict=True):
            if case.setup is not None:
                case.setup(call, state)
        before = _snapshot(call, states)
        wrong = []
        with write_lock_held(d):
            for case, state in zip(CASES, states, strict=True):
                try:
                    got = act(d, case, state)
                    wrong.append(f"{case.op} ({case.label}): done while the store was locked: {got!r}")
                except PDError as e:
                    if e.code != "STORE_LOCKED" and not case.refused:
                        wrong.append(f"{case.op} ({case.label}): {e!r}")
            after = _snapshot(call, states)
        assert not wrong, "\n".join(wrong)
        changed = {k: [(b, a) for b, a in zip(before[k], after[k], strict=False) if b != a] or (before[k], after[k])
                   for k in before if before[k] != after[k]}  # fmt: skip
        assert not changed, f"a refused write changed {sorted(changed)}: {changed}"
        assert alive(d)
        for case, state in zip(CASES, states, strict=True):
            try:
                result = act(d, case, state)
            except PDError as e:
                assert case.refused, f"{case.op} ({case.label}) refused once the lock was free: {e!r}"
                result = e
            case.check(call, state, result)
    finally:
        d.stop()


def test_locks_held_by_name_are_served_from_their_journal_until_the_store_is_known_to_refuse(
    fresh_daemon: Daemon,
) -> None:
    """A lock held by name goes to the lock journal, which another process's write lock does not stop: it is
    granted, and folded into the store once the lock is let go. Once a write has found the store refusing,
    such a change is written to the store itself, and refused with the rest."""
    d = fresh_daemon
    d.call("lock.release", name="warm", token=d.call("lock.acquire", name="warm")["token"])  # reserves tokens
    with write_lock_held(d):
        got = d.call("lock.acquire", name="deploy", owner="a", ttl="10m")
        assert refused(d.call, "port.claim", id="app:api").code == "STORE_LOCKED"
        assert refused(d.call, "lock.release", name="deploy", owner="a").code == "STORE_LOCKED"
        assert d.call("lock.get", name="deploy")["token"] == got["token"]
    db = sqlite3.connect(d.settings.db)
    try:
        wait_for(lambda: db.execute("SELECT owner, token FROM locks").fetchall() == [("a", got["token"])])
    finally:
        db.close()
    assert d.call("lock.release", name="deploy", owner="a")["released"]


def test_a_lock_whose_holder_left_while_writes_were_refused_is_released_once_they_are_taken(
    fresh_daemon: Daemon,
) -> None:
    """A connection-bound lock whose holder hangs up while another process holds the write lock cannot be
    released then; it was held until its lease ended (5 minutes by default). Nobody else may have it until its
    release is on disk, and then at once: the first waiter gets it without anyone asking again."""
    d = fresh_daemon
    holder = d.client("holder")
    first = holder.request("lock.acquire", {"name": "deploy", "connBound": True})
    holder.request("lock.acquire", {"name": "unwanted", "connBound": True})
    got: dict[str, Any] = {}

    def wait() -> None:
        with d.client("waiter") as c:
            got["lock"] = c.request("lock.acquire", {"name": "deploy", "wait": True, "timeout": "60s"}, timeout=70)

    waiter = threading.Thread(target=wait)
    waiter.start()
    deadline = time.monotonic() + 10
    while d.call("daemon.status")["counts"]["lockWaiters"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with write_lock_held(d):
        # Once the store has refused a write, a change to a lock held by name is written to it, not to the lock
        # journal: it is refused with the rest.
        assert refused(d.call, "port.claim", id="app:api").code == "STORE_LOCKED"
        holder.close()
        time.sleep(2.5)  # the daemon has tried the release, and tried again, and been refused
        assert refused(d.call, "lock.acquire", name="deploy", owner="thief").code == "STORE_LOCKED"
        assert d.call("lock.get", name="deploy")["owner"] == "holder" and "lock" not in got
    # Before the expiry task's next try (a second after its last), a listing tries first, as a lock.get does.
    assert "unwanted" not in [lk["name"] for lk in d.call("lock.list")["locks"]]
    waiter.join(timeout=10)
    assert got["lock"]["owner"] == "waiter" and got["lock"]["token"] > first["token"]
    db = sqlite3.connect(d.settings.db)
    try:
        assert db.execute("SELECT owner FROM locks WHERE name='deploy'").fetchall() == [("waiter",)]
    finally:
        db.close()
    assert "Traceback" not in d.log()


def test_a_connection_bound_lock_writes_nothing_so_it_is_served_while_writes_are_refused(
    fresh_daemon: Daemon,
) -> None:
    """A connection-bound lock ends with its connection, and the daemon's death ends every connection: the
    store has nothing to keep for it. Its grant, renewal and release need no write, so they are served while
    another process holds the write lock (a lock held by name is refused then, once the store is known to
    refuse writes), and no row of it is ever stored. A release that hands it to a waiter holding it by name
    stores the waiter's row."""
    d = fresh_daemon
    d.call("lock.release", name="plain", token=d.call("lock.acquire", name="plain")["token"])  # reserves tokens
    with d.client("holder") as holder:
        with write_lock_held(d):
            assert refused(d.call, "port.claim", id="app:api").code == "STORE_LOCKED"
            assert refused(d.call, "lock.acquire", name="plain").code == "STORE_LOCKED"
            first = holder.request("lock.acquire", {"name": "deploy", "connBound": True, "ttl": "1m"})
            again = holder.request("lock.acquire", {"name": "deploy", "connBound": True, "ttl": "10m"})
            assert again["existing"] and again["token"] == first["token"]
            assert again["expiresAt"] > first["expiresAt"]
            assert holder.request("lock.release", {"name": "deploy", "token": first["token"]})["released"]
            second = holder.request("lock.acquire", {"name": "deploy", "connBound": True})
            assert second["token"] > first["token"]
        db = sqlite3.connect(d.settings.db)
        try:
            assert db.execute("SELECT * FROM locks WHERE name='deploy'").fetchall() == []
        finally:
            db.close()
        got: dict[str, Any] = {}

        def wait() -> None:
            with d.client("waiter") as c:
                got["lock"] = c.request("lock.acquire", {"name": "deploy", "wait": True, "timeout": "20s"},
                                        timeout=30)  # fmt: skip

        waiter = threading.Thread(target=wait)
        waiter.start()
        wait_for(lambda: d.call("daemon.status")["counts"]["lockWaiters"] == 1)
    waiter.join(timeout=10)  # the holder hung up: the lock went to the waiter, by name
    assert got["lock"]["owner"] == "waiter" and not got["lock"]["connBound"]
    db = sqlite3.connect(d.settings.db)
    try:
        wait_for(lambda: db.execute("SELECT owner, token FROM locks").fetchall() == [("waiter", got["lock"]["token"])])
    finally:
        db.close()


def test_fire_and_forget_changes_wait_in_bounded_memory_while_writes_are_refused(tmp_home: Path) -> None:
    """Sprays to new entities and publishes, sent without a reply while the store refuses writes, waited in
    memory without bound. At most MAX_PENDING_REFUSED marks and the rest of the current block of message ids
    wait now; what comes past that is dropped and counted, and what waited is stored once the store takes it."""
    d = Daemon(tmp_home, make_env(tmp_home, PORT_DADDY_IPC_RATE="0")).start()
    try:
        d.call("msg.publish", channel="flood:0", payload={"n": -1})  # reserves the first block of ids
        sprays, publishes = MAX_PENDING_REFUSED + 200, 1500
        with write_lock_held(d):
            assert refused(d.call, "port.claim", id="app:web").code == "STORE_LOCKED"
            with d.client() as c:
                for n in range(sprays):
                    c.send("pheromone.spray", {"table": "files", "id": f"f{n}", "key": "edit", "strength": 1})
                for n in range(publishes):
                    c.send("msg.publish", {"channel": f"flood:{n % 4}", "payload": {"n": n}})
                c.request("daemon.health")  # every frame before it was handled
            dropped = store_state(d)["dropped"]
            assert dropped["sprays"] == 200 and 0 < dropped["messages"] < publishes
            out = d.pd("status").stdout
            assert (
                "warning:  dropped while writes were refused (fire-and-forget, never acknowledged): "
                f"{dropped['sprays']} sprays, {dropped['messages']} messages; see daemon.log"
            ) in out, out
        wait_for(lambda: _sprays_stored(d) == MAX_PENDING_REFUSED, what="the write-behinds to store what waited")
        assert store_state(d) == {"ok": True, "dropped": dropped}  # counted since the daemon started
        d.restart()
        assert len(d.call("pheromone.list", table="files")["pheromones"]) == MAX_PENDING_REFUSED
        stored = sum(ch["count"] for ch in d.call("msg.channels")["channels"] if ch["channel"].startswith("flood:"))
        assert stored - 1 + dropped["messages"] == publishes
        assert "Traceback" not in d.log()
    finally:
        d.stop()


def _sprays_stored(d: Daemon) -> int:
    """The pheromone rows on disk (the daemon keeps them in memory: this is what its write-behind wrote)."""
    with sqlite3.connect(d.settings.db) as db:
        return db.execute("SELECT count(*) FROM pheromones WHERE tbl = 'files'").fetchone()[0]


# -- the disk is full ----------------------------------------------------------------------------------------


def test_a_full_disk_refuses_writes_changes_nothing_and_recovers(tmp_home: Path, small_disk: Path) -> None:
    d = Daemon(tmp_home, make_env(tmp_home, PORT_DADDY_DB=str(small_disk / "portdaddy.db"))).start()
    try:
        d.call("agent.register", agentId="worker")
        d.call("port.claim", id="app:api")
        channels = d.call("msg.channels")["channels"]
        filler = fill(small_disk)
        pad = "x" * 5000
        errors = [refused(d.call, "port.claim", id=f"big{n}:api", metadata={"pad": pad}) for n in range(3)]
        assert {e.code for e in errors} == {"STORE_FULL"}
        full = f"the disk holding the store {d.settings.db} is full; free some space, then try again"
        assert errors[0].message == full
        assert refused(d.call, "msg.publish", channel="c", payload=pad).code == "STORE_FULL"
        assert refused(d.call, "lock.acquire", name="deploy", metadata={"pad": pad}).code == "STORE_FULL"
        assert [s["id"] for s in d.call("port.find", pattern="*")["services"]] == ["app:api"]
        assert d.call("msg.channels")["channels"] == channels and d.call("lock.list")["locks"] == []
        assert store_state(d)["error"] == "STORE_FULL"
        with d.client() as c:  # fire-and-forget, written behind: the flushes are refused, the sprays kept
            for n in range(50):
                c.send("pheromone.spray", {"table": "files", "id": f"f{n}", "key": "edit", "strength": 1})
        time.sleep(2.5)
        assert alive(d), d.log()[-2000:]
        filler.unlink()
        assert d.call("port.claim", id="big0:api", metadata={"pad": pad})["existing"] is False
        d.call("pheromone.spray", table="files", id="f50", key="edit", strength=1)  # flushes all pending
        assert store_state(d) == {"ok": True}
        d.kill9()
        d.start()
        assert [s["id"] for s in d.call("port.find", pattern="*")["services"]] == ["app:api", "big0:api"]
        assert len(d.call("pheromone.list", table="files")["pheromones"]) == 51
        assert "Traceback" not in d.log()
    finally:
        d.stop()


def test_a_lock_journal_append_the_disk_cuts_short_is_cut_off_and_the_change_refused(
    tmp_home: Path, small_disk: Path
) -> None:
    """A lock held by name is one append to the lock journal. On a full disk a small one still fits in the
    file's last block, and is kept; a larger one gets in only in part: that part is cut off again (a torn frame
    in front of the next would hide it from replay), and the change is written to the store instead, which
    refuses it as it refuses the rest."""
    d = Daemon(tmp_home, make_env(tmp_home, PORT_DADDY_DB=str(small_disk / "portdaddy.db"))).start()
    try:
        journal = Path(journal_path(str(d.settings.db)))
        header = journal.stat().st_size
        d.call("lock.release", name="warm", token=d.call("lock.acquire", name="warm")["token"])  # reserves tokens
        wait_for(lambda: journal.stat().st_size == header)  # folded: the store has nothing left to write
        filler = fill(small_disk)
        small = d.call("lock.acquire", name="small", owner="a", ttl="10m")
        size = journal.stat().st_size
        assert size > header
        error = refused(d.call, "lock.acquire", name="big", owner="a", metadata={"pad": "x" * 5000})
        assert error.code == "STORE_FULL" and journal.stat().st_size == size
        assert d.call("lock.get", name="big")["held"] is False
        filler.unlink()
        after = d.call("lock.acquire", name="after", owner="a", ttl="10m")
        d.kill9()
        d.start()
        held = {lk["name"]: lk["token"] for lk in d.call("lock.list")["locks"]}
        assert held == {"small": small["token"], "after": after["token"]}
        assert "cut short" not in d.log() and "Traceback" not in d.log()
    finally:
        d.stop()


# -- read-only, deleted --------------------------------------------------------------------------------------


def test_a_store_whose_disk_turns_read_only_refuses_writes_and_keeps_serving(
    tmp_home: Path, ext4_disk: tuple[Path, Path]
) -> None:
    disk, trigger = ext4_disk
    d = Daemon(tmp_home, make_env(tmp_home, PORT_DADDY_DB=str(disk / "portdaddy.db"))).start()
    try:
        d.call("port.claim", id="app:api")
        trigger.write_text("a disk error\n")  # ext4 remounts itself read-only, open files and all
        err = refused(d.call, "port.claim", id="app:web")
        assert err.code == "STORE_READONLY" and "cannot be written: its file system is read-only" in err.message
        assert [s["id"] for s in d.call("port.find", pattern="*")["services"]] == ["app:api"]
        time.sleep(1.5)  # the activity log's flush meets it too
        assert alive(d) and store_state(d)["error"] == "STORE_READONLY"
        assert "writes are refused: the store" in d.pd("status").stdout
        assert "Traceback" not in d.log()
    finally:
        d.stop()


def test_the_daemon_does_not_start_on_a_read_only_store(tmp_home: Path, small_disk: Path) -> None:
    d = Daemon(tmp_home, make_env(tmp_home, PORT_DADDY_DB=str(small_disk / "portdaddy.db"))).start()
    d.stop()
    _mount(small_disk, "-o", "remount,ro")
    try:
        out = d.pd("start")
        assert (
            out.returncode == 3
            and f"1: the store {d.settings.db} can only be opened read-only (its mode, or a read-only" in out.stderr
        ), out.stderr
        assert "Traceback" not in d.log()
    finally:
        d.pd("stop")


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_store_deleted_or_replaced_under_the_daemon_takes_no_more_writes(fresh_daemon: Daemon, how: str) -> None:
    """Writes went on into the deleted file, acknowledged, and were gone at the next start."""
    d = fresh_daemon
    db = d.settings.db
    d.call("port.claim", id="app:api")
    if how == "deleted":
        for suffix in ("", "-wal", "-shm"):
            os.unlink(f"{db}{suffix}")
    else:  # a backup restored over it
        shutil.copy(db, f"{db}.new")
        os.rename(f"{db}.new", db)
    time.sleep(FILE_CHECK_S)  # writes look at the file that often
    err = refused(d.call, "port.claim", id="app:web")
    assert err.code == "STORE_GONE" and "deleted or replaced while the daemon ran" in err.message
    assert "restart the daemon" in err.message
    # Every write looks again once one found the file gone: those until the next look were acknowledged, and lost.
    assert {refused(d.call, "port.claim", id=f"app:w{n}").code for n in range(20)} == {"STORE_GONE"}
    assert d.call("port.claim", id="app:api")["existing"] is True  # reads go on
    assert store_state(d)["error"] == "STORE_GONE"
    d.restart()
    assert "app:web" not in [s["id"] for s in d.call("port.find", pattern="*")["services"]]
    assert d.call("port.claim", id="app:web")["existing"] is False


def test_a_home_deleted_under_the_daemon_refuses_writes_and_leaves_to_the_next_daemon(fresh_daemon: Daemon) -> None:
    """Nobody can reach a daemon whose home is gone (its sockets went with it) and the next pd starts another
    one there: the old one refuses writes to the clients it still has, then shuts down, leaving the new one's
    sockets and pid file alone."""
    d = fresh_daemon
    old = d.proc
    assert old is not None
    with d.client() as c:
        c.request("port.claim", {"id": "app:api"})
        shutil.rmtree(d.home)
        time.sleep(FILE_CHECK_S)
        with pytest.raises(PDError) as err:
            c.request("port.claim", {"id": "app:web"})
        assert err.value.code == "STORE_GONE"
        assert c.request("port.get", {"id": "app:api"})["service"]["port"]
    d.home.mkdir()
    new = Daemon(d.home, d.env).start()
    try:
        assert old.wait(timeout=10) == 0
        assert new.call("port.claim", id="app:web")["existing"] is False
        assert new.pd("status").returncode == 0
    finally:
        new.stop()
        d.proc = None


# -- a write refused at its commit leaves nothing behind -----------------------------------------------------


def truncate_wal(d: Daemon) -> None:
    """Checkpoint the WAL into the store and empty it: every later commit must grow it (on a full disk, fail)."""
    db = sqlite3.connect(d.settings.db, isolation_level=None)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


def test_a_write_refused_at_its_commit_leaves_no_event_activity_delivery_or_message(
    tmp_home: Path, small_disk: Path
) -> None:
    """On a full disk a write runs to its COMMIT, which fails: whatever the operation announced on the way (its
    events, and through them activity rows, webhook deliveries and channel messages) must go with it."""
    env = make_env(tmp_home, PORT_DADDY_DB=str(small_disk / "portdaddy.db"), PORT_DADDY_WEBHOOK_ALLOW_PRIVATE="1")
    d = Daemon(tmp_home, env).start()
    try:
        hook = d.call("webhook.register", url="http://127.0.0.1:9/hook", events=["*"])["id"]
        d.call("agent.register", agentId="leaver")
        sid = d.call("session.start", purpose="writing", agentId="writer", files=["src/a.py"])["id"]
        worktree = str(tmp_home / "wt")

        def seen() -> dict[str, Any]:
            return {"activity": d.call("activity.list", limit=1000)["entries"],
                    "deliveries": [(x["id"], x["event"]) for x in d.call("webhook.deliveries", id=hook, limit=500)
                                   ["deliveries"]],  # their attempts go on
                    "channels": d.call("msg.channels")["channels"],
                    "agents": [a["id"] for a in d.call("agent.list")["agents"]],
                    "sessions": [(s["id"], s["status"], s["noteCount"])
                                 for s in d.call("session.list", all=True)["sessions"]],
                    "tuples": d.call("tuple.scan")["tuples"],
                    "harbors": d.call("harbor.list")["harbors"]}  # fmt: skip

        # Small writes: with the WAL emptied, any commit needs a block the disk no longer has.
        ops: list[tuple[str | None, str, dict[str, Any]]] = [
            ("newbie", "agent.register", {"purpose": "new"}),
            ("starter", "agent.begin", {"purpose": "begun", "files": ["src/b.py"], "worktree": worktree}),
            (None, "session.start", {"purpose": "more", "agentId": "writer", "files": ["src/c.py"]}),
            (None, "note.add", {"sessionId": sid, "content": "a note"}),
            (None, "file.claim", {"sessionId": sid, "files": ["src/d.py"]}),
            (None, "session.end", {"sessionId": sid, "note": "handoff"}),
            (None, "tuple.out", {"fields": ["work", 1]}),
            (None, "tuple.out", {"fields": ["work", 2], "harbor": "new:harbor"}),  # the harbor was made first
            ("member", "harbor.enter", {"name": "other:harbor"}),
            (None, "msg.publish", {"channel": "news", "payload": {"n": 1}}),
            ("leaver", "agent.done", {"note": "bye"}),
        ]
        with d.client() as watcher:
            watcher.request("msg.subscribe", {"channels": ["*"], "new": True})
            time.sleep(1.5)  # the activity log has written what came before
            before = seen()
            truncate_wal(d)
            filler = fill(small_disk)
            for agent, action, args in ops:
                with d.client(agent) as c:
                    with pytest.raises(PDError) as e:
                        c.request(action, args)
                    assert e.value.code == "STORE_FULL", f"{action}: {e.value!r}"
            assert watcher.receive(timeout=0.5) is None  # no message reached a subscriber
            filler.unlink()
            time.sleep(1.5)  # what was left pending in memory would be written now
            after = seen()
            assert after == before
            # The same operations, now taken, announce themselves: the checks above could see them.
            d.call("agent.begin", agentId="starter", purpose="begun", files=["src/b.py"], worktree=worktree)
            pushed = watcher.receive(timeout=5)
            assert pushed is not None and pushed.payload["channel"] == "agents"
        known = {e["id"] for e in before["activity"]}
        new = [e for e in d.call("activity.list", limit=1000)["entries"] if e["id"] not in known]
        assert {"agent.register", "session.start", "file.claim"} <= {e["type"] for e in new}
        assert len(d.call("webhook.deliveries", id=hook, limit=500)["deliveries"]) > len(before["deliveries"])
        assert "Traceback" not in d.log()
    finally:
        d.stop()


def test_a_write_ahead_log_deleted_alone_takes_no_more_writes_and_loses_nothing_acknowledged(
    fresh_daemon: Daemon,
) -> None:
    """The -wal file deleted while the main file stays went unnoticed: commits went on into the deleted log, and
    a crash lost them with everything since the last checkpoint. Now writes are refused as for a deleted store,
    and what the log held is copied into the main file when that is noticed, so a SIGKILL then loses nothing."""
    d = fresh_daemon
    db = d.settings.db
    d.call("port.claim", id="app:api")
    os.unlink(f"{db}-wal")
    acknowledged = ["app:api"]
    try:  # in the moment before the next look at the files, a write may still be taken: it must be kept
        d.call("port.claim", id="app:db")
        acknowledged.append("app:db")
    except PDError as e:
        assert e.code == "STORE_GONE"
    time.sleep(FILE_CHECK_S)
    err = refused(d.call, "port.claim", id="app:web")
    assert err.code == "STORE_GONE", err
    assert err.message == (f"the store's write-ahead log {db}-wal was deleted while the daemon ran, so nothing more "
                           "can be saved; what it held was saved into the store; restart the daemon (pd stop && "
                           "pd start)")  # fmt: skip
    # Every write looks again once one found the log gone: those until the next look went into the deleted log.
    assert {refused(d.call, "port.claim", id=f"app:w{n}").code for n in range(20)} == {"STORE_GONE"}
    assert d.call("port.claim", id="app:api")["existing"] is True  # reads go on
    assert store_state(d)["error"] == "STORE_GONE"
    assert "writes are refused: the store's write-ahead log" in d.pd("status").stdout
    d.kill9()
    d.start()
    ids = [s["id"] for s in d.call("port.find", pattern="*")["services"]]
    assert set(acknowledged) <= set(ids) and "app:web" not in ids
    check = sqlite3.connect(db)
    try:
        assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        check.close()


def test_a_run_whose_start_the_store_refused_is_recorded_failed_once_it_takes_writes(fresh_daemon: Daemon) -> None:
    """A queued run that comes to start while writes are refused cannot register: it fails. Its row said
    `queued` for good (nothing tried again), and pd spawn kill answered "done" for it from that row."""
    d = fresh_daemon
    project = make_project(d.home, """
        limits: {max_concurrent_spawns: 1}
        agents:
          w: {trigger: go, backend: custom, command: sleep 0.5}
        """)  # fmt: skip
    d.call("fleet.up", projectDir=str(project))
    first, second = (d.call("fleet.run", projectDir=str(project), agent="w")["run"]["id"] for _ in range(2))
    wait_for(lambda: _row(d, first)[0] == "running", what="the first run to start")
    log = d.home / "daemon.log"
    with write_lock_held(d):
        wait_for(lambda: f"fleet: run {second}:" in log.read_text(), what="the second run's start to be refused")
        with pytest.raises(PDError) as refused:
            d.call("spawn.kill", id=second)
        assert refused.value.code == "STORE_LOCKED"
    status, error = wait_for(lambda: (r := _row(d, second))[0] != "queued" and r, what="its end on disk")
    assert status == "failed" and "locked" in error, (status, error)


def _row(d: Daemon, run: str) -> tuple[str, str | None]:
    """A run's status and error as the store has them."""
    with sqlite3.connect(d.settings.db) as db:
        return db.execute("SELECT status, error FROM fleet_runs WHERE id = ?", (run,)).fetchone()
