"""The ``pd`` command. Thin: parse, one call to the daemon, render.

Only click, msgpack and the blocking IPC client are imported on this path (never trio, quart, hypercorn
or apsw), so ``pd`` starts fast.
"""

from __future__ import annotations

import click

from portdaddy import __version__
from portdaddy.cli import arbiter, daemon_cmds, fleet, harbors, pheromones, services, spawn, tuples


class PdGroup(click.Group):
    """An unknown command containing ':' is a claim (``pd myapp:api`` = ``pd claim myapp:api``)."""

    def resolve_command(self, ctx: click.Context, args: list[str]):  # type: ignore[override]
        if args and ":" in args[0] and args[0] not in self.commands:
            args = ["claim", *args]
        return super().resolve_command(ctx, args)


@click.group(cls=PdGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", "-V", prog_name="Port Daddy")
def cli() -> None:
    """Port Daddy: one daemon that lets many AI coding agents share a machine and a repo.

    \b
    Quick start:
      pd claim myapp:api -q            stable port for a service identity
      pd status                        is the daemon healthy?

    Exit codes: 0 done, 1 refused (held, conflict, timeout, not found), 2 bad input,
    3 daemon unreachable. Every command takes --json.
    """


for module in (daemon_cmds, services, harbors, tuples, pheromones, arbiter, fleet, spawn):
    for command in module.COMMANDS:
        cli.add_command(command)


def main() -> None:
    cli(prog_name="pd")
