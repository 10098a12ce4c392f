"""pd webhook add | ls | enable | test | rm | deliveries | events: event notifications to URLs."""

from __future__ import annotations

import click

from portdaddy.cli.output import age, emit_json, json_option, quiet_option, table
from portdaddy.cli.transport import call, refuse_reply, spinning

# A test delivery gives up after 10 s (core/httppost.py); pd waits that, and PORT_DADDY_TIMEOUT for the reply.
DELIVERY_S = 10.0


@click.group()
def webhook() -> None:
    """POST daemon events (claims, locks, agents, messages, start/stop) to URLs, HMAC-signed.

    \b
    Examples:
      pd webhook add https://ci.example.com/hooks/pd --events lock.acquire,lock.release --secret s3cret
      pd webhook ls
      pd webhook test <id>
    """


@webhook.command("add")
@click.argument("url")
@click.option("--events", "-e", help="Comma-separated event kinds (default: all); see pd webhook events.")
@click.option("--secret", help="Sign deliveries: X-PortDaddy-Signature: sha256=<HMAC of the body>.")
@click.option("--filter", "filter_pattern", help="Only events whose target (service, lock, agent, channel) "
              "matches this glob.")  # fmt: skip
@json_option
@quiet_option
def add(url: str, events: str | None, secret: str | None, filter_pattern: str | None, as_json: bool,
        quiet: bool) -> None:  # fmt: skip
    """Register URL for events; prints the webhook id.

    \b
    Examples:
      pd webhook add https://hooks.example.com/pd --secret s3cret -q
      pd webhook add https://hooks.example.com/locks --events 'lock.*' --filter 'deploy:*'
    """
    result = call("webhook.register", {"url": url, "events": events, "secret": secret,
                                       "filterPattern": filter_pattern}, as_json=as_json)  # fmt: skip
    if as_json:
        emit_json(result)
    else:
        click.echo(result["id"] if quiet else f"Webhook registered: {result['id']} → {url}")


@webhook.command("ls")
@json_option
@quiet_option
def ls(as_json: bool, quiet: bool) -> None:
    """List webhooks with their delivery counts.

    \b
    Example:
      pd webhook ls --json
    """
    result = call("webhook.list", as_json=as_json)
    if as_json:
        emit_json(result)
    elif quiet:
        click.echo(result["count"])
    elif not result["webhooks"]:
        click.echo("No webhooks")
    else:
        hooks = result["webhooks"]
        table([(h["id"], h["url"], ",".join(h["events"]), _state(h), h["successCount"], h["failureCount"],
                age(h["lastTriggered"])) for h in hooks],
              ("ID", "URL", "EVENTS", "STATE", "OK", "FAILED", "LAST"))  # fmt: skip
        for h in hooks:
            if h["disabledAt"]:
                click.echo(f"{h['id']} was disabled {age(h['disabledAt'])} ago: {h['disabledReason']}; "
                           f"once its endpoint works, pd webhook enable {h['id']}")  # fmt: skip


def _state(hook: dict) -> str:
    if hook["active"]:
        return "on"
    return "disabled" if hook["disabledAt"] else "off"


@webhook.command("enable")
@click.argument("webhook_id")
@json_option
def enable(webhook_id: str, as_json: bool) -> None:
    """Turn a webhook on again (one the daemon disabled after failed deliveries, or one turned off).

    \b
    Example:
      pd webhook enable <id>
    """
    result = call("webhook.update", {"id": webhook_id, "active": True}, as_json=as_json)
    emit_json(result) if as_json else click.echo(f"Enabled webhook {webhook_id}")


@webhook.command("test")
@click.argument("webhook_id")
@json_option
@quiet_option
def test(webhook_id: str, as_json: bool, quiet: bool) -> None:
    """Send a webhook.test event now; exit 1 unless the endpoint answers 2xx. -q prints the HTTP status.

    The delivery gives up after 10s; pd waits that, then PORT_DADDY_TIMEOUT (10s) for the daemon's reply.

    \b
    Examples:
      pd webhook test <id>
      PORT_DADDY_TIMEOUT=30s pd webhook test <id>    # on a slow machine
    """
    with spinning(f"delivering webhook.test to {webhook_id}…"):  # a slow endpoint takes up to 10 s
        result = call("webhook.test", {"id": webhook_id}, as_json=as_json, takes=DELIVERY_S)
    if not result["success"]:
        refuse_reply("DELIVERY_FAILED", f"test delivery failed: {result.get('error') or result.get('status')}", result)
    if as_json:
        emit_json(result)
    else:
        click.echo(result["status"] if quiet else f"✓ {result['status']} {result['statusText']}")


@webhook.command("rm")
@click.argument("webhook_id")
@json_option
def rm(webhook_id: str, as_json: bool) -> None:
    """Delete a webhook (and its pending deliveries).

    \b
    Example:
      pd webhook rm <id>
    """
    result = call("webhook.delete", {"id": webhook_id}, as_json=as_json)
    emit_json(result) if as_json else click.echo(f"Deleted webhook {webhook_id}")


@webhook.command("deliveries")
@click.argument("webhook_id")
@click.option("--limit", type=int, help="At most this many (default 50).")
@json_option
@quiet_option
def deliveries(webhook_id: str, limit: int | None, as_json: bool, quiet: bool) -> None:
    """A webhook's recent deliveries: event, status, attempts, response. -q prints how many.

    \b
    Example:
      pd webhook deliveries <id> --limit 10
    """
    result = call("webhook.deliveries", {"id": webhook_id, "limit": limit}, as_json=as_json)
    if as_json:
        emit_json(result)
        return
    if quiet:
        click.echo(result["count"])
        return
    table([(d["event"], d["status"], d["attempts"], d["responseStatus"] or "-", age(d["createdAt"]))
           for d in result["deliveries"]], ("EVENT", "STATUS", "ATTEMPTS", "HTTP", "AGE"))  # fmt: skip


@webhook.command("events")
@json_option
def events(as_json: bool) -> None:
    """The event kinds a webhook can ask for.

    \b
    Example:
      pd webhook events
    """
    result = call("webhook.events", as_json=as_json)
    if as_json:
        emit_json(result)
        return
    for kind in result["events"]:
        click.echo(f"{kind:22} {result['descriptions'][kind]}")


COMMANDS = (webhook,)
