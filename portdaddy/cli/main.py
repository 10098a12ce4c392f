"""The ``pd`` command. Thin: parse, one call to the daemon, render.

Only click, msgpack and the blocking IPC client are imported on this path (never trio, quart, hypercorn
or apsw), and only the module of the command being run is imported, so ``pd`` starts fast.
"""

from __future__ import annotations

import importlib
import sys

import click

from portdaddy import __version__
from portdaddy.cli.output import ReaderGone, guard_output
from portdaddy.cli.transport import fail
from portdaddy.errors import EXIT_OK, EXIT_REFUSED, bad_input

# Which module of ``portdaddy.cli`` defines each top-level command (in its ``COMMANDS``). Importing one
# module instead of all of them is most of the CLI's start-up budget; tests/test_cli_index.py keeps this
# table and the modules in agreement.
COMMAND_MODULES: dict[str, str] = {
    "start": "daemon_cmds", "stop": "daemon_cmds", "status": "daemon_cmds", "version": "daemon_cmds",
    "daemon": "daemon_cmds",
    "claim": "services", "release": "services", "find": "services", "services": "services", "url": "services",
    "env": "services",
    "agent": "agents", "agents": "agents", "salvage": "agents",
    "session": "sessions", "note": "sessions", "notes": "sessions", "files": "sessions", "who-owns": "sessions",
    "begin": "sugar", "done": "sugar", "whoami": "sugar", "sitrep": "sugar", "log": "sugar",
    "guard": "guard",
    "lock": "locks", "unlock": "locks", "locks": "locks", "with-lock": "locks",
    "pub": "messaging", "sub": "messaging", "wait": "messaging", "watch": "messaging", "channels": "messaging",
    "history": "messaging",
    "inbox": "inbox",
    "webhook": "webhooks",
    "harbor": "harbors",
    "tuple": "tuples",
    "pheromone": "pheromones",
    "arbiter": "arbiter",
    "fleet": "fleet",
    "spawn": "spawn", "spawned": "spawn",
}  # fmt: skip


class PdGroup(click.Group):
    """Commands load on demand; an unknown command containing ':' is a claim (``pd myapp:api``)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMAND_MODULES)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        module = COMMAND_MODULES.get(name)
        if module is None:
            return None
        commands = importlib.import_module(f"portdaddy.cli.{module}").COMMANDS
        return next(c for c in commands if c.name == name)

    def resolve_command(self, ctx: click.Context, args: list[str]):  # type: ignore[override]
        if args and ":" in args[0] and args[0] not in COMMAND_MODULES:
            args = ["claim", *args]
        return super().resolve_command(ctx, args)


@click.group(cls=PdGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", "-V", prog_name="Port Daddy")
def cli() -> None:
    """Port Daddy: one daemon that lets many AI coding agents share a machine and a repo.

    \b
    Quick start:
      pd status                          is the daemon healthy?
      pd begin "Auth" --files 'src/auth/*' say what you do, claim its files
      PORT=$(pd claim myapp:api -q)      stable port for a service identity
      pd note "JWT validation works"     a note the others read with pd notes
      pd salvage                         dead agents' unfinished work, to take over
      pd done "Refresh tokens left"      end with a handoff note

    Exit codes: 0 done, 1 refused (held, conflict, timeout, not found), 2 bad input,
    3 daemon unreachable. Every command takes --json (but pd daemon, which is the daemon).

    \b
    Environment:
      PORT_DADDY_AGENT=backend         who you are (else the agent pd begin made in this worktree)
      PORT_DADDY_HOME=~/.port-daddy    the daemon's runtime directory
      PORT_DADDY_NO_AUTOSTART=1        never start the daemon (exit 3 when it is not running)
      PORT_DADDY_TIMEOUT=1m            how long pd waits for the daemon's reply, past what the
                                       command itself waits (--timeout); default 10s

    \b
    Example, on a slow machine:
      PORT_DADDY_TIMEOUT=1m pd spawn kill spawned-1a2b3c4d5e6f
    """


def main() -> None:
    """Run ``pd``: the command's exit code, or 0 when what it printed lost its reader (``pd agents | head -1``,
    ``pd | head -1``): what was asked was done, and the reader has what it wanted."""
    guard_output()
    try:
        code = _run()
    except ReaderGone:
        code = EXIT_OK
    sys.exit(code)


def _run() -> int:
    """Run the command; click's own error printing is replaced so that bad usage, like any other bad input, is
    one ``error:`` line (or a JSON object under ``--json``) and exit 2."""
    try:
        # color=True: click would strip colour sequences from output that is not a terminal, where the rest of
        # a hostile string still came through; guard_output shows them all escaped, wherever output goes.
        code = cli.main(prog_name="pd", standalone_mode=False, color=True)
    except click.exceptions.NoArgsIsHelpError as e:  # `pd`, `pd agent`: the help is what was asked for
        click.echo(e.format_message())
        code = EXIT_OK
    except click.UsageError as e:
        where = f"; see {e.ctx.command_path} --help" if e.ctx else ""
        # click lays some messages out on several lines (a choice's "Choose from:" list): one line here.
        message = " ".join(e.format_message().split()).rstrip(".")
        fail(bad_input(f"{message}{where}"), as_json=_asks_for_json(sys.argv[1:]))
    except click.ClickException as e:
        e.show()
        code = e.exit_code
    except click.Abort:  # Ctrl-C; click has already closed the terminal's ^C line
        code = EXIT_REFUSED
    return code if isinstance(code, int) else EXIT_OK


def _asks_for_json(argv: list[str]) -> bool:
    options = argv[: argv.index("--")] if "--" in argv else argv
    return "--json" in options or "-j" in options
