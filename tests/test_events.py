"""The event bus: area and kind subscriptions, hot kinds kept from catch-all subscribers, bounded watchers, inline
observers."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from portdaddy.core.events import EventBus
from portdaddy.core.store import Store


def drain(rx: trio.MemoryReceiveChannel) -> list[str]:
    kinds = []
    while True:
        try:
            kinds.append(rx.receive_nowait().kind)
        except trio.WouldBlock:
            return kinds


async def test_routing_by_kind_area_and_catch_all() -> None:
    bus = EventBus()
    with (
        bus.subscribe() as everything,
        bus.subscribe("agent") as agents,
        bus.subscribe("pheromone.spray") as sprays,
        bus.subscribe("*", "msg.publish") as all_and_publishes,
    ):
        for kind in ("agent.register", "lock.acquire", "pheromone.spray", "msg.publish", "agent.heartbeat"):
            bus.emit(kind, n=1)
        assert drain(everything) == ["agent.register", "lock.acquire"]  # hot kinds only by name or area
        assert drain(agents) == ["agent.register", "agent.heartbeat"]
        assert drain(sprays) == ["pheromone.spray"]
        assert drain(all_and_publishes) == ["agent.register", "lock.acquire", "msg.publish"]
    assert bus.emit("agent.register") is None  # nobody listens any more: nothing is built


async def test_a_bounded_watcher_counts_what_it_missed() -> None:
    bus = EventBus()
    with bus.subscribe("lock", buffer=2) as rx:
        for _ in range(5):
            bus.emit("lock.acquire")
        assert len(drain(rx)) == 2
        assert bus._subscribers[0].dropped == 3


async def test_wants_keeps_unwanted_events_out_of_the_queue() -> None:
    bus = EventBus()
    with bus.subscribe("msg.publish", wants=lambda kind, data: data["channel"] == "git:committed") as rx:
        for channel in ("noise", "git:committed", "noise"):
            bus.emit("msg.publish", channel=channel)
        assert rx.statistics().current_buffer_used == 1
        assert rx.receive_nowait().data["channel"] == "git:committed"


async def test_an_observer_runs_inline_and_its_failure_stays_its_own(caplog) -> None:
    bus = EventBus()
    seen: list[str] = []

    def flaky(event) -> None:
        seen.append(event.kind)
        if event.kind == "lock.release":
            raise RuntimeError("observer bug")

    with bus.observe(flaky), bus.subscribe("lock") as locks:
        bus.emit("lock.acquire", name="db")
        assert seen == ["lock.acquire"]  # before emit returned: no task had to run
        bus.emit("lock.release", name="db")  # the observer raises; the emitter does not see it
        bus.emit("msg.publish", channel="c")  # hot kinds reach observers only by name, like subscribers
        assert seen == ["lock.acquire", "lock.release"]
        assert drain(locks) == ["lock.acquire", "lock.release"]  # other subscribers still get the event
    assert "observer failed on lock.release" in caplog.text
    bus.emit("lock.acquire", name="db")
    assert seen == ["lock.acquire", "lock.release"]  # gone once its block ends


async def test_an_event_of_a_write_is_delivered_once_it_commits_and_never_if_it_rolls_back(tmp_path: Path) -> None:
    store = Store(tmp_path / "portdaddy.db")
    bus = EventBus(store)
    observed: list[tuple[str, bool]] = []
    with bus.observe(lambda ev: observed.append((ev.kind, store.db.in_transaction))), bus.subscribe() as rx:
        with store.write():
            bus.emit("session.start", sessionId="s1")
            with store.write():
                bus.emit("note.add", sessionId="s1")
            assert observed == [] and drain(rx) == []  # not yet: the write may still be refused
        assert observed == [("session.start", False), ("note.add", False)]  # in order, after the COMMIT
        assert drain(rx) == ["session.start", "note.add"]
        with pytest.raises(ValueError), store.write():
            bus.emit("session.end", sessionId="s1")
            raise ValueError
        bus.emit("agent.register", agentId="a")  # outside a write: at once
        assert [kind for kind, _ in observed[2:]] == ["agent.register"] and drain(rx) == ["agent.register"]
