"""What a run executes: a ``Task`` (backend, prompt, options) turned into an argv for one child process.

Every backend is a child process, ollama included (a tiny stdlib HTTP client, ``fleet/ollama.py``), so one
supervision path (process group, timeout, log file, SIGTERM then SIGKILL) covers them all. The prompt goes on the
child's stdin for every backend but custom, never as an argument (any local user reads those), and in ``PD_PROMPT``
when it fits there (``prompt_fits``); a custom command reads it there alone.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from portdaddy.errors import PDError, bad_input
from portdaddy.fleet.spec import BACKEND_ALIASES, BACKEND_BINARIES, BACKENDS, variable_env

DEFAULT_OLLAMA_MODEL = "llama3.2"
TRIGGER_MESSAGE_MAX = 4000  # characters of the trigger message put into a prompt (as the original)
# Linux will not exec a program given one argument or environment string (``NAME=value``) of more than 128 KiB
# with its NUL (MAX_ARG_STRLEN): the exec fails with E2BIG and the run never starts.
ARG_STRLEN_MAX = 128 * 1024
# Nor one whose arguments and environment together take more than ARG_MAX (a quarter of the stack limit: 2 MiB under
# the usual 8 MiB; the kernel caps it at 6 MiB whatever the limit), each string counted with its NUL and a pointer.
_ARG_MAX_CAP = 6 * 1024 * 1024
_POINTER = struct.calcsize("P")
# The backends whose CLI reads the prompt from stdin when it is not given as an argument, as it always is for them
# (spec/fleet.md, "The prompt goes on stdin"); a custom command reads PD_PROMPT, and nothing can stand in for that.
STDIN_BACKENDS = frozenset({"claude-cli", "codex", "gemini", "aider", "ollama"})

_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# Words a shell runs itself: a custom command starting with one of these needs no binary on PATH.
_SHELL_BUILTINS = frozenset({
    ".", ":", "[", "[[", "!", "alias", "bg", "case", "cd", "command", "echo", "eval", "exec", "exit",
    "export", "false", "fg", "for", "getopts", "hash", "if", "jobs", "kill", "printf", "pwd", "read",
    "set", "shift", "source", "test", "time", "times", "trap", "true", "type", "ulimit", "umask",
    "unalias", "unset", "until", "wait", "while",
})  # fmt: skip


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
    variables: dict[str, str] = field(default_factory=dict)  # a fleet run's template values, PD_<NAME> in its env

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
        # As JSON, a string too: another agent's payload is one line of data, and cannot forge more lines of
        # this block (a "source: schedule", a new instruction) for the agent that reads it.
        text = _json(trigger.get("payload"))
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


def _custom_program(command: str, variables: dict[str, str]) -> str | None:
    """The program a custom command runs first, or None when the shell itself handles it. A template value in it
    (``{project_dir}/qa.sh``, a ``"${PD_PROJECT_DIR}"`` reference by now) is taken from ``variables``."""
    try:
        words = shlex.split(command)
    except ValueError:
        return None  # unbalanced quotes: the shell will say so at run time, not our business here
    # Skip leading `VAR=value` assignments: the program is the first word after them.
    first = next((w for w in words if not _ASSIGNMENT.match(w)), None)
    if first is None:
        return None
    for name, value in variables.items():
        first = first.replace("${" + variable_env(name) + "}", value)
    if first in _SHELL_BUILTINS or first[0] in "({!$`":
        return None  # builtins, subshells and expansions: nothing to find on PATH
    return first


def program_of(backend: str, command: str | None, variables: dict[str, str] | None = None) -> str | None:
    """The program a backend runs: a name to find on PATH or a path; None when it needs none (the shell runs a
    custom command's builtins; ollama is our own client)."""
    if backend != "custom":
        return BACKEND_BINARIES.get(backend)
    return _custom_program(command or "", variables or {})


def locate(program: str, cwd: str | Path, which: Callable[[str], str | None]) -> str | None:
    """Where ``program`` is: a path is taken from ``cwd`` (where a custom command runs), a name is looked up with
    ``which``; None when it is not there."""
    if "/" not in program:
        return which(program)
    candidate = Path(program).expanduser()
    if not candidate.is_absolute():
        candidate = Path(cwd) / candidate
    return str(candidate) if candidate.is_file() else None


def missing(program: str) -> str:
    """What is wrong, and what to do, when ``locate`` did not find ``program``."""
    if "/" in program:
        return f"{program!r} does not exist; fix its command"
    return f"{program!r} is not on PATH; install it or pick another backend"


def find_binary(task: Task) -> str | None:
    """The task's program found on its PATH (None: it needs none). Raises BadInput when it is missing, so
    ``pd spawn`` is refused up front rather than starting a run that fails at once."""
    program = program_of(task.backend, task.command, task.variables)
    if program is None:
        return None
    found = locate(program, task.cwd, lambda name: shutil.which(name, path=task.path))
    if found is None:
        raise bad_input(f"backend {task.backend}: {missing(program)}")
    return found


def exec_size(text: str) -> int:
    """The bytes ``text`` takes as one argument or environment string of an exec, its NUL included."""
    return len(text.encode("utf-8", "surrogatepass")) + 1  # surrogatepass: counts what encoding would refuse


def fits(text: str) -> bool:
    """Whether ``text`` can be one argument or environment string (``NAME=value``) of an exec."""
    return exec_size(text) <= ARG_STRLEN_MAX


def prompt_fits(prompt: str) -> bool:
    """Whether ``prompt`` fits in ``PD_PROMPT``."""
    return fits(f"PD_PROMPT={prompt}")


def _refusal(text: str, what: str, advice: str, how: str = "") -> str:
    """The refusal "is N bytes; [how, and ]Linux refuses ``what`` over 128 KiB: ``advice``", N counting ``text``."""
    size = len(text.encode("utf-8", "surrogatepass"))
    return f"is {size:,} bytes; {how}Linux refuses {what} over {ARG_STRLEN_MAX // 1024} KiB: {advice}"


def too_large(backend: str, prompt: str) -> str | None:
    """Why ``prompt`` cannot reach ``backend`` at all, as "is N bytes; …" and what to do (None: it can)."""
    if prompt_fits(prompt) or backend in STDIN_BACKENDS:
        return None
    return _refusal(prompt, "an environment variable", "shorten it, or put its long part in a file the command reads",
                    f"backend {backend} gets it only in PD_PROMPT, and ")  # fmt: skip


def command_too_large(command: str) -> str | None:
    """Why a custom ``command`` cannot be run (one argument of ``/bin/sh -c``), as "is N bytes; …" (None: it can)."""
    if fits(command):
        return None
    return _refusal(command, "an argument", "put the command in a script, and run that",
                    "backend custom runs it as one argument of /bin/sh -c, and ")  # fmt: skip


def argument_too_large(value: str) -> str | None:
    """Why ``value`` cannot be an argument (a model, allowed tools), as "is N bytes; …" (None: it can)."""
    return None if fits(value) else _refusal(value, "an argument", "shorten it")


def env_too_large(name: str, value: str) -> str | None:
    """Why ``NAME=value`` cannot be in a child's environment, as "is N bytes; …" (None: it can)."""
    if fits(f"{name}={value}"):
        return None
    return _refusal(value, "an environment variable", "shorten it, or put it in a file and pass its path")


def arg_max() -> int:
    """The bytes Linux lets one exec's arguments and environment take; read each time, as the stack limit may change."""
    return min(os.sysconf("SC_ARG_MAX"), _ARG_MAX_CAP)


def exec_bytes(argv: list[str], env: Mapping[str, str]) -> int:
    """What an exec of ``argv`` with ``env`` takes of ``arg_max()``: each string, its NUL and a pointer to it, and
    the program's path once more (the kernel copies it too). Exact: one byte more is E2BIG."""
    return exec_size(argv[0]) + sum(exec_size(arg) + _POINTER for arg in argv) + env_bytes(env, env)


def env_bytes(env: Mapping[str, str], names: Iterable[str]) -> int:
    """What the variables ``names`` of ``env`` take of an exec: ``NAME=value``, its NUL and a pointer to it."""
    return sum(exec_size(f"{name}={env[name]}") + _POINTER for name in names)


def _over_arg_max(task: Task, env: Mapping[str, str]) -> str | None:
    """Why the exec of ``task`` with ``env`` takes more than ``arg_max()`` in all, as "are N bytes, M over …; what
    takes most of them: what to do" (None: it fits, or its program is missing, which its caller says)."""
    try:
        argv = argv_for(task)
    except PDError:
        return None
    total, limit = exec_bytes(argv, env), arg_max()
    if total <= limit:
        return None

    # Most of it is an environment, the env: values or the daemon's (which every agent inherits): a prompt, a command
    # and the run's own variables are each at most 128 KiB of the over 2 MiB.
    size = partial(env_bytes, env)
    ours = [n for n in env if n in task.env and n != "PD_PROMPT"]
    inherited = [n for n in env if n not in task.env and not n.startswith(("PD_", "PORT_DADDY_")) and n != "PATH"]
    if size(ours) >= size(inherited):
        most, advice = f"its env: values take {size(ours):,}", "put the large ones in files and pass their paths"
    else:
        most = f"the daemon's environment, which every agent gets, takes {size(inherited):,}"
        advice = "restart the daemon (pd stop, then pd start) from a shell with less in its environment"
    over = f"{total - limit:,} over the {limit:,} Linux allows one exec (ARG_MAX)"
    return f"are {total:,} bytes, {over}; {most} of them: {advice}"


def exec_problem(task: Task, prompt: str, *, command: str = "the command", env: Mapping[str, str] | None = None
                 ) -> str | None:  # fmt: skip
    """Why a run of ``task`` sent ``prompt`` could not start, as "<what> is N bytes; …" (``command`` names the custom
    command); None when it can. A string of its exec over 128 KiB, field by field; with ``env``, the environment
    its child gets, also its arguments and environment together over ARG_MAX. Checked before a run is registered,
    and up front by pd spawn and (string by string) the fleet file's checks."""
    problems = [
        ("the prompt", too_large(task.backend, prompt)),
        (command, command_too_large(task.command) if task.backend == "custom" and task.command else None),
        ("model", argument_too_large(task.model) if task.model else None),
        ("allowedTools", argument_too_large(task.allowed_tools) if task.allowed_tools else None),
        *((f"env {name}", env_too_large(name, value)) for name, value in task.env.items()),
        ("arguments and environment", None if env is None else _over_arg_max(task, env)),
    ]
    return next((f"{what} {problem}" for what, problem in problems if problem is not None), None)


def argv_for(task: Task) -> list[str]:
    """The child's argv, which never holds the prompt: a backend in ``STDIN_BACKENDS`` reads it from stdin, a custom
    command from ``PD_PROMPT``. Any local user can read a process's argv (/proc/PID/cmdline, ``ps``); its stdin and
    environment only its own user can. Raises BadInput when the backend's binary is not on the task's PATH."""
    model = ["--model", task.model] if task.model else []
    if task.backend == "custom":
        if not task.command:
            raise bad_input("backend custom needs a command; pass the shell command as the task")
        return ["/bin/sh", "-c", task.command]
    if task.backend == "ollama":
        return [sys.executable, "-m", "portdaddy.fleet.ollama", "--model", task.model or DEFAULT_OLLAMA_MODEL]
    found = find_binary(task)
    assert found is not None
    # Each CLI's documented way to read the prompt from stdin: claude -p and gemini read it when no prompt is given
    # (gemini runs headless when stdin is not a terminal), codex exec takes "-" for it, aider a file (/dev/stdin).
    if task.backend == "claude-cli":
        tools = ["--allowedTools", task.allowed_tools] if task.allowed_tools else []
        return [found, "-p", *tools, *model]
    if task.backend == "codex":
        return [found, "exec", *model, "-"]
    if task.backend == "gemini":
        return [found, *(["-m", task.model] if task.model else [])]
    if task.backend == "aider":
        return [found, "--yes", "--no-stream", *model, "--message-file", "/dev/stdin"]
    raise bad_input(f"unknown backend {task.backend!r}")
