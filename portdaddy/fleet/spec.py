"""The fleet's typed specs, backends and cron: what the running daemon needs of a fleet file once parsed.

Parsing the YAML (``config.py``) is separate so that the daemon does not import PyYAML to start: it loads a
fleet file only when ``pd fleet up`` asks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from portdaddy.errors import bad_input

BACKENDS = ("claude-cli", "codex", "gemini", "aider", "ollama", "custom")
BACKEND_ALIASES = {"claude": "claude-cli"}
# The binary each backend runs; None = no binary (ollama is spoken to over HTTP).
BACKEND_BINARIES: dict[str, str | None] = {
    "claude-cli": "claude",
    "codex": "codex",
    "gemini": "gemini",
    "aider": "aider",
    "ollama": None,
}
DEFAULT_BACKEND = "claude-cli"
# Template variables (``{project}`` …), each also given to a fleet agent as ``PD_<NAME>`` (``variable_env``).
TEMPLATE_VARIABLES = ("project", "project_dir", "branch", "sha")
# Template variables an agent's prompt keeps until a run is fired (see ``run_variables``).
RUN_VARIABLES = ("sha", "branch")
_TEMPLATE_TOKEN = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# A commit's values come in a channel message anyone may publish: only what git itself would produce is taken.
_RUN_VALUE = {"sha": re.compile(r"[0-9a-f]{4,64}"), "branch": re.compile(r"[\w./+@-]{1,250}")}
_CHAIN_MAX = 16  # on_success/on_failure hops followed back to the commit that started a chain
_CRON_FORM = "five fields 'minute hour day-of-month month day-of-week', e.g. '*/15 9-17 * * 1-5'"


@dataclass(frozen=True, slots=True)
class Limits:
    max_concurrent_spawns: int = 2
    max_spawns_per_hour: int = 30


@dataclass(frozen=True, slots=True)
class AgentSpec:
    name: str
    trigger: str | None = None
    schedule: str | None = None
    backend: str = DEFAULT_BACKEND
    model: str | None = None
    prompt: str = ""
    command: str | None = None
    respawn: bool = False
    max_respawns: int = 3
    on_success: str | None = None
    on_failure: str | None = None
    identity: str = ""
    timeout_s: float | None = None
    allowed_tools: str | None = None
    enabled: bool = True
    run_on_start: bool = False
    env: dict[str, str] = field(default_factory=dict)

    @property
    def publishes(self) -> tuple[str, ...]:
        """Channels this agent may publish (success first), without duplicates."""
        return tuple(dict.fromkeys(c for c in (self.on_success, self.on_failure) if c))


@dataclass(frozen=True, slots=True)
class WatcherSpec:
    name: str
    trigger: str
    exec: str
    condition: str | None = None
    confirm: bool = False


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    name: str
    description: str = ""
    consumers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FleetConfig:
    name: str
    harbor: str | None
    limits: Limits
    agents: dict[str, AgentSpec]
    watchers: dict[str, WatcherSpec]
    channels: dict[str, ChannelSpec]
    path: Path
    warnings: list[str]
    # The template variables as read when the file was loaded: a run not fired by a commit gets these.
    variables: dict[str, str] = field(default_factory=dict)

    @property
    def project_dir(self) -> Path:
        return fleet_project_dir(self.path)


def fleet_project_dir(path: Path) -> Path:
    """The project a fleet file belongs to: its directory, or the parent of ``.portdaddy/``."""
    parent = Path(path).parent
    return parent.parent if parent.name == ".portdaddy" else parent


# --------------------------------------------------------------------------------------------------------
# Template variables


def render_template(text: str, variables: dict[str, str]) -> str:
    """Replace ``{name}`` tokens found in ``variables``; unknown tokens stay as they are (one pass)."""
    return _TEMPLATE_TOKEN.sub(lambda m: variables.get(m.group(1), m.group(0)), text)


def variable_env(name: str) -> str:
    """The environment variable a template variable's value is in when a fleet agent runs: ``PD_PROJECT_DIR``."""
    return f"PD_{name.upper()}"


def shell_template(command: str, names: tuple[str, ...] = TEMPLATE_VARIABLES) -> str:
    """``command`` with each ``{name}`` token of ``names`` replaced by a reference to its variable
    (``variable_env``), quoted for where the token stands: ``"${PD_X}"`` outside quotes (and inside ``$(…)`` and
    backquotes), ``${PD_X}`` inside ``"…"``. ``${name}`` is the shell's own parameter and stays as it is.

    So the value is one word (or part of the quoted word it stands in), whatever it holds (spaces, quotes,
    ``$(…)``): the shell expands a variable's value but never reads it as code. A token inside ``'…'`` raises
    ValueError: the shell expands nothing there, and single-quoted text is often code for another shell
    (``sh -c '…'``), which would read a value put in it as code. Were the quoting context misread (a ``case``
    pattern's ``)``, a here-document), the worst is a value split into words, left out, or refused, never a
    command run."""
    out: list[str] = []
    stack = ["u"]  # u: unquoted; s: inside '…'; d: inside "…"; p: a $(…) body; b: a `…` body
    i = 0
    while i < len(command):
        if command[i] == "$" and (own := _TEMPLATE_TOKEN.match(command, i + 1)) is not None:
            out.append(command[i : own.end()])  # ${sha}: the shell's variable of that name (a loop's, say)
            i = own.end()
        elif (token := _TEMPLATE_TOKEN.match(command, i)) is not None and token.group(1) in names:
            if stack[-1] == "s":
                raise ValueError(_single_quoted(token.group(1)))
            ref = "${" + variable_env(token.group(1)) + "}"
            out.append(ref if stack[-1] == "d" else f'"{ref}"')
            i = token.end()
        else:
            step = _shell_step(command, i, stack)
            out.append(command[i : i + step])
            i += step
    return "".join(out)


def _single_quoted(name: str) -> str:
    env = variable_env(name)
    return (f"{{{name}}} stands inside '…', where the shell expands nothing and which another shell may run as "
            f"code (sh -c '…'); put {{{name}}} outside the quotes, or write \"${env}\" in them for the shell "
            "that runs that text")  # fmt: skip


def _shell_step(command: str, i: int, stack: list[str]) -> int:
    """How many characters from ``i`` the shell reads as one piece, updating the quoting ``stack``."""
    state, ch = stack[-1], command[i]
    if state == "s":
        if ch == "'":
            stack.pop()
    elif ch == "\\":
        return 2  # the next character is taken literally (in "…" too, for the ones that matter here)
    elif state == "d" and ch == '"':
        stack.pop()
    elif command.startswith("$(", i):
        stack.append("p")
        return 2
    elif ch == "`":
        if state == "b":
            stack.pop()
        else:
            stack.append("b")
    elif state != "d":
        if ch == "#" and (i == 0 or command[i - 1] in " \t\n;&|()"):
            end = command.find("\n", i)
            return (len(command) if end < 0 else end) - i  # a comment, to the end of its line: its quotes are text
        if ch in "'\"":
            stack.append("s" if ch == "'" else "d")
        elif ch == "(" and state == "p":
            stack.append("p")  # a subshell inside $(…): its ) is not the end of the $(
        elif ch == ")" and state == "p":
            stack.pop()
    return 1


def _commit_of(trigger: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``git:committed`` payload that fired a run, directly or up a chain of on_success/on_failure messages
    (each carries the trigger of the run that published it)."""
    for _ in range(_CHAIN_MAX):
        if not isinstance(trigger, dict) or trigger.get("source") != "channel":
            return None
        payload = trigger.get("payload")
        if not isinstance(payload, dict):
            return None
        if trigger.get("channel") == "git:committed":
            return payload
        trigger = payload.get("trigger")
    return None


def run_variables(trigger: dict[str, Any] | None, loaded: dict[str, str]) -> dict[str, str]:
    """``{sha}`` (short) and ``{branch}`` for one run: the triggering commit's, else those of ``loaded``."""
    values = {k: loaded[k] for k in RUN_VARIABLES if k in loaded}
    commit = _commit_of(trigger) or {}
    for key, value in (("sha", commit.get("shortSha") or commit.get("sha")), ("branch", commit.get("branch"))):
        if isinstance(value, str) and _RUN_VALUE[key].fullmatch(value):
            values[key] = value
    return values


# --------------------------------------------------------------------------------------------------------
# Cron


def cron_problem(expr: str) -> str | None:
    """Why ``expr`` is not a usable five-field cron expression; None when it is."""
    from croniter import croniter  # only fleets with a schedule need it: not on the daemon's start path

    fields = expr.split()
    if len(fields) != 5:
        return f"{expr!r} has {len(fields)} field(s); expected {_CRON_FORM}"
    if not croniter.is_valid(expr):
        return f"{expr!r} is not a valid cron expression; expected {_CRON_FORM}"
    try:
        # is_valid accepts expressions that can never fire (e.g. '0 0 30 2 *'); one real step finds them.
        croniter(expr, datetime(2000, 1, 1)).get_next(datetime)
    except Exception:
        return f"{expr!r} never fires; expected {_CRON_FORM}"
    return None


def next_fire(schedule: str, after: datetime) -> datetime:
    """The first time strictly after ``after`` that ``schedule`` fires (same tzinfo as ``after``)."""
    problem = cron_problem(schedule)
    if problem is not None:
        raise bad_input(f"schedule {problem}")
    from croniter import croniter

    return croniter(schedule, after).get_next(datetime)
