"""Pub/sub through the real daemon: retained messages (the blocking chain in both orders), wildcards, durable
history with global ids, SSE resume with Last-Event-ID, long-poll woken by publish, slow subscribers that do
not grow the daemon, the SDK, and bad input."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import trio
from conftest import Daemon, shared_daemon, traceback_frames, unix_client

import portdaddy.sdk
from portdaddy.core.broker import HTTP_REPLY_BUDGET
from portdaddy.errors import PDError, StoreError, Timeout
from portdaddy.ipc.client import BlockingClient


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def _subscriptions(d) -> int:
    return d.call("daemon.status")["counts"]["subscriptions"]


def _finish(proc: subprocess.Popen[str], timeout: float = 10) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_blocking_chain_publish_first(daemon) -> None:
    assert daemon.pd("pub", "chain1:complete", '{"status":"ready"}').returncode == 0
    r = daemon.pd("sub", "chain1:complete", "--once", timeout=10)
    assert r.returncode == 0 and json.loads(r.stdout) == {"status": "ready"}
    w = daemon.pd("wait", "chain1:complete", "--timeout", "1s")
    assert w.returncode == 0 and "ready" in w.stdout


def test_pub_of_text_nested_too_deep_for_json_sends_the_text(daemon) -> None:
    deep = "[" * 3000 + "]" * 3000  # json's decoder recurses per level: this used to be a CLI traceback
    r = daemon.pd("pub", "deep:text", deep)
    assert r.returncode == 0, r.stderr
    assert daemon.call("msg.history", channel="deep:text")["messages"][-1]["payload"] == deep


def test_blocking_chain_subscribe_first(daemon) -> None:
    before = _subscriptions(daemon)
    sub = daemon.spawn_pd("sub", "chain2:complete", "--once")
    waiter = daemon.spawn_pd("wait", "chain2:complete", "chain2:other", "--json")
    _wait_for(lambda: _subscriptions(daemon) == before + 1)
    time.sleep(0.2)
    assert sub.poll() is None and waiter.poll() is None
    daemon.pd("pub", "chain2:complete", "done")
    code, out, _ = _finish(sub)
    assert (code, out) == (0, "done\n")
    assert waiter.poll() is None  # still needs chain2:other
    daemon.pd("pub", "chain2:other", "1")
    code, out, _ = _finish(waiter)
    assert code == 0 and set(json.loads(out)["messages"]) == {"chain2:complete", "chain2:other"}


def test_wildcard_subscriber_receives_every_ready_signal(daemon) -> None:
    before = _subscriptions(daemon)
    sub = daemon.spawn_pd("sub", "payments:*", "--json", "--new")
    _wait_for(lambda: _subscriptions(daemon) == before + 1)
    for part in ("schema", "api", "queries", "frontend"):
        daemon.call("msg.publish", channel=f"payments:{part}", payload={"status": "ready"}, sender=part)
    daemon.call("msg.publish", channel="payments", payload="not under payments:*")
    daemon.call("msg.publish", channel="billing:api", payload="other project")
    daemon.call("msg.publish", channel="payments:api:v2", payload="deeper")
    lines = []
    _wait_for(lambda: lines.append(sub.stdout.readline()) or len(lines) == 5)
    sub.kill()
    sub.communicate()
    got = [json.loads(line) for line in lines]
    assert [m["channel"] for m in got] == ["payments:schema", "payments:api", "payments:queries",
                                           "payments:frontend", "payments:api:v2"]  # fmt: skip
    assert [m["id"] for m in got] == sorted(m["id"] for m in got)
    # A late wildcard subscriber still sees each channel's retained (last) message.
    late = json.loads(daemon.pd("history", "payments:*", "--json").stdout)
    assert len(late["messages"]) == 5


def test_history_ids_are_global_and_survive_sigkill(fresh_daemon) -> None:
    ids = [fresh_daemon.call("msg.publish", channel=f"h:{i % 2}", payload=i)["id"] for i in range(6)]
    assert ids == sorted(ids) and len(set(ids)) == 6
    fresh_daemon.kill9()
    fresh_daemon.start()
    hist = fresh_daemon.call("msg.history", channel="h:0")
    assert [m["payload"] for m in hist["messages"]] == [0, 2, 4]
    assert [m["id"] for m in fresh_daemon.call("msg.history", channel="h:*", after=ids[3])["messages"]] == ids[4:]
    assert fresh_daemon.call("msg.publish", channel="h:0", payload="after")["id"] > ids[-1]
    r = fresh_daemon.pd("sub", "h:1", "--once")
    assert r.stdout == "5\n"  # retained across the restart


def test_fire_and_forget_publishes_are_pushed_at_once_and_their_ids_never_reused(daemon_factory) -> None:
    d = daemon_factory(PORT_DADDY_IPC_RATE="0")
    acknowledged = d.call("msg.publish", channel="ffw:x", payload="kept")["id"]
    with d.client() as sub, d.client() as pub:
        sub.request("msg.subscribe", {"channels": ["ffw:*"], "new": True})
        for i in range(50):
            pub.send("msg.publish", {"channel": "ffw:x", "payload": i})
        seen = [sub.receive(timeout=5).payload for _ in range(50)]
    assert [m["payload"] for m in seen] == list(range(50))
    ids = [m["id"] for m in seen]
    assert ids == list(range(acknowledged + 1, acknowledged + 51))  # in order, from memory
    # Reading history writes what is pending first: it sees every message it was told about.
    assert [m["id"] for m in d.call("msg.history", channel="ffw:x", after=acknowledged)["messages"]] == ids
    with d.client() as pub:
        for i in range(50, 60):  # written behind, and the daemon dies before the second is up
            pub.send("msg.publish", {"channel": "ffw:x", "payload": i})
        pub.request("daemon.health")  # handled, pushed, not yet on disk
        d.kill9()
    d.start()
    history = d.call("msg.history", channel="ffw:x", after=0, limit=500)["messages"]
    assert [m["id"] for m in history][:51] == [acknowledged, *ids]  # acknowledged or read: on disk
    after = d.call("msg.publish", channel="ffw:x", payload="after")["id"]
    assert after > max(m["id"] for m in history)  # a lost fire-and-forget id is a gap, never a reused id
    assert after > ids[-1] + 10


def test_history_is_capped_per_channel(daemon_factory) -> None:
    from portdaddy.core.broker import HISTORY_PER_CHANNEL

    fresh_daemon = daemon_factory(PORT_DADDY_IPC_RATE="0")
    with fresh_daemon.client() as c:
        for i in range(HISTORY_PER_CHANNEL + HISTORY_PER_CHANNEL // 10 + 1):
            c.request("msg.publish", {"channel": "cap:x", "payload": i})
    [info] = fresh_daemon.call("msg.channels")["channels"]
    assert info["count"] == HISTORY_PER_CHANNEL
    oldest = fresh_daemon.call("msg.history", channel="cap:x", after=0, limit=1)["messages"][0]
    assert oldest["payload"] == HISTORY_PER_CHANNEL // 10 + 1


def test_sse_resume_with_last_event_id_misses_nothing(daemon) -> None:
    transport = httpx.HTTPTransport(uds=str(daemon.settings.http_sock))

    def read_events(client: httpx.Client, n: int, headers: dict[str, str]) -> list[dict]:
        events = []
        with client.stream("GET", "/msg/sse:*/subscribe", headers=headers, timeout=10) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            event_id = None
            for line in r.iter_lines():
                if line.startswith("id: "):
                    event_id = int(line[4:])
                elif line.startswith("data: ") and event_id is not None:
                    data = json.loads(line[6:])
                    assert data["id"] == event_id
                    events.append(data)
                    event_id = None
                    if len(events) == n:
                        return events
        return events

    for i in range(3):
        daemon.call("msg.publish", channel=f"sse:{i}", payload={"n": i})
    with httpx.Client(transport=transport, base_url="http://x") as client:
        first = read_events(client, 3, {})  # the retained message of each channel
        assert [e["payload"]["n"] for e in first] == [0, 1, 2]
        for i in range(3, 10):
            daemon.call("msg.publish", channel=f"sse:{i % 3}", payload={"n": i})
        resumed = read_events(client, 7, {"Last-Event-ID": str(first[-1]["id"])})
        assert [e["payload"]["n"] for e in resumed] == list(range(3, 10))
        bad = client.get("/msg/a::b/subscribe")
        assert bad.status_code == 400 and "empty ':' segment" in bad.json()["error"]


def test_long_poll_wakes_on_publish_not_on_a_tick(daemon) -> None:
    after = daemon.call("msg.publish", channel="lp:x", payload="old")["id"]
    result: dict = {}

    def poll() -> None:
        result.update(daemon.call("msg.poll", channel="lp:x", after=after, timeout="10s"))
        result["at"] = time.monotonic()

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.3)
    assert not result
    published = time.monotonic()
    new_id = daemon.call("msg.publish", channel="lp:x", payload="new")["id"]
    t.join(timeout=10)
    assert result["message"]["id"] == new_id and result["lastId"] == new_id
    assert result["at"] - published < 0.25
    empty = daemon.call("msg.poll", channel="lp:x", after=new_id, timeout=200)
    assert empty["message"] is None and empty["lastId"] == new_id


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _age_messages(d, up_to_id: int, age_ms: int) -> None:
    """Make the messages with ids up to ``up_to_id`` ``age_ms`` old, as if published that long ago (stopped)."""
    with sqlite3.connect(d.settings.db) as db:
        db.execute("UPDATE messages SET created_at=? WHERE id<=?", (int(time.time() * 1000) - age_ms, up_to_id))


def test_history_ages_out_and_silent_channels_are_forgotten_while_ids_keep_growing(fresh_daemon) -> None:
    """Every channel ever used stayed in the store and in the broker's memory (each inbox message lands on
    inbox:<agent> too, and fleet runs are agents of their own). History goes after a week, except a channel's
    retained message, which goes once the channel has been silent a month, and the channel with it."""
    from portdaddy.core.broker import CHANNEL_RETENTION_MS, HISTORY_RETENTION_MS

    d, day = fresh_daemon, 86_400_000
    for i in range(3):
        d.call("msg.publish", channel="gone:quiet", payload=i)
    d.call("inbox.send", to="run-7", content="your task")
    [copy] = d.call("msg.history", channel="inbox:run-7")["messages"]
    signal = [d.call("msg.publish", channel="kept:signal", payload=i)["id"] for i in range(3)]
    live = d.call("msg.publish", channel="kept:live", payload="now")["id"]
    d.stop()
    _age_messages(d, signal[-1], HISTORY_RETENTION_MS + day)
    _age_messages(d, copy["id"], CHANNEL_RETENTION_MS + day)
    d.start()
    assert {c["channel"] for c in d.call("msg.channels")["channels"]} == {"kept:signal", "kept:live"}
    assert d.call("daemon.status")["counts"]["channels"] == 2  # memory follows the store
    assert [m["id"] for m in d.call("msg.history", channel="*", after=0)["messages"]] == [signal[-1], live]
    assert d.pd("sub", "kept:signal", "--once").stdout == "2\n"  # the retained message outlives its history
    assert d.pd("wait", "kept:signal", "--timeout", "1s").returncode == 0
    assert [m["content"] for m in d.call("inbox.list", agentId="run-7")["messages"]] == ["your task"]  # its own rules
    again = d.call("msg.publish", channel="gone:quiet", payload="back")["id"]
    assert again > live and d.pd("sub", "gone:quiet", "--once").stdout == "back\n"

    d.stop()  # everything silent for a month: nothing is left, and ids still only grow
    _age_messages(d, again, CHANNEL_RETENTION_MS + day)
    d.start()
    assert d.call("msg.channels")["count"] == 0 and d.call("daemon.status")["counts"]["channels"] == 0
    assert d.call("msg.history", channel="*", after=0)["messages"] == []
    assert d.call("msg.publish", channel="gone:quiet", payload="later")["id"] > again


class _Connection:
    """What the broker needs of an IPC connection: a bounded output that takes every delivery."""

    def __init__(self) -> None:
        self.data: dict = {}
        self.closed = False
        self.pushed: list[dict] = []

    def on_close(self, callback) -> None:
        pass

    def push(self, frame: dict) -> bool:
        self.pushed.append(frame)
        return True


def test_the_hourly_prune_leaves_subscriptions_and_cursors_alone(tmp_path) -> None:
    """Forgetting a channel drops its memory, not the subscriptions to it: they get the next message, whose id
    is above every id handed out before, and a cursor older than what is left reads what is left."""
    from portdaddy.core.broker import CHANNEL_RETENTION_MS, HISTORY_RETENTION_MS, Broker
    from portdaddy.core.clock import now_ms
    from tests.swarm_app import make_app

    app = make_app(tmp_path)
    broker = Broker(app)
    ids = [broker.post("p:x", i).id for i in range(5)]
    conn = _Connection()
    broker.subscribe(conn, ("p:x",), after=None, new=True)
    assert broker.prune(now_ms() + HISTORY_RETENTION_MS + 1000) == 4
    assert [m.id for m in broker.since(["p:x"], 0)] == ids[-1:] and broker.channels()[0]["count"] == 1
    assert broker.prune(now_ms() + CHANNEL_RETENTION_MS + 1000) == 1
    assert broker.channels() == [] and broker.retained(["*"]) == [] and broker.stats()["channels"] == 0
    assert broker.stats()["subscriptions"] == 1
    after = broker.post("p:x", "next")
    assert after.id > ids[-1] and [f["id"] for f in conn.pushed] == [after.id]
    assert [m.id for m in broker.since(["p:x"], ids[0])] == [after.id]
    app.store.close()


def test_slow_subscriber_does_not_grow_daemon_memory(daemon_factory) -> None:
    d = daemon_factory(PORT_DADDY_IPC_RATE="0")
    payload = "x" * 2000
    slow = BlockingClient(d.settings.ipc_sock, timeout=10).connect()
    sub = slow.request("msg.subscribe", {"channels": ["slow:*"], "new": True})
    with d.client() as pub:
        for i in range(500):  # warm up allocator and page cache before measuring
            pub.request("msg.publish", {"channel": f"warm:{i % 10}", "payload": payload})
        base = _rss_kb(d.proc.pid)
        started = time.monotonic()
        for i in range(10_000):
            pub.send("msg.publish", {"channel": f"slow:{i % 20}", "payload": payload})
            if i % 1000 == 999:
                pub.request("daemon.health")  # keep the daemon in step with the sender
        assert time.monotonic() - started < 30
        grown_mb = (_rss_kb(d.proc.pid) - base) / 1024
    assert grown_mb < 12, f"daemon grew {grown_mb:.1f} MB for 20 MB published to a subscriber that never read"
    assert d.call("daemon.status")["counts"]["lagging"] == 1
    # The subscriber reads again: what it got, then one notice saying where to resume from history.
    deliveries, notice = 0, None
    while notice is None:
        frame = slow.receive(timeout=10)
        assert frame is not None
        if frame.payload["action"] == "msg.delivery":
            deliveries += 1
        else:
            notice = frame.payload
    assert notice["action"] == "msg.missed" and notice["subscription"] == sub["subscription"]
    assert deliveries + notice["missed"] == 10_000
    resumed = slow.request("msg.history", {"channel": ["slow:*"], "after": notice["after"], "limit": 5})
    assert resumed["messages"][0]["id"] > notice["after"]
    slow.close()


async def test_sdk_subscription_survives_a_daemon_restart(fresh_daemon) -> None:
    d = fresh_daemon
    connected = portdaddy.sdk.connect(settings=d.settings, autostart=False)
    async with connected as pd, pd.subscribe("deploy:*", new=True) as sub:
        first = await pd.publish_confirmed("deploy:api", "before")
        with trio.fail_after(5):
            assert (await sub.__anext__()).id == first
        await trio.to_thread.run_sync(d.kill9)
        await trio.to_thread.run_sync(d.start)
        # Published by someone else before this client has reconnected (backoff starts at 1 s).
        with BlockingClient(d.settings.ipc_sock) as other:
            missed = [other.request("msg.publish", {"channel": f"deploy:{n}", "payload": n})["id"]
                      for n in range(3)]  # fmt: skip
        got = []
        with trio.fail_after(15):
            while len(got) < 3:
                got.append((await sub.__anext__()).id)
        assert got == missed  # nothing lost, nothing twice, in order
        with trio.fail_after(5):
            while True:  # and live deliveries flow on the renewed subscription
                live = await pd.publish_confirmed("deploy:web", "after")
                if (await sub.__anext__()).id == live:
                    break


async def test_sdk_history_says_whether_there_is_more_and_where_to_read_on(daemon) -> None:
    """pd.history() returned a bare list: a page cut at its limit (or at the size of a reply) looked like all there
    was, with no cursor to read on from. It is still a list of the messages, with more and last_id."""
    ids = [daemon.call("msg.publish", channel="sdk:paged", payload=n)["id"] for n in range(3)]
    async with portdaddy.sdk.connect(settings=daemon.settings, autostart=False) as pd:
        first = await pd.history("sdk:paged", after=0, limit=2)
        assert ([m.id for m in first], first.more, first.last_id) == (ids[:2], True, ids[1])
        rest = await pd.history("sdk:paged", after=first.last_id)
        assert ([m.payload for m in rest], rest.more, rest.last_id) == ([2], False, ids[2])
        caught_up = await pd.history("sdk:paged", after=rest.last_id)
        assert (caught_up, caught_up.more, caught_up.last_id) == ([], False, ids[2])
        newest = await pd.history("sdk:paged", limit=2)
        assert newest == [*first[1:], *rest] and isinstance(newest, list) and not newest.more


async def test_sdk_pubsub_locks_and_catch_up(daemon_factory) -> None:
    daemon = daemon_factory(PORT_DADDY_IPC_RATE="0")
    async with portdaddy.sdk.connect(settings=daemon.settings, autostart=False) as pd:
        await pd.publish_confirmed("sdk:ready", {"ok": True})
        got = await pd.wait_for_signal("sdk:ready", timeout=5)
        assert got.payload == {"ok": True}
        with pytest.raises(Timeout):
            await pd.wait_for_signal("sdk:never", timeout=0.2)
        async with pd.subscribe("sdkq:*", new=True) as sub:
            # 3,000 messages arrive while the reader sleeps: the SDK buffer overflows and history fills the gap.
            async with portdaddy.sdk.connect(settings=daemon.settings, autostart=False) as other:
                sent = [await other.publish_confirmed(f"sdkq:{i % 3}", i) for i in range(3000)]
            received = []
            with trio.fail_after(20):
                async for msg in sub:
                    received.append(msg.id)
                    if len(received) == 3000:
                        break
            assert received == sent
        grant = await pd.lock("sdk:lock", owner="first")
        assert grant is not None and grant.token > 0
        async with portdaddy.sdk.connect(settings=daemon.settings, autostart=False) as other:
            assert await other.lock("sdk:lock", blocking=False, owner="second") is None
        assert await pd.unlock("sdk:lock", token=grant.token)
        async with pd.with_lock("sdk:with", ttl=0.3) as held:
            await trio.sleep(0.5)  # longer than the lease: renewed meanwhile
            assert (await pd.call("lock.get", name="sdk:with"))["token"] == held.token
        assert (await pd.call("lock.get", name="sdk:with"))["held"] is False


def test_fire_and_forget_publish_and_duplicate_subscription(daemon) -> None:
    with daemon.client() as c:
        c.send("msg.publish", {"channel": "ff:x", "payload": "quick"})
        first = c.request("msg.subscribe", {"channels": ["ff:x"]})
        again = c.request("msg.subscribe", {"channels": ["ff:x"]})
        assert again["existing"] is True and again["subscription"] == first["subscription"]
        frame = c.receive(timeout=5)
        assert frame.payload["payload"] == "quick" and frame.payload["action"] == "msg.delivery"


def test_subscriptions_per_connection_are_limited(daemon) -> None:
    with daemon.client() as c:
        for n in range(64):
            c.request("msg.subscribe", {"channels": [f"lim:{n}"], "new": True})
        with pytest.raises(PDError) as refused:
            c.request("msg.subscribe", {"channels": ["lim:one-too-many"], "new": True})
        assert refused.value.code == "RESOURCE_LIMIT" and "unsubscribe" in refused.value.message
        c.request("msg.unsubscribe", {"subscription": None})
        assert c.request("msg.subscribe", {"channels": ["lim:again"], "new": True})["existing"] is False


def test_http_publish_history_and_channels(daemon) -> None:
    transport = httpx.HTTPTransport(uds=str(daemon.settings.http_sock))
    with httpx.Client(transport=transport, base_url="http://x") as c:
        r = c.post("/msg/web:events", json={"payload": {"a": 1}, "sender": "curl"})
        assert r.status_code == 200
        hist = c.get("/msg/web:events").json()
        assert hist["messages"][-1]["payload"] == {"a": 1} and hist["messages"][-1]["sender"] == "curl"
        assert any(ch["channel"] == "web:events" for ch in c.get("/channels").json()["channels"])
        assert c.delete("/msg/web:events").json()["deleted"] == 1


def test_http_history_of_large_messages_comes_in_bounded_pages(daemon) -> None:
    """GET /msg/<channel> had no bound: 1,000 messages of 60,000 bytes were one 60 MB response (limit counts
    messages, not bytes). A page stops at HTTP_REPLY_BUDGET of JSON (text escaped as \\uXXXX counted as sent) and
    says more: true; reading on from lastId gets the rest, nothing lost or repeated. SSE, a stream, is not paged."""
    payloads = ["é" * 9_990 if n % 2 else "x" * 59_000 for n in range(90)]  # ~5.4 MB of JSON, ~60 KB each
    with daemon.client() as ipc:
        ids = [ipc.request("msg.publish", {"channel": "web:big", "payload": p})["id"] for p in payloads]
    with unix_client(daemon) as c:
        read, after, sizes = [], 0, []
        while True:
            r = c.get("/msg/web:big", params={"after": after, "limit": 1000})
            page = r.json()
            after = page["lastId"]
            read += [(m["id"], m["payload"]) for m in page["messages"]]
            sizes.append(len(r.content))
            if not page["more"]:
                break
        assert read == list(zip(ids, payloads, strict=True))
        assert len(sizes) == 2 and max(sizes) <= HTTP_REPLY_BUDGET
        r = c.get("/msg/web:big", params={"limit": 1000})
        newest = r.json()  # without after: the newest that fit, as asked; older ones were left out
        assert newest["more"] is True and len(r.content) <= HTTP_REPLY_BUDGET
        assert [m["id"] for m in newest["messages"]] == ids[-newest["count"] :] and newest["lastId"] == ids[-1]
        streamed = []
        with c.stream("GET", "/msg/web:big/subscribe", params={"after": 0}, timeout=10) as r:
            for line in r.iter_lines():
                if line.startswith("id: "):
                    streamed.append(int(line[4:]))
                    if len(streamed) == len(ids):
                        break
        assert streamed == ids


def test_pd_history_says_where_to_read_on_when_a_page_stops_at_its_limit(daemon) -> None:
    ids = [daemon.call("msg.publish", channel="cli:paged", payload=n)["id"] for n in range(3)]
    r = daemon.pd("history", "cli:paged", "--after", "0", "--limit", "2")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2
    assert r.stderr.strip() == f"More messages follow: pd history 'cli:paged' --after {ids[1]}"
    r = daemon.pd("history", "cli:paged", "--after", str(ids[1]))
    assert r.stdout.split()[0] == str(ids[2]) and r.stderr == ""


@pytest.mark.parametrize("args", [
    ("pub", "a::b", "x"),
    ("pub", "has space", "x"),
    ("pub", "ok:ch", "x" * 70_000),
    ("pub", "ok:ch", "  "),
    ("pub", "bad*wild", "x"),
    ("sub", "a::b"),
    ("history", "x" * 1024),
    ("wait", "ok:ch", "--timeout", "soon"),
])  # fmt: skip
def test_bad_input_exits_2_and_changes_nothing(daemon, args) -> None:
    before = daemon.call("msg.channels")["channels"]
    r = daemon.pd(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert daemon.call("msg.channels")["channels"] == before


def test_watch_runs_the_command_per_new_message(daemon, tmp_path) -> None:
    out = tmp_path / "seen"
    daemon.pd("pub", "watch:x", "old")  # retained: not run for without --retained
    before = _subscriptions(daemon)
    proc = daemon.spawn_pd("watch", "watch:*", "--once", "--exec",
                     f'echo "$PD_CHANNEL $PD_MESSAGE_CONTENT $PD_MESSAGE_ID" >> {out}')  # fmt: skip
    _wait_for(lambda: _subscriptions(daemon) == before + 1)
    new_id = daemon.call("msg.publish", channel="watch:y", payload={"n": 1})["id"]
    code, _, err = _finish(proc)
    assert code == 0, err
    assert out.read_text() == f'watch:y {{"n":1}} {new_id}\n'


def test_a_publish_the_store_refuses_leaves_no_trace(tmp_path) -> None:
    import apsw

    from portdaddy.core.broker import Broker
    from tests.swarm_app import make_app

    app = make_app(tmp_path)
    broker = Broker(app)
    first = broker.post("busy:x", "stored").id
    other = apsw.Connection(str(tmp_path / "portdaddy.db"))
    other.execute("BEGIN IMMEDIATE")  # another writer holds the database: the next commit cannot happen
    with pytest.raises(StoreError, match="locked by another process"):
        broker.post("busy:x", "refused")
    with pytest.raises(StoreError, match="locked by another process"):
        broker.post("busy:new", "refused")
    other.execute("ROLLBACK")
    assert broker.last_id == first and [c["channel"] for c in broker.channels()] == ["busy:x"]
    assert broker.channels()[0]["lastMessage"]["payload"] == "stored"  # the retained message is the stored one
    after = broker.post("busy:x", "next")
    assert after.id == first + 1
    assert [(m.id, m.payload) for m in broker.since(["busy:*"], 0)] == [(first, "stored"), (after.id, "next")]
    other.close()
    app.store.close()


def test_dropped_publishes_keep_nothing_of_each_other_while_writes_are_refused(tmp_path) -> None:
    """Each fire-and-forget publish past the reserved block of ids raised the store's one failure again, and an
    exception raised again keeps every earlier raise's traceback: the frames, payloads included, of every
    dropped publish stayed in memory as long as writes were refused (150 MB for 50,000 of 4 KB)."""
    import apsw

    from portdaddy.core.broker import ID_BLOCK, Broker
    from tests.swarm_app import make_app

    app = make_app(tmp_path)
    broker = Broker(app)
    broker.post("busy:x", "stored")
    other = apsw.Connection(str(tmp_path / "portdaddy.db"))
    other.execute("BEGIN IMMEDIATE")
    frames = []
    for n in range(ID_BLOCK + 100):
        try:
            broker.post("busy:x", {"n": n}, durable=False)
        except StoreError as e:
            frames.append(traceback_frames(e))
    # The first met the store itself; the others were dropped without a try, each with its own traceback.
    assert len(frames) == 101 and len(set(frames[1:])) == 1, frames[:5] + frames[-5:]
    assert app.store.dropped == {"messages": len(frames)}
    other.execute("ROLLBACK")
    other.close()
    app.store.close()


@pytest.fixture(scope="module")
def unsubscribed_daemon() -> Iterator[Daemon]:
    """A daemon of the next test's cases alone: nothing else subscribes there, and each case leaves it so."""
    yield from shared_daemon()


@pytest.mark.parametrize("channels", [[], "", " ", ",", "\r\n", [" "]])
def test_an_empty_channel_list_is_refused_and_subscribes_nothing(unsubscribed_daemon, channels) -> None:
    """It reached SQL as "IN ()" (a syntax error, a 500) after the subscription had been registered."""
    with unsubscribed_daemon.client() as c:
        for action, args in (("msg.subscribe", {"after": 0}), ("msg.history", {}), ("msg.poll", {"timeout": 10})):
            with pytest.raises(PDError) as refused:
                c.request(action, {"channels": channels, **args})
            assert refused.value.code == "VALIDATION_ERROR", (action, refused.value.message)
        assert c.request("daemon.status")["counts"]["subscriptions"] == 0
