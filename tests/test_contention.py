"""Contention is exact: wherever concurrent callers compete for one thing, exactly one wins, every loser gets
the documented refusal, and nothing half-done is left behind.

Each race is 16-32 real OS processes against a real daemon, each with its own IPC connection or HTTP
connection (or a whole `pd` run), released together at one gate (``conftest.race``). Raced
elsewhere: claims of one identity (test_foundation), one lock (test_locks), taking tuples (test_tuples), a
fleet going down (test_fleet). spec/decisions.md, "Contention", lists who wins what.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from conftest import PYTHON, Daemon, Outcome, Racers, free_port, http, ipc, linked_worktree, pd, race, winners


def _wait_for(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not reached in time"
        time.sleep(0.02)


def _refused(outcomes: list[Outcome], code: str) -> list[Outcome]:
    """The losers, each checked to have been refused with ``code`` (a pd racer without --json: exit 1)."""
    losers = [o for o in outcomes if o.code != 0]
    for o in losers:
        assert o.code == 1, o
        assert o.error == code or (o.how == "pd" and o.reply is None), o
    return losers


# -- advisory file claims ---------------------------------------------------------------------------------------

# Every two of these overlap (a plain path covers its subtree; src/api/pay.ts is in all of them).
_OVERLAPPING = ("src/api/pay.ts", "src/api/*", "src/api", "src/*/pay.ts", "**/pay.ts")


def test_one_file_many_sessions_exactly_one_holds_it(fresh_daemon: Daemon, tmp_path: Path) -> None:
    """Agents in worktrees of one repository claim overlapping paths at once, by every door: file.claim on a
    session they have, session.start with files, over IPC, HTTP and pd. One holds it; the rest are refused
    FILE_CONFLICT naming the holder, and a refused session.start leaves no session."""
    d = fresh_daemon
    trees = [linked_worktree(tmp_path, f"w{i}") for i in range(24)]
    existing = [d.call("session.start", purpose=f"work {i}", agentId=f"a{i}", worktree=str(trees[i]))["id"]
                for i in range(12)]  # fmt: skip
    path = [_OVERLAPPING[i % len(_OVERLAPPING)] for i in range(24)]
    racers = [ipc("file.claim", agent=f"a{i}", sessionId=existing[i], files=[path[i]]) for i in range(6)]
    racers += [http("POST", f"/sessions/{existing[i]}/files", {"files": [path[i]]}) for i in range(6, 9)]
    racers += [pd("session", "files", "claim", path[i], "--session", existing[i], *(["--json"] * (i % 2)),
                  cwd=trees[i]) for i in range(9, 12)]  # fmt: skip
    racers += [ipc("session.start", agent=f"a{i}", purpose=f"new {i}", files=[path[i]], worktree=str(trees[i]))
               for i in range(12, 18)]  # fmt: skip
    racers += [http("POST", "/sessions", {"purpose": f"new {i}", "agentId": f"a{i}", "files": [path[i]],
                                          "worktree": str(trees[i])}) for i in range(18, 21)]  # fmt: skip
    racers += [pd("session", "start", f"new {i}", path[i], *(["--json"] * (i % 2)), cwd=trees[i],
                  env={"PORT_DADDY_AGENT": f"a{i}"}) for i in range(21, 24)]  # fmt: skip
    outcomes = race(d, racers)

    won = winners(outcomes)
    assert len(won) == 1, outcomes
    w = outcomes.index(won[0])
    holder = existing[w] if w < 12 else d.call("session.list", agent=f"a{w}")["sessions"][0]["id"]
    claims = d.call("file.list")["claims"]
    assert [(c["sessionId"], c["filePath"], c["forced"]) for c in claims] == [(holder, path[w], False)]
    for o in _refused(outcomes, "FILE_CONFLICT"):
        if o.reply is not None:
            assert {c["sessionId"] for c in o.reply["conflicts"]} == {holder}, o
        else:
            assert f"claimed by {holder}" in o.stderr and "Use --force to claim anyway" in o.stderr, o
    active = d.call("session.list")["sessions"]
    assert len(active) == 12 + (w >= 12), "a refused session.start left a session behind"
    assert all(s["files"] == [] for s in active if s["id"] != holder)
    for i in range(21, 24):  # pd session start remembers a session only if it started one
        assert (trees[i] / ".portdaddy" / "current.json").exists() == (i == w)


def test_pd_begin_with_the_same_files_exactly_one_begins_and_losers_leave_nothing(fresh_daemon: Daemon,
                                                                                  tmp_path: Path) -> None:  # fmt: skip
    d = fresh_daemon
    trees = [linked_worktree(tmp_path, f"b{i}") for i in range(24)]
    path = [_OVERLAPPING[i % len(_OVERLAPPING)] for i in range(24)]
    racers = [pd("begin", f"task {i}", "--agent", f"b{i}", "--files", path[i], *(["--json"] * (i % 2)),
                 cwd=trees[i]) for i in range(12)]  # fmt: skip
    racers += [http("POST", "/sugar/begin", {"purpose": f"task {i}", "agentId": f"b{i}", "files": [path[i]],
                                             "worktree": str(trees[i])}) for i in range(12, 18)]  # fmt: skip
    racers += [ipc("agent.begin", purpose=f"task {i}", agentId=f"b{i}", files=[path[i]], worktree=str(trees[i]))
               for i in range(18, 24)]  # fmt: skip
    outcomes = race(d, racers)

    won = winners(outcomes)
    assert len(won) == 1, outcomes
    w = outcomes.index(won[0])
    losers = _refused(outcomes, "FILE_CONFLICT")
    assert all("Use --force to claim anyway" in o.stderr for o in losers if o.how == "pd" and o.reply is None)
    assert [a["id"] for a in d.call("agent.list")["agents"]] == [f"b{w}"], "a refused begin registered its agent"
    sessions = d.call("session.list")["sessions"]
    assert [(s["agentId"], s["files"]) for s in sessions] == [(f"b{w}", [path[w]])]
    remembered = [i for i in range(12) if (trees[i] / ".portdaddy" / "current.json").exists()]
    assert remembered == ([w] if w < 12 else [])


# -- salvage --------------------------------------------------------------------------------------------------


def test_many_agents_claim_one_dead_agents_work_exactly_one_gets_it(daemon_factory: Any) -> None:
    """Claimers by IPC, HTTP and pd, and the dead agent itself coming back (which takes its own work back),
    all at once: the work has exactly one new owner, and whoever lost is told whose it is."""
    d = daemon_factory(PORT_DADDY_DEAD_AFTER="2s")
    d.call("agent.begin", agentId="fallen", purpose="payments schema", identity="pay:db", files=["db/schema.sql"])
    d.call("note.add", agentId="fallen", content="refunds table half done")
    _wait_for(lambda: d.call("salvage.list", project="pay")["count"] == 1, "fallen declared dead")
    racers = [ipc("salvage.claim", id="fallen", newAgentId=f"s{i}") for i in range(12)]
    racers += [http("POST", "/salvage/claim/fallen", {"newAgentId": f"s{i}"}) for i in range(12, 18)]
    racers += [pd("salvage", "claim", "fallen", "--agent", f"s{i}", "--json") for i in range(18, 23)]
    racers.append(ipc("agent.heartbeat", agent="fallen"))
    outcomes = race(d, racers)

    back = outcomes.pop()
    assert back.code == 0, back
    # Told from the replies: "fallen" is alive again either way, and may die again (2s) before we look.
    won = winners(outcomes)
    if "the work is its own again" in back.reply["deathNotice"]:  # it spoke first
        assert won == [], outcomes
    else:
        assert len(won) == 1, outcomes
        new_owner = won[0].reply["agent"]["claimedBy"]
        assert (won[0].reply["agent"]["status"], new_owner) == ("claimed", f"s{outcomes.index(won[0])}")
        assert "refunds table half done" in [n["content"] for n in won[0].reply["context"]["notes"]]
        assert f"{new_owner} took its work over" in back.reply["deathNotice"]
    for o in _refused(outcomes, "CONFLICT"):
        assert "salvage entry fallen is claimed, not pending" in o.reply["message"], o
    claimed = [m for m in d.call("msg.history", channel="resurrection", limit=100)["messages"]
               if m["payload"].get("type") == "claimed"]  # fmt: skip
    assert len(claimed) == len(won)


# -- harbors --------------------------------------------------------------------------------------------------


def test_many_create_one_harbor_exactly_one_creates_it(daemon: Daemon) -> None:
    """harbor.create of an existing name is not refused: it answers created: false and changes nothing
    (spec/swarm.md), so the winner is the one that says created, and its capabilities are the harbor's."""
    racers = [ipc("harbor.create", name="race:harbor", capabilities=[f"cap{i}"]) for i in range(12)]
    racers += [http("POST", "/harbors", {"name": "race:harbor", "capabilities": [f"cap{i}"]}) for i in range(12, 18)]
    racers += [pd("harbor", "create", "race:harbor", "--cap", f"cap{i}", "-q") for i in range(18, 24)]
    outcomes = race(daemon, racers)

    assert all(o.code == 0 for o in outcomes), outcomes
    created = [i for i, o in enumerate(outcomes) if (o.stdout.strip() == "created" if o.how == "pd"
                                                     else o.reply["created"])]  # fmt: skip
    assert len(created) == 1, outcomes
    assert all(o.stdout.strip() == "exists" for o in outcomes if o.how == "pd" and o is not outcomes[created[0]])
    assert daemon.call("harbor.get", name="race:harbor")["harbor"]["capabilities"] == [f"cap{created[0]}"]


# -- agents ---------------------------------------------------------------------------------------------------


def test_many_register_one_agent_id_it_is_registered_once(daemon: Daemon) -> None:
    racers = [ipc("agent.register", agentId="twin", purpose=f"p{i}") for i in range(12)]
    racers += [http("POST", "/agents", {"agentId": "twin", "purpose": f"p{i}"}) for i in range(12, 18)]
    racers += [pd("agent", "register", "--agent", "twin", "--purpose", f"p{i}", "--json") for i in range(18, 24)]
    outcomes = race(daemon, racers)

    assert all(o.code == 0 for o in outcomes), outcomes
    assert sum(o.reply["registered"] for o in outcomes) == 1
    assert [a["id"] for a in daemon.call("agent.list")["agents"]].count("twin") == 1
    announced = [m for m in daemon.call("msg.history", channel="agents", limit=1000)["messages"]
                 if m["payload"] == {"type": "registered", "agentId": "twin", "identity": None,
                                     "purpose": m["payload"]["purpose"]}]  # fmt: skip
    assert len(announced) == 1


def test_one_agent_begins_from_many_processes_at_once(daemon: Daemon, tmp_path: Path) -> None:
    """An agent may hold several sessions (spec/journal.md): every `pd begin` starts one and is told of those
    begun before it, so the replies list 0, 1, ... 23 earlier sessions, one each; the agent is registered once,
    and the worktree's file names the agent and one of its sessions."""
    tree = linked_worktree(tmp_path, "shared")
    outcomes = race(daemon, [pd("begin", f"part {i} " + "x" * i, "--agent", "many-hands", "--json", cwd=tree)
                             for i in range(24)])  # fmt: skip
    assert all(o.code == 0 for o in outcomes), outcomes
    assert sorted(len(o.reply["stillActive"]) for o in outcomes) == list(range(24))
    sessions = {o.reply["sessionId"] for o in outcomes}
    assert {s["id"] for s in daemon.call("session.list", agent="many-hands")["sessions"]} == sessions
    assert [a["id"] for a in daemon.call("agent.list")["agents"]].count("many-hands") == 1
    current = json.loads((tree / ".portdaddy" / "current.json").read_text())
    assert current["agentId"] == "many-hands" and current["sessionId"] in sessions


_REMEMBERING = """
import sys
from pathlib import Path
from portdaddy.cli.context import save_current
size = int(sys.argv[2])
for n in range(300):
    save_current({"agentId": "a" * size, "sessionId": f"session-{n}", "purpose": "p" * 7 * size}, Path(sys.argv[1]))
"""


def test_current_json_is_never_read_torn_while_pd_processes_rewrite_it(tmp_path: Path) -> None:
    """What `pd begin`/`pd agent register` do to the shared file, from 8 processes at once, while another reads
    it as every pd command does: each read finds one writer's file whole (in place, reads found it empty or
    with another's tail, and the reader forgot its agent)."""
    from portdaddy.cli.context import current_path, save_current

    save_current({"agentId": "first"}, tmp_path)
    writers = [subprocess.Popen([PYTHON, "-c", _REMEMBERING, str(tmp_path), str(n)]) for n in range(1, 9)]
    torn = 0
    while any(w.poll() is None for w in writers):
        try:
            json.loads(current_path(tmp_path).read_text())
        except ValueError:
            torn += 1
    assert [w.wait() for w in writers] == [0] * 8
    assert torn == 0
    assert json.loads(current_path(tmp_path).read_text())["sessionId"] == "session-299"
    assert sorted(p.name for p in current_path(tmp_path).parent.iterdir()) == [".gitignore", "current.json"]


# -- locks ----------------------------------------------------------------------------------------------------


def test_a_released_lock_goes_to_its_waiters_one_at_a_time_in_order(daemon: Daemon) -> None:
    """16 waiters queue one after another (IPC and HTTP); the holder's release races 8 non-blocking callers,
    who are refused: the lock goes to the first waiter, and each release to the next, in the order they came."""
    d = daemon
    d.call("lock.acquire", name="fifo:many", owner="holder")
    waiting = []
    try:
        for n in range(16):
            args = {"owner": f"w{n}", "wait": True, "timeout": "60s"}
            if n % 4 == 3:
                racer = http("POST", "/locks/fifo:many", args)
            else:
                racer = ipc("lock.acquire", name="fifo:many", **args)
            waiting.append(Racers(d, [racer]).go())
            _wait_for(lambda n=n: d.call("daemon.status")["counts"]["lockWaiters"] == n + 1, f"waiter {n} queued")
        barging = race(d, [ipc("lock.release", name="fifo:many", owner="holder")]
                       + [ipc("lock.acquire", name="fifo:many", owner=f"barger{i}") for i in range(8)])  # fmt: skip
        assert barging[0].code == 0 and barging[0].reply["released"]
        assert all(o.error == "LOCK_HELD" and o.reply["holder"] in ("holder", "w0") for o in barging[1:]), barging
        tokens = []
        for n, waiter in enumerate(waiting):
            got = waiter.outcomes()[0]
            assert got.code == 0 and got.reply["owner"] == f"w{n}", got
            assert d.call("lock.get", name="fifo:many")["owner"] == f"w{n}"
            assert d.call("daemon.status")["counts"]["lockWaiters"] == 15 - n
            tokens.append(got.reply["token"])
            assert d.call("lock.release", name="fifo:many", owner=f"w{n}")["released"]
        assert tokens == sorted(set(tokens))
    finally:
        for waiter in waiting:
            waiter.close()


def test_a_release_and_a_waiting_acquire_at_once_the_waiter_gets_the_lock(daemon: Daemon) -> None:
    """16 locks, each released by its holder as a waiter asks for it with wait: true, all at once. Whichever
    comes first, every waiter gets its lock (one that came just before the release used to queue on the lock
    the release had just freed, and time out)."""
    for n in range(16):
        daemon.call("lock.acquire", name=f"pair:{n}", owner=f"h{n}")
    outcomes = race(daemon, [r for n in range(16) for r in (
        ipc("lock.release", name=f"pair:{n}", owner=f"h{n}"),
        ipc("lock.acquire", name=f"pair:{n}", owner=f"w{n}", wait=True, timeout="5s"),
    )])  # fmt: skip
    assert all(o.code == 0 for o in outcomes), [o for o in outcomes if o.code]
    assert [daemon.call("lock.get", name=f"pair:{n}")["owner"] for n in range(16)] == [f"w{n}" for n in range(16)]


def test_an_out_and_a_waiting_take_at_once_the_taker_gets_the_tuple(daemon: Daemon) -> None:
    """As for locks: 16 tuples, each written as a taker waits for it, all at once; every taker gets its own."""
    outcomes = race(daemon, [r for n in range(16) for r in (
        ipc("tuple.out", fields=["pair", n], harbor="pairs"),
        ipc("tuple.in", pattern=["pair", n], harbor="pairs", wait=True, timeout="5s"),
    )])  # fmt: skip
    assert all(o.code == 0 for o in outcomes), [o for o in outcomes if o.code]
    assert [o.reply["tuple"]["fields"] for o in outcomes[1::2]] == [["pair", n] for n in range(16)]
    assert daemon.call("tuple.count", harbor="pairs")["count"] == 0


# -- ports ----------------------------------------------------------------------------------------------------


def test_many_identities_ask_for_one_port_exactly_one_gets_it(daemon: Daemon) -> None:
    """A taken preferred port is not refused (as the original): the others are assigned free ports of their
    own and told who holds the one they asked for."""
    port = free_port()
    racers = [ipc("port.claim", id=f"want:s{i}", port=port) for i in range(12)]
    racers += [http("POST", "/claim", {"id": f"want:s{i}", "port": port}) for i in range(12, 18)]
    racers += [pd("claim", f"want:s{i}", "--port", str(port), "--json") for i in range(18, 24)]
    outcomes = race(daemon, racers)

    assert all(o.code == 0 for o in outcomes), outcomes
    got = [o.reply["port"] for o in outcomes]
    holders = [i for i, p in enumerate(got) if p == port]
    assert len(holders) == 1 and len(set(got)) == 24, got
    holder = f"want:s{holders[0]}"
    assert outcomes[holders[0]].reply["message"] == "assigned preferred port"
    taken = f"preferred port {port} is taken by {holder}; assigned a free one"
    assert all(o.reply["message"] == taken for i, o in enumerate(outcomes) if i != holders[0])
    services = daemon.call("port.find", pattern="want:*")["services"]
    assert [s["id"] for s in services if s["port"] == port] == [holder]


def test_the_last_service_of_an_agents_quota_goes_to_exactly_one_claim(daemon: Daemon) -> None:
    """An agent may claim maxServices services; claims of new identities as that agent, from many processes
    at once, take its last place: one gets it, the rest RESOURCE_LIMIT, and none is recorded."""
    daemon.call("agent.register", agentId="quota-bot", maxServices=3)
    with daemon.client("quota-bot") as c:
        for n in range(2):
            c.request("port.claim", {"id": f"quota:held{n}"})
    racers = [ipc("port.claim", agent="quota-bot", id=f"quota:s{i}") for i in range(12)]
    racers += [http("POST", "/claim", {"id": f"quota:s{i}"}, agent="quota-bot") for i in range(12, 18)]
    racers += [pd("claim", f"quota:s{i}", "-q", env={"PORT_DADDY_AGENT": "quota-bot"}) for i in range(18, 24)]
    outcomes = race(daemon, racers)

    won = winners(outcomes)
    assert len(won) == 1, outcomes
    for o in _refused(outcomes, "RESOURCE_LIMIT"):
        assert "quota-bot has 3 services, its limit" in (o.stderr if o.how == "pd" else o.reply["message"]), o
    claimed = {s["id"] for s in daemon.call("port.find", pattern="quota:*")["services"]}
    assert claimed == {"quota:held0", "quota:held1", f"quota:s{outcomes.index(won[0])}"}


# -- sessions and agents ending -------------------------------------------------------------------------------


def test_many_end_one_session_exactly_one_ends_it_with_one_handoff(daemon: Daemon) -> None:
    sid = daemon.call("session.start", purpose="ending", agentId="ender")["id"]
    racers = [ipc("session.end", sessionId=sid, note=f"handoff {i}") for i in range(12)]
    racers += [http("PUT", f"/sessions/{sid}", {"note": f"handoff {i}"}) for i in range(12, 18)]
    racers += [pd("session", "end", f"handoff {i}", "--session", sid, "--json") for i in range(18, 24)]
    outcomes = race(daemon, racers)

    won = winners(outcomes)
    assert len(won) == 1, outcomes
    for o in _refused(outcomes, "CONFLICT"):
        assert f"session {sid} is completed" in o.reply["message"]
    notes = daemon.call("note.list", sessionId=sid)["notes"]
    assert [(n["type"], n["content"]) for n in notes] == [("handoff", f"handoff {outcomes.index(won[0])}")]


def test_many_dones_for_one_agent_exactly_one_unregisters_it(daemon: Daemon, tmp_path: Path) -> None:
    tree = linked_worktree(tmp_path, "leaving")
    begun = daemon.call("agent.begin", agentId="leaver", purpose="leave", files=["leave/"], worktree=str(tree))
    sid = begun["sessionId"]
    racers = [ipc("agent.done", agentId="leaver", note=f"bye {i}", worktree=str(tree)) for i in range(12)]
    racers += [http("POST", "/sugar/done", {"agentId": "leaver", "note": f"bye {i}", "worktree": str(tree)})
               for i in range(12, 18)]  # fmt: skip
    racers += [pd("done", f"bye {i}", "--agent", "leaver", "--json", cwd=tree) for i in range(18, 24)]
    outcomes = race(daemon, racers)

    won = winners(outcomes)
    assert len(won) == 1 and won[0].reply["agentUnregistered"], outcomes
    _refused(outcomes, "NO_ACTIVE_SESSION")
    notes = daemon.call("note.list", sessionId=sid)["notes"]
    assert [n["content"] for n in notes] == [f"bye {outcomes.index(won[0])}"]
    assert daemon.call("file.list", path="leave/")["claims"] == []


# -- inbox and webhooks ---------------------------------------------------------------------------------------


def test_many_mark_one_message_read_exactly_one_marks_it(daemon: Daemon) -> None:
    mid = daemon.call("inbox.send", to="reader", content="read me")["messageId"]
    racers = [ipc("inbox.read", agentId="reader", messageId=mid)] * 12
    racers += [http("PUT", f"/agents/reader/inbox/{mid}/read")] * 6
    racers += [pd("inbox", "read", str(mid), "--agent", "reader", "-q")] * 6
    outcomes = race(daemon, racers)

    assert all(o.code == 0 for o in outcomes), outcomes
    marked = [int(o.stdout) if o.how == "pd" else o.reply["marked"] for o in outcomes]
    assert sorted(marked) == [0] * 23 + [1]


def test_the_last_place_in_a_full_inbox_goes_to_exactly_one_sender(daemon: Daemon) -> None:
    for start in range(0, 999, 250):  # a few connections: each stays under the per-connection rate limit
        with daemon.client() as c:
            for n in range(start, min(start + 250, 999)):
                c.request("inbox.send", {"to": "busy", "content": f"m{n}"})
    racers = [ipc("inbox.send", to="busy", content=f"last {i}") for i in range(12)]
    racers += [http("POST", "/agents/busy/inbox", {"content": f"last {i}"}) for i in range(12, 18)]
    racers += [pd("inbox", "send", "busy", f"last {i}", "--json") for i in range(18, 24)]
    outcomes = race(daemon, racers)

    won = winners(outcomes)
    assert len(won) == 1, outcomes
    for o in _refused(outcomes, "RESOURCE_LIMIT"):
        assert (o.reply["current"], o.reply["max"]) == (1000, 1000), o
    assert daemon.call("inbox.stats", agentId="busy")["total"] == 1000


def test_the_last_webhook_place_goes_to_exactly_one(fresh_daemon: Daemon) -> None:
    """At most 100 webhooks: with 99 registered, one of many registrations at once is the 100th."""
    hook = {"events": ["service.expire"], "filterPattern": "never:*"}
    with fresh_daemon.client() as c:
        for n in range(99):
            c.request("webhook.register", {"url": f"https://hooks.example.com/h{n}", **hook})
    url = "https://hooks.example.com/last"
    racers = [ipc("webhook.register", url=url, **hook)] * 12
    racers += [http("POST", "/webhooks", {"url": url, **hook})] * 6
    racers += [pd("webhook", "add", url, "--events", "service.expire", "--filter", "never:*", "--json")] * 6
    outcomes = race(fresh_daemon, racers)

    assert len(winners(outcomes)) == 1, outcomes
    _refused(outcomes, "RESOURCE_LIMIT")
    hooks = fresh_daemon.call("webhook.list")["webhooks"]
    assert len(hooks) == 100 and [h["url"] for h in hooks].count(url) == 1
