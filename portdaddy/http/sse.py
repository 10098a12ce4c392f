"""``GET /msg/<channel>/subscribe``: Server-Sent Events with ``id:`` lines and ``Last-Event-ID`` resume.

The stream is a cursor over the channel history, not a queue: it sends what was published after the last id
it sent, then waits (woken by publish) for more. A slow reader therefore costs the daemon nothing but its
cursor, and a client that reconnects with ``Last-Event-ID`` (or ``?after=``) misses nothing still in history.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import trio
from quart import Response, request

from portdaddy.core import validate as v
from portdaddy.core.broker import Broker, Message, channel_pattern
from portdaddy.errors import PDError

HEARTBEAT_S = 15.0


def _event(msg: Message) -> str:
    return f"id: {msg.id}\ndata: {json.dumps(msg.to_wire(), separators=(',', ':'))}\n\n"


def _args(channel: str) -> tuple[tuple[str, ...], int | None, bool]:
    from portdaddy.http.app import query_args  # the app module imports the routes that list this view

    query = query_args(request.scope["query_string"])
    patterns = tuple(v.str_list(channel_pattern, max_items=20)("channel", channel))
    resume = request.headers.get("Last-Event-ID") or query.get("after")
    after = v.integer(0)("Last-Event-ID", resume) if resume else None
    return patterns, after, v.boolean("new", query.get("new", "false"))


async def subscribe_view(core: Any, channel: str) -> Response:
    from portdaddy.http.app import error_response  # the app module imports the routes that list this view

    try:
        patterns, after, new = _args(channel)
    except PDError as e:
        return error_response(e)
    broker: Broker = core.broker

    async def stream() -> AsyncIterator[str]:
        yield f"event: connected\ndata: {json.dumps({'channel': ','.join(patterns)})}\n\n"
        cursor = broker.last_id if after is None else after
        if after is None and not new:
            for msg in broker.retained(patterns):
                yield _event(msg)
        while not core.stopping.is_set():
            found: list[Message] = []
            with trio.move_on_after(HEARTBEAT_S):
                try:
                    found = await broker.next_after(patterns, cursor)
                except PDError:  # the daemon is stopping
                    return
            if not found:
                yield ":heartbeat\n\n"
            for msg in found:
                yield _event(msg)
                cursor = msg.id

    response = Response(stream(), content_type="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.timeout = None
    return response
