"""The fleet against a real daemon: pd fleet validate/init/up/down/status/logs/reset, limits, respawn and the
circuit breaker, no orphans after down, reconciliation after SIGKILL, pd spawn."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, Racers, http, ipc, make_env, pd, race, unix_client

from portdaddy.core.store import Store
from portdaddy.errors import PDError
from portdaddy.fleet.backends import Task, arg_max, with_trigger_context
from portdaddy.fleet.runs import PROMPT_HEAD, PROMPT_TAIL, Run, RunTable, new_id
from tests.fleet_helpers import (
    FAST,
    env_dumper,
    git,
    make_bin,
    make_project,
    path_with,
    pid_alive,
    records,
    wait_for,
)

CHAIN = """
fleet:
  agents:
    qa:
      trigger: git:committed
      backend: claude-cli
      allowedTools: "Read,Grep"
      model: sonnet
      env: {PD_TEST_RECORD: "RECORDS"}
      prompt: "Review {branch} for bugs"
      on_success: publish qa:passed
    tidy:
      trigger: qa:passed
      backend: custom
      command: echo "tidy after $PD_TRIGGER_CHANNEL"
  channels:
    git:committed: commits
    qa:passed: qa ok
"""


def pd_json(d: Daemon, *args: str, **kw: Any) -> Any:
    r = d.pd(*args, "--json", **kw)
    assert r.returncode == 0, r.stderr + r.stdout
    return json.loads(r.stdout)


def runs_of(d: Daemon, project: Path, agent: str | None = None) -> list[dict[str, Any]]:
    return d.call("fleet.runs", projectDir=str(project), agent=agent, limit=500)["runs"]


def finished(d: Daemon, project: Path, agent: str, n: int) -> list[dict[str, Any]]:
    return wait_for(
        lambda: (lambda rs: rs if len(rs) >= n else None)(
            [r for r in runs_of(d, project, agent) if r["status"] not in ("queued", "running")]
        ),
        what=f"{n} {agent} runs",
    )


# --- validate and init (no daemon) ---------------------------------------------------------------------


def test_validate_reports_cycles_yaml_lines_and_missing_backends(tmp_home: Path, daemon: Daemon) -> None:
    bin_dir = make_bin(tmp_home)
    project = make_project(tmp_home, CHAIN)
    ok = daemon.pd("fleet", "validate", "-C", str(project), env={"PATH": path_with(bin_dir)})
    assert ok.returncode == 0, ok.stderr
    assert "2 agents (qa, tidy)" in ok.stdout

    missing = daemon.pd("fleet", "validate", "-C", str(project), env={"PATH": "/usr/bin:/bin"})
    assert missing.returncode == 2
    assert "agent 'qa' uses backend claude-cli but 'claude' is not on PATH" in missing.stderr

    (project / "pd-fleet.yml").write_text(
        "agents:\n"
        "  a: {trigger: x, backend: custom, command: 'true', on_success: publish y}\n"
        "  b: {trigger: y, backend: custom, command: 'true', on_success: publish x}\n"
    )
    cyclic = daemon.pd("fleet", "validate", "-C", str(project), "--json")
    assert cyclic.returncode == 2
    report = json.loads(cyclic.stdout)
    assert report["success"] is False and report["error"] == "VALIDATION_ERROR" and report["valid"] is False
    assert any("cycle: a -> b -> a" in e for e in report["errors"]), report

    (project / "pd-fleet.yml").write_text("agents:\n  a:\n    trigger: x\n   backend: custom\n")
    broken = daemon.pd("fleet", "validate", "-C", str(project))
    assert broken.returncode == 2
    assert "pd-fleet.yml:4: yaml: syntax error" in broken.stderr


def test_up_refuses_an_invalid_fleet_and_changes_nothing(fresh_daemon: Daemon, tmp_home: Path) -> None:
    project = make_project(tmp_home, CHAIN)
    r = fresh_daemon.pd("fleet", "up", "-C", str(project), env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 2
    assert "'claude' is not on PATH" in r.stderr
    (project / "pd-fleet.yml").write_text("agents:\n  a: {trigger: x, backend: claude-cli, prompt: hi}\n"
                                          "  b: {trigger: y, backend: codex, prompt: hi}\n")  # fmt: skip
    two = fresh_daemon.pd("fleet", "up", "-C", str(project), env={"PATH": "/usr/bin:/bin"})
    lines = two.stderr.splitlines()  # one error line per problem, as pd fleet validate prints them
    assert two.returncode == 2 and len(lines) == 2 and all(line.startswith("error: ") for line in lines), lines
    assert "'claude' is not on PATH" in lines[0] and "'codex' is not on PATH" in lines[1]
    assert fresh_daemon.call("fleet.status")["fleets"] == []
    none = fresh_daemon.pd("fleet", "up", "-C", str(tmp_home))
    assert none.returncode == 1 and "pd fleet init" in none.stderr


def test_init_writes_starter_and_merges_existing_hooks(tmp_home: Path, daemon: Daemon) -> None:
    project = tmp_home / "p"
    project.mkdir()
    git(project, "init", "-q")
    hook = project / ".git" / "hooks" / "post-commit"
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text("#!/bin/bash\necho mine\nexit 0\n")
    hook.chmod(0o755)
    r = daemon.pd("fleet", "init", "-C", str(project), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["written"] is True and out["hookAction"] == "merged"
    text = hook.read_text()
    # Ours runs before the existing hook's `exit 0`, which is kept.
    assert text.startswith("#!/bin/bash\n# >>> port-daddy fleet >>>")
    assert text.index("fleet hook post-commit") < text.index("echo mine") < text.index("exit 0")
    assert hook.stat().st_mode & stat.S_IXUSR
    starter_ok = daemon.pd("fleet", "validate", "-C", str(project), env={"PATH": path_with(make_bin(tmp_home))})
    assert starter_ok.returncode == 0, starter_ok.stderr

    again = json.loads(daemon.pd("fleet", "init", "-C", str(project), "--json").stdout)
    assert again["written"] is False and again["hookAction"] == "updated"
    assert hook.read_text().count("# >>> port-daddy fleet >>>") == 1

    hook.write_text("#!/usr/bin/env python3\nprint('py hook')\n")
    hook.chmod(0o755)
    chained = json.loads(daemon.pd("fleet", "init", "-C", str(project), "--json").stdout)
    assert chained["hookAction"] == "chained"
    assert "print('py hook')" in (hook.parent / "post-commit.pd-chained").read_text()
    assert '; then exec "$(dirname "$0")/post-commit.pd-chained" "$@"; fi' in hook.read_text()
    assert chained["hook"] and "PORT_DADDY_HOME=" + str(daemon.home) in hook.read_text()  # not the default home


def test_the_starter_works_in_a_directory_whose_name_is_no_identity(tmp_home: Path, fresh_daemon: Daemon) -> None:
    project = tmp_home / "My Project (v2)"  # a space and brackets: {project} must still make identities
    project.mkdir()
    git(project, "init", "-q")
    assert fresh_daemon.pd("fleet", "init", "--no-hook", "-C", str(project)).returncode == 0
    env = {"PATH": path_with(make_bin(tmp_home))}
    checked = pd_json(fresh_daemon, "fleet", "validate", "-C", str(project), env=env)
    assert checked["valid"] is True and checked["name"] == "My-Project-v2"
    pd_json(fresh_daemon, "fleet", "up", "-C", str(project), env=env)
    [fleet] = fresh_daemon.call("fleet.status")["fleets"]
    assert fleet["harbor"] == "My-Project-v2:fleet"


def test_init_outside_a_git_repository_writes_nothing(tmp_home: Path, daemon: Daemon) -> None:
    plain = tmp_home / "plain"
    plain.mkdir()
    r = daemon.pd("fleet", "init", "-C", str(plain))
    assert r.returncode == 2 and "not inside a git repository" in r.stderr
    assert list(plain.iterdir()) == []  # refused before the fleet file was written


def test_a_disabled_hook_is_chained_but_stays_disabled(tmp_home: Path, daemon: Daemon) -> None:
    project = tmp_home / "p"
    project.mkdir()
    git(project, "init", "-q")
    git(project, "config", "user.email", "t@example.com")
    git(project, "config", "user.name", "Test")
    hook = project / ".git" / "hooks" / "post-commit"
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text("#!/bin/sh\necho disabled-hook-ran\n")
    hook.chmod(0o644)  # not executable: git does not run it
    out = json.loads(daemon.pd("fleet", "init", "--no-hook", "-C", str(project), "--json").stdout)
    assert out["hook"] is None
    out = json.loads(daemon.pd("fleet", "init", "-C", str(project), "--json").stdout)
    assert out["hookAction"] == "chained"
    chained = hook.parent / "post-commit.pd-chained"
    commit = subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "c"], cwd=project, env=daemon.env,
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert commit.returncode == 0 and commit.stdout + commit.stderr == "", commit  # no "Permission denied"
    chained.chmod(0o755)  # enabled again: now it runs
    commit = subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "c2"], cwd=project, env=daemon.env,
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert "disabled-hook-ran" in commit.stdout + commit.stderr


HOOKED = """
fleet:
  limits: {max_concurrent_spawns: 4, max_spawns_per_hour: 100}
  agents:
    qa: {trigger: git:committed, backend: custom, command: "true"}
"""


def _hooked_project(d: Daemon, tmp_home: Path) -> Path:
    project = make_project(tmp_home, HOOKED)
    init = d.pd("fleet", "init", "-C", str(project), "--json")
    assert init.returncode == 0, init.stderr
    pd_json(d, "fleet", "up", "-C", str(project))
    return project


def _commit(project: Path, env: dict[str, str], name: str) -> str:
    (project / name).write_text(name)
    subprocess.run(["git", "add", name], cwd=project, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", name], cwd=project, check=True, env=env, timeout=30)
    return git(project, "rev-parse", "HEAD")


def test_quick_successive_commits_each_reach_the_fleet(daemon_factory: Any, tmp_home: Path) -> None:
    d = daemon_factory(**FAST)
    project = _hooked_project(d, tmp_home)
    # Faster than a backgrounded pd starts: each must still report its own commit, not the last one.
    shas = [_commit(project, d.env, f"c{n}") for n in range(3)]
    runs = finished(d, project, "qa", 3)
    assert sorted(r["trigger"]["payload"]["sha"] for r in runs) == sorted(shas)
    assert {r["trigger"]["payload"]["branch"] for r in runs} == {"main"}


def test_the_hook_pins_a_non_default_home(daemon_factory: Any, tmp_home: Path) -> None:
    d = daemon_factory(**FAST)
    project = _hooked_project(d, tmp_home)
    # A shell without PORT_DADDY_HOME (and a HOME whose ~/.port-daddy has no daemon) still reaches this one.
    elsewhere = tmp_home / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in d.env.items() if k != "PORT_DADDY_HOME"} | {"HOME": str(elsewhere)}
    sha = _commit(project, env, "pinned")
    [run] = finished(d, project, "qa", 1)
    assert run["trigger"]["payload"]["sha"] == sha
    assert not (elsewhere / ".port-daddy").exists()


def test_a_huge_commit_is_announced_with_its_file_list_cut(daemon_factory: Any, tmp_home: Path) -> None:
    d = daemon_factory(**FAST)
    project = _hooked_project(d, tmp_home)
    deep = project / ("long-directory-name-" * 5)
    deep.mkdir()
    for n in range(450):
        (deep / f"{'file-with-a-long-name-' * 3}{n}.txt").write_text("x")
    git(project, "add", ".")
    git(project, "-c", "core.hooksPath=/dev/null", "commit", "-qm", "huge")  # the hook is run below, in front
    r = d.pd("fleet", "hook", "post-commit", "--json", cwd=project)
    assert r.returncode == 0, r.stdout + r.stderr  # was: too large for one IPC frame, silently lost
    [run] = finished(d, project, "qa", 1)
    payload = run["trigger"]["payload"]
    assert payload["fileCount"] == 451 and payload["truncated"] is True  # 450 + pd-fleet.yml
    assert 0 < len(payload["files"]) < 451 and len(json.dumps(payload["files"], separators=(",", ":"))) <= 32_000
    # The run's session says what fired it; the message itself is the run's (was: over the 16 KB a session's
    # metadata may hold, so the run got no session, and its result no note).
    session = d.call("session.get", sessionId=run["sessionId"])["session"]
    assert session["metadata"]["trigger"] == {k: v for k, v in run["trigger"].items() if k != "payload"}
    assert session["metadata"]["trigger"]["channel"] == "git:committed"


# --- running -------------------------------------------------------------------------------------------


def test_run_stand_in_claude_with_prompt_tools_and_identity(daemon_factory: Any, tmp_home: Path) -> None:
    d = daemon_factory(**FAST)
    bin_dir = make_bin(tmp_home)
    project = make_project(tmp_home, CHAIN)
    (project / "pd-fleet.yml").write_text(CHAIN.replace("RECORDS", str(tmp_home / "records")))
    up = pd_json(d, "fleet", "up", "-C", str(project), env={"PATH": path_with(bin_dir)})
    assert [a["name"] for a in up["fleet"]["agents"]] == ["qa", "tidy"]
    run = pd_json(d, "fleet", "run", "qa", "-C", str(project))["run"]
    done = finished(d, project, "qa", 1)
    assert done[0]["status"] == "completed", done
    [rec] = records(tmp_home)
    # The prompt on stdin, not an argument: any local user reads a process's argv (/proc/PID/cmdline, ps).
    assert rec["stdin"] == b"Review main for bugs"  # manual run: no trigger context block
    assert rec["argv"] == ["-p", "--allowedTools", "Read,Grep", "--model", "sonnet"]
    assert rec["env"]["PD_PROMPT"] == "Review main for bugs"  # the environment only its own user can read
    assert rec["env"]["PD_RUN_ID"] == run["id"] == rec["env"]["PORT_DADDY_AGENT"]
    assert rec["env"]["PD_IDENTITY"] == "proj:fleet:qa"

    logs = d.pd("fleet", "logs", "qa", "-C", str(project))
    assert logs.returncode == 0 and "stand-in claude ran: -p" in logs.stdout
    status = pd_json(d, "fleet", "status", "-C", str(project))["fleets"][0]
    qa = next(a for a in status["agents"] if a["name"] == "qa")
    assert qa["lastRun"]["status"] == "completed" and qa["circuit"]["open"] is False


REVIEW = """
agents:
  review:
    trigger: review:go
    backend: claude-cli
    allowedTools: "Read"
    env: {PD_TEST_RECORD: "RECORDS"}
    prompt: |
      Review {branch} for bugs.
      Then say what you found.
  check:
    trigger: review:go
    backend: custom
    command: echo "checking {branch}"; exit 4
"""


def test_show_gives_one_run_in_full_with_the_prompt_it_was_sent(daemon_factory: Any, tmp_home: Path) -> None:
    """pd fleet runs said a run's trigger source and exit code: what its agent was asked, the Trigger context block
    included, no command showed (spec/fleet.md, "What a run was asked")."""
    d = daemon_factory(**FAST)
    bin_dir = make_bin(tmp_home)
    project = make_project(tmp_home, REVIEW.replace("RECORDS", str(tmp_home / "records")))
    pd_json(d, "fleet", "up", "-C", str(project), env={"PATH": path_with(bin_dir)})
    d.call("msg.publish", channel="review:go", payload={"pr": 7, "ask": "look at auth"}, sender="ci")
    [review] = finished(d, project, "review", 1)
    [check] = finished(d, project, "check", 1)
    [rec] = records(tmp_home)
    sent = rec["stdin"].decode()
    assert rec["argv"] == ["-p", "--allowedTools", "Read"]
    assert sent.startswith("Review main for bugs.\nThen say") and "Trigger context:" in sent and "look at auth" in sent

    shown = pd_json(d, "fleet", "show", review["id"])
    assert shown["prompt"] == sent == rec["env"]["PD_PROMPT"] and shown["promptDropped"] == 0
    run = shown["run"]
    assert run["status"] == "completed" and run["exitCode"] == 0 and run["logPath"] and run["endedAt"]
    assert run["trigger"]["payload"] == {"pr": 7, "ask": "look at auth"} and run["trigger"]["sender"] == "ci"
    assert shown["allowedTools"] == "Read" and shown["command"] is None and shown["workdir"] == str(project)
    with unix_client(d) as c:  # the one operation, over HTTP too
        assert c.get(f"/fleet/runs/{review['id']}").json()["prompt"] == sent

    text = d.pd("fleet", "show", review["id"])
    assert text.returncode == 0 and text.stdout.endswith(f"Prompt (as sent):\n{sent}\n"), text.stdout
    assert "Status:   completed, exit 0\n" in text.stdout and "Fired by: channel review:go from ci" in text.stdout
    assert f"Log:      {run['logPath']}\n" in text.stdout
    assert d.pd("fleet", "show", review["id"], "-q").stdout == "completed\n"

    # A custom agent: the command as its shell ran it, the values it refers to, and its PD_PROMPT.
    shown = pd_json(d, "fleet", "show", check["id"])
    assert shown["command"] == 'echo "checking ${PD_BRANCH}"; exit 4' and shown["variables"]["PD_BRANCH"] == "main"
    assert shown["run"]["exitCode"] == 4 and shown["prompt"].startswith("\n\nTrigger context:\n- source: channel")
    text = d.pd("fleet", "show", check["id"]).stdout
    assert "/bin/sh -c" in text and 'echo "checking ${PD_BRANCH}"; exit 4\n' in text and "PD_BRANCH=main" in text

    gone = d.pd("fleet", "show", "fleet-review-00000000")
    assert gone.returncode == 1 and gone.stdout == ""
    assert gone.stderr == "error: no run 'fleet-review-00000000'; list them with pd fleet runs or pd spawned\n"
    refused = json.loads(d.pd("fleet", "show", "fleet-review-00000000", "--json").stdout)
    assert refused["success"] is False and refused["error"] == "NOT_FOUND"


def test_a_long_prompt_is_kept_as_its_start_and_end_with_the_cut_said(daemon_factory: Any, tmp_home: Path) -> None:
    d = daemon_factory(**FAST)
    bin_dir = make_bin(tmp_home)
    task = "Start here.\n" + "".join(f"step {n}: check it\n" for n in range(5000)) + "End here."
    assert PROMPT_HEAD + PROMPT_TAIL < len(task) <= 100_000
    with unix_client(d) as c:  # over HTTP (pd spawn sends it over IPC in parts: test_ipc_limits.py)
        run = c.post("/spawn", json={"backend": "claude-cli", "task": task, "path": path_with(bin_dir),
                                     "env": {"PD_TEST_RECORD": str(tmp_home / "records")}}).json()["run"]  # fmt: skip
    assert d.call("spawn.wait", id=run["id"], timeout=20_000)["run"]["status"] == "completed"
    assert records(tmp_home)[0]["stdin"] == task.encode()  # the agent was sent all of it: only what is kept is cut

    shown = pd_json(d, "fleet", "show", run["id"])
    dropped = len(task) - PROMPT_HEAD - PROMPT_TAIL
    assert shown["promptDropped"] == dropped
    marker = (f"\n# {run['id']}: {dropped} characters of the prompt dropped here (a run's stored prompt keeps its "
              f"first {PROMPT_HEAD} and last {PROMPT_TAIL} characters)\n")  # fmt: skip
    assert shown["prompt"] == task[:PROMPT_HEAD] + marker + task[-PROMPT_TAIL:]
    said = d.pd("fleet", "show", run["id"]).stdout
    assert f"Prompt (as sent; {dropped:,} characters cut from its middle):\nStart here." in said


BIG_PROMPT = """
agents:
  review:
    trigger: review:go
    backend: claude-cli
    allowedTools: "Read"
    env: {PD_TEST_RECORD: "RECORDS"}
    prompt: |
PROMPT
  small:
    trigger: review:go
    backend: claude-cli
    env: {PD_TEST_RECORD: "RECORDS"}
    prompt: "Say hello"
"""


def _long_text(lines: int) -> str:
    """Text of several bytes a character (what a 128 KiB limit counts), as a prompt block's indented lines."""
    return "".join(f"      Step {n}: vérifie le café, 日本語のテキスト — then go on.\n" for n in range(lines))


def _unindented(block: str) -> str:
    """The prompt a ``prompt: |`` block of ``_long_text`` lines gives (the file's text is stripped)."""
    return "".join(line[6:] for line in block.splitlines(keepends=True)).strip()


def test_a_prompt_goes_on_stdin_whatever_its_size(daemon_factory: Any, tmp_home: Path) -> None:
    """Linux refuses an argument or environment string over 128 KiB: such a prompt made the run fail to start; and
    any local user reads an argument (spec/fleet.md, "The prompt goes on stdin")."""
    d = daemon_factory(**FAST)
    bin_dir = make_bin(tmp_home)
    block = _long_text(4300)
    config = BIG_PROMPT.replace("RECORDS", str(tmp_home / "records")).replace("PROMPT\n", block)
    project = make_project(tmp_home, config)
    pd_json(d, "fleet", "up", "-C", str(project), env={"PATH": path_with(bin_dir)})
    d.call("msg.publish", channel="review:go", payload={"diff": "+ added a line"}, sender="ci")
    [review] = finished(d, project, "review", 1)
    [small] = finished(d, project, "small", 1)
    # Was: failed, "cannot start: [Errno 7] Argument list too long: '…/claude'", after it was registered (salvage).
    assert review["status"] == "completed", review["error"]
    assert small["status"] == "completed", small

    shown = pd_json(d, "fleet", "show", review["id"])
    prompt = with_trigger_context(_unindented(block), review["trigger"])
    assert len(prompt.encode()) > 300_000 > len(prompt) > 128 * 1024
    got = {rec["env"]["PD_RUN_ID"]: rec for rec in records(tmp_home)}
    big = got[review["id"]]
    assert big["stdin"] == prompt.encode()  # the whole prompt, byte for byte
    assert big["argv"] == ["-p", "--allowedTools", "Read"] and "PD_PROMPT" not in big["env"]
    assert "Trigger context:" in prompt and "added a line" in prompt
    # Kept as sent (its middle cut, as any long prompt's), whichever way it went.
    dropped = len(prompt) - PROMPT_HEAD - PROMPT_TAIL
    marker = (f"\n# {review['id']}: {dropped} characters of the prompt dropped here (a run's stored prompt keeps its "
              f"first {PROMPT_HEAD} and last {PROMPT_TAIL} characters)\n")  # fmt: skip
    assert shown["prompt"] == prompt[:PROMPT_HEAD] + marker + prompt[-PROMPT_TAIL:]
    assert f"its prompt ({len(prompt.encode()):,} bytes) on stdin" in Path(review["logPath"]).read_text()

    # A prompt that fits goes the same way (never an argument, which any local user can read), and in PD_PROMPT.
    hello = got[small["id"]]
    assert hello["argv"] == ["-p"] and hello["stdin"] == hello["env"]["PD_PROMPT"].encode()
    assert hello["env"]["PD_PROMPT"].startswith("Say hello\n\nTrigger context:")
    assert pd_json(d, "fleet", "show", small["id"])["prompt"] == hello["env"]["PD_PROMPT"]
    said = f"its prompt ({len(hello['stdin']):,} bytes) on stdin"
    assert said in Path(small["logPath"]).read_text()


def test_a_prompt_too_large_for_a_backend_without_stdin_fails_with_the_reason(
    daemon_factory: Any, tmp_home: Path
) -> None:
    """A custom command gets its prompt only in PD_PROMPT: one too large for an environment variable is refused up
    front when the file's own prompt is, and else (a trigger's message made it so) fails with the reason."""
    d = daemon_factory(**FAST)
    out = tmp_home / "ran"
    agent = "agents:\n  qa:\n    trigger: qa:go\n    backend: custom\n    command: touch OUT\n    prompt: |\nPROMPT"
    agent = agent.replace("OUT", str(out))
    near = "      " + "x" * (128 * 1024 - 100) + "\n"  # fits, but not with the Trigger context block a run adds
    project = make_project(tmp_home, agent.replace("PROMPT", near))
    pd_json(d, "fleet", "up", "-C", str(project))
    d.call("msg.publish", channel="qa:go", payload="go", sender="ci")
    [run] = finished(d, project, "qa", 1)
    assert run["status"] == "failed" and run["exitCode"] is None and not out.exists()
    size = len(with_trigger_context(_unindented(near), run["trigger"]).encode())
    assert run["error"] == (f"the prompt is {size:,} bytes; backend custom gets it only in PD_PROMPT, and Linux "
                            "refuses an environment variable over 128 KiB: shorten it, or put its long part in a file "
                            "the command reads")  # fmt: skip
    assert Path(run["logPath"]).read_text() == f"# {run['id']}: not started: {run['error']}\n"
    assert run["sessionId"] is None  # never registered: nothing went to salvage

    (project / "pd-fleet.yml").write_text(agent.replace("PROMPT", _long_text(3000)))
    refused = d.pd("fleet", "up", "-C", str(project))
    assert refused.returncode == 2 and "pd-fleet.yml:6: agents.qa.prompt: is " in refused.stderr, refused.stderr
    assert "backend custom gets it only in PD_PROMPT" in refused.stderr


def _env_values(total: int, prefix: str) -> dict[str, str]:
    """``env:`` values, each under 128 KiB, whose ``NAME=value`` strings, NULs and pointers make ``total`` bytes."""
    values, left, n = {}, total, 0
    while left > 0:
        name = f"{prefix}{n}"
        size = min(left, 120 * 1024)
        values[name] = "v" * max(1, size - len(name) - 2 - 8)  # "=", the NUL, a pointer
        left -= len(name) + len(values[name]) + 2 + 8
        n += 1
    return values


def test_a_run_over_arg_max_in_all_fails_before_it_is_registered(daemon_factory: Any, tmp_home: Path) -> None:
    """Linux also refuses an exec whose arguments and environment together are over ARG_MAX (2 MiB under the usual
    stack limit), each string under 128 KiB: many large env: values made the run fail with E2BIG after it was
    registered. It fails before, saying by how much and what takes most; a backend with its prompt on stdin goes
    without the PD_PROMPT copy that would take it over instead."""
    d = daemon_factory(**FAST)
    bin_dir, limit = make_bin(tmp_home), arg_max()
    big, near = _env_values(limit + 1000, "BIG"), _env_values(limit - 60_000, "NEAR")
    out, prompt = tmp_home / "ran", "p" * 100_000
    flow = lambda env: "{" + ", ".join(f"{k}: {v}" for k, v in env.items()) + "}"  # noqa: E731
    config = (f"agents:\n  qa:\n    trigger: qa:go\n    backend: custom\n    command: touch {out}\n"
              f"    env: {flow(big)}\n"
              f"  review:\n    trigger: qa:go\n    backend: claude-cli\n    prompt: {prompt}\n"
              f"    env: {flow({'PD_TEST_RECORD': str(tmp_home / 'records'), **near})}\n")  # fmt: skip
    project = make_project(tmp_home, config)
    pd_json(d, "fleet", "up", "-C", str(project), env={"PATH": path_with(bin_dir)})
    d.call("msg.publish", channel="qa:go", payload="go", sender="ci")
    [run] = finished(d, project, "qa", 1)
    # Was: failed, "cannot start: [Errno 7] Argument list too long: '/bin/sh'", its agent and session in salvage.
    assert run["status"] == "failed" and run["exitCode"] is None and not out.exists()
    said = re.fullmatch(r"arguments and environment are ([\d,]+) bytes, ([\d,]+) over the ([\d,]+) Linux allows one "
                        r"exec \(ARG_MAX\); its env: values take ([\d,]+) of them: put the large ones in files and "
                        r"pass their paths", run["error"])  # fmt: skip
    assert said is not None, run["error"]
    total, over, allowed, values = (int(n.replace(",", "")) for n in said.groups())
    assert allowed == limit and over == total - limit > 1000 and values == limit + 1000
    assert Path(run["logPath"]).read_text() == f"# {run['id']}: not started: {run['error']}\n"
    assert run["sessionId"] is None  # never registered: no agent, no session, nothing in salvage
    assert run["agentId"] not in json.dumps(d.call("agent.list")) + json.dumps(d.call("salvage.list", all=True))

    [review] = finished(d, project, "review", 1)
    assert review["status"] == "completed", review["error"]
    [rec] = records(tmp_home)
    assert rec["stdin"].startswith(prompt.encode()) and "PD_PROMPT" not in rec["env"]


# Who a caller is, as the shell that starts the daemon may have it (an agent's shell): none of it may reach the
# daemon's agents, or each of them would act as that caller.
CALLER = {"PORT_DADDY_AGENT": "agent-of-that-shell", "PORT_DADDY_SESSION": "session-of-that-shell",
          "AGENT_ID": "old-style-agent", "PD_FLEET": "another-fleet", "PD_PROJECT_DIR": "/another/project",
          "PD_LOCK_TOKEN": "7"}  # fmt: skip


def _dumped_env(d: Daemon, tmp_home: Path) -> dict[str, str]:
    """The environment a spawned custom agent ran with (``pd spawn … -- dump-env FILE``, in ``d``'s env)."""
    out = tmp_home / "spawn-env.json"
    r = d.pd("spawn", "-b", "custom", "--wait", "--", f"{env_dumper(tmp_home)} {out}", cwd=tmp_home)
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text())


def test_pd_auto_starting_the_daemon_does_not_hand_it_who_the_caller_is(tmp_home: Path) -> None:
    env = make_env(tmp_home, **CALLER, FROM_THAT_SHELL="kept")
    env.pop("PORT_DADDY_NO_AUTOSTART")
    d = Daemon(tmp_home, env)
    try:
        agent_env = _dumped_env(d, tmp_home)  # this pd starts the daemon
        pid = pd_json(d, "status")["pid"]
        daemon_env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if item)
    finally:
        d.pd("stop")
    assert not CALLER.keys() & daemon_env.keys()  # was: all of them, for every agent it would start
    assert daemon_env["FROM_THAT_SHELL"] == "kept" and daemon_env["PORT_DADDY_HOME"] == str(tmp_home)
    assert not {k for k, v in CALLER.items() if agent_env.get(k) == v}


def test_an_agent_is_itself_whoever_started_the_daemon(daemon_factory: Any, tmp_home: Path) -> None:
    """A daemon started by hand from an agent's shell has that agent's variables: its agents get none of them, but
    the rest of its environment, then their own env:, then who they are (which env: cannot change)."""
    d = daemon_factory(**FAST, **CALLER, FROM_THAT_SHELL="kept")
    out = tmp_home / "fleet-env.json"
    project = make_project(tmp_home, f"""
        agents:
          dump:
            trigger: work
            backend: custom
            env: {{PD_MINE: own, PORT_DADDY_AGENT: not-me}}
            command: {env_dumper(tmp_home)} {out}
        """)  # fmt: skip
    pd_json(d, "fleet", "up", "-C", str(project))
    d.call("fleet.run", projectDir=str(project), agent="dump")
    [run] = finished(d, project, "dump", 1)
    assert run["status"] == "completed", run
    env = json.loads(out.read_text())
    assert not {k for k, v in CALLER.items() if env.get(k) == v}  # was: AGENT_ID and PD_LOCK_TOKEN
    assert (env["PORT_DADDY_AGENT"], env["PORT_DADDY_SESSION"]) == (run["id"], run["sessionId"])
    assert (env["PD_FLEET"], env["PD_PROJECT_DIR"]) == ("proj", str(project))
    assert (env["PD_MINE"], env["FROM_THAT_SHELL"], env["PORT_DADDY_HOME"]) == ("own", "kept", str(tmp_home))

    spawned = _dumped_env(d, tmp_home)  # was: PD_FLEET and PD_PROJECT_DIR too, a spawn having neither of its own
    assert not {k for k, v in CALLER.items() if spawned.get(k) == v}
    assert not {"PD_FLEET", "PD_PROJECT_DIR", "AGENT_ID"} & spawned.keys()


# A command where every template value stands in a different shell context.
SHOW_ARGS = """
agents:
  show:
    trigger: work
    backend: custom
    command: >-
      {project_dir}/args.sh {project_dir} "in {project_dir}" 'sq '{project_dir} {branch}
      "$(printf %s {project_dir})" {project}
"""


def test_template_values_in_a_command_are_one_word_whatever_they_hold(daemon_factory: Any, tmp_home: Path) -> None:
    d = daemon_factory(**FAST)
    name, branch = "it's a $(touch pwned)", "x'$(touch${IFS}pwned);touch${IFS}pwned"  # git takes that branch name
    project = make_project(tmp_home, SHOW_ARGS, name=name)
    git(project, "symbolic-ref", "HEAD", f"refs/heads/{branch}")
    (project / "args.sh").write_text('#!/bin/sh\nfor a in "$@"; do printf \'[%s]\\n\' "$a"; done\n')
    (project / "args.sh").chmod(0o755)
    pd_json(d, "fleet", "up", "-C", str(project))  # its program, {project_dir}/args.sh, is found up front
    d.call("fleet.run", projectDir=str(project), agent="show")
    [run] = finished(d, project, "show", 1)
    assert run["status"] == "completed", run  # was: failed, the values pasted into the command unquoted
    output = [line for line in Path(run["logPath"]).read_text().splitlines() if not line.startswith("# ")]
    # {project} is the directory's name made an identity segment; the path keeps every hostile character
    in_each_context = [f"[{project}]", f"[in {project}]", f"[sq {project}]", f"[{branch}]", f"[{project}]"]
    assert output == [*in_each_context, "[it-s-a-touch-pwned]"]
    assert not list(tmp_home.rglob("pwned"))  # nothing in a value ran


SEQ_OUTPUT = "".join(f"{n}\n" for n in range(1, 400_001)).encode()  # what `seq 400000` prints: 2.7 MB


def _kept_start_and_end(run: dict[str, Any]) -> bytes:
    """The stored log of a run that printed SEQ_OUTPUT, checked to be its first 64 KiB and last 448 KiB with a line
    saying what went between (was: all of it kept)."""
    head, tail = 64 * 1024, 448 * 1024
    stored = Path(run["logPath"]).read_bytes()
    header = stored[: stored.index(b"\n") + 1]  # the supervisor's first line, then the output
    assert run["logDropped"] == len(header) + len(SEQ_OUTPUT) - head - tail
    marker = (f"\n# {run['id']}: {run['logDropped']} bytes of output dropped here (a run's log keeps its first "
              f"{head} and last {tail} bytes)\n").encode()  # fmt: skip
    assert stored == (header + SEQ_OUTPUT)[:head] + marker + SEQ_OUTPUT[-tail:]
    return stored


def test_a_long_output_is_stored_as_its_start_and_end_with_the_cut_said(daemon_factory: Any, tmp_home: Path) -> None:
    d = daemon_factory(**FAST)
    project = make_project(tmp_home, "agents:\n  chatty: {trigger: work, backend: custom, command: 'seq 400000'}\n")
    pd_json(d, "fleet", "up", "-C", str(project))
    d.call("fleet.run", projectDir=str(project), agent="chatty")
    [run] = finished(d, project, "chatty", 1)
    assert run["status"] == "completed"
    stored = _kept_start_and_end(run)

    logs = d.pd("fleet", "logs", "chatty", "-C", str(project), "--tail", "1000000")
    assert logs.returncode == 0 and logs.stdout == stored.decode()
    assert f"note: {run['logDropped']:,} bytes of output were cut from the middle" in logs.stderr
    assert "were cut" in d.pd("spawn", "logs", run["id"]).stderr
    short = d.pd("spawn", "-b", "custom", "--wait", "--", "echo short", cwd=tmp_home)
    assert short.returncode == 0 and "were cut" not in d.pd("spawn", "logs", short.stdout.split(":")[0]).stderr


def test_a_real_git_commit_fires_qa_through_the_hook_and_chains_tidy(daemon_factory: Any, tmp_home: Path) -> None:
    d = daemon_factory(**FAST)
    bin_dir = make_bin(tmp_home)
    project = make_project(tmp_home, CHAIN.replace("RECORDS", str(tmp_home / "records")))
    assert d.pd("fleet", "init", "-C", str(project), "--json").returncode == 0  # keeps our pd-fleet.yml
    pd_json(d, "fleet", "up", "-C", str(project), env={"PATH": path_with(bin_dir)})
    (project / "app.py").write_text("print('hi')\n")
    subprocess.run(["git", "add", "app.py"], cwd=project, check=True)
    subprocess.run(["git", "commit", "-qm", "add app"], cwd=project, env=d.env, check=True, timeout=30)
    sha = git(project, "rev-parse", "HEAD")
    [qa] = finished(d, project, "qa", 1)
    assert qa["status"] == "completed" and qa["trigger"]["channel"] == "git:committed"
    assert qa["trigger"]["payload"]["sha"] == sha and "app.py" in json.dumps(qa["trigger"]["payload"])
    [rec] = records(tmp_home)
    assert sha in rec["stdin"].decode() and rec["argv"] == ["-p", "--allowedTools", "Read,Grep", "--model", "sonnet"]
    [tidy] = finished(d, project, "tidy", 1)
    assert tidy["status"] == "completed" and tidy["trigger"]["channel"] == "qa:passed"
    # Each run was an agent with a session that ended with its result.
    sessions = d.call("session.list", agent=qa["agentId"], all=True)["sessions"]
    assert [s["status"] for s in sessions] == ["completed"]


def test_crashing_agent_respawns_three_times_then_circuit_opens(daemon_factory: Any, tmp_home: Path) -> None:
    d = daemon_factory(**FAST)
    project = make_project(
        tmp_home,
        """
        agents:
          flaky:
            trigger: work
            backend: custom
            command: echo "attempt $PD_ATTEMPT"; exit 3
            respawn: true
            max_respawns: 3
        channels: {work: work}
    """,
    )
    pd_json(d, "fleet", "up", "-C", str(project))
    pd_json(d, "fleet", "run", "flaky", "-C", str(project))
    wait_for(lambda: d.call("fleet.status", projectDir=str(project))["fleets"][0]["agents"][0]["circuit"]["open"],
             what="the circuit to open")  # fmt: skip
    runs = finished(d, project, "flaky", 4)
    assert sorted(r["attempt"] for r in runs) == [0, 1, 2, 3]
    assert all(r["status"] == "failed" and r["exitCode"] == 3 for r in runs)

    status = d.pd("fleet", "status", "-C", str(project))
    assert "circuit open" in status.stdout and "pd fleet reset flaky" in status.stdout
    refused = d.pd("fleet", "run", "flaky", "-C", str(project))
    assert refused.returncode == 1 and "failures" in refused.stderr
    assert len(runs_of(d, project, "flaky")) == 4  # nothing respawned after the breaker opened

    assert "Circuit of flaky closed" in d.pd("fleet", "reset", "flaky", "-C", str(project)).stdout
    pd_json(d, "fleet", "run", "flaky", "-C", str(project))
    wait_for(lambda: len(runs_of(d, project, "flaky")) >= 5, what="a run after reset")
    d.pd("fleet", "down", "-C", str(project))


def test_limits_queue_a_burst(daemon_factory: Any, tmp_home: Path) -> None:
    d = daemon_factory(**FAST)
    marks = tmp_home / "marks"
    marks.mkdir()
    project = make_project(
        tmp_home,
        f"""
        fleet:
          limits: {{max_concurrent_spawns: 2, max_spawns_per_hour: 6}}
          agents:
            qa:
              trigger: git:committed
              backend: custom
              command: >-
                mkdir {marks}/run-$PD_RUN_ID && ls {marks} | grep -c run- >> {marks}/seen;
                sleep 0.3; rmdir {marks}/run-$PD_RUN_ID
    """,
    )
    pd_json(d, "fleet", "up", "-C", str(project))
    for n in range(10):  # a burst of ten commits, as the git hook announces them
        d.call("msg.publish", channel="git:committed", payload={"sha": f"{n:040x}", "projectDir": str(project)})
    done = finished(d, project, "qa", 6)
    assert all(r["status"] == "completed" for r in done)
    status = d.call("fleet.status", projectDir=str(project))["fleets"][0]
    assert status["queued"] == 4 and status["running"] == 0  # the hourly cap holds the rest
    seen = [int(x) for x in (marks / "seen").read_text().split()]
    assert len(seen) == 6 and max(seen) <= 2 and 2 in seen  # never more than two at once, and two did overlap
    down = pd_json(d, "fleet", "down", "-C", str(project))
    assert down["cancelled"] == 4
    assert sorted(r["status"] for r in runs_of(d, project, "qa")).count("cancelled") == 4


def _sleeper_fleet(tmp_home: Path) -> tuple[Path, Path]:
    pids = tmp_home / "pids"
    pids.mkdir()
    # The leader ignores SIGTERM (so the grace period and SIGKILL are needed) and starts a grandchild.
    project = make_project(tmp_home, f"""
        fleet:
          limits: {{max_concurrent_spawns: 3}}
          agents:
            sleeper:
              trigger: work
              backend: custom
              command: >-
                trap '' TERM; echo $$ > {pids}/$PD_RUN_ID.leader;
                sleep 300 & echo $! > {pids}/$PD_RUN_ID.child; wait
        """)  # fmt: skip
    return project, pids


def _recorded_pids(pids: Path, n: int) -> list[int]:
    return wait_for(
        lambda: (lambda ps: ps if len(ps) == 2 * n else None)(
            [int(p.read_text()) for p in pids.iterdir() if p.read_text().strip()]
        ),
        what="child pids",
    )


def test_down_stops_every_child_and_grandchild(daemon_factory: Any, tmp_home: Path) -> None:
    d = daemon_factory(**FAST)
    project, pids = _sleeper_fleet(tmp_home)
    pd_json(d, "fleet", "up", "-C", str(project))
    for _ in range(2):
        d.call("fleet.run", projectDir=str(project), agent="sleeper")
    procs = _recorded_pids(pids, 2)
    assert all(pid_alive(p) for p in procs)
    down = pd_json(d, "fleet", "down", "-C", str(project))
    assert (down["stopped"], down["killed"], down["cancelled"]) == (True, 2, 0)
    assert not [p for p in procs if pid_alive(p)], "orphans left after pd fleet down"
    assert {r["status"] for r in runs_of(d, project)} == {"killed"}
    assert d.call("fleet.status")["fleets"] == []


def test_downs_and_ups_racing_a_down_one_stops_it_and_the_ups_bring_it_back(daemon_factory: Any,
                                                                             tmp_home: Path) -> None:  # fmt: skip
    """`pd fleet down` waits out its children's grace period, and more downs and ups arrive meanwhile, at once.
    The downs reply once it is down and only the first says it stopped anything; the ups start it afresh once
    it is down (they used to reload the fleet about to go, answer "up", and leave nothing up)."""
    d = daemon_factory(**{**FAST, "PORT_DADDY_FLEET_GRACE": "5s"})
    marks = tmp_home / "marks"
    marks.mkdir()
    # It notes SIGTERM and carries on, so the down lasts the grace period, until SIGKILL.
    project = make_project(tmp_home, f"""
        agents:
          stubborn:
            trigger: work
            backend: custom
            command: "echo $$ > {marks}/leader; trap 'touch {marks}/termed' TERM; while :; do sleep 0.1; done"
        """)  # fmt: skip
    where = str(project)
    pd_json(d, "fleet", "up", "-C", where)
    d.call("fleet.run", projectDir=where, agent="stubborn")
    leader = int(wait_for(lambda: (marks / "leader").exists() and (marks / "leader").read_text(), what="a run"))
    with Racers(d, [ipc("fleet.down", projectDir=where)]) as first:
        first.go()
        wait_for(lambda: (marks / "termed").exists(), what="the down under way")
        racers = [ipc("fleet.down", projectDir=where)] * 5 + [pd("fleet", "down", "-C", where, "--json")] * 3
        racers += [ipc("fleet.up", projectDir=where, path=os.environ["PATH"])] * 5
        racers += [http("POST", "/fleet/start", {"projectDir": where})] * 3
        racers += [pd("fleet", "up", "-C", where, "--json")] * 3
        outcomes = race(d, racers)
        [stopper] = first.outcomes()
    assert all(o.code == 0 for o in outcomes), outcomes
    assert (stopper.reply["stopped"], stopper.reply["killed"]) == (True, 1)
    assert [o.reply["stopped"] for o in outcomes[:8]] == [False] * 8
    assert not pid_alive(leader)
    [fleet] = d.call("fleet.status")["fleets"]
    assert fleet["projectDir"] == where and fleet["running"] == 0
    assert {o.reply["fleet"]["upAt"] for o in outcomes[8:]} == {fleet["upAt"]}, "an up answered with the old fleet"
    d.call("fleet.run", projectDir=where, agent="stubborn")  # it is live: it runs
    wait_for(lambda: d.call("fleet.status")["fleets"][0]["running"] == 1, what="a run of the fleet brought back")
    d.restart()
    assert [f["projectDir"] for f in d.call("fleet.status")["fleets"]] == [where]  # and it is up for good
    d.call("fleet.down", projectDir=where)


def test_sigkill_while_running_is_reconciled_after_restart(daemon_factory: Any, tmp_home: Path) -> None:
    d = daemon_factory(**FAST)
    project, pids = _sleeper_fleet(tmp_home)
    pd_json(d, "fleet", "up", "-C", str(project))
    run = d.call("fleet.run", projectDir=str(project), agent="sleeper")["run"]
    procs = _recorded_pids(pids, 1)
    d.kill9()
    assert all(pid_alive(p) for p in procs)  # the children outlived the daemon ...
    d.start()
    assert not [p for p in procs if pid_alive(p)]  # ... until the restarted daemon reconciled them
    [after] = runs_of(d, project)
    assert after["id"] == run["id"] and after["status"] == "lost"
    status = d.call("fleet.status", projectDir=str(project))["fleets"][0]  # the fleet came back up
    assert status["running"] == 0 and status["agents"][0]["running"] == 0
    d.call("fleet.down", projectDir=str(project))


def test_sigkill_as_a_run_starts_stops_its_child_at_restart(daemon_factory: Any, tmp_home: Path) -> None:
    """A SIGKILL after a run's child started but before its row said so (its pid) left that child running for ever:
    the restart knew no pid to stop. The test-only pause holds every run in that window (otherwise a few ms)."""
    d = daemon_factory(**FAST, PORT_DADDY_TEST_FLEET_STARTING_PAUSE="30s")
    project, pids = _sleeper_fleet(tmp_home)
    pd_json(d, "fleet", "up", "-C", str(project))
    run = d.call("fleet.run", projectDir=str(project), agent="sleeper")["run"]
    procs = _recorded_pids(pids, 1)  # its leader and grandchild run ...
    [starting] = runs_of(d, project)
    assert (starting["status"], starting["pid"]) == ("queued", None)  # ... and its row does not know them yet
    d.kill9()
    assert all(pid_alive(p) for p in procs)
    d.start()
    assert not [p for p in procs if pid_alive(p)]
    [after] = runs_of(d, project)
    assert (after["id"], after["status"]) == (run["id"], "lost") and "while this run was starting" in after["error"]
    assert d.call("session.get", sessionId=after["sessionId"])["session"]["status"] == "abandoned"
    assert [e["id"] for e in d.call("salvage.list")["agents"]] == [run["id"]]
    d.call("fleet.down", projectDir=str(project))


def test_the_log_of_a_run_found_lost_at_restart_is_cut_too(daemon_factory: Any, tmp_home: Path) -> None:
    d = daemon_factory(**FAST)
    chatty = "agents:\n  chatty: {trigger: work, backend: custom, command: 'seq 400000; sleep 300'}\n"
    project = make_project(tmp_home, chatty)
    pd_json(d, "fleet", "up", "-C", str(project))
    run = d.call("fleet.run", projectDir=str(project), agent="chatty")["run"]
    log = Path(wait_for(lambda: runs_of(d, project)[0]["logPath"], what="the run to start"))
    wait_for(lambda: log.stat().st_size > len(SEQ_OUTPUT), what="all of its output")
    d.kill9()
    d.start()
    [after] = runs_of(d, project)
    assert (after["id"], after["status"]) == (run["id"], "lost")
    _kept_start_and_end(after)
    d.call("fleet.down", projectDir=str(project))


def test_runs_the_daemon_died_under_end_their_sessions_at_restart(fresh_daemon: Daemon) -> None:
    """A SIGKILL as the daemon registers a run and starts its child (one step, a few ms) leaves the row queued with
    the run's agent and session made; one while it runs, a running row, whose agent may be gone already (its child
    ran pd done, then began a new session). Built as those kills leave them, then restarted: each run is lost and
    its sessions end, so their claims block no one (was: active, the first until the reaper, the second for ever)."""
    d = fresh_daemon
    worktree = str(d.workdir)
    starting, running = (Run(new_id("spawn", "spawn"), "spawn", "spawn", "spawned:custom",
                             Task(backend="custom", command="sleep 300")) for _ in range(2))  # fmt: skip
    sessions = {}
    for run, path in ((starting, "src/a.py"), (running, "src/b.py")):
        d.call("agent.register", agentId=run.agent_id, identity=run.identity, type="spawned")  # as citizen.enter
        sessions[run.id] = d.call("session.start", agentId=run.agent_id, purpose="work", files=[path],
                                  worktree=worktree)["sessionId"]  # fmt: skip
    d.call("agent.done", agentId=running.agent_id)  # the child's own pd done ...
    again = d.call("session.start", agentId=running.agent_id, purpose="more", files=["src/b.py"], worktree=worktree)
    d.kill9()
    running.status = "running"
    store = Store(d.settings.db)
    for run in (starting, running):
        RunTable(store).insert(run)
    store.close()
    d.start()
    runs = {r["id"]: r for r in d.call("spawn.list")["agents"]}
    assert runs[starting.id]["status"] == "lost" and "while this run was starting" in runs[starting.id]["error"]
    assert runs[starting.id]["sessionId"] == sessions[starting.id]
    assert runs[running.id]["status"] == "lost"
    for sid in (sessions[starting.id], again["sessionId"]):
        assert d.call("session.get", sessionId=sid)["session"]["status"] == "abandoned"
    other = d.call("session.start", agentId="someone-else", purpose="mine now", files=["src/a.py", "src/b.py"],
                   worktree=worktree)  # fmt: skip
    assert other["conflicts"] == []


def test_a_spawn_the_daemon_died_before_starting_is_cancelled_at_restart(fresh_daemon: Daemon) -> None:
    """A spawn is recorded queued and started a few ms later; a SIGKILL between the two left it queued for ever
    (spawns, unlike a fleet's queued runs, are not restored). The row is written as the daemon left it."""
    d = fresh_daemon
    d.kill9()
    store = Store(d.settings.db)
    RunTable(store).insert(Run(new_id("spawn", "spawn"), "spawn", "spawn", "spawn:x", Task(backend="custom")))
    store.close()
    d.start()
    [run] = d.call("spawn.list")["agents"]
    assert run["status"] == "cancelled" and "spawn it again" in run["error"]


# --- retention -----------------------------------------------------------------------------------------


def _ended(d: Daemon, project: Path, agent: str) -> dict[str, Any]:
    """Fire one run of ``agent`` and wait until it has ended."""
    run_id = d.call("fleet.run", projectDir=str(project), agent=agent)["run"]["id"]
    return wait_for(lambda: next((r for r in runs_of(d, project, agent)
                                  if r["id"] == run_id and r["status"] not in ("queued", "running")), None),
                    what=f"run {run_id}")  # fmt: skip


def _ids(d: Daemon, project: Path, agent: str) -> list[str]:
    return [r["id"] for r in runs_of(d, project, agent)]  # newest first


def _journal_rows(d: Daemon, session_ids: list[str]) -> int:
    """Sessions, notes and file claims of ``session_ids`` left in the store (read with the daemon stopped)."""
    store = Store(d.settings.db)
    marks = ",".join("?" * len(session_ids))
    try:
        return sum(store.scalar(f"SELECT count(*) FROM {table} WHERE {column} IN ({marks})", session_ids)
                   for table, column in (("sessions", "id"), ("notes", "session_id"),
                                         ("file_claims", "session_id")))  # fmt: skip
    finally:
        store.close()


def test_finished_runs_past_the_newest_per_agent_or_a_month_old_are_forgotten_whole(
    daemon_factory: Any, tmp_home: Path
) -> None:
    """Every run left a session (with notes and claims), and its log, for ever: a cron fleet every minute, 1,440 a
    day. Now an agent keeps its newest runs (PORT_DADDY_FLEET_KEEP_RUNS, 2 here) and those of the last hour, none
    older than the salvage window; never one running, nor one whose salvage nobody settled."""
    d = daemon_factory(**FAST, PORT_DADDY_FLEET_KEEP_RUNS="2")
    claim = f"{sys.executable} -m portdaddy.cli session files claim src/ok.py"
    project = make_project(tmp_home, f"""
        fleet:
          limits: {{max_concurrent_spawns: 2, max_spawns_per_hour: 100}}
          agents:
            ok: {{trigger: work, backend: custom, command: "{claim}"}}
            bad: {{trigger: work, backend: custom, command: "exit 1"}}
            slow: {{trigger: work, backend: custom, command: "sleep 300"}}
        """)  # fmt: skip
    pd_json(d, "fleet", "up", "-C", str(project))
    slow = d.call("fleet.run", projectDir=str(project), agent="slow")["run"]
    ok = [_ended(d, project, "ok") for _ in range(4)]
    bad = [_ended(d, project, "bad") for _ in range(3)]  # each a dead agent; the newest one's salvage pending
    assert [r["status"] for r in ok] == ["completed"] * 4 and [r["status"] for r in bad] == ["failed"] * 3
    assert len(_ids(d, project, "ok")) == 4  # started in the last hour: the hourly limit counts them after a restart
    assert _ids(d, project, "slow") == [slow["id"]]
    d.stop()  # slow: lost, now
    hours_ago = int(time.time() * 1000) - 2 * 3_600_000
    store = Store(d.settings.db)
    with store.write() as db:  # all started two hours ago; the newest ok and the pending bad one ended a month ago
        db.execute("UPDATE fleet_runs SET started_at=?", (hours_ago,))
        db.execute("UPDATE fleet_runs SET ended_at=? WHERE id IN (?, ?)",
                   (hours_ago - 30 * 86_400_000, ok[3]["id"], bad[2]["id"]))  # fmt: skip
    store.close()
    d.start()  # the start forgets ok 0 and 1 (past the newest 2), ok 3 (a month old), bad 0 (settled: superseded)
    assert _ids(d, project, "ok") == [ok[2]["id"]]
    assert _ids(d, project, "bad") == [bad[2]["id"], bad[1]["id"]]  # bad 2's salvage pending: kept, a month old
    assert bad[0]["id"] not in {e["id"] for e in d.call("salvage.list", all=True)["agents"]}
    assert [(r["id"], r["status"]) for r in runs_of(d, project, "slow")] == [(slow["id"], "lost")]
    kept = d.call("session.get", sessionId=ok[2]["sessionId"])
    assert kept["notes"] and [f["filePath"] for f in kept["files"]] == ["src/ok.py"] and Path(ok[2]["logPath"]).exists()
    newer = [_ended(d, project, "ok") for _ in range(2)]  # and as a run ends: ok 2 is the third newest now
    assert _ids(d, project, "ok") == [newer[1]["id"], newer[0]["id"]]
    gone = [*ok[:2], ok[3], bad[0], ok[2]]
    for run in gone:
        assert not Path(run["logPath"]).exists()
        with pytest.raises(PDError, match="does not exist"):
            d.call("session.get", sessionId=run["sessionId"])
        assert d.call("note.list", agent=run["id"])["notes"] == []
    d.call("fleet.down", projectDir=str(project))
    d.stop()
    assert _journal_rows(d, [r["sessionId"] for r in gone]) == 0  # gone from the store, not just hidden


def test_a_fleet_agents_ended_runs_are_one_line_in_sitrep_sessions_and_notes(daemon_factory: Any,
                                                                           tmp_home: Path) -> None:  # fmt: skip
    """A cron agent succeeding every minute ended a session per run, with its handoff note: pd sitrep, pd session
    list --all and pd notes filled with them, and the people's own sessions and notes went off the page. Now a
    fleet agent's ended runs are one entry, its newest run's session (and notes), with how many runs it stands for
    and how they ended; its running runs stay on their own lines, and --runs (or naming a run) shows every one."""
    d = daemon_factory(**FAST)
    project = make_project(tmp_home, """
        fleet:
          limits: {max_concurrent_spawns: 2, max_spawns_per_hour: 100}
          agents:
            tick: {trigger: work, backend: custom, command: "echo ticked"}
            flaky: {trigger: work, backend: custom, command: "exit 1"}
            slow: {trigger: work, backend: custom, command: "sleep 300"}
        """)  # fmt: skip
    pd_json(d, "fleet", "up", "-C", str(project))
    alice = d.call("agent.begin", agentId="alice", purpose="Refactor auth", worktree=str(project))["sessionId"]
    d.call("note.add", agentId="alice", worktree=str(project), content="tokens rotate every 15m")
    ticks = [_ended(d, project, "tick") for _ in range(3)]
    flaky = [_ended(d, project, "flaky") for _ in range(2)]
    slow = [d.call("fleet.run", projectDir=str(project), agent="slow")["run"]["id"] for _ in range(2)]
    wait_for(lambda: {r["status"] for r in runs_of(d, project, "slow")} == {"running"}, what="the slow runs")

    listed = {s["agentId"]: s for s in d.call("session.list", all=True)["sessions"]}
    assert set(listed) == {"alice", ticks[2]["id"], flaky[1]["id"], *slow}  # one entry per fleet agent's ended runs
    first = d.call("session.get", sessionId=ticks[0]["sessionId"])["session"]["createdAt"]
    assert listed[ticks[2]["id"]]["fleetRuns"] == {"agent": "tick", "projectDir": str(project), "count": 3,
                                                   "completed": 3, "abandoned": 0, "firstAt": first}  # fmt: skip
    assert listed[flaky[1]["id"]]["fleetRuns"]["abandoned"] == 2
    assert listed["alice"]["fleetRuns"] is None and listed[slow[0]]["fleetRuns"] is None  # active: on its own
    assert d.call("session.list", all=True, runs=True)["count"] == 8

    notes = d.call("note.list")
    assert [n["agentId"] for n in notes["notes"]] == [ticks[2]["id"], "alice"] and notes["earlierRunNotes"] == 2
    assert notes["notes"][0]["content"].startswith("Completed: ticked")
    assert d.call("note.list", runs=True)["count"] == 4
    assert d.call("note.list", agent=ticks[0]["id"])["count"] == 1  # a run named: its notes
    shown = d.pd("notes")
    assert "pd notes --runs" in shown.stderr and shown.stdout.count("ticked") == 1, shown.stdout

    sitrep = d.pd("sitrep").stdout
    sessions = sitrep.split("\nSessions:\n")[1].split("\n\n")[0].splitlines()
    assert len(sessions) == 5, sitrep
    assert f"completed {ticks[2]['sessionId']} {ticks[2]['id']}: Fleet agent: tick [newest of 3 ended runs, the " \
        "first " in sitrep, sitrep  # fmt: skip
    assert "Fleet agent: flaky [newest of 2 ended runs, 2 abandoned, the first " in sitrep, sitrep
    assert f"active    {alice} alice: Refactor auth" in sitrep and sitrep.count("ticked") == 1
    every = d.pd("sitrep", "--runs").stdout
    assert all(t["sessionId"] in every for t in ticks) and "newest of" not in every, every
    table = d.pd("session", "list", "--all")
    assert "Fleet agent: tick [newest of 3 ended runs" in table.stdout and "--runs lists every run" in table.stderr
    d.call("fleet.down", projectDir=str(project))


def test_a_session_dressed_as_a_fleet_run_is_not_folded(daemon_factory: Any, tmp_home: Path) -> None:
    """The fold knew a run by its session's metadata, which any client sets: an agent naming itself like a run of
    tick, with tick's metadata, had its ended sessions and their notes left out of everyone's views, and the newest
    stood in for tick's runs. A run's session is known by what only the fleet writes."""
    d = daemon_factory(**FAST)
    project = make_project(tmp_home, """
        fleet:
          agents:
            tick: {trigger: work, backend: custom, command: "echo ticked"}
        """)  # fmt: skip
    pd_json(d, "fleet", "up", "-C", str(project))
    ticks = [_ended(d, project, "tick") for _ in range(2)]
    forged = []
    for n in range(2):
        agent = f"fleet-tick-{n:08x}"
        metadata = {"runId": agent, "kind": "fleet", "agent": "tick"}  # what the fleet sends, and a field it does not
        sid = d.call("session.start", purpose="Fleet agent: tick", agentId=agent, worktree=str(project),
                     metadata=metadata, fleetAgent="tick")["sessionId"]  # fmt: skip
        d.call("session.end", sessionId=sid, note=f"moved the deploy key {n}")
        forged.append(sid)

    listed = {s["id"]: s["fleetRuns"] for s in d.call("session.list", all=True)["sessions"]}
    assert set(listed) == {ticks[1]["sessionId"], *forged} and listed[forged[0]] is None and listed[forged[1]] is None
    assert listed[ticks[1]["sessionId"]]["count"] == 2
    notes = d.call("note.list")
    assert [n["content"] for n in notes["notes"]][:2] == ["moved the deploy key 1", "moved the deploy key 0"]
    assert notes["count"] == 3 and notes["earlierRunNotes"] == 1  # tick's first run's handoff, and only that
    sitrep = d.call("journal.sitrep")
    assert {s["id"] for s in sitrep["sessions"]} == set(listed) and sitrep["counts"]["notes"] == 3
    d.call("fleet.down", projectDir=str(project))


def _salvage(d: Daemon, **args: Any) -> dict[str, dict[str, Any]]:
    return {e["id"]: e for e in d.call("salvage.list", limit=500, **args)["agents"]}


def test_a_fleet_agent_failing_run_after_run_is_one_salvage_entry_until_a_run_succeeds(
    daemon_factory: Any, tmp_home: Path
) -> None:
    """A fleet agent failing every run (a cron every minute: 1,440 a day) left a dead agent and a pending salvage
    entry per run, and they drowned a crashed agent's half-done work in pd salvage, agents, sitrep and status. Now
    a failed run's entry supersedes the pending ones of its agent's earlier runs and counts their failures, a
    successful run settles it, and an entry someone claimed, or another agent's, is left alone."""
    d = daemon_factory(**FAST, PORT_DADDY_STALE_AFTER="1s", PORT_DADDY_DEAD_AFTER="2s")
    project = make_project(tmp_home, """
        fleet:
          limits: {max_concurrent_spawns: 1, max_spawns_per_hour: 100}
          agents:
            qa: {trigger: work, backend: custom, command: 'test ! -e "$PD_PROJECT_DIR/broken"'}
            docs: {trigger: work, backend: custom, command: "exit 1"}
        """)  # fmt: skip
    d.call("agent.register", agentId="builder", identity="proj:api", purpose="Half-done API")
    d.call("session.start", agentId="builder", purpose="Half-done API", files=["src/api.py"], worktree=str(project))
    wait_for(lambda: d.call("agent.get", id="builder")["agent"]["liveness"] == "dead", what="the builder's death")
    spawned = [d.call("spawn.start", backend="custom", task="exit 1")["agentId"] for _ in range(2)]  # not a fleet's
    pd_json(d, "fleet", "up", "-C", str(project))
    (project / "broken").touch()
    qa = [_ended(d, project, "qa") for _ in range(3)]
    docs = _ended(d, project, "docs")
    assert {r["status"] for r in [*qa, docs]} == {"failed"}

    every = _salvage(d, all=True)
    assert [(every[r["id"]]["status"], every[r["id"]]["completedBy"]) for r in qa[:2]] == [
        ("superseded", qa[1]["id"]), ("superseded", qa[2]["id"])]  # fmt: skip
    pending = wait_for(lambda: (lambda p: p if len(p) == 5 else None)(_salvage(d)), what="the spawns' deaths")
    assert {k: e["failures"] for k, e in pending.items()} == {qa[2]["id"]: 3, docs["id"]: 1, "builder": 1,
                                                            spawned[0]: 1, spawned[1]: 1}  # fmt: skip
    assert pending[qa[2]["id"]]["failingSince"] == every[qa[0]["id"]]["detectedAt"]

    salvage = d.pd("salvage").stdout
    assert "Failed:   3 failed runs, the first" in salvage and "5 agents in salvage queue" in salvage, salvage
    listed = d.pd("agents").stdout
    assert f"{qa[2]['id']} (proj:fleet:qa, " in listed and "[salvage pending, 3 failed runs]" in listed, listed
    sitrep = d.pd("sitrep").stdout
    assert "5 dead agents awaiting salvage" in sitrep
    assert f"{qa[2]['id']} (proj:fleet:qa): Fleet agent: qa [3 failed runs, the first" in sitrep, sitrep
    assert qa[2]["sessionId"] in sitrep and qa[0]["sessionId"] not in sitrep  # its earlier runs' sessions: in the entry
    for earlier in qa[:2]:  # they left the registry, as a dismissed entry's agent does
        assert earlier["id"] not in salvage + listed
    status = d.pd("status").stdout
    assert "5 dead agents left work behind (and 2 earlier failed runs of the same fleet agents)" in status, status
    refused = d.pd("salvage", "claim", qa[0]["id"], "--agent", "fixer")
    assert refused.returncode == 1 and f"superseded by {qa[1]['id']}" in refused.stderr, refused.stderr

    d.call("salvage.claim", id=qa[2]["id"], newAgentId="fixer")  # someone's work now: no later run touches it
    qa += [_ended(d, project, "qa") for _ in range(2)]
    every = _salvage(d, all=True)
    assert [(every[r["id"]]["status"], every[r["id"]]["failures"]) for r in qa[2:]] == [
        ("claimed", 3), ("superseded", 1), ("pending", 2)]  # fmt: skip

    (project / "broken").unlink()
    fixed = _ended(d, project, "qa")
    assert fixed["status"] == "completed"
    every = _salvage(d, all=True)
    assert (every[qa[4]["id"]]["status"], every[qa[4]["id"]]["completedBy"]) == ("completed", fixed["id"])
    assert every[qa[2]["id"]]["status"] == "claimed"
    assert set(_salvage(d)) == {docs["id"], "builder", *spawned}
    assert "earlier failed runs" not in d.pd("status").stdout
    d.call("fleet.down", projectDir=str(project))


# --- spawn ---------------------------------------------------------------------------------------------


def test_spawn_wait_logs_list_and_kill(fresh_daemon: Daemon, tmp_home: Path) -> None:
    d = fresh_daemon
    r = d.pd("spawn", "--backend", "custom", "--wait", "--", "echo", "out-$PD_RUN_ID", cwd=tmp_home)
    assert r.returncode == 0, r.stderr
    first_id = r.stdout.split(":")[0]
    assert f"out-{first_id}" in r.stdout

    long_id = d.pd("spawn", "-b", "custom", "-q", "--", "sleep 300").stdout.strip()
    assert long_id.startswith("spawned-")
    listed = pd_json(d, "spawned")["agents"]
    assert {a["id"]: a["status"] for a in listed} == {long_id: "running", first_id: "completed"}
    killed = pd_json(d, "spawn", "kill", long_id)
    assert killed["status"] == "killed"
    assert f"out-{first_id}" in d.pd("spawn", "logs", first_id).stdout

    failing = d.pd("spawn", "-b", "custom", "--wait", "--", "exit 7")
    assert failing.returncode == 1 and "exit code 7" in failing.stdout
    # A missing backend program is refused up front (was: "Spawned ...", exit 0, then a failed run).
    before = d.call("spawn.list")["count"]
    missing = d.pd("spawn", "-b", "codex", "--", "hi", env={"PATH": "/usr/bin:/bin"})
    assert missing.returncode == 2 and "'codex' is not on PATH" in missing.stderr and missing.stdout == ""
    assert d.call("spawn.list")["count"] == before  # nothing was started
    bad = d.pd("spawn", "-b", "custom", "--timeout", "soon", "--", "true")
    assert bad.returncode == 2
    assert d.pd("spawn", "kill", "spawned-000000000000").returncode == 1


def test_a_spawned_runs_session_is_named_by_the_start_of_its_task_on_one_line(daemon: Daemon) -> None:
    """A session's purpose is one line of text: a task of several lines was cut at 80 characters as it came, and
    its line break got the run's agent and session refused, so the run was in no journal."""
    task = "echo checking payments\necho " + "and refunds " * 20
    r = daemon.pd("spawn", "-b", "custom", "--wait", "--json", "--", task)
    assert r.returncode == 0, r.stderr
    run = json.loads(r.stdout)["run"]
    assert run["status"] == "completed" and run["sessionId"] is not None
    purpose = daemon.call("session.get", sessionId=run["sessionId"])["session"]["purpose"]
    assert purpose == " ".join(task.split())[:79] + "…"
    short = json.loads(daemon.pd("spawn", "-b", "custom", "--wait", "--json", "--", "true").stdout)["run"]
    assert daemon.call("session.get", sessionId=short["sessionId"])["session"]["purpose"] == "true"  # not cut


def test_spawn_timeout_stops_the_group(daemon: Daemon) -> None:
    r = daemon.pd("spawn", "-b", "custom", "--timeout", "1s", "--wait", "--", "sleep 30")
    assert r.returncode == 1 and "timeout" in r.stdout


def test_spawn_refuses_a_timeout_under_a_second_as_a_unit_mistake(fresh_daemon: Daemon) -> None:
    r = fresh_daemon.pd("spawn", "-b", "custom", "-t", "30", "--", "true")
    assert r.returncode == 2 and "--timeout 30 is 30 ms" in r.stderr and "--timeout 30s" in r.stderr
    assert fresh_daemon.call("spawn.list")["agents"] == []
    assert "A bare number is milliseconds" in fresh_daemon.pd("spawn", "start", "--help").stdout


def test_spawn_custom_refuses_a_program_that_is_not_there(daemon: Daemon, tmp_home: Path) -> None:
    before = daemon.call("spawn.list")["count"]
    for command, problem in (("nosuch-program --fast", "'nosuch-program' is not on PATH"),
                             ("FOO=1 ./missing.sh", "'./missing.sh' does not exist")):  # fmt: skip
        r = daemon.pd("spawn", "-b", "custom", "--", command, cwd=tmp_home)
        assert r.returncode == 2 and r.stdout == "", r  # was: "Spawned ...", exit 0, then a failed run
        assert r.stderr.startswith(f"error: backend custom: {problem}; ") and r.stderr.count("\n") == 1
    (tmp_home / "here.sh").write_text("#!/bin/sh\necho script-ran\n")
    (tmp_home / "here.sh").chmod(0o755)
    assert daemon.call("spawn.list")["count"] == before  # nothing was started
    ran = daemon.pd("spawn", "-b", "custom", "--wait", "--", "./here.sh", cwd=tmp_home)  # relative to the workdir
    assert ran.returncode == 0 and "script-ran" in ran.stdout, ran


def test_a_task_that_is_not_unicode_is_refused_before_anything_is_registered(daemon: Daemon, tmp_home: Path) -> None:
    """A lone surrogate in a spawn's task (or env) got past HTTP as its own bytes: the run was queued, then failed
    with a traceback in the daemon log when its agent was registered or its child started."""
    before = daemon.call("spawn.list")["count"]
    agents = daemon.call("agent.list")["count"]
    with unix_client(daemon) as c:
        for body in ('{"backend": "custom", "task": "echo \\ud800"}',  # the escape: refused before, still
                     '{"backend": "custom", "task": "echo \ud800"}',  # its own bytes: was a 200, then a traceback
                     '{"backend": "custom", "task": "echo hi", "env": {"X": "\udfff"}}',
                     '{"backend": "custom", "task": "echo hi", "workdir": "/tmp/\ud800"}'):  # fmt: skip
            r = c.post("/spawn", content=body.encode("utf-8", "surrogatepass"))
            assert r.status_code == 400 and r.json()["code"] == "VALIDATION_ERROR", r.text
            assert "surrogate" in r.json()["error"] and "\n" not in r.json()["error"], r.text
    # pd (over IPC) refuses it before sending: an argument's bytes that are not UTF-8 are not text.
    r = daemon.pd("spawn", "-b", "custom", "--", os.fsdecode(b"echo \xed\xa0\x80"), cwd=tmp_home)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "not valid Unicode" in r.stderr
    # A fleet file's "\\ud800" (YAML makes a lone surrogate of it): refused by validate and up alike.
    project = make_project(tmp_home, 'agents:\n  qa: {trigger: qa:go, backend: custom, command: "echo \\ud800"}\n')
    for verb in ("validate", "up"):
        r = daemon.pd("fleet", verb, "-C", str(project))
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert "pd-fleet.yml:2: agents.qa.command: holds a lone UTF-16 surrogate" in r.stderr
    assert str(project) not in json.dumps(daemon.call("fleet.status"))
    assert daemon.call("spawn.list")["count"] == before and daemon.call("agent.list")["count"] == agents
    assert "Traceback" not in daemon.log()


def test_a_command_or_env_value_too_large_for_an_exec_is_refused_up_front(daemon: Daemon, tmp_home: Path) -> None:
    """Linux refuses one argument or environment string over 128 KiB: a custom command of 100,000 characters that
    are not ASCII failed with E2BIG only after its run was registered (an agent, a session, a salvage entry)."""
    before, agents = daemon.call("spawn.list")["count"], daemon.call("agent.list")["count"]
    word = "é" * 33_000  # two of them: 132,006 bytes of command, in arguments pd itself can be given
    r = daemon.pd("spawn", "-b", "custom", "--", "echo", word, word, cwd=tmp_home)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr == (
        "error: task is 132,006 bytes; backend custom runs it as one argument of /bin/sh -c, "
        "and Linux refuses an argument over 128 KiB: put the command in a script, and run that\n"
    )
    with unix_client(daemon) as c:
        r = c.post("/spawn", json={"backend": "custom", "task": f"echo {word} {word}"})
        assert r.status_code == 400 and r.json()["error"].startswith("task is 132,006 bytes; "), r.text
    assert daemon.call("spawn.list")["count"] == before and daemon.call("agent.list")["count"] == agents

    env = "agents:\n  qa:\n    trigger: qa:go\n    backend: custom\n    command: echo\n    env: {BIG: VALUE}\n"
    project = make_project(tmp_home, env.replace("VALUE", "x" * 128 * 1024))
    for verb in ("validate", "up"):
        r = daemon.pd("fleet", verb, "-C", str(project))
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert "pd-fleet.yml:6: agents.qa.env.BIG: is 131,072 bytes; Linux refuses an environment variable" in r.stderr
    assert str(project) not in json.dumps(daemon.call("fleet.status"))


def test_a_spawn_over_arg_max_with_the_daemons_environment_is_refused_up_front(
    daemon_factory: Any, tmp_home: Path
) -> None:
    """Every agent gets the daemon's environment: a large one leaves a task less room in ARG_MAX (arguments and
    environment together), and one it takes over is refused, saying so, before anything is registered."""
    base = sum(len(k) + len(v) + 2 + 8 for k, v in make_env(tmp_home).items())
    d = daemon_factory(**_env_values(arg_max() - 50_000 - base, "FILL"))
    before, agents = d.call("spawn.list")["count"], d.call("agent.list")["count"]
    with unix_client(d) as c:  # not pd: its own exec, the same environment with the task as an argument, is over too
        r = c.post("/spawn", json={"backend": "custom", "task": "true " + "#" * 99_995})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert re.fullmatch(r"arguments and environment are [\d,]+ bytes, [\d,]+ over the [\d,]+ Linux allows one exec "
                            r"\(ARG_MAX\); the daemon's environment, which every agent gets, takes [\d,]+ of them: "
                            r"restart the daemon \(pd stop, then pd start\) from a shell with less in its environment",
                            error), error  # fmt: skip
        assert d.call("spawn.list")["count"] == before and d.call("agent.list")["count"] == agents
        run = c.post("/spawn", json={"backend": "custom", "task": "true"}).json()["run"]  # what fits runs
    assert d.call("spawn.wait", id=run["id"], timeout=20_000)["run"]["status"] == "completed"


def test_no_fleet_env_disables_the_supervisor(daemon_factory: Any, tmp_home: Path) -> None:
    d = daemon_factory(PORT_DADDY_NO_FLEET="1")
    project = make_project(tmp_home, "agents: {}\n")
    r = d.pd("fleet", "up", "-C", str(project))
    assert r.returncode == 1 and "PORT_DADDY_NO_FLEET" in r.stderr


def _one_slot(*agents: str) -> str:
    """A fleet file that runs one agent at a time, so a `sleep 300` agent holds the queue behind it."""
    return "fleet:\n  limits: {max_concurrent_spawns: 1}\n  agents:\n" + "".join(f"    {a}\n" for a in agents)


def test_a_clean_restart_keeps_queued_runs_and_loses_the_running_one(daemon_factory: Any, tmp_home: Path) -> None:
    d = daemon_factory(**FAST)
    project = make_project(tmp_home, _one_slot('slow: {trigger: work, backend: custom, command: "sleep 300"}'))
    pd_json(d, "fleet", "up", "-C", str(project))
    first = d.call("fleet.run", projectDir=str(project), agent="slow")["run"]
    second = d.call("fleet.run", projectDir=str(project), agent="slow")["run"]
    wait_for(lambda: d.call("fleet.status", projectDir=str(project))["fleets"][0]["running"] == 1, what="a run")
    assert d.stop() == 0  # pd stop: SIGTERM
    d.start()
    by_id = {r["id"]: r for r in runs_of(d, project)}
    assert by_id[first["id"]]["status"] == "lost", by_id  # was: failed, "killed by signal 15"
    assert by_id[first["id"]]["error"].startswith("daemon shutting down")
    salvage = d.call("salvage.list", all=True, limit=500)
    assert first["id"] in json.dumps(salvage)  # as after a SIGKILL: its session went to salvage
    assert by_id[second["id"]]["status"] in ("queued", "running"), by_id  # was: cancelled
    wait_for(lambda: {r["id"]: r["status"] for r in runs_of(d, project)}[second["id"]] == "running",
             what="the queued run to start once the fleet is back")  # fmt: skip
    # The interrupted run was not respawned or counted as a failure.
    assert len(runs_of(d, project)) == 2
    assert d.call("fleet.status", projectDir=str(project))["fleets"][0]["agents"][0]["failures"] == 0
    d.call("fleet.down", projectDir=str(project))


def test_queued_runs_of_an_agent_a_reload_disabled_or_removed_do_not_start(daemon_factory: Any,
                                                                           tmp_home: Path) -> None:  # fmt: skip
    d = daemon_factory(**FAST)
    blocking = 'blocker: {trigger: work, backend: custom, command: "sleep 300"}'
    off = 'off: {trigger: work, backend: custom, command: "true"%s}'
    gone = 'gone: {trigger: work, backend: custom, command: "true"}'
    project = make_project(tmp_home, _one_slot(blocking, off % "", gone))
    pd_json(d, "fleet", "up", "-C", str(project))
    blocker = d.call("fleet.run", projectDir=str(project), agent="blocker")["run"]
    queued = [d.call("fleet.run", projectDir=str(project), agent=a)["run"]["id"] for a in ("off", "gone")]
    wait_for(lambda: d.call("fleet.status", projectDir=str(project))["fleets"][0]["running"] == 1, what="a run")
    (project / "pd-fleet.yml").write_text(_one_slot(blocking, off % ", enabled: false"))  # gone: removed
    pd_json(d, "fleet", "up", "-C", str(project))  # reloads the file
    d.call("spawn.kill", id=blocker["id"])  # the queue moves on

    def ended() -> dict[str, Any] | None:
        runs = {r["agent"]: r for r in runs_of(d, project) if r["id"] in queued and r["status"] != "queued"}
        return runs if len(runs) == 2 else None

    by_agent = wait_for(ended, what="the queued runs to end")
    assert {a: r["status"] for a, r in by_agent.items()} == {"off": "cancelled", "gone": "cancelled"}, by_agent
    assert "disabled" in by_agent["off"]["error"] and "no longer in the fleet file" in by_agent["gone"]["error"]
    d.call("fleet.down", projectDir=str(project))


def test_a_respawn_waiting_out_its_delay_survives_a_clean_restart(daemon_factory: Any, tmp_home: Path) -> None:
    d = daemon_factory(**{**FAST, "PORT_DADDY_FLEET_RESPAWN_DELAY": "3s"})
    project = make_project(tmp_home, """
        agents:
          flaky: {trigger: work, backend: custom, command: '[ "$PD_ATTEMPT" != 0 ]', respawn: true}
        """)  # fmt: skip
    pd_json(d, "fleet", "up", "-C", str(project))
    d.call("fleet.run", projectDir=str(project), agent="flaky")
    [failed] = finished(d, project, "flaky", 1)
    # The respawn is a queued run at once, with the time it may start.
    [respawn] = [r for r in runs_of(d, project) if r["status"] == "queued"]
    assert respawn["attempt"] == 1 and respawn["notBefore"] >= failed["endedAt"] + 3000
    assert d.stop() == 0  # pd stop during the delay (was: the respawn was forgotten)
    d.start()
    done = wait_for(lambda: {r["attempt"]: r for r in runs_of(d, project) if r["status"] == "completed"},
                    what="the respawn to run after the restart")  # fmt: skip
    assert done[1]["id"] == respawn["id"] and done[1]["startedAt"] >= respawn["notBefore"]
    assert len(runs_of(d, project)) == 2
    d.call("fleet.down", projectDir=str(project))


def test_a_restart_keeps_the_hourly_budget_and_the_breakers_count(daemon_factory: Any, tmp_home: Path) -> None:
    # A respawn waits an hour here: it stays queued, so the breaker is reached by runs of our choosing.
    d = daemon_factory(**{**FAST, "PORT_DADDY_FLEET_RESPAWN_DELAY": "1h"})
    project = make_project(tmp_home, """
        fleet:
          limits: {max_concurrent_spawns: 2, max_spawns_per_hour: 4}
          agents:
            quick: {trigger: work, backend: custom, command: "true"}
            flaky: {trigger: work, backend: custom, command: "exit 3", respawn: true, max_respawns: 1}
        """)  # fmt: skip
    pd_json(d, "fleet", "up", "-C", str(project))

    def agent(name: str) -> dict[str, Any]:
        view = d.call("fleet.status", projectDir=str(project))["fleets"][0]
        return next(a for a in view["agents"] if a["name"] == name)

    for name in ("quick", "quick", "flaky"):
        d.call("fleet.run", projectDir=str(project), agent=name)
    finished(d, project, "quick", 2)
    finished(d, project, "flaky", 1)
    assert agent("flaky")["failures"] == 1 and agent("flaky")["queued"] == 1  # its respawn, an hour away
    assert d.stop() == 0
    d.start()
    assert agent("flaky")["failures"] == 1  # was: 0, the breaker's count forgotten

    d.call("fleet.run", projectDir=str(project), agent="flaky")  # the 4th start this hour; fails again
    wait_for(lambda: agent("flaky")["circuit"]["open"], what="the circuit to open at the second failure")
    assert agent("flaky")["queued"] == 0  # the pending respawn was cancelled with it
    cancelled = [r for r in runs_of(d, project, "flaky") if r["status"] == "cancelled"]
    assert [r["attempt"] for r in cancelled] == [1] and "circuit opened" in cancelled[0]["error"]

    d.call("fleet.run", projectDir=str(project), agent="quick")  # over the budget of 4 an hour: it waits
    time.sleep(1)
    view = d.call("fleet.status", projectDir=str(project))["fleets"][0]
    assert (view["queued"], view["running"]) == (1, 0), view  # was: started, the budget reset by the restart

    d.call("fleet.reset", projectDir=str(project), agent="flaky")  # forgives its failures, after a restart too
    assert d.stop() == 0
    d.start()
    assert agent("flaky")["failures"] == 0 and not agent("flaky")["circuit"]["open"]
    d.call("fleet.down", projectDir=str(project))


def test_a_fleet_whose_directory_was_deleted_stops_firing_and_can_be_brought_down(
    daemon_factory: Any, tmp_home: Path
) -> None:
    d = daemon_factory(**FAST)
    project = make_project(tmp_home, "agents:\n  qa: {trigger: work, backend: custom, command: 'echo ran-once'}\n")
    pd_json(d, "fleet", "up", "-C", str(project))
    d.call("fleet.run", projectDir=str(project), agent="qa")
    [run] = finished(d, project, "qa", 1)
    shutil.rmtree(project)

    d.call("msg.publish", channel="work", payload={"n": 1})
    status = d.pd("fleet", "status", "-C", str(project))
    assert status.returncode == 0, status.stderr
    assert f"problem: project directory {project} is gone" in status.stdout
    assert len(runs_of(d, project)) == 1  # the trigger fired nothing (a cron would have failed every minute)
    salvage = d.call("salvage.list", all=True, limit=500)
    assert "fleet-qa" not in json.dumps(salvage)
    said = [m["payload"] for m in d.call("msg.history", channels="fleet")["messages"]]
    assert [m["event"] for m in said] == ["project-missing"]  # said once, not per trigger
    assert run["id"] in d.pd("fleet", "runs", "-C", str(project)).stdout
    assert "ran-once" in d.pd("fleet", "logs", "qa", "-C", str(project)).stdout

    down = d.pd("fleet", "down", "-C", str(project))
    assert down.returncode == 0, down.stderr  # was: a usage error, then "is not a directory"
    assert "Fleet stopped" in down.stdout
    assert d.call("fleet.status")["fleets"] == []


def test_run_refuses_a_disabled_agent_and_unknown_agents_are_named(daemon_factory: Any, tmp_home: Path) -> None:
    d = daemon_factory(**FAST)
    on = 'on: {trigger: work, backend: custom, command: "sleep 300"}'
    disabled = 'off: {trigger: work, backend: custom, command: "true", enabled: false}'
    project = make_project(tmp_home, _one_slot(on, disabled))
    pd_json(d, "fleet", "up", "-C", str(project))
    off = d.pd("fleet", "run", "off", "-C", str(project))
    assert off.returncode == 1 and "agent 'off' is disabled (enabled: false" in off.stderr
    assert runs_of(d, project, "off") == []

    for command in ("logs", "runs"):
        r = d.pd("fleet", command, "nosuch", "-C", str(project))
        assert r.returncode == 1 and "agent 'nosuch' does not exist" in r.stderr, (command, r.stderr)
    never_ran = d.pd("fleet", "logs", "on", "-C", str(project))
    assert never_ran.returncode == 1 and "agent 'on' has no runs yet" in never_ran.stderr

    for _ in range(101):  # one running, a hundred waiting: the queue is full
        d.call("fleet.run", projectDir=str(project), agent="on")
    full = d.pd("fleet", "run", "on", "-C", str(project))
    assert full.returncode == 1 and "queue is full (100 runs waiting)" in full.stderr
    assert "reset" not in full.stderr  # a reset closes a circuit; it does nothing for a full queue
    d.call("fleet.down", projectDir=str(project))


def test_validate_and_init_help_do_not_mention_a_daemon(tmp_home: Path) -> None:
    for command in ("validate", "init"):
        r = subprocess.run([sys.executable, "-m", "portdaddy.cli", "fleet", command, "--help"],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 0 and "--json" in r.stdout and "daemon's reply" not in r.stdout, r.stdout
