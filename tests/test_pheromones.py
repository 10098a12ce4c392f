"""Pheromones: the decay law under trio's MockClock, fire-and-forget and acknowledged sprays, durability across
SIGKILL, and the file heat map built from file-claim events."""

from __future__ import annotations

import json
import math
import time

import apsw
import pytest
import trio
import trio.testing

from portdaddy.core import decay
from portdaddy.core.harbors import Harbors
from portdaddy.core.pheromones import Pheromones
from tests.swarm_app import make_app

HALF_LIFE_S = 600.0


@pytest.fixture
def app(tmp_path):
    app = make_app(tmp_path)
    app.add(Harbors(app))
    yield app
    app.store.close()


async def test_decay_half_life_floor_and_monotonic(app, mock_clock) -> None:
    ph = Pheromones(app, half_life_s=HALF_LIFE_S)
    ph.spray("services", "myapp:api", "urgency", 1.0)
    assert ph.sniff("services", "myapp:api") == {"urgency": 1.0}
    mock_clock.jump(HALF_LIFE_S)
    assert ph.sniff("services", "myapp:api")["urgency"] == pytest.approx(0.5, abs=1e-3)
    mock_clock.jump(HALF_LIFE_S)
    assert ph.sniff("services", "myapp:api")["urgency"] == pytest.approx(0.25, abs=1e-3)
    previous = 0.25
    vanish_at = HALF_LIFE_S * math.log2(1 / decay.FLOOR)  # from the spray: 1.0 * 0.5^(t/h) < 0.01
    elapsed = 2 * HALF_LIFE_S
    while elapsed + 60 < vanish_at - 1:
        mock_clock.jump(60)
        elapsed += 60
        value = ph.sniff("services", "myapp:api")["urgency"]
        assert value <= previous
        previous = value
    assert previous >= decay.FLOOR
    mock_clock.jump(vanish_at - elapsed + 1)
    assert ph.sniff("services", "myapp:api") == {}
    assert ph.all() == []
    ph.flush()
    assert app.store.scalar("SELECT count(*) FROM pheromones") == 0  # a vanished mark leaves the store too


async def test_respray_replaces_the_faded_value(app, mock_clock) -> None:
    ph = Pheromones(app, half_life_s=HALF_LIFE_S)
    ph.spray("files", "src/a.py", "heat", 0.8)
    mock_clock.jump(3 * HALF_LIFE_S)
    ph.spray("files", "src/a.py", "heat", 0.6)
    assert ph.sniff("files", "src/a.py") == {"heat": 0.6}


async def test_half_life_from_env(app, monkeypatch) -> None:
    monkeypatch.setenv("PORT_DADDY_PHEROMONE_HALF_LIFE", "90s")
    assert Pheromones(app).half_life_s == 90
    monkeypatch.delenv("PORT_DADDY_PHEROMONE_HALF_LIFE")
    assert Pheromones(app).half_life_s == pytest.approx(13.51 * 60, rel=1e-3)


async def test_fire_and_forget_sprays_are_batched_within_a_second(app, mock_clock) -> None:
    ph = Pheromones(app, half_life_s=HALF_LIFE_S)
    async with trio.open_nursery() as nursery:
        await nursery.start(ph.run)
        for n in range(100):
            ph.spray("agents", f"a{n}", "load", 0.5, durable=False)
        assert ph.sniff("agents", "a7") == {"load": 0.5}  # memory first
        await trio.testing.wait_all_tasks_blocked()
        assert app.store.scalar("SELECT count(*) FROM pheromones") == 0
        mock_clock.jump(1.0)
        await trio.testing.wait_all_tasks_blocked()
        assert app.store.scalar("SELECT count(*) FROM pheromones") == 100
        nursery.cancel_scope.cancel()


async def test_marks_nobody_reads_evaporate_from_memory_and_the_store(app, mock_clock) -> None:
    ph = Pheromones(app, half_life_s=HALF_LIFE_S)
    async with trio.open_nursery() as nursery:
        await nursery.start(ph.run)
        for n in range(50):  # e.g. one spray per edited file, never sniffed
            ph.spray("files", f"src/f{n}.py", "edit", 1.0)
        mock_clock.jump(5 * HALF_LIFE_S)
        ph.spray("files", "src/recent.py", "edit", 1.0)
        assert ph.stats()["pheromones"] == 51
        for _ in range(3):  # under the floor after log2(100) = 6.6 half-lives; swept at the next one
            mock_clock.jump(HALF_LIFE_S)
            await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(1.0)  # the write-behind flush
        await trio.testing.wait_all_tasks_blocked()
        assert ph.stats()["pheromones"] == 1
        assert app.store.scalar("SELECT count(*) FROM pheromones") == 1
        nursery.cancel_scope.cancel()


async def test_file_heat_from_claim_events(app, mock_clock) -> None:
    ph = Pheromones(app, half_life_s=HALF_LIFE_S)
    async with trio.open_nursery() as nursery:
        await nursery.start(ph.run)
        app.bus.emit("file.claim", sessionId="s1", agentId="alice", paths=["src/api/auth.ts", "src/api/db.ts"],
                     conflicts=[], forced=False)  # fmt: skip
        app.bus.emit("file.claim", sessionId="s2", agentId="bob", paths=["src/api/auth.ts"],
                     conflicts=[{"path": "src/api/auth.ts", "sessionId": "s1"}], forced=True)  # fmt: skip
        await trio.testing.wait_all_tasks_blocked()
        heat = ph.file_heat("src/")
        files = {f["path"]: f for f in heat["files"]}
        assert files["src/api/auth.ts"]["conflict"] and sorted(files["src/api/auth.ts"]["agents"]) == ["alice", "bob"]
        assert not files["src/api/db.ts"]["conflict"]
        assert files["src/api/auth.ts"]["heat"] > files["src/api/db.ts"]["heat"]
        assert heat["summary"] == {"totalFiles": 2, "activeConflicts": 1, "hottestFile": "src/api/auth.ts",
                                   "hottestDir": "src"}  # fmt: skip
        app.bus.emit("file.release", sessionId="s2", agentId="bob", paths=["src/api/auth.ts"])
        app.bus.emit("session.end", sessionId="s1", agentId="alice", status="completed")
        await trio.testing.wait_all_tasks_blocked()
        cooled = {f["path"]: f for f in ph.file_heat()["files"]}
        assert not cooled["src/api/auth.ts"]["conflict"] and cooled["src/api/auth.ts"]["activeClaims"] == 0
        assert cooled["src/api/auth.ts"]["totalClaims"] == 2
        mock_clock.jump(6 * 3600)  # history cools with time
        assert ph.file_heat()["files"][0]["heat"] < 0.01
        nursery.cancel_scope.cancel()


def _stored_ids(d) -> set[str]:
    """What the store itself holds, read beside the daemon, so that no read of the daemon's writes it first."""
    with apsw.Connection(str(d.settings.db), flags=apsw.SQLITE_OPEN_READONLY) as db:
        return {row[0] for row in db.execute("SELECT entity_id FROM pheromones")}


def test_cli_and_sigkill_keep_values(fresh_daemon) -> None:
    d = fresh_daemon
    r = d.pd("pheromone", "spray", "--table", "services", "--id", "myapp:api", "--key", "urgency", "--strength", "0.8")
    assert r.returncode == 0, r.stderr
    with d.client() as c:
        c.send("pheromone.spray", {"table": "files", "id": "src/x.py", "key": "heat", "strength": 0.5})
        deadline = time.monotonic() + 5
        while not c.request("pheromone.sniff", {"table": "files", "id": "src/x.py"})["pheromones"]:
            assert time.monotonic() < deadline
    # Both sprays are written behind, within a second: kill it once the store has them (what a restart reads).
    deadline = time.monotonic() + 5
    while _stored_ids(d) != {"myapp:api", "src/x.py"}:
        assert time.monotonic() < deadline, _stored_ids(d)
        time.sleep(0.05)
    d.kill9()
    d.start()
    sniffed = d.pd("pheromone", "sniff", "--table", "services", "--id", "myapp:api", "--json")
    assert 0.79 <= json.loads(sniffed.stdout)["pheromones"]["urgency"] <= 0.8
    assert d.call("pheromone.sniff", table="files", id="src/x.py")["pheromones"]["heat"] == pytest.approx(0.5, abs=0.01)
    assert {p["id"] for p in d.call("pheromone.list")["pheromones"]} == {"myapp:api", "src/x.py"}


@pytest.mark.parametrize("args", [
    ("--table", "services", "--id", "x", "--key", "k", "--strength", "1.5"),
    ("--table", "services", "--id", "x", "--key", "k", "--strength", "nan"),
    ("--table", "services", "--id", "x", "--key", "bad key", "--strength", "0.5"),
    ("--table", "nope", "--id", "x", "--key", "k", "--strength", "0.5"),
])  # fmt: skip
def test_bad_spray_exits_2_and_changes_nothing(daemon, args) -> None:
    before = daemon.call("pheromone.list")["count"]
    r = daemon.pd("pheromone", "spray", *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert daemon.call("pheromone.list")["count"] == before
