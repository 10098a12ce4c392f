"""Named locks with fencing tokens, leases (TTL), FIFO blocking waits and owner-death release.

Every grant takes the next value of one counter, so a lock's tokens only ever grow, across restarts (a
resource guarded by the lock refuses writes carrying a token older than the newest it has seen). The store
holds the highest token *reserved*, FENCE_BLOCK at a time, so most grants write only their lock row; after a
restart tokens resume above every reserved one, leaving a gap, which fencing does not mind.
Re-acquiring a lock you hold (same owner) is idempotent: same token, lease refreshed.

A lock is never free while someone waits for it: a release or an expiry hands it straight to the first
waiter (FIFO, in the same step), so a late non-blocking caller cannot barge in. A cancelled waiter (timeout,
disconnect) is removed by its abort function. State lives in memory and is written through to the store
before any reply; expiries run at their deadline (the next one, not on a tick). A lock whose holder is gone
(its connection closed, its agent died or left) while the store refused the release stays held, and is due
at once: the expiry task tries again until the store takes it (spec/decisions.md, "Storage failures").

A lock held by name is written through to the lock journal (core/lockjournal.py): one append, folded into the
store's ``locks`` table within FOLD_S, rather than a commit per change. While the store refuses writes, or the
journal cannot take one, the change is written to the store itself (folding in what the journal held first), so
that it is refused whenever the store refuses, as every other change is.

A connection-bound lock is the exception to writing through: it ends with its connection, which the daemon's
death ends too, so the store has nothing to keep for it, and its grant and release write nothing (a lock cycle
without two commits).
"""

from __future__ import annotations

import fnmatch
import heapq
import json
import math
import secrets
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio
from outcome import Value

from portdaddy.core import validate as v
from portdaddy.core.clock import now_ms
from portdaddy.core.events import Event
from portdaddy.core.lockjournal import LockJournal, journal_path, replay
from portdaddy.core.ops import Ctx, Later, Op, Param
from portdaddy.core.store import Reserved
from portdaddy.errors import LockHeld, PDError, StoreError, bad_input
from portdaddy.text import span

DEFAULT_TTL_MS = 5 * 60_000
MAX_TTL_MS = 60 * 60_000
MAX_WAIT_MS = 24 * 3600_000
COMPACT_SLACK = 64  # stale expiry entries tolerated beyond twice the locks held
FENCE_BLOCK = 1024  # fencing tokens reserved per write of lock_fence
FOLD_S = 1.0  # how long a change may stay in the lock journal before it is folded into the store


@dataclass(slots=True)
class Lock:
    name: str
    owner: str
    token: int
    pid: int | None
    acquired_at: int
    expires_at: int
    metadata: dict[str, Any] | None = None
    conn: Any = None  # the IPC connection it is bound to (released when it closes), or None
    gone: str | None = None  # why its holder is gone, while the store refuses to record the release

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "owner": self.owner, "token": self.token, "pid": self.pid,
                "acquiredAt": self.acquired_at, "expiresAt": self.expires_at, "connBound": self.conn is not None,
                "metadata": self.metadata}  # fmt: skip


@dataclass(eq=False, slots=True)
class _Waiter:
    owner: str
    ttl_ms: int
    pid: int | None
    metadata: dict[str, Any] | None
    conn: Any
    task: trio.lowlevel.Task


class Locks:
    name = "locks"

    def __init__(self, app: Any) -> None:
        self.app = app
        self.store = app.store
        self._held: dict[str, Lock] = {}
        self._waiters: dict[str, dict[_Waiter, None]] = {}  # per lock, an ordered set: FIFO, O(1) removal
        self._deadlines: list[tuple[int, str]] = []
        self._expiry: trio.CancelScope | None = None  # the expiry task's sleep; its deadline is the next expiry
        self.granted = 0
        # lock_fence.last_token is the highest token reserved (0 before the first grant): ours start above it.
        last_token, self._journal_id, self._seq = self.store.one(
            "SELECT last_token, journal_id, journal_seq FROM lock_fence WHERE id = 1")  # fmt: skip
        self._tokens = Reserved(self.store, last_token, FENCE_BLOCK, _write_fence)
        self._journal: LockJournal | None = None  # None until loaded, or when no file can be written
        self._dirty: set[str] = set()  # locks changed in the journal since its last fold
        self._fold_scope: trio.CancelScope | None = None  # the fold task's sleep: its deadline is the next fold
        rows = self.store.all("SELECT name, owner, token, pid, acquired_at, expires_at, conn_bound, metadata "
                              "FROM locks")  # fmt: skip
        bound = []
        for name, owner, token, pid, acquired_at, expires_at, conn_bound, metadata in rows:
            lock = self._held[name] = _lock(name, [owner, token, pid, acquired_at, expires_at, metadata])
            if conn_bound:
                bound.append(lock)
        for seq, name, row in replay(self._journal_path, self._journal_id, self._seq):
            self._seq = seq
            self._dirty.add(name)
            if row is None:
                self._held.pop(name, None)
            else:
                self._held[name] = _lock(name, row)
        for lock in bound:
            if self._held.get(lock.name) is not lock:
                continue
            # Written by a daemon before connection-bound locks were kept in memory only; its connection died
            # with that daemon: nobody holds it any more.
            self._release(lock, by=None, forced=False, reason="disconnect")
        if self._dirty:
            with self.store.write() as db:
                self._fold(db)
        self._journal = LockJournal.start(self._journal_path, self._journal_id)
        # A store restored from a backup may hold a reservation below tokens its journal replayed: go on above them.
        self._tokens.last = max(self._tokens.last, *(lk.token for lk in self._held.values()), 0)
        self._deadlines.extend((lk.expires_at, name) for name, lk in self._held.items())
        heapq.heapify(self._deadlines)

    @property
    def _journal_path(self) -> str:
        return journal_path(self.store.path)

    def stats(self) -> dict[str, Any]:
        return {"locks": len(self._held), "lockWaiters": sum(len(w) for w in self._waiters.values())}

    # -- queries -------------------------------------------------------------------------------------------

    def get(self, name: str) -> Lock | None:
        """The lock if held; an expired lease is not held, even while the store refuses to record its end."""
        with suppress(StoreError):
            self._expire_if_due(name)
        lock = self._held.get(name)
        return lock if lock is not None and lock.expires_at > now_ms() else None

    def list(self, owner_glob: str | None = None) -> list[Lock]:
        now = now_ms()
        with suppress(StoreError):
            for lock in [lk for lk in self._held.values() if _due(lk) <= now]:  # ended, or its holder gone
                self._expire_if_due(lock.name)
        locks = sorted((lk for lk in self._held.values() if lk.expires_at > now), key=lambda lk: lk.acquired_at,
                       reverse=True)  # fmt: skip
        if owner_glob:
            locks = [lk for lk in locks if fnmatch.fnmatchcase(lk.owner, owner_glob)]
        return locks

    # -- acquire -------------------------------------------------------------------------------------------

    def try_acquire(self, name: str, owner: str, *, ttl_ms: int = DEFAULT_TTL_MS, pid: int | None = None,
                    metadata: dict[str, Any] | None = None, conn: Any = None) -> tuple[Lock, bool]:  # fmt: skip
        """Grant ``name`` to ``owner`` now, or raise LockHeld. Returns (lock, already held by this owner)."""
        self._expire_if_due(name)
        lock = self._held.get(name)
        if lock is not None:
            if lock.owner != owner:
                raise self._held_error(lock)
            # Idempotent: the lease may grow, never shrink, and the binding stays as it was. A holder that runs
            # `pd with-lock` on its own lock must still hold it, with the lease it had, when the command ends.
            self._set_expiry(lock, max(lock.expires_at, now_ms() + ttl_ms))
            return lock, True
        self._check_quota(owner)
        return self._grant(name, owner, ttl_ms, pid, metadata, conn), False

    def _check_quota(self, owner: str) -> None:
        """A registered agent holds, or waits for, at most its ``maxLocks`` locks: a runaway agent cannot take
        every lock there is, nor queue for them."""
        agents = getattr(self.app, "agents", None)
        if agents is not None:
            agents.check_quota(owner, "locks", lambda: sum(lk.owner == owner for lk in self._held.values())
                               + sum(w.owner == owner for queue in self._waiters.values() for w in queue))  # fmt: skip

    async def acquire_blocking(self, name: str, owner: str, *, ttl_ms: int, timeout_s: float | None,
                               pid: int | None = None, metadata: dict[str, Any] | None = None,
                               conn: Any = None) -> Lock:  # fmt: skip
        """Wait in FIFO order until the lock is handed to ``owner`` (call after ``try_acquire`` refused).
        ``conn``: the connection the lock is bound to, if any."""
        self._check_quota(owner)
        waiter = _Waiter(owner, ttl_ms, pid, metadata, conn, trio.lowlevel.current_task())
        queue = self._waiters.setdefault(name, {})
        queue[waiter] = None

        def abort(_: Any) -> trio.lowlevel.Abort:
            queue.pop(waiter, None)
            if not queue and self._waiters.get(name) is queue:
                del self._waiters[name]
            return trio.lowlevel.Abort.SUCCEEDED

        with trio.move_on_after(timeout_s if timeout_s is not None else float("inf")) as scope:
            return await trio.lowlevel.wait_task_rescheduled(abort)
        assert scope.cancelled_caught
        holder = self._held.get(name)
        raise PDError("TIMEOUT", f"lock {name!r} was not free within {timeout_s:g}s"
                      + (f" (held by {holder.owner})" if holder else "") + "; wait longer with --timeout, or try later",
                      timedOut=True,
                      holder=holder.owner if holder else None)  # fmt: skip

    def _grant(self, name: str, owner: str, ttl_ms: int, pid: int | None, metadata: dict[str, Any] | None,
               conn: Any) -> Lock:  # fmt: skip
        """Grant the lock; memory and the event follow once it is kept (a connection-bound one: nothing is)."""
        lock = self._new(name, owner, ttl_ms, pid, metadata)
        self._keep(name, _row(lock) if conn is None else None, stored=False)
        self.store.after_commit(partial(self._granted, lock, conn))
        return lock

    def _new(self, name: str, owner: str, ttl_ms: int, pid: int | None, metadata: dict[str, Any] | None) -> Lock:
        now = now_ms()
        token = self._tokens.take()  # never handed out twice, even if this grant fails: a gap is harmless
        return Lock(name, owner, token, pid, now, now + ttl_ms, metadata)

    def _keep(self, name: str, row: list[Any] | None, *, stored: bool) -> None:
        """Make ``row`` what the store holds for ``name`` (None: nothing), where it or what was there (``stored``)
        is a lock held by name, and reserve a new block of tokens if the last one handed out needs it. Raises
        StoreError, having changed nothing, if that cannot be kept."""
        if row is None and not stored and self._tokens.covered:
            return  # connection-bound, before and after
        if self._journaled(name, row):
            return
        with self.store.write() as db:
            self._tokens.cover(db)
            self._fold(db)  # first: the journal's records must not be replayed over this change
            if row is not None or stored:
                _write_row(db, name, row)

    def _journaled(self, name: str, row: list[Any] | None) -> bool:
        """Whether the change went to the journal: not while the store refuses writes (it must be refused with
        them), nor when a token block must be written anyway, nor inside a store transaction (it must not outlive
        that transaction's rollback)."""
        journal = self._journal
        if journal is None or self.store.failure is not None or self.store.writing or not self._tokens.covered:
            return False
        if not journal.append(self._seq + 1, name, row):
            return False
        self._seq += 1
        if not self._dirty and self._fold_scope is not None:
            self._fold_scope.deadline = trio.current_time() + FOLD_S
        self._dirty.add(name)
        return True

    def _fold(self, db: Any) -> None:
        """Inside an open write: store what the locks changed in the journal now are."""
        if not self._dirty:
            return
        for name in self._dirty:
            lock = self._held.get(name)
            _write_row(db, name, _row(lock) if lock is not None and lock.conn is None else None)
        db.execute("UPDATE lock_fence SET journal_seq = ? WHERE id = 1", (self._seq,))
        self.store.after_commit(self._folded)

    def _folded(self) -> None:
        self._dirty.clear()
        journal = self._journal
        if journal is not None and not journal.empty():
            journal.close()
            self._journal = LockJournal.start(self._journal_path, self._journal_id)

    def _fold_now(self) -> None:
        with self.store.write() as db:
            self._fold(db)

    def _granted(self, lock: Lock, conn: Any) -> None:
        self._held[lock.name] = lock
        if conn is not None:
            self._bind(lock, conn)
        self._schedule(lock)
        self.granted += 1
        self.app.bus.emit("lock.acquire", name=lock.name, owner=lock.owner, token=lock.token,
                          expiresAt=lock.expires_at)  # fmt: skip

    def _bind(self, lock: Lock, conn: Any) -> None:
        lock.conn = conn
        bound: set[str] | None = conn.data.get("locks")
        if bound is None:
            bound = conn.data["locks"] = set()
            conn.on_close(lambda: self._connection_closed(conn))
        bound.add(lock.name)

    def _connection_closed(self, conn: Any) -> None:
        for name in sorted(conn.data.get("locks", ())):
            lock = self._held.get(name)
            if lock is not None and lock.conn is conn:
                self._let_go(lock, "disconnect")

    @staticmethod
    def _held_error(lock: Lock) -> LockHeld:
        left_s = max(0, -((now_ms() - lock.expires_at) // 1000))  # rounded up, as pd lock and pd locks show it
        return LockHeld("LOCK_HELD", f"lock {lock.name!r} is held by {lock.owner} (expires in {span(left_s)}); "
                        "wait with --wait or try later",
                        holder=lock.owner, heldSince=lock.acquired_at, expiresAt=lock.expires_at)  # fmt: skip

    # -- release / extend ----------------------------------------------------------------------------------

    def release(self, name: str, *, owner: str | None = None, token: int | None = None,
                force: bool = False) -> Lock | None:  # fmt: skip
        """Release ``name``; None if it was not held. Without force, a given owner or token must match."""
        lock = self.get(name)
        if lock is None:
            return None
        if not force:
            if token is not None and token != lock.token:
                raise PDError("NOT_OWNER", f"token {token} is stale: lock {name!r} is now held by {lock.owner} "
                              f"with token {lock.token}", holder=lock.owner)  # fmt: skip
            if owner is not None and owner != lock.owner:
                raise PDError("NOT_OWNER", f"lock {name!r} is held by {lock.owner}, not {owner}; "
                              "use --force to take it away", holder=lock.owner)  # fmt: skip
        by = owner if owner is not None else lock.owner if token is not None else None
        self._release(lock, by=by, forced=force, reason="release")
        return lock

    def extend(self, name: str, *, owner: str | None = None, token: int | None = None,
               ttl_ms: int = DEFAULT_TTL_MS) -> Lock:  # fmt: skip
        lock = self.get(name)
        if lock is None:
            raise PDError("LOCK_NOT_FOUND", f"lock {name!r} is not held (an expired lock cannot be extended); "
                          "acquire it again")  # fmt: skip
        if (owner is not None and owner != lock.owner) or (token is not None and token != lock.token):
            raise PDError("NOT_OWNER", f"lock {name!r} is held by {lock.owner} with token {lock.token}; "
                          "only its holder may extend it", holder=lock.owner)  # fmt: skip
        self._set_expiry(lock, now_ms() + ttl_ms)
        return lock

    def _set_expiry(self, lock: Lock, expires_at: int) -> None:
        if lock.conn is None:
            self._keep(lock.name, _row(lock, expires_at), stored=True)
        lock.expires_at = expires_at
        self._schedule(lock)

    def take_back(self, name: str, token: int, expires_at: int) -> None:
        """Let go of a grant whose reply never reached its caller: nobody knows they hold it. Only if the grant
        stands untouched: a lease renewed since (a re-acquire or an extend by the same owner) was answered to
        someone who does know."""
        lock = self._held.get(name)
        if lock is not None and lock.token == token and lock.expires_at == expires_at:
            self._let_go(lock, "disconnect")

    def release_owner(self, owner: str, reason: str) -> list[str]:
        """Release every lock ``owner`` holds (its agent died or unregistered)."""
        names = [lk.name for lk in self._held.values() if lk.owner == owner]
        for name in names:
            self._let_go(self._held[name], reason)
        return names

    def _let_go(self, lock: Lock, reason: str) -> None:
        """Release a lock whose holder is gone. While the store refuses that, the lock stays held (nobody else
        may be granted it before its release is on disk) and is due at once: the expiry task tries again every
        RETRY_S, and a call that looks at the lock tries first."""
        try:
            self._release(lock, by=None, forced=False, reason=reason)
        except StoreError:
            lock.gone = reason
            self._schedule(lock)

    def _release(self, lock: Lock, *, by: str | None, forced: bool, reason: str) -> None:
        """Drop ``lock`` and hand it to the first waiter, if any, in the same change. Memory, the events and the
        waiter's wake-up follow once it is kept: a release the store refuses leaves the lock held."""
        queue = self._waiters.get(lock.name)
        waiter = next(iter(queue)) if queue else None
        granted = None
        if waiter is not None:
            granted = self._new(lock.name, waiter.owner, waiter.ttl_ms, waiter.pid, waiter.metadata)
        self._keep(lock.name, _row(granted) if granted is not None and waiter.conn is None else None,
                   stored=lock.conn is None)  # fmt: skip
        self.store.after_commit(partial(self._released, lock, by, forced, reason))
        if waiter is not None:
            self.store.after_commit(partial(self._granted, granted, waiter.conn))
            self.store.after_commit(partial(self._handed, waiter, granted))

    def _released(self, lock: Lock, by: str | None, forced: bool, reason: str) -> None:
        del self._held[lock.name]
        if lock.conn is not None:
            lock.conn.data.get("locks", set()).discard(lock.name)
        self.app.bus.emit("lock.release", name=lock.name, owner=lock.owner, token=lock.token, by=by,
                          forced=forced, reason=reason)  # fmt: skip

    def _handed(self, waiter: _Waiter, granted: Lock) -> None:
        """The first waiter has the lock its release granted it: out of the queue, and awake."""
        queue = self._waiters[granted.name]
        del queue[waiter]
        if not queue:
            del self._waiters[granted.name]
        trio.lowlevel.reschedule(waiter.task, Value(granted))

    # -- expiry --------------------------------------------------------------------------------------------

    def _schedule(self, lock: Lock) -> None:
        deadlines = self._deadlines
        entry = (_due(lock), lock.name)
        if len(deadlines) > 2 * len(self._held) + COMPACT_SLACK:
            # A released or extended lease leaves its entry behind until that deadline: under steady churn the
            # heap would hold every grant of the last TTL (hundreds of thousands). Rebuild it from the holders.
            deadlines[:] = [(_due(held), held.name) for held in self._held.values()]
            heapq.heapify(deadlines)
        else:
            heapq.heappush(deadlines, entry)
        if deadlines[0] == entry and self._expiry is not None:
            # Moving a deadline wakes nobody: a grant does not cost the expiry task a trip through the scheduler.
            # Only an earlier one is set: trio's deadline setter costs a few µs even when the value stays.
            deadline = _trio_deadline(entry[0])
            if deadline < self._expiry.deadline:
                self._expiry.deadline = deadline

    def _expire_if_due(self, name: str) -> None:
        """Release ``name`` if its lease ended, or its holder is gone and the release is still to be recorded."""
        lock = self._held.get(name)
        if lock is None:
            return
        if lock.gone is not None:
            self._release(lock, by=None, forced=False, reason=lock.gone)
        elif lock.expires_at <= now_ms():
            self._release(lock, by=None, forced=False, reason="expire")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Expire leases at their deadline, fold the journal into the store, and release the locks of agents
        that die or unregister."""
        # Inline (observe), not a task woken later: the release must commit before `agent.unregister` or
        # `agent.done` is answered, or a SIGKILL in between leaves the lock held by an agent that is gone.
        with self.app.bus.observe(self._owner_gone, "agent.dead", "agent.unregister"):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._fold_when_due)
                task_status.started()
                await self._expire_when_due()

    async def _expire_when_due(self) -> None:
        while True:
            with trio.CancelScope() as self._expiry:
                if self._deadlines:
                    self._expiry.deadline = _trio_deadline(self._deadlines[0][0])
                await trio.sleep_forever()
            now = now_ms()
            while self._deadlines and self._deadlines[0][0] <= now:
                entry = self._deadlines[0]
                # An extended lease has a later entry and is left alone; one the store refuses to end stays due,
                # and is tried again once background() has waited RETRY_S.
                if not await self.store.background(partial(self._expire_if_due, entry[1])):
                    break
                if self._deadlines and self._deadlines[0] == entry:
                    heapq.heappop(self._deadlines)

    async def _fold_when_due(self) -> None:
        """Fold the journal FOLD_S after its first change since the last fold (a deadline set by that change: no
        task wake-up per change), until the store takes it; and once more when the daemon stops, so that the
        next start has nothing to replay."""
        try:
            while True:
                with trio.CancelScope(deadline=trio.current_time() + FOLD_S if self._dirty else math.inf) as scope:
                    self._fold_scope = scope
                    await trio.sleep_forever()
                self._fold_scope = None
                while not await self.store.background(self._fold_now):
                    pass
        finally:
            self._fold_scope = None
            with suppress(StoreError):
                self._fold_now()

    def _owner_gone(self, event: Event) -> None:
        agent_id = event.data.get("agentId")
        if isinstance(agent_id, str):
            self.release_owner(agent_id, "owner-dead")


def _row(lock: Lock, expires_at: int | None = None) -> list[Any]:
    """What the store and the journal hold of a lock held by name."""
    return [lock.owner, lock.token, lock.pid, lock.acquired_at, lock.expires_at if expires_at is None else expires_at,
            json.dumps(lock.metadata) if lock.metadata is not None else None]  # fmt: skip


def _lock(name: str, row: list[Any]) -> Lock:
    owner, token, pid, acquired_at, expires_at, metadata = row
    return Lock(name, owner, token, pid, acquired_at, expires_at, json.loads(metadata) if metadata else None)


def _write_row(db: Any, name: str, row: list[Any] | None) -> None:
    if row is None:
        db.execute("DELETE FROM locks WHERE name=?", (name,))
    else:
        db.execute("INSERT OR REPLACE INTO locks (name, owner, token, pid, acquired_at, expires_at, conn_bound, "
                   "metadata) VALUES (?,?,?,?,?,?,0,?)", (name, *row))  # fmt: skip


def _write_fence(db: Any, top: int) -> None:
    db.execute("UPDATE lock_fence SET last_token = ? WHERE id = 1", (top,))


def _due(lock: Lock) -> int:
    """When the expiry task must look at ``lock`` (ms since the epoch): at once if its holder is gone."""
    return 0 if lock.gone is not None else lock.expires_at


def _trio_deadline(expires_at_ms: int) -> float:
    return trio.current_time() + (expires_at_ms - now_ms()) / 1000


# -- operations ----------------------------------------------------------------------------------------------

lock_name = v.name("lock name", 200)
_ttl_check = v.lifetime(MAX_TTL_MS)


def caller_owner(ctx: Ctx, owner: str | None) -> str:
    """An explicit owner, else the caller's agent, else its process (over IPC), else a one-off name."""
    if owner:
        return owner
    if ctx.agent_id:
        return ctx.agent_id
    if ctx.pid:
        return f"pid-{ctx.pid}"
    return f"anonymous-{secrets.token_hex(4)}"


def _acquire_reply(lock: Lock, existing: bool) -> dict[str, Any]:
    verb = "re-acquired (lease refreshed)" if existing else "acquired"
    return {"success": True, **lock.to_wire(), "existing": existing, "message": f"{verb} lock: {lock.name}"}


def _acquire(ctx: Ctx, *, name, owner, ttl, wait, timeout, metadata, connBound) -> dict[str, Any] | Later:
    locks: Locks = ctx.app.locks
    who = caller_owner(ctx, owner)
    if connBound and ctx.conn is None:
        raise bad_input("connBound needs an IPC connection (the lock is released when it closes)")
    conn = ctx.conn if connBound else None
    try:
        lock, existing = locks.try_acquire(name, who, ttl_ms=ttl, pid=ctx.pid, metadata=metadata, conn=conn)
    except LockHeld:
        if not wait:
            raise

        async def queue() -> dict[str, Any]:  # only a held lock pays for a task: the common case answers now
            # The transport starts this in a task of its own, and requests of other connections may run first:
            # a release among them found nobody queued and left the lock free. Queueing on a free lock would
            # wait for a release that never comes, so try again before joining the queue (unless the caller
            # left meanwhile: a grant now would go to nobody).
            if ctx.conn is not None and ctx.conn.closed:
                raise PDError("CANCELLED", "the connection closed before the lock was granted")
            try:
                return _acquire_reply(*locks.try_acquire(name, who, ttl_ms=ttl, pid=ctx.pid, metadata=metadata,
                                                         conn=conn))  # fmt: skip
            except LockHeld:
                pass
            timeout_s = None if timeout is None else timeout / 1000
            lock = await locks.acquire_blocking(name, who, ttl_ms=ttl, timeout_s=timeout_s, pid=ctx.pid,
                                                metadata=metadata, conn=conn)  # fmt: skip
            return _acquire_reply(lock, False)

        return Later(queue)
    return _acquire_reply(lock, existing)


def _let_go_undelivered(ctx: Ctx, result: dict[str, Any]) -> None:
    """A grant whose reply never reached its caller (it hung up first, its connection failed) is let go, or the
    lock would be held by nobody until its lease ends. A re-acquire handed nothing over, and keeps it."""
    if not result["existing"]:
        ctx.app.locks.take_back(result["name"], result["token"], result["expiresAt"])


def _release(ctx: Ctx, *, name, owner, token, force) -> dict[str, Any]:
    lock = ctx.app.locks.release(name, owner=owner or ctx.agent_id, token=token, force=force)
    if lock is None:
        return {"success": True, "released": False, "name": name, "message": f"lock {name!r} was not held"}
    return {"success": True, "released": True, "name": name, "owner": lock.owner, "token": lock.token,
            "forced": force, "message": f"released lock: {name}"}  # fmt: skip


def _extend(ctx: Ctx, *, name, owner, token, ttl) -> dict[str, Any]:
    lock = ctx.app.locks.extend(name, owner=owner or ctx.agent_id, token=token, ttl_ms=ttl)
    return {"success": True, **lock.to_wire(), "message": f"extended lock: {name}"}


def _get(ctx: Ctx, *, name) -> dict[str, Any]:
    lock = ctx.app.locks.get(name)
    return {"success": True, "held": False, "name": name} if lock is None else \
        {"success": True, "held": True, **lock.to_wire()}  # fmt: skip


def _list(ctx: Ctx, *, owner) -> dict[str, Any]:
    locks = [lk.to_wire() for lk in ctx.app.locks.list(owner)]
    return {"success": True, "locks": locks, "count": len(locks)}


_NAME = Param("name", lock_name, required=True)
_OWNER = Param("owner", v.text(200))
_TOKEN = Param("token", v.integer(1))
OPS = (
    Op(
        "lock.acquire",
        _acquire,
        (
            _NAME,
            _OWNER,
            Param("ttl", _ttl_check, default=DEFAULT_TTL_MS),
            Param("wait", v.boolean, default=False),
            Param("timeout", v.duration(MAX_WAIT_MS)),
            Param("metadata", v.json_object(10_000)),
            Param("connBound", v.boolean, default=False),
        ),
        summary="take a lock (fencing `token` in the reply); wait=true queues FIFO until it is free (timeout)",
        undo=_let_go_undelivered,
    ),
    Op(
        "lock.release",
        _release,
        (_NAME, _OWNER, _TOKEN, Param("force", v.boolean, default=False)),
        summary="release a lock; a given owner or token must match unless force",
    ),
    Op(
        "lock.extend",
        _extend,
        (_NAME, _OWNER, _TOKEN, Param("ttl", _ttl_check, default=DEFAULT_TTL_MS)),
        summary="renew a held lock's lease to now + ttl",
    ),
    Op("lock.get", _get, (_NAME,), summary="whether a lock is held, and by whom"),
    Op("lock.list", _list, (Param("owner", v.text(200)),), summary="held locks, newest first (owner: a glob)"),
)
