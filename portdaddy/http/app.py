"""The HTTP application: every route is a thin adapter onto the operation table.

Request/response routes (``ROUTES``) are served by a small ASGI dispatcher that goes straight from the
request to the operation; Quart serves what needs its machinery (the streaming ``STREAMS`` routes) and
answers everything else (unknown paths, wrong methods). Measured on the Unix socket, Quart's per-request
work was about half the daemon's cost of a claim; the dispatcher needs a fraction of it.

Security: requests over the loopback TCP listener need ``Authorization: Bearer <token>`` (except
``/health``) and a Host header naming localhost (a DNS-rebinding guard). Requests over the Unix socket come
from the daemon's own uid (checked per connection in ``server.py``) and need no token.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from functools import partial
from typing import Any
from urllib.parse import parse_qsl, unquote

import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, NotFound

from portdaddy.core import validate as v
from portdaddy.core.ops import Ctx, call, lookup
from portdaddy.errors import PDError, http_status
from portdaddy.http.routes import ROUTES, STREAMS, Route
from portdaddy.ipc.frame import MAX_REQUEST

log = logging.getLogger("portdaddy.http")

MAX_BODY = MAX_REQUEST  # one limit for a request, whichever way it comes (spec/ipc.md)
_LOCAL_HOST = re.compile(r"^(localhost|127\.0\.0\.1|\[::1\])(:\d{1,5})?$")
_OPEN_PATHS = frozenset({"/health"})
# JSON's \ud800-\udfff escapes: a lone one decodes to a str that no UTF-8 encoder (msgpack's, ours) accepts.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _may_hold_surrogates(body: bytes) -> bool:
    """Whether the parsed ``body`` may hold a lone surrogate: json.loads decodes bytes with surrogatepass, so besides
    an escape, a surrogate's own UTF-8 bytes (\\xed\\xa0\\x80) and JSON in UTF-16 or 32 make one as well."""
    if _SURROGATE_ESCAPE.search(body):
        return True
    if body.isascii():
        return False
    try:
        body.decode("utf-8")  # strict: refuses a surrogate's bytes
    except UnicodeDecodeError:
        return True
    return False


def json_response(body: Any, status: int = 200) -> Response:
    return Response(v.compact_json(body), status=status, content_type="application/json")


def error_body(err: PDError) -> dict[str, Any]:
    return {"success": False, "error": err.message, "code": err.code, **err.extra}


def error_response(err: PDError) -> Response:
    return json_response(error_body(err), http_status(err.code))


def refusal(core: Any, *, over_tcp: bool, host: str, path: str, authorization: str,
            origin: str = "") -> tuple[int, dict] | None:  # fmt: skip
    """Why a request may not proceed (status, body), or None. Unix-socket peers were checked at accept."""
    if not over_tcp:
        return None
    if not _LOCAL_HOST.match(host):
        return 403, {"success": False, "error": "Host header must be localhost", "code": "FORBIDDEN"}
    if origin:
        # Only browsers send Origin, naming the page behind the request. No web page is a client of this daemon
        # (a localhost one may be another user's server), even one that got hold of the token.
        return 403, {"success": False, "error": f"requests from web pages ({origin[:80]}) are refused; call the "
                     "daemon from a local program", "code": "FORBIDDEN"}  # fmt: skip
    if path in _OPEN_PATHS:
        return None
    # Compared as bytes: compare_digest refuses str with non-ASCII characters (a TypeError, a 500).
    given = authorization[7:].strip().encode("utf-8", "replace")
    if not (authorization.startswith("Bearer ") and hmac.compare_digest(given, core.http_token.encode())):
        return 401, {"success": False, "error": f"missing or wrong bearer token; read it from "
                     f"{core.settings.token_file}", "code": "UNAUTHORIZED"}  # fmt: skip
    return None


def parse_body(body: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except ValueError as e:  # the decoder's reason says where (or that a number has too many digits)
        raise PDError("VALIDATION_ERROR", f"request body is not valid JSON ({e}); send a JSON object") from None
    except RecursionError:
        raise PDError("VALIDATION_ERROR", "request body nests too deep; flatten it") from None
    if not isinstance(parsed, dict):
        raise PDError("VALIDATION_ERROR", "request body must be a JSON object")
    if _may_hold_surrogates(body) and (where := v.surrogate_in(parsed, "")) is not None:
        # Stored, it would fail every later reply that carries it (IPC's msgpack encodes UTF-8 strictly); a fleet
        # run's task, its registration and its exec. Here it is refused for every field, whatever checks it later.
        raise v.not_text(f"{where} of the request body" if where.startswith("a key") else f"the request body's {where}")
    return parsed


def query_args(query_string: bytes) -> dict[str, str]:
    """A query string's parameters; one given twice is refused rather than one of its values silently kept."""
    pairs = parse_qsl(query_string.decode("latin-1"))
    args = dict(pairs)
    if len(args) < len(pairs):
        key, times = Counter(k for k, _ in pairs).most_common(1)[0]
        raise PDError("VALIDATION_ERROR", f"query parameter '{key[:40]}' is given {times} times; give it once "
                      "(a list goes comma-separated: a,b)")  # fmt: skip
    return args


class Router:
    """Method and path to a Route and its path arguments. Paths with more literal segments are tried first,
    so ``/harbors/agent/<agentId>`` wins over ``/harbors/<name>/...`` shapes of the same length.

    Paths are matched as sent (percent-encoded): split on ``/`` first, then each segment decoded once, so an
    argument may hold an encoded slash (``/pheromone/files/src%2Fa.py``) and ``%253A`` stays ``%3A``."""

    def __init__(self, routes: list[Route]) -> None:
        self._routes: dict[tuple[str, int], list[tuple[tuple[str, ...], Route]]] = {}
        for route in routes:
            # Quart syntax: a converter (<int:messageId>) is the op's to check; the argument is named messageId.
            segments = tuple(re.sub(r"^<\w+:", "<", seg) for seg in route.path.strip("/").split("/"))
            self._routes.setdefault((route.method, len(segments)), []).append((segments, route))
        for candidates in self._routes.values():
            candidates.sort(key=lambda c: -sum(not seg.startswith("<") for seg in c[0]))

    def match(self, method: str, raw_path: str) -> tuple[Route, dict[str, str]] | None:
        parts = _segments(raw_path)
        for segments, route in self._routes.get((method, len(parts)), ()):
            args = _bind_path(segments, parts)
            if args is not None:
                return route, args
        return None

    def methods(self, raw_path: str) -> list[str]:
        """The methods some route serves ``raw_path`` with, HEAD where GET is and OPTIONS on any served path
        (what ``Allow`` says); none for a path no route serves."""
        parts = _segments(raw_path)
        served = {method for (method, size), candidates in self._routes.items() if size == len(parts)
                  for segments, _ in candidates if _bind_path(segments, parts) is not None}  # fmt: skip
        if not served:
            return []
        return sorted(served | {"OPTIONS"} | ({"HEAD"} if "GET" in served else set()))


def _segments(raw_path: str) -> list[str]:
    return [unquote(part, errors="replace") for part in raw_path.strip("/").split("/")]


def _bind_path(segments: tuple[str, ...], parts: list[str]) -> dict[str, str] | None:
    args = {}
    for seg, part in zip(segments, parts, strict=True):
        if seg.startswith("<"):
            if not part:
                return None
            args[seg[1:-1]] = part
        elif seg != part:
            return None
    return args


def create_app(core: Any) -> Callable[..., Awaitable[None]]:
    """The ASGI application hypercorn serves."""
    quart = _create_quart(core)
    router = Router(ROUTES)
    # Every served path, the streams' too, so OPTIONS and 405s are answered here alike for all of them.
    paths = Router([*ROUTES, *(Route(method, path, "") for method, path, _ in STREAMS)])

    async def app(scope: dict[str, Any], receive: Callable[..., Awaitable[Any]],
                  send: Callable[..., Awaitable[None]]) -> None:  # fmt: skip
        # hypercorn's raw_path is the path as sent; scope["path"] is decoded already (%2F would split a segment)
        raw_path = scope["raw_path"].decode("utf-8", "replace") if scope["type"] == "http" else ""
        method = scope.get("method", "")
        head = method == "HEAD"  # a GET without its body: the same status and headers (RFC 9110)
        found = router.match("GET" if head else method, raw_path) if raw_path else None
        allowed = paths.methods(raw_path) if found is None and raw_path else []
        if found is None and (not allowed or (method in allowed and method != "OPTIONS")):
            await quart(scope, receive, send)  # the streams (GET and HEAD), and 404s
            return
        headers = {k: v.decode("latin-1") for k, v in scope["headers"]}
        refused = refusal(core, over_tcp=scope.get("client") is not None, host=headers.get(b"host", ""),
                          path=scope["path"], authorization=headers.get(b"authorization", ""),
                          origin=headers.get(b"origin", ""))  # fmt: skip
        if refused is not None or found is None:
            # Read the body it is not served for: a reply before it leaves the connection unusable, and the
            # server closes it, under a client that may already be sending its next request on it.
            with suppress(PDError):
                await _read_body(receive)
        allow = [(b"allow", ", ".join(allowed).encode())]
        if refused is not None:
            await _respond(send, refused[0], refused[1], head=head)
        elif method == "OPTIONS":  # what the path takes, and nothing else (no CORS: web pages are refused)
            await send({"type": "http.response.start", "status": 204, "headers": allow})
            await send({"type": "http.response.body", "body": b""})
        elif found is None:
            await _respond(send, 405, error_body(method_not_allowed(method, scope["path"], allowed)), allow,
                           head=head)  # fmt: skip
        else:
            status, body = await _serve(core, found[0], found[1], scope, headers, receive)
            await _respond(send, status, body, head=head)

    return app


async def _serve(core: Any, route: Route, path_args: dict[str, str], scope: dict[str, Any],
                 headers: dict[bytes, str], receive: Callable[..., Awaitable[Any]]) -> tuple[int, Any]:  # fmt: skip
    try:
        args: dict[str, Any] = query_args(scope["query_string"])  # query, body, path
        body = await _read_body(receive)
        if body:
            args.update(parse_body(body))
        op = lookup(core.ops, route.op)
        for key, value in path_args.items():  # the path names what is acted on, however else it is spelled
            for spelling in op.spellings(key):
                args.pop(spelling, None)
            args[key] = value
        args.update(route.fixed)
        pid = headers.get(b"x-pid", "")
        ctx = Ctx(core, "http", agent_id=_agent_id(headers.get(b"x-agent-id")), pid=_pid(pid))
        return 200, await call(core.ops, route.op, args, ctx, waiting=partial(_unless_the_client_leaves, receive))
    except PDError as e:
        return http_status(e.code), error_body(e)
    except Exception:
        log.exception("%s %s failed", route.method, route.path)
        return 500, error_body(PDError("INTERNAL", f"{route.op} failed; see daemon.log"))


_LEFT = object()


async def _unless_the_client_leaves(receive: Callable[..., Awaitable[Any]], run: Callable[[], Awaitable[Any]]) -> Any:
    """Run an operation that may wait (a queued lock, a blocking take) until it ends or the client hangs up.
    A hang-up cancels it, which withdraws the wait: a lock is not granted, nor a tuple taken, for nobody."""
    result, error = _LEFT, None
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        try:
            result = await run()
        except Exception as e:  # re-raised below as itself: out of a nursery it would come in an exception group
            error = e
        nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    if result is _LEFT:
        raise PDError("CANCELLED", "the client went away while the operation waited")
    return result


def method_not_allowed(method: str, path: str, allowed: list[str]) -> PDError:
    """A 405; its message names the methods that do something (HEAD and OPTIONS go without saying)."""
    use = " or ".join(m for m in allowed if m not in ("HEAD", "OPTIONS"))
    return PDError("METHOD_NOT_ALLOWED", f"{method} is not served on {path}; use {use}", allowed=allowed)


def _agent_id(header: str | None) -> str | None:
    """The X-Agent-Id header's agent, checked as IPC checks the agent a connection binds to: it owns locks,
    sessions and claims, so a malformed one is refused, not stored."""
    if not header:
        return None
    try:
        return v.AGENT_ID("X-Agent-Id", header)
    except PDError as e:
        raise PDError(e.code, f"X-Agent-Id: {e.message}") from None


def _pid(header: str) -> int | None:
    """The X-PID header's process id, checked as a ``pid`` parameter is; None when absent or not one (it only
    labels the caller, so a bad one is not worth refusing the request for)."""
    try:
        return v.pid("X-PID", header) if header else None
    except PDError:
        return None


async def _read_body(receive: Callable[..., Awaitable[Any]]) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise PDError("VALIDATION_ERROR", "the client went away before sending its body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise PDError("PAYLOAD_TOO_LARGE", f"request body is over {MAX_BODY} bytes; send less")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _respond(send: Callable[..., Awaitable[None]], status: int, body: Any,
                   headers: Sequence[tuple[bytes, bytes]] = (), *, head: bool = False) -> None:  # fmt: skip
    """Send a JSON reply; for HEAD its headers only (Content-Length still says how long the body is)."""
    data = v.compact_json(body).encode()
    fixed = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": [*fixed, *headers]})
    await send({"type": "http.response.body", "body": b"" if head else data})


_HTTP_CODES = {413: "PAYLOAD_TOO_LARGE"}


def _create_quart(core: Any) -> QuartTrio:
    app = QuartTrio("portdaddy")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.config["RESPONSE_TIMEOUT"] = None

    @app.before_request
    async def guard() -> Response | None:
        refused = refusal(
            core,
            over_tcp=request.scope.get("client") is not None,
            path=request.path,
            host=request.headers.get("Host", ""),
            authorization=request.headers.get("Authorization", ""),
            origin=request.headers.get("Origin", ""),
        )
        return None if refused is None else json_response(refused[1], refused[0])  # fmt: skip

    @app.errorhandler(HTTPException)
    async def http_error(e: HTTPException) -> Response:
        """Quart's refusals in the dispatcher's shape and words (werkzeug's say nothing of what to do)."""
        status = e.code or 500  # a 405 is the dispatcher's, which knows the streams' paths too
        if isinstance(e, NotFound):
            return error_response(PDError("NOT_FOUND", f"no route {request.method} {request.path}; the HTTP API is "
                                          "described in spec/openapi.yaml"))  # fmt: skip
        code = _HTTP_CODES.get(status, "INTERNAL" if status >= 500 else "VALIDATION_ERROR")
        return json_response({"success": False, "error": e.description or e.name, "code": code}, status)

    for method, path, view in STREAMS:
        app.add_url_rule(path, endpoint=f"{method} {path}", view_func=partial(view, core), methods=[method])
    return app
