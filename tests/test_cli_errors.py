"""How ``pd`` fails: one ``error:`` line (or one JSON object under ``--json``), the exit code of its class,
never a traceback, whatever the mistake: bad usage, a home it cannot use, values the wire cannot carry."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import PYTHON, Daemon, linked_worktree, make_env

from portdaddy.launcher import START_TIMEOUT_S
from portdaddy.procfs import seconds_running


def pd(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "portdaddy.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60, cwd=cwd)  # fmt: skip


def one_error_line(r: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert r.returncode == code, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert all(w in r.stderr for w in words), r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(("args", "words"), [
    (["claim"], ["Missing argument 'IDENTITY'", "see pd claim --help"]),
    (["claim", "-myapp:api"], ["No such option '-m'"]),
    (["nosuch"], ["No such command 'nosuch'"]),
    (["claim", "a:b", "--port", "many"], ["'many' is not a valid integer"]),
    (["fleet", "init", "--no-hook", "-C", "/nonexistent/dir"], ["'/nonexistent/dir' does not exist"]),
    (["begin"], ["say what this agent is about to do"]),
    # click lays a choice out over lines and tabs: one readable line, not escaped \n\t
    (["pheromone", "spray", "x"], ["Missing option '--table' / '-t'. Choose from: services, projects,"]),
])  # fmt: skip
def test_bad_usage_is_one_line_or_one_json_object(tmp_home: Path, args: list[str], words: list[str]) -> None:
    env = make_env(tmp_home)
    one_error_line(pd(env, *args), 2, *words)
    r = pd(env, *args, "--json")
    assert r.returncode == 2 and r.stderr == ""
    body = json.loads(r.stdout)
    assert body["success"] is False and body["error"] == "VALIDATION_ERROR" and words[0] in body["message"]


def test_a_group_without_a_command_shows_its_help(tmp_home: Path) -> None:
    for args in ([], ["agent"]):
        r = pd(make_env(tmp_home), *args)
        assert r.returncode == 0 and r.stdout.startswith("Usage: pd") and "Commands:" in r.stdout


def test_a_home_the_daemon_cannot_live_in_is_named_with_the_fix(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("")
    env = make_env(afile, PORT_DADDY_NO_AUTOSTART="")
    one_error_line(pd(env, "claim", "a:b", "-q"), 3, "is a file, not a directory")
    status = pd(env, "status")
    assert status.returncode == 3 and "point PORT_DADDY_HOME at a directory" in status.stdout + status.stderr
    deep = tmp_path / ("x" * 110)
    env = make_env(deep, PORT_DADDY_NO_AUTOSTART="")
    one_error_line(pd(env, "start"), 3, "Unix sockets allow 107", "use a shorter PORT_DADDY_HOME")
    assert not deep.exists()  # refused before anything was created


def test_values_the_wire_cannot_carry_are_bad_input(daemon: Daemon) -> None:
    one_error_line(daemon.pd("pub", "wire:x", "100000000000000000000"), 2, "outside 64 bits")
    one_error_line(daemon.pd("tuple", "out", "[100000000000000000000]"), 2, "outside 64 bits")
    one_error_line(daemon.pd("notes", "--limit", "100000000000000000000"), 2)
    one_error_line(daemon.pd("pub", "wire:x", "1e999"), 2, "not NaN or Infinity")
    assert daemon.call("msg.history", channel="wire:x")["messages"] == []


def _on_a_terminal(d: Daemon, *args: str, stream: str = "stdout") -> bytes:
    """What ``pd args`` writes to ``stream`` (stdout or stderr) when that stream is a terminal."""
    import os
    import pty

    master, slave = pty.openpty()
    streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, stream: slave}
    proc = subprocess.Popen([PYTHON, "-m", "portdaddy.cli", *args], env=d.env, cwd=d.workdir, **streams)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=30)
    os.close(master)
    return out


def test_text_from_other_agents_cannot_drive_your_terminal(daemon: Daemon) -> None:
    hostile = "retitled\x1b]0;owned\x07 and \x1b[2Joverwritten\rline"
    daemon.call("msg.publish", channel="tty:x", payload=hostile)
    shown = _on_a_terminal(daemon, "history", "tty:x")
    assert b"\x1b" not in shown and b"\x07" not in shown and b"\\x1b]0;owned\\x07" in shown
    piped = daemon.pd("history", "tty:x", "--json")
    assert json.loads(piped.stdout)["messages"][0]["payload"] == hostile  # the data itself is unchanged


def test_stored_controls_are_shown_escaped_wherever_pd_prints_for_people(fresh_daemon: Daemon, tmp_path: Path) -> None:
    """A purpose stored before the daemon refused control characters reached terminals anyway: through piped
    stdout (``pd session list | less -R``) and through stderr, where the conflict warning quotes it; only a
    terminal stdout was guarded. Line breaks and tabs stay; --json stays exact."""
    d = fresh_daemon
    alpha, beta = linked_worktree(tmp_path, "alpha"), linked_worktree(tmp_path, "beta")
    started = d.pd("session", "start", "placeholder", "--files", "db.sql", cwd=alpha, env={"PORT_DADDY_AGENT": "a"})
    assert started.returncode == 0, started.stderr
    d.call("note.add", sessionId=json.loads(d.pd("session", "list", "--json").stdout)["sessions"][0]["id"],
           content="first\r\nsecond\tthird\rover")  # fmt: skip
    d.stop()
    hostile = "Schema\x1b]0;owned\x07 \x1b[2Jwiped\x7f\x9b"
    with sqlite3.connect(d.settings.db) as db:
        db.execute("UPDATE sessions SET purpose = ?", (hostile,))
    d.start()
    escaped = "Schema\\x1b]0;owned\\x07 \\x1b[2Jwiped\\x7f\\x9b"
    listed = d.pd("session", "list")
    conflict = d.pd("session", "start", "Mine", "--files", "db.sql", cwd=beta, env={"PORT_DADDY_AGENT": "b"})
    assert conflict.returncode == 1 and conflict.stderr.startswith("Warning: db.sql claimed by"), conflict.stderr
    for text in (listed.stdout, conflict.stderr):
        assert escaped in text and not {"\x1b", "\x07", "\x7f", "\x9b"} & set(text), text
    notes = d.pd("notes").stdout
    assert "first\nsecond\tthird\\x0dover" in notes and "\r" not in notes, notes
    assert json.loads(d.pd("session", "list", "--json").stdout)["sessions"][0]["purpose"] == hostile


def test_pd_stop_shows_a_spinner_while_the_daemon_takes_its_time(daemon_factory) -> None:
    """A daemon stops its agents before it exits, each given its grace period: pd stop sat silent meanwhile."""
    d = daemon_factory(PORT_DADDY_FLEET_GRACE="2s")
    assert d.pd("spawn", "-b", "custom", "--", "trap '' TERM; sleep 60").returncode == 0  # waits out its grace
    shown = _on_a_terminal(d, "stop", stream="stderr")
    assert b"stopping Port Daddy (pid " in shown and shown.endswith(b"\r"), shown  # and cleared after
    assert d.pd("status").returncode == 3


def test_a_refusal_under_json_is_a_json_refusal(daemon: Daemon) -> None:
    r = daemon.pd("tuple", "rd", '["nothing-here"]', "--json")
    assert r.returncode == 1 and json.loads(r.stdout) == {
        "success": False, "error": "NOT_FOUND", "message": 'no tuple matches ["nothing-here"]; wait for one with '
        "--wait, or see what there is with pd tuple scan"}  # fmt: skip


def test_a_timeout_means_waiting(daemon: Daemon) -> None:
    daemon.call("lock.acquire", name="cli:timed", owner="someone-else")
    r = daemon.pd("lock", "cli:timed", "--timeout", "300ms")  # no --wait: the timeout says how long to wait
    one_error_line(r, 1, "was not free within 0.3s", "held by someone-else", "wait longer with --timeout")
    waited = daemon.pd("wait", "cli:never", "--timeout", "200ms")
    one_error_line(waited, 1, "no message on cli:never within 0.2s; wait longer with --timeout")
    taken = daemon.pd("tuple", "in", '["cli-never"]', "--timeout", "200ms")
    one_error_line(taken, 1, "no tuple matched within 0.2s; wait longer with --timeout")


def test_a_daemon_that_does_not_answer_is_unreachable_and_status_says_why(fresh_daemon: Daemon) -> None:
    pid = fresh_daemon.proc.pid
    fresh_daemon.proc.send_signal(signal.SIGSTOP)  # it still takes connections (the kernel does), answers none
    try:
        # Each waits out its timeout (3 s for status, 10 s for the claim): side by side, not one after another.
        with ThreadPoolExecutor() as pool:
            waits = [pool.submit(fresh_daemon.pd, *args) for args in (("status",), ("status", "--json"),
                                                                      ("claim", "stuck:api", "-q"))]  # fmt: skip
            status, status_json, claim = (w.result() for w in waits)
        assert status.returncode == 3, status.stderr
        assert f"is not answering: process {pid} is stopped" in status.stderr
        assert f"fix: kill -CONT {pid}" in status.stderr
        as_json = json.loads(status_json.stdout)
        assert as_json["running"] is True and as_json["fix"] == f"kill -CONT {pid}"
        # Any command: pd waits longer than the operation would, so no reply is an unreachable daemon, not a
        # refusal (it was exit 1, "no reply to port.claim within 10s").
        one_error_line(claim, 3, "no reply to port.claim within 10s", "pd status says why",
                       "wait longer with PORT_DADDY_TIMEOUT=1m")  # fmt: skip
    finally:
        fresh_daemon.proc.send_signal(signal.SIGCONT)
    assert fresh_daemon.pd("status").returncode == 0


def test_a_daemon_that_exited_but_is_not_reaped_is_gone_to_stop_and_status(fresh_daemon: Daemon) -> None:
    """Where nobody reaps it (a container whose init does not), an exited daemon stays a zombie, which still
    takes signals: pd stop waited 10 s for it and failed ("kill it with: kill -9"), and pd status called it
    running but not answering. The test process is the daemon's parent and reaps it only when told."""
    d = fresh_daemon
    assert d.proc is not None
    pid = d.proc.pid
    stopped = d.pd("stop")
    assert stopped.returncode == 0 and f"Port Daddy stopped (pid {pid})" in stopped.stdout, stopped.stderr
    assert Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    (d.home / "daemon.pid").write_text(f"{pid}\n")  # as a SIGKILL leaves it
    status = d.pd("status")
    assert status.returncode == 3 and f"pid file names process {pid}, which is gone" in status.stderr, status.stderr
    assert "fix: pd start" in status.stderr


def test_a_daemon_whose_socket_is_gone_is_not_answering_and_autostart_says_why(aged_daemon: Daemon) -> None:
    """With its IPC socket deleted, the daemon runs on and nothing reaches it. pd status said "not running:
    process N is running but …"; a pd that auto-started waited 15 s (its daemon stepping aside for the one that
    holds the home) and said only "the daemon did not become healthy in 15s"; pd stop, the fix both give, said
    "not running" and stopped nothing."""
    d = aged_daemon
    assert d.proc is not None
    d.settings.ipc_sock.unlink()
    status = d.pd("status")
    header = f"Port Daddy is not answering: process {d.proc.pid} runs but {d.settings.ipc_sock} is missing"
    assert status.returncode == 3 and status.stderr.startswith(header), status.stderr
    assert json.loads(d.pd("status", "--json").stdout)["running"] is True
    # A daemon that may still be starting is waited for (two clients can auto-start at once); one that has run
    # longer than a start may take is not: the answer comes at once, not after the 15 s the wait allows (run
    # alone, this test waits here until the daemon's process is that old).
    time.sleep(max(0.0, START_TIMEOUT_S + 0.5 - (seconds_running(d.proc.pid) or 0.0)))
    started = time.monotonic()
    auto = d.pd("claim", "gone:api", "-q", env={"PORT_DADDY_NO_AUTOSTART": ""})
    assert time.monotonic() - started < START_TIMEOUT_S / 3
    one_error_line(auto, 3, f"a daemon holds {d.home} but does not answer: process {d.proc.pid} runs but",
                   "fix: pd stop && pd start")  # fmt: skip
    stopped = d.pd("stop")  # the fix given must work: pd stop said "not running" and left it there
    assert stopped.returncode == 0 and f"Port Daddy stopped (pid {d.proc.pid})" in stopped.stdout, stopped
    assert d.pd("status").stderr.startswith("Port Daddy is not running")


def test_port_daddy_timeout_is_how_long_pd_waits_for_the_reply(fresh_daemon: Daemon) -> None:
    """How long pd waited for a reply was fixed in the code (10 s; 20 s for a webhook test, 300 s to stop a
    run): a slow machine had no say. PORT_DADDY_TIMEOUT sets it, on the fast claim path and through click."""
    d, impatient, patient = fresh_daemon, {"PORT_DADDY_TIMEOUT": "1s"}, {"PORT_DADDY_TIMEOUT": "1m"}
    d.proc.send_signal(signal.SIGSTOP)
    try:
        with ThreadPoolExecutor() as pool:
            started = time.monotonic()  # the impatient give up after 1 s (their requests are taken when it wakes)
            impatients = [pool.submit(d.pd, *args, env=impatient) for args in (("claim", "slow:api", "-q"),
                                                                               ("lock", "slow-lock"))]  # fmt: skip
            waiting = [pool.submit(d.pd, *args, env=patient) for args in (("claim", "slow:api", "-q"),
                                                                         ("lock", "patient-lock", "-q"))]  # fmt: skip
            for r in (w.result() for w in impatients):
                one_error_line(r, 3, "within 1s", "PORT_DADDY_TIMEOUT=1m")
            assert time.monotonic() - started < 8  # not the default 10 s
            time.sleep(max(0.0, started + 3 - time.monotonic()))  # three times what failed above
            assert not any(w.done() for w in waiting)
            d.proc.send_signal(signal.SIGCONT)
            claimed, locked = (w.result() for w in waiting)
    finally:
        d.proc.send_signal(signal.SIGCONT)
    port = d.call("port.get", id="slow:api")["service"]["port"]
    assert claimed.returncode == 0 and claimed.stdout.strip() == str(port)
    assert locked.returncode == 0, locked.stderr


@pytest.mark.parametrize(("value", "why"), [("60", "is 60 ms"), ("soon", "is not a duration"), ("2d", "is over a day")])
def test_a_bad_port_daddy_timeout_is_one_line_and_changes_nothing(daemon: Daemon, value: str, why: str) -> None:
    for args in (("claim", "never:api", "-q"), ("claim", "never:api")):  # the fast path, then click's
        one_error_line(daemon.pd(*args, env={"PORT_DADDY_TIMEOUT": value}), 2, f"PORT_DADDY_TIMEOUT={value!r} {why}",
                       "e.g. PORT_DADDY_TIMEOUT=60s")  # fmt: skip
    assert daemon.call("port.find", pattern="never:*")["services"] == []


def _into_a_closed_pipe(d: Daemon, *args: str, unbuffered: str) -> subprocess.CompletedProcess[str]:
    """``pd ARGS | head -1`` once head has its line and is gone: every write to stdout fails (EPIPE)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([PYTHON, "-m", "portdaddy.cli", *args], env={**d.env, "PYTHONUNBUFFERED": unbuffered},
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=60, cwd=d.workdir)  # fmt: skip
    finally:
        os.close(write)


@pytest.mark.parametrize("unbuffered", ["1", ""])  # stdout written as pd prints, or (a pipe's default) at exit
@pytest.mark.parametrize(("args", "code"), [
    (("claim", "piped:api", "-q"), 0), (("claim", "piped:api"), 0), (("log",), 0), (("log", "--json"), 0),
    (("status",), 0), (("sub", "piped:*", "--once"), 0), (("--help",), 0), ((), 0),
    (("tuple", "rd", '["piped-none"]', "--json"), 1),  # a refusal nobody reads is a refusal still
])  # fmt: skip
def test_a_reader_that_stops_reading_ends_pd_quietly(daemon: Daemon, args: tuple[str, ...], code: int,
                                                     unbuffered: str) -> None:  # fmt: skip
    """``pd notes | head -1`` exited 1, which says "refused", and the fast claim path 120 with a traceback. What
    was asked was done and the reader has what it wanted: exit 0, nothing on stderr (spec/decisions.md)."""
    daemon.call("msg.publish", channel="piped:signal", payload={"ready": True})  # what pd sub prints first
    r = _into_a_closed_pipe(daemon, *args, unbuffered=unbuffered)
    assert (r.returncode, r.stderr) == (code, ""), args


@pytest.mark.parametrize("value", ["bad id!", "bad\x1bid", "a" * 101])
def test_a_bad_agent_id_in_the_environment_is_named_with_the_fix(daemon: Daemon, value: str) -> None:
    """The daemon refused it as "agent id 'bad id!' has characters outside …", not saying where pd had it from,
    which the daemon cannot know and pd does. On the fast claim path and through click alike."""
    env = {"PORT_DADDY_AGENT": value}
    refused = [daemon.pd(*args, env=env) for args in (("claim", "envagent:api", "-q"), ("claim", "envagent:api"),
                                                       ("whoami",))]  # fmt: skip
    for r in refused:
        one_error_line(r, 2, "the PORT_DADDY_AGENT environment variable is not a valid agent id: agent id ",
                       "set it to one (e.g. export PORT_DADDY_AGENT=backend) or unset it")  # fmt: skip
    assert len({r.stderr for r in refused}) == 1
    alias = daemon.pd("whoami", env={"AGENT_ID": value})  # the original's name for it
    one_error_line(alias, 2, "the AGENT_ID environment variable", "export AGENT_ID=backend")
    as_json = json.loads(daemon.pd("whoami", "--json", env=env).stdout)
    assert as_json["error"] == "VALIDATION_ERROR" and "PORT_DADDY_AGENT" in as_json["message"]
    assert daemon.call("port.find", pattern="envagent:*")["services"] == []
    # A refusal of anything else is not blamed on a good one.
    other = daemon.pd("claim", "bad!:api", "-q", env={"PORT_DADDY_AGENT": "fine-agent"})
    one_error_line(other, 2, "bad!:api")
    assert "PORT_DADDY_AGENT" not in other.stderr


@pytest.mark.parametrize("args", [
    ("sub", "envagent:signal"), ("sub", "envagent:signal", "--once", "--json"),
    ("watch", "envagent:signal", "--exec", "true"), ("with-lock", "envagent-with", "--", "true"),
    ("lock", "envagent-lock"), ("session", "start", "envagent", "src/envagent.py"),
])  # fmt: skip
def test_commands_with_a_connection_of_their_own_send_the_agent_id_from_the_environment(
    daemon: Daemon, args: tuple[str, ...]
) -> None:
    """pd sub and pd watch held their connection waiting, as no agent, and pd with-lock took the lock with 'bad
    id!' as its owner, where pd lock said the variable is wrong; with AGENT_ID every command did."""
    daemon.call("msg.publish", channel="envagent:signal", payload="retained")  # what sub and watch see first
    for var in ("PORT_DADDY_AGENT", "AGENT_ID"):
        r = daemon.pd(*args, env={var: "bad id!"}, timeout=20)
        if "--json" in args:
            assert r.returncode == 2 and var in json.loads(r.stdout)["message"], (var, r.stdout, r.stderr)
        else:
            one_error_line(r, 2, f"the {var} environment variable is not a valid agent id: agent id 'bad id!'",
                           f"set it to one (e.g. export {var}=backend) or unset it")  # fmt: skip
        assert not [lock for lock in daemon.call("lock.list")["locks"] if lock["name"].startswith("envagent-")]
        assert "envagent" not in [s["purpose"] for s in daemon.call("session.list")["sessions"]]


def test_agent_id_names_the_caller_as_port_daddy_agent_does(daemon: Daemon) -> None:
    """AGENT_ID, the original's name, was the caller's agent only where pd read it itself (whoami, pd lock's
    owner): a claim made with it, on the fast path or through click, was nobody's."""
    for var, args in (("PORT_DADDY_AGENT", ("claim", "asagent:fast", "-q")), ("AGENT_ID", ("claim", "asagent:slow")),
                      ("AGENT_ID", ("claim", "asagent:alias", "-q"))):  # fmt: skip
        assert daemon.pd(*args, env={var: "named-by-env"}).returncode == 0
        assert daemon.call("port.get", id=args[1])["service"]["agentId"] == "named-by-env", args
    # The first one set wins, as for every other use of it.
    daemon.pd("claim", "asagent:both", "-q", env={"PORT_DADDY_AGENT": "first", "AGENT_ID": "second"})
    assert daemon.call("port.get", id="asagent:both")["service"]["agentId"] == "first"


@pytest.mark.parametrize(("args", "counted"), [
    (("sub", "interrupted:x"), "subscriptions"), (("watch", "interrupted:x", "--exec", "true"), "subscriptions"),
    (("tuple", "in", '["interrupted"]', "--wait"), "tupleWaiters"),
])  # fmt: skip
def test_ctrl_c_ends_any_wait_with_exit_1(daemon: Daemon, args: tuple[str, ...], counted: str) -> None:
    """pd sub and pd watch exited 130 on Ctrl-C, every other command 1: pd's exit codes are 0 to 3."""
    before = daemon.call("daemon.status")["counts"][counted]
    waiting = subprocess.Popen([PYTHON, "-m", "portdaddy.cli", *args], env=daemon.env, cwd=daemon.workdir,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while daemon.call("daemon.status")["counts"][counted] == before:
            assert time.monotonic() < deadline and waiting.poll() is None, waiting.communicate()
            time.sleep(0.05)
        waiting.send_signal(signal.SIGINT)
        out, err = waiting.communicate(timeout=20)
    finally:
        waiting.kill()
    assert waiting.returncode == 1 and "Traceback" not in err, (out, err)
