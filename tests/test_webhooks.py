"""Webhooks against a real local HTTP receiver: HMAC signatures verified by the receiver, retries with backoff,
pending deliveries surviving SIGKILL, private targets refused unless the daemon allows them."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class Receiver:
    """Records every POST; answers ``statuses`` in turn (then 200). The ``hold``-th request (counting from 1) is
    answered only once ``release`` is set."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.statuses: list[int] = []
        self.hold = 0
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                if len(receiver.requests) == receiver.hold:
                    receiver.release.wait(10)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        # shutdown() waits for serve_forever's next look at its flag: every 0.5 s by default, at each teardown.
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def events(self, kind: str) -> list[tuple[dict[str, str], bytes]]:
        return [(h, b) for h, b in self.requests if h["x-portdaddy-event"] == kind]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_signed_delivery_verified_by_a_real_receiver(daemon_factory, receiver) -> None:
    d = daemon_factory(PORT_DADDY_WEBHOOK_ALLOW_PRIVATE="1")
    r = d.pd("webhook", "add", receiver.url, "--events", "lock.*,msg.publish", "--secret", "s3cret",
             "--filter", "deploy:*", "-q")  # fmt: skip
    assert r.returncode == 0, r.stderr
    hook_id = r.stdout.strip()
    d.pd("lock", "deploy:prod", "--owner", "ci")
    d.pd("lock", "other", "--owner", "ci")  # filtered out by the pattern
    d.pd("pub", "deploy:log", '{"step": 1}')
    _wait_for(lambda: len(receiver.requests) == 2)
    time.sleep(0.2)
    assert len(receiver.requests) == 2
    for headers, body in receiver.requests:
        expected = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["x-portdaddy-signature"], expected)
        assert headers["content-type"] == "application/json" and headers["x-portdaddy-delivery"]
    [(_, lock_body)] = receiver.events("lock.acquire")
    event = json.loads(lock_body)
    assert event["event"] == "lock.acquire" and event["data"]["name"] == "deploy:prod" and event["data"]["token"]
    [(_, msg_body)] = receiver.events("msg.publish")
    assert json.loads(msg_body)["data"]["payload"] == {"step": 1}
    test = d.pd("webhook", "test", hook_id)
    assert test.returncode == 0 and "200" in test.stdout
    assert receiver.events("webhook.test")
    listed = json.loads(d.pd("webhook", "ls", "--json").stdout)["webhooks"]
    assert listed[0]["successCount"] == 2 and listed[0]["hasSecret"] is True


def test_retries_with_backoff_then_delivers(daemon_factory, receiver) -> None:
    d = daemon_factory(PORT_DADDY_WEBHOOK_ALLOW_PRIVATE="1", PORT_DADDY_WEBHOOK_RETRY_BASE="100")
    hook = d.call("webhook.register", url=receiver.url, events=["lock.acquire"])
    receiver.statuses = [500, 503]
    d.call("lock.acquire", name="retry:x", owner="a")
    # The receiver counts the third request before the daemon has read its 200 and recorded the delivery.
    _wait_for(
        lambda: (
            [x["status"] for x in d.call("webhook.deliveries", id=hook["id"])["deliveries"]]
            in (["delivered"], ["failed"])
        )
    )
    [delivery] = d.call("webhook.deliveries", id=hook["id"])["deliveries"]
    assert (delivery["status"], delivery["attempts"], delivery["responseStatus"]) == ("delivered", 3, 200)
    assert len(receiver.requests) == 3
    bodies = {b for _, b in receiver.requests}
    assert len(bodies) == 1  # every attempt sends the same signed bytes


def test_pending_deliveries_survive_sigkill(daemon_factory, receiver) -> None:
    d = daemon_factory(PORT_DADDY_WEBHOOK_ALLOW_PRIVATE="1", PORT_DADDY_WEBHOOK_RETRY_BASE="2s")
    hook = d.call("webhook.register", url=receiver.url, events=["lock.acquire"], secret="k")
    receiver.statuses = [500]
    d.call("lock.acquire", name="durable:x", owner="a")
    _wait_for(lambda: len(receiver.requests) == 1)
    d.kill9()
    d.start()
    _wait_for(lambda: len(receiver.events("lock.acquire")) == 2, timeout=15)
    first, second = (b for _, b in receiver.events("lock.acquire"))
    assert first == second
    _wait_for(lambda: d.call("webhook.deliveries", id=hook["id"])["deliveries"][0]["status"] == "delivered")


def test_gives_up_after_five_attempts(daemon_factory, receiver) -> None:
    d = daemon_factory(PORT_DADDY_WEBHOOK_ALLOW_PRIVATE="1", PORT_DADDY_WEBHOOK_RETRY_BASE="20")
    hook = d.call("webhook.register", url=receiver.url, events=["lock.release"])
    receiver.statuses = [500] * 10
    d.call("lock.acquire", name="fail:x", owner="a")
    d.call("lock.release", name="fail:x", owner="a")
    _wait_for(lambda: d.call("webhook.get", id=hook["id"])["webhook"]["failureCount"] == 1)
    assert len(receiver.requests) == 5
    assert d.call("webhook.deliveries", id=hook["id"])["deliveries"][0]["status"] == "failed"


def test_a_silent_endpoint_does_not_hold_up_the_others(daemon_factory, receiver) -> None:
    """A hook that accepts connections and never answers costs 10 s an attempt; it used to take every
    delivery slot, so a healthy hook got 3 of 20 events in 5 s."""
    d = daemon_factory(PORT_DADDY_WEBHOOK_ALLOW_PRIVATE="1")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(100)  # the kernel completes the connections; nobody reads or answers
        d.call("webhook.register", url=f"http://127.0.0.1:{silent.getsockname()[1]}/x", events=["msg.publish"])
        d.call("webhook.register", url=receiver.url, events=["msg.publish"])
        for i in range(20):
            d.call("msg.publish", channel="busy:x", payload={"i": i})
        _wait_for(lambda: len(receiver.requests) == 20, timeout=5)
        payloads = [json.loads(body)["data"]["payload"]["i"] for _, body in receiver.requests]
        assert payloads == list(range(20))  # one at a time per hook: in the order they happened


def _payloads(receiver: Receiver) -> list[int]:
    return [json.loads(body)["data"]["payload"] for _, body in receiver.requests]


def test_a_burst_reaches_a_hook_in_the_order_of_its_events(daemon_factory, receiver) -> None:
    """Deliveries to one hook queued in the same millisecond tied on their due time, and which went first was
    whatever row SQLite met first; the order of the events decides now."""
    d = daemon_factory(PORT_DADDY_WEBHOOK_ALLOW_PRIVATE="1")
    hook = d.call("webhook.register", url=receiver.url, events=["msg.publish"])
    receiver.hold = 1  # the first waits, so the rest of the burst is queued behind it, many to a millisecond
    with d.client() as c:
        for i in range(300):
            c.request("msg.publish", {"channel": "burst:x", "payload": i})
    listed = d.call("webhook.deliveries", id=hook["id"], limit=500)["deliveries"]
    assert len(listed) - len({x["createdAt"] for x in listed}) > 100  # most share their millisecond
    receiver.release.set()
    _wait_for(lambda: len(receiver.requests) == 300)
    assert _payloads(receiver) == list(range(300))
    sent = [headers["x-portdaddy-delivery"] for headers, _ in receiver.requests]
    assert [x["id"] for x in reversed(listed)] == sent  # the list, newest first, breaks its ties the same way


def test_a_retry_due_again_goes_before_the_events_after_it(daemon_factory, receiver) -> None:
    """Of a hook's due deliveries the one with the earliest due time went first, so a retry waited behind
    every later event queued before its backoff ended; now the older event goes first."""
    d = daemon_factory(PORT_DADDY_WEBHOOK_ALLOW_PRIVATE="1", PORT_DADDY_WEBHOOK_RETRY_BASE="200")
    d.call("webhook.register", url=receiver.url, events=["msg.publish"])
    receiver.statuses = [500]  # event 0's first attempt fails: its retry is due 200 ms later
    receiver.hold = 2  # event 1 is held past that, while event 2 is queued
    for i in range(3):
        d.call("msg.publish", channel="retry:x", payload=i)
    _wait_for(lambda: len(receiver.requests) == 2)
    time.sleep(0.5)
    receiver.release.set()
    _wait_for(lambda: len(receiver.requests) == 4)
    assert _payloads(receiver) == [0, 1, 0, 2]


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/hook", "http://localhost/x", "http://10.1.2.3/x", "http://169.254.169.254/latest",
    "http://[::1]/x", "http://[::ffff:127.0.0.1]/x", "http://printer.local/x", "ftp://example.com/x", "not a url",
    "http://0x7f000001/x", "http://2130706433/x", "http://127.1/x", "http://0177.0.0.1/x",
    "https://user:pw@example.com/x", "https://token@example.com/x",
    # IPv6 spellings of an IPv4 address: IPv4-compatible, 6to4, NAT64 (the metadata service), and a trailing dot
    "http://[::127.0.0.1]/x", "http://[2002:7f00:1::]/x", "http://[64:ff9b::a9fe:a9fe]/x", "http://localhost./x",
])  # fmt: skip
def test_private_and_bad_targets_refused_by_default(daemon, url) -> None:
    before = daemon.call("webhook.list")["count"]
    r = daemon.pd("webhook", "add", url)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert daemon.call("webhook.list")["count"] == before


def test_unknown_event_refused(daemon) -> None:
    r = daemon.pd("webhook", "add", "https://example.com/x", "--events", "lock.explode")
    assert r.returncode == 2 and "unknown webhook event" in r.stderr


def test_settled_deliveries_are_pruned_by_age_and_count(tmp_path, monkeypatch) -> None:
    """Every delivery holds its body; a hook on a busy event grew the database without end. Pending ones stay."""
    from portdaddy.core import webhooks as wh
    from portdaddy.core.events import Event
    from tests.swarm_app import make_app

    monkeypatch.setattr(wh, "MAX_SETTLED", 5)
    monkeypatch.setattr(wh, "PRUNE_EVERY", 10)
    app = make_app(tmp_path)
    hooks = wh.Webhooks(app)
    hooks.register("https://example.com/hook", ["lock.*"], secret=None, filter_pattern=None, metadata=None)
    week_ago = int(time.time() * 1000) - wh.SETTLED_RETENTION_MS - 1
    hooks.enqueue([Event("lock.acquire", {"name": f"old{i}"}, at=week_ago) for i in range(3)])
    hooks.enqueue([Event("lock.acquire", {"name": f"new{i}"}) for i in range(6)])
    app.store.execute("UPDATE webhook_deliveries SET status='delivered'")
    hooks.enqueue([Event("lock.release", {"name": "queued"})])  # the 10th: a prune
    rows = app.store.all("SELECT event, status, body FROM webhook_deliveries ORDER BY rowid")
    assert [r[1] for r in rows] == ["delivered"] * 5 + ["pending"]  # the old three, then the oldest new one
    assert '"new0"' not in rows[0][2] and '"new1"' in rows[0][2]
    app.store.close()


def _hook(d, hook_id: str) -> dict:
    return d.call("webhook.get", id=hook_id)["webhook"]


def test_a_hook_failing_for_long_enough_is_disabled_until_enabled(daemon_factory, receiver) -> None:
    """An endpoint answering 500 to everything used to be retried forever. 20 failures in a row are not enough
    on their own (here within a second: an endpoint down for a minute), and a success starts the run again."""
    from portdaddy.core.webhooks import DISABLE_FAILURES, GIVEN_UP, MAX_ATTEMPTS

    d = daemon_factory(PORT_DADDY_WEBHOOK_ALLOW_PRIVATE="1", PORT_DADDY_WEBHOOK_RETRY_BASE="1",
                       PORT_DADDY_WEBHOOK_DISABLE_AFTER="1s")  # fmt: skip
    hook_id = d.call("webhook.register", url=receiver.url, events=["lock.acquire"])["id"]
    receiver.statuses = [500] * MAX_ATTEMPTS * (DISABLE_FAILURES - 1)
    for i in range(DISABLE_FAILURES - 1):
        d.call("lock.acquire", name=f"flaky:{i}", owner="a")
    _wait_for(lambda: _hook(d, hook_id)["failureCount"] == DISABLE_FAILURES - 1)
    assert _hook(d, hook_id)["consecutiveFailures"] == DISABLE_FAILURES - 1 and _hook(d, hook_id)["failingSince"]
    d.call("lock.acquire", name="flaky:ok", owner="a")  # the endpoint answers 200 again
    _wait_for(lambda: _hook(d, hook_id)["successCount"] == 1)
    hook = _hook(d, hook_id)
    assert (hook["active"], hook["consecutiveFailures"], hook["failingSince"]) == (True, 0, None)

    receiver.statuses = [500] * 100_000  # gone bad for good
    for i in range(200):
        d.call("lock.acquire", name=f"gone:{i}", owner="a")
        if not _hook(d, hook_id)["active"]:
            break
        time.sleep(0.05)
    hook = _hook(d, hook_id)
    assert not hook["active"] and hook["consecutiveFailures"] >= DISABLE_FAILURES
    assert hook["disabledAt"] - hook["failingSince"] >= 1000
    assert hook["disabledReason"] == f"{hook['consecutiveFailures']} deliveries in a row failed, the last with HTTP 500"
    time.sleep(0.2)
    deliveries = d.call("webhook.deliveries", id=hook_id, limit=500)["deliveries"]
    assert {x["status"] for x in deliveries} <= {"delivered", "failed"}  # nothing left queued
    assert sum(x["attempts"] for x in deliveries) == len(receiver.requests)  # nothing sent once disabled
    given_up = [x for x in deliveries if x["responseBody"] == GIVEN_UP]
    assert all(x["attempts"] < MAX_ATTEMPTS for x in given_up)
    [entry] = d.call("activity.list", type="webhook.disable")["entries"]
    assert entry["targetId"] == hook_id and f"failures={hook['consecutiveFailures']}" in entry["details"]
    listed = d.pd("webhook", "ls")
    assert " disabled " in listed.stdout and f"pd webhook enable {hook_id}" in listed.stdout
    assert "1 webhook disabled" in d.pd("status").stdout

    d.restart()
    assert _hook(d, hook_id) == hook
    d.call("webhook.update", id=hook_id, events=["lock.*"])  # changing what it hears does not mend it
    assert _hook(d, hook_id)["active"] is False
    d.call("lock.acquire", name="while-off", owner="a")
    assert len(d.call("webhook.deliveries", id=hook_id, limit=500)["deliveries"]) == len(deliveries)

    receiver.statuses = []
    enabled = d.pd("webhook", "enable", hook_id)
    assert enabled.returncode == 0, enabled.stderr
    hook = _hook(d, hook_id)
    assert (hook["active"], hook["disabledAt"], hook["disabledReason"], hook["consecutiveFailures"]) == \
        (True, None, None, 0)  # fmt: skip
    d.call("lock.acquire", name="back", owner="a")
    _wait_for(lambda: b'"back"' in receiver.requests[-1][1])


def test_a_gone_endpoint_is_disabled_and_a_new_url_enables_it(daemon_factory, receiver) -> None:
    """The endpoint is gone (connection refused). Other hooks hear of it through a webhook.disable event."""
    from portdaddy.core.webhooks import DISABLE_FAILURES

    d = daemon_factory(PORT_DADDY_WEBHOOK_ALLOW_PRIVATE="1", PORT_DADDY_WEBHOOK_RETRY_BASE="1",
                       PORT_DADDY_WEBHOOK_DISABLE_AFTER="0")  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        gone = f"http://127.0.0.1:{s.getsockname()[1]}/hook"
    hook_id = d.call("webhook.register", url=gone, events=["msg.publish"])["id"]
    watcher = d.call("webhook.register", url=receiver.url, events=["webhook.disable"])["id"]
    for i in range(DISABLE_FAILURES):
        d.call("msg.publish", channel="gone:x", payload={"i": i})
    _wait_for(lambda: receiver.events("webhook.disable"))
    [(_, body)] = receiver.events("webhook.disable")
    data = json.loads(body)["data"]
    assert (data["webhookId"], data["url"], data["failures"]) == (hook_id, gone, DISABLE_FAILURES)
    assert "cannot connect" in data["reason"]
    assert _hook(d, watcher)["active"] is True

    d.call("webhook.update", id=hook_id, url=receiver.url)  # the endpoint moved: pointing it there enables it
    assert _hook(d, hook_id)["active"] is True
    d.call("msg.publish", channel="gone:x", payload={"i": "after"})
    _wait_for(lambda: receiver.events("msg.publish"))
    assert json.loads(receiver.events("msg.publish")[0][1])["data"]["payload"] == {"i": "after"}


def test_a_salvage_hook_hears_the_whole_story_of_a_dead_agents_work(daemon_factory, receiver) -> None:
    d = daemon_factory(PORT_DADDY_WEBHOOK_ALLOW_PRIVATE="1", PORT_DADDY_STALE_AFTER="300ms",
                       PORT_DADDY_DEAD_AFTER="600ms")  # fmt: skip
    d.call("webhook.register", url=receiver.url, events=["salvage.*"])
    d.call("agent.register", agentId="gone", identity="pay:db")
    _wait_for(lambda: receiver.events("salvage.create"), timeout=15)
    d.call("salvage.claim", id="gone", newAgentId="rescuer")
    d.call("salvage.abandon", id="gone", agentId="rescuer")
    d.call("salvage.dismiss", id="gone")
    _wait_for(lambda: len(receiver.requests) == 4)
    told = sorted(json.loads(body)["event"] for _, body in receiver.requests)  # queued in one ms: any order
    assert told == ["salvage.abandon", "salvage.claim", "salvage.create", "salvage.dismiss"]


def test_a_hook_deleted_while_its_last_attempt_is_in_flight_fails_that_delivery_quietly(daemon_factory,
                                                                                       receiver) -> None:  # fmt: skip
    """Counting the failure read the deleted hook's row back: None, unpacked, so the delivery 'crashed' with a
    TypeError in the log instead of being recorded as failed."""
    from portdaddy.core.webhooks import MAX_ATTEMPTS

    d = daemon_factory(PORT_DADDY_WEBHOOK_ALLOW_PRIVATE="1", PORT_DADDY_WEBHOOK_RETRY_BASE="1")
    hook_id = d.call("webhook.register", url=receiver.url, events=["lock.acquire"])["id"]
    receiver.statuses, receiver.hold = [500] * MAX_ATTEMPTS, MAX_ATTEMPTS
    d.call("lock.acquire", name="doomed", owner="a")
    _wait_for(lambda: len(receiver.requests) == MAX_ATTEMPTS)  # the last attempt waits for its answer
    d.call("webhook.delete", id=hook_id)
    receiver.release.set()
    _wait_for(lambda: f"failed after {MAX_ATTEMPTS} attempts" in d.log() or "crashed" in d.log())
    assert "crashed" not in d.log()
    assert d.call("webhook.list")["count"] == 0
