"""``pd claim ID -q`` answered without click: same output, same errors, same exit codes as the click path."""

from __future__ import annotations

import ast
import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import PYTHON, Daemon

import portdaddy.cli
from portdaddy.cli.entry import quick_claim_identity
from portdaddy.config import Settings
from portdaddy.paths import runtime_path

CLICK_PATH = "import sys; from portdaddy.cli.main import main; sys.argv[0] = 'pd'; main()"


@pytest.mark.parametrize(("argv", "identity"), [
    (["claim", "app:api", "-q"], "app:api"),
    (["claim", "-q", "app:api"], "app:api"),
    (["claim", "app", "--quiet"], "app"),
    (["app:api:main", "-q"], "app:api:main"),
    (["-q", "app:api"], None),  # the colon shortcut takes the identity first, as click does
    (["claim", "app:api"], None),  # not quiet: the click path prints warnings and a tty line
    (["claim", "app:api", "-q", "--json"], None),
    (["claim", "app:api", "-q", "--port", "4000"], None),
    (["claim", "--port", "-q"], None),
    (["claim", "-q", "-q"], None),
    (["app", "-q"], None),  # no colon: not a claim shortcut
    (["claim", "x" * 1001, "-q"], None),
    ([], None),
])  # fmt: skip
def test_only_the_plain_quiet_claim_takes_the_fast_path(argv: list[str], identity: str | None) -> None:
    assert quick_claim_identity(argv) == identity


@pytest.mark.parametrize("env", [
    {}, {"PORT_DADDY_HOME": "/tmp/pdx"}, {"PORT_DADDY_HOME": "~/pd-home"}, {"PORT_DADDY_IPC": "/tmp/x.ipc"},
    {"PORT_DADDY_HOME": "/tmp/pdx", "PORT_DADDY_IPC": "~/y.ipc"}, {"PORT_DADDY_HOME": ""},
])  # fmt: skip
def test_fast_path_finds_the_socket_where_settings_put_it(env: dict[str, str]) -> None:
    assert runtime_path(env, "PORT_DADDY_IPC", "daemon.ipc") == str(Settings.from_env(env).ipc_sock)


def _modules(importtime: str) -> set[str]:
    return {line.split("|")[-1].strip().split(".")[0] for line in importtime.splitlines() if "|" in line}


def _pd_imports(path: Path) -> set[str]:
    """The modules of pd that ``path`` imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("portdaddy"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("portdaddy"))
    return found


def test_output_imports_nothing_of_the_cli_above_it() -> None:
    """output.py serves every command, transport.py and the entry point: what it takes from the CLI is a leaf that
    imports no other part of pd, or the layers would turn round (it imported discard from entry.py, the top)."""
    cli = Path(portdaddy.cli.__file__).parent
    for module in _pd_imports(cli / "output.py"):
        if module.startswith("portdaddy.cli."):
            assert not _pd_imports(cli / f"{module.removeprefix('portdaddy.cli.')}.py"), module


def test_fast_claim_prints_the_port_without_click(daemon: Daemon) -> None:
    r = subprocess.run([PYTHON, "-X", "importtime", "-m", "portdaddy.cli", "claim", "fast:api", "-q"],
                       env=daemon.env, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.returncode == 0
    assert not _modules(r.stderr) & {"click", "typing", "trio", "apsw", "json", "re"}
    full = json.loads(daemon.pd("claim", "fast:api", "--json").stdout)
    assert r.stdout == f"{full['port']}\n" and full["existing"]
    shortcut = daemon.pd("fast:api", "-q")
    assert shortcut.stdout == r.stdout


def test_fast_claim_refusals_match_the_click_path(daemon: Daemon) -> None:
    for identity in ("bad!:api", "a" * 300):
        fast = daemon.pd("claim", identity, "-q")
        slow = subprocess.run([PYTHON, "-c", CLICK_PATH, "claim", identity, "-q"], env=daemon.env,
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        assert fast.returncode == slow.returncode == 2
        assert fast.stderr == slow.stderr and fast.stderr.startswith("error: ") and fast.stderr.count("\n") == 1
        assert fast.stdout == slow.stdout == ""


def test_agent_from_the_environment_travels_with_the_fast_claim(daemon: Daemon) -> None:
    daemon.call("agent.register", id="fast-agent", purpose="test")
    r = daemon.pd("claim", "fast:owned", "-q", env={"PORT_DADDY_AGENT": "fast-agent"})
    assert r.returncode == 0, r.stderr
    service = daemon.call("port.find", pattern="fast:owned")["services"][0]
    assert service["port"] == int(r.stdout) and service["agentId"] == "fast-agent"


@pytest.mark.parametrize("args", [
    ("claim", os.fsdecode(b"a:\xed\xa0\x80"), "-q"),  # the fast path
    ("claim", os.fsdecode(b"a:\xff")),
    ("pub", "ch", '"\\ud800"'),  # JSON can spell a lone surrogate
])  # fmt: skip
def test_text_that_is_not_unicode_is_bad_input_not_a_traceback(daemon: Daemon, args: tuple[str, ...]) -> None:
    r = daemon.pd(*args)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert "not valid Unicode" in r.stderr
