"""Test harness: real daemons on temporary homes, real sockets, real SQLite.

``daemon`` is shared by a module (cheap); ``fresh_daemon`` is one per test (for state that must start
empty, restarts and kills). Daemon homes live under /tmp with short names: Unix socket paths are limited to
107 bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
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

    def start(self, aged: subprocess.Popen[bytes] | None = None) -> Daemon:
        """Start the daemon; in the ``aged_process`` given, if one is (it is as old as that process)."""
        if aged is None:
            log = open(self.home / "daemon.log", "ab")  # noqa: SIM115
            self.proc = subprocess.Popen([PYTHON, "-m", "portdaddy.daemon"], env=self.env, stdout=log, stderr=log)
            log.close()
        else:
            assert aged.stdin is not None and aged.poll() is None, "the aged process was used already"
            aged.stdin.write(json.dumps([self.env, str(self.home / "daemon.log")]).encode() + b"\n")
            aged.stdin.close()
            self.proc = aged
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


def traceback_frames(error: BaseException) -> int:
    """How many frames ``error``'s traceback holds (and keeps alive)."""
    tb, frames = error.__traceback__, 0
    while tb is not None:
        tb, frames = tb.tb_next, frames + 1
    return frames


def unix_client(d: Daemon) -> httpx.Client:
    """HTTP to ``d`` over its Unix socket (no token needed)."""
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(d.settings.http_sock)), base_url="http://x")


# -- contention: many processes, one call each, released at the same instant ----------------------------------

# One racer process. It connects first (an IPC connection, or HTTP on the Unix socket), says "ready", then
# blocks reading the start gate, a pipe every racer inherits: closing its write end wakes them all at once.
# A `pd` racer execs `pd` when the gate opens, so its whole run (imports, connect, call) races. It prints
# {"reply": ..., "error": code or null}, a refusal in the IPC shape whichever transport carried it.
_RACER = r"""
import json, os, sys
how, spec, gate = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])

def ready():
    print("ready", flush=True)
    os.read(gate, 1)

if how == "pd":
    ready()
    os.execv(sys.executable, [sys.executable, "-m", "portdaddy.cli", *spec["args"]])
from portdaddy.errors import PDError
if how == "ipc":
    from portdaddy.ipc.client import BlockingClient
    client = BlockingClient(spec["sock"], agent_id=spec["agent"], timeout=120).connect()
    ready()
    try:
        out = {"reply": client.request(spec["action"], spec["args"]), "error": None}
    except PDError as e:
        out = {"reply": e.to_wire(), "error": e.code}
else:
    import httpx
    headers = {"X-Agent-Id": spec["agent"]} if spec["agent"] else {}
    client = httpx.Client(transport=httpx.HTTPTransport(uds=spec["sock"]), base_url="http://x", timeout=120,
                          headers=headers)
    client.get("/health")  # the connection is open before the start
    ready()
    r = client.request(spec["method"], spec["path"], json=spec["body"])
    body = r.json()
    if r.is_success:
        out = {"reply": body, "error": None}
    else:  # HTTP says {error: message, code}: told as IPC tells it, {error: code, message}
        out = {"reply": {**body, "error": body["code"], "message": body["error"]}, "error": body["code"]}
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Racer:
    """How one racer calls the daemon: ``how`` is ipc, http or pd (see ``ipc``, ``http``, ``pd`` below)."""

    how: str
    spec: dict[str, Any]
    cwd: Path | None = None
    env: dict[str, str] | None = None


def ipc(action: str, *, agent: str | None = None, **args: Any) -> Racer:
    """A racer with its own IPC connection (bound to ``agent`` if given) making one request."""
    return Racer("ipc", {"action": action, "args": args, "agent": agent})


def http(method: str, path: str, body: Any = None, *, agent: str | None = None) -> Racer:
    """A racer making one HTTP request on the daemon's Unix socket (``agent`` as X-Agent-Id)."""
    return Racer("http", {"method": method, "path": path, "body": body, "agent": agent})


def pd(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> Racer:
    """A racer running ``pd ARGS`` (in ``cwd``, the daemon's workdir by default)."""
    return Racer("pd", {"args": list(args)}, cwd, env)


@dataclass
class Outcome:
    """What one racer got. ``code`` is the exit code (as pd would give it, for IPC and HTTP racers too), so a
    winner is ``code == 0`` whatever the transport; ``reply`` is the daemon's answer or refusal (a pd racer's
    ``--json`` output, when it printed JSON); ``error`` the refusal's code."""

    how: str
    code: int
    reply: Any
    error: str | None
    stdout: str = ""
    stderr: str = ""


def _outcome(how: str, code: int, stdout: str, stderr: str) -> Outcome:
    from portdaddy.errors import exit_code

    if how == "pd":
        try:
            reply = json.loads(stdout)
        except ValueError:
            reply = None
        error = reply.get("error") if isinstance(reply, dict) and reply.get("success") is False else None
        return Outcome(how, code, reply, error, stdout, stderr)
    assert code == 0 and stdout, f"{how} racer failed: {stderr}"
    got = json.loads(stdout)
    return Outcome(how, 0 if got["error"] is None else exit_code(got["error"]), got["reply"], got["error"], stdout,
                   stderr)  # fmt: skip


class Racers:
    """Processes that each call ``d`` once, all at the same instant: started, connected and waiting at one
    gate when built; ``go()`` opens it; ``outcomes()`` waits for them. Use as a context manager (leftovers are
    killed). ``race(d, racers)`` is the usual one-liner."""

    def __init__(self, d: Daemon, racers: Sequence[Racer]) -> None:
        cfg = d.settings
        sockets = {"ipc": str(cfg.ipc_sock), "http": str(cfg.http_sock), "pd": None}
        read_end, self._gate = os.pipe()
        self._racers = list(racers)
        self._procs: list[subprocess.Popen[str]] = []
        try:
            for r in self._racers:
                spec = {**r.spec, "sock": sockets[r.how]}
                self._procs.append(subprocess.Popen(
                    [PYTHON, "-c", _RACER, r.how, json.dumps(spec), str(read_end)], pass_fds=(read_end,),
                    env={**d.env, **(r.env or {})}, cwd=r.cwd or d.workdir, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True))  # fmt: skip
            for p in self._procs:
                assert p.stdout is not None
                assert p.stdout.readline() == "ready\n", p.stderr.read() if p.stderr else ""
        except BaseException:
            self.close()
            raise
        finally:
            os.close(read_end)

    def go(self) -> Racers:
        if self._gate >= 0:
            os.close(self._gate)
            self._gate = -1
        return self

    def outcomes(self, timeout: float = 120) -> list[Outcome]:
        """Each racer's outcome, in the order the racers were given."""
        done = []
        for r, p in zip(self._racers, self._procs, strict=True):
            out, err = p.communicate(timeout=timeout)
            done.append(_outcome(r.how, p.returncode, out, err))
        return done

    def close(self) -> None:
        self.go()
        for p in self._procs:
            if p.poll() is None:
                p.kill()
            p.communicate()

    def __enter__(self) -> Racers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def race(d: Daemon, racers: Sequence[Racer]) -> list[Outcome]:
    """Run ``racers`` against ``d`` at the same instant; what each got, in order."""
    with Racers(d, racers) as r:
        return r.go().outcomes()


def winners(outcomes: Sequence[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.code == 0]


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
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PORT_DADDY_", "PD_")) and k != "AGENT_ID"}
    env.update(PORT_DADDY_HOME=str(home), PORT_DADDY_PORT=str(free_port()), PORT_DADDY_NO_AUTOSTART="1")
    env.update(extra)
    return env


@pytest.fixture
def tmp_home() -> Iterator[Path]:
    home = Path(tempfile.mkdtemp(prefix="pd", dir="/tmp"))
    yield home
    shutil.rmtree(home, ignore_errors=True)


def _daemon(home: Path, **extra: str) -> Iterator[Daemon]:
    d = Daemon(home, make_env(home, **extra))
    try:
        yield d.start()
    finally:  # also one that started but never answered: stopped before its home is removed
        d.stop()


def shared_daemon(**extra: str) -> Iterator[Daemon]:
    """A daemon on a home of its own for as long as the fixture yielding from this lives (``daemon`` is one)."""
    home = Path(tempfile.mkdtemp(prefix="pd", dir="/tmp"))
    try:
        yield from _daemon(home, **extra)
    finally:  # also when the daemon does not start
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    yield from shared_daemon()


# A process waiting to exec the daemon with the environment and log file it reads on its standard input.
_AGED = r"""
import json, os, sys
env, log = json.loads(sys.stdin.readline())
out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
os.dup2(os.open(os.devnull, os.O_RDONLY), 0), os.dup2(out, 1), os.dup2(out, 2)
os.execve(sys.executable, [sys.executable, "-m", "portdaddy.daemon"], env)
"""


@pytest.fixture(scope="session", autouse=True)
def aged_process() -> Iterator[subprocess.Popen[bytes]]:
    """A process started with the session, for one ``Daemon.start(aged_process)``: a daemon that has run longer
    than a start may take (launcher.START_TIMEOUT_S, by its process's start time; an exec keeps it) without a
    test sleeping 15 s for one."""
    proc = subprocess.Popen([PYTHON, "-c", _AGED], stdin=subprocess.PIPE)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.fixture
def fresh_daemon(tmp_home: Path) -> Iterator[Daemon]:
    yield from _daemon(tmp_home)


@pytest.fixture
def aged_daemon(tmp_home: Path, aged_process: subprocess.Popen[bytes]) -> Iterator[Daemon]:
    """A daemon in ``aged_process``: one that has run longer than a start may take, or nearly."""
    d = Daemon(tmp_home, make_env(tmp_home)).start(aged_process)
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def daemon_factory(tmp_home: Path) -> Iterator[Any]:
    """Build a daemon with extra environment (shrunken thresholds, limits) for one test."""
    started: list[Daemon] = []

    def build(**extra: str) -> Daemon:
        d = Daemon(tmp_home, make_env(tmp_home, **extra))
        started.append(d)  # before it starts: one that never answers is stopped too
        return d.start()

    yield build
    for d in started:
        d.stop()
