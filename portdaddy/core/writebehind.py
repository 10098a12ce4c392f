"""Write-behind for hot, low-value changes (a re-claim's ``last_seen``, fire-and-forget sprays, heartbeats and
publishes).

Memory changes at once; the store catches up at most ``delay`` seconds later, all pending keys in one
transaction, coalesced per key (a thousand heartbeats of one agent are one row write). A commit costs tens of
microseconds, more than the rest of a request, so paying it per frame would make these paths slow for no
gain: nobody was told these were stored, so losing the last second of them to a crash breaks no promise.
Anything a caller is told was done is still committed before the reply (``flush()`` first). While the store
refuses writes (spec/decisions.md, "Storage failures"), the keys stay pending and the flush is tried again;
a key already pending takes any number of changes, and at most MAX_PENDING_REFUSED keys wait (``admits``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Generic, TypeVar

import trio

from portdaddy.errors import StoreError

log = logging.getLogger("portdaddy.store")

K = TypeVar("K", bound=Hashable)

DELAY_S = 1.0
# While the store refuses writes, at most this many keys wait to be written; a change that would add one more is
# dropped (``admits``). Only then: a second of sprays to as many entities is a normal backlog.
MAX_PENDING_REFUSED = 10_000


class WriteBehind(Generic[K]):
    def __init__(self, store: Any, write: Callable[[Any, Iterable[K]], None], *, delay: float = DELAY_S,
                 what: str = "changes") -> None:  # fmt: skip
        """``write(db, keys)`` writes the current in-memory state of ``keys`` inside an open transaction; ``what``
        names them where dropped ones are counted."""
        self.store = store
        self.what = what
        self.delay = delay
        self._write = write
        self._keys: set[K] = set()
        self._marked = trio.Event()

    def __len__(self) -> int:
        return len(self._keys)

    def admits(self, key: K) -> bool:
        """Whether a change to ``key`` may be written behind: False (and counted as dropped) while the store
        refuses writes and MAX_PENDING_REFUSED other keys wait already. Ask before changing memory."""
        keys = self._keys
        if len(keys) < MAX_PENDING_REFUSED or key in keys or self.store.failure is None:
            return True
        self.store.drop(self.what)
        return False

    def mark(self, key: K) -> None:
        """``key`` changed in memory; write it within ``delay`` seconds."""
        self._keys.add(key)
        self._marked.set()

    def flush(self) -> None:
        """Write every pending key now (one transaction); a StoreError keeps them pending."""
        if not self._keys:
            return
        keys, self._keys = self._keys, set()
        try:
            with self.store.write() as db:
                self._write(db, keys)
        except BaseException:
            self._keys |= keys  # keep them for the next attempt
            raise

    def settle(self) -> bool:
        """``flush()`` for a read that wants the store up to date: while the store refuses writes, the read goes on
        with what is stored (the pending keys wait for the next flush). False if they are still pending."""
        try:
            self.flush()
        except StoreError:
            return False
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush ``delay`` after the first mark of each batch (again ``delay`` later while the store refuses it);
        on shutdown, flush what is left (what the store still refuses then is lost: nobody was told it was kept)."""
        task_status.started()
        try:
            while True:
                await self._marked.wait()
                await trio.sleep(self.delay)
                self._marked = trio.Event()
                if not self.settle():
                    self._marked.set()
        finally:
            if not self.settle():
                log.warning("%d changes written behind were not stored: the store refuses writes", len(self._keys))
