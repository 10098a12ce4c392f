"""pd tuple out | rd | in | scan | count: the Linda tuple space."""

from __future__ import annotations

import json
from typing import Any

import click

from portdaddy.cli.output import emit_json, json_option, quiet_option
from portdaddy.cli.transport import blocking_call, call, fail
from portdaddy.durations import parse_duration_ms
from portdaddy.errors import NotFound, bad_input
from portdaddy.text import plural

_HARBOR = click.option("--harbor", "-H", help="The harbor's space (default: the global space).")


@click.group()
def tuple_() -> None:
    """Shared typed memory: write tuples, read them by pattern, take each exactly once.

    Patterns are JSON arrays compared position by position: "*" or null match anything, ">0.7"/"<3"
    compare numbers, "myapp:*" matches identities under myapp, "a:*:c" matches per segment; a pattern may
    be shorter than the tuple.

    \b
    Examples:
      pd tuple out '["task", "build-auth", "pending"]' --harbor myapp:fleet
      pd tuple in '["task", "*", "pending"]' --harbor myapp:fleet --wait --timeout 5m
      pd tuple rd '["connection", "*", "*", ">0.7"]' --harbor myapp:fleet
    """


def _json_arg(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        fail(bad_input(f'{what} must be a JSON array like \'["task", "*"]\', got {text[:60]!r}'))
    except RecursionError:  # json recurses per level of nesting
        fail(bad_input(f"{what} nests too deep to be a tuple; flatten it"))


def _blocking_call(action: str, args: dict[str, Any], *, as_json: bool, wait: bool, timeout: str | None) -> Any:
    if not wait:
        return call(action, args, as_json=as_json)
    label = f"waiting for a tuple matching {json.dumps(args['pattern'])}…"
    return blocking_call(action, args, label=label, as_json=as_json,
                         timeout_ms=parse_duration_ms(timeout) if timeout is not None else None)  # fmt: skip


def _print_tuples(tuples: list[dict[str, Any]]) -> None:
    for t in tuples:
        click.echo(f"  {t['id']}: {json.dumps(t['fields'])}")


@tuple_.command("out")
@click.argument("fields")
@_HARBOR
@click.option("--ttl", metavar="DURATION", help="Expire the tuple after e.g. 10m.")
@click.option("--as", "written_by", metavar="AGENT", help="Record the writer (default: PORT_DADDY_AGENT).")
@json_option
@quiet_option
def out(fields: str, harbor: str | None, ttl: str | None, written_by: str | None, as_json: bool,
        quiet: bool) -> None:  # fmt: skip
    """Write the tuple FIELDS (a JSON array).

    \b
    Examples:
      pd tuple out '["task", "build-auth", "pending"]'
      pd tuple out '["connection", "trie+pubsub", "spider", 0.9]' --harbor myapp:fleet --ttl 10m -q
    """
    result = call("tuple.out", {"fields": _json_arg(fields, "FIELDS"), "harbor": harbor, "ttl": ttl,
                                "writtenBy": written_by}, as_json=as_json)  # fmt: skip
    if as_json:
        emit_json(result)
    else:
        where = result["tuple"]["harbor"] or "the global space"
        click.echo(result["id"] if quiet else f"Tuple written to {where} (id: {result['id']})")


def _read(action: str, pattern: str, harbor: str | None, limit: int | None, wait: bool, timeout: str | None,
          as_json: bool, quiet: bool) -> None:  # fmt: skip
    wait = wait or timeout is not None
    args = {"pattern": _json_arg(pattern, "PATTERN"), "harbor": harbor, "limit": limit, "wait": wait,
            "timeout": timeout}  # fmt: skip
    result = _blocking_call(action, args, as_json=as_json, wait=wait, timeout=timeout)
    found = result["taken"] if action == "tuple.in" else result["tuples"]
    if not found:  # a wait returns a tuple, or times out (TIMEOUT)
        fail(NotFound("NOT_FOUND", f"no tuple matches {pattern}; wait for one with --wait, or see what there is "
                      "with pd tuple scan"), as_json=as_json)  # fmt: skip
    if as_json:
        emit_json(result)
    elif quiet:
        click.echo(len(found))
    else:
        _print_tuples(found)


_WAIT = click.option("--wait", "-w", is_flag=True, help="Block until a matching tuple is written.")
_TIMEOUT = click.option("--timeout", metavar="DURATION",
                        help="Wait at most this long, e.g. 30s (implies --wait; exit 1).")  # fmt: skip


@tuple_.command("rd")
@click.argument("pattern", default='["*"]')
@_HARBOR
@click.option("--limit", type=int, help="At most this many (default 100).")
@_WAIT
@_TIMEOUT
@json_option
@quiet_option
def rd(pattern: str, harbor: str | None, limit: int | None, wait: bool, timeout: str | None, as_json: bool,
       quiet: bool) -> None:  # fmt: skip
    """Read tuples matching PATTERN, newest first, leaving them in the space. Exit 1 if none.

    \b
    Examples:
      pd tuple rd '["connection", "*", "*", ">0.7"]' --harbor myapp:fleet
      pd tuple rd '["ready", "myapp:*"]' --wait --timeout 2m
    """
    _read("tuple.rd", pattern, harbor, limit, wait, timeout, as_json, quiet)


@tuple_.command("in")
@click.argument("pattern")
@_HARBOR
@click.option("--limit", type=int, help="Take up to this many (default 1).")
@_WAIT
@_TIMEOUT
@json_option
@quiet_option
def in_(pattern: str, harbor: str | None, limit: int | None, wait: bool, timeout: str | None, as_json: bool,
        quiet: bool) -> None:  # fmt: skip
    """Take a tuple matching PATTERN (oldest first): exactly one caller ever gets it. Exit 1 if none.

    \b
    Examples:
      pd tuple in '["task", "*", "pending"]' --json
      pd tuple in '["task", "*"]' --harbor myapp:fleet --wait --timeout 10m
    """
    _read("tuple.in", pattern, harbor, limit, wait, timeout, as_json, quiet)


@tuple_.command("scan")
@_HARBOR
@click.option("--limit", type=int, help="At most this many (default 200).")
@click.option("--query", help="Case-insensitive substring of the fields or writer.")
@json_option
@quiet_option
def scan(harbor: str | None, limit: int | None, query: str | None, as_json: bool, quiet: bool) -> None:
    """List every live tuple of a space, newest first.

    \b
    Example:
      pd tuple scan --harbor myapp:fleet
    """
    result = call("tuple.scan", {"harbor": harbor, "limit": limit, "query": query}, as_json=as_json)
    if as_json:
        emit_json(result)
    elif quiet:
        click.echo(result["count"])
    else:
        _print_tuples(result["tuples"])
        click.echo(f"Total: {plural(result['count'], 'tuple')}")


@tuple_.command("count")
@click.argument("pattern", required=False)
@_HARBOR
@json_option
@quiet_option
def count(pattern: str | None, harbor: str | None, as_json: bool, quiet: bool) -> None:
    """Count live tuples matching PATTERN (all when omitted).

    \b
    Examples:
      pd tuple count --harbor myapp:fleet
      pd tuple count '["task", "*", "pending"]'
    """
    args = {"pattern": _json_arg(pattern, "PATTERN") if pattern else None, "harbor": harbor}
    result = call("tuple.count", args, as_json=as_json)
    emit_json(result) if as_json else click.echo(result["count"])  # the count is all it prints, -q or not


tuple_.name = "tuple"
COMMANDS = (tuple_,)
