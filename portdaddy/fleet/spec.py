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
    ``$(…)``): the shell expands a variable's value but never reads it as code. Two places raise ValueError,
    because there the value would be read as code whatever its quoting: inside ``'…'``, where the shell expands
    nothing, and which is often code for another shell (``sh -c '…'``); and in a word the command hands to
    another shell as code (``_code_words``: ``sh -c "… {x}"``, ``eval``, ``ssh host …``). Were the quoting
    context misread (a ``case`` pattern's ``)``, a here-document), the worst is a value split into words, left
    out, or refused, never a command run."""
    out: list[str] = []
    stack = ["u"]  # u: unquoted; s: inside '…'; d: inside "…"; p: a $(…) body; b: a `…` body
    commands = _Commands()
    i = 0
    while i < len(command):
        if command[i] == "$" and (own := _TEMPLATE_TOKEN.match(command, i + 1)) is not None:
            out.append(command[i : own.end()])  # ${sha}: the shell's variable of that name (a loop's, say)
            commands.text(command[i : own.end()])
            i = own.end()
        elif (token := _TEMPLATE_TOKEN.match(command, i)) is not None and token.group(1) in names:
            if stack[-1] == "s":
                raise ValueError(_single_quoted(token.group(1)))
            commands.token(token.group(1))
            ref = "${" + variable_env(token.group(1)) + "}"
            out.append(ref if stack[-1] == "d" else f'"{ref}"')
            i = token.end()
        else:
            step = _shell_step(command, i, stack, commands)
            out.append(command[i : i + step])
            i += step
    commands.finish()
    return "".join(out)


def _single_quoted(name: str) -> str:
    env = variable_env(name)
    return (f"{{{name}}} stands inside '…', where the shell expands nothing and which another shell may run as "
            f"code (sh -c '…'); put {{{name}}} outside the quotes, or write \"${env}\" in them for the shell "
            "that runs that text")  # fmt: skip


def _handed_on(name: str, runner: str) -> str:
    env = variable_env(name)
    if runner == "ssh":
        # The remote shell does not get the run's environment: the value has to travel as data.
        return (f"{{{name}}} is in the command ssh runs through the remote host's shell, which would read its value "
                f"as code; send the value as data instead: "
                f"printf '%s\\n' \"${env}\" | ssh HOST 'read -r v; … \"$v\"'")  # fmt: skip
    what = "the text eval runs as a command" if runner == "eval" else f"the command text {runner} gives another shell"
    return (f"{{{name}}} is in {what}, which would read its value as code; write \"${env}\" inside single quotes "
            f"there instead ({runner} '… \"${env}\"'): that shell expands it, as one word")  # fmt: skip


def _shell_step(command: str, i: int, stack: list[str], commands: _Commands) -> int:
    """How many characters from ``i`` the shell reads as one piece, updating the quoting ``stack`` and the words
    and commands read so far."""
    state, ch = stack[-1], command[i]
    if state == "s":
        if ch == "'":
            stack.pop()
        else:
            commands.text(ch)
    elif ch == "\\":
        if command[i + 1 : i + 2] != "\n":  # a line continuation is nothing at all
            commands.text(command[i + 1 : i + 2])
        return 2  # the next character is taken literally (in "…" too, for the ones that matter here)
    elif state == "d" and ch == '"':
        stack.pop()
    elif command.startswith("$(", i):
        stack.append("p")
        commands.push()
        return 2
    elif ch == "`":
        if state == "b":
            stack.pop()
            commands.pop()
        else:
            stack.append("b")
            commands.push()
    elif state == "d":
        commands.text(ch)
    elif ch == "#" and (i == 0 or command[i - 1] in " \t\n;&|()"):
        end = command.find("\n", i)
        return (len(command) if end < 0 else end) - i  # a comment, to the end of its line: its quotes are text
    elif ch in "'\"":
        stack.append("s" if ch == "'" else "d")
        commands.text("")  # '' is a word too
    elif ch == "(" and state == "p":
        stack.append("p")  # a subshell inside $(…): its ) is not the end of the $(
        commands.push()
    elif ch == ")" and state == "p":
        stack.pop()
        commands.pop()
    elif ch in " \t":
        commands.space()
    elif ch in "\n;|()" or (ch == "&" and command[i - 1 : i] not in ("<", ">")):  # 2>&1 is a redirection
        commands.end()
    else:
        commands.text(ch)
    return 1


# What hands its arguments to a shell as code: a shell given ``-c`` (wherever it stands, ``xargs sh -c`` or
# ``find -exec sh -c`` too), ``eval`` and ``ssh`` (where a command starts: ``rsync -e ssh`` runs no command).
_SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh"})
_SHELL_OPTIONS_WITH_ARGUMENT = ("-o", "+o", "-O", "+O", "--rcfile", "--init-file")
_SSH_OPTIONS_WITH_ARGUMENT = frozenset("BbcDEeFIiJLlmOoPpQRSWw")
# Words before the command a simple command runs: reserved words, and commands that run the rest as a command.
_RESERVED = frozenset({"!", "{", "}", "if", "then", "else", "elif", "do", "while", "until"})
_WRAPPERS = frozenset({"exec", "command", "builtin", "nohup", "env", "nice", "setsid", "timeout", "time", "sudo",
                       "doas", "xargs"})  # fmt: skip
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
_REDIRECTION = re.compile(r"\d*[<>]")
_OPAQUE = "\0"  # a $(…) or `…` in a word: what it gives is not known here


@dataclass(slots=True)
class _Word:
    text: str = ""  # as the shell reads it, quotes removed
    tokens: list[str] = field(default_factory=list)  # the template variables in it (in a $(…) of it too)


@dataclass(slots=True)
class _Frame:
    words: list[_Word] = field(default_factory=list)  # the simple command being read
    open: bool = False  # whether its last word is still being read


class _Commands:
    """The simple commands of a shell command as ``shell_template`` reads it, word by word, at each level (the
    command, every ``$(…)`` and backquote body): enough to see the words another shell reads as code."""

    def __init__(self) -> None:
        self.frames = [_Frame()]

    def _word(self) -> _Word:
        frame = self.frames[-1]
        if not frame.open:
            frame.words.append(_Word())
            frame.open = True
        return frame.words[-1]

    def text(self, text: str) -> None:
        self._word().text += text

    def token(self, name: str) -> None:
        self._word()
        for frame in self.frames:  # a $(…) gives its output to the word it stands in, at every level
            frame.words[-1].tokens.append(name)

    def space(self) -> None:
        self.frames[-1].open = False

    def end(self) -> None:
        frame = self.frames[-1]
        for index, runner in _code_words([w.text for w in frame.words]):
            if frame.words[index].tokens:
                raise ValueError(_handed_on(frame.words[index].tokens[0], runner))
        self.frames[-1] = _Frame()

    def push(self) -> None:
        self.text(_OPAQUE)
        self.frames.append(_Frame())

    def pop(self) -> None:
        self.end()
        self.frames.pop()

    def finish(self) -> None:
        while len(self.frames) > 1:  # an unclosed $(…): the shell refuses it, but check what is there
            self.pop()
        self.end()


def _code_words(words: list[str]) -> list[tuple[int, str]]:
    """Which words of a simple command are code for another shell, each with what runs it: the command text of
    ``sh -c`` (and bash, dash, zsh, ksh), the arguments of ``eval`` and the command ``ssh`` runs remotely."""
    kept = _without_redirections(words)
    plain = [words[i] for i in kept]
    found: list[tuple[int, str]] = []
    first = _command_start(plain)
    if first < len(plain) and plain[first] == "eval":
        found += [(kept[i], "eval") for i in range(first + 1, len(plain))]
    elif first < len(plain) and plain[first].rpartition("/")[2] == "ssh":
        found += [(kept[i], "ssh") for i in _ssh_command(plain, first + 1)]
    for at, word in enumerate(plain):
        shell = word.rpartition("/")[2]
        if shell in _SHELLS and (code := _dash_c_text(plain, at + 1)) is not None:
            found.append((kept[code], f"{shell} -c"))
    return found


def _without_redirections(words: list[str]) -> list[int]:
    """The indexes of ``words`` that are not redirections (``2>/dev/null``, ``> out``: neither is an argument)."""
    kept, i = [], 0
    while i < len(words):
        redirection = _REDIRECTION.match(words[i])
        if redirection is None:
            kept.append(i)
        elif words[i][redirection.end() :].strip("<>&|") == "":
            i += 1  # the operator alone: its target is the next word
        i += 1
    return kept


def _command_start(words: list[str]) -> int:
    """Where the command a simple command runs is named: past assignments, reserved words and wrappers (with
    their options), so ``timeout 60 ssh`` and ``env X=1 eval`` are seen."""
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word in _WRAPPERS:
            while i < len(words) and (words[i].startswith("-") or _ASSIGNMENT.match(words[i])):
                i += 1
            if word == "timeout":
                i += 1  # its duration
        elif not (word in _RESERVED or _ASSIGNMENT.match(word)):
            return i - 1
    return i


def _dash_c_text(words: list[str], i: int) -> int | None:
    """The index of the command text of a shell whose options start at ``i``, if one of them is ``-c``."""
    dash_c = False
    while i < len(words) and words[i][:1] in ("-", "+") and len(words[i]) > 1:
        word = words[i]
        i += 1
        if word == "--":
            break
        dash_c = dash_c or (word[0] == "-" and word[1] != "-" and "c" in word)
        if word in _SHELL_OPTIONS_WITH_ARGUMENT:
            i += 1
    return i if dash_c and i < len(words) else None


def _ssh_command(words: list[str], i: int) -> range:
    """The indexes of the command ``ssh`` (its options starting at ``i``) runs on the remote host."""
    while i < len(words) and words[i].startswith("-") and len(words[i]) > 1:
        word = words[i]
        i += 1
        if word == "--":
            break
        letters = word[1:]
        needs = next((at for at, letter in enumerate(letters) if letter in _SSH_OPTIONS_WITH_ARGUMENT), None)
        if needs == len(letters) - 1:
            i += 1  # -p 22: the argument is the next word (-p22 holds it)
    return range(i + 1, len(words))  # past the destination


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
