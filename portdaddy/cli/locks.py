"""pd lock | unlock | locks | with-lock: named locks with fencing tokens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import click

from portdaddy.cli.context import resolve_agent
from portdaddy.cli.output import emit_json, json_option, quiet_option, table, until, warning
from portdaddy.cli.transport import blocking_call, call, connect, fail, reply_wait_s, spinning
from portdaddy.durations import parse_duration_ms
from portdaddy.errors import PDError, bad_input
from portdaddy.text import plural

_TTL = click.option("--ttl", metavar="DURATION", help="Lease length, e.g. 30s or 10m (default 5m, max 1h).")
_WAIT = click.option("--wait", "-w", is_flag=True, help="Queue (FIFO) until the lock is free instead of exit 1.")
_TIMEOUT = click.option("--timeout", metavar="DURATION",
                        help="Wait at most this long, e.g. 30s (implies --wait; exit 1).")  # fmt: skip
_OWNER = click.option("--owner", help="Who holds it (default: the current agent, else this process).")


def _duration_ms(value: str | None, what: str) -> int | None:
    if value is None:
        return None
    ms = parse_duration_ms(value)
    if ms is None:
        fail(bad_input(f"{what} {value!r} is not a duration; use e.g. 90s, 5m or milliseconds"))
    return ms


@click.command()
@click.argument("name")
@_TTL
@_WAIT
@_TIMEOUT
@_OWNER
@click.option("--extend", is_flag=True, help="Renew the lease of a lock you hold instead of acquiring.")
@json_option
@quiet_option
def lock(name: str, ttl: str | None, wait: bool, timeout: str | None, owner: str | None, extend: bool,
         as_json: bool, quiet: bool) -> None:  # fmt: skip
    """Take the lock NAME: exit 0 when acquired, 1 when someone else holds it.

    -q prints the fencing token (it only ever grows; pass it to whatever the lock guards).

    \b
    Examples:
      pd lock db-migrations || echo "Migrations already running, skipping"
      TOKEN=$(pd lock deploy:prod --ttl 10m -q)
      pd lock db-migrations --wait --timeout 2m
      pd lock db-migrations --extend --ttl 10m
    """
    owner, wait = owner or resolve_agent(), wait or timeout is not None
    if extend:
        result = call("lock.extend", {"name": name, "owner": owner, "ttl": ttl}, as_json=as_json)
    else:
        args = {"name": name, "owner": owner, "ttl": ttl, "wait": wait, "timeout": timeout}
        if wait:
            result = blocking_call("lock.acquire", args, label=f"waiting for lock {name}…", as_json=as_json,
                                   timeout_ms=_duration_ms(timeout, "--timeout"))  # fmt: skip
        else:
            result = call("lock.acquire", args, as_json=as_json)
    if as_json:
        emit_json(result)
    elif quiet:
        click.echo(result["token"])
    else:
        verb = "Extended" if extend else "Re-acquired" if result.get("existing") else "Acquired"
        click.echo(f"✓ {verb} lock: {name} (token {result['token']}, owner {result['owner']}, "
                   f"expires {until(result['expiresAt'])})")  # fmt: skip


@click.command()
@click.argument("name")
@_OWNER
@click.option("--token", type=int, help="Release only if the lock still carries this fencing token.")
@click.option("--force", "-f", is_flag=True, help="Release even if someone else holds it (recorded).")
@json_option
@quiet_option
def unlock(name: str, owner: str | None, token: int | None, force: bool, as_json: bool, quiet: bool) -> None:
    """Release the lock NAME. Without --owner or a current agent, anyone may release it.

    -q prints released or not-held.

    \b
    Examples:
      pd unlock db-migrations
      pd unlock deploy:prod --force
    """
    result = call("lock.release", {"name": name, "owner": owner or resolve_agent(), "token": token,
                                   "force": force}, as_json=as_json)  # fmt: skip
    if as_json:
        emit_json(result)
    elif quiet:
        click.echo("released" if result["released"] else "not-held")
    elif result["released"]:
        click.echo(f"✓ Released lock: {name}" + (" (forced)" if force else ""))
    else:
        click.echo(f"Lock '{name}' was not held", err=True)


@click.command()
@click.option("--owner", help="Only locks of this owner (a '*' glob works).")
@json_option
@quiet_option
def locks(owner: str | None, as_json: bool, quiet: bool) -> None:
    """List held locks, newest first.

    \b
    Examples:
      pd locks
      pd locks --owner 'agent-*' --json
    """
    result = call("lock.list", {"owner": owner}, as_json=as_json)
    if as_json:
        emit_json(result)
    elif quiet:
        click.echo(result["count"])
    elif not result["locks"]:
        click.echo("No active locks")
    else:
        table([(lk["name"], lk["owner"], lk["token"], until(lk["expiresAt"])) for lk in result["locks"]],
              ("NAME", "OWNER", "TOKEN", "EXPIRES"))  # fmt: skip
        click.echo(f"Total: {plural(result['count'], 'lock')}")


_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@click.command("with-lock", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.option("--ttl", metavar="DURATION", help="Lease length, renewed every third of it while COMMAND runs, e.g. "
              "30s (default 1m, max 1h).")  # fmt: skip
@_WAIT
@_TIMEOUT
@_OWNER
@json_option
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def with_lock(name: str, ttl: str | None, wait: bool, timeout: str | None, owner: str | None, as_json: bool,
              command: tuple[str, ...]) -> None:  # fmt: skip
    """Run COMMAND holding the lock NAME; exit with the command's status.

    The lease is extended while the command runs; the lock is released when it exits, when it is killed,
    and when this process dies (the lock is bound to its connection). The command sees the fencing token
    in PD_LOCK_TOKEN. Exit 1 if the lock is held (without --wait). With --json, pd's own refusals print as
    JSON on stdout; the command's output is its own.

    \b
    Examples:
      pd with-lock db-migrations -- npx prisma migrate dev
      pd with-lock deploy --wait --timeout 5m -- ./deploy.sh
    """
    ttl_ms = 60_000 if ttl is None else _duration_ms(ttl, "--ttl")  # 0 goes to the daemon, which refuses it
    args = {"name": name, "owner": owner or resolve_agent(), "ttl": ttl_ms, "wait": wait or timeout is not None,
            "timeout": timeout, "connBound": True}  # fmt: skip
    timeout_ms = _duration_ms(timeout, "--timeout")
    try:
        # One connection for the whole run: the lock is bound to it.
        with connect() as client:
            with spinning(f"waiting for lock {name}…"):
                wait_s = reply_wait_s(None if timeout_ms is None else timeout_ms / 1000)
                granted = client.request("lock.acquire", args, timeout=wait_s, patient=args["wait"])
            status = _run_holding(client, granted, ttl_ms, command)
    except PDError as e:
        fail(e, as_json=as_json)
    sys.exit(status)


def _run_holding(client: Any, granted: dict[str, Any], ttl_ms: int, command: tuple[str, ...]) -> int:
    """Run the child, renewing the lease every third of it, forwarding signals; release on the way out."""
    env = {**os.environ, "PD_LOCK_NAME": granted["name"], "PD_LOCK_TOKEN": str(granted["token"])}
    try:
        child = subprocess.Popen(command, env=env)
    except OSError as e:
        client.request("lock.release", {"name": granted["name"], "token": granted["token"]})
        fail(bad_input(f"cannot run {command[0]!r}: {e.strerror or e}"))
    previous = {sig: signal.signal(sig, lambda s, _f: child.send_signal(s)) for sig in _FORWARDED}
    try:
        while True:
            try:
                status = child.wait(timeout=max(ttl_ms / 3000, 0.05))
                break
            except subprocess.TimeoutExpired:
                try:
                    client.request("lock.extend", {"name": granted["name"], "token": granted["token"],
                                                   "ttl": ttl_ms})  # fmt: skip
                except PDError as e:
                    warning(f"lost lock {granted['name']!r} while the command runs: {e.message}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if not granted.get("existing"):  # a lock the caller held before is still theirs afterwards
            try:
                client.request("lock.release", {"name": granted["name"], "token": granted["token"]})
            except PDError:
                pass  # already gone (expired, forced); the connection closing releases a bound lock anyway
    return 128 - status if status < 0 else status


COMMANDS = (lock, unlock, locks, with_lock)
