"""The CLI loads one command module per run; its index must name every command exactly once."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator

import click

import portdaddy.cli
from portdaddy.cli.main import COMMAND_MODULES, cli


def _defined_commands() -> dict[str, str]:
    found: dict[str, str] = {}
    for info in pkgutil.iter_modules(portdaddy.cli.__path__):
        if info.name == "__main__":
            continue
        module = importlib.import_module(f"portdaddy.cli.{info.name}")
        for command in getattr(module, "COMMANDS", ()):
            assert command.name not in found, f"{command.name} defined in {found[command.name]} and {info.name}"
            found[command.name] = info.name
    return found


def test_index_matches_the_modules() -> None:
    assert _defined_commands() == COMMAND_MODULES


def test_every_indexed_command_resolves() -> None:
    ctx = cli.make_context("pd", ["--help"], resilient_parsing=True)
    for name in COMMAND_MODULES:
        assert cli.get_command(ctx, name).name == name
    assert cli.get_command(ctx, "no-such-command") is None


def _leaf_commands(command: click.Command, path: tuple[str, ...]) -> Iterator[tuple[str, click.Command]]:
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            yield from _leaf_commands(command.get_command(ctx, name), (*path, name))
    else:
        yield " ".join(path), command


def test_every_command_takes_json() -> None:
    """What `pd --help` promises: --json everywhere (but `pd daemon`, which is the daemon itself)."""
    leaves = dict(_leaf_commands(cli, ()))
    assert len(leaves) > 60
    without = [path for path, cmd in leaves.items() if not any("--json" in p.opts for p in cmd.params)]
    assert without == ["daemon"]
