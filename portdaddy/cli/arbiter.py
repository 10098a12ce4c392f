"""pd arbiter status | violations | test."""

from __future__ import annotations

import click

from portdaddy.cli.output import age, emit_json, json_option, quiet_option, since_option, table
from portdaddy.cli.transport import call


@click.group()
def arbiter() -> None:
    """The daemon's runtime invariant checker (spec/invariants.md).

    \b
    Examples:
      pd arbiter status
      pd arbiter violations --since 1h
      pd arbiter test LOCK_OWNER_VALID
    """


@arbiter.command("status")
@json_option
def status(as_json: bool) -> None:
    """Rules, events checked per rule (coverage), violations per rule, and mode.

    \b
    Example:
      pd arbiter status --json
    """
    result = call("arbiter.status", as_json=as_json)
    if as_json:
        emit_json(result)
        return
    click.echo(f"mode: {result['mode']}  violations: {result['violationsCount']}  events: {result['eventsSeen']}")
    table([(r["name"], r["defaultSeverity"], r["coverage"], r["violations"]) for r in result["ruleDetails"]],
          ("RULE", "SEVERITY", "CHECKED", "VIOLATIONS"))  # fmt: skip


@arbiter.command("violations")
@since_option("violations")
@click.option("--rule", help="Only this rule (e.g. LOCK_OWNER_VALID).")
@click.option("--limit", type=int, default=50, show_default=True, help="Show at most this many.")
@json_option
@quiet_option
def violations(since: str | None, rule: str | None, limit: int, as_json: bool, quiet: bool) -> None:
    """Recorded violations, newest first.

    \b
    Examples:
      pd arbiter violations --since 1h
      pd arbiter violations --rule PID_SQUATTING --json
    """
    result = call("arbiter.violations", {"since": since, "rule": rule, "limit": limit}, as_json=as_json)
    if as_json:
        emit_json(result)
    elif quiet:
        click.echo(result["total"])
    elif not result["violations"]:
        click.echo("No violations", err=True)
    else:
        table([(v["id"], age(v["timestamp"]), v["rule"], v["severity"], v["agentId"] or "-",
                v["details"].get("message", "")) for v in result["violations"]],
              ("ID", "AGE", "RULE", "SEVERITY", "AGENT", "DETAILS"))  # fmt: skip


COMMANDS = (arbiter,)


@arbiter.command("test")
@click.argument("rule")
@json_option
@quiet_option
def test(rule: str, as_json: bool, quiet: bool) -> None:
    """Record a synthetic violation of RULE, to check that alerts and webhooks fire.

    It is marked synthetic and never sends an agent overboard, even in strict mode.

    \b
    Example:
      pd arbiter test NOTE_MONOTONICITY
    """
    result = call("arbiter.test", {"name": rule}, as_json=as_json)
    found = result["violation"]
    if as_json:
        emit_json(result)
    elif quiet:
        click.echo(found["id"])
    else:
        click.echo(f"recorded synthetic {found['rule']} violation #{found['id']} ({found['severity']})")
