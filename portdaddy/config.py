"""Where everything lives and every knob, resolved from the environment in one place.

Imported by the CLI, so: standard library only, nothing slow.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from portdaddy.caller import AGENT_VARS
from portdaddy.durations import parse_duration_ms
from portdaddy.paths import home_dir, runtime_path

DEFAULT_TCP_PORT = 9876
TCP_PORT_ATTEMPTS = 11  # 9876..9886, as the original
DEFAULT_RANGE = (3100, 9999)
RESERVED_PORTS = frozenset({8000, 8080, 9876})
DEFAULT_SALVAGE_KEEP_MS = 30 * 86_400_000  # a month, as an unread inbox message (spec/journal.md)
MAX_SOCKET_PATH = 107  # bytes in sockaddr_un.sun_path, less its NUL


# Who a client acts as (the CLI and SDK read them): one caller's, so never the daemon's nor what it runs. PD_* is
# the context Port Daddy hands what it runs (a fleet agent, pd lock --exec, pd watch --exec): one run's, likewise.
CALLER_VARIABLES = frozenset({*AGENT_VARS, "PORT_DADDY_SESSION"})
CALLER_PREFIX = "PD_"


def env_int(env: Mapping[str, str], var: str, default: int) -> int:
    """A whole number from the environment; ``default`` when unset or not one (ASCII digits only)."""
    raw = env.get(var, "").strip()
    return int(raw) if raw.isascii() and raw.isdigit() else default


def env_ms(env: Mapping[str, str], var: str) -> int | None:
    """A duration from the environment (``90s``, ``2h``, bare ms); None when unset or not one."""
    raw = env.get(var)
    return parse_duration_ms(raw) if raw else None


def without_caller(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` less the variables that say who one caller is: what a daemon, and each agent it starts, may keep of
    the environment of the shell that started it (spec/fleet.md, "An agent's environment")."""
    return {k: v for k, v in env.items() if k not in CALLER_VARIABLES and not k.startswith(CALLER_PREFIX)}


@dataclass(frozen=True, slots=True)
class Settings:
    """The runtime layout (reference §24.4, 3.8.2) plus daemon tunables."""

    home: Path
    http_sock: Path
    ipc_sock: Path
    pid_file: Path
    port_file: Path
    lock_file: Path
    token_file: Path
    master_key: Path
    db: Path
    log: Path
    tcp_port: int
    tcp_enabled: bool
    ipc_enabled: bool
    silent: bool
    port_range: tuple[int, int]
    stale_after_ms: int | None
    dead_after_ms: int | None
    ipc_max_conn: int
    ipc_rate: int
    ipc_partial_timeout_ms: int
    autostart: bool
    webhook_allow_private: bool  # deliver to loopback/private/link-local targets (tests, local tooling)
    webhook_retry_base_ms: int  # first retry delay; then doubled (1, 2, 4, 8 s by default)
    webhook_disable_after_ms: int  # how long a webhook fails every delivery before it is disabled
    salvage_keep_ms: int  # how long a salvage entry is kept after it last changed (then its dead agent goes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        home = Path(home_dir(env))

        def path(var: str, name: str) -> Path:
            return Path(runtime_path(env, var, name))

        def flag(var: str) -> bool:
            return env.get(var, "").lower() in ("1", "true", "yes", "on")

        def duration(var: str) -> int | None:
            return env_ms(env, var)

        def integer(var: str, default: int) -> int:
            return env_int(env, var, default)

        disable_after = duration("PORT_DADDY_WEBHOOK_DISABLE_AFTER")
        salvage_keep = duration("PORT_DADDY_SALVAGE_KEEP")
        start = integer("PORT_DADDY_RANGE_START", DEFAULT_RANGE[0])
        end = integer("PORT_DADDY_RANGE_END", DEFAULT_RANGE[1])
        if not 1024 <= start <= end <= 65535:
            start, end = DEFAULT_RANGE
        return cls(
            home=home,
            http_sock=path("PORT_DADDY_SOCK", "daemon.sock"),
            ipc_sock=path("PORT_DADDY_IPC", "daemon.ipc"),
            pid_file=path("PORT_DADDY_PID_FILE", "daemon.pid"),
            port_file=path("PORT_DADDY_PORT_FILE", "daemon.port"),
            lock_file=home / "daemon.lock",
            token_file=home / "token",
            master_key=home / "master.key",
            db=path("PORT_DADDY_DB", "portdaddy.db"),
            log=home / "daemon.log",
            tcp_port=integer("PORT_DADDY_PORT", DEFAULT_TCP_PORT),
            tcp_enabled=not flag("PORT_DADDY_NO_TCP"),
            ipc_enabled=not flag("PORT_DADDY_NO_IPC"),
            silent=flag("PORT_DADDY_SILENT"),
            port_range=(start, end),
            stale_after_ms=duration("PORT_DADDY_STALE_AFTER"),
            dead_after_ms=duration("PORT_DADDY_DEAD_AFTER"),
            ipc_max_conn=integer("PORT_DADDY_IPC_MAX_CONN", 256),
            ipc_rate=integer("PORT_DADDY_IPC_RATE", 500),
            ipc_partial_timeout_ms=duration("PORT_DADDY_IPC_PARTIAL_TIMEOUT") or 10_000,
            autostart=not flag("PORT_DADDY_NO_AUTOSTART"),
            webhook_allow_private=flag("PORT_DADDY_WEBHOOK_ALLOW_PRIVATE"),
            webhook_retry_base_ms=duration("PORT_DADDY_WEBHOOK_RETRY_BASE") or 1000,
            webhook_disable_after_ms=3_600_000 if disable_after is None else disable_after,  # 0: the count alone
            salvage_keep_ms=salvage_keep or DEFAULT_SALVAGE_KEEP_MS,
        )

    def home_problem(self) -> tuple[str, str] | None:
        """(what stops a daemon from living in this home, what to do), or None."""
        if self.home.exists() and not self.home.is_dir():
            return f"PORT_DADDY_HOME {self.home} is a file, not a directory", "point PORT_DADDY_HOME at a directory"
        for sock in (self.ipc_sock, self.http_sock):
            if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
                return (f"socket path {sock} is {len(os.fsencode(sock))} bytes; Unix sockets allow {MAX_SOCKET_PATH}",
                        "use a shorter PORT_DADDY_HOME")  # fmt: skip
        return self._foreign_owner()

    def _foreign_owner(self) -> tuple[str, str] | None:
        """A home, or a file in it, owned by another user: they could read the token and notes' keys, or have
        planted them (a token they know, a symlink the daemon would write through) while the home was open to
        them. Refused rather than tightened: chmod cannot take back what they already have."""
        uid = os.getuid()
        try:
            owner = self.home.stat().st_uid
            entries = [] if owner != uid else list(os.scandir(self.home))
        except FileNotFoundError:
            return None
        if owner != uid:
            return (f"PORT_DADDY_HOME {self.home} belongs to uid {owner}, not to you (uid {uid})",
                    "point PORT_DADDY_HOME at a directory of your own")  # fmt: skip
        for entry in entries:
            owner = entry.stat(follow_symlinks=False).st_uid
            if owner != uid:
                return (f"{entry.path} belongs to uid {owner}, not to you (uid {uid}); another user may have planted "
                        "it", "remove it, or point PORT_DADDY_HOME at a new directory of your own")  # fmt: skip
        return None

    def recorded_pid(self) -> int | None:
        """The pid the daemon wrote to its pid file (it may be gone since, or a stale file's)."""
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def ensure_home(self) -> None:
        """Create the runtime dir 0700 (and tighten it if it already exists); OSError says why it cannot be."""
        problem = self.home_problem()
        if problem is None:
            self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
            problem = self._foreign_owner()  # again: another user may have made it between the check and mkdir
        if problem is not None:
            raise OSError(f"{problem[0]}; {problem[1]}")
        os.chmod(self.home, 0o700)
