"""A run as a full Port Daddy citizen: a registered agent with a session, heartbeats while it runs, ``done``
with its result, and salvage when it crashes (the journal, issue 3).

The fleet reaches the journal through the operation table (``agent.register``, ``session.start``,
``agent.heartbeat``, ``agent.done``) and ``app.agents.declare_dead``, so it stays in step with every other
client. A journal error is logged and never fails the run (the child's work matters more than its bookkeeping).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from portdaddy.core.ops import Ctx, call
from portdaddy.errors import PDError
from portdaddy.text import gist

if TYPE_CHECKING:
    from portdaddy.core.app import App
    from portdaddy.fleet.runs import Run

log = logging.getLogger("portdaddy.fleet")
_CALL_TIMEOUT_S = 5.0
NOTE_OUTPUT_MAX = 200  # characters of output in a done note, as the original
PURPOSE_MAX = 80  # characters of a spawned run's task in its purpose: a line of pd session list


async def _op(app: App, action: str, run: Run, **args: Any) -> Any:
    # Shielded: bookkeeping for a run that is being stopped must still reach the journal.
    ctx = Ctx(app, "fleet", fleet_agent=run.agent if run.kind == "fleet" else None)
    with trio.CancelScope(shield=True), trio.move_on_after(_CALL_TIMEOUT_S):
        try:
            return await call(app.ops, action, {k: v for k, v in args.items() if v is not None}, ctx)
        except PDError as exc:
            log.warning("fleet: %s for %s failed: %s", action, args.get("agentId"), exc.message)
    return None


def purpose(run: Run) -> str:
    """What the run's agent and session say they do: a purpose is one line, so a spawned run's task (kept whole
    in the run's row) is said by its start, its line breaks as spaces."""
    if run.kind == "fleet":
        return f"Fleet agent: {run.agent}"
    text = run.task.command if run.task.backend == "custom" else run.task.prompt
    return gist(text or run.agent, PURPOSE_MAX)


def _trigger_said(trigger: dict[str, Any] | None) -> dict[str, Any] | None:
    """What fired the run, for its session: the trigger without the message that fired it, which the run's row
    holds whole (``pd fleet runs --json``) and which may be more than a session's metadata may (a commit's file
    list: 32 KB, with each run of a chain nesting the last's)."""
    return None if trigger is None else {k: v for k, v in trigger.items() if k != "payload"}


async def enter(app: App, run: Run) -> str | None:
    """Register the run's agent and start its session; the session id (None if the journal refused)."""
    if await _op(app, "agent.register", run, agentId=run.agent_id, identity=run.identity, purpose=purpose(run),
                 type="fleet" if run.kind == "fleet" else "spawned") is None:  # fmt: skip
        return None
    metadata = {"runId": run.id, "kind": run.kind, "agent": run.agent, "fleet": run.fleet,
                "backend": run.task.backend, "trigger": _trigger_said(run.trigger), "attempt": run.attempt}  # fmt: skip
    reply = await _op(app, "session.start", run, purpose=purpose(run), agentId=run.agent_id, force=True,
                      worktree=run.project_dir, metadata=metadata)  # fmt: skip
    return reply.get("sessionId") if isinstance(reply, dict) else None


async def heartbeat(app: App, run: Run) -> None:
    await _op(app, "agent.heartbeat", run, agentId=run.agent_id)


async def done(app: App, run: Run, note: str, *, fixes: list[str] | None = None) -> None:
    """The run ended on its own terms (success, or stopped on purpose): end its session and unregister.

    ``fixes``: earlier runs of its fleet agent, when it succeeded; their pending salvage is settled, completed by
    this run (spec/fleet.md, "Repeated failures")."""
    await _op(app, "agent.done", run, agentId=run.agent_id, note=note, sessionId=run.session_id)
    if fixes:
        try:
            app.agents.settle_fixed(fixes, run.agent_id)
        except PDError as exc:
            log.warning("fleet: settling the salvage of %s's earlier runs failed: %s", run.agent_id, exc.message)


def registered(app: App, run: Run) -> bool:
    """Whether the run got as far as registering: its agent, or a session of it, exists."""
    return app.agents.get(run.agent_id) is not None or bool(app.sessions.session_ids_of(run.agent_id))


def crashed(app: App, run: Run, reason: str, *, supersedes: list[str] | None = None) -> None:
    """The run died (crash, timeout, lost with the daemon): the reaper's path, so its session goes to salvage.
    ``supersedes``: the other runs of its fleet agent; its entry stands for their pending ones.

    Its sessions end even when its agent is not alive to be declared dead (declared so before, or gone after a
    ``pd done`` the run made, then a new session): no reaper would ever judge them, and an active session's file
    claims block everyone else's."""
    try:
        if app.agents.declare_dead(run.agent_id, reason, supersedes=supersedes or ()):
            return
    except PDError as exc:
        log.warning("fleet: declaring %s dead failed: %s", run.agent_id, exc.message)
    with app.store.write():
        ended = app.sessions.abandon_by_agent(run.agent_id)
    app.sessions.announce_ended(ended, run.agent_id, "abandoned")
