"""Nothing acknowledged is lost, even if the daemon is killed with SIGKILL mid-write (DESIGN §5).

Every operation of the table is on exactly one of three lists: ``CASES`` (it changes durable state when it is
acknowledged: the test does it, kills the daemon with SIGKILL, restarts it on the same home and looks for the
effect, or for no trace of a refused one), ``NOT_DURABLE`` (what it changes is not meant to outlive the daemon,
with the reason) and ``READ_ONLY``. A new operation fails ``test_every_operation_is_classified`` until it is put
on one of them.

"Right after the acknowledgement" is made exact rather than left to a race: the daemon is stopped (SIGSTOP)
while every operation under test is sent on a connection of its own, followed by a slow read on one more
connection, then let go (SIGCONT). The IPC reactor serves all of those sockets in one pass: each reply goes out
as its operation returns, and the slow read holds the trio thread, so no background task (write-behind,
event subscribers) runs between the replies and the SIGKILL. What the replies promised must already be on
disk.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon, make_env

from portdaddy.core.ops import load_table
from portdaddy.errors import PDError
from portdaddy.ipc.client import reply_result, request_frame
from portdaddy.ipc.frame import Decoder, Encoder, Frame, Performative
from tests.fleet_helpers import make_project, wait_for

Call = Callable[..., Any]  # call(action, agent=None, **args) -> result; raises PDError on a refusal
State = dict[str, Any]

WORKTREE = "wt"  # under the daemon's home; claims of the cases meet only each other's
DEAD = ("dead-claim", "dead-complete", "dead-abandon", "dead-dismiss")  # agents that die before the cases run
WEBHOOK_URL = "http://127.0.0.1:9/hook"  # nothing listens: deliveries stay queued, which is what is checked
FLEET_YAML = "agents:\n  w: {trigger: never, backend: custom, command: 'true'}\n"


@dataclass(frozen=True)
class Case:
    """One acknowledged operation: ``setup`` (may be None) prepares with ordinary calls and returns the state
    ``act`` needs; ``act(state)`` gives (agent, args) of the operation under test; ``check(call, state,
    result)`` runs after the restart. A ``refused`` case expects a refusal and checks that it left no trace."""

    op: str
    label: str
    act: Callable[[State], tuple[str | None, dict[str, Any]]]
    check: Callable[[Call, State, Any], None]
    setup: Callable[[Call, State], None] | None = None
    refused: bool = False
    burst: bool = False  # self-contained: also fired by test_sigkill_mid_burst


def _not_found(call: Call, action: str, **args: Any) -> bool:
    try:
        call(action, **args)
    except PDError:
        return True
    return False


def _heat(call: Call, prefix: str) -> int:
    """Active claims under ``prefix`` in the file heat map (derived from claim events)."""
    return sum(f["activeClaims"] for f in call("pheromone.files", path=prefix)["files"])


def _wt(s: State) -> str:
    return s["worktree"]


# -- the cases, one or more per mutating operation -----------------------------------------------------------


def _session(call: Call, s: State, files: list[str] | None = None, agent: str | None = None) -> str:
    return call("session.start", purpose=f"work {s['k']}", files=files or [], worktree=_wt(s), agentId=agent)["id"]


def _setup_unregister(call: Call, s: State) -> None:
    agent = s["agent"] = f"u-{s['k']}"
    call("agent.register", agent, purpose="leaving")
    call("lock.acquire", agent, name=f"lk-{agent}", ttl=600_000)
    call("harbor.enter", agent, name=f"hb-{agent}")
    s["session"] = _session(call, s, [f"{agent}/x.py"], agent)


def _check_gone_agent(call: Call, s: State, status: str) -> None:
    agent = s["agent"]
    assert _not_found(call, "agent.get", id=agent), "agent still registered"
    assert not call("lock.get", name=f"lk-{agent}")["held"], "its lock is still held"
    members = [m["agentId"] for m in call("harbor.members", name=f"hb-{agent}")["members"]]
    assert agent not in members, "it is still a harbor member"
    assert call("session.get", sessionId=s["session"])["session"]["status"] == status
    assert _heat(call, f"{agent}/") == 0, "the file heat map still counts its claim"


def _setup_done(call: Call, s: State) -> None:
    agent = s["agent"] = f"d-{s['k']}"
    call("agent.begin", agent, purpose="finishing", files=[f"{agent}/x.py"], worktree=_wt(s))
    s["session"] = call("agent.whoami", agent)["sessionId"]
    call("lock.acquire", agent, name=f"lk-{agent}", ttl=600_000)
    call("harbor.enter", agent, name=f"hb-{agent}")


def _check_done(call: Call, s: State, r: Any) -> None:
    _check_gone_agent(call, s, "completed")
    notes = call("note.list", sessionId=s["session"])["notes"]
    assert [n["content"] for n in notes] == ["handed off"]


def _salvage_status(call: Call, agent: str) -> str:
    return next(e["status"] for e in call("salvage.list", all=True)["agents"] if e["id"] == agent)


def _setup_claimed(call: Call, s: State) -> None:
    call("salvage.claim", id="dead-abandon", newAgentId="rescuer")


def _setup_hook(call: Call, s: State) -> None:
    hook = call("webhook.register", url=WEBHOOK_URL, events=["lock.acquire"], filterPattern=f"whd-{s['k']}")
    s["hook"] = hook["id"]


def _setup_lock(call: Call, s: State) -> None:
    s["token"] = call("lock.acquire", name=f"lk-{s['k']}", owner="holder", ttl=60_000)["token"]


def _project(s: State) -> None:
    s["project"] = str(make_project(s["home"] / "fleets", FLEET_YAML, name=s["k"]))


def _setup_fleet(call: Call, s: State) -> None:
    _project(s)
    call("fleet.up", projectDir=s["project"])


def _fleet_dirs(call: Call) -> list[str]:
    return [f["projectDir"] for f in call("fleet.status")["fleets"]]


def _spawn(call: Call, s: State) -> None:
    """A run that is running: spawn.start answers once it is queued, and it registers and starts after that."""
    s["run"] = call("spawn.start", backend="custom", task="sleep 60", workdir=str(s["home"]))["agentId"]
    wait_for(lambda: _run_status(call, s["run"]) == "running", what=f"{s['run']} to run")


def _run_status(call: Call, run: str) -> str:
    return next(a["status"] for a in call("spawn.list")["agents"] if a["id"] == run)


def _held_paths(call: Call, s: State, path: str) -> list[str]:
    return [o["sessionId"] for o in call("file.owners", path=path, worktree=_wt(s))["owners"]]


# fmt: off
CASES: tuple[Case, ...] = (
    Case("port.claim", "claim", lambda s: (None, {"id": f"dur-{s['k']}:api", "metadata": {"k": s["k"]}}),
         lambda c, s, r: _eq(c("port.get", id=f"dur-{s['k']}:api")["service"]["port"], r["port"]), burst=True),
    Case("port.claim", "reserved port refused", lambda s: (None, {"id": f"rsv-{s['k']}", "port": 8080}),
         lambda c, s, r: _true(_not_found(c, "port.get", id=f"rsv-{s['k']}")), refused=True),
    Case("port.claim", "re-claim with new metadata", lambda s: (None, {"id": f"rc-{s['k']}:api", "metadata": {"v": 2}}),
         lambda c, s, r: _eq(c("port.get", id=f"rc-{s['k']}:api")["service"]["metadata"], {"v": 2}),
         setup=lambda c, s: c("port.claim", id=f"rc-{s['k']}:api", metadata={"v": 1})),
    Case("port.release", "release", lambda s: (None, {"id": f"rel-{s['k']}"}),
         lambda c, s, r: _true(_not_found(c, "port.get", id=f"rel-{s['k']}")),
         setup=lambda c, s: c("port.claim", id=f"rel-{s['k']}")),
    Case("port.endpoint", "endpoint", lambda s: (None, {"id": f"ep-{s['k']}", "env": "staging",
                                                        "url": "https://staging.example.com"}),
         lambda c, s, r: _eq(c("port.get", id=f"ep-{s['k']}")["service"]["urls"].get("staging"),
                             "https://staging.example.com"),
         setup=lambda c, s: c("port.claim", id=f"ep-{s['k']}")),
    Case("agent.register", "register", lambda s: (f"a-{s['k']}", {"purpose": f"p-{s['k']}"}),
         lambda c, s, r: _eq(c("agent.get", id=f"a-{s['k']}")["agent"]["purpose"], f"p-{s['k']}"), burst=True),
    Case("agent.heartbeat", "acknowledged heartbeat", lambda s: (f"hb-{s['k']}", {}),
         lambda c, s, r: _true(c("agent.get", id=f"hb-{s['k']}")["agent"]["lastHeartbeat"] >= r["lastHeartbeat"]),
         setup=lambda c, s: c("agent.register", f"hb-{s['k']}")),
    Case("agent.unregister", "unregister", lambda s: (s["agent"], {}),
         lambda c, s, r: _check_gone_agent(c, s, "abandoned"), setup=_setup_unregister),
    Case("salvage.claim", "claim", lambda s: (None, {"id": "dead-claim", "newAgentId": "rescuer"}),
         lambda c, s, r: _eq(_salvage_status(c, "dead-claim"), "claimed")),
    Case("salvage.complete", "complete", lambda s: (None, {"id": "dead-complete", "newAgentId": "rescuer"}),
         lambda c, s, r: _eq(_salvage_status(c, "dead-complete"), "completed")),
    Case("salvage.abandon", "abandon", lambda s: (None, {"id": "dead-abandon"}),
         lambda c, s, r: _eq(_salvage_status(c, "dead-abandon"), "pending"), setup=_setup_claimed),
    Case("salvage.dismiss", "dismiss", lambda s: (None, {"id": "dead-dismiss"}),
         lambda c, s, r: _eq(_salvage_status(c, "dead-dismiss"), "dismissed")),
    Case("session.start", "start with files",
         lambda s: (None, {"purpose": f"p-{s['k']}", "files": [f"ss-{s['k']}/a.py"], "worktree": _wt(s)}),
         lambda c, s, r: _eq(_held_paths(c, s, f"ss-{s['k']}/a.py"), [r["id"]]), burst=True),
    Case("session.end", "end with a note", lambda s: (None, {"sessionId": s["session"], "note": "handoff"}),
         lambda c, s, r: _true(c("session.get", sessionId=s["session"])["session"]["status"] == "completed"
                               and not _held_paths(c, s, f"se-{s['k']}/a.py")
                               and [n["content"] for n in c("note.list", sessionId=s["session"])["notes"]]
                               == ["handoff"]),
         setup=lambda c, s: s.update(session=_session(c, s, [f"se-{s['k']}/a.py"]))),
    Case("note.add", "note", lambda s: (None, {"sessionId": s["session"], "content": f"note {s['k']}"}),
         lambda c, s, r: _true([n["id"] for n in c("note.list", sessionId=s["session"])["notes"]] == [r["noteId"]]
                               and c("note.verify", sessionId=s["session"])["valid"]),
         setup=lambda c, s: s.update(session=_session(c, s))),
    Case("file.claim", "claim a glob",
         lambda s: (None, {"sessionId": s["session"], "files": [f"fc-{s['k']}/*.py"], "worktree": _wt(s)}),
         lambda c, s, r: _true(_held_paths(c, s, f"fc-{s['k']}/x.py") == [s["session"]]
                               and _heat(c, f"fc-{s['k']}/") == 1),
         setup=lambda c, s: s.update(session=_session(c, s))),
    Case("file.claim", "conflict refused",
         lambda s: (None, {"sessionId": s["other"], "files": [f"fx-{s['k']}/a.py"], "worktree": _wt(s)}),
         lambda c, s, r: _eq(_held_paths(c, s, f"fx-{s['k']}/a.py"), [s["session"]]), refused=True,
         setup=lambda c, s: s.update(session=_session(c, s, [f"fx-{s['k']}/a.py"]), other=_session(c, s))),
    Case("file.release", "release", lambda s: (None, {"sessionId": s["session"], "worktree": _wt(s)}),
         lambda c, s, r: _true(not _held_paths(c, s, f"fr-{s['k']}/a.py") and _heat(c, f"fr-{s['k']}/") == 0),
         setup=lambda c, s: s.update(session=_session(c, s, [f"fr-{s['k']}/a.py"]))),
    Case("agent.begin", "begin", lambda s: (f"b-{s['k']}", {"purpose": "begun", "files": [f"b-{s['k']}/a.py"],
                                                            "worktree": _wt(s)}),
         lambda c, s, r: _true(c("agent.get", id=f"b-{s['k']}")["agent"]["purpose"] == "begun"
                               and _held_paths(c, s, f"b-{s['k']}/a.py") == [r["sessionId"]]), burst=True),
    Case("agent.begin", "conflict refused",
         lambda s: (f"rb-{s['k']}", {"purpose": "begun", "files": [f"rb-{s['k']}/a.py"], "worktree": _wt(s)}),
         lambda c, s, r: _true(_not_found(c, "agent.get", id=f"rb-{s['k']}")), refused=True,
         setup=lambda c, s: _session(c, s, [f"rb-{s['k']}/a.py"])),
    Case("agent.done", "done", lambda s: (s["agent"], {"note": "handed off", "worktree": _wt(s)}), _check_done,
         setup=_setup_done),
    Case("lock.acquire", "acquire", lambda s: (None, {"name": f"lk-{s['k']}", "owner": "o", "ttl": 600_000}),
         lambda c, s, r: _eq(c("lock.get", name=f"lk-{s['k']}")["token"], r["token"]), burst=True),
    Case("lock.acquire", "held lock refused", lambda s: (None, {"name": f"lk-{s['k']}", "owner": "thief"}),
         lambda c, s, r: _true(c("lock.get", name=f"lk-{s['k']}")["owner"] == "holder"
                               and c("lock.get", name=f"lk-{s['k']}")["token"] == s["token"]),
         refused=True, setup=_setup_lock),
    Case("lock.acquire", "its webhook delivery is queued", lambda s: (None, {"name": f"whd-{s['k']}", "owner": "o"}),
         lambda c, s, r: _eq([d["event"] for d in c("webhook.deliveries", id=s["hook"])["deliveries"]],
                             ["lock.acquire"]), setup=_setup_hook),
    Case("lock.acquire", "re-acquire refreshes the lease",
         lambda s: (None, {"name": f"lk-{s['k']}", "owner": "holder", "ttl": 3_600_000}),
         lambda c, s, r: _eq(c("lock.get", name=f"lk-{s['k']}")["expiresAt"], r["expiresAt"]), setup=_setup_lock),
    Case("lock.release", "release", lambda s: (None, {"name": f"lk-{s['k']}", "owner": "holder"}),
         lambda c, s, r: _true(not c("lock.get", name=f"lk-{s['k']}")["held"]), setup=_setup_lock),
    Case("lock.extend", "extend", lambda s: (None, {"name": f"lk-{s['k']}", "owner": "holder", "ttl": 3_600_000}),
         lambda c, s, r: _eq(c("lock.get", name=f"lk-{s['k']}")["expiresAt"], r["expiresAt"]), setup=_setup_lock),
    Case("msg.publish", "publish", lambda s: (None, {"channel": f"ch-{s['k']}", "payload": {"k": s["k"]}}),
         lambda c, s, r: _eq([m["id"] for m in c("msg.history", channel=[f"ch-{s['k']}"])["messages"]], [r["id"]]),
         burst=True),
    Case("msg.clear", "clear", lambda s: (None, {"channel": f"cl-{s['k']}"}),
         lambda c, s, r: _eq(c("msg.history", channel=[f"cl-{s['k']}"])["messages"], []),
         setup=lambda c, s: c("msg.publish", channel=f"cl-{s['k']}", payload="gone")),
    Case("inbox.send", "send", lambda s: (None, {"to": f"ib-{s['k']}", "content": f"hi {s['k']}"}),
         lambda c, s, r: _eq([m["id"] for m in c("inbox.list", agentId=f"ib-{s['k']}")["messages"]],
                             [r["messageId"]]), burst=True),
    Case("inbox.read", "read", lambda s: (None, {"agentId": f"ir-{s['k']}"}),
         lambda c, s, r: _eq(c("inbox.stats", agentId=f"ir-{s['k']}")["unread"], 0),
         setup=lambda c, s: c("inbox.send", to=f"ir-{s['k']}", content="read me")),
    Case("inbox.clear", "clear", lambda s: (None, {"agentId": f"ic-{s['k']}"}),
         lambda c, s, r: _eq(c("inbox.stats", agentId=f"ic-{s['k']}")["total"], 0),
         setup=lambda c, s: c("inbox.send", to=f"ic-{s['k']}", content="clear me")),
    Case("webhook.register", "register", lambda s: (None, {"url": WEBHOOK_URL, "events": ["session.end"]}),
         lambda c, s, r: _eq(c("webhook.get", id=r["id"])["webhook"]["url"], WEBHOOK_URL)),
    Case("webhook.update", "update", lambda s: (None, {"id": s["hook"], "active": False}),
         lambda c, s, r: _eq(c("webhook.get", id=s["hook"])["webhook"]["active"], False), setup=_setup_hook),
    Case("webhook.delete", "delete", lambda s: (None, {"id": s["hook"]}),
         lambda c, s, r: _true(_not_found(c, "webhook.get", id=s["hook"])), setup=_setup_hook),
    Case("harbor.create", "create", lambda s: (None, {"name": f"h-{s['k']}", "capabilities": ["db:*"]}),
         lambda c, s, r: _eq(c("harbor.get", name=f"h-{s['k']}")["harbor"]["capabilities"], ["db:*"]), burst=True),
    Case("harbor.destroy", "destroy", lambda s: (None, {"name": f"hd-{s['k']}"}),
         lambda c, s, r: _true(_not_found(c, "harbor.get", name=f"hd-{s['k']}")),
         setup=lambda c, s: c("harbor.create", name=f"hd-{s['k']}")),
    Case("harbor.enter", "enter", lambda s: (f"he-{s['k']}", {"name": f"he-{s['k']}"}),
         lambda c, s, r: _eq([m["agentId"] for m in c("harbor.members", name=f"he-{s['k']}")["members"]],
                             [f"he-{s['k']}"]), burst=True),
    Case("harbor.leave", "leave", lambda s: (f"hl-{s['k']}", {"name": f"hl-{s['k']}"}),
         lambda c, s, r: _eq(c("harbor.members", name=f"hl-{s['k']}")["members"], []),
         setup=lambda c, s: c("harbor.enter", f"hl-{s['k']}", name=f"hl-{s['k']}")),
    Case("tuple.out", "out", lambda s: (None, {"fields": ["dur", s["k"]]}),
         lambda c, s, r: _eq([t["id"] for t in c("tuple.rd", pattern=["dur", s["k"]])["tuples"]], [r["id"]]),
         burst=True),
    Case("tuple.in", "take", lambda s: (None, {"pattern": ["take", s["k"]]}),
         lambda c, s, r: _true(r["count"] == 1 and c("tuple.count", pattern=["take", s["k"]])["count"] == 0),
         setup=lambda c, s: c("tuple.out", fields=["take", s["k"]])),
    Case("pheromone.spray", "acknowledged spray",
         lambda s: (None, {"table": "files", "id": f"p-{s['k']}", "key": "hot", "strength": 0.9}),
         lambda c, s, r: _true("hot" in c("pheromone.sniff", table="files", id=f"p-{s['k']}")["pheromones"]),
         burst=True),
    Case("arbiter.test", "synthetic violation", lambda s: (None, {"name": "NOTE_MONOTONICITY"}),
         lambda c, s, r: _true(r["violation"]["id"] in [v["id"] for v in c("arbiter.violations",
                                                                             limit=1000)["violations"]]),
         burst=True),
    Case("fleet.up", "up", lambda s: (None, {"projectDir": s["project"]}),
         lambda c, s, r: _true(s["project"] in _fleet_dirs(c)),
         setup=lambda c, s: _project(s)),
    Case("fleet.down", "down", lambda s: (None, {"projectDir": s["project"]}),
         lambda c, s, r: _true(s["project"] not in _fleet_dirs(c)), setup=_setup_fleet),
    Case("fleet.run", "run", lambda s: (None, {"projectDir": s["project"], "agent": "w"}),
         lambda c, s, r: _true(r["run"]["id"] in [x["id"] for x in c("fleet.runs", projectDir=s["project"])["runs"]]),
         setup=_setup_fleet),
    Case("fleet.reset", "reset", lambda s: (None, {"projectDir": s["project"], "agent": "w"}),
         lambda c, s, r: _true(c.sql("SELECT count(*) FROM fleet_resets WHERE project_dir=?", s["project"]) == 1),
         setup=_setup_fleet),
    Case("spawn.start", "spawn", lambda s: (None, {"backend": "custom", "task": "sleep 60", "workdir": str(s["home"])}),
         lambda c, s, r: _true(r["agentId"] in [a["id"] for a in c("spawn.list")["agents"]])),
    Case("spawn.kill", "kill", lambda s: (None, {"id": s["run"]}),
         lambda c, s, r: _eq(_run_status(c, s["run"]), "killed"), setup=_spawn),
)
# fmt: on

# What these change is not meant to outlive the daemon (or its connection).
NOT_DURABLE = {
    "msg.subscribe": "a subscription belongs to its IPC connection, which a restart closes",
    "msg.unsubscribe": "a subscription belongs to its IPC connection, which a restart closes",
}
# fmt: off
READ_ONLY = frozenset({
    "daemon.health", "daemon.version", "daemon.status", "port.find", "port.get", "agent.list", "agent.get",
    "salvage.list", "session.get", "session.list", "note.list", "note.verify", "file.list", "file.owners",
    "file.check", "agent.whoami", "journal.sitrep", "activity.list", "activity.summary", "lock.get", "lock.list",
    "msg.history", "msg.channels", "msg.poll", "msg.wait", "inbox.list", "inbox.stats", "webhook.list",
    "webhook.get", "webhook.test", "webhook.deliveries", "webhook.events", "harbor.list", "harbor.get",
    "harbor.members", "tuple.rd", "tuple.poll", "tuple.scan", "tuple.count", "pheromone.sniff", "pheromone.list",
    "pheromone.files", "arbiter.status", "arbiter.violations", "fleet.status", "fleet.runs", "fleet.logs",
    "fleet.show", "spawn.list", "spawn.logs", "spawn.wait",
})
# fmt: on


def _eq(got: Any, want: Any) -> None:
    assert got == want, f"got {got!r}, expected {want!r}"


def _true(ok: bool) -> None:
    assert ok, "the effect is not there"


# -- plumbing ------------------------------------------------------------------------------------------------


class Caller:
    """``call(action, agent=None, **args)`` over a fresh IPC connection; ``sql`` reads the store directly."""

    def __init__(self, d: Daemon) -> None:
        self.d = d

    def __call__(self, action: str, agent: str | None = None, **args: Any) -> Any:
        with self.d.client(agent) as c:
            return c.request(action, args, timeout=30)

    def sql(self, query: str, *args: Any) -> Any:
        with sqlite3.connect(self.d.settings.db) as db:
            return db.execute(query, args).fetchone()[0]


class Pending:
    """A request sent on a connection of its own; ``result()`` reads its one reply."""

    def __init__(self, d: Daemon, action: str, agent: str | None, args: dict[str, Any]) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(d.settings.ipc_sock))
        self.decoder = Decoder(from_daemon=True)
        # A first round trip: the daemon has accepted the connection and watches it before it is stopped.
        self.sock.sendall(request_frame(Encoder(), Performative.REQUEST, 1, "daemon.health", None, None))
        assert self.reply(timeout=10) is not None
        self.frame = request_frame(Encoder(), Performative.REQUEST, 2, action, agent, args)

    def send(self) -> None:
        self.sock.sendall(self.frame)

    def reply(self, timeout: float | None) -> Frame | None:
        self.sock.settimeout(timeout)
        while (event := self.decoder.next_event()) is None:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, BlockingIOError):  # BlockingIOError: timeout 0 found nothing
                return None
            assert data, "the daemon closed the connection"
            self.decoder.feed(data)
        assert isinstance(event, Frame), event
        return event

    def close(self) -> None:
        self.sock.close()


def act_then_kill(d: Daemon, sends: list[tuple[str, str | None, dict[str, Any]]]) -> list[Any]:
    """Send every request while the daemon is stopped, then a slow read behind them; SIGKILL the daemon as soon
    as every reply is in, while the slow read still holds its trio thread. Returns each result or PDError."""
    slow = Pending(d, "file.check", None, {"files": [f"zz/{i}/f.py" for i in range(200)],
                                           "worktree": str(d.home / "ballast")})  # fmt: skip
    pending = [Pending(d, action, agent, args) for action, agent, args in sends]
    assert d.proc is not None
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        for p in [*pending, slow]:  # sockets become readable in this order: the reactor serves them so
            p.send()
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    results: list[Any] = []
    for p in pending:
        frame = p.reply(timeout=20)
        assert frame is not None, "no reply"
        try:
            results.append(reply_result(frame))
        except PDError as e:
            results.append(e)
    answered = slow.reply(timeout=0)
    d.kill9()
    assert answered is None, "the slow read was answered before the kill: the background may have run; add ballast"
    for p in [*pending, slow]:
        p.close()
    return results


def ballast(call: Call, home: Path) -> None:
    """Claims the slow read compares its 200 paths with (~0.5 s on these machines)."""
    (home / "ballast").mkdir()
    for n in range(3):
        call("session.start", purpose="ballast", files=[f"b{n}/{i}/*.py" for i in range(200)],
             worktree=str(home / "ballast"))  # fmt: skip


def integrity(d: Daemon) -> None:
    with sqlite3.connect(d.settings.db) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _daemon(home: Path, **extra: str) -> Daemon:
    return Daemon(home, make_env(home, PORT_DADDY_WEBHOOK_ALLOW_PRIVATE="1", **extra))


def daemon_after_deaths(home: Path) -> Daemon:
    """A running daemon whose DEAD agents died in an earlier run (short thresholds for that run only, so that
    nothing else dies in the one the cases use): the salvage cases need dead agents."""
    d = _daemon(home, PORT_DADDY_STALE_AFTER="300ms", PORT_DADDY_DEAD_AFTER="600ms").start()
    try:
        call = Caller(d)
        for agent in DEAD:
            call("agent.register", agent)
        wait_for(lambda: len(call("salvage.list")["agents"]) == len(DEAD), what="the agents to die")
    finally:
        d.stop()
    return _daemon(home).start()


# -- the tests -----------------------------------------------------------------------------------------------


def test_every_operation_is_classified() -> None:
    covered = {c.op for c in CASES}
    lists = [covered, set(NOT_DURABLE), set(READ_ONLY)]
    table = set(load_table())
    assert not (unlisted := table - set().union(*lists)), f"put each on a list of test_durability.py: {unlisted}"
    assert not (stale := set().union(*lists) - table), f"no longer in the operation table: {stale}"
    assert sum(map(len, lists)) == len(table), "an operation is on two lists"


def test_every_acknowledged_change_survives_sigkill(tmp_home: Path) -> None:
    d = daemon_after_deaths(tmp_home)
    try:
        call = Caller(d)
        ballast(call, tmp_home)
        (tmp_home / WORKTREE).mkdir()
        states = [{"k": f"c{n}", "home": tmp_home, "worktree": str(tmp_home / WORKTREE)} for n in range(len(CASES))]
        for case, state in zip(CASES, states, strict=True):
            if case.setup is not None:
                case.setup(call, state)
        ops = load_table()
        # Operations that wait (async handlers) answer from a task of their own, not in the reactor's pass:
        # they are acknowledged first, the fenced ones right before the kill.
        waiting = [(case, state) for case, state in zip(CASES, states, strict=True) if ops[case.op].is_async]
        fenced = [(case, state) for case, state in zip(CASES, states, strict=True) if not ops[case.op].is_async]
        results = {id(case): _result(call, case, state) for case, state in waiting}
        sends = [(case.op, *case.act(state)) for case, state in fenced]
        results |= {id(case): r for (case, _), r in zip(fenced, act_then_kill(d, sends), strict=True)}
        integrity(d)
        d.start()
        failures = []
        for case, state in zip(CASES, states, strict=True):
            result = results[id(case)]
            if isinstance(result, PDError) != case.refused:
                failures.append(f"{case.op} ({case.label}): unexpected reply {result!r}")
                continue
            try:
                case.check(call, state, result)
            except (AssertionError, PDError, LookupError, StopIteration) as e:
                failures.append(f"{case.op} ({case.label}): lost after SIGKILL: {e!r}")
        assert not failures, "\n".join(failures)
    finally:
        d.stop()


def _result(call: Call, case: Case, state: State) -> Any:
    agent, args = case.act(state)
    try:
        return call(case.op, agent, **args)
    except PDError as e:
        return e


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_mid_burst(tmp_home: Path, seed: int) -> None:
    """A client fires acknowledged writes of every self-contained kind (and fire-and-forget frames between
    them) while the daemon is killed at a random moment: every acknowledged one is there after the restart."""
    rng = random.Random(seed)
    kinds = [c for c in CASES if c.burst]
    (tmp_home / WORKTREE).mkdir()
    d = _daemon(tmp_home).start()
    try:
        call = Caller(d)
        acked: list[tuple[Case, State, Any]] = []

        def fire() -> None:
            n = 0
            try:
                with d.client() as noise:
                    while True:
                        case = kinds[n % len(kinds)]
                        state = {"k": f"s{seed}-{n}", "home": tmp_home, "worktree": str(tmp_home / WORKTREE)}
                        agent, args = case.act(state)
                        noise.send("pheromone.spray", {"table": "files", "id": f"ff-{n}", "key": "k", "strength": 1})
                        noise.send("msg.publish", {"channel": f"ff-{seed}", "payload": n})
                        with d.client(agent) as c:  # a connection speaks for one agent
                            acked.append((case, state, c.request(case.op, args, timeout=5)))
                        n += 1
            except PDError:  # the daemon is gone (DaemonUnavailable, or a refusal as it died)
                pass

        writer = threading.Thread(target=fire)
        writer.start()
        time.sleep(rng.uniform(0.3, 1.5))
        d.kill9()
        writer.join(timeout=30)
        assert len(acked) > len(kinds), "too few writes before the kill to mean anything"
        integrity(d)
        d.start()
        lost = []
        for case, state, result in acked:
            try:
                case.check(call, state, result)
            except (AssertionError, PDError, LookupError, StopIteration) as e:
                lost.append(f"{case.op} {state['k']}: {e!r}")
        assert not lost, f"{len(lost)} of {len(acked)} acknowledged writes lost:\n" + "\n".join(lost[:20])
    finally:
        d.stop()
