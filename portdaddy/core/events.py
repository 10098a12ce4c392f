"""Typed events fanned out over trio memory channels.

Commands are calls; events are how subsystems tell each other what happened (agent died → locks released,
sessions abandoned, webhooks queued, the arbiter checks). ``emit`` never blocks: it is called from inside
synchronous operations. Core subscribers ask for an unbounded buffer so that nothing they must act on is
dropped; watchers (SSE, tests) take a bounded one and learn how many they missed.

An observer (``observe``) is called inline instead, at emit time, for checks cheap enough to run inside the
emitting operation (the arbiter): a channel subscriber costs a task wake-up, and so a scheduler pass, for
every event. An observer that raises is logged; the emitter never sees it.

An event tells of a change, so it follows the change to the disk: emitted inside a write (``Store.write``),
it reaches observers and subscribers once that write has committed, and nobody if it rolls back (a refused
write leaves no activity row, webhook delivery or arbiter check behind). An observer's own write is then a
transaction of its own, made before the operation answers.

Hot-path kinds (``HOT_KINDS``: sprays, publishes, heartbeats, at up to hundreds of thousands a second) reach
only subscribers that name them or their area; "everything" subscribers (the arbiter, the activity log) would
otherwise queue every one of them. Each kind's list of subscribers is computed once and cached, so emitting a
kind nobody listens to costs a dict lookup.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from portdaddy.errors import StoreError

if TYPE_CHECKING:
    from portdaddy.core.store import Store

log = logging.getLogger("portdaddy.events")

HOT_KINDS = frozenset({"pheromone.spray", "msg.publish", "agent.heartbeat"})


@dataclass(frozen=True, slots=True)
class Event:
    """``kind`` is dotted, ``area.verb`` (``service.claim``, ``agent.dead``, ``lock.release``)."""

    kind: str
    data: dict[str, Any]
    at: int = field(default_factory=lambda: int(time.time() * 1000))

    def matches(self, prefixes: frozenset[str] | None) -> bool:
        return kind_matches(self.kind, prefixes)


def kind_matches(kind: str, prefixes: frozenset[str] | None) -> bool:
    """``prefixes`` None or holding ``*`` takes every kind that is not hot; hot kinds must be named."""
    if prefixes is None:
        return kind not in HOT_KINDS
    named = kind in prefixes or kind.split(".", 1)[0] in prefixes
    return named or ("*" in prefixes and kind not in HOT_KINDS)


@dataclass(slots=True)
class _Subscriber:
    send: trio.MemorySendChannel[Event] | None  # None for an observer
    kinds: frozenset[str] | None
    wants: Callable[[str, dict[str, Any]], bool] | None = None
    call: Callable[[Event], None] | None = None  # an observer
    dropped: int = 0


class EventBus:
    def __init__(self, store: Store | None = None) -> None:
        """``store``: the store whose open write an event waits for (None: events are delivered at once)."""
        self._subscribers: list[_Subscriber] = []
        self._routes: dict[str, list[_Subscriber]] = {}  # kind -> its subscribers; reset on (un)subscribe
        self._store = store
        self.emitted = 0

    def emit(self, kind: str, **data: Any) -> Event | None:
        """Deliver to every matching subscriber; returns the event, or None when nobody took it (or nobody yet:
        inside a write, it is delivered once that has committed, never if it rolls back)."""
        subs = self._routes.get(kind)
        if subs is None:
            subs = self._routes[kind] = [s for s in self._subscribers if kind_matches(kind, s.kinds)]
        if subs and self._store is not None and self._store.writing:
            self._store.after_commit(partial(self.emit, kind, **data))
            return None
        self.emitted += 1
        event = None
        for sub in subs:
            if sub.wants is not None and not sub.wants(kind, data):
                continue
            if event is None:  # built only for a taker: most hot events are turned away by every ``wants``
                event = Event(kind, data)
            if sub.call is not None:
                try:
                    sub.call(event)
                except StoreError as e:  # its write was refused (the log said why when that began)
                    log.warning("what %s implies was not done: %s", kind, e.message)
                except Exception:  # an observer's bug must not fail the operation that emitted
                    log.exception("an observer failed on %s", kind)
                continue
            try:
                sub.send.send_nowait(event)  # type: ignore[union-attr]
            except trio.WouldBlock:
                sub.dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        return event

    @contextmanager
    def subscribe(
        self, *kinds: str, buffer: float = math.inf, wants: Callable[[str, dict[str, Any]], bool] | None = None
    ) -> Iterator[trio.MemoryReceiveChannel[Event]]:
        """Receive events whose kind, or whose area (``agent``), is in ``kinds`` (all but hot ones when empty or
        ``*``; ``subscribe("*", "msg.publish")`` adds one hot kind to everything else).

        ``wants(kind, data)``, asked at emit time, keeps out events the subscriber would ignore anyway: a burst
        of hot events nobody acts on must not queue up (and hold its payloads) on the way to being ignored."""
        send, receive = trio.open_memory_channel[Event](buffer)
        with self._added(_Subscriber(send, frozenset(kinds) if kinds else None, wants)):
            try:
                yield receive
            finally:
                send.close()

    @contextmanager
    def observe(self, call: Callable[[Event], None], *kinds: str,
                wants: Callable[[str, dict[str, Any]], bool] | None = None) -> Iterator[None]:  # fmt: skip
        """Call ``call(event)`` inline from ``emit`` for the kinds ``subscribe`` would deliver (``wants`` as there).
        A change an event implies that must outlive a SIGKILL of the daemon belongs here, not in a subscriber's
        task: the task runs after the operation has answered."""
        with self._added(_Subscriber(None, frozenset(kinds) if kinds else None, wants, call=call)):
            yield

    @contextmanager
    def _added(self, sub: _Subscriber) -> Iterator[None]:
        self._subscribers.append(sub)
        self._routes.clear()
        try:
            yield
        finally:
            self._subscribers.remove(sub)
            self._routes.clear()
