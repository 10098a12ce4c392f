"""The HTTP dispatcher: routing, argument sources, limits and errors, over the real Unix socket."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import Daemon, shared_daemon, unix_client

from portdaddy.errors import PDError
from portdaddy.http.app import Router
from portdaddy.http.routes import ROUTES, Route


def test_router_prefers_literal_segments_and_decodes_arguments() -> None:
    router = Router([Route("GET", "/harbors/<name>", "harbor.get"),
                     Route("GET", "/harbors/agent/<agentId>", "harbor.list"),
                     Route("GET", "/harbors/<name>/members", "harbor.members")])  # fmt: skip
    found = router.match("GET", "/harbors/agent/a%3Ab")
    assert found is not None and found[0].op == "harbor.list" and found[1] == {"agentId": "a:b"}
    assert router.match("GET", "/harbors/myapp:review")[0].op == "harbor.get"
    assert router.match("GET", "/harbors/x/members")[0].op == "harbor.members"
    assert router.match("POST", "/harbors/x") is None  # no such method: a 405
    assert router.methods("/harbors/x") == ["GET", "HEAD", "OPTIONS"] and router.methods("/nowhere") == []
    assert router.match("GET", "/harbors//members") is None  # an empty argument is no argument
    typed = Router([Route("PUT", "/inbox/<int:messageId>/read", "inbox.read")])
    assert typed.match("PUT", "/inbox/7/read")[1] == {"messageId": "7"}  # the converter is not the name


def test_every_route_is_reachable_by_its_own_path() -> None:
    router = Router(ROUTES)
    for route in ROUTES:
        path = "/".join("v" if seg.startswith("<") else seg for seg in route.path.split("/"))
        found = router.match(route.method, path)
        assert found is not None and found[0].op == route.op, route


def test_sources_errors_and_limits(daemon: Daemon) -> None:
    with unix_client(daemon) as c:
        r = c.post("/claim?id=query:api", json={"id": "body:api"})
        assert r.json()["id"] == "body:api"  # the body wins over the query
        assert c.get("/services/body%3Aapi").json()["service"]["id"] == "body:api"
        r = c.get("/no/such/path")
        assert r.status_code == 404 and r.json()["code"] == "NOT_FOUND"
        assert r.json()["error"] == "no route GET /no/such/path; the HTTP API is described in spec/openapi.yaml"
        r = c.post("/services/body%3Aapi")  # a route's path, another method
        assert r.status_code == 405 and r.json()["code"] == "METHOD_NOT_ALLOWED"
        assert r.headers["allow"] == "GET, HEAD, OPTIONS" and r.json()["allowed"] == ["GET", "HEAD", "OPTIONS"]
        assert r.json()["error"] == "POST is not served on /services/body:api; use GET"
        assert c.delete("/locks").json()["allowed"] == ["GET", "HEAD", "OPTIONS"]
        assert c.patch("/locks/x").json()["allowed"] == ["DELETE", "GET", "HEAD", "OPTIONS", "POST", "PUT"]
        r = c.post("/msg/x/subscribe")  # a stream's path (Quart serves it): refused in the same shape
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD, OPTIONS"
        assert r.json()["error"] == "POST is not served on /msg/x/subscribe; use GET"
        r = c.post("/claim", content=b"[1, 2]")
        assert r.status_code == 400 and "JSON object" in r.json()["error"]
        r = c.post("/claim", data={"id": "form:api"})  # a form, not JSON: say what was wrong and what to send
        assert r.json()["error"] == ("request body is not valid JSON (Expecting value: line 1 column 1 (char 0)); "
                                     "send a JSON object")  # fmt: skip
        r = c.post("/claim", content=b"x" * (1024 * 1024 + 1))
        assert r.status_code == 413 and r.json()["code"] == "PAYLOAD_TOO_LARGE"
        assert c.get("/health").json()["status"] == "ok"  # the connection is still good


def test_head_is_a_get_without_its_body(daemon: Daemon) -> None:
    """HEAD on a GET route answers as GET does, status and headers, with no body (it was a 405); on a path not
    served for GET it is refused as any other method is."""
    daemon.call("port.claim", id="head:api")
    with unix_client(daemon) as c:
        for path in ("/health", "/services/head%3Aapi", "/services/nope:x", "/services?limit=abc", "/locks"):
            get, head = c.get(path), c.head(path)
            assert (head.status_code, head.content) == (get.status_code, b""), path
            for header in ("content-type", "content-length"):
                assert head.headers[header] == get.headers[header], (path, header)
        r = c.head("/claim")  # POST only
        assert (r.status_code, r.headers["allow"], r.content) == (405, "OPTIONS, POST", b"")
        assert (c.head("/no/such/path").status_code, c.head("/no/such/path").content) == (404, b"")
        stream = c.head("/msg/head/subscribe", timeout=5)  # Quart's stream: its headers, not a stream forever
        assert (stream.status_code, stream.headers["content-type"], stream.content) == (200, "text/event-stream", b"")
    port = int(daemon.settings.port_file.read_text())
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as tcp:
        assert (tcp.head("/status").status_code, tcp.head("/health").status_code) == (401, 200)  # no token


def test_options_says_what_a_path_takes(daemon: Daemon) -> None:
    """OPTIONS answers 204 with the path's Allow on every served path, the streams' too (Quart answered it
    on those alone, in words of its own, and the dispatcher's paths refused it); it changes nothing."""
    with unix_client(daemon) as c:
        for path, allow in [("/health", "GET, HEAD, OPTIONS"), ("/claim", "OPTIONS, POST"),
                            ("/locks/opt", "DELETE, GET, HEAD, OPTIONS, POST, PUT"),
                            ("/msg/opt/subscribe", "GET, HEAD, OPTIONS")]:  # fmt: skip
            r = c.request("OPTIONS", path, content=b'{"id": "opt:api"}')
            assert (r.status_code, r.headers["allow"], r.content) == (204, allow, b""), path
        assert c.options("/no/such/path").status_code == 404
        assert c.get("/health").status_code == 200  # the body it was sent was read: the connection still works
    assert daemon.call("port.find", pattern="opt:*")["services"] == []
    assert daemon.call("lock.get", name="opt")["held"] is False
    port = int(daemon.settings.port_file.read_text())
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as tcp:
        assert tcp.options("/claim").status_code == 401  # no token
        preflight = tcp.options("/health", headers={"Origin": "http://localhost:3000"})  # no CORS for web pages
        assert preflight.status_code == 403


def test_a_body_cut_short_by_the_peer_closes_only_that_connection(fresh_daemon: Daemon) -> None:
    """A request whose body stops short of its Content-Length, then a close: hypercorn fails that connection
    (it stopped the whole daemon), with or without a token, on either socket."""
    cfg = fresh_daemon.settings
    port = int(cfg.port_file.read_text())
    for attempt in range(16):
        if attempt % 2:  # no token: refused, but only after the body has been read
            sock, path = socket.create_connection(("127.0.0.1", port)), b"/health"
        else:
            sock, path = socket.socket(socket.AF_UNIX), b"/claim"
            sock.connect(str(cfg.http_sock))
        with sock:
            sock.sendall(b"POST " + path + b' HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{"id":"a:b"}')
            time.sleep(0.02 * (attempt % 3))
        time.sleep(0.05)
        assert fresh_daemon.call("port.claim", id="still:here")["port"]
    assert fresh_daemon.proc is not None and fresh_daemon.proc.poll() is None


@pytest.mark.parametrize(("path", "body"), [
    ("/msg/poison", b'{"payload": "\\ud800"}'),
    ("/claim", b'{"id": "poison:api", "metadata": {"k": ["ok", "\\udfff"]}}'),
    ("/claim", b'{"id": "poison:api", "metadata": {"\\ud83d": 1}}'),
])  # fmt: skip
def test_a_lone_surrogate_is_refused_at_the_door(daemon: Daemon, path: str, body: bytes) -> None:
    """JSON can spell a lone UTF-16 surrogate; stored, it broke every IPC reply that carried it (msgpack
    refuses to encode it), and a subscriber's delivery stopped the daemon."""
    with unix_client(daemon) as c:
        r = c.post(path, content=body)
        assert r.status_code == 400 and "surrogate" in r.json()["error"], r.text
        r = c.post("/msg/fine", content=b'{"payload": "\\ud83d\\ude00 \\u00e9"}')  # a pair is a character
        assert r.status_code == 200
    assert daemon.call("msg.history", channel="poison")["messages"] == []
    assert daemon.call("port.find", pattern="poison:*")["services"] == []
    assert daemon.call("msg.history", channel="fine")["messages"][-1]["payload"] == "😀 é"


def _utf16(body: str) -> bytes:
    return body.encode("utf-16-le", "surrogatepass")


@pytest.mark.parametrize("spelled", [
    lambda text: text.encode("utf-8", "surrogatepass"),  # the surrogate's own three bytes: no escape to see
    _utf16,  # JSON in UTF-16, which Python's json reads too
], ids=["utf-8-bytes", "utf-16"])  # fmt: skip
def test_a_lone_surrogate_not_spelled_as_an_escape_is_refused_too(daemon: Daemon, spelled: Any) -> None:
    """json.loads decodes a body's bytes with surrogatepass, so a surrogate sent as its own bytes got past the
    door's check (which looked for \\ud8.. escapes) into a message, a note or a tuple."""
    session = daemon.call("session.start", purpose="surrogates")["id"]
    with unix_client(daemon) as c:
        for path, body in (("/msg/poison", '{"payload": "a \ud800 b"}'),
                           (f"/sessions/{session}/notes", '{"content": "note \udc00"}'),
                           ("/tuples", '{"fields": ["task", "\ud83d"]}')):  # fmt: skip
            r = c.post(path, content=spelled(body))
            assert r.status_code == 400, (path, r.text)
            assert r.json()["code"] == "VALIDATION_ERROR" and "surrogate" in r.json()["error"], r.text
        assert c.post("/msg/fine", content=spelled('{"payload": "é 😀"}')).status_code == 200  # proper Unicode
    assert daemon.call("msg.history", channel="poison")["messages"] == []
    assert daemon.call("note.list", sessionId=session)["notes"] == []
    assert daemon.call("tuple.count", pattern=["task", "*"])["count"] == 0


@pytest.mark.parametrize("header", ["Bearer \xe9t\xe9", "Bearer ²", "Basic x"])
def test_a_bad_token_is_a_401_whatever_its_characters(daemon: Daemon, header: str) -> None:
    port = int(daemon.settings.port_file.read_text())
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
        for path in ("/status", "/msg/x/subscribe"):  # the dispatcher's route and quart's
            r = c.get(path, headers={"Authorization": header.encode("latin-1")})
            assert r.status_code == 401 and r.json() == {"success": False, "code": "UNAUTHORIZED",
                                                         "error": r.json()["error"]}  # fmt: skip


def test_hostile_numbers_headers_and_nesting_are_400s_not_500s(daemon: Daemon) -> None:
    with unix_client(daemon) as c:
        for query in ("limit=--5", "limit=%C2%B2", "limit=abc"):
            r = c.get(f"/services?{query}")
            assert r.status_code == 400 and "limit must be an integer" in r.json()["error"], r.text
        for pid in ("\xb2", "9" * 30):  # an X-PID that is not a pid is ignored
            r = c.post("/claim", json={"id": "hostile:pid"}, headers={"X-PID": pid.encode("latin-1")})
            assert r.status_code == 200, r.text
        r = c.post("/msg/deep", content=b'{"payload": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
        assert r.status_code == 400 and "nests too deep" in r.json()["error"]
    for action, args in (("arbiter.violations", {"rule": ["ports"]}), ("arbiter.test", {"name": {"a": 1}})):
        with pytest.raises(PDError) as refused:
            daemon.call(action, **args)
        assert refused.value.code == "VALIDATION_ERROR"


def _hang_up_while_waiting(d: Daemon, method: str, path: str, body: bytes, counter: str) -> None:
    """Send a request that waits, wait until the daemon counts the waiter, then hang up."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(d.settings.http_sock))
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
    deadline = time.monotonic() + 10
    while d.call("daemon.status")["counts"][counter] != 1:
        assert time.monotonic() < deadline, f"the daemon never counted the {counter}"
        time.sleep(0.02)
    sock.close()
    while d.call("daemon.status")["counts"][counter] != 0:
        assert time.monotonic() < deadline, f"the {counter} outlived its client"
        time.sleep(0.02)


def test_a_waiter_that_hangs_up_is_withdrawn(daemon: Daemon) -> None:
    """A blocking take or queued lock over HTTP whose client left was still served: the next tuple went to
    nobody, and the lock to a dead client for its whole lease."""
    d = daemon
    _hang_up_while_waiting(d, "DELETE", "/tuples", b'{"pattern": ["job"], "harbor": "h", "wait": true}',
                           "tupleWaiters")  # fmt: skip
    d.call("tuple.out", fields=["job", 1], harbor="h")
    assert d.call("tuple.count", harbor="h")["count"] == 1
    d.call("lock.acquire", name="hang:up", owner="holder")
    _hang_up_while_waiting(d, "POST", "/locks/hang:up", b'{"owner": "ghost", "wait": true}', "lockWaiters")
    d.call("lock.release", name="hang:up", owner="holder")
    assert d.call("lock.get", name="hang:up")["held"] is False


def test_the_path_names_what_a_request_acts_on(daemon: Daemon) -> None:
    """A body or query that spelled the same parameter another way (sessionId for a path's id, to for an inbox's
    agentId) used to win over the path: PUT /sessions/A ended session B."""
    d = daemon
    first, second = (d.call("session.start", purpose=p)["id"] for p in ("first", "second"))
    d.call("agent.register", agentId="path-agent")
    with unix_client(d) as c:
        r = c.put(f"/sessions/{first}", json={"sessionId": second, "status": "completed"})
        assert r.status_code == 200 and r.json()["sessionId"] == first
        assert c.post(f"/sessions/{second}/notes", json={"id": first, "content": "x"}).json()["sessionId"] == second
        assert c.post("/agents/bob/inbox", json={"to": "carol", "content": "hi"}).json()["agentId"] == "bob"
        assert c.get("/agents/path-agent", params={"id": "nobody"}).json()["agent"]["id"] == "path-agent"
    assert d.call("session.get", sessionId=second)["session"]["status"] == "active"
    assert d.call("inbox.stats", agentId="carol")["total"] == 0


def test_path_arguments_are_percent_decoded_once_and_may_hold_slashes(daemon: Daemon) -> None:
    """Routing read hypercorn's already decoded path and decoded it again: %2F split an argument into two
    segments (a file's pheromones could not be read over HTTP) and %253A arrived as ':'."""
    daemon.call("pheromone.spray", table="files", id="src/pay/a.py", key="heat", strength=0.5)
    daemon.call("port.claim", id="twice:api")
    with unix_client(daemon) as c:
        r = c.get("/pheromone/files/src%2Fpay%2Fa.py")
        assert r.status_code == 200 and r.json()["pheromones"]["heat"] > 0.4, r.text
        r = c.get("/services/twice%253Aapi")
        assert r.status_code == 400 and r.json()["code"] == "IDENTITY_INVALID", r.text
        r = c.post("/locks/a%2F..%2Fb", json={"owner": "x"})
        assert r.status_code == 400 and "'a/../b' has characters outside" in r.json()["error"], r.text
        assert c.get("/services/twice%3Aapi").json()["service"]["id"] == "twice:api"


def test_a_query_parameter_given_twice_is_refused(daemon: Daemon) -> None:
    """The last of a repeated key won in the dispatcher and the first in the SSE view, silently; a caller who
    wrote ?status=a&status=b hoping for both got one."""
    with unix_client(daemon) as c:
        for method, path in (("POST", "/claim?id=dup:a&id=dup:b"), ("GET", "/services?pattern=a:*&pattern=b:*"),
                             ("GET", "/msg/twice/subscribe?after=1&new=true&after=2")):  # fmt: skip
            r = c.request(method, path)
            assert r.status_code == 400 and r.json()["code"] == "VALIDATION_ERROR", r.text
            assert r.json()["error"].startswith("query parameter '") and "given 2 times" in r.json()["error"]
        assert c.post("/claim?id=dup:a").status_code == 200  # once is fine
    assert [s["id"] for s in daemon.call("port.find", pattern="dup:*")["services"]] == ["dup:a"]


@pytest.mark.parametrize(("path", "body"), [
    ("/claim", {"id": "zero:api", "expires": 0}),
    ("/claim", {"id": "zero:api", "expires": "0s"}),
    ("/tuples", {"fields": ["zero"], "ttl": 0.5}),
    ("/harbors", {"name": "zero-harbor", "expiresIn": 0}),
    ("/locks/zero", {"ttl": 0}),
])  # fmt: skip
def test_a_lifetime_of_zero_is_refused_not_taken_for_forever(daemon: Daemon, path: str, body: dict) -> None:
    """A claim, tuple or harbor given an expiry of 0 (or under a millisecond) was kept forever: the opposite of
    what the caller may have meant, and unlike a lock, whose 0 TTL was refused."""
    with unix_client(daemon) as c:
        r = c.post(path, json=body)
        assert r.status_code == 400 and r.json()["code"] == "INVALID_TTL", r.text
        assert "must be positive" in r.json()["error"]
    assert daemon.call("port.find", pattern="zero:*")["count"] == 0
    assert daemon.call("tuple.count", pattern=["zero"])["count"] == 0
    assert daemon.call("harbor.list", pattern="zero*")["count"] == 0


def test_fleet_and_spawn_replies_say_success_like_every_other(daemon: Daemon) -> None:
    """The fleet's operations answered without the original's success field, which clients check first."""
    with unix_client(daemon) as c:
        for path in ("/fleet", "/fleet/runs", "/spawn"):
            assert c.get(path).json()["success"] is True, path
        spawned = c.post("/spawn", json={"backend": "custom", "task": "echo hi"}).json()
        assert spawned["success"] is True and spawned["status"] == "spawned"
        done = c.get(f"/spawn/{spawned['agentId']}/wait", params={"timeout": "20s"}).json()
        assert done["success"] is True and done["run"]["status"] == "completed", done
        assert c.get(f"/spawn/{spawned['agentId']}/logs").json()["success"] is True


@pytest.fixture(scope="module")
def headers_daemon() -> Iterator[Daemon]:
    """A daemon of the next test's cases alone: each registers one agent there, the same, and nothing else."""
    yield from shared_daemon()


@pytest.mark.parametrize("agent", ["a b", "x" * 500, "\x1b[2J", "-rf", "caf\xe9"])
def test_an_x_agent_id_that_is_no_agent_id_is_refused(headers_daemon: Daemon, agent: str) -> None:
    """The header was taken as it came: it registered agents, owned locks and sessions under ids that IPC and
    pd refuse (spaces, terminal escapes, a leading '-', 500 characters)."""
    with unix_client(headers_daemon) as c:
        for method, path, body in (("POST", "/agents", {}), ("POST", "/sessions", {"purpose": "p"}),
                                   ("POST", "/locks/hdr", {})):  # fmt: skip
            r = c.request(method, path, json=body, headers={"X-Agent-Id": agent.encode("latin-1")})
            assert r.status_code == 400 and r.json()["error"].startswith("X-Agent-Id: agent id "), r.text
        assert c.post("/agents", json={}, headers={"X-Agent-Id": "fine-agent"}).status_code == 200
    counts = headers_daemon.call("daemon.status")["counts"]
    assert (counts["agents"], counts["sessionsActive"], counts["locks"]) == (1, 0, 0)
