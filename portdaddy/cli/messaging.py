"""pd pub | sub | wait | watch | channels | history: channels that remember."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import click

from portdaddy.cli.context import resolve_agent
from portdaddy.cli.output import age, echo_exact, emit_json, json_option, quiet_option, table, warning
from portdaddy.cli.transport import blocking_call, call, connect, fail, spinning
from portdaddy.durations import parse_duration_ms
from portdaddy.errors import PDError, bad_input
from portdaddy.ipc.client import BlockingClient
from portdaddy.text import plural

_HISTORY_PAGE = 1000


def parse_payload(text: str) -> Any:
    """JSON if it parses (objects, numbers, quoted strings), else the text itself."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested too deep to be JSON we would take
        return text


def _patterns(channels: tuple[str, ...]) -> list[str]:
    return [c.strip() for arg in channels for c in arg.split(",") if c.strip()]


def show_payload(msg: dict[str, Any]) -> str:
    payload = msg["payload"]
    return payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))


def stream(client: BlockingClient, patterns: list[str], *, new: bool, after: int | None) -> Iterator[dict[str, Any]]:
    """Subscribe and yield messages in id order; after a ``msg.missed`` notice, catch up from history."""
    client.request("msg.subscribe", {"channels": patterns, "new": new, "after": after})
    last = -1
    while True:
        frame = client.receive(patient=True)  # the next message may be seconds or days away
        if frame is None:
            continue
        body = frame.payload
        if body.get("action") == "msg.missed":
            cursor = body["after"]
            while True:
                page = client.request("msg.history", {"channel": patterns, "after": cursor, "limit": _HISTORY_PAGE})
                for msg in page["messages"]:
                    if msg["id"] > last:
                        last = msg["id"]
                        yield msg
                if not page["more"]:
                    break
                cursor = page["lastId"]
        elif body.get("action") == "msg.delivery" and body["id"] > last:
            last = body["id"]
            yield {k: body.get(k) for k in ("id", "channel", "payload", "contentType", "sender", "createdAt")}


@click.command()
@click.argument("channel")
@click.argument("payload", nargs=-1, required=True)
@click.option("--sender", help="Who is speaking (default: the current agent).")
@json_option
@quiet_option
def pub(channel: str, payload: tuple[str, ...], sender: str | None, as_json: bool, quiet: bool) -> None:
    """Publish PAYLOAD to CHANNEL (JSON if it parses, else text). -q prints the message id.

    \b
    Examples:
      pd pub payments:api '{"status":"healthy","port":3101}'
      pd pub build:complete done
    """
    result = call("msg.publish", {"channel": channel, "payload": parse_payload(" ".join(payload)),
                                  "sender": sender or resolve_agent()}, as_json=as_json)  # fmt: skip
    if as_json:
        emit_json(result)
    else:
        click.echo(result["id"] if quiet else f"Published to {channel} (id: {result['id']})")


@click.command()
@click.argument("channels", nargs=-1, required=True)
@click.option("--new", is_flag=True, help="Skip the retained (last) message of each channel.")
@click.option("--once", is_flag=True, help="Exit after the first message.")
@click.option("--after", type=int, help="Replay every message after this id first (resume).")
@json_option
def sub(channels: tuple[str, ...], new: bool, once: bool, after: int | None, as_json: bool) -> None:
    """Print messages on CHANNELS (comma-separated; payments:* and * are wildcards) as they arrive.

    The last message of each matching channel is printed first, so a signal published before you
    subscribed is not missed. It runs until interrupted, like tail -f: to wait for a signal and go on,
    add --once, or use pd wait CH... to wait for several. --json prints one JSON object per line.

    \b
    Examples:
      pd sub 'payments:*'
      pd sub build:complete --once            # the blocking chain: wait for the signal
      pd sub payments:api,payments:queries --new --json
    """
    try:
        waiting = spinning(f"waiting for a message on {','.join(channels)}…") if once else nullcontext()
        with connect() as client, waiting:
            for msg in stream(client, _patterns(channels), new=new, after=after):
                if as_json:
                    echo_exact(json.dumps(msg, separators=(",", ":")))
                else:
                    click.echo(show_payload(msg))
                if once:
                    return
    except PDError as e:
        fail(e, as_json=as_json)


@click.command()
@click.argument("channels", nargs=-1, required=True)
@click.option("--timeout", metavar="DURATION", help="Give up after e.g. 30s (exit 1); default: wait.")
@click.option("--after", type=int, default=0, help="Only messages after this id count (default: any).")
@json_option
@quiet_option
def wait(channels: tuple[str, ...], timeout: str | None, after: int, as_json: bool, quiet: bool) -> None:
    """Block until every one of CHANNELS has a message (one already published counts).

    \b
    Examples:
      pd wait payments:schema payments:api --timeout 5m && npm test
      pd wait 'build:*' --json
    """
    patterns = _patterns(channels)
    ms = parse_duration_ms(timeout) if timeout is not None else None
    if timeout is not None and ms is None:
        fail(bad_input(f"--timeout {timeout!r} is not a duration; use e.g. 30s or 5m"), as_json=as_json)
    result = blocking_call("msg.wait", {"channels": patterns, "after": after, "timeout": ms},
                           label=f"waiting for {', '.join(patterns)}…", timeout_ms=ms, as_json=as_json)  # fmt: skip
    if as_json:
        emit_json(result)
    elif not quiet:
        for pattern, msg in result["messages"].items():
            click.echo(f"{pattern}: {show_payload(msg)}")


@click.command()
@click.argument("channel")
@click.option("--exec", "command", required=True, help="Shell command run once per message.")
@click.option("--once", is_flag=True, help="Exit after the first message.")
@click.option("--retained", is_flag=True, help="Also run for the retained (last) message of each channel.")
@json_option
def watch(channel: str, command: str, once: bool, retained: bool, as_json: bool) -> None:
    """Run a command for every new message on CHANNEL, one at a time, in order.

    The command sees PD_CHANNEL, PD_MESSAGE (the whole message as JSON), PD_MESSAGE_CONTENT (the
    payload: text as-is, else JSON), PD_MESSAGE_ID and PD_SENDER. With --json, pd's own refusals print as
    JSON on stdout; the command's output is its own.

    \b
    Examples:
      pd watch build:complete --exec 'npm run deploy'
      pd watch 'payments:*' --exec 'echo "$PD_CHANNEL: $PD_MESSAGE_CONTENT" >> radio.log'
    """
    try:
        with connect() as client:
            for msg in stream(client, _patterns((channel,)), new=not retained, after=None):
                env = {**os.environ, "PD_CHANNEL": msg["channel"], "PD_MESSAGE": json.dumps(msg),
                       "PD_MESSAGE_CONTENT": show_payload(msg), "PD_MESSAGE_ID": str(msg["id"]),
                       "PD_SENDER": msg["sender"] or ""}  # fmt: skip
                status = subprocess.run(command, shell=True, env=env).returncode
                if status:
                    warning(f"command exited {status} for message {msg['id']}")
                if once:
                    return
    except PDError as e:
        fail(e, as_json=as_json)


@click.command()
@click.option("--clear", metavar="CHANNEL", help="Delete the history of CHANNEL (or a pattern) instead.")
@json_option
@quiet_option
def channels(clear: str | None, as_json: bool, quiet: bool) -> None:
    """List channels with their message counts and last activity, newest first. -q prints how many channels
    (with --clear: how many messages were deleted).

    \b
    Examples:
      pd channels
      pd channels --clear 'build:*'
    """
    if clear:
        result = call("msg.clear", {"channel": clear}, as_json=as_json)
        if as_json:
            emit_json(result)
        else:
            click.echo(result["deleted"] if quiet else f"Cleared {plural(result['deleted'], 'message')} from {clear}")
        return
    result = call("msg.channels", as_json=as_json)
    if as_json:
        emit_json(result)
    elif quiet:
        click.echo(result["count"])
    elif not result["channels"]:
        click.echo("No channels yet")
    else:
        table([(c["channel"], c["count"], c["lastId"], age(c["lastActivity"])) for c in result["channels"]],
              ("CHANNEL", "MESSAGES", "LAST ID", "LAST ACTIVITY"))  # fmt: skip


@click.command()
@click.argument("channel")
@click.option("--after", type=int, help="Messages after this id (a cursor), instead of the newest.")
@click.option("--limit", type=int, help="At most this many (default 50, max 1000).")
@json_option
@quiet_option
def history(channel: str, after: int | None, limit: int | None, as_json: bool, quiet: bool) -> None:
    """Print a channel's (or pattern's) history, oldest first, with ids. -q prints how many messages.

    \b
    Examples:
      pd history payments:api
      pd history 'payments:*' --after 120 --json
    """
    result = call("msg.history", {"channel": channel, "after": after, "limit": limit}, as_json=as_json)
    if as_json:
        emit_json(result)
        return
    if quiet:
        click.echo(result["count"])
        return
    if not result["messages"]:
        click.echo(f"No messages on {channel}", err=True)  # stderr: scripts read stdout as messages
    for msg in result["messages"]:
        click.echo(f"{msg['id']}  {msg['channel']}  {msg['sender'] or '-'}  {show_payload(msg)}")
    if result["more"]:  # stderr, as above: a page cut at the limit or at the size of one reply
        if after is None:  # the newest page, cut: what it left out is older
            click.echo(f"Older messages were left out: pd history '{channel}' --after 0 reads them all", err=True)
        else:
            click.echo(f"More messages follow: pd history '{channel}' --after {result['lastId']}", err=True)


COMMANDS = (pub, sub, wait, watch, channels, history)
