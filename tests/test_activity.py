"""The activity log's rows, driven in-process: what a row keeps, how it reads back, what retention leaves."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio
import trio.testing

from portdaddy.core import activity
from portdaddy.core.events import Event
from tests.swarm_app import make_app


@pytest.fixture
def log(tmp_path: Path):
    app = make_app(tmp_path)
    yield activity.Activity(app)
    app.store.close()


def test_details_are_made_on_read_and_written_only_for_metadata_too_long_to_keep(log) -> None:
    """A row's details are its metadata's, for people: writing them as well cost a third of every row."""
    log.write([Event("lock.release", {"name": "db:migrate", "owner": "alice", "token": 7, "forced": False,
                                      "paths": ["src/a.ts", "src/b.ts"], "hash": "ab12"}),
               Event("note.add", {"sessionId": "s1", "content": "x" * (activity.MAX_METADATA + 1)})])  # fmt: skip
    stored = log.store.all("SELECT type, details, metadata FROM activity ORDER BY id")
    assert stored[0][1] is None and stored[1][1] is not None and stored[1][2] == '{"truncated":true}'
    big, small = log.entries(limit=10)
    assert small["details"] == "name=db:migrate, owner=alice, token=7, forced=False; paths=src/a.ts,src/b.ts"
    assert (small["agentId"], small["targetId"], small["metadata"]["token"]) == ("alice", "db:migrate", 7)
    assert big["details"].startswith("sessionId=s1, content=xxx") and len(big["details"]) == activity.MAX_DETAILS
    assert big["metadata"] == {"truncated": True} and big["targetId"] == "s1"


def test_a_row_written_with_its_details_reads_them_as_written(log) -> None:
    """Rows from before details were made on read keep theirs."""
    log.store.execute("INSERT INTO activity (timestamp, type, agent_id, target_id, details, metadata) "
                      "VALUES (1, 'lock.acquire', 'bob', 'l', 'as it was written', '{\"name\":\"l\"}')")  # fmt: skip
    (entry,) = log.entries(limit=10)
    assert entry["details"] == "as it was written" and entry["metadata"] == {"name": "l"}


def test_the_log_keeps_a_week_and_the_newest_rows(log, monkeypatch) -> None:
    monkeypatch.setattr(activity, "MAX_ROWS", 5)
    monkeypatch.setattr(activity, "PRUNE_EVERY", 4)
    week_ago = int(time.time() * 1000) - activity.RETENTION_MS - 1
    log.write([Event("lock.acquire", {"name": f"old{i}"}, at=week_ago) for i in range(2)])
    log.write([Event("lock.acquire", {"name": f"new{i}"}) for i in range(2)])  # the 4th row: a prune
    assert [e["targetId"] for e in log.entries(limit=10)] == ["new1", "new0"]
    for i in range(2, 10):
        log.write([Event("lock.acquire", {"name": f"new{i}"})])  # the 12th: a prune
    assert [e["targetId"] for e in log.entries(limit=10)] == [f"new{i}" for i in range(9, 4, -1)]


async def test_a_long_burst_is_written_without_waiting_out_the_batch_time(tmp_path: Path, mock_clock) -> None:
    """A second of lock churn was written in one go, holding every connection for ~150 ms: a batch is written
    once BATCH_ROWS events wait, whatever the clock says (here it stands still)."""
    app = make_app(tmp_path)
    log = activity.Activity(app)
    stored = lambda: app.store.scalar("SELECT count(*) FROM activity")  # noqa: E731
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        for i in range(activity.BATCH_ROWS - 1):
            app.bus.emit("lock.acquire", name=f"churn{i}", owner="churner")
        await trio.testing.wait_all_tasks_blocked()
        assert stored() == 0
        app.bus.emit("lock.release", name="churn0", owner="churner")
        await trio.testing.wait_all_tasks_blocked()
        assert stored() == activity.BATCH_ROWS
        mock_clock.jump(activity.BATCH_S)  # and the time-based batch still follows a quiet spell
        app.bus.emit("lock.release", name="churn1", owner="churner")
        await trio.testing.wait_all_tasks_blocked()
        assert stored() == activity.BATCH_ROWS
        mock_clock.jump(activity.BATCH_S)
        await trio.testing.wait_all_tasks_blocked()
        assert stored() == activity.BATCH_ROWS + 1
        nursery.cancel_scope.cancel()
    app.store.close()
