"""pd claim | release | find | services | url | env."""

from __future__ import annotations

import sys

import click

from portdaddy.cli.output import emit_json, json_option, quiet_option, table, warning
from portdaddy.cli.transport import call, fail
from portdaddy.errors import NotFound
from portdaddy.text import plural


@click.command()
@click.argument("identity")
@click.option("--port", "-p", type=int, help="Preferred port (used if free).")
@click.option("--range", "port_range", metavar="MIN-MAX", help="Search this range instead of 3100-9999.")
@click.option("--expires", metavar="DURATION", help="Release automatically after e.g. 2h30m.")
@click.option("--pid", type=int, help="Process that will listen on the port.")
@click.option("--cmd", help="Command that will listen on the port (for pd find).")
@json_option
@quiet_option
def claim(identity: str, port: int | None, port_range: str | None, expires: str | None, pid: int | None,
          cmd: str | None, as_json: bool, quiet: bool) -> None:  # fmt: skip
    """Claim a stable port for IDENTITY (project[:stack[:context]]); prints the port.

    The same identity always gets the same port: on a re-claim, after a release, and on another machine,
    unless that port is taken.

    \b
    Examples:
      pd claim myapp:api:main -q          # 5630
      PORT=$(pd claim myapp:web -q) npm run dev
      pd claim myapp:db --port 5432 --expires 2h
    """
    result = call("port.claim", {"id": identity, "port": port, "range": port_range, "expires": expires,
                                 "pid": pid, "cmd": cmd}, as_json=as_json)  # fmt: skip
    if as_json:
        emit_json(result)
        return
    click.echo(result["port"])
    if not quiet:
        if result["message"].startswith("preferred port"):
            warning(result["message"])
        if sys.stderr.isatty():
            reused = "  (reused existing)" if result["existing"] else ""
            click.echo(f"{identity} → port {result['port']}{reused}", err=True)


@click.command()
@click.argument("pattern", required=False)
@click.option("--expired", is_flag=True, help="Release every service whose --expires has passed.")
@json_option
@quiet_option
def release(pattern: str | None, expired: bool, as_json: bool, quiet: bool) -> None:
    """Release IDENTITY, every identity matching PATTERN, or --expired ones.

    \b
    Examples:
      pd release myapp:api:main
      pd release 'myapp:*'
      pd release --expired
    """
    if not pattern and not expired:
        raise click.UsageError("give an identity or pattern, or --expired")
    result = call("port.release", {"id": pattern, "expired": expired}, as_json=as_json)
    if as_json:
        emit_json(result)
    elif quiet:
        click.echo(result["released"])
    elif result["released"] or expired:
        click.echo(result["message"])
    else:  # nothing to do is no failure (a release is idempotent), but it is no "released" either
        click.echo(f"Nothing released: no claimed service matches {pattern}; see pd find", err=True)


def _find(pattern: str, as_json: bool, quiet: bool) -> None:
    result = call("port.find", {"pattern": pattern}, as_json=as_json)
    services = result["services"]
    if as_json:
        emit_json(result)
    elif quiet:
        for s in services:
            click.echo(f"{s['id']} {s['port']}")
    elif not services:
        hint = f" (use '{pattern}:*' to include deeper identities)" if "*" not in pattern else ""
        click.echo(f"No services found{hint}", err=True)
    else:
        table([(s["id"], s["port"], s["status"], s["urls"].get("local", "")) for s in services],
              ("ID", "PORT", "STATUS", "URL"))  # fmt: skip
        click.echo(f"Total: {plural(len(services), 'service')}")


@click.command()
@click.argument("pattern", default="*")
@json_option
@quiet_option
def find(pattern: str, as_json: bool, quiet: bool) -> None:
    """List services matching PATTERN (default: all).

    Patterns: exact 'myapp:api', 'myapp:*' (everything under myapp), '*:api:*' (per segment).

    \b
    Examples:
      pd find 'myapp:*'
      pd find --json
    """
    _find(pattern, as_json, quiet)


@click.command()
@click.argument("pattern", default="*")
@json_option
@quiet_option
def services(pattern: str, as_json: bool, quiet: bool) -> None:
    """List claimed services (same as pd find).

    \b
    Examples:
      pd services
      pd services 'myapp:*' -q
    """
    _find(pattern, as_json, quiet)


@click.command()
@click.argument("identity")
@click.option("--env", "-e", "env_name", default="local", show_default=True, help="Endpoint environment.")
@json_option
@quiet_option
def url(identity: str, env_name: str, as_json: bool, quiet: bool) -> None:  # -q: the URL is all it prints
    """Print the URL of IDENTITY for an environment.

    \b
    Example:
      curl "$(pd url myapp:api)/health"
    """
    service = call("port.get", {"id": identity}, as_json=as_json)["service"]
    found = service["urls"].get(env_name)
    if not found:
        fail(NotFound("NOT_FOUND", f"{identity} has no {env_name!r} URL; known: {', '.join(service['urls'])}"),
             as_json=as_json)  # fmt: skip
    if as_json:
        emit_json({"success": True, "id": identity, "env": env_name, "url": found})
    else:
        click.echo(found)


@click.command()
@click.argument("pattern", default="*")
@json_option
def env(pattern: str, as_json: bool) -> None:
    """Print NAME_PORT= and NAME_URL= lines for services matching PATTERN, quoted for a POSIX shell.

    Identities that give the same NAME (my-app:api and my_app:api are both MY_APP_API) are left out, with a
    warning: neither would be the right one to export. Narrow PATTERN to one of them, or use pd url.

    \b
    Example:
      eval "$(pd env 'myapp:*' | sed 's/^/export /')"
    """
    import shlex  # not on `pd claim`'s path, like env_prefix (it compiles regexes)

    from portdaddy.core.identity import env_prefix

    by_name: dict[str, list[dict]] = {}
    for s in call("port.find", {"pattern": pattern}, as_json=as_json)["services"]:
        by_name.setdefault(env_prefix(s["id"]), []).append(s)
    lines, collisions = {}, {}
    for name, services in by_name.items():
        if len(services) > 1:
            collisions[name] = sorted(s["id"] for s in services)
            continue
        lines[f"{name}_PORT"] = str(services[0]["port"])
        if services[0]["urls"].get("local"):
            lines[f"{name}_URL"] = services[0]["urls"]["local"]
    if as_json:
        emit_json({"success": True, "env": lines, "collisions": collisions})
        return
    if not by_name:
        click.echo(f"No services match {pattern}; see pd find", err=True)  # stderr: eval reads stdout
    for key, value in lines.items():  # any agent may set a URL: quoted, it cannot run as a command
        click.echo(f"{key}={shlex.quote(value)}")
    for name, ids in collisions.items():
        warning(f"{name}_PORT would name each of {', '.join(ids)}; none of them is printed (narrow the pattern to "
                "one, or use pd url ID)")  # fmt: skip


COMMANDS = (claim, release, find, services, url, env)
