"""``pd-fleet.yml``: discovery, templating, parsing into the typed specs of ``spec.py``, and static checks.

Pure: no daemon, no trio. The supervisor and ``pd fleet`` both build on ``load_fleet``.

Differences from the original (reference §23), on purpose:

* ``schedule`` is real five-field cron evaluated by croniter, not the original's three-pattern subset;
* every error names ``<file>:<line>: <dotted.field>``, so the line numbers come from PyYAML's node graph
  (``yaml.compose``) rather than from plain ``safe_load`` output;
* all errors in a file are collected and raised together (one ``FleetConfigError``); unknown keys are
  warnings, never errors, so a file written for a newer version still loads;
* the producer→consumer graph must be acyclic, self-edges included (an agent that triggers itself would
  loop forever), where the original ignored self-edges.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from portdaddy.core import identity as _identity
from portdaddy.core.validate import NOT_TEXT, surrogate_in
from portdaddy.core.validate import name as _name_check
from portdaddy.durations import parse_duration_ms
from portdaddy.errors import BadInput, PDError
from portdaddy.fleet.backends import (
    argument_too_large,
    command_too_large,
    env_too_large,
    locate,
    missing,
    program_of,
    too_large,
)
from portdaddy.fleet.spec import (
    BACKEND_ALIASES,
    BACKENDS,
    DEFAULT_BACKEND,
    RUN_VARIABLES,
    TEMPLATE_VARIABLES,
    AgentSpec,
    ChannelSpec,
    FleetConfig,
    Limits,
    WatcherSpec,
    cron_problem,
    fleet_project_dir,
    render_template,
    shell_template,
)

FLEET_FILES = ("pd-fleet.yml", "pd-fleet.yaml", ".portdaddy/fleet.yml", ".portdaddy/fleet.yaml")

# Channels published from outside the fleet by the post-commit hook `pd fleet init` installs.
GIT_HOOK_CHANNELS = frozenset({"git:committed"})

DEFAULT_IDENTITY = "{project}:fleet:{name}"

# While the file is parsed, template variables stand as these markers (plain YAML words, safe in any scalar: a
# value with a quote or a colon cannot break the YAML around it), put back scalar by scalar (``_unmark``).
_MARKERS = {key: f"PDVAR{key.upper()}6F3A" for key in TEMPLATE_VARIABLES}
# Fields of an agent or watcher (kind -> field) whose template variables are put back in their own way: a shell
# command gets references to the values, never the values (``shell_template``); a prompt keeps {sha} and {branch}
# for the run to fill.
_SHELL_COMMANDS = {("agents", "command"), ("watchers", "exec")}
_PROMPTS = {("agents", "prompt")}
_AGENT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PUBLISH = re.compile(r"^publish\s+(\S+)$")
_GIT_TIMEOUT_S = 5.0

_ROOT_KEYS = ("name", "harbor", "limits", "agents", "watchers", "channels")
_LIMIT_KEYS = ("max_concurrent_spawns", "max_spawns_per_hour")
_AGENT_KEYS = (
    "trigger", "schedule", "backend", "model", "prompt", "command", "respawn", "max_respawns",
    "on_success", "on_failure", "identity", "timeout", "timeout_s", "allowedTools", "allowed_tools",
    "enabled", "run_on_start", "env",
)  # fmt: skip
_WATCHER_KEYS = ("trigger", "exec", "condition", "confirm")
_CHANNEL_KEYS = ("description", "consumers")


class FleetConfigError(BadInput):
    """All problems in a fleet file; ``message`` has one ``<file>:<line>: <field>: <problem>`` per line."""

    max_message = None  # every problem, each on its line: what pd fleet validate is for

    def __init__(self, errors: list[str], path: Path | str) -> None:
        super().__init__("VALIDATION_ERROR", "\n".join(errors), file=str(path), errors=list(errors))
        self.errors = list(errors)
        self.path = Path(path)


# --------------------------------------------------------------------------------------------------------
# Discovery and templating


def find_fleet_file(project_dir: Path) -> Path | None:
    """The first existing fleet file in ``project_dir`` (see ``FLEET_FILES`` for the order)."""
    for rel in FLEET_FILES:
        candidate = Path(project_dir) / rel
        if candidate.is_file():
            return candidate
    return None


def _git(project_dir: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(project_dir), *args],
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None  # no git binary, or git hung: fall back to the defaults
    text = out.stdout.strip()
    return text if out.returncode == 0 and text else None


def template_vars(project_dir: Path) -> dict[str, str]:
    """``{project}`` (the directory's name as an identity segment: identities and harbors are made of it),
    ``{project_dir}``, ``{branch}`` (else ``main``) and ``{sha}`` (else ``unknown``)."""
    resolved = Path(project_dir).resolve()
    # symbolic-ref works in a repo with no commits yet; rev-parse covers a detached HEAD ("HEAD").
    branch = _git(resolved, "symbolic-ref", "--short", "-q", "HEAD") or _git(
        resolved, "rev-parse", "--abbrev-ref", "HEAD"
    )
    sha = _git(resolved, "rev-parse", "--short", "HEAD")
    return {
        "project": _identity.segment_of(resolved.name),
        "project_dir": str(resolved),
        "branch": branch or "main",
        "sha": sha or "unknown",
    }


def _unmark(ctx: _Ctx, node: Node, variables: dict[str, str], path: tuple[str, ...] = (),
            seen: set[int] | None = None) -> None:  # fmt: skip
    """Put the template variables back in every scalar, in the way its field (``path``: its keys, and ``[i]`` for
    a list item) takes them: in a shell command (an agent's ``command``, a watcher's ``exec``) as a quoted
    reference to the variable the run gets, so no value (a directory named ``a'b $(rm x)``) is ever read as shell
    code, and an error where none can be (inside '…'); in an agent's ``prompt`` as the value, but {sha} and
    {branch} as tokens for the run to fill; elsewhere (an ``env:`` variable named ``command`` too) as the value. A
    variable without a value stays a ``{token}``."""
    seen = set() if seen is None else seen
    if id(node) in seen:
        return  # an alias: already done
    seen.add(id(node))
    if isinstance(node, ScalarNode):
        # (agents, command) of [fleet.]agents.qa.command, or of agents[0].command (the list form)
        field = (path[-3], path[-1]) if len(path) >= 3 else None
        shell = field in _SHELL_COMMANDS
        text = node.value
        for key, marker in _MARKERS.items():
            kept = shell or (field in _PROMPTS and key in RUN_VARIABLES)
            text = text.replace(marker, f"{{{key}}}" if kept else variables.get(key, f"{{{key}}}"))
        if shell:
            try:
                text = shell_template(text)
            except ValueError as exc:
                ctx.error(node, "".join(p if p.startswith("[") else f".{p}" for p in path).lstrip("."), str(exc))
        node.value = text
    elif isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            _unmark(ctx, item, variables, (*path, f"[{i}]"), seen)
    elif isinstance(node, MappingNode):
        for key_node, value_node in node.value:
            _unmark(ctx, key_node, variables, (), seen)
            key = key_node.value if isinstance(key_node, ScalarNode) else ""
            _unmark(ctx, value_node, variables, (*path, key), seen)


def _refuse_surrogates(ctx: _Ctx, node: Node, fld: str = "", seen: set[int] | None = None) -> None:
    """An error for each scalar, key or value, holding a lone surrogate, which YAML's "\\ud800" escape makes: no UTF-8
    encoder takes one, so a run whose prompt, command or env held one failed with a traceback as its agent was
    registered or its child started (the same rule as every op's text parameters, core/validate.py)."""
    seen = set() if seen is None else seen
    if id(node) in seen:
        return  # an alias: already done
    seen.add(id(node))
    if isinstance(node, ScalarNode):
        if not _joined(node):
            ctx.error(node, fld or "(top level)", NOT_TEXT)
    elif isinstance(node, SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_surrogates(ctx, item, f"{fld}[{i}]", seen)
    elif isinstance(node, MappingNode):
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                _refuse_surrogates(ctx, key_node, fld, seen)
            elif not _joined(key_node):  # not put in the field's name: it could not be printed
                ctx.error(key_node, fld or "(top level)", f"a key {NOT_TEXT}")
                continue
            _refuse_surrogates(ctx, value_node, f"{fld}.{key_node.value}" if fld else key_node.value, seen)


def _joined(node: ScalarNode) -> bool:
    """False when ``node`` holds a lone surrogate. Both halves of a pair ("\\ud83d\\ude00"), which PyYAML leaves
    apart, are made the character they spell, as JSON does."""
    if surrogate_in(node.value, "") is None:
        return True
    try:
        node.value = node.value.encode("utf-16-le", "surrogatepass").decode("utf-16-le")
    except UnicodeDecodeError:
        return False
    return True


# --------------------------------------------------------------------------------------------------------
# Parsing


class _Ctx:
    """Collects errors and warnings with their file, line and dotted field."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._errors: list[tuple[int, str]] = []
        self._warnings: list[tuple[int, str]] = []
        self.constructor = SafeConstructor()

    # Reported in file order, whatever order the checks ran in (stable sort keeps same-line order).
    @property
    def errors(self) -> list[str]:
        return [text for _line, text in sorted(self._errors, key=lambda e: e[0])]

    @property
    def n_errors(self) -> int:
        return len(self._errors)

    @property
    def warnings(self) -> list[str]:
        return [text for _line, text in sorted(self._warnings, key=lambda e: e[0])]

    def _add(self, into: list[tuple[int, str]], node: Node | int, fld: str, msg: str) -> None:
        line = _line(node)
        into.append((line, f"{self.path}:{line}: {fld}: {msg}"))

    def error(self, node: Node | int, fld: str, msg: str) -> None:
        self._add(self._errors, node, fld, msg)

    def warn(self, node: Node | int, fld: str, msg: str) -> None:
        self._add(self._warnings, node, fld, msg)

    def value(self, node: Node, fld: str) -> Any:
        """The Python value of a node (safe types only); ``_BAD`` after recording an error."""
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            self.error(node, fld, f"cannot read value ({_yaml_problem(exc)}); use plain YAML types")
            return _BAD
        except (ValueError, TypeError, OverflowError):  # e.g. `2024-13-45` matches the timestamp pattern
            self.error(node, fld, f"cannot read value {_type_of(node)}; quote it if it is text")
            return _BAD


_BAD: Any = object()  # marks a value whose error is already recorded


def _line(node: Node | int) -> int:
    return node if isinstance(node, int) else node.start_mark.line + 1


def _yaml_problem(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError):
        return " ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
    return str(exc)


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _type_of(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return f"{node.value!r}"


def _mapping(ctx: _Ctx, node: Node, fld: str) -> dict[str, tuple[Node, Node]] | None:
    """A mapping node as ``{key text: (key node, value node)}``; None (error recorded) if not a mapping."""
    here = fld or "(top level)"
    if not isinstance(node, MappingNode):
        ctx.error(node, here, f"got {_type_of(node)}; expected a mapping of keys to values")
        return None
    try:
        ctx.constructor.flatten_mapping(node)  # resolve `<<: *anchor` merges like safe_load does
    except yaml.YAMLError as exc:
        ctx.error(node, here, f"bad merge key ({_yaml_problem(exc)}); merge only mappings")
        return None
    out: dict[str, tuple[Node, Node]] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, ScalarNode):
            ctx.error(key_node, here, "a key is a list or mapping; keys must be plain names")
            continue
        # The raw key text, not its resolved value: `on:` or `1:` stay names, not True or 1.
        key = key_node.value
        sub = f"{fld}.{key}" if fld else key
        if key in out:
            first = _line(out[key][0])
            ctx.error(key_node, sub, f"duplicate key (first on line {first}); keep one")
            continue
        out[key] = (key_node, value_node)
    return out


def _unknown(ctx: _Ctx, items: dict[str, tuple[Node, Node]], known: tuple[str, ...], fld: str) -> None:
    for key, (key_node, _value) in items.items():
        if key not in known:
            ctx.warn(
                key_node,
                f"{fld}.{key}" if fld else key,
                f"unknown key ignored; known keys: {', '.join(known)}",
            )


def _text(ctx: _Ctx, node: Node, fld: str, *, allow_empty: bool = False) -> str | None:
    """A scalar as text, taken verbatim (``model: 4`` is "4"); None (error recorded) otherwise."""
    if not isinstance(node, ScalarNode) or _is_null(node):
        ctx.error(node, fld, f"got {'nothing' if _is_null(node) else _type_of(node)}; expected text")
        return None
    text = node.value.strip()
    if not text and not allow_empty:
        ctx.error(node, fld, "is empty; expected text")
        return None
    return text


def _bool(ctx: _Ctx, node: Node, fld: str) -> bool | None:
    value = ctx.value(node, fld)
    if value is _BAD:
        return None
    if not isinstance(value, bool):
        ctx.error(node, fld, f"got {_type_of(node)}; expected true or false")
        return None
    return value


def _int(ctx: _Ctx, node: Node, fld: str, lo: int) -> int | None:
    value = ctx.value(node, fld)
    if value is _BAD:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        ctx.error(node, fld, f"got {_type_of(node)}; expected a whole number >= {lo}")
        return None
    return value


def _check_name(ctx: _Ctx, node: Node, fld: str, value: str, what: str) -> str | None:
    try:
        return _name_check(what)(fld, value)
    except PDError as exc:
        ctx.error(node, fld, f"{exc.message}; expected letters, digits, '.', '_', ':', '-', e.g. qa:passed")
        return None


def _channel(ctx: _Ctx, node: Node, fld: str) -> str | None:
    text = _text(ctx, node, fld)
    return None if text is None else _check_name(ctx, node, fld, text, "channel")


def _publish(ctx: _Ctx, node: Node, fld: str) -> str | None:
    text = _text(ctx, node, fld)
    if text is None:
        return None
    m = _PUBLISH.match(text)
    if m is None:
        ctx.error(
            node,
            fld,
            f"{text[:60]!r} is not understood; expected 'publish <channel>', e.g. 'publish qa:passed'",
        )
        return None
    return _check_name(ctx, node, fld, m.group(1), "channel")


def _duration_s(ctx: _Ctx, node: Node, fld: str) -> float | None:
    value = ctx.value(node, fld)
    if value is _BAD:
        return None
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)  # a bare number is seconds (unlike parse_duration_ms, where it is ms)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            ms = parse_duration_ms(text)
            seconds = None if ms is None else ms / 1000
    if seconds is None or not seconds > 0 or seconds == float("inf"):
        ctx.error(node, fld, f"got {_type_of(node)}; expected seconds > 0 or a duration like 90s, 10m, 1h30m")
        return None
    return seconds


def _allowed_tools(ctx: _Ctx, node: Node, fld: str) -> str | None:
    if isinstance(node, SequenceNode):  # a YAML list is friendlier than one long comma string
        items = [_text(ctx, item, f"{fld}[{i}]") for i, item in enumerate(node.value)]
        return None if any(i is None for i in items) else ",".join(i for i in items if i)
    return _text(ctx, node, fld)


def _env(ctx: _Ctx, node: Node, fld: str) -> dict[str, str]:
    items = _mapping(ctx, node, fld) if not _is_null(node) else {}
    out: dict[str, str] = {}
    for key, (key_node, value_node) in (items or {}).items():
        sub = f"{fld}.{key}"
        if not _ENV_NAME.match(key):
            ctx.error(key_node, sub, "is not a valid variable name; expected letters, digits and '_'")
            continue
        if not isinstance(value_node, ScalarNode):
            ctx.error(value_node, sub, f"got {_type_of(value_node)}; expected text")
            continue
        out[key] = "" if _is_null(value_node) else value_node.value  # verbatim: `DEBUG: true` is "true"
        if (problem := env_too_large(key, out[key])) is not None:
            ctx.error(value_node, sub, problem)  # every run would fail to start
    return out


def _agent(ctx: _Ctx, name: str, name_node: Node, node: Node, fld: str, variables: dict[str, str]) -> AgentSpec | None:
    n_errors = ctx.n_errors
    if not _AGENT_NAME.match(name):
        ctx.error(
            name_node,
            fld,
            "agent name must be 1-64 letters, digits, '.', '_', '-' (it becomes part of an identity)",
        )
    items = _mapping(ctx, node, fld)
    if items is None:
        return None
    _unknown(ctx, items, _AGENT_KEYS, fld)
    kw: dict[str, Any] = {}

    def get(key: str) -> tuple[Node, Node] | None:
        return items.get(key)

    for key, parse in (("trigger", _channel), ("on_success", _publish), ("on_failure", _publish)):
        if (got := get(key)) is not None:
            kw[key] = parse(ctx, got[1], f"{fld}.{key}")
    for key, too_large_for_exec in (("model", argument_too_large), ("command", command_too_large)):
        if (got := get(key)) is not None:
            kw[key] = _text(ctx, got[1], f"{fld}.{key}")
            if kw[key] and (problem := too_large_for_exec(kw[key])) is not None:
                ctx.error(got[1], f"{fld}.{key}", problem)  # every run would fail to start
    for key in ("respawn", "enabled", "run_on_start"):
        if (got := get(key)) is not None:
            kw[key] = _bool(ctx, got[1], f"{fld}.{key}")
    if (got := get("max_respawns")) is not None:
        kw["max_respawns"] = _int(ctx, got[1], f"{fld}.max_respawns", 0)
    if (got := get("env")) is not None:
        kw["env"] = _env(ctx, got[1], f"{fld}.env")

    backend = DEFAULT_BACKEND
    if (got := get("backend")) is not None:
        text = _text(ctx, got[1], f"{fld}.backend")
        if text is not None:
            backend = BACKEND_ALIASES.get(text, text)
            if backend not in BACKENDS:
                ctx.error(
                    got[1],
                    f"{fld}.backend",
                    f"unknown backend {text!r}; expected one of {', '.join(BACKENDS)} (or claude)",
                )
    kw["backend"] = backend

    prompt = get("prompt")
    if prompt is not None:
        kw["prompt"] = _text(ctx, prompt[1], f"{fld}.prompt", allow_empty=True)
        if kw["prompt"] and (problem := too_large(backend, kw["prompt"])) is not None:
            ctx.error(prompt[1], f"{fld}.prompt", problem)  # every run would fail to start (a run adds to it)
    if backend == "custom":
        if get("command") is None:
            ctx.error(name_node, f"{fld}.command", "backend custom needs command: <shell command to run>")
    elif backend in BACKENDS:
        if get("command") is not None:
            ctx.warn(items["command"][0], f"{fld}.command", "only used by backend custom; ignored")
        if prompt is None:
            ctx.error(name_node, f"{fld}.prompt", f"missing; backend {backend} needs prompt: <what to do>")
        elif kw.get("prompt") == "":
            ctx.error(prompt[1], f"{fld}.prompt", f"is empty; backend {backend} needs a prompt")

    trig, sched = get("trigger"), get("schedule")
    if trig is not None and sched is not None:
        ctx.error(sched[0], f"{fld}.schedule", "an agent has either trigger or schedule, not both; remove one")
    elif trig is None and sched is None:
        ctx.error(name_node, fld, "needs trigger: <channel> or schedule: '<cron>'; e.g. trigger: git:committed")
    if sched is not None:
        text = _text(ctx, sched[1], f"{fld}.schedule")
        if text is not None:
            problem = cron_problem(text)
            if problem is not None:
                ctx.error(sched[1], f"{fld}.schedule", problem)
            kw["schedule"] = " ".join(text.split())
    if trig is not None and kw.get("run_on_start"):
        ctx.warn(items["run_on_start"][0], f"{fld}.run_on_start", "only applies to scheduled agents; ignored")

    timeouts = [k for k in ("timeout", "timeout_s") if k in items]
    if len(timeouts) == 2:
        ctx.error(items["timeout_s"][0], f"{fld}.timeout_s", "given together with timeout; keep one")
    elif timeouts:
        kw["timeout_s"] = _duration_s(ctx, items[timeouts[0]][1], f"{fld}.{timeouts[0]}")
    tools = [k for k in ("allowedTools", "allowed_tools") if k in items]
    if len(tools) == 2:
        ctx.error(items["allowed_tools"][0], f"{fld}.allowed_tools", "given together with allowedTools; keep one")
    elif tools:
        kw["allowed_tools"] = _allowed_tools(ctx, items[tools[0]][1], f"{fld}.{tools[0]}")
        if kw["allowed_tools"] and (problem := argument_too_large(kw["allowed_tools"])) is not None:
            ctx.error(items[tools[0]][1], f"{fld}.{tools[0]}", problem)

    ident_node: Node | int = name_node
    ident_field = f"{fld}.identity"
    template = render_template(DEFAULT_IDENTITY, variables)
    if (got := get("identity")) is not None:
        ident_node = got[1]
        template = _text(ctx, got[1], ident_field) or template
    identity = template.replace("{name}", name)  # {name} is per agent, so it survives the textual pass
    try:
        _identity.parse(identity, wildcard=False)
    except PDError as exc:
        how = "fix identity:" if get("identity") is not None else "set identity: explicitly"
        ctx.error(ident_node, ident_field, f"{exc.message}; {how}")
    kw["identity"] = identity

    if ctx.n_errors > n_errors:
        return None
    clean = {k: v for k, v in kw.items() if v is not None}
    if clean.get("prompt") is None:
        clean["prompt"] = ""
    return AgentSpec(name=name, **clean)


def _watcher(ctx: _Ctx, name: str, name_node: Node, node: Node, fld: str) -> WatcherSpec | None:
    items = _mapping(ctx, node, fld)
    if items is None:
        return None
    _unknown(ctx, items, _WATCHER_KEYS, fld)
    n_errors = ctx.n_errors
    values: dict[str, Any] = {}
    for key in ("trigger", "exec"):
        if key not in items:
            ctx.error(
                name_node,
                f"{fld}.{key}",
                "missing; a watcher needs trigger: <channel> and exec: <shell command>",
            )
    if "trigger" in items:
        values["trigger"] = _channel(ctx, items["trigger"][1], f"{fld}.trigger")
    if "exec" in items:
        values["exec"] = _text(ctx, items["exec"][1], f"{fld}.exec")
    if "condition" in items:
        values["condition"] = _text(ctx, items["condition"][1], f"{fld}.condition")
    if "confirm" in items:
        values["confirm"] = _bool(ctx, items["confirm"][1], f"{fld}.confirm")
    if ctx.n_errors > n_errors:
        return None
    return WatcherSpec(name=name, **{k: v for k, v in values.items() if v is not None})


def _channel_spec(ctx: _Ctx, name: str, node: Node, fld: str) -> ChannelSpec | None:
    if _is_null(node):
        return ChannelSpec(name=name)
    if isinstance(node, ScalarNode):  # `chan: "what it means"` is shorthand for a description
        return ChannelSpec(name=name, description=node.value.strip())
    items = _mapping(ctx, node, fld)
    if items is None:
        return None
    _unknown(ctx, items, _CHANNEL_KEYS, fld)
    description = ""
    if "description" in items:
        description = _text(ctx, items["description"][1], f"{fld}.description", allow_empty=True) or ""
    consumers: list[str] = []
    if "consumers" in items:
        cnode = items["consumers"][1]
        if isinstance(cnode, SequenceNode):
            for i, item in enumerate(cnode.value):
                text = _text(ctx, item, f"{fld}.consumers[{i}]")
                if text is not None:
                    consumers.append(text)
        elif not _is_null(cnode):
            text = _text(ctx, cnode, f"{fld}.consumers")
            if text is not None:
                consumers.append(text)
    return ChannelSpec(name=name, description=description, consumers=tuple(consumers))


def _named_entries(ctx: _Ctx, node: Node, fld: str) -> list[tuple[str, Node, Node]]:
    """``agents``/``watchers`` as (name, name node, spec node): a mapping, or a list of items with name."""
    if _is_null(node):
        return []
    if isinstance(node, SequenceNode):  # the original's types tolerate a list form; accept it
        out = []
        for i, item in enumerate(node.value):
            items = _mapping(ctx, item, f"{fld}[{i}]")
            if items is None:
                continue
            if "name" not in items:
                ctx.error(item, f"{fld}[{i}].name", "missing; list entries need name: <name>")
                continue
            name = _text(ctx, items["name"][1], f"{fld}[{i}].name")
            if name is not None:
                item.value = [(k, v) for k, v in item.value if not (isinstance(k, ScalarNode) and k.value == "name")]
                out.append((name, items["name"][1], item))
        return out
    items = _mapping(ctx, node, fld)
    return [(k, kn, vn) for k, (kn, vn) in (items or {}).items()]


def _limits(ctx: _Ctx, node: Node, fld: str) -> Limits:
    if _is_null(node):
        return Limits()
    items = _mapping(ctx, node, fld)
    if items is None:
        return Limits()
    for key, (key_node, _v) in items.items():
        if key == "budget_usd_per_day":
            ctx.warn(key_node, f"{fld}.{key}", "not enforced by this version; ignored")
        elif key not in _LIMIT_KEYS:
            ctx.warn(key_node, f"{fld}.{key}", f"unknown key ignored; known keys: {', '.join(_LIMIT_KEYS)}")
    values = {}
    for key in _LIMIT_KEYS:
        if key in items:
            got = _int(ctx, items[key][1], f"{fld}.{key}", 1)
            if got is not None:
                values[key] = got
    return Limits(**values)


def parse_fleet(text: str, path: Path, variables: dict[str, str]) -> FleetConfig:
    """Parse fleet YAML ``text`` (``path`` is used for messages); raise ``FleetConfigError`` on any error."""
    ctx = _Ctx(Path(path))
    rendered = render_template(text, _MARKERS)
    try:
        root_doc = yaml.compose(rendered, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = exc.problem or "invalid YAML"
        if exc.context:  # e.g. "while scanning a quoted scalar" + where it began: finds an unclosed quote
            began = f" that began on line {exc.context_mark.line + 1}" if exc.context_mark is not None else ""
            problem += f" ({exc.context}{began})"
        ctx.error(line, "yaml", f"syntax error: {problem}; expected valid YAML")
        raise FleetConfigError(ctx.errors, path) from None
    except yaml.YAMLError as exc:
        ctx.error(1, "yaml", f"cannot parse: {exc}; expected valid YAML")
        raise FleetConfigError(ctx.errors, path) from None

    fleet_name = variables.get("project") or fleet_project_dir(Path(path)).resolve().name
    values = {k: variables[k] for k in TEMPLATE_VARIABLES if k in variables}

    def empty() -> FleetConfig:
        return FleetConfig(fleet_name, None, Limits(), {}, {}, {}, Path(path), ctx.warnings, values)

    if root_doc is None or _is_null(root_doc):
        return empty()
    _refuse_surrogates(ctx, root_doc)
    if ctx.errors:  # alone: another check's message quoting such a value could not be printed or sent either
        raise FleetConfigError(ctx.errors, path)
    _unmark(ctx, root_doc, variables)
    top = _mapping(ctx, root_doc, "")
    if top is None:
        raise FleetConfigError(ctx.errors, path)
    base, root = "", top
    if "fleet" in top:
        base = "fleet"
        for key, (key_node, _v) in top.items():
            if key != "fleet":
                ctx.warn(key_node, key, "outside the fleet: mapping; ignored (move it under fleet:)")
        fleet_node = top["fleet"][1]
        if _is_null(fleet_node):
            return empty()
        root = _mapping(ctx, fleet_node, "fleet") or {}

    def sub(key: str) -> str:
        return f"{base}.{key}" if base else key

    _unknown(ctx, root, _ROOT_KEYS, base)

    if "name" in root:
        fleet_name = _text(ctx, root["name"][1], sub("name")) or fleet_name
    harbor = None
    if "harbor" in root and not _is_null(root["harbor"][1]):
        text = _text(ctx, root["harbor"][1], sub("harbor"))
        if text is not None:
            harbor = _check_name(ctx, root["harbor"][1], sub("harbor"), text, "harbor")
    limits = _limits(ctx, root["limits"][1], sub("limits")) if "limits" in root else Limits()

    agents: dict[str, AgentSpec] = {}
    # kind -> name -> (name node, its key -> (key node, value node)): to point warnings at lines later.
    locs: dict[str, dict[str, tuple[Node, dict[str, tuple[Node, Node]]]]] = {"agents": {}, "watchers": {}}
    if "agents" in root:
        for name, name_node, node in _named_entries(ctx, root["agents"][1], sub("agents")):
            fld = f"{sub('agents')}.{name}"
            if name in locs["agents"]:
                ctx.error(name_node, fld, "duplicate agent name; names must be unique")
                continue
            locs["agents"][name] = (name_node, _items_quiet(node))
            spec = _agent(ctx, name, name_node, node, fld, variables)
            if spec is not None:
                agents[name] = spec

    watchers: dict[str, WatcherSpec] = {}
    if "watchers" in root:
        for name, name_node, node in _named_entries(ctx, root["watchers"][1], sub("watchers")):
            fld = f"{sub('watchers')}.{name}"
            if name in locs["watchers"]:
                ctx.error(name_node, fld, "duplicate watcher name; names must be unique")
                continue
            locs["watchers"][name] = (name_node, _items_quiet(node))
            wspec = _watcher(ctx, name, name_node, node, fld)
            if wspec is not None:
                watchers[name] = wspec

    channels: dict[str, ChannelSpec] = {}
    if "channels" in root and not _is_null(root["channels"][1]):
        for name, (key_node, node) in (_mapping(ctx, root["channels"][1], sub("channels")) or {}).items():
            fld = f"{sub('channels')}.{name}"
            if _check_name(ctx, key_node, fld, name, "channel") is None:
                continue
            cspec = _channel_spec(ctx, name, node, fld)
            if cspec is None:
                continue
            channels[name] = cspec
            for consumer in cspec.consumers:
                if consumer not in locs["agents"] and consumer not in locs["watchers"]:
                    ctx.warn(node, f"{fld}.consumers", f"{consumer!r} is not an agent or watcher in this fleet")

    def where(kind: str, name: str, key: str) -> tuple[Node | int, str]:
        """The line and dotted field of ``kind.name.key`` (the entry's name when the key is absent)."""
        name_node, items = locs[kind][name]
        return (items[key][1] if key in items else name_node), f"{sub(kind)}.{name}.{key}"

    if not ctx.errors:
        _check_graph(ctx, agents, watchers, channels, where)
    if ctx.errors:
        raise FleetConfigError(ctx.errors, path)
    return FleetConfig(fleet_name, harbor, limits, agents, watchers, channels, Path(path), ctx.warnings,
                       values)  # fmt: skip


def _items_quiet(node: Node) -> dict[str, tuple[Node, Node]]:
    """Key text → (key, value) nodes of an already-validated mapping, for locating fields later."""
    if not isinstance(node, MappingNode):
        return {}
    return {k.value: (k, v) for k, v in node.value if isinstance(k, ScalarNode)}


def _check_graph(
    ctx: _Ctx,
    agents: dict[str, AgentSpec],
    watchers: dict[str, WatcherSpec],
    channels: dict[str, ChannelSpec],
    where: Callable[[str, str, str], tuple[Node | int, str]],
) -> None:
    """Cycles are errors; channels nobody produces, published channels nobody declared, are warnings."""

    # producer -> consumer edges, kept in file order so the reported cycle is deterministic.
    consumers: dict[str, list[str]] = {}
    for spec in agents.values():
        if spec.trigger:
            consumers.setdefault(spec.trigger, []).append(spec.name)
    edges: dict[str, list[tuple[str, str, str]]] = {a: [] for a in agents}
    for spec in agents.values():
        for key in ("on_success", "on_failure"):
            chan = getattr(spec, key)
            for target in consumers.get(chan, []) if chan else []:
                if all(t != target for t, _c, _k in edges[spec.name]):
                    edges[spec.name].append((target, chan, key))

    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(agents, white)
    stack: list[tuple[str, str, str]] = []  # (agent, channel taken out of it, field) along the DFS path

    def visit(node: str) -> None:
        colour[node] = grey
        for target, chan, key in edges[node]:
            stack.append((node, chan, key))
            if colour[target] == grey:
                start = next(i for i, (a, _c, _k) in enumerate(stack) if a == target)
                loop = stack[start:]
                names = " -> ".join([a for a, _c, _k in loop] + [target])
                chans = [c for _a, c, _k in loop]
                via = f"via channel{'s' if len(chans) > 1 else ''} {', '.join(chans)}"
                first, _chan, first_key = loop[0]
                ctx.error(
                    *where("agents", first, first_key),
                    f"fleet has a cycle: {names} ({via}); break it by publishing to a channel that does not "
                    "trigger an agent upstream",
                )
            elif colour[target] == white:
                visit(target)
            stack.pop()
        colour[node] = black

    for name in agents:
        if colour[name] == white:
            visit(name)

    produced = {c for spec in agents.values() for c in spec.publishes}
    for spec in agents.values():
        chan = spec.trigger
        if chan and chan not in produced and chan not in channels and chan not in GIT_HOOK_CHANNELS:
            ctx.warn(
                *where("agents", spec.name, "trigger"),
                f"channel {chan!r} is never published by an agent nor declared under channels:; "
                "check the spelling, publish it from an agent, or declare it",
            )
        for key in ("on_success", "on_failure"):
            chan = getattr(spec, key)
            if chan and chan not in channels:
                ctx.warn(
                    *where("agents", spec.name, key),
                    f"channel {chan!r} is published but not declared under channels:; declare it",
                )
    for wspec in watchers.values():
        chan = wspec.trigger
        if chan not in produced and chan not in channels and chan not in GIT_HOOK_CHANNELS:
            ctx.warn(
                *where("watchers", wspec.name, "trigger"),
                f"channel {chan!r} is never published by an agent nor declared under channels:; "
                "check the spelling, publish it from an agent, or declare it",
            )


def load_fleet(path: Path, variables: dict[str, str] | None = None) -> FleetConfig:
    """Read, template and parse a fleet file. ``variables`` default to ``template_vars`` of its project."""
    path = Path(path)
    project_dir = fleet_project_dir(path)
    if variables is None:
        resolved = template_vars(project_dir)
    else:
        # Callers may pass a partial set; {project}/{project_dir} are always known without git.
        here = project_dir.resolve()
        resolved = {"project": _identity.segment_of(here.name), "project_dir": str(here), **variables}
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise FleetConfigError(
            [f"{path}:1: file: cannot read ({exc.strerror}); expected a readable file"], path
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise FleetConfigError([f"{path}:{line}: file: not UTF-8 text; save the file as UTF-8"], path) from None
    return parse_fleet(text, path, resolved)


# --------------------------------------------------------------------------------------------------------
# Backends


def check_backends(cfg: FleetConfig, which: Callable[[str], str | None] = shutil.which) -> list[str]:
    """One message per enabled agent whose backend program is missing; empty when all can run."""
    problems: list[str] = []
    for spec in cfg.agents.values():
        if not spec.enabled:
            continue  # a disabled agent never spawns, so a missing binary is not yet a problem
        program = program_of(spec.backend, spec.command, cfg.variables)
        # Commands run from the project directory.
        if program is not None and locate(program, cfg.project_dir, which) is None:
            problems.append(f"agent {spec.name!r} uses backend {spec.backend} but {missing(program)}")
    return problems


# --------------------------------------------------------------------------------------------------------
# Starter file (`pd fleet init`)

STARTER_FLEET = """\
# pd-fleet.yml: background agents for this project, run by `pd fleet up`.
#
# Template variables: {project} (directory name), {project_dir}, {branch}, {sha}. In a prompt or command,
# {branch} and {sha} are those of the commit that fired the run (else of HEAD at `pd fleet up`).
# Each agent fires on a channel (trigger:) or on a five-field cron (schedule:), never both.
# `pd fleet init` installs a git post-commit hook that publishes to git:committed.
fleet:
  name: "{project}"
  harbor: "{project}:fleet"       # agents share this harbor (a semantic namespace)
  limits:
    max_concurrent_spawns: 2      # agents running at once
    max_spawns_per_hour: 30       # rolling one-hour cap across the fleet

  agents:
    qa:
      trigger: git:committed      # runs after every commit
      backend: claude-cli         # claude-cli, codex, gemini, aider, ollama or custom
      allowed_tools: "Read,Grep,Glob,Bash(git diff*)"
      timeout: 10m                # seconds, or a duration like 90s, 10m, 1h30m
      respawn: true               # re-run if it dies mid-run ...
      max_respawns: 3             # ... at most this many times
      prompt: |
        Review the last commit ({branch}) for bugs, missing tests and risky changes.
        Report concrete findings with file and line; do not edit files.
      on_success: publish qa:passed
      on_failure: publish qa:failed

    reviewer:
      trigger: qa:passed          # chained: runs when qa succeeds
      backend: claude-cli
      timeout: 15m
      prompt: |
        QA passed on {branch}. Review the change for design and readability, and leave a short summary.
      on_success: publish review:done

    docs:
      schedule: "0 * * * *"       # cron: minute hour day-of-month month day-of-week (hourly here)
      backend: claude-cli
      enabled: true               # false keeps the agent declared but never run
      run_on_start: false         # true also runs it once when the fleet starts
      prompt: |
        Check that README and docs match the code in {project}; list anything out of date.

  channels:
    "git:committed":
      description: Published by the git post-commit hook after each commit
      consumers: [qa]
    "qa:passed":
      description: QA found no blocking problems
      consumers: [reviewer]
    "qa:failed":
      description: QA failed or found blocking problems
    "review:done":
      description: The reviewer finished
"""
