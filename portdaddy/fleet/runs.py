"""A run: one supervised child (a fleet agent firing, or ``pd spawn``), and its row in ``fleet_runs``.

The row is written when the run is queued, updated when it starts and when it ends; each write commits
before anyone is told (a reply, an event, a channel message).
"""

from __future__ import annotations

import json
import math
import os
import secrets
from dataclasses import dataclass, field
from typing import Any

import trio

from portdaddy.core.clock import now_ms
from portdaddy.fleet.backends import Task

LIVE = ("queued", "running")
# completed: exit 0; failed: non-zero exit or could not start; timeout: ran past its timeout; killed: stopped
# on purpose (pd spawn kill, pd fleet down); lost: the daemon died or shut down while it ran;
# cancelled: never started (its fleet went down, its agent left the fleet file or its circuit opened; a daemon
# restart keeps queued fleet runs queued).
FINISHED = ("completed", "failed", "timeout", "killed", "lost", "cancelled")
# What the circuit breaker counts as a failure (killed and lost runs were stopped, not failing; cancelled never ran).
FAILED = ("failed", "timeout")
# What a finished run's log keeps of its output: the start (what it set out to do) and the end (its result).
LOG_HEAD = 64 * 1024
LOG_TAIL = 448 * 1024
# What a run's stored prompt keeps, in characters: the start (its task) and the end (the Trigger context block,
# under 5,000 characters). Most prompts are a few thousand characters; the cap bounds what a hundred kept runs of
# an agent hold, whatever its fleet file or a pd spawn (up to 100,000 characters) asks.
PROMPT_HEAD = 56_000
PROMPT_TAIL = 8_000

_COLUMNS = ("id, kind, project_dir, fleet, agent, identity, backend, spec, trigger, attempt, status, pid, pid_start, "
            "exit_code, error, log_path, session_id, created_at, started_at, ended_at, not_before, "
            "log_dropped")  # fmt: skip


def new_id(kind: str, agent: str) -> str:
    """``spawned-<12 hex>`` as the original; ``fleet-<agent>-<8 hex>`` so an id says whose run it is."""
    return f"spawned-{secrets.token_hex(6)}" if kind == "spawn" else f"fleet-{agent}-{secrets.token_hex(4)}"


@dataclass(eq=False, slots=True)
class Run:
    id: str
    kind: str  # fleet | spawn
    agent: str  # the fleet agent's name; "spawn" for pd spawn
    identity: str
    task: Task
    trigger: dict[str, Any] | None = None
    attempt: int = 0
    project_dir: str | None = None
    fleet: str | None = None
    status: str = "queued"
    pid: int | None = None
    pid_start: int | None = None
    exit_code: int | None = None
    error: str | None = None
    log_path: str | None = None
    session_id: str | None = None
    created_at: int = field(default_factory=now_ms)
    started_at: int | None = None
    ended_at: int | None = None
    not_before: int | None = None  # a respawn waiting out its delay may not start before this (ms)
    log_dropped: int = 0  # bytes cut from the middle of its log when it ended (see cap_log)
    # Live-only: cancelled to stop this one run; why it was stopped; set once the row says it finished.
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    stop_reason: str | None = None
    done: trio.Event = field(default_factory=trio.Event)
    ready_at: float = -math.inf  # not_before on trio's clock, set when the run is queued

    @property
    def agent_id(self) -> str:
        """The run is registered as an agent under its own id."""
        return self.id

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id, "agentId": self.agent_id, "kind": self.kind, "agent": self.agent,
            "identity": self.identity, "backend": self.task.backend, "model": self.task.model,
            "projectDir": self.project_dir, "fleet": self.fleet, "status": self.status, "attempt": self.attempt,
            "trigger": self.trigger, "pid": self.pid, "exitCode": self.exit_code, "error": self.error,
            "logPath": self.log_path, "sessionId": self.session_id, "createdAt": self.created_at,
            "startedAt": self.started_at, "endedAt": self.ended_at, "notBefore": self.not_before,
            "logDropped": self.log_dropped,
        }  # fmt: skip


def cap_log(run: Run, head: int = LOG_HEAD, tail: int = LOG_TAIL) -> int:
    """Cut the middle out of the log of a run that has ended, when it is longer than ``head + tail`` bytes, leaving
    a line that says how much was dropped; the bytes dropped (0 when it fits or cannot be read).

    Only once the run's process group is gone: the child appends to the file itself (children.py), and a cut
    made while it writes would lose what it wrote meanwhile."""
    if not run.log_path:
        return 0
    try:
        with open(run.log_path, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            if size <= head + tail:
                return 0
            f.seek(size - tail)
            end = f.read(tail)
            dropped = size - head - tail
            # Its own line (output_tail leaves out lines starting with "# <run id>"), even when a cut is mid-line.
            marker = (f"\n# {run.id}: {dropped} bytes of output dropped here (a run's log keeps its first {head} "
                      f"and last {tail} bytes)\n").encode()  # fmt: skip
            f.seek(head)
            f.write(marker + end)
            f.truncate()
    except OSError:
        return 0
    return dropped


def cap_prompt(run_id: str, prompt: str, head: int = PROMPT_HEAD, tail: int = PROMPT_TAIL) -> tuple[str, int]:
    """``prompt`` as a run's row keeps it, and the characters cut from its middle (0 when it fits): a longer one keeps
    its first ``head`` and last ``tail`` characters, with a line where the cut is."""
    dropped = len(prompt) - head - tail
    if dropped <= 0:
        return prompt, 0
    marker = (f"\n# {run_id}: {dropped} characters of the prompt dropped here (a run's stored prompt keeps its first "
              f"{head} and last {tail} characters)\n")  # fmt: skip
    return prompt[:head] + marker + prompt[-tail:], dropped


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), default=str)


class RunTable:
    def __init__(self, store: Any) -> None:
        self.store = store

    def insert(self, run: Run) -> None:
        with self.store.write() as db:
            db.execute(
                f"INSERT INTO fleet_runs ({_COLUMNS}) VALUES ({','.join('?' * 22)})",
                (run.id, run.kind, run.project_dir, run.fleet, run.agent, run.identity, run.task.backend,
                 _dumps(run.task.to_json()), _dumps(run.trigger), run.attempt, run.status, run.pid, run.pid_start,
                 run.exit_code, run.error, run.log_path, run.session_id, run.created_at, run.started_at,
                 run.ended_at, run.not_before, run.log_dropped),
            )  # fmt: skip

    def update(self, run: Run) -> None:
        with self.store.write() as db:
            db.execute(
                "UPDATE fleet_runs SET status=?, pid=?, pid_start=?, exit_code=?, error=?, log_path=?, session_id=?,"
                " started_at=?, ended_at=?, log_dropped=? WHERE id=?",
                (run.status, run.pid, run.pid_start, run.exit_code, run.error, run.log_path, run.session_id,
                 run.started_at, run.ended_at, run.log_dropped, run.id),
            )  # fmt: skip

    def record_prompt(self, run: Run, prompt: str) -> None:
        """Keep the prompt ``run`` is sent (capped: ``cap_prompt``), as it starts."""
        kept, dropped = cap_prompt(run.id, prompt)
        with self.store.write() as db:
            db.execute("UPDATE fleet_runs SET prompt=?, prompt_dropped=? WHERE id=?", (kept, dropped, run.id))

    def prompt_of(self, run_id: str) -> tuple[str | None, int]:
        """The prompt a run was sent as its row keeps it (None: not started, or started before prompts were kept),
        and the characters cut from its middle. Read alone: the lists of runs do not carry prompts."""
        row = self.store.one("SELECT prompt, prompt_dropped FROM fleet_runs WHERE id=?", (run_id,))
        return (None, 0) if row is None else (row[0], row[1])

    def _select(self, where: str, args: tuple[Any, ...] = (), limit: int = 1000) -> list[Run]:
        rows = self.store.all(f"SELECT {_COLUMNS} FROM fleet_runs WHERE {where} LIMIT {int(limit)}", args)
        return [self._from_row(r) for r in rows]

    @staticmethod
    def _from_row(row: tuple[Any, ...]) -> Run:
        (rid, kind, project_dir, fleet, agent, identity, _backend, spec, trigger, attempt, status, pid, pid_start,
         exit_code, error, log_path, session_id, created_at, started_at, ended_at, not_before,
         log_dropped) = row  # fmt: skip
        return Run(rid, kind, agent, identity, Task.from_json(_loads(spec)), _loads(trigger), attempt, project_dir,
                   fleet, status, pid, pid_start, exit_code, error, log_path, session_id, created_at, started_at,
                   ended_at, not_before, log_dropped)  # fmt: skip

    def get(self, run_id: str) -> Run | None:
        found = self._select("id=?", (run_id,))
        return found[0] if found else None

    def with_status(self, status: str) -> list[Run]:
        return self._select("status=? ORDER BY created_at, rowid", (status,), limit=100_000)

    def recent(self, *, kind: str | None = None, project_dir: str | None = None, agent: str | None = None,
               limit: int = 50) -> list[Run]:  # fmt: skip
        clauses, args = ["1=1"], []
        for column, value in (("kind", kind), ("project_dir", project_dir), ("agent", agent)):
            if value is not None:
                clauses.append(f"{column}=?")
                args.append(value)
        return self._select(" AND ".join(clauses) + " ORDER BY created_at DESC, rowid DESC", tuple(args), limit)

    def started_since(self, project_dir: str, since: int) -> list[int]:
        """When the fleet's runs started at or after ``since`` (ms), oldest first: its hourly budget."""
        rows = self.store.all("SELECT started_at FROM fleet_runs WHERE kind='fleet' AND project_dir=? AND "
                              "started_at >= ? ORDER BY started_at", (project_dir, since))  # fmt: skip
        return [t for (t,) in rows]

    def failures_since(self, project_dir: str, agent: str, since: int) -> list[int]:
        """When the agent's failed runs ended, after its last success and at or after ``since`` (ms), oldest first:
        what its circuit breaker counts."""
        rows = self.store.all(
            f"SELECT status, ended_at FROM fleet_runs WHERE kind='fleet' AND project_dir=? AND agent=? AND "
            f"status IN ('completed',{','.join('?' * len(FAILED))}) AND ended_at >= ? ORDER BY ended_at DESC",
            (project_dir, agent, *FAILED, since),
        )
        ended = []
        for status, at in rows:
            if status == "completed":
                break
            ended.append(at)
        return ended[::-1]

    def same_agent(self, run: Run, *, created_before: bool = False) -> list[str]:
        """The ids of the other runs of ``run``'s fleet agent (its project and name), or of those created before it:
        whose pending salvage its death supersedes, or its success settles. Empty for a spawn, whose runs are each
        their own task."""
        if run.kind != "fleet":
            return []
        before, args = (" AND created_at <= ?", (run.created_at,)) if created_before else ("", ())
        rows = self.store.all(f"SELECT id FROM fleet_runs WHERE kind='fleet' AND project_dir=? AND agent=? AND id<>?"
                              f"{before}", (run.project_dir, run.agent, run.id, *args))  # fmt: skip
        return [run_id for (run_id,) in rows]

    def past_keeping(self, keep: int, ended_before: int, started_before: int) -> list[tuple[str, str | None]]:
        """The finished runs not kept: past the newest ``keep`` finished runs of their agent (a fleet's agent, or a
        spawn's name), or ended before ``ended_before`` (ms); of those, the ones started before ``started_before``.
        Their ids and log paths, oldest first."""
        marks = ",".join("?" * len(FINISHED))
        return self.store.all(
            "SELECT id, log_path FROM (SELECT id, log_path, created_at, started_at, ended_at, row_number() OVER ("
            "PARTITION BY kind, project_dir, agent ORDER BY created_at DESC, rowid DESC) AS newest FROM fleet_runs "
            f"WHERE status IN ({marks})) WHERE (newest > ? OR ended_at < ?) AND coalesce(started_at, 0) < ? "
            "ORDER BY created_at",
            (*FINISHED, keep, ended_before, started_before),
        )

    def delete(self, run_ids: list[str]) -> None:
        """Forget these runs' rows (inside a write)."""
        self.store.execute("DELETE FROM fleet_runs WHERE id IN (SELECT value FROM json_each(?))",
                           (json.dumps(run_ids),))  # fmt: skip
