"""Every parameter of every operation, and every HTTP route, given values of the wrong or a hostile kind: the
daemon refuses each with one clear line (a code of spec/errors.md, never INTERNAL or a 500) or takes it, and
keeps serving. Deterministic: a fixed list of values, each sent to each parameter with the others valid.

One request per connection, so a value that binds a connection to an agent, or strikes it, touches nothing
else. Nothing here may stop the daemon or start a process: the fleet's directory has no pd-fleet.yml, and
``spawn.start`` looks for its backend on an empty PATH.

The cases of one operation go out a few at a time (``Sweep``): with one request in flight the daemon waited
for the test to build the next and the test for the daemon to answer, 40 000 times (~37 s).
"""

from __future__ import annotations

import json
import math
import re
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest
from conftest import Daemon, unix_client

from portdaddy.core.agents import SALVAGE_MOVES
from portdaddy.core.ops import Op, load_table
from portdaddy.errors import EXIT_BAD_INPUT, MAX_MESSAGE, PDError, exit_code
from portdaddy.http.routes import ROUTES, STREAMS, Route
from portdaddy.ipc.frame import Decoder, Encoder, Parts, Performative

SPEC_ERRORS = Path(__file__).resolve().parent.parent / "spec" / "errors.md"
CODES = set(re.findall(r"^\| `(\w+)` \|", SPEC_ERRORS.read_text(), re.M)) - {"INTERNAL"}
_OK = {Performative.INFORM_DONE, Performative.INFORM_REF, Performative.AGREE}


def deep(levels: int) -> Any:
    """NaN inside ``levels`` objects, each under a long key with a line break: a refusal that names where the bad
    value sits must not quote the whole path (32 levels of long keys made it thousands of characters)."""
    value: Any = math.nan
    for level in range(levels):
        value = {f"line\nbreak{'k' * 600}{level}": value}
    return value


# Values of every kind a client can put in a field, msgpack-able (IPC) ...
HOSTILE: list[Any] = [
    None, True, False, 0, -1, 1, 2**31, 2**63 - 1, 2**63, -(2**63), 2**64 - 1, 0.5, -0.0, 1e308, math.nan,
    math.inf, -math.inf, "", "   ", "\x00", "a\x00b", "\x1b[31m\r\nX", "line\nbreak", "💥" * 50, "\u202eünï",
    "../../etc/passwd", "/etc/passwd", "/tmp/a\x00b", "~nobody/x", "/" + "a" * 5000, "..", ".", "*", "**:**",
    "-rf", "%00%2e", "1e999", "-5", "0", "nan", "99999999999999999999999", "true", "null", "[1]", "b" * 4000,
    "a" * 60_000, [], [None], ["a", 1, None], [[[[]]]], list(range(300)), ["x", "line\nbreak"], ["x", "b" * 4000],
    {}, {"": None}, {"a": {"b": [1, {"c": None}]}}, {"line\nbreak" + "k" * 600: [math.nan]},
    ["x", {"line\nbreak" + "k" * 600: [math.nan]}], ["x", deep(30)], b"", b"\xff\x00", "/" + "w" * 4000,
]  # fmt: skip
# ... and what JSON adds: numbers of any size, a lone surrogate escape, nesting past any recursion limit.
JSON_EXTRA: list[str] = ["1" + "0" * 30, "-1" + "0" * 30, '"\\ud800"', "[" * 5000 + "]" * 5000, "1e400"]
QUERY: list[str] = ["", " ", "-1", "0", "1.5", "1e999", "nan", "inf", "true", "null", "[]", "{}", "a,,b", "\x00",
                    "%", "💥", "../../etc/passwd", "line\nbreak", "99999999999999999999999", "a" * 5000]  # fmt: skip
SEGMENTS: list[str] = ["..", ".", "%", "\x00", "a b", "💥", "../../etc", "a/b", "*", "-1", "0", "nan",
                       "99999999999999999999999", "line\nbreak", "a" * 5000, " "]  # fmt: skip


def problem(code: Any, message: Any) -> str | None:
    """What is wrong with a refusal, or None when it is one clear line with a known code."""
    if code not in CODES:
        return f"code {code!r} is not one of spec/errors.md's (or is INTERNAL)"
    if not isinstance(message, str) or not message.strip():
        return "empty message"
    if "\n" in message or "\r" in message:
        return f"multi-line message {message[:120]!r}"
    if len(message) > MAX_MESSAGE:  # one line says what was wrong; it does not echo a 60 KB value back
        return f"message of {len(message)} characters"
    return None


# -- the state the baselines name, made again before each operation's turn -----------------------------------


def prepare(d: Daemon, worktree: str) -> dict[str, Any]:
    """Idempotent setup: a service, an agent with a session, a lock, a message, a DM, a harbor, tuples, a signal."""
    with d.client() as c:
        c.request("port.claim", {"id": "fuzz:api"})
        c.request("agent.register", {"agentId": "fuzz-agent"})
        session = c.request("session.start", {"purpose": "fuzzing", "agentId": "fuzz-agent", "worktree": worktree,
                                              "force": True})  # fmt: skip
        lock = c.request("lock.acquire", {"name": "fuzz-lock", "owner": "fuzz-owner"})
        c.request("msg.publish", {"channel": "fuzz:ch", "payload": "hi"})
        dm = c.request("inbox.send", {"to": "fuzz-agent", "content": "hi"})
        c.request("harbor.create", {"name": "fuzz-harbor"})
        for i in range(3):
            c.request("tuple.out", {"fields": ["fuzz", i]})
        c.request("pheromone.spray", {"table": "files", "id": "src/fuzz.py", "key": "heat", "strength": 0.5})
    return {"session": session["sessionId"], "token": lock["token"], "dm": dm["messageId"]}


# Operations whose parameters are all optional: their baseline is no argument at all.
NO_ARGUMENTS = ("daemon.health", "daemon.version", "daemon.status", "port.find", "agent.list", "session.list",
                "file.list", "journal.sitrep", "activity.list", "activity.summary", "lock.list", "msg.channels",
                "webhook.list", "webhook.events", "tuple.poll", "tuple.scan", "tuple.count", "pheromone.list",
                "pheromone.files", "arbiter.status", "arbiter.violations", "fleet.status", "fleet.runs", "fleet.logs",
                "spawn.list")  # fmt: skip


def baselines(s: dict[str, Any], worktree: str, webhook: str, empty: str) -> dict[str, dict[str, Any]]:
    """Valid arguments for every operation: each parameter is fuzzed with the others as here. Waits are made
    to end at once (a match exists) or within 200 ms."""
    agent, sid = {"agentId": "fuzz-agent"}, {"sessionId": s["session"]}
    lock = {"name": "fuzz-lock", "owner": "fuzz-owner"}
    return {
        **{op: {} for op in NO_ARGUMENTS},
        "port.claim": {"id": "fuzz:api"},
        "port.release": {"id": "fuzz:released"},
        "port.get": {"id": "fuzz:api"},
        "port.endpoint": {"id": "fuzz:api", "env": "dev", "url": "http://localhost:3000"},
        "agent.register": agent,
        "agent.heartbeat": agent,
        "agent.unregister": agent,
        "agent.get": {"id": "fuzz-agent"},
        **{f"salvage.{a}": {"id": "fuzz-agent", "newAgentId": "fuzz-heir"} for a in SALVAGE_MOVES},
        "salvage.list": {},
        "session.start": {"purpose": "fuzzing", **agent, "worktree": worktree},
        "session.end": {**sid, **agent, "worktree": worktree},
        "session.get": sid,
        "note.add": {**sid, "content": "a note"},
        "note.list": sid,
        "note.verify": sid,
        "file.claim": {**sid, "files": ["src/a.py"]},
        "file.release": {**sid, "files": ["src/a.py"]},
        "file.owners": {"path": "src/fuzz.py", "worktree": worktree},
        "file.check": {"files": ["src/fuzz.py"], "worktree": worktree},
        "agent.begin": {"purpose": "fuzzing", "agentId": "fuzz-begin", "worktree": worktree},
        "agent.done": {**agent, **sid},
        "agent.whoami": agent,
        "lock.acquire": lock,
        "lock.release": {**lock, "token": s["token"]},
        "lock.extend": {**lock, "token": s["token"]},
        "lock.get": {"name": "fuzz-lock"},
        "msg.publish": {"channel": "fuzz:ch", "payload": "hi"},
        "msg.subscribe": {"channels": ["fuzz:ch"]},
        "msg.unsubscribe": {"subscription": 1},
        "msg.history": {"channel": "fuzz:ch"},
        "msg.clear": {"channel": "fuzz:cleared"},
        "msg.poll": {"channel": "fuzz:ch", "timeout": 200},
        "msg.wait": {"channels": ["fuzz:ch"], "timeout": 200},
        "inbox.send": {"to": "fuzz-agent", "content": "hi"},
        "inbox.list": agent,
        "inbox.stats": agent,
        "inbox.read": {**agent, "messageId": s["dm"]},
        "inbox.clear": {"agentId": "fuzz-cleared"},
        "webhook.register": {"url": "https://example.com/fuzz", "events": ["agent.stale"]},
        "webhook.get": {"id": webhook},
        "webhook.update": {"id": webhook},
        "webhook.delete": {"id": "no-such-webhook"},
        "webhook.test": {"id": "no-such-webhook"},  # a real one would post to the internet
        "webhook.deliveries": {"id": webhook},
        "harbor.create": {"name": "fuzz-harbor"},
        "harbor.list": agent,
        "harbor.get": {"name": "fuzz-harbor"},
        "harbor.destroy": {"name": "fuzz-destroyed"},
        "harbor.enter": {"name": "fuzz-harbor", **agent},
        "harbor.leave": {"name": "fuzz-harbor", **agent},
        "harbor.members": {"name": "fuzz-harbor"},
        "tuple.out": {"fields": ["fuzz", 9]},
        "tuple.rd": {"pattern": ["fuzz", "*"]},
        "tuple.in": {"pattern": ["fuzz", "*"]},
        "pheromone.spray": {"table": "files", "id": "src/fuzz.py", "key": "heat", "strength": 0.5},
        "pheromone.sniff": {"table": "files", "id": "src/fuzz.py"},
        "arbiter.test": {"name": "CAP_ESCALATION"},
        # The worktree has no pd-fleet.yml: every fleet operation on it is refused before it acts.
        "fleet.up": {"projectDir": worktree},
        "fleet.down": {"projectDir": worktree},
        "fleet.run": {"projectDir": worktree, "agent": "qa"},
        "fleet.reset": {"projectDir": worktree, "agent": "qa"},
        "fleet.show": {"runId": "no-such-run"},
        "spawn.start": {"task": "fuzz", "path": empty},  # no backend binary on that PATH: refused, never spawned
        "spawn.kill": {"id": "no-such-run"},
        "spawn.logs": {"id": "no-such-run"},
        "spawn.wait": {"id": "no-such-run"},
    }


# -- IPC -----------------------------------------------------------------------------------------------------


def ipc_ask(path: str, payload: dict[str, Any], timeout: float = 10) -> tuple[int, dict[str, Any]]:
    """One request on a connection of its own: the reply's performative and payload."""
    decoder, parts = Decoder(from_daemon=True), Parts()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(Encoder().encode(Performative.REQUEST, 1, payload))
        while True:
            while (event := decoder.next_event()) is not None:
                if getattr(event, "conv_id", None) == 1 and (whole := parts.feed(event)) is not None:
                    return whole.type, whole.payload
            data = s.recv(65536)
            assert data, f"the daemon closed the connection without replying to {payload['action']}"
            decoder.feed(data)


def ipc_problem(kind: int, payload: dict[str, Any]) -> str | None:
    return None if kind in _OK else problem(payload.get("error"), payload.get("message"))


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


# -- HTTP ----------------------------------------------------------------------------------------------------


class UnixHTTP(HTTPConnection):
    """HTTP/1.1 on the daemon's Unix socket, kept alive, through the standard library's client: the sweep's
    25 000 requests cost the test a quarter of what httpx's took, and the daemon parses the same bytes."""

    def __init__(self, path: str, timeout: float = 10) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)

    def ask(self, method: str, url: str, body: str) -> tuple[int, bytes]:
        """(status, body) of one request with a JSON body (reconnecting if the daemon closed the connection)."""
        self.request(method, url, body=body.encode(), headers={"Content-Type": "application/json"})
        with self.getresponse() as response:
            return response.status, response.read()


def http_problem(status: int, body: bytes) -> str | None:
    if status >= 500 and status != 503:
        return f"HTTP {status}: {body[:200].decode(errors='replace')}"
    if 200 <= status < 300:
        return None
    reply = json.loads(body)
    return problem(reply.get("code"), reply.get("error"))


def encode_segment(value: str) -> str:
    """A path segment percent-encoded whole (dots too, so no client folds ``..`` away before the daemon)."""
    return quote(value, safe="").replace(".", "%2E")


def route_path(route_path: str, args: dict[str, str]) -> str:
    return re.sub(r"<(?:\w+:)?(\w+)>", lambda m: args[m.group(1)], route_path)


def path_args(route_path: str) -> list[str]:
    return re.findall(r"<(?:\w+:)?(\w+)>", route_path)


def path_baseline(op: Op, base: dict[str, Any], arg: str) -> str:
    """A path argument's valid value: the baseline of the parameter it spells."""
    for spelling in op.spellings(arg):
        if spelling in base:
            return encode_segment(str(base[spelling]))
    raise AssertionError(f"no baseline for path argument {arg} of {op.name}")


def http_cases(route: Route, op: Op, base: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(label, URL, JSON body) for one route: each parameter hostile in the JSON body and in the query string,
    each path argument hostile."""
    names = path_args(route.path)
    in_path = {s for a in names for s in op.spellings(a)}
    fixed = {a: path_baseline(op, base, a) for a in names}
    body = {k: val for k, val in base.items() if k not in in_path}
    url = route_path(route.path, fixed)
    for p in op.params:
        if p.name in in_path:
            continue
        rest = {k: val for k, val in body.items() if k not in op.spellings(p.name)}
        for value in HOSTILE:
            if isinstance(value, bytes):
                continue
            yield f"body {p.name}={short(value)}", url, _json_with(rest, p.name, json.dumps(value))
        for raw in [*JSON_EXTRA, *(f"[{x}]" for x in JSON_EXTRA), *(f'{{"a": {x}}}' for x in JSON_EXTRA)]:
            yield f"body {p.name}={raw[:20]}", url, _json_with(rest, p.name, raw)
        for value in QUERY:
            yield (
                f"query {p.name}={short(value)}",
                f"{url}?{urlencode({p.name: value}, quote_via=quote)}",
                json.dumps(rest),
            )
    for arg in names:
        for value in SEGMENTS:
            yield (
                f"path {arg}={short(value)}",
                route_path(route.path, {**fixed, arg: encode_segment(value)}),
                json.dumps(body),
            )


def _json_with(rest: dict[str, Any], name: str, raw_value: str) -> str:
    """A JSON body of ``rest`` plus ``name`` given as raw JSON text (NaN, huge numbers, escapes as sent)."""
    inner = json.dumps(rest)[1:-1]
    return "{" + (inner + ", " if inner else "") + json.dumps(name) + ": " + raw_value + "}"


# -- the sweep -----------------------------------------------------------------------------------------------

# One case: what it sends (for the report), and the request, which returns what is wrong with its reply or None.
Case = tuple[str, Callable[[], str | None]]


class Sweep:
    """Runs the cases of one operation WORKERS at a time, each thread with its own HTTP connection (an IPC case
    opens its own). The replies are checked as before, one by one; only the waiting overlaps: the daemon
    answers one request while the test builds the next. The cases' state is made again before each operation."""

    WORKERS = 4

    def __init__(self, d: Daemon) -> None:
        self._daemon, self._local, self._opened = d, threading.local(), []
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(self.WORKERS, thread_name_prefix="fuzz")

    def http(self) -> UnixHTTP:
        """This thread's HTTP connection."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = UnixHTTP(str(self._daemon.settings.http_sock))
            with self._lock:
                self._opened.append(client)
        return client

    def problems(self, cases: list[Case]) -> Iterator[str]:
        """What is wrong, case by case in the order given."""
        for (label, _request), why in zip(cases, self._pool.map(lambda case: case[1](), cases), strict=True):
            if why is not None:
                yield f"{label}: {why}"

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)
        for client in self._opened:
            client.close()


def ipc_baseline(sock: str, name: str, base: dict[str, Any]) -> str | None:
    """What is wrong with the baseline's reply: refused as bad input, it would leave each case testing the
    baseline (spawn.start's must be)."""
    kind, reply = ipc_ask(sock, {"action": name, **base})
    if kind not in _OK and exit_code(reply["error"]) == EXIT_BAD_INPUT and name != "spawn.start":
        return f"baseline of {name} refused: {reply['message']}"
    return None


def ipc_cases(sock: str, name: str, op: Op, base: dict[str, Any], hostile: list[Any]) -> Iterator[Case]:
    """Each parameter of ``name`` given each hostile value, the others as in its baseline."""
    for p in op.params:
        rest = {k: val for k, val in base.items() if k not in op.spellings(p.name)}
        for value in hostile:
            payload = {"action": name, **rest, p.name: value}
            yield f"IPC {name} {p.name}={short(value)}", partial(ipc_check, sock, payload)


def ipc_check(sock: str, payload: dict[str, Any]) -> str | None:
    return ipc_problem(*ipc_ask(sock, payload))


def http_route_cases(sweep: Sweep, route: Route, op: Op, base: dict[str, Any]) -> Iterator[Case]:
    for label, url, body in http_cases(route, op, base):
        yield f"HTTP {route.method} {route.path} {label}", partial(http_check, sweep, route.method, url, body)


def http_check(sweep: Sweep, method: str, url: str, body: str) -> str | None:
    return http_problem(*sweep.http().ask(method, url, body))


def sweep_headers(http: httpx.Client) -> Iterator[str]:
    """The headers every route reads: who is calling (X-Agent-Id) and from which process (X-PID)."""
    for header in ("X-Agent-Id", "X-PID"):
        # What h11 lets a client send: no control characters, no blanks at either end.
        for value in [*(v.encode() for v in QUERY if v.isprintable() and v.strip() == v), b"\xff\xfe", b"a" * 8000]:
            response = http.post("/claim", json={"id": "fuzz:headers"}, headers={header: value})
            if (why := http_problem(response.status_code, response.content)) is not None:
                yield f"HTTP {header}: {value[:40]!r}: {why}"


def sweep_streams(http: httpx.Client) -> Iterator[str]:
    """The SSE routes: hostile path and query; a stream that starts (its arguments taken) is left at once."""
    for method, path, _ in STREAMS:
        for value in SEGMENTS + QUERY:
            url = route_path(path, {"channel": encode_segment(value)})
            with http.stream(method, url, params={"after": value}, timeout=5) as response:
                if response.status_code != 200:
                    response.read()
                    if (why := http_problem(response.status_code, response.content)) is not None:
                        yield f"HTTP {method} {path} {short(value)}: {why}"


def test_every_parameter_refuses_hostile_values_cleanly(daemon_factory: Callable[..., Daemon],
                                                        tmp_path: Path) -> None:  # fmt: skip
    empty = tmp_path / "empty-path"
    empty.mkdir()
    (tmp_path / "loop").symlink_to(tmp_path / "loop")  # a path no resolve() can follow
    hostile = [*HOSTILE, str(tmp_path / "loop" / "x")]
    # An empty PATH for the daemon too: nothing hostile can find a backend to spawn.
    d = daemon_factory(PATH=str(empty), PORT_DADDY_IPC_RATE="0")
    worktree, table = str(d.workdir), load_table()
    webhook = d.call("webhook.register", url="https://example.com/fuzz", events=["agent.stale"])["id"]
    missing = set(table) - set(baselines(prepare(d, worktree), worktree, webhook, str(empty)))
    assert not missing, f"operations without a baseline here: {sorted(missing)}"
    routes: dict[str, list[Route]] = {}
    for route in ROUTES:
        routes.setdefault(route.op, []).append(route)
    found: list[str] = []
    sweep, sock = Sweep(d), str(d.settings.ipc_sock)
    try:
        for name, op in table.items():
            try:
                base = baselines(prepare(d, worktree), worktree, webhook, str(empty))[name]
                if (why := ipc_baseline(sock, name, base)) is not None:
                    found.append(why)
                cases = list(ipc_cases(sock, name, op, base, hostile))
                for route in routes.get(name, ()):
                    cases += http_route_cases(sweep, route, op, base)
                found += sweep.problems(cases)
            except (OSError, PDError, HTTPException, httpx.HTTPError) as e:
                pytest.fail(f"the daemon stopped answering while {name} was fuzzed ({e!r}):\n"
                            + "\n".join(found) + "\n" + d.log()[-6000:])  # fmt: skip
        with unix_client(d) as http:
            found += sweep_headers(http)
            found += sweep_streams(http)
    finally:
        sweep.close()
    assert d.proc is not None and d.proc.poll() is None, "the daemon died"
    assert d.call("port.claim", id="fuzz:after")["port"] > 0
    crashes = d.log().count("Traceback")  # a refusal is logged as nothing; a crash as a traceback
    report = "\n".join([*found[:200], d.log()[-6000:]])
    assert not found and not crashes, f"{len(found)} bad replies, {crashes} tracebacks in daemon.log:\n{report}"


def test_fields_other_agents_are_shown_refuse_control_characters(daemon: Daemon) -> None:
    """A lock's owner comes back in other agents' LOCK_HELD and NOT_OWNER lines, a session's purpose in their
    FILE_CONFLICT line, a sender in their inbox: a line break or a terminal escape there made those several
    lines, or wrote on their terminals. Such text is refused; notes keep their line breaks."""
    d = daemon
    for action, args in [("lock.acquire", {"name": "poison", "owner": "evil\nowner"}),
                         ("session.start", {"purpose": "evil\x1b[2Jpurpose", "files": ["src/poison.py"]}),
                         ("inbox.send", {"to": "victim", "content": "hi", "sender": "evil\rsender"})]:  # fmt: skip
        with pytest.raises(PDError, match="control character") as refused:
            d.call(action, **args)
        assert refused.value.code == "VALIDATION_ERROR" and problem(refused.value.code, refused.value.message) is None
    assert not d.call("lock.get", name="poison")["held"]
    assert not d.call("file.owners", path="src/poison.py")["claimed"]
    assert d.call("inbox.stats", agentId="victim")["total"] == 0
    sid = d.call("session.start", purpose="notes of several lines")["sessionId"]
    d.call("note.add", sessionId=sid, content="line one\r\nline two\n\ttabbed")
    assert d.call("session.get", sessionId=sid)["notes"][0]["content"] == "line one\r\nline two\n\ttabbed"
    with pytest.raises(PDError, match="control character"):
        d.call("note.add", sessionId=sid, content="clear\x1b[2J")


def test_refusals_quoting_long_values_keep_their_start_and_end(daemon: Daemon) -> None:
    """NO_ACTIVE_SESSION quoted the caller's worktree whole (up to 4,096 characters), a tuple's refusal the path to
    its bad value (32 levels of long keys, thousands of characters): every refusal is cut in its middle to
    MAX_MESSAGE, so the line still says what was wrong and what to do."""
    with pytest.raises(PDError) as no_session:
        daemon.call("note.add", content="hi", agentId="nobody-here", worktree="/" + "w" * 4000)
    with pytest.raises(PDError) as deep_nan:
        daemon.call("tuple.out", fields=["x", deep(30)])
    cases = ((no_session, "no active session for agent nobody-here in /ww", "; start one with pd session start"),
             (deep_nan, "tuple[1].'line\\nbreakkk", " is nan; JSON numbers must be finite"))  # fmt: skip
    for refused, start, end in cases:
        message = refused.value.message
        assert problem(refused.value.code, message) is None, message
        assert message.startswith(start) and end in message[-60:] and "…" in message, message
