"""The foundation end to end: a real daemon, the real `pd`, real sockets."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import apsw
import httpx
import pytest
from conftest import PYTHON, Daemon, make_env, pd, race

import portdaddy
from portdaddy.core.registry import seed_port
from portdaddy.errors import DaemonUnavailable
from portdaddy.ipc.client import BlockingClient


def claim_q(d: Daemon, identity: str, *args: str) -> int:
    r = d.pd("claim", identity, "-q", *args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().isdigit(), r.stdout
    return int(r.stdout)


def test_claim_is_stable_and_hash_seeded(daemon: Daemon, tmp_home: Path) -> None:
    port = claim_q(daemon, "stable:api:main")
    assert claim_q(daemon, "stable:api:main") == port
    assert port == seed_port("stable:api:main", 3100, 9999) or port > 3100
    other = Daemon(tmp_home, make_env(tmp_home)).start()
    try:
        assert claim_q(other, "stable:api:main") == port  # a fresh home agrees
    finally:
        other.stop()


def test_claim_skips_a_port_bound_by_another_process(daemon: Daemon) -> None:
    identity = "bound:api"
    wanted = seed_port(identity, 3100, 9999)
    with socket.socket() as s:
        s.bind(("127.0.0.1", wanted))
        s.listen()
        got = claim_q(daemon, identity)
    assert got != wanted


def test_release_then_reclaim_returns_the_seeded_port(daemon: Daemon) -> None:
    port = claim_q(daemon, "relclaim:web")
    r = daemon.pd("release", "relclaim:web")
    assert r.returncode == 0 and "released relclaim:web" in r.stdout
    assert claim_q(daemon, "relclaim:web") == port


def test_find_json_and_patterns(daemon: Daemon) -> None:
    for ident in ("findme:api:main", "findme:web:main", "findme"):
        claim_q(daemon, ident)
    r = daemon.pd("find", "findme:*", "--json")
    ids = sorted(s["id"] for s in json.loads(r.stdout)["services"])
    assert ids == ["findme:api:main", "findme:web:main"]
    r = daemon.pd("find", "*:web:*", "--json")
    assert "findme:web:main" in [s["id"] for s in json.loads(r.stdout)["services"]]
    assert "findme:api:main" not in [s["id"] for s in json.loads(r.stdout)["services"]]


def test_url_env_and_endpoints(daemon: Daemon) -> None:
    port = claim_q(daemon, "urls:api")
    assert daemon.pd("url", "urls:api").stdout.strip() == f"http://localhost:{port}"
    assert daemon.pd("url", "urls:api", "--env", "prod").returncode == 1
    assert f"URLS_API_PORT={port}" in daemon.pd("env", "urls:*").stdout
    daemon.call("port.endpoint", id="urls:api", env="prod", url="https://api.example.com")
    assert daemon.pd("url", "urls:api", "-e", "prod").stdout.strip() == "https://api.example.com"


def test_env_leaves_out_identities_that_give_the_same_name_and_says_so(daemon: Daemon) -> None:
    """my-app:api and my_app:api are both MY_APP_API: one silently overwrote the other. Neither is printed now,
    a warning names both, --json lists them, and the identities that do not collide are printed as ever."""
    claim_q(daemon, "clash-app:api")
    claim_q(daemon, "clash_app:api")
    port = claim_q(daemon, "clash-app:web")
    r = daemon.pd("env", "clash*:*")
    assert r.returncode == 0 and r.stdout == f"CLASH_APP_WEB_PORT={port}\nCLASH_APP_WEB_URL=http://localhost:{port}\n"
    assert r.stderr == ("Warning: CLASH_APP_API_PORT would name each of clash-app:api, clash_app:api; none of them "
                        "is printed (narrow the pattern to one, or use pd url ID)\n")  # fmt: skip
    body = json.loads(daemon.pd("env", "clash*:*", "--json").stdout)
    assert body["collisions"] == {"CLASH_APP_API": ["clash-app:api", "clash_app:api"]}
    assert set(body["env"]) == {"CLASH_APP_WEB_PORT", "CLASH_APP_WEB_URL"}
    alone = daemon.pd("env", "clash-app:*")  # narrowed to one of them: no collision left
    assert "CLASH_APP_API_PORT=" in alone.stdout and alone.stderr == ""


def test_release_by_pattern_and_expired(daemon: Daemon) -> None:
    for ident in ("gone:a", "gone:b", "gone:c:d"):
        claim_q(daemon, ident)
    out = json.loads(daemon.pd("release", "gone:*", "--json").stdout)
    assert out["released"] == 3
    claim_q(daemon, "short:lived", "--expires", "1ms")
    time.sleep(0.05)
    assert json.loads(daemon.pd("find", "short:*", "--json").stdout)["count"] == 0  # the reaper got it


def test_http_over_unix_socket_and_tcp_security(daemon: Daemon) -> None:
    cfg = daemon.settings
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(cfg.http_sock)), base_url="http://x") as c:
        assert c.get("/health").json()["status"] == "ok"
        r = c.post("/claim", json={"id": "http:api"})
        assert r.status_code == 200 and r.json()["port"] > 0
        assert c.get("/services/http:api").json()["service"]["id"] == "http:api"
        assert c.get("/services/nope:x").status_code == 404
        r = c.post("/claim", json={"id": "bad id"})
        assert r.status_code == 400 and r.json()["code"] == "IDENTITY_INVALID"
        assert c.post("/claim", content=b"{nope").status_code == 400
    port = int(cfg.port_file.read_text())
    token = cfg.token_file.read_text().strip()
    assert oct(cfg.token_file.stat().st_mode & 0o777) == "0o600"
    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
        assert c.get("/health").status_code == 200
        assert c.post("/claim", json={"id": "tcp:api"}).status_code == 401
        auth = {"Authorization": f"Bearer {token}"}
        assert c.post("/claim", json={"id": "tcp:api"}, headers=auth).status_code == 200
        evil = {**auth, "Host": "evil.example.com"}
        assert c.post("/claim", json={"id": "tcp:api"}, headers=evil).status_code == 403


def test_connection_close_request_is_closed_by_the_server(daemon: Daemon) -> None:
    """Regression for hypercorn + quart-trio: a `Connection: close` response must end with EOF."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(daemon.settings.http_sock))
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):  # hangs (then times out) without the fix
            data += chunk
    assert b'"status":"ok"' in data


def test_runtime_files_are_private(daemon: Daemon) -> None:
    cfg = daemon.settings
    assert oct(cfg.home.stat().st_mode & 0o777) == "0o700"
    for path in (cfg.ipc_sock, cfg.http_sock):
        assert oct(path.stat().st_mode & 0o777) == "0o600", path


def test_bad_input_is_refused_with_exit_2_and_changes_nothing(daemon: Daemon) -> None:
    before = daemon.call("port.find")["count"]
    cases = [
        ("claim", "../etc/passwd"),
        ("claim", "a b"),
        ("claim", "myapp:*"),
        ("claim", "a:b:c:d"),
        ("claim", "ok:port", "--port", "80"),
        ("claim", "ok:port", "--port", "70000"),
        ("claim", "ok:exp", "--expires", "soon"),
    ]
    for args in cases:
        r = daemon.pd(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    with daemon.client() as c, pytest.raises(Exception, match="limit is 10000"):
        c.request("port.claim", {"id": "big:meta", "metadata": {"x": "y" * 20_000}})
    assert daemon.call("port.find")["count"] == before


def test_garbage_and_huge_blobs_on_the_ipc_socket(daemon: Daemon) -> None:
    path = str(daemon.settings.ipc_sock)
    for blob in (os.urandom(4096), b"\xff" * (1024 * 1024), b"\x10\x00\x00\x00\x01\xff\xff" + b"\xc1" * 65535):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(path)
            try:
                s.sendall(blob)
                s.shutdown(socket.SHUT_WR)  # a partial frame at the end waits for bytes that never come
                while s.recv(65536):
                    pass
            except (BrokenPipeError, ConnectionResetError):
                pass  # cut off after three strikes
    assert daemon.call("daemon.health")["status"] == "ok"


def test_unknown_action_is_not_understood(daemon: Daemon) -> None:
    with daemon.client() as c:
        with pytest.raises(Exception, match="unknown action"):
            c.request("no.such.thing")
        assert c.request("daemon.health")["status"] == "ok"  # the connection survives


def _claim_proc(env: dict[str, str], identity: str) -> int:
    r = subprocess.run([PYTHON, "-m", "portdaddy.cli", "claim", identity, "-q"], env=env, capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def test_fifty_concurrent_processes(daemon: Daemon) -> None:
    same = race(daemon, [pd("claim", "race:api", "-q")] * 50)
    distinct = race(daemon, [pd("claim", f"race:svc{i}", "-q") for i in range(50)])
    assert all(o.code == 0 for o in same + distinct), [o.stderr for o in same + distinct if o.code]
    assert len({o.stdout for o in same}) == 1
    assert len({o.stdout for o in distinct}) == 50 and same[0].stdout not in {o.stdout for o in distinct}


def test_sigkill_after_acknowledged_claims_loses_nothing(fresh_daemon: Daemon) -> None:
    ports = {f"durable:s{i}": claim_q(fresh_daemon, f"durable:s{i}") for i in range(20)}
    fresh_daemon.kill9()
    fresh_daemon.start()
    found = {s["id"]: s["port"] for s in fresh_daemon.call("port.find", pattern="durable:*")["services"]}
    assert found == ports
    db = apsw.Connection(str(fresh_daemon.settings.db))
    assert db.pragma("integrity_check") == "ok"


def test_a_second_home_on_the_same_store_is_refused(daemon: Daemon, tmp_home: Path) -> None:
    """Two daemons on one store would each keep its locks in memory and grant the same lock twice."""
    other = daemon.pd("start", env={"PORT_DADDY_HOME": str(tmp_home), "PORT_DADDY_DB": str(daemon.settings.db)})
    assert other.returncode == 3, other
    why = f"another daemon (pid {daemon.proc.pid}) uses the store {daemon.settings.db}; give each home its own"
    assert why in other.stderr
    assert daemon.call("port.claim", id="store:still")["port"]


def test_single_instance_and_clean_shutdown(fresh_daemon: Daemon) -> None:
    second = subprocess.run([PYTHON, "-m", "portdaddy.daemon"], env=fresh_daemon.env, capture_output=True,
                            text=True, timeout=30)  # fmt: skip
    pid, home = fresh_daemon.proc.pid, fresh_daemon.home
    assert second.returncode == 0 and second.stdout == f"Port Daddy is already running (pid {pid}) in {home}\n"
    cfg = fresh_daemon.settings
    assert fresh_daemon.stop(signal.SIGTERM) == 0
    for path in (cfg.ipc_sock, cfg.http_sock, cfg.pid_file):
        assert not path.exists(), path
    assert not Path(str(cfg.db) + "-wal").exists() or Path(str(cfg.db) + "-wal").stat().st_size == 0


def test_stale_files_are_cleaned_on_start(tmp_home: Path) -> None:
    d = Daemon(tmp_home, make_env(tmp_home)).start()
    d.kill9()
    assert d.settings.ipc_sock.exists()  # left behind by SIGKILL
    status = d.pd("status")
    assert status.returncode == 3 and "gone" in status.stderr and "pd start" in status.stderr
    d.start()
    assert d.call("daemon.health")["status"] == "ok"
    d.stop()


def test_status_and_version(daemon: Daemon) -> None:
    r = daemon.pd("status")
    assert r.returncode == 0 and "is running (pid" in r.stdout and "database:" in r.stdout
    st = json.loads(daemon.pd("status", "--json").stdout)
    assert st["sockets"]["ipc"].endswith("daemon.ipc") and "services" in st["counts"]
    assert st["success"] is True and st["running"] is True and isinstance(st["warnings"], list)
    assert daemon.pd("version", "-q").stdout.strip() == st["version"]


def test_status_says_when_the_daemon_runs_code_older_than_its_files(daemon: Daemon) -> None:
    """After a git pull in a checkout the version stays the same while the daemon runs what it loaded at start:
    pd status said nothing, and users chased fixed bugs."""

    def code_warnings() -> list[str]:
        return [w for w in json.loads(daemon.pd("status", "--json").stdout)["warnings"] if "this pd's" in w]

    assert code_warnings() == []
    source = Path(portdaddy.__file__).with_name("text.py")
    was = source.stat()
    os.utime(source, ns=(was.st_atime_ns, was.st_mtime_ns + 1_000_000_000))  # as a pull that changed it would
    try:
        human, warned = daemon.pd("status"), code_warnings()
    finally:
        os.utime(source, ns=(was.st_atime_ns, was.st_mtime_ns))
    assert human.returncode == 0 and "its files have changed since" in human.stdout, human.stdout
    assert len(warned) == 1 and warned[0].endswith("restart it to run this pd's: pd stop && pd start"), warned
    assert code_warnings() == []


def test_autostart_and_no_autostart(tmp_home: Path) -> None:
    env = make_env(tmp_home)
    no_start = subprocess.run([PYTHON, "-m", "portdaddy.cli", "claim", "auto:api", "-q"], env=env,
                              capture_output=True, text=True)  # fmt: skip
    assert no_start.returncode == 3 and "pd start" in no_start.stderr
    env.pop("PORT_DADDY_NO_AUTOSTART")
    d = Daemon(tmp_home, env)
    try:
        assert _claim_proc(env, "auto:api") > 0
    finally:
        subprocess.run([PYTHON, "-m", "portdaddy.cli", "stop"], env=env, capture_output=True, timeout=30)
    with pytest.raises(DaemonUnavailable):
        BlockingClient(d.settings.ipc_sock).connect()


def test_agents_starting_at_once_share_one_auto_started_daemon(tmp_home: Path) -> None:
    """Five agents open their shells and claim before any daemon runs: each auto-starts one, one wins the
    home, the others step aside, and every claim is answered by the winner."""
    env = make_env(tmp_home)
    env.pop("PORT_DADDY_NO_AUTOSTART")
    try:
        with ThreadPoolExecutor(10) as pool:
            ports = list(pool.map(lambda i: _claim_proc(env, f"boot:svc{i % 5}"), range(10)))
        assert ports[:5] == ports[5:] and len(set(ports)) == 5
        status = subprocess.run([PYTHON, "-m", "portdaddy.cli", "status", "--json"], env=env, capture_output=True,
                                text=True, timeout=30)  # fmt: skip
        winner = json.loads(status.stdout)["pid"]
        log = (tmp_home / "daemon.log").read_text()
        assert set(re.findall(r"\(pid (\d+)\)", log)) <= {str(winner)}, log  # the losers stood aside for it
    finally:
        subprocess.run([PYTHON, "-m", "portdaddy.cli", "stop"], env=env, capture_output=True, timeout=30)


def test_pd_start_returns_once_http_answers_too(tmp_home: Path) -> None:
    """IPC answers first (auto-start waits for that alone); ``pd start`` also waits out HTTP's slower start."""
    env = make_env(tmp_home)
    try:
        started = subprocess.run([PYTHON, "-m", "portdaddy.cli", "start", "--json"], env=env, capture_output=True,
                                 text=True, timeout=60)  # fmt: skip
        assert started.returncode == 0, started.stderr
        assert json.loads(started.stdout)["http"] == "ready"
        uds = str(Daemon(tmp_home, env).settings.http_sock)
        with httpx.Client(transport=httpx.HTTPTransport(uds=uds), base_url="http://x") as c:
            assert c.get("/health").json()["http"] == "ready"
    finally:
        subprocess.run([PYTHON, "-m", "portdaddy.cli", "stop"], env=env, capture_output=True, timeout=30)


def test_start_stop_and_status_say_alike_what_became_of_port_daddy(tmp_home: Path) -> None:
    """pd start said "Port Daddy running", pd stop "Daemon stopped", pd version "Daemon not running": one
    wording for the daemon's life (spec/decisions.md, "The CLI's conventions")."""
    env = make_env(tmp_home)

    def run_pd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PYTHON, "-m", "portdaddy.cli", *args], env=env, capture_output=True, text=True,
                              timeout=60)  # fmt: skip

    try:
        started = run_pd("start")
        pid = json.loads(run_pd("status", "--json").stdout)["pid"]
        assert started.stdout == f"Port Daddy started (pid {pid}) in {tmp_home}\n", started
        assert run_pd("start").stdout == f"Port Daddy is already running (pid {pid}) in {tmp_home}\n"
        assert run_pd("status").stdout.startswith(f"Port Daddy {portdaddy.__version__} is running (pid {pid}, up ")
        version = run_pd("version").stdout.splitlines()
        assert version[0] == f"pd {portdaddy.__version__}", version
        assert version[1].startswith(f"Port Daddy {portdaddy.__version__} is running (pid {pid}, up "), version
    finally:
        stopped = run_pd("stop")
    assert stopped.stdout == f"Port Daddy stopped (pid {pid}) in {tmp_home}\n", stopped
    assert run_pd("stop").stdout == f"Port Daddy is not running in {tmp_home}\n"
    assert run_pd("status").stderr.startswith("Port Daddy is not running: ")
    assert run_pd("version").stdout == f"pd {portdaddy.__version__}\nPort Daddy is not running\n"


def test_pd_import_path_is_light() -> None:
    r = subprocess.run([PYTHON, "-X", "importtime", "-m", "portdaddy.cli", "--help"], capture_output=True,
                       text=True, env={**os.environ, "PORT_DADDY_NO_AUTOSTART": "1"})  # fmt: skip
    modules = {line.split("|")[-1].strip().split(".")[0] for line in r.stderr.splitlines() if "|" in line}
    assert "click" in modules
    assert not modules & {"trio", "quart", "quart_trio", "hypercorn", "apsw", "nacl"}


_START_AND_LIST_MODULES = """
import sys, trio
from portdaddy.config import Settings
from portdaddy.daemon import run_daemon

async def main():
    async with trio.open_nursery() as nursery:
        await nursery.start(run_daemon, Settings.from_env())
        nursery.cancel_scope.cancel()

trio.run(main)
print(" ".join(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_daemon_start_path_leaves_yaml_and_nacl_unloaded(tmp_home: Path) -> None:
    """Start-to-healthy is mostly imports: PyYAML (fleet files) and PyNaCl (sealed notes) load on first use."""
    r = subprocess.run([PYTHON, "-c", _START_AND_LIST_MODULES], env=make_env(tmp_home), capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    modules = set(r.stdout.split())
    assert {"trio", "apsw", "portdaddy"} <= modules  # it did start
    assert not modules & {"yaml", "nacl", "croniter"}


def test_colon_shortcut_claims(daemon: Daemon) -> None:
    r = daemon.pd("shortcut:api", "-q")
    assert r.returncode == 0 and r.stdout.strip().isdigit()


def test_reclaim_last_seen_is_written_behind_and_kept_on_shutdown(fresh_daemon: Daemon) -> None:
    d = fresh_daemon
    d.call("port.claim", id="seen:api")
    first = d.call("port.get", id="seen:api")["service"]["lastSeen"]
    time.sleep(0.01)
    d.call("port.claim", id="seen:api")  # nothing changes but last_seen: answered from memory
    touched = d.call("port.get", id="seen:api")["service"]["lastSeen"]
    assert touched > first
    d.restart()  # SIGTERM: the write-behind flushes on the way out
    assert d.call("port.get", id="seen:api")["service"]["lastSeen"] == touched
