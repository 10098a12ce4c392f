"""The CLI's conventions (spec/decisions.md, "The CLI's conventions"), checked against a real daemon: what -q
prints where a command has one value to give."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Daemon


def quiet(d: Daemon, *args: str, cwd: Path | None = None) -> str:
    r = d.pd(*args, "-q", cwd=cwd)
    assert r.returncode == 0 and r.stderr == "", (args, r.stdout, r.stderr)
    return r.stdout


def test_quiet_prints_the_one_value(daemon: Daemon, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / ".git").mkdir(parents=True)
    assert quiet(daemon, "begin", "Quiet values", "--agent", "quiet-agent", cwd=tree) == "quiet-agent\n"
    session = quiet(daemon, "whoami", cwd=tree).strip().split(":")[1]
    for text in ("one", "two", "three"):
        assert daemon.pd("note", text, cwd=tree).returncode == 0
    assert quiet(daemon, "notes", "--agent", "quiet-agent") == "3\n"  # a list prints its count
    assert quiet(daemon, "notes", "--agent", "nobody-at-all") == "0\n"
    assert quiet(daemon, "notes", "--verify") == "intact\n"
    assert quiet(daemon, "session", "show", cwd=tree) == "active\n"
    assert quiet(daemon, "agent", "show", "quiet-agent") == "active\n"
    for n in range(2):
        daemon.call("msg.publish", channel="quiet:history", payload=n)
    assert quiet(daemon, "history", "quiet:history") == "2\n"
    assert daemon.pd("done", cwd=tree).returncode == 0
    assert quiet(daemon, "session", "show", session) == "completed\n"
