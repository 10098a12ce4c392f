"""Test harness: real daemons on temporary homes, real sockets, real SQLite.

``daemon`` is shared by a module (cheap); ``fresh_daemon`` is one per test (for state that must start
empty, restarts and kills). Daemon homes live under /tmp with short names: Unix socket paths are limited to
107 bytes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from portdaddy.config import Settings
from portdaddy.ipc.client import BlockingClient
from portdaddy.launcher import wait_healthy

PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Daemon:
    home: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    def start(self) -> Daemon:
        log = open(self.home / "daemon.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([PYTHON, "-m", "portdaddy.daemon"], env=self.env, stdout=log, stderr=log)
        log.close()
        wait_healthy(self.settings, self.proc, timeout=20, http=True)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> Daemon:
        self.stop()
        return self.start()

    def pd(self, *args: str, input: str | None = None, timeout: float = 60, env: dict[str, str] | None = None,
           cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        return subprocess.run(
            [PYTHON, "-m", "portdaddy.cli", *args], env={**self.env, **(env or {})}, input=input,
            capture_output=True, text=True, timeout=timeout, cwd=self.workdir if cwd is None else cwd,
        )  # fmt: skip

    def spawn_pd(self, *args: str) -> subprocess.Popen[str]:
        """Start ``pd`` without waiting for it (as ``pd`` does, in ``workdir``), its output piped."""
        return subprocess.Popen([PYTHON, "-m", "portdaddy.cli", *args], env=self.env, cwd=self.workdir,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip

    @property
    def workdir(self) -> Path:
        """Where ``pd`` runs unless a test says otherwise: a directory of this daemon's, not the repo, since
        ``pd begin`` and ``pd agent register`` remember the current agent in the worktree they run in."""
        path = self.home / "worktree"
        path.mkdir(exist_ok=True)
        return path

    def client(self, agent_id: str | None = None) -> BlockingClient:
        return BlockingClient(self.settings.ipc_sock, agent_id=agent_id, timeout=10).connect()

    def call(self, action: str, **args: Any) -> Any:
        with self.client() as c:
            return c.request(action, args)

    def log(self) -> str:
        return (self.home / "daemon.log").read_text(errors="replace")


def unix_client(d: Daemon) -> httpx.Client:
    """HTTP to ``d`` over its Unix socket (no token needed)."""
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(d.settings.http_sock)), base_url="http://x")


def linked_worktree(root: Path, name: str) -> Path:
    """A linked worktree (laid out as `git worktree add` does) of the one repository under ``root``: agents in
    worktrees of the same ``root`` share their file claims, as agents in worktrees of one repository do."""
    tree, git_dir = root / name, root / "repo.git" / "worktrees" / name
    git_dir.mkdir(parents=True)
    (git_dir / "commondir").write_text("../..\n")
    tree.mkdir()
    (tree / ".git").write_text(f"gitdir: {git_dir}\n")
    return tree


def make_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PORT_DADDY_", "PD_"))}
    env.update(PORT_DADDY_HOME=str(home), PORT_DADDY_PORT=str(free_port()), PORT_DADDY_NO_AUTOSTART="1")
    env.update(extra)
    return env


@pytest.fixture
def tmp_home() -> Iterator[Path]:
    home = Path(tempfile.mkdtemp(prefix="pd", dir="/tmp"))
    yield home
    shutil.rmtree(home, ignore_errors=True)


def _daemon(home: Path, **extra: str) -> Iterator[Daemon]:
    d = Daemon(home, make_env(home, **extra)).start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    home = Path(tempfile.mkdtemp(prefix="pd", dir="/tmp"))
    yield from _daemon(home)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def fresh_daemon(tmp_home: Path) -> Iterator[Daemon]:
    yield from _daemon(tmp_home)


@pytest.fixture
def daemon_factory(tmp_home: Path) -> Iterator[Any]:
    """Build a daemon with extra environment (shrunken thresholds, limits) for one test."""
    started: list[Daemon] = []

    def build(**extra: str) -> Daemon:
        d = Daemon(tmp_home, make_env(tmp_home, **extra)).start()
        started.append(d)
        return d

    yield build
    for d in started:
        d.stop()
