"""Harbors through the CLI: enter (created on first use), show, list, leave, destroy; bad input changes nothing."""

from __future__ import annotations

import json


def test_enter_show_list_leave_destroy(daemon) -> None:
    r = daemon.pd("harbor", "enter", "hb:fleet", "--agent", "spider", "--cap", "db:read,deploy:*")
    assert r.returncode == 0, r.stderr
    daemon.pd("harbor", "enter", "hb:fleet", "--agent", "qa")
    shown = json.loads(daemon.pd("harbor", "show", "hb:fleet", "--json").stdout)["harbor"]
    assert {m["agentId"]: m["capabilities"] for m in shown["members"]} == {"spider": ["db:read", "deploy:*"], "qa": []}
    assert "hb:fleet" in daemon.pd("harbor", "list", "hb:*", "-q").stdout.split()
    agent_view = daemon.call("harbor.list", agentId="spider")
    assert [h["name"] for h in agent_view["harbors"]] == ["hb:fleet"]
    assert daemon.pd("harbor", "leave", "hb:fleet", "--agent", "qa").returncode == 0
    assert daemon.pd("harbor", "leave", "hb:fleet", "--agent", "qa").returncode == 1  # not a member
    assert daemon.pd("harbor", "destroy", "hb:fleet").returncode == 0
    assert daemon.pd("harbor", "show", "hb:fleet").returncode == 1


def test_create_keeps_an_existing_harbor(daemon) -> None:
    first = daemon.call("harbor.create", name="hb:keep", capabilities=["a"])
    second = daemon.call("harbor.create", name="hb:keep", capabilities=["b"])
    assert first["created"] and not second["created"] and second["harbor"]["capabilities"] == ["a"]
    # Said as other confirmations are ("Webhook registered: …"); it was "created: harbor hb:cli".
    assert daemon.pd("harbor", "create", "hb:cli").stdout == "Harbor created: hb:cli\n"
    assert daemon.pd("harbor", "create", "hb:cli", "--cap", "x").stdout == "Harbor hb:cli exists already (unchanged)\n"


def test_bad_input_exits_2_and_changes_nothing(daemon) -> None:
    before = daemon.call("harbor.list")["count"]
    for args in (
        ("enter", "bad name", "--agent", "x"),
        ("create", "x" * 200),
        ("enter", "ok:h", "--agent", "x", "--cap", "a b"),
    ):
        r = daemon.pd("harbor", *args)
        assert r.returncode == 2 and r.stderr.startswith("error: "), (args, r.stderr)
    assert daemon.call("harbor.list")["count"] == before


def test_harbors_survive_sigkill(fresh_daemon) -> None:
    fresh_daemon.call("harbor.enter", name="dur:fleet", agentId="a1", capabilities=["x"])
    fresh_daemon.kill9()
    fresh_daemon.start()
    members = fresh_daemon.call("harbor.members", name="dur:fleet")["members"]
    assert [(m["agentId"], m["capabilities"]) for m in members] == [("a1", ["x"])]
