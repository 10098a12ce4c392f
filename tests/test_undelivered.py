"""A reply that hands something over and never reaches its caller gives it back (spec/decisions.md, "Durability").

The daemon learns of a hang-up when it reads the end of the stream, and may hand something to a caller who has
gone before that: a take or a grant it answered into a socket whose peer had closed, a reply still queued when
the connection closed. Those replies were dropped, and with them a tuple its writer was told was written, or a
lock held by nobody until its lease ran out. Each test makes the order exact: the daemon is stopped (SIGSTOP)
while the callers act, so that it finds everything in one pass when it goes on.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import Daemon

from portdaddy.errors import PDError
from portdaddy.ipc import server
from portdaddy.ipc.frame import Performative
from tests.fleet_helpers import wait_for
from tests.test_ipc_limits import Raw, stat_fields
from tests.test_lifecycle import FAST, wait_dead


def admitted(d: Daemon) -> Raw:
    """A raw connection the daemon has accepted and served, so that what it sends next is read by the reactor."""
    raw = Raw(d)
    raw.send(Performative.REQUEST, 1, {"action": "daemon.health"})
    assert raw.frames(1)
    return raw


@contextmanager
def stopped(d: Daemon) -> Iterator[None]:
    """The daemon stopped for the block: what clients do meanwhile, it finds all at once when it goes on."""
    assert d.proc is not None
    d.proc.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: stat_fields(d.proc.pid)[0] == "T", timeout=5, what="the daemon to stop")
        yield
    finally:
        d.proc.send_signal(signal.SIGCONT)


def leave(raw: Raw, *, behind_a_backlog: bool) -> None:
    """Hang up. Behind a backlog, more frames than the daemon handles in one pass come first, so the hang-up is
    read a pass later than the rest: a grant made in the first pass reaches a connection still open, whose
    peer has gone."""
    if behind_a_backlog:
        for _ in range(40):  # FRAMES_PER_PASS is 32
            raw.send(Performative.INFORM, 0, {"action": "agent.heartbeat", "agentId": "undelivered-backlog"})
    raw.close()


def counts(d: Daemon) -> dict[str, Any]:
    return d.call("daemon.status")["counts"]


def test_a_take_or_a_grant_whose_caller_left_before_its_reply_is_given_back(daemon: Daemon) -> None:
    """A request sent, then the connection closed before the daemon read it: the take or grant is answered into a
    socket whose peer has gone. The tuple was lost; the lock was held until its lease ran out (5 minutes). A
    re-acquire of a lock its owner holds handed nothing over, and takes nothing back."""
    name = "left"
    written = daemon.call("tuple.out", fields=[name, 1], harbor="left")["id"]
    daemon.call("lock.acquire", name="left:kept", owner="keeper")
    take, grant, again = admitted(daemon), admitted(daemon), admitted(daemon)
    with stopped(daemon):
        take.send(Performative.REQUEST, 2, {"action": "tuple.in", "pattern": [name], "harbor": "left"})
        grant.send(Performative.REQUEST, 2, {"action": "lock.acquire", "name": name, "owner": "leaver"})
        again.send(Performative.REQUEST, 2, {"action": "lock.acquire", "name": "left:kept", "owner": "keeper"})
        for raw in (take, grant, again):
            raw.close()
    wait_for(lambda: daemon.call("tuple.count", pattern=[name], harbor="left")["count"] == 1, timeout=5,
             what="the tuple to be given back")  # fmt: skip
    assert daemon.call("tuple.in", pattern=[name], harbor="left")["tuple"]["id"] == written
    wait_for(lambda: not daemon.call("lock.get", name=name)["held"], timeout=5, what="the lock to be let go")
    assert daemon.call("lock.acquire", name=name, owner="next")["existing"] is False
    assert daemon.call("lock.get", name="left:kept")["owner"] == "keeper"


@pytest.mark.parametrize("behind_a_backlog", [False, True], ids=["plain", "backlog"])
@pytest.mark.parametrize("hang_up_first", [True, False], ids=["hang-up-first", "grant-first"])
def test_a_waiter_that_leaves_as_its_tuple_or_lock_comes_gives_it_back(daemon: Daemon, hang_up_first: bool,
                                                                      behind_a_backlog: bool) -> None:  # fmt: skip
    """A waiting take and a queued acquire hang up while another client writes the tuple and releases the lock,
    in either order. Whichever the daemon handles first, the tuple is there afterwards for a new taker and the
    lock free for a new owner. Behind a backlog, the grant woke a waiter whose hang-up was not read yet: its
    reply failed to send and was dropped."""
    name = f"waiting:{hang_up_first}:{behind_a_backlog}"
    token = daemon.call("lock.acquire", name=name, owner="holder")["token"]
    before = counts(daemon)
    taker, queued, other = admitted(daemon), admitted(daemon), admitted(daemon)
    taker.send(Performative.REQUEST, 2, {"action": "tuple.in", "pattern": [name], "harbor": "waiting", "wait": True})
    queued.send(Performative.REQUEST, 2, {"action": "lock.acquire", "name": name, "owner": "queued", "wait": True})
    wait_for(lambda: (c := counts(daemon))["tupleWaiters"] > before["tupleWaiters"]
             and c["lockWaiters"] > before["lockWaiters"], timeout=5, what="both to wait")  # fmt: skip

    def give() -> None:
        other.send(Performative.REQUEST, 2, {"action": "tuple.out", "fields": [name, 1], "harbor": "waiting"})
        other.send(Performative.REQUEST, 3, {"action": "lock.release", "name": name, "token": token})

    with stopped(daemon):  # the sockets become ready in this order, and epoll lists them so
        if not hang_up_first:
            give()
        leave(taker, behind_a_backlog=behind_a_backlog)
        leave(queued, behind_a_backlog=behind_a_backlog)
        if hang_up_first:
            give()
    assert [f.payload["result"]["success"] for f in other.frames(2)] == [True, True]
    wait_for(lambda: daemon.call("tuple.count", pattern=[name], harbor="waiting")["count"] == 1, timeout=5,
             what="the tuple to be in the space")  # fmt: skip
    assert daemon.call("tuple.in", pattern=[name], harbor="waiting")["count"] == 1
    wait_for(lambda: not daemon.call("lock.get", name=name)["held"], timeout=5, what="the lock to be free")
    assert daemon.call("lock.acquire", name=name, owner="next")["existing"] is False
    other.close()


def test_replies_still_queued_when_the_connection_closes_give_back_and_sent_ones_do_not(daemon: Daemon) -> None:
    """A client that does not read sends a take, reads worth 300 KB more than the socket holds, then another take,
    and hangs up. The first reply went into the socket (the kernel took it: as far as the daemon can know,
    delivered), the second was still queued behind the reads: its tuple comes back, the first does not."""
    socket_holds = int(Path("/proc/sys/net/core/wmem_default").read_text())  # a Unix socket's send buffer
    reads = (socket_holds + 300_000) // 60_000 + 1
    if reads * 60_000 > server.OUT_HIGH_WATER:  # the connection would stop reading before the second take
        pytest.skip(f"this machine's sockets hold {socket_holds} bytes")
    daemon.call("tuple.out", fields=["ballast", "x" * 60_000], harbor="queued")
    daemon.call("tuple.out", fields=["queued", "first"], harbor="queued")
    second = daemon.call("tuple.out", fields=["queued", "second"], harbor="queued")["id"]
    raw = admitted(daemon)
    raw.send(Performative.REQUEST, 2, {"action": "tuple.in", "pattern": ["queued", "first"], "harbor": "queued"})
    for conv in range(3, 3 + reads):
        raw.send(Performative.REQUEST, conv, {"action": "tuple.rd", "pattern": ["ballast"], "harbor": "queued"})
    raw.send(Performative.REQUEST, 3 + reads, {"action": "tuple.in", "pattern": ["queued", "second"],
                                               "harbor": "queued"})  # fmt: skip
    wait_for(lambda: daemon.call("tuple.count", pattern=["queued"], harbor="queued")["count"] == 0, timeout=5,
             what="both takes")  # fmt: skip
    raw.close()
    wait_for(lambda: daemon.call("tuple.count", pattern=["queued"], harbor="queued")["count"] == 1, timeout=5,
             what="the second tuple to be given back")  # fmt: skip
    assert [t["id"] for t in daemon.call("tuple.scan", harbor="queued")["tuples"] if t["fields"][0] == "queued"] \
        == [second]  # fmt: skip


def test_a_salvage_claim_whose_caller_left_before_its_reply_goes_back_to_the_queue(daemon_factory) -> None:
    """Claimed by a caller who never heard so, a dead agent's work would stay claimed for a month, done by
    nobody; it goes back to pending, where the next rescuer can claim it."""
    d = daemon_factory(**FAST)
    d.call("agent.register", agentId="fallen")
    wait_dead(d, "fallen")
    raw = admitted(d)
    with stopped(d):
        raw.send(Performative.REQUEST, 2, {"action": "salvage.claim", "id": "fallen", "newAgentId": "leaver"})
        raw.close()
    wait_for(lambda: d.call("salvage.list")["count"] == 1, timeout=5, what="the entry to be pending again")
    claimed = d.call("salvage.claim", id="fallen", newAgentId="rescuer")["agent"]
    assert (claimed["status"], claimed["claimedBy"]) == ("claimed", "rescuer")
    with pytest.raises(PDError, match="is claimed, not pending"):
        d.call("salvage.claim", id="fallen", newAgentId="late")
