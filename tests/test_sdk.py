"""The trio SDK as a careless user drives it: wrong argument types, use after close, a daemon restart under a
held lock. Each against a real daemon."""

from __future__ import annotations

import functools
import signal
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import Daemon

import portdaddy.sdk
from portdaddy.config import Settings
from portdaddy.errors import BadInput, DaemonUnavailable, NoReply, PDError, Timeout


def connect(d: Daemon, **kw: Any) -> Any:
    return portdaddy.sdk.connect(settings=d.settings, autostart=False, **kw)


async def test_a_value_the_wire_cannot_carry_is_bad_input_and_the_connection_lives_on(daemon: Daemon) -> None:
    """A set, an object or an oversized payload came out of msgpack's C code as a bare TypeError or ValueError."""
    async with connect(daemon) as pd:
        for attempt in (lambda: pd.publish_confirmed("sdk:bad", {1, 2}),
                        lambda: pd.claim("sdk:bad", metadata={"at": object()}),
                        lambda: pd.out([{"when": trio}])):  # fmt: skip
            with pytest.raises(BadInput, match="cannot be sent") as refused:
                await attempt()
            assert refused.value.code == "VALIDATION_ERROR"
        with pytest.raises(BadInput) as refused:
            pd.publish("sdk:bad", object())  # refused at once: fire-and-forget hears of nothing later
        with pytest.raises(BadInput) as refused:
            await pd.publish_confirmed("sdk:big", "x" * 1024 * 1024)
        assert refused.value.code == "PAYLOAD_TOO_LARGE" and "limit of one request" in refused.value.message
        assert (await pd.claim("sdk:fine")).port  # nothing half-sent: the next request is served
        assert await pd.history("sdk:bad") == []


async def test_seconds_of_the_wrong_type_are_bad_input_not_arithmetic_errors(daemon: Daemon) -> None:
    """timeout="5s" became '5s' * 1000 and then a ValueError from int(); timeout="1" a TypeError from + 5."""
    async with connect(daemon) as pd:
        attempts = {
            "lock": lambda: pd.lock("sdk:secs", timeout="5s"),
            "take": lambda: pd.take(["never"], wait=True, timeout="1"),
            "rd": lambda: pd.rd(["never"], wait=True, timeout=-1),
            "wait_for_signal": lambda: pd.wait_for_signal("sdk:never", timeout=[1]),
        }
        for name, attempt in attempts.items():
            with pytest.raises(BadInput, match="timeout is a number of seconds") as refused:
                await attempt()
            assert refused.value.code == "VALIDATION_ERROR", name
        with pytest.raises(BadInput, match="ttl is a number of seconds"):
            async with pd.with_lock("sdk:secs", ttl="60"):
                pass
        assert (await pd.call("lock.get", name="sdk:secs"))["held"] is False  # nothing was taken


async def test_call_sends_an_operations_own_timeout_to_the_daemon(daemon: Daemon) -> None:
    """call()'s own timeout keyword swallowed the operation's: a wait meant to last 0.3 s waited the daemon's
    default (forever for a take) while the client waited 300 s."""
    async with connect(daemon, timeout=0.5) as pd:
        with trio.fail_after(10):
            with pytest.raises(Timeout, match=r"no tuple matched within 0\.3s"):
                await pd.call("tuple.in", pattern=["sdk:never"], wait=True, timeout=300)
            assert (await pd.call("msg.poll", channel="sdk:quiet", after=10**9, timeout="200ms"))["message"] is None
            # A wait without a timeout lasts as long as the daemon's: the client's 0.5 s does not cut it short.
            async with trio.open_nursery() as nursery:

                async def write_later() -> None:
                    await trio.sleep(1)
                    await pd.out(["sdk:later", 1])

                nursery.start_soon(write_later)
                taken = await pd.call("tuple.in", pattern=["sdk:later", "*"], wait=True)
            assert taken["tuple"]["fields"] == ["sdk:later", 1]


@pytest.mark.parametrize("action", ["msg.poll", "msg.wait"])
async def test_a_call_the_daemon_holds_by_default_outlasts_the_connection_timeout(daemon: Daemon, action: str) -> None:
    """msg.poll waits 30 s by default (msg.wait without a limit), and call() gave up after the connection's
    5 s while the daemon was still rightly waiting. Now it waits while the daemon answers its pings: here three
    whole connection timeouts of silence on this connection, and the message published from another one."""
    channel = f"sdk:held:{action}"
    after = daemon.call("msg.publish", channel=channel, payload="before")["id"]
    async with connect(daemon, timeout=0.5) as pd:
        async with trio.open_nursery() as nursery:

            async def publish_later() -> None:
                await trio.sleep(1.5)
                await trio.to_thread.run_sync(functools.partial(daemon.call, "msg.publish", channel=channel,
                                                                payload="later"))  # fmt: skip

            nursery.start_soon(publish_later)
            with trio.fail_after(10):
                reply = await pd.call(action, channel=channel, after=after)
        got = reply["message"] if action == "msg.poll" else reply["messages"][channel]
        assert got["payload"] == "later"


async def test_a_daemon_that_answers_nothing_still_fails_a_call_after_the_timeout(fresh_daemon: Daemon) -> None:
    """The other side of waiting while the daemon lives: a stopped daemon answers no ping either, and the call
    fails once it has given no sign of life for the connection's timeout, as before."""
    async with connect(fresh_daemon, timeout=0.5) as pd:
        assert fresh_daemon.proc is not None
        fresh_daemon.proc.send_signal(signal.SIGSTOP)
        try:
            started = trio.current_time()
            with trio.fail_after(5), pytest.raises(NoReply, match=r"no sign of life for 0\.5s"):
                await pd.call("msg.poll", channel="sdk:stopped")
            assert trio.current_time() - started < 1.5
        finally:
            fresh_daemon.proc.send_signal(signal.SIGCONT)
        assert (await pd.status())["status"] == "ok"


async def test_a_subscription_ends_with_its_block_instead_of_hanging(daemon: Daemon) -> None:
    """Iterating a subscription after its ``async with`` (or the connection) had closed waited forever."""
    async with connect(daemon) as pd:
        async with pd.subscribe("sdk:end:*", new=True) as sub:
            sent = await pd.publish_confirmed("sdk:end:a", "last words")
            with trio.fail_after(5):
                assert (await sub.__anext__()).id == sent
            await pd.publish_confirmed("sdk:end:a", "after the reader stopped")
        with trio.fail_after(5):
            assert all(i > sent for i in [msg.id async for msg in sub])  # what had arrived, then the end
    with trio.fail_after(5):
        assert [msg async for msg in sub] == []


async def test_with_lock_lets_the_blocks_error_out_as_itself_and_stops_a_block_that_lost_its_lock(
    daemon: Daemon,
) -> None:
    """The renewal ran in a nursery around the block, so any error of the block came out in an ExceptionGroup
    (``except KeyError`` never matched), and so did the renewal's own failure."""
    async with connect(daemon) as pd:
        with pytest.raises(KeyError):
            async with pd.with_lock("sdk:body-error", ttl=5):
                raise KeyError("the block's own")
        assert (await pd.call("lock.get", name="sdk:body-error"))["held"] is False
        finished = False
        with trio.fail_after(10), pytest.raises(PDError) as lost:
            async with pd.with_lock("sdk:taken-away", ttl=0.3):
                await pd.unlock("sdk:taken-away", force=True)  # as an operator would: pd unlock --force
                await trio.sleep(5)  # renewals every 0.1 s: the next one finds the lock gone
                finished = True
        assert not finished and lost.value.code in ("LOCK_NOT_FOUND", "NOT_OWNER"), lost.value
        assert any("lost the lock" in note for note in lost.value.__notes__)
        assert (await pd.claim("sdk:still-connected")).port


async def test_errors_leave_the_connect_block_as_themselves(daemon: Daemon, tmp_home: Path) -> None:
    """connect() ran the block inside its nursery, so ``except DaemonUnavailable`` or ``except BadInput``
    around ``async with connect()`` never matched: everything came out in an ExceptionGroup."""
    with pytest.raises(DaemonUnavailable, match="no daemon at"):
        async with portdaddy.sdk.connect(settings=Settings.from_env({"PORT_DADDY_HOME": str(tmp_home)}),
                                         autostart=False):  # fmt: skip
            pass
    with pytest.raises(BadInput) as refused:
        async with connect(daemon) as pd:
            await pd.claim("not an identity")
    assert refused.value.code == "IDENTITY_INVALID"
    with pytest.raises(KeyError) as own:
        async with connect(daemon):
            try:
                raise ValueError("first")
            except ValueError:
                raise KeyError("second") from None
    assert own.value.__suppress_context__  # the block's own chaining is kept


def blamed(var: str) -> str:
    """The refusal of ``bad id!`` from the environment variable ``var``, as pd and the SDK say it."""
    return (rf"^the {var} environment variable is not a valid agent id: agent id 'bad id!' has characters "
            rf"outside .*; set it to one \(e\.g\. export {var}=backend\) or unset it$")  # fmt: skip


@pytest.mark.parametrize("var", ["PORT_DADDY_AGENT", "AGENT_ID"])
async def test_a_bad_agent_id_from_the_environment_is_named_with_the_fix(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch, var: str
) -> None:
    """The daemon refused it as "agent id 'bad id!' has characters outside …", not saying where the SDK had it
    from, which the daemon cannot know and the SDK does, as pd says it; and AGENT_ID, which pd reads as the
    caller's agent (the original's name for it), the SDK did not read at all. Refused by connect(): the daemon
    refuses every frame that carries it."""
    for name in ("PORT_DADDY_AGENT", "AGENT_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(var, "bad id!")
    with pytest.raises(BadInput, match=blamed(var)) as refused:
        async with connect(daemon):
            pass
    assert refused.value.code == "VALIDATION_ERROR"
    # Given in code, it is the code's mistake, whatever the environment holds.
    with pytest.raises(BadInput, match=r"^agent id 'bad id!' has characters outside"):
        async with connect(daemon, agent_id="bad id!"):
            pass
    monkeypatch.setenv(var, "sdk-env-agent")
    async with connect(daemon) as pd:
        assert (await pd.claim("sdk:envagent")).port
        assert (await pd.call("port.get", id="sdk:envagent"))["service"]["agentId"] == "sdk-env-agent"
        with pytest.raises(BadInput, match=r"^agent id 'bad id!' has characters outside"):  # not the variable's
            await pd.call("agent.get", id="bad id!")
        await pd.release("sdk:envagent")


async def test_fire_and_forget_sends_do_not_lose_a_bad_agent_variable_without_a_word(
    daemon: Daemon, tmp_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """heartbeat(), spray() and publish() wait for no reply, and the daemon refuses every frame whose agent id is
    bad: with PORT_DADDY_AGENT mistyped a program that only published and sprayed lost it all and heard nothing.
    connect() checks the id by the daemon's own rule before it connects, or starts a daemon."""
    monkeypatch.setenv("PORT_DADDY_AGENT", "bad id!")
    monkeypatch.delenv("AGENT_ID", raising=False)
    with pytest.raises(BadInput, match=blamed("PORT_DADDY_AGENT")):
        async with connect(daemon) as pd:
            pd.publish("sdk:ff-env", "lost")
            pd.spray("sdk", "ff-env", "seen", 1.0)
            pd.heartbeat()
    assert daemon.call("msg.history", channel="sdk:ff-env")["messages"] == []
    with pytest.raises(BadInput, match=blamed("PORT_DADDY_AGENT")):  # not DaemonUnavailable: there is none
        async with portdaddy.sdk.connect(settings=Settings.from_env({"PORT_DADDY_HOME": str(tmp_home)}),
                                         autostart=False):  # fmt: skip
            pass


async def test_a_heartbeat_the_daemon_would_drop_is_refused_at_once(daemon: Daemon) -> None:
    """A heartbeat waits for no reply: one for a bad agent id, or for another agent than the connection's (the
    daemon binds a connection to its first agent), was dropped by the daemon and nobody heard of it."""
    async with connect(daemon, agent_id="sdk-beater") as pd:
        await pd.call("agent.register", agentId="sdk-beater")
        with pytest.raises(BadInput, match=r"^agent id 'bad id!' has characters outside"):
            pd.heartbeat("bad id!")
        own = r"^this connection acts as agent 'sdk-beater'.*connect\(agent_id='sdk-other'\)"
        with pytest.raises(BadInput, match=own):
            pd.heartbeat("sdk-other")
        with pytest.raises(BadInput, match=own):  # not skipped at every beat in the background, unheard of
            pd.start_heartbeat(1, agent_id="sdk-other")
        before = (await pd.call("agent.get", id="sdk-beater"))["agent"]["lastHeartbeat"]
        await trio.sleep(0.01)
        pd.heartbeat("sdk-beater")  # its own agent, named: beats as before
        with trio.fail_after(5):
            while (await pd.call("agent.get", id="sdk-beater"))["agent"]["lastHeartbeat"] == before:
                await trio.sleep(0.01)


async def test_background_heartbeats_ride_out_a_daemon_restart(fresh_daemon: Daemon) -> None:
    """A beat sent while the daemon was away raised DaemonUnavailable in the connection's nursery and ended the
    whole connect() block: the reconnection the SDK promises never got its chance."""
    d = fresh_daemon
    async with connect(d, agent_id="sdk-beater") as pd:
        await pd.register_agent()
        pd.start_heartbeat(0.05)
        await trio.to_thread.run_sync(d.kill9)
        await trio.sleep(0.3)  # beats fall due while nobody listens
        await trio.to_thread.run_sync(d.start)
        with trio.fail_after(15):
            while True:  # the client reconnects (backoff from 1 s); the beats resume on their own
                with suppress(DaemonUnavailable):
                    first = (await pd.call("agent.get", id="sdk-beater"))["agent"]["lastHeartbeat"]
                    break
                await trio.sleep(0.1)
            while (await pd.call("agent.get", id="sdk-beater"))["agent"]["lastHeartbeat"] == first:
                await trio.sleep(0.05)


async def test_a_heartbeat_interval_that_is_not_a_positive_number_is_refused_at_once(daemon: Daemon) -> None:
    """interval="30" failed later, in the connection's nursery (ending the connection); 0 beat in a busy loop."""
    async with connect(daemon, agent_id="sdk-interval") as pd:
        for interval in ("30", 0, -1, None):
            with pytest.raises(BadInput, match="interval"):
                pd.start_heartbeat(interval)
        await trio.sleep(0.1)
        assert (await pd.claim("sdk:interval")).port  # the connection is fine


async def test_two_subscriptions_to_the_same_channels_on_one_connection_each_get_every_message(
    daemon: Daemon,
) -> None:
    """The daemon answered the second subscribe with the first's id (existing: true): the first reader got
    nothing more, and when the second block ended it unsubscribed the first's subscription too."""
    async with connect(daemon) as pd, pd.subscribe("sdk:two:*", new=True) as first:
        async with pd.subscribe("sdk:two:*", new=True) as second:
            sent = await pd.publish_confirmed("sdk:two:x", 1)
            with trio.fail_after(5):
                assert [(await first.__anext__()).id, (await second.__anext__()).id] == [sent, sent]
        sent = await pd.publish_confirmed("sdk:two:x", 2)
        with trio.fail_after(5):
            assert (await first.__anext__()).id == sent


async def test_a_subscribe_cancelled_in_flight_leaves_no_subscription_behind(daemon: Daemon) -> None:
    """A subscription the daemon made as its caller was cancelled stayed on the connection: 64 of them, and
    the connection could not subscribe any more."""
    async with connect(daemon) as pd:
        for n in range(100):
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_cancel_at_the_next_checkpoint, scope)
                    async with pd.subscribe("sdk:gone:*", f"sdk:gone{n}"):
                        pass
        with trio.fail_after(5):
            while (await pd.status())["counts"]["subscriptions"]:
                await trio.sleep(0.05)
        async with pd.subscribe("sdk:after-all", new=True):
            pass


async def _cancel_at_the_next_checkpoint(scope: trio.CancelScope) -> None:
    await trio.sleep(0)
    scope.cancel()


async def test_a_closed_connection_says_it_is_closed(daemon: Daemon) -> None:
    """After its block, start_heartbeat raised trio's 'Nursery is closed to new arrivals' and every other
    method 'not connected to <socket>', as if the daemon were down."""
    async with connect(daemon, agent_id="sdk-closed") as pd:
        pass
    for attempt in (lambda: pd.start_heartbeat(1), pd.heartbeat, lambda: pd.publish("sdk:closed", 1)):
        with pytest.raises(DaemonUnavailable, match="this connection is closed"):
            attempt()
    with pytest.raises(DaemonUnavailable, match="this connection is closed"):
        await pd.claim("sdk:closed")


async def test_publish_is_fire_and_forget_and_publish_confirmed_waits_for_the_id(daemon: Daemon) -> None:
    """As heartbeat() and spray(): publish() is a plain call that sends and returns (no round trip to await)."""
    async with connect(daemon) as pd, pd.subscribe("sdk:ff:*", new=True) as sub:
        assert pd.publish("sdk:ff:a", {"n": 1}) is None
        confirmed = await pd.publish_confirmed("sdk:ff:b", {"n": 2})
        with trio.fail_after(5):
            got = [await sub.__anext__(), await sub.__anext__()]
        assert [(m.channel, m.payload) for m in got] == [("sdk:ff:a", {"n": 1}), ("sdk:ff:b", {"n": 2})]
        assert got[1].id == confirmed > got[0].id


async def test_a_relative_worktree_is_resolved_by_the_sdk_and_refused_by_the_daemon(
    daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative ``worktree`` (or ``worktreeId``) was read against the daemon's own directory, meaningless to a
    client elsewhere: its sessions matched nobody's and its claims met the wrong repository. The daemon refuses one
    in a line that says what to send; the SDK, like pd, sends the absolute path of the caller's directory."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    async with connect(daemon, agent_id="sdk-worktree") as pd:
        for key in ("worktree", "worktreeId"):
            with pytest.raises(BadInput, match=r"^worktree 'link' is a relative path, .*send the worktree's absolute "
                               "path, e.g. /home/me/project") as refused:  # fmt: skip
                await pd.call("session.start", purpose="relative", **{key: "link"})
            assert refused.value.code == "VALIDATION_ERROR"
        assert (await pd.call("session.list", agent="sdk-worktree"))["count"] == 0  # nothing was started
        session_id = await pd.start_session("resolved", worktree="link")
        session = (await pd.call("session.get", sessionId=session_id))["session"]
        assert session["worktreeId"] == str((tmp_path / "real").resolve())
        await pd.end_session(session_id)
        begun = await pd.begin("begun here", worktree="link/")
        assert (await pd.call("session.get", sessionId=begun["sessionId"]))["session"]["worktreeId"] == \
            session["worktreeId"]  # fmt: skip
        await pd.done("done")
