"""The CLI's conventions (spec/decisions.md, "The CLI's conventions"), checked against a real daemon: what -q
prints where a command has one value to give, and that every --json output is one object saying success."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apsw
import click
import pytest
from conftest import Daemon, make_env

from portdaddy.cli.main import cli
from tests.fleet_helpers import FAST, git, make_project, wait_for


def with_flag(args: list[str] | tuple[str, ...], flag: str) -> list[str]:
    """``args`` with ``flag`` among pd's options: after ``--`` it would be the spawned command's."""
    at = args.index("--") if "--" in args else len(args)
    return [*args[:at], flag, *args[at:]]


def quiet(d: Daemon, *args: str, cwd: Path | None = None) -> str:
    r = d.pd(*with_flag(args, "-q"), cwd=cwd)
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
    assert quiet(daemon, "session", "files", "claim", "src/a.ts", "src/b.ts", cwd=tree) == "2\n"
    assert quiet(daemon, "pheromone", "files") == "2\n"
    assert quiet(daemon, "session", "files", "release", cwd=tree) == "2\n"
    assert daemon.pd("done", cwd=tree).returncode == 0
    assert quiet(daemon, "session", "show", session) == "completed\n"
    assert quiet(daemon, "channels", "--clear", "quiet:history") == "2\n"
    assert quiet(daemon, "log", "--limit", "3") == "3\n"
    assert [quiet(daemon, "harbor", "create", "quiet:h") for _ in range(2)] == ["created\n", "exists\n"]
    daemon.call("pheromone.spray", table="services", id="quiet:api", key="k", strength=0.5)
    assert quiet(daemon, "pheromone", "list") == "1\n"
    for _ in range(2):
        daemon.call("inbox.send", to="quiet-reader", content="hi")
    assert quiet(daemon, "inbox", "read", "--agent", "quiet-reader") == "2\n"
    assert quiet(daemon, "inbox", "clear", "--agent", "quiet-reader") == "2\n"
    run = quiet(daemon, "spawn", "-b", "custom", "--", "sleep 300").strip()
    assert quiet(daemon, "spawned") == "1\n"
    assert quiet(daemon, "spawn", "kill", run) == "killed\n"


# --- --json: every command prints one object with `success`, true exactly when it exits 0 -------------------

# One invocation of every command (and of every group that runs on its own), placeholders filled by `world`.
# Each is meant to succeed but those in REFUSED, whose refusal is the cheap case to set up.
JSON_CALLS: dict[str, tuple[str, ...]] = {
    "agent heartbeat": ("agent", "heartbeat", "--agent", "j-agent"),
    "agent register": ("agent", "register", "--agent", "j-agent", "--identity", "j:agent"),
    "agent show": ("agent", "show", "j-shown"),
    "agent unregister": ("agent", "unregister", "--agent", "j-gone"),
    "agents": ("agents",),
    "arbiter status": ("arbiter", "status"),
    "arbiter test": ("arbiter", "test", "LOCK_OWNER_VALID"),
    "arbiter violations": ("arbiter", "violations"),
    "begin": ("begin", "Walk the CLI", "--agent", "j-begin"),
    "channels": ("channels",),
    "claim": ("claim", "j:api"),
    "done": ("done", "--agent", "j-done"),
    "env": ("env", "j:*"),
    "files": ("files",),
    "find": ("find", "j:*"),
    "fleet down": ("fleet", "down", "-C", "{idle}"),
    "fleet hook post-commit": ("fleet", "hook", "post-commit"),
    "fleet init": ("fleet", "init", "--no-hook", "-C", "{idle}"),
    "fleet logs": ("fleet", "logs", "qa", "-C", "{project}"),
    "fleet reset": ("fleet", "reset", "qa", "-C", "{project}"),
    "fleet run": ("fleet", "run", "qa", "-C", "{project}"),
    "fleet runs": ("fleet", "runs", "-C", "{project}"),
    "fleet show": ("fleet", "show", "{run}"),
    "fleet status": ("fleet", "status", "-C", "{project}"),
    "fleet up": ("fleet", "up", "-C", "{project}"),
    "fleet validate": ("fleet", "validate", "-C", "{project}"),
    "guard check": ("guard", "check", "src/free.ts"),
    "guard install": ("guard", "install"),
    "harbor create": ("harbor", "create", "j:harbor"),
    "harbor destroy": ("harbor", "destroy", "j:doomed"),
    "harbor enter": ("harbor", "enter", "j:harbor", "--agent", "j-agent"),
    "harbor leave": ("harbor", "leave", "j:left", "--agent", "j-leaver"),
    "harbor list": ("harbor", "list"),
    "harbor show": ("harbor", "show", "j:left"),
    "history": ("history", "j:chan"),
    "inbox": ("inbox", "--agent", "j-agent"),
    "inbox clear": ("inbox", "clear", "--agent", "j-agent"),
    "inbox read": ("inbox", "read", "--agent", "j-agent"),
    "inbox send": ("inbox", "send", "j-agent", "hello"),
    "lock": ("lock", "j:lock"),
    "locks": ("locks",),
    "log": ("log",),
    "note": ("note", "walked", "--session", "{session}"),
    "notes": ("notes",),
    "pheromone files": ("pheromone", "files"),
    "pheromone list": ("pheromone", "list"),
    "pheromone sniff": ("pheromone", "sniff", "--table", "services", "--id", "j:api"),
    "pheromone spray": ("pheromone", "spray", "--table", "services", "--id", "j:api", "--key", "k", "--strength", "1"),
    "pub": ("pub", "j:chan", "hello"),
    "release": ("release", "j:released"),
    "salvage": ("salvage",),
    "salvage abandon": ("salvage", "abandon", "j-nobody"),
    "salvage claim": ("salvage", "claim", "j-nobody"),
    "salvage complete": ("salvage", "complete", "j-nobody"),
    "salvage dismiss": ("salvage", "dismiss", "j-nobody"),
    "services": ("services",),
    "session end": ("session", "end", "--session", "{ended}"),
    "session files claim": ("session", "files", "claim", "src/a.ts", "--session", "{session}"),
    "session files release": ("session", "files", "release", "--session", "{session}"),
    "session list": ("session", "list"),
    "session show": ("session", "show", "{session}"),
    "session start": ("session", "start", "Walk sessions", "--agent", "j-starter"),
    "sitrep": ("sitrep",),
    "spawn kill": ("spawn", "kill", "{spawned}"),
    "spawn logs": ("spawn", "logs", "{spawned}"),
    "spawn start": ("spawn", "-b", "custom", "--", "true"),
    "spawned": ("spawned",),
    "start": ("start",),
    "status": ("status",),
    "stop": ("stop",),  # in a home where no daemon runs (see ELSEWHERE)
    "sub": ("sub", "bad channel", "--once"),
    "tuple count": ("tuple", "count"),
    "tuple in": ("tuple", "in", '["j", "*"]'),
    "tuple out": ("tuple", "out", '["j", 3]'),
    "tuple rd": ("tuple", "rd", '["j", "*"]'),
    "tuple scan": ("tuple", "scan"),
    "unlock": ("unlock", "j:free"),
    "url": ("url", "j:api"),
    "version": ("version",),
    "wait": ("wait", "j:chan"),
    "watch": ("watch", "bad channel", "--exec", "true"),
    "webhook add": ("webhook", "add", "http://127.0.0.1:9/hook"),
    "webhook deliveries": ("webhook", "deliveries", "{webhook}"),
    "webhook enable": ("webhook", "enable", "{webhook}"),
    "webhook events": ("webhook", "events"),
    "webhook ls": ("webhook", "ls"),
    "webhook rm": ("webhook", "rm", "{doomed_hook}"),
    "webhook test": ("webhook", "test", "{webhook}"),
    "who-owns": ("who-owns", "src/a.ts"),
    "whoami": ("whoami",),
    "with-lock": ("with-lock", "j:held", "--", "true"),
}
# Refused on purpose, with this exit code: salvage needs a dead agent, webhook test a listener; sub and watch
# print each message as it comes and with-lock its command's output, so their one --json object is a refusal.
REFUSED = {"salvage abandon": 1, "salvage claim": 1, "salvage complete": 1, "salvage dismiss": 1, "webhook test": 1,
           "sub": 2, "watch": 2, "with-lock": 1}  # fmt: skip
ELSEWHERE = {"stop"}


def _resolved(command: click.Command, path: tuple[str, ...]) -> Iterator[tuple[str, click.Command]]:
    """Every command a user can run: the leaves, and the groups that do something without a subcommand."""
    if not isinstance(command, click.Group) or command.invoke_without_command:
        yield " ".join(path), command
    if isinstance(command, click.Group):
        ctx = click.Context(command)
        for name in command.list_commands(ctx):
            yield from _resolved(command.get_command(ctx, name), (*path, name))


def test_the_json_walk_covers_every_command() -> None:
    assert {path for path, _ in _resolved(cli, ())} - {"", "daemon"} == set(JSON_CALLS)  # `pd daemon` is the daemon


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, dict[str, str]]]:
    """A daemon with something of everything: a fleet with a finished run, a spawned agent, sessions, tuples."""
    root = tmp_path_factory.mktemp("world")
    project = make_project(root, "agents:\n  qa: {trigger: j:go, backend: custom, command: 'echo walked'}\n")
    git(project, "commit", "-q", "--allow-empty", "-m", "start")
    (root / "idle").mkdir()

    def pd_json(*args: str) -> dict[str, Any]:
        r = d.pd(*with_flag(args, "--json"), cwd=project)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        return json.loads(r.stdout)

    home = Path(tempfile.mkdtemp(prefix="pd", dir="/tmp"))
    d = Daemon(home, make_env(home, PORT_DADDY_WEBHOOK_ALLOW_PRIVATE="1", **FAST))
    try:
        d.start()  # in the try: a daemon that does not start leaves no home behind either
        pd_json("fleet", "up", "-C", str(project))
        run = pd_json("fleet", "run", "qa", "-C", str(project))["run"]["id"]
        wait_for(lambda: d.call("fleet.runs", projectDir=str(project))["runs"][0]["status"] == "completed",
                 what=f"fleet run {run}")  # fmt: skip
        for agent in ("j-shown", "j-gone", "j-leaver"):
            pd_json("agent", "register", "--agent", agent)
        pd_json("harbor", "enter", "j:left", "--agent", "j-leaver")
        pd_json("harbor", "create", "j:doomed")
        pd_json("begin", "To be done", "--agent", "j-done")
        values = {
            "project": str(project),
            "idle": str(root / "idle"),
            "run": run,
            "session": pd_json("session", "start", "Noted", "--agent", "j-noter")["id"],
            "ended": pd_json("session", "start", "Ended", "--agent", "j-ender")["id"],
            "spawned": pd_json("spawn", "-b", "custom", "--", "sleep 300")["agentId"],
            "webhook": pd_json("webhook", "add", "http://127.0.0.1:9/walk")["id"],  # nothing listens on port 9
            "doomed_hook": pd_json("webhook", "add", "http://127.0.0.1:9/doomed")["id"],
        }
        pd_json("claim", "j:api")
        pd_json("claim", "j:released")
        pd_json("pub", "j:chan", "retained")
        pd_json("tuple", "out", '["j", 1]')
        pd_json("tuple", "out", '["j", 2]')
        d.call("lock.acquire", name="j:held", owner="someone-else")
        yield d, values
    finally:
        d.stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.parametrize("command", JSON_CALLS)
def test_json_is_one_object_that_says_success(world: tuple[Daemon, dict[str, str]], command: str) -> None:
    d, values = world
    args = with_flag([a.format(**values) for a in JSON_CALLS[command]], "--json")
    env = {"PORT_DADDY_HOME": values["idle"]} if command in ELSEWHERE else None
    r = d.pd(*args, cwd=values["project"], env=env)
    assert r.returncode == REFUSED.get(command, 0), (r.returncode, r.stdout, r.stderr)
    body = json.loads(r.stdout)
    assert isinstance(body, dict) and body["success"] is (r.returncode == 0), body
    if not body["success"]:
        assert body["error"] and body["message"], body


def test_an_answer_that_is_a_no_is_a_refusal_under_json(fresh_daemon: Daemon) -> None:
    """A failed run and a broken note chain exit 1, so under --json they say success false, with a code."""
    d = fresh_daemon
    failed = d.pd("spawn", "-b", "custom", "--wait", "--json", "--", "echo partial; exit 7")
    body = json.loads(failed.stdout)
    assert failed.returncode == 1 and body["success"] is False and body["error"] == "RUN_FAILED", body
    assert body["run"]["exitCode"] == 7 and "partial" in body["output"]

    sid = d.call("session.start", purpose="tampered")["id"]
    d.call("note.add", sessionId=sid, content="the record")
    d.stop()
    with apsw.Connection(str(d.settings.db)) as db:  # what a stray tool writing the store could do
        db.execute("DROP TRIGGER notes_append_only_update")
        db.execute("UPDATE notes SET type = 'rewritten'")
    d.start()
    broken = d.pd("notes", "--verify", "--json")
    body = json.loads(broken.stdout)
    assert broken.returncode == 1 and body["success"] is False and body["error"] == "CHAIN_BROKEN", body
    assert body["problems"][0]["sessionId"] == sid
    assert d.pd("notes", "--verify", "-q").stdout == "broken\n"


def test_quiet_prints_the_count_of_what_a_list_shows(world: tuple[Daemon, dict[str, str]]) -> None:
    d, values = world
    for args in (("fleet", "runs", "-C", values["project"]), ("webhook", "deliveries", values["webhook"])):
        listed = json.loads(d.pd(*args, "--json").stdout)
        assert quiet(d, *args) == f"{listed['count']}\n"
    assert quiet(d, "fleet", "reset", "qa", "-C", values["project"]) == "not-open\n"
    assert quiet(d, "fleet", "show", values["run"]) == "completed\n"


# Commands without -q: nothing they print is the one value a script wants.
NO_QUIET = {
    # reports of several things
    "status", "sitrep", "arbiter status", "env", "start", "stop", "harbor show", "salvage claim",
    "fleet status", "fleet validate", "fleet init", "fleet up", "fleet down",
    # confirmations: the exit code says it
    "agent unregister", "harbor destroy", "harbor enter", "harbor leave", "pheromone spray", "salvage complete",
    "salvage abandon", "salvage dismiss", "webhook rm", "webhook enable", "guard install", "guard check",
    "fleet hook post-commit",
    # what they print is the data itself, as it comes
    "sub", "watch", "with-lock", "fleet logs", "spawn logs", "webhook events",
}  # fmt: skip


def test_every_command_with_a_value_takes_quiet() -> None:
    with_quiet = {path for path, command in _resolved(cli, ()) if any("-q" in p.opts for p in command.params)}
    assert with_quiet == set(JSON_CALLS) - NO_QUIET


def test_every_command_has_examples_and_every_option_says_what_it_does() -> None:
    lacking = []
    for path, command in _resolved(cli, ()):
        if path in ("", "fleet hook post-commit"):  # the root's help is the quick start; the hook's is for git
            continue
        if "Example" not in (command.help or ""):
            lacking.append(f"{path}: no example")
        lacking += [
            f"{path} {p.opts[0]}: no help" for p in command.params if isinstance(p, click.Option) and not p.help
        ]
    assert lacking == []


def test_examples_stand_apart_from_the_text_above_them() -> None:
    """A \\b paragraph ran on into its "Examples:" line (pd find, pd fleet, pd tuple), as click prints it."""

    def helps(command: click.Command, path: tuple[str, ...]) -> Iterator[tuple[str, str]]:
        ctx = click.Context(command, info_name=" ".join(("pd", *path)))
        yield " ".join(path), command.get_help(ctx)
        if isinstance(command, click.Group):
            for name in command.list_commands(ctx):
                yield from helps(command.get_command(ctx, name), (*path, name))

    crowded = [path for path, text in helps(cli, ()) if re.search(r"\S\n *Examples?:\n", text)]
    assert crowded == []


def test_pd_and_what_waits_on_the_daemon_say_how_to_wait_longer() -> None:
    """The commands whose reply may take long (a run stopping, a webhook delivery) show PORT_DADDY_TIMEOUT in
    an example, and pd --help lists it."""
    helps = {path: command.help or "" for path, command in _resolved(cli, ())} | {"": cli.help or ""}
    for path in ("", "spawn kill", "webhook test", "fleet down"):
        assert re.search(r"^\s*PORT_DADDY_TIMEOUT=\w+ pd ", helps[path], re.M), path


def test_an_empty_list_says_so(fresh_daemon: Daemon, tmp_path: Path) -> None:
    for args, said in ((("spawned",), "No spawned agents\n"), (("fleet", "runs", "-C", str(tmp_path)), "No runs yet\n"),
                       (("history", "never:used"), "No messages on never:used\n"),
                       (("log", "--type", "never.*"), "No activity\n")):  # fmt: skip
        r = fresh_daemon.pd(*args)
        assert r.returncode == 0 and said in (r.stdout, r.stderr) and "---" not in r.stdout, (args, r.stdout, r.stderr)


def test_the_activity_log_shows_times_as_the_other_listings_do(fresh_daemon: Daemon) -> None:
    """pd log printed ``expiresAt=1795537013881``: a time, for people, is shown as every other listing shows
    it (``in 5m``, ``3m ago``). --json keeps the daemon's reply, epoch milliseconds and all."""
    d = fresh_daemon
    d.call("lock.acquire", name="log-times", owner="timer", ttl=300_000)
    human = d.pd("log", "--type", "lock.*")
    assert human.returncode == 0 and re.search(r"expiresAt=in [45]m\b", human.stdout), human.stdout
    assert not re.search(r"\d{10,}", human.stdout), human.stdout
    (entry,) = json.loads(d.pd("log", "--type", "lock.*", "--json").stdout)["entries"]
    assert f"expiresAt={entry['metadata']['expiresAt']}" in entry["details"]


def test_the_activity_log_leaves_out_empty_lists(fresh_daemon: Daemon) -> None:
    """pd log printed ``conflicts=`` for a claim that had none."""
    fresh_daemon.call("session.start", purpose="lists", agentId="lister", files=["src/a.ts"])
    (entry,) = json.loads(fresh_daemon.pd("log", "--type", "file.claim", "--json").stdout)["entries"]
    assert "paths=src/a.ts" in entry["details"] and "conflicts" not in entry["details"], entry["details"]
