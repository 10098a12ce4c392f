"""pd pheromone spray | sniff | list | files."""

from __future__ import annotations

import click

from portdaddy.cli.output import age, emit_json, json_option, quiet_option, table
from portdaddy.cli.transport import call
from portdaddy.text import plural

_TABLES = click.Choice(["services", "projects", "sessions", "agents", "locks", "files", "harbors"])
_HARBOR = click.option("--harbor", "-H", help="The harbor the signal belongs to (default: global).")


@click.group()
def pheromone() -> None:
    """Ambient 0-1 signals on entities that fade when read (half-life ~13.5 min), and file heat.

    \b
    Examples:
      pd pheromone spray --table services --id myapp:api --key urgency --strength 0.8
      pd pheromone sniff --table services --id myapp:api
      pd pheromone files --path src/
    """


@pheromone.command("spray")
@click.option("--table", "-t", required=True, type=_TABLES, help="What kind of entity.")
@click.option("--id", "-i", "entity", required=True, help="The entity (e.g. myapp:api, src/auth.ts).")
@click.option("--key", "-k", required=True, help="The signal's name (e.g. urgency, heat).")
@click.option("--strength", "-s", required=True, type=float, help="0 to 1; replaces the faded value.")
@_HARBOR
@json_option
def spray(table: str, entity: str, key: str, strength: float, harbor: str | None, as_json: bool) -> None:
    """Set a signal on an entity (committed before the reply).

    \b
    Example:
      pd pheromone spray --table files --id src/auth.ts --key heat --strength 0.6
    """
    result = call("pheromone.spray", {"table": table, "id": entity, "key": key, "strength": strength,
                                      "harbor": harbor}, as_json=as_json)  # fmt: skip
    if as_json:
        emit_json(result)
    else:
        click.echo(f"{table}/{entity} {key} = {result['strength']:g}")


@pheromone.command("sniff")
@click.option("--table", "-t", required=True, type=_TABLES, help="What kind of entity.")
@click.option("--id", "-i", "entity", required=True, help="The entity.")
@_HARBOR
@json_option
@quiet_option
def sniff(table: str, entity: str, harbor: str | None, as_json: bool, quiet: bool) -> None:
    """Print an entity's signals, decayed to now (signals under 0.01 are gone).

    \b
    Example:
      pd pheromone sniff --table services --id myapp:api
    """
    result = call("pheromone.sniff", {"table": table, "id": entity, "harbor": harbor}, as_json=as_json)
    if as_json:
        emit_json(result)
        return
    for key, value in sorted(result["pheromones"].items()):
        click.echo(f"{value:g}" if quiet else f"{key}  {value:.3f}")
    if not result["pheromones"] and not quiet:
        click.echo(f"no signals on {table}/{entity}", err=True)


@pheromone.command("list")
@click.option("--table", "-t", "kind", type=_TABLES, help="Only this kind of entity.")
@_HARBOR
@json_option
@quiet_option
def list_(kind: str | None, harbor: str | None, as_json: bool, quiet: bool) -> None:
    """List every entity with a live signal. -q prints how many entities.

    \b
    Example:
      pd pheromone list --table services
    """
    result = call("pheromone.list", {"table": kind, "harbor": harbor}, as_json=as_json)
    if as_json:
        emit_json(result)
        return
    if quiet:
        click.echo(result["count"])
        return
    rows = [(p["table"], p["id"], k, f"{value:.3f}") for p in result["pheromones"]
            for k, value in sorted(p["pheromones"].items())]  # fmt: skip
    if rows:
        table(rows, ("TABLE", "ID", "KEY", "VALUE"))
    else:
        click.echo("No signals", err=True)


@pheromone.command("files")
@click.option("--path", "prefix", default="", help="Only paths starting with this prefix.")
@click.option("--depth", type=int, default=5, show_default=True, help="Directory levels to aggregate.")
@click.option("--limit", type=int, default=20, show_default=True, help="Files to show.")
@json_option
@quiet_option
def files(prefix: str, depth: int, limit: int, as_json: bool, quiet: bool) -> None:
    """File heat map from claim history and active claims; CONFLICT = claimed by more than one session.

    -q prints how many files are shown.

    \b
    Example:
      pd pheromone files --path src/api
    """
    result = call("pheromone.files", {"path": prefix, "depth": depth, "limit": limit}, as_json=as_json)
    if as_json:
        emit_json(result)
        return
    if quiet:
        click.echo(len(result["files"]))
        return
    if not result["files"]:
        click.echo("No file claims recorded", err=True)
        return
    table([(f["path"], f"{f['heat']:.3f}", ",".join(f["agents"]) or "-", "CONFLICT" if f["conflict"] else "",
            age(f["lastActivity"])) for f in result["files"]],
          ("PATH", "HEAT", "AGENTS", "CONFLICT", "LAST"))  # fmt: skip
    s = result["summary"]
    click.echo(
        f"{plural(s['totalFiles'], 'file')}, {plural(s['activeConflicts'], 'conflict')}; hottest: {s['hottestFile']}"
    )


COMMANDS = (pheromone,)
