"""pd harbor create | list | show | enter | leave | destroy."""

from __future__ import annotations

import click

from portdaddy.cli.context import resolve_agent
from portdaddy.cli.output import age, emit_json, json_option, quiet_option, table
from portdaddy.cli.transport import call
from portdaddy.text import plural


@click.group()
def harbor() -> None:
    """Harbors: named namespaces (myapp:fleet) for tuples, pheromones and fleet agents.

    \b
    Examples:
      pd harbor enter myapp:fleet --cap 'db:*,deploy'
      pd harbor list
      pd harbor show myapp:fleet
    """


def _caps(value: str | None) -> list[str] | None:
    return [c.strip() for c in value.split(",") if c.strip()] if value else None


@harbor.command("create")
@click.argument("name")
@click.option("--cap", help="Capabilities the harbor allows, comma-separated (globs like db:*).")
@click.option("--channels", help="Channels of the harbor, comma-separated.")
@click.option("--expires", metavar="DURATION", help="Remove the harbor after e.g. 2h.")
@json_option
@quiet_option
def create(name: str, cap: str | None, channels: str | None, expires: str | None, as_json: bool,
           quiet: bool) -> None:  # fmt: skip
    """Create harbor NAME (an existing one is kept as it is). -q prints created or exists.

    \b
    Example:
      pd harbor create myapp:fleet --cap 'db:read,deploy:*' --expires 8h
    """
    result = call("harbor.create", {"name": name, "capabilities": _caps(cap), "channels": _caps(channels),
                                    "expiresIn": expires}, as_json=as_json)  # fmt: skip
    if as_json:
        emit_json(result)
    else:
        state = "created" if result["created"] else "exists"
        said = f"Harbor created: {name}" if result["created"] else f"Harbor {name} exists already (unchanged)"
        click.echo(state if quiet else said)


@harbor.command("list")
@click.argument("pattern", default="*")
@click.option("--agent", metavar="ID", help="Only the harbors this agent is in.")
@json_option
@quiet_option
def list_(pattern: str, agent: str | None, as_json: bool, quiet: bool) -> None:
    """List harbors matching PATTERN (a * glob).

    \b
    Examples:
      pd harbor list
      pd harbor list 'myapp:*' -q
    """
    result = call("harbor.list", {"pattern": pattern, "agentId": agent}, as_json=as_json)
    if as_json:
        emit_json(result)
    elif quiet:
        for h in result["harbors"]:
            click.echo(h["name"])
    elif not result["harbors"]:
        click.echo("No harbors", err=True)
    else:
        table([(h["name"], h["memberCount"], ",".join(h["capabilities"]) or "-", age(h["createdAt"]))
               for h in result["harbors"]], ("NAME", "MEMBERS", "CAPABILITIES", "AGE"))  # fmt: skip


@harbor.command("show")
@click.argument("name")
@json_option
def show(name: str, as_json: bool) -> None:
    """Show harbor NAME and its members.

    \b
    Example:
      pd harbor show myapp:fleet
    """
    result = call("harbor.get", {"name": name}, as_json=as_json)
    if as_json:
        emit_json(result)
        return
    h = result["harbor"]
    click.echo(f"{h['name']}  capabilities: {','.join(h['capabilities']) or '-'}  members: {h['memberCount']}")
    if h["members"]:
        table([(m["agentId"], m["identity"] or "-", ",".join(m["capabilities"]) or "-", age(m["joinedAt"]))
               for m in h["members"]], ("AGENT", "IDENTITY", "CAPABILITIES", "JOINED"))  # fmt: skip


@harbor.command("enter")
@click.argument("name")
@click.option("--agent", metavar="ID", help="Agent id (default: PORT_DADDY_AGENT or this worktree's pd begin).")
@click.option("--cap", help="This member's capabilities, comma-separated.")
@click.option("--identity", help="The member's semantic identity.")
@json_option
def enter(name: str, agent: str | None, cap: str | None, identity: str | None, as_json: bool) -> None:
    """Join harbor NAME (created on first use).

    \b
    Example:
      pd harbor enter myapp:fleet --agent spider --cap 'db:read'
    """
    agent = resolve_agent(agent)
    result = call("harbor.enter", {"name": name, "agentId": agent, "capabilities": _caps(cap),
                                   "identity": identity}, as_json=as_json, agent_id=agent)  # fmt: skip
    if as_json:
        emit_json(result)
    else:
        click.echo(f"{agent} entered harbor {name} ({plural(result['harbor']['memberCount'], 'member')})")


@harbor.command("leave")
@click.argument("name")
@click.option("--agent", metavar="ID", help="Agent id (default: PORT_DADDY_AGENT or this worktree's pd begin).")
@json_option
def leave(name: str, agent: str | None, as_json: bool) -> None:
    """Leave harbor NAME.

    \b
    Example:
      pd harbor leave myapp:fleet
    """
    agent = resolve_agent(agent)
    result = call("harbor.leave", {"name": name, "agentId": agent}, as_json=as_json, agent_id=agent)
    emit_json(result) if as_json else click.echo(result["message"])


@harbor.command("destroy")
@click.argument("name")
@json_option
def destroy(name: str, as_json: bool) -> None:
    """Delete harbor NAME and its memberships.

    \b
    Example:
      pd harbor destroy myapp:fleet
    """
    result = call("harbor.destroy", {"name": name}, as_json=as_json)
    emit_json(result) if as_json else click.echo(result["message"])


COMMANDS = (harbor,)
