"""pd start | stop | status | version | daemon."""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import time
from typing import Any, NamedTuple, NoReturn

import click

from portdaddy import __version__
from portdaddy.cli.output import emit_json, json_option, quiet_option
from portdaddy.cli.transport import fail, settings, spinning, wait_healthy
from portdaddy.config import Settings
from portdaddy.errors import EXIT_UNREACHABLE, NoReply, PDError, exit_code
from portdaddy.launcher import probe, spawn_daemon
from portdaddy.procfs import alive, state
from portdaddy.text import elapsed, plural


class Down(NamedTuple):
    """Why no daemon answers in a home, what to run about it, and whether a daemon process is there at all."""

    why: str
    fix: str
    alive: bool = False


def diagnose_down(cfg: Settings) -> Down:
    problem = cfg.home_problem()
    if problem is not None:
        return Down(*problem)
    if not cfg.home.exists():
        return Down(f"{cfg.home} does not exist yet (never started here)", "pd start")
    pid = cfg.recorded_pid()
    if pid:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            pass
        except PermissionError:
            return Down(f"process {pid} from the pid file belongs to another user", "check PORT_DADDY_HOME")
        if not alive(pid):
            return Down(f"pid file names process {pid}, which is gone (the daemon crashed or was killed)", "pd start")
        if not cfg.ipc_sock.exists():
            return Down(f"process {pid} runs but {cfg.ipc_sock} is missing (PORT_DADDY_NO_IPC?)", "pd stop && pd start",
                        alive=True)  # fmt: skip
        if state(pid) in ("T", "t"):  # stopped, or traced
            return Down(f"process {pid} is stopped (a SIGSTOP, Ctrl-Z or a debugger)", f"kill -CONT {pid}", alive=True)
        return Down(f"process {pid} runs but does not answer on {cfg.ipc_sock}", f"see {cfg.log}; pd stop && pd start",
                    alive=True)  # fmt: skip
    if cfg.ipc_sock.exists():
        return Down(f"stale socket {cfg.ipc_sock} with no daemon behind it", "pd start (it cleans up stale files)")
    # The home is named: a daemon running elsewhere (another PORT_DADDY_HOME) is the likeliest surprise.
    return Down(f"nothing runs in {cfg.home} (stopped cleanly, or never started there)", "pd start")


def _unreachable_holder(cfg: Settings) -> int | None:
    """The pid of a daemon that holds ``cfg``'s home (its instance flock) but does not answer, e.g. with its IPC
    socket deleted: pd status says to stop it, which must then work. None when no process holds the lock, so a
    recycled pid in a stale pid file is never signalled."""
    try:
        fd = os.open(cfg.lock_file, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # nobody holds it
    except BlockingIOError:
        pass
    finally:
        os.close(fd)  # drops the shared lock, if it was taken
    pid = cfg.recorded_pid()
    return pid if pid is not None and alive(pid) else None


@click.command()
@json_option
def start(as_json: bool) -> None:
    """Start the daemon in the background and wait until it is healthy (IPC and HTTP both serving).

    \b
    Example:
      pd start
    """
    cfg = settings()
    try:
        running = probe(cfg) is not None
        # A daemon already running may still be starting its HTTP server: wait for that too.
        health = wait_healthy(cfg, None if running else spawn_daemon(cfg), http=True)
    except PDError as e:
        fail(e, as_json=as_json)
    state = "is already running" if running else "started"
    _report(as_json, {"started": not running, **health}, f"Port Daddy {state} (pid {health['pid']}) in {cfg.home}")


@click.command()
@json_option
def stop(as_json: bool) -> None:
    """Stop the daemon (SIGTERM; it checkpoints the database and removes its sockets).

    \b
    Example:
      pd stop
    """
    cfg = settings()
    try:
        health = probe(cfg)
    except PDError as e:
        fail(e, as_json=as_json)
    pid = health["pid"] if health is not None else _unreachable_holder(cfg)
    if pid is None:
        _report(as_json, {"running": False}, f"Port Daddy is not running in {cfg.home}")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    with spinning(f"stopping Port Daddy (pid {pid})…"):  # it stops its fleet's agents first: seconds, maybe
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
    if alive(pid):
        fail(PDError("TIMEOUT", f"Port Daddy (pid {pid}) did not stop within 10s; kill it with: kill -9 {pid}"))
    _report(as_json, {"stopped": pid}, f"Port Daddy stopped (pid {pid}) in {cfg.home}")


def _report(as_json: bool, reply: dict[str, Any], line: str) -> None:
    """What became of the daemon: ``reply`` under --json, else ``line``, which says it in the one wording of the
    daemon's life, "Port Daddy <started | stopped | is …> (pid N) in HOME" (spec/decisions.md)."""
    if as_json:
        emit_json({"success": True, **reply})
    else:
        click.echo(line)


@click.command()
@json_option
def status(as_json: bool) -> None:
    """Is the daemon up? pid, uptime, version, sockets, database and counts; if down, why and what to run.

    \b
    Example:
      pd status
    """
    cfg = settings()
    try:
        st = probe(cfg, "daemon.status")
    except NoReply:  # it took the connection and said nothing: stopped or stuck
        _not_serving(cfg, as_json, running=True)
    except PDError as e:  # running, but turning this connection away
        if as_json:
            emit_json({"success": False, "running": True, "error": e.code, "reason": e.message, "home": str(cfg.home)})
        else:
            click.echo(f"Port Daddy is running but refused this connection: {e.message}", err=True)
        sys.exit(exit_code(e.code))
    if st is None:
        _not_serving(cfg, as_json, running=False)
    store = st.get("store") or {}
    # First: while the store refuses writes, every change anyone asks for is refused.
    refused = [f"writes are refused: {store['message']}"] if store.get("ok") is False else []
    dropped = store.get("dropped") or {}
    if dropped:  # lost, though nobody was promised them: worth knowing after the store came back too
        what = ", ".join(count_line(kind, n, _DROPPED) for kind, n in dropped.items())
        refused.append(f"dropped while writes were refused (fire-and-forget, never acknowledged): {what}; see "
                       "daemon.log")  # fmt: skip
    warnings = refused + _other_code(st) + attention(st["counts"])
    if as_json:
        emit_json({"success": True, "running": True, **st, "warnings": warnings})
        return
    click.echo(f"Port Daddy {st['version']} is running (pid {st['pid']}, up {st['uptimeHuman']})")
    click.echo(f"  home:     {st['home']}")
    for name, where in st["sockets"].items():
        if where:
            click.echo(f"  {name + ':':9} {where}")
    click.echo(f"  database: {st['db']}")
    counts = ", ".join(count_line(k, v) for k, v in st["counts"].items() if v) or "nothing yet"
    click.echo(f"  counts:   {counts}")
    for line in warnings:
        click.echo(f"  warning:  {line}")


def _not_serving(cfg: Settings, as_json: bool, *, running: bool) -> NoReturn:
    """Say why no daemon serves this home (``running``: one took the connection but did not answer), what to
    run about it, and exit 3. A daemon process that is there but cannot be reached is "not answering": "not
    running: process 22792 is running but …" said both."""
    why, fix, process_there = diagnose_down(cfg)
    running = running or process_there
    if as_json:
        emit_json({"success": False, "error": "DAEMON_UNAVAILABLE", "message": f"{why}; fix: {fix}",
                   "running": running, "reason": why, "fix": fix, "home": str(cfg.home)})  # fmt: skip
    else:
        click.echo(f"Port Daddy is {'not answering' if running else 'not running'}: {why}", err=True)
        click.echo(f"  fix: {fix}", err=True)
    sys.exit(EXIT_UNREACHABLE)


# The daemon's counts as pd status prints them: key -> (one, many).
_NOUNS = {
    "services": ("service", "services"), "agents": ("agent", "agents"),
    "agentsActive": ("active agent", "active agents"), "agentsStale": ("stale agent", "stale agents"),
    "agentsDead": ("dead agent", "dead agents"), "agentHeartbeats": ("heartbeat", "heartbeats"),
    "salvageRepeats": ("earlier failed fleet run", "earlier failed fleet runs"),
    "sessionsActive": ("active session", "active sessions"), "notes": ("note", "notes"),
    "activityRows": ("activity row", "activity rows"), "locks": ("lock", "locks"),
    "lockWaiters": ("lock waiter", "lock waiters"), "channels": ("channel", "channels"),
    "messagesPublished": ("message published", "messages published"),
    "subscriptions": ("subscription", "subscriptions"), "lagging": ("lagging subscriber", "lagging subscribers"),
    "inboxSent": ("direct message sent", "direct messages sent"), "webhooks": ("webhook", "webhooks"),
    "webhookPending": ("webhook delivery pending", "webhook deliveries pending"),
    "webhookDelivered": ("webhook delivery made", "webhook deliveries made"),
    "webhookFailed": ("failed webhook delivery", "failed webhook deliveries"),
    "webhooksDisabled": ("disabled webhook", "disabled webhooks"), "harbors": ("harbor", "harbors"),
    "tuples": ("tuple", "tuples"), "tupleWaiters": ("tuple waiter", "tuple waiters"),
    "pheromones": ("pheromone", "pheromones"), "pheromoneSprays": ("pheromone spray", "pheromone sprays"),
    "arbiterViolations": ("arbiter finding", "arbiter findings"),
    "arbiterSerious": ("serious arbiter finding", "serious arbiter findings"),
    "fleets": ("fleet", "fleets"), "fleetRuns": ("fleet run running", "fleet runs running"),
    "storeCheckpoints": ("store checkpoint", "store checkpoints"),
    "ipcConnections": ("IPC connection", "IPC connections"),
    "ipcRefused": ("IPC connection refused", "IPC connections refused"),
    "ipcMalformed": ("malformed IPC frame", "malformed IPC frames"),
    "ipcCutOff": ("IPC connection cut off", "IPC connections cut off"),
    "ipcRateLimited": ("IPC frame over the rate", "IPC frames over the rate"),
    "ipcDroppedFrames": ("dropped IPC frame", "dropped IPC frames"),
    "ipcDroppedPushes": ("dropped IPC push", "dropped IPC pushes"),
}  # fmt: skip


# What the store dropped while it refused writes, by kind (core/store.py's ``drop``).
_DROPPED = {"changes": ("change", "changes"), "sprays": ("spray", "sprays"), "messages": ("message", "messages"),
            "activity": ("activity row", "activity rows")}  # fmt: skip


def count_line(key: str, n: int, nouns: dict[str, tuple[str, str]] = _NOUNS) -> str:
    """``1 note``, ``3 active sessions``; a count pd does not know yet (a newer daemon's) as ``key=n``."""
    return plural(n, *nouns[key]) if key in nouns else f"{key}={n:,}"


# count -> (one, many, what it means when above zero, where to look)
_ATTENTION = {
    "agentsStale": ("agent", "agents", "silent past the heartbeat interval, to be declared dead if that lasts",
                    "pd agents"),
    "agentsDead": ("dead agent", "dead agents", "left work behind", "pd salvage"),
    "arbiterSerious": ("invariant violation", "invariant violations", "recorded", "pd arbiter violations"),
    "webhookFailed": ("webhook delivery", "webhook deliveries", "failed", "pd webhook ls"),
    "webhooksDisabled": ("webhook", "webhooks", "disabled after failing every delivery for a while", "pd webhook ls"),
    "lagging": ("subscriber", "subscribers", "fell behind and missed messages", "pd channels"),
    "ipcCutOff": ("IPC connection", "IPC connections", "cut off for malformed frames", "daemon.log"),
}  # fmt: skip


def _other_code(st: dict[str, Any]) -> list[str]:
    """A daemon started before an upgrade or a ``git pull`` runs the code it loaded then, not this pd's."""
    from portdaddy.source import fingerprint  # hashlib: only pd status pays for it

    restart = "restart it to run this pd's: pd stop && pd start"
    if st.get("version") != __version__:
        return [f"the daemon runs version {st.get('version')}, this pd {__version__}: {restart}"]
    if st.get("code") != fingerprint():
        return [f"the daemon runs the code it loaded when it started; its files have changed since (an upgrade or a "
                f"git pull): {restart}"]  # fmt: skip
    return []


def attention(counts: dict[str, int]) -> list[str]:
    """What in a running daemon wants a look, each with where to look."""
    return [f"{plural(counts[key], one, many)} {what}{_detail(key, counts)}: see {where}"
            for key, (one, many, what, where) in _ATTENTION.items() if counts.get(key)]  # fmt: skip


def _detail(key: str, counts: dict[str, int]) -> str:
    """A fleet agent failing run after run is one dead agent: say how many failed runs it stands for."""
    repeats = counts.get("salvageRepeats") if key == "agentsDead" else 0
    if not repeats:
        return ""
    whose = "the same fleet agent" if counts[key] == 1 else "the same fleet agents"
    return f" (and {plural(repeats, 'earlier failed run')} of {whose})"


@click.command()
@json_option
@quiet_option
def version(as_json: bool, quiet: bool) -> None:
    """Print the client version, and the daemon's if one is running (never starts it). -q: the client's alone.

    \b
    Examples:
      pd version
      pd version --json
    """
    try:
        daemon = probe(settings(), "daemon.version")
    except NoReply as e:
        daemon = {"notAnswering": e.message}
    except PDError as e:
        daemon = {"refused": e.message}
    if as_json:
        emit_json({"success": True, "client": __version__, "daemon": daemon})
    elif quiet:
        click.echo(__version__)
    else:
        # The daemon's line in the one wording of its life, as pd status says it (spec/decisions.md).
        click.echo(f"pd {__version__}")
        if daemon and "refused" in daemon:
            click.echo(f"Port Daddy is running but refused this connection: {daemon['refused']}")
        elif daemon and "notAnswering" in daemon:
            click.echo(f"Port Daddy is running but not answering ({daemon['notAnswering']}): see pd status")
        elif daemon:
            click.echo(f"Port Daddy {daemon['version']} is running (pid {daemon['pid']}, "
                       f"up {elapsed(daemon['uptime'])})")  # fmt: skip
        else:
            click.echo("Port Daddy is not running")


@click.command()
def daemon() -> None:
    """Run the daemon in the foreground (what `make run` does). Ctrl-C stops it cleanly.

    \b
    Example:
      PORT_DADDY_HOME=/tmp/pd-scratch pd daemon
    """
    from portdaddy.daemon import main

    sys.exit(main())


COMMANDS = (start, stop, status, version, daemon)
