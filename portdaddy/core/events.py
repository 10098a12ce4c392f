"""Typed events fanned out over trio memory channels.

Commands are calls; events are how subsystems tell each other what happened (agent died → locks released,
sessions abandoned, webhooks queued, the arbiter checks). ``emit`` never blocks: it is called from inside
synchronous operations. Core subscribers ask for an unbounded buffer so that nothing they must act on is
dropped; observers (webhooks, SSE, tests) take a bounded one and learn how many they missed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import trio


@dataclass(frozen=True, slots=True)
class Event:
    """``kind`` is dotted, ``area.verb`` (``service.claim``, ``agent.dead``, ``lock.release``)."""

    kind: str
    data: dict[str, Any]
    at: int = field(default_factory=lambda: int(time.time() * 1000))

    def matches(self, prefixes: frozenset[str] | None) -> bool:
        if prefixes is None:
            return True
        return self.kind in prefixes or self.kind.split(".", 1)[0] in prefixes


@dataclass(slots=True)
class _Subscriber:
    send: trio.MemorySendChannel[Event]
    kinds: frozenset[str] | None
    dropped: int = 0


class EventBus:
    def __init__(self) -> None:
        self._subscribers: list[_Subscriber] = []
        self.emitted = 0

    def emit(self, kind: str, **data: Any) -> Event:
        event = Event(kind, data)
        self.emitted += 1
        for sub in self._subscribers:
            if event.matches(sub.kinds):
                try:
                    sub.send.send_nowait(event)
                except trio.WouldBlock:
                    sub.dropped += 1
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        return event

    @contextmanager
    def subscribe(
        self, *kinds: str, buffer: float = math.inf
    ) -> Iterator[trio.MemoryReceiveChannel[Event]]:
        """Receive events whose kind, or whose area (``agent``), is in ``kinds`` (all when empty)."""
        send, receive = trio.open_memory_channel[Event](buffer)
        sub = _Subscriber(send, frozenset(kinds) if kinds else None)
        self._subscribers.append(sub)
        try:
            yield receive
        finally:
            self._subscribers.remove(sub)
            send.close()
