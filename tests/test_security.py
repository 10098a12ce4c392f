"""Who must not use or read the daemon: other local users, web pages in the user's browser, hostile payloads
from other agents (the threat model is in spec/decisions.md, "Security"). Root and the same uid are out of
scope. Tests that act as another uid need root, as the peer check's test in test_ipc_limits.py does."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from tests.conftest import PYTHON, make_env


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_files_the_daemon_creates_are_private_wherever_they_are(tmp_home: Path) -> None:
    outside = tmp_home / "elsewhere"  # PORT_DADDY_DB may point out of the 0700 home
    outside.mkdir(mode=0o755)
    env = make_env(tmp_home, PORT_DADDY_DB=str(outside / "store.db"))
    pd = [PYTHON, "-m", "portdaddy.cli"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*pd, *args], env=env, cwd=tmp_home, capture_output=True, text=True, timeout=60,
                              preexec_fn=lambda: os.umask(0o022))  # fmt: skip

    assert run("start").returncode == 0  # through the launcher, which creates daemon.log
    try:
        spawned = run("spawn", "--backend", "custom", "--wait", "--", "umask")
        assert spawned.returncode == 0, spawned.stderr
        run_id = spawned.stdout.split(":")[0]
        # the agent's own files follow its caller's umask, not the daemon's
        assert "0022" in run("spawn", "logs", run_id).stdout
        created = [outside / "store.db", outside / "store.db-wal", outside / "store.db-shm",
                   tmp_home / "daemon.log", tmp_home / "fleet" / "logs" / f"{run_id}.log"]  # fmt: skip
        assert {str(p): oct(_mode(p)) for p in created} == {str(p): "0o600" for p in created}
        assert oct(_mode(tmp_home / "fleet")) == "0o700"
    finally:
        run("stop")
