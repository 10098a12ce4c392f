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
    """Records every POST; answers ``statuses`` in turn (then 200)."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.statuses: list[int] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

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
