"""The quart-trio application: every route is a thin adapter onto the operation table.

Security: requests over the loopback TCP listener need ``Authorization: Bearer <token>`` (except
``/health``) and a Host header naming localhost (a DNS-rebinding guard). Requests over the Unix socket come
from the daemon's own uid (checked per connection in ``server.py``) and need no token.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from functools import partial
from typing import Any

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from portdaddy.core.ops import Ctx, call
from portdaddy.errors import PDError, http_status
from portdaddy.http.routes import ROUTES, STREAMS, Route

log = logging.getLogger("portdaddy.http")

MAX_BODY = 1024 * 1024
_LOCAL_HOST = re.compile(r"^(localhost|127\.0\.0\.1|\[::1\])(:\d{1,5})?$")
_OPEN_PATHS = frozenset({"/health"})


def json_response(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body, separators=(",", ":")), status=status, content_type="application/json")


def error_response(err: PDError) -> Response:
    body = {"success": False, "error": err.message, "code": err.code, **err.extra}
    return json_response(body, http_status(err.code))


def request_ctx(core: Any) -> Ctx:
    pid_header = request.headers.get("X-PID", "")
    return Ctx(
        core,
        "http",
        agent_id=request.headers.get("X-Agent-Id") or None,
        pid=int(pid_header) if pid_header.isdigit() else None,
    )


async def request_args(path_args: dict[str, Any]) -> dict[str, Any]:
    """Query, then JSON body, then path: later sources win."""
    args: dict[str, Any] = dict(request.args.items())
    body = await request.get_data()
    if body:
        try:
            parsed = json.loads(body)
        except ValueError:
            raise PDError("VALIDATION_ERROR", "request body is not valid JSON") from None
        if not isinstance(parsed, dict):
            raise PDError("VALIDATION_ERROR", "request body must be a JSON object")
        args.update(parsed)
    args.update(path_args)
    return args


def create_app(core: Any) -> QuartTrio:
    app = QuartTrio("portdaddy")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.config["RESPONSE_TIMEOUT"] = None
    token: str = core.http_token

    @app.before_request
    async def guard() -> Response | None:
        if request.scope.get("client") is None:  # Unix socket: same uid, checked at accept
            return None
        if not _LOCAL_HOST.match(request.headers.get("Host", "")):
            return json_response({"error": "Host header must be localhost", "code": "FORBIDDEN"}, 403)
        if request.path in _OPEN_PATHS:
            return None
        given = request.headers.get("Authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip(), token)):
            return json_response(
                {"error": f"missing or wrong bearer token; read it from {core.settings.token_file}",
                 "code": "UNAUTHORIZED"},
                401,
            )  # fmt: skip
        return None

    @app.errorhandler(HTTPException)
    async def http_error(e: HTTPException) -> Response:
        code = "PAYLOAD_TOO_LARGE" if e.code == 413 else "NOT_FOUND" if e.code == 404 else "VALIDATION_ERROR"
        return json_response({"success": False, "error": e.description or e.name, "code": code}, e.code or 500)

    for route in ROUTES:
        app.add_url_rule(
            route.path, endpoint=f"{route.method} {route.path}", view_func=partial(_view, core, route),
            methods=[route.method],
        )  # fmt: skip
    for method, path, view in STREAMS:
        app.add_url_rule(path, endpoint=f"{method} {path}", view_func=partial(view, core), methods=[method])
    return app


async def _view(core: Any, route: Route, **path_args: Any) -> Response:
    try:
        args = await request_args(path_args)
        args.update(route.fixed)
        result = await call(core.ops, route.op, args, request_ctx(core))
    except PDError as e:
        return error_response(e)
    except Exception:
        log.exception("%s %s failed", route.method, route.path)
        return error_response(PDError("INTERNAL", f"{route.op} failed; see daemon.log"))
    return json_response(result)
