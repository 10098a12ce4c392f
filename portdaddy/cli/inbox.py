"""pd inbox [send | read | clear]: direct messages between agents."""

from __future__ import annotations

import json

import click

from portdaddy.cli.context import resolve_agent
from portdaddy.cli.messaging import parse_payload
from portdaddy.cli.output import age, emit_json, json_option, quiet_option, since_option
from portdaddy.cli.transport import call, fail
from portdaddy.errors import bad_input
from portdaddy.text import plural

_AGENT = click.option("--agent", "-a", metavar="ID", help="Whose inbox (default: the current agent).")


def _me(agent: str | None) -> str:
    who = resolve_agent(agent)
    if not who:
        fail(bad_input("no agent: pass --agent, set PORT_DADDY_AGENT, or run pd begin first"))
    return who


@click.group(invoke_without_command=True)
@_AGENT
@click.option("--unread", "-u", is_flag=True, help="Only unread messages.")
@since_option("messages (with --unread: the unread ones)")
@click.option("--limit", type=int, help="At most this many (default 50).")
@json_option
@quiet_option
@click.pass_context
def inbox(ctx: click.Context, agent: str | None, unread: bool, since: str | None, limit: int | None,
          as_json: bool, quiet: bool) -> None:  # fmt: skip
    """Your direct messages, newest first (a subcommand sends, marks read or clears).

    \b
    Examples:
      pd inbox --unread
      pd inbox --since 2h
      pd inbox send backend-agent "schema v2 is in, rebase please"
      pd inbox read
    """
    if ctx.invoked_subcommand is not None:
        return
    args = {"agentId": _me(agent), "unread": unread, "since": since, "limit": limit}
    result = call("inbox.list", args, as_json=as_json)
    if as_json:
        emit_json(result)
    elif quiet:
        click.echo(result["count"])
    elif not result["messages"]:
        click.echo("No messages" + (" unread" if unread else ""))
    else:
        for m in result["messages"]:
            content = m["content"] if isinstance(m["content"], str) else json.dumps(m["content"])
            mark = " " if m["read"] else "*"
            click.echo(f"{mark} {m['id']}  {age(m['createdAt'])} ago  from {m['from'] or '-'}: {content}")


@inbox.command()
@click.argument("to")
@click.argument("text", nargs=-1, required=True)
@click.option("--from", "sender", help="Who is writing (default: the current agent).")
@click.option("--type", "kind", help="A free-text kind (default: message).")
@json_option
@quiet_option
def send(to: str, text: tuple[str, ...], sender: str | None, kind: str | None, as_json: bool, quiet: bool) -> None:
    """Send TEXT to the agent TO. It is kept even if TO is dead or not registered.

    \b
    Examples:
      pd inbox send frontend-agent "API is on port 3101"
      pd inbox send qa '{"retest": ["checkout"]}'
    """
    result = call("inbox.send", {"to": to, "content": parse_payload(" ".join(text)),
                                 "sender": sender or resolve_agent(), "type": kind}, as_json=as_json)  # fmt: skip
    if as_json:
        emit_json(result)
    elif quiet:
        click.echo(result["messageId"])
    else:
        click.echo(f"Sent to {to} (id: {result['messageId']}): {result['message']}")


@inbox.command()
@click.argument("message_id", type=int, required=False)
@_AGENT
@json_option
@quiet_option
def read(message_id: int | None, agent: str | None, as_json: bool, quiet: bool) -> None:
    """Mark MESSAGE_ID (or every message) read. -q prints how many were marked.

    \b
    Examples:
      pd inbox read
      pd inbox read 42 --agent backend-agent
    """
    result = call("inbox.read", {"agentId": _me(agent), "messageId": message_id}, as_json=as_json)
    if as_json:
        emit_json(result)
    else:
        click.echo(result["marked"] if quiet else f"Marked {plural(result['marked'], 'message')} read")


@inbox.command()
@_AGENT
@json_option
@quiet_option
def clear(agent: str | None, as_json: bool, quiet: bool) -> None:
    """Delete every message of the inbox. -q prints how many were deleted.

    \b
    Example:
      pd inbox clear --agent backend-agent
    """
    result = call("inbox.clear", {"agentId": _me(agent)}, as_json=as_json)
    if as_json:
        emit_json(result)
    else:
        click.echo(result["deleted"] if quiet else f"Deleted {plural(result['deleted'], 'message')}")


COMMANDS = (inbox,)
