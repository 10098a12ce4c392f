"""What a run executes: a ``Task`` (backend, prompt, options) turned into an argv for one child process.

Every backend is a child process, ollama included (a tiny stdlib HTTP client, ``fleet/ollama.py``), so one
supervision path (process group, timeout, log file, SIGTERM then SIGKILL) covers them all. The prompt travels
as an argument for the CLIs that take it that way, and always in ``PD_PROMPT`` (custom commands read it there).
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from portdaddy.errors import bad_input
from portdaddy.fleet.spec import BACKEND_ALIASES, BACKEND_BINARIES, BACKENDS

DEFAULT_OLLAMA_MODEL = "llama3.2"
TRIGGER_MESSAGE_MAX = 4000  # characters of the trigger message put into a prompt (as the original)


@dataclass(frozen=True, slots=True)
class Task:
    """Everything needed to (re)start a run, stored as JSON with the run so a queued run survives a restart."""

    backend: str
    prompt: str = ""
    command: str | None = None  # backend custom: the shell command
    model: str | None = None
    allowed_tools: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = "."
    timeout_s: float | None = None
    path: str | None = None  # PATH to find the backend's binary with, and to give the child

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Task:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def normalise_backend(name: str) -> str:
    backend = BACKEND_ALIASES.get(name, name)
    if backend not in BACKENDS:
        raise bad_input(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)} (or claude)")
    return backend


def with_trigger_context(prompt: str, trigger: dict[str, Any] | None) -> str:
    """The prompt plus a "Trigger context" block saying what fired the run (reference §23.3)."""
    if not trigger or trigger.get("source") not in ("channel", "schedule"):
        return prompt
    lines = ["", "", "Trigger context:", f"- source: {trigger['source']}"]
    if trigger["source"] == "channel":
        message = trigger.get("payload")
        text = message if isinstance(message, str) else _json(message)
        lines += [
            f"- channel: {trigger.get('channel')}",
            f"- sender: {trigger.get('sender') or 'unknown'}",
            f"- message: {text[:TRIGGER_MESSAGE_MAX]}",
        ]
    else:
        lines.append(f"- schedule: {trigger.get('schedule')} (fired at {trigger.get('firedAt')})")
    lines.append("Take one bounded pass at the task above, report what you found, then stop.")
    return prompt + "\n".join(lines)


def _json(value: Any) -> str:
    import json

    return json.dumps(value, separators=(",", ":"), default=str)


def binary_for(task: Task) -> str | None:
    """The program the backend needs on PATH (None: the shell or our own interpreter runs it)."""
    return BACKEND_BINARIES.get(task.backend)


def find_binary(task: Task) -> str | None:
    """The backend's program found on the task's PATH (None: the backend needs none). Raises BadInput when it is
    missing, so ``pd spawn`` is refused up front rather than starting a run that fails at once."""
    binary = binary_for(task)
    if binary is None:
        return None
    found = shutil.which(binary, path=task.path)
    if found is None:
        raise bad_input(f"backend {task.backend} needs {binary!r} on PATH but it is not there; install it "
                        "or pick another backend")  # fmt: skip
    return found


def argv_for(task: Task, prompt: str) -> list[str]:
    """The child's argv. Raises BadInput when the backend's binary is not on the task's PATH."""
    model = ["--model", task.model] if task.model else []
    if task.backend == "custom":
        if not task.command:
            raise bad_input("backend custom needs a command; pass the shell command as the task")
        return ["/bin/sh", "-c", task.command]
    if task.backend == "ollama":
        return [sys.executable, "-m", "portdaddy.fleet.ollama", "--model", task.model or DEFAULT_OLLAMA_MODEL]
    found = find_binary(task)
    assert found is not None
    if task.backend == "claude-cli":
        tools = ["--allowedTools", task.allowed_tools] if task.allowed_tools else []
        return [found, "-p", prompt, *tools, *model]
    if task.backend == "codex":
        return [found, "exec", *model, prompt]
    if task.backend == "gemini":
        return [found, *(["-m", task.model] if task.model else []), "-p", prompt]
    if task.backend == "aider":
        return [found, "--yes", "--no-stream", *model, "--message", prompt]
    raise bad_input(f"unknown backend {task.backend!r}")
