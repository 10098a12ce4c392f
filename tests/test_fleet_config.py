"""pd-fleet.yml parsing: schema, errors with file/line/field, DAG checks, templating, backends, cron."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from portdaddy.errors import PDError
from portdaddy.fleet.backends import STDIN_BACKENDS, Task, argv_for, prompt_fits, too_large
from portdaddy.fleet.config import (
    STARTER_FLEET,
    AgentSpec,
    FleetConfig,
    FleetConfigError,
    Limits,
    check_backends,
    find_fleet_file,
    load_fleet,
    render_template,
    template_vars,
)
from portdaddy.fleet.spec import next_fire, run_variables, shell_template

VARS = {"project": "myapp", "project_dir": "/src/myapp", "branch": "main", "sha": "abc1234"}


def write(tmp_path: Path, text: str, name: str = "pd-fleet.yml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def load(tmp_path: Path, text: str) -> FleetConfig:
    return load_fleet(write(tmp_path, text), VARS)


def fail(tmp_path: Path, text: str) -> FleetConfigError:
    path = write(tmp_path, text)
    with pytest.raises(FleetConfigError) as info:
        load_fleet(path, VARS)
    return info.value


# --- starter, discovery, shapes -------------------------------------------------------------------------


def test_starter_loads_clean(tmp_path: Path) -> None:
    cfg = load_fleet(write(tmp_path, STARTER_FLEET), VARS)
    assert cfg.warnings == []
    assert cfg.name == "myapp"
    assert cfg.harbor == "myapp:fleet"
    assert cfg.limits == Limits(2, 30)
    assert set(cfg.agents) == {"qa", "docs", "reviewer"}
    qa = cfg.agents["qa"]
    assert (qa.trigger, qa.schedule, qa.backend) == ("git:committed", None, "claude-cli")
    assert (qa.on_success, qa.on_failure) == ("qa:passed", "qa:failed")
    assert qa.identity == "myapp:fleet:qa"
    assert qa.timeout_s == 600.0
    assert qa.respawn is True and qa.max_respawns == 3
    assert "({branch})" in qa.prompt  # filled per run, from the commit that fires it
    assert cfg.variables == VARS  # for runs no commit fired
    assert cfg.agents["docs"].schedule == "0 * * * *"
    assert cfg.agents["reviewer"].trigger == "qa:passed"
    assert {"git:committed", "qa:passed", "qa:failed", "review:done"} <= set(cfg.channels)
    assert cfg.channels["git:committed"].consumers == ("qa",)


def test_empty_file_and_null_fleet(tmp_path: Path) -> None:
    for text in ("", "# only a comment\n", "fleet:\n"):
        cfg = load(tmp_path, text)
        assert cfg.agents == {} and cfg.watchers == {} and cfg.channels == {}
        assert cfg.name == "myapp"
        assert cfg.limits == Limits()


def test_find_fleet_file_order(tmp_path: Path) -> None:
    assert find_fleet_file(tmp_path) is None
    write(tmp_path, "", ".portdaddy/fleet.yaml")
    assert find_fleet_file(tmp_path) == tmp_path / ".portdaddy/fleet.yaml"
    write(tmp_path, "", ".portdaddy/fleet.yml")
    assert find_fleet_file(tmp_path) == tmp_path / ".portdaddy/fleet.yml"
    write(tmp_path, "", "pd-fleet.yaml")
    assert find_fleet_file(tmp_path) == tmp_path / "pd-fleet.yaml"
    write(tmp_path, "", "pd-fleet.yml")
    assert find_fleet_file(tmp_path) == tmp_path / "pd-fleet.yml"


def test_top_level_root_and_defaults(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
        name: other
        agents:
          a:
            trigger: git:committed
            backend: claude
            prompt: 42
            identity: "{project}:bots:{name}"
            allowedTools: [Read, Grep]
            env: {DEBUG: true, N: 010}
        """,
    )
    a = cfg.agents["a"]
    assert cfg.name == "other"
    assert a == AgentSpec(
        name="a",
        trigger="git:committed",
        backend="claude-cli",
        prompt="42",
        identity="myapp:bots:a",
        allowed_tools="Read,Grep",
        env={"DEBUG": "true", "N": "010"},
    )


def test_list_form_merge_keys_watchers_channels(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
        defaults: &d
          backend: codex
          prompt: do it
        fleet:
          agents:
            - name: one
              <<: *d
              trigger: git:committed
          watchers:
            w:
              trigger: git:committed
              exec: make test
              confirm: true
          channels:
            "git:committed": Fired by the hook
        """,
    )
    assert cfg.agents["one"].backend == "codex"
    assert cfg.watchers["w"].exec == "make test" and cfg.watchers["w"].confirm is True
    assert cfg.channels["git:committed"].description == "Fired by the hook"
    # The anchor holder sits outside fleet:, so it is ignored with a warning.
    assert any(":1: defaults: " in w for w in cfg.warnings)


# --- errors: file, line, field ---------------------------------------------------------------------------

AGENT_HEAD = """\
fleet:
  agents:
    a:
"""

ERROR_CASES = [
    # (agent body lines, line, field, words in the message)
    ("trigger: x\nschedule: '* * * * *'\nprompt: p", 5, "fleet.agents.a.schedule", "not both"),
    ("prompt: p", 3, "fleet.agents.a", "trigger"),
    ("schedule: '* * * * * *'\nprompt: p", 4, "fleet.agents.a.schedule", "6 field"),
    ("schedule: '@hourly'\nprompt: p", 4, "fleet.agents.a.schedule", "five fields"),
    ("schedule: '61 * * * *'\nprompt: p", 4, "fleet.agents.a.schedule", "not a valid cron"),
    ("schedule: '0 0 30 2 *'\nprompt: p", 4, "fleet.agents.a.schedule", "never fires"),
    ("trigger: x\nbackend: gpt\nprompt: p", 5, "fleet.agents.a.backend", "claude-cli"),
    ("trigger: x\nbackend: custom", 3, "fleet.agents.a.command", "command"),
    ("trigger: x", 3, "fleet.agents.a.prompt", "missing"),
    ("trigger: x\nprompt: ''", 5, "fleet.agents.a.prompt", "empty"),
    ("trigger: x\nprompt: p\non_success: notify qa", 6, "fleet.agents.a.on_success", "publish <channel>"),
    ("trigger: x\nprompt: p\non_failure: publish", 6, "fleet.agents.a.on_failure", "publish <channel>"),
    ("trigger: x\nprompt: p\nrespawn: maybe", 6, "fleet.agents.a.respawn", "true or false"),
    ("trigger: x\nprompt: p\nmax_respawns: -1", 6, "fleet.agents.a.max_respawns", "whole number"),
    ("trigger: x\nprompt: p\ntimeout: ten minutes", 6, "fleet.agents.a.timeout", "90s"),
    ("trigger: x\nprompt: p\ntimeout_s: 0", 6, "fleet.agents.a.timeout_s", "seconds"),
    ("trigger: x\nprompt: p\ntimeout: 5\ntimeout_s: 5", 7, "fleet.agents.a.timeout_s", "keep one"),
    (
        "trigger: x\nprompt: p\nallowedTools: R\nallowed_tools: R",
        7,
        "fleet.agents.a.allowed_tools",
        "keep one",
    ),
    ("trigger: x\nprompt: p\nenv:\n  1BAD: x", 7, "fleet.agents.a.env.1BAD", "variable name"),
    ("trigger: x\nprompt: p\nidentity: 'a:b:c:d'", 6, "fleet.agents.a.identity", "segments"),
    ("trigger: has space\nprompt: p", 4, "fleet.agents.a.trigger", "characters"),
    ("trigger: [x]\nprompt: p", 4, "fleet.agents.a.trigger", "expected text"),
    ("trigger: x\nprompt: p\nprompt: q", 6, "fleet.agents.a.prompt", "duplicate key (first on line 5)"),
]


@pytest.mark.parametrize(("body", "line", "fld", "words"), ERROR_CASES)
def test_agent_error_names_file_line_field(tmp_path: Path, body: str, line: int, fld: str, words: str) -> None:
    err = fail(tmp_path, AGENT_HEAD + textwrap.indent(body, "      ") + "\n")
    path = tmp_path / "pd-fleet.yml"
    assert len(err.errors) == 1, err.errors
    assert err.message.startswith(f"{path}:{line}: {fld}: "), err.message
    assert words in err.message
    assert err.code == "VALIDATION_ERROR"
    assert isinstance(err, PDError)


def test_other_section_errors(tmp_path: Path) -> None:
    path = tmp_path / "pd-fleet.yml"
    err = fail(tmp_path, "fleet:\n  limits:\n    max_concurrent_spawns: many\n")
    assert err.message.startswith(f"{path}:3: fleet.limits.max_concurrent_spawns: ")
    err = fail(tmp_path, "fleet:\n  agents: [1, 2]\n")
    assert err.message.startswith(f"{path}:2: fleet.agents[0]: ")
    err = fail(tmp_path, "fleet:\n  agents: nope\n")
    assert err.message.startswith(f"{path}:2: fleet.agents: got 'nope'; expected a mapping")
    err = fail(tmp_path, "agents:\n  a:\n    trigger: x\n    prompt: p\nwatchers:\n  w:\n    trigger: x\n")
    assert err.message.startswith(f"{path}:6: watchers.w.exec: missing")
    err = fail(tmp_path, "- a\n- b\n")
    assert err.message.startswith(f"{path}:1: (top level): got a list")


def test_default_identity_from_bad_project_name(tmp_path: Path) -> None:
    path = write(tmp_path, "agents:\n  a:\n    trigger: x\n    prompt: p\n")
    with pytest.raises(FleetConfigError) as info:
        load_fleet(path, {**VARS, "project": "my app"})
    assert info.value.message.startswith(f"{path}:2: agents.a.identity: ")
    assert "set identity: explicitly" in info.value.message


def test_all_errors_are_collected(tmp_path: Path) -> None:
    err = fail(
        tmp_path,
        """
        fleet:
          agents:
            a:
              trigger: x
              prompt: p
              backend: nope
              respawn: sometimes
            b:
              schedule: "every hour"
              prompt: p
        """,
    )
    path = tmp_path / "pd-fleet.yml"
    # In file order, though respawn is checked before backend.
    assert [e.split(": ", 2)[:2] for e in err.errors] == [
        [f"{path}:6", "fleet.agents.a.backend"],
        [f"{path}:7", "fleet.agents.a.respawn"],
        [f"{path}:9", "fleet.agents.b.schedule"],
    ]
    assert err.message == "\n".join(err.errors)
    wire = err.to_wire()
    assert wire["error"] == "VALIDATION_ERROR" and wire["errors"] == err.errors and wire["file"] == str(path)


def test_yaml_syntax_error_reports_line(tmp_path: Path) -> None:
    path = tmp_path / "pd-fleet.yml"
    err = fail(tmp_path, "fleet:\n  agents:\n    a:\n      trigger: x\n     prompt: bad indent\n")
    assert err.message.startswith(f"{path}:5: yaml: syntax error: ")
    err = fail(tmp_path, 'fleet:\n  name: "unclosed\n  harbor: x\n')
    assert err.message.startswith(f"{path}:4: yaml: syntax error: ")
    assert "began on line 2" in err.message
    err = fail(tmp_path, "fleet:\n\tagents: {}\n")
    assert err.message.startswith(f"{path}:2: yaml: syntax error: ")


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "pd-fleet.yml"
    path.write_bytes(b"fleet:\n  name: caf\xe9\n")
    with pytest.raises(FleetConfigError) as info:
        load_fleet(path, VARS)
    assert info.value.message.startswith(f"{path}:2: file: not UTF-8")


def test_a_lone_surrogate_escape_is_refused_wherever_it_stands(tmp_path: Path) -> None:
    """YAML's "\\ud800" makes a lone surrogate, which no UTF-8 encoder takes: a prompt, command or env value holding
    one made every run fail with a traceback, as its agent was registered or its child started."""
    path = tmp_path / "pd-fleet.yml"
    err = fail(
        tmp_path,
        r"""
        agents:
          qa:
            trigger: git:committed
            prompt: "Review \ud800 this"
            env: {OK: "é 😀 \U0001F600", BAD: "\udfff"}
          tidy:
            trigger: git:committed
            backend: custom
            command: "echo \udc80"
        channels:
          "git:committed": "commits \ud83d"
          "bad\udc00": x
        """,
    )
    refusal = "holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text; send valid Unicode"
    assert [e.split(": ", 2)[:2] for e in err.errors] == [
        [f"{path}:4", "agents.qa.prompt"],
        [f"{path}:5", "agents.qa.env.BAD"],
        [f"{path}:9", "agents.tidy.command"],
        [f"{path}:11", "channels.git:committed"],
        [f"{path}:12", "channels"],
    ]
    assert [e.split(": ", 2)[2].startswith(refusal) for e in err.errors] == [True] * 4 + [False], err.errors
    assert err.errors[-1].endswith(f"channels: a key {refusal} (a character beyond U+FFFF as itself, or as both "
                                   "halves of its pair)")  # fmt: skip
    assert err.message.encode("utf-8")  # the error is text itself: it can be printed and sent
    cfg = load(tmp_path, 'agents:\n  qa: {trigger: x, prompt: "a pair is one character: \\ud83d\\ude00"}\n')
    assert cfg.agents["qa"].prompt == "a pair is one character: 😀"  # PyYAML leaves its halves apart; JSON would not


def test_unknown_keys_are_warnings(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
        fleet:
          version: 2
          limits:
            budget_usd_per_day: 5
          agents:
            a:
              trigger: git:committed
              prompt: p
              worktree: true
              run_on_start: true
        """,
    )
    path = tmp_path / "pd-fleet.yml"
    assert "a" in cfg.agents
    assert cfg.warnings[0].startswith(f"{path}:2: fleet.version: unknown key")
    assert cfg.warnings[1].startswith(f"{path}:4: fleet.limits.budget_usd_per_day: not enforced")
    assert cfg.warnings[2].startswith(f"{path}:9: fleet.agents.a.worktree: unknown key ignored; known keys: ")
    assert cfg.warnings[3].startswith(f"{path}:10: fleet.agents.a.run_on_start: only applies to scheduled")
    assert len(cfg.warnings) == 4


# --- DAG -------------------------------------------------------------------------------------------------


def test_cycle_is_refused_with_path(tmp_path: Path) -> None:
    err = fail(
        tmp_path,
        """
        fleet:
          agents:
            qa:
              trigger: git:committed
              prompt: p
              on_success: publish qa:passed
            reviewer:
              trigger: qa:passed
              prompt: p
              on_success: publish review:done
            fixer:
              trigger: review:done
              prompt: p
              on_failure: publish qa:passed
        """,
    )
    path = tmp_path / "pd-fleet.yml"
    assert len(err.errors) == 1
    assert err.message.startswith(
        f"{path}:10: fleet.agents.reviewer.on_success: fleet has a cycle: "
        "reviewer -> fixer -> reviewer (via channels review:done, qa:passed)"
    )


def test_two_agent_cycle_message(tmp_path: Path) -> None:
    err = fail(
        tmp_path,
        """
        agents:
          qa:
            trigger: review:done
            prompt: p
            on_success: publish qa:passed
          reviewer:
            trigger: qa:passed
            prompt: p
            on_success: publish review:done
        """,
    )
    assert "fleet has a cycle: qa -> reviewer -> qa (via channels qa:passed, review:done)" in err.message
    assert f"{tmp_path / 'pd-fleet.yml'}:5: agents.qa.on_success: " in err.message


def test_self_cycle_is_refused(tmp_path: Path) -> None:
    err = fail(
        tmp_path,
        """
        agents:
          loop:
            trigger: again
            prompt: p
            on_failure: publish again
        """,
    )
    assert err.message.startswith(
        f"{tmp_path / 'pd-fleet.yml'}:5: agents.loop.on_failure: fleet has a cycle: loop -> loop (via channel again)"
    )


def test_diamond_is_not_a_cycle(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
        agents:
          a: {trigger: git:committed, prompt: p, on_success: publish s, on_failure: publish f}
          b: {trigger: s, prompt: p, on_success: publish done}
          c: {trigger: f, prompt: p, on_success: publish done}
          d: {trigger: done, prompt: p}
        channels: {s: , f: , done: }
        """,
    )
    assert set(cfg.agents) == {"a", "b", "c", "d"}
    assert cfg.warnings == []


def test_channel_warnings(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
        agents:
          a:
            trigger: git:committed
            prompt: p
            on_success: publish a:done
          b:
            trigger: nobody:sends
            prompt: p
          c:
            trigger: external
            prompt: p
        watchers:
          w:
            trigger: also:nobody
            exec: "true"
        channels:
          external: {description: published by a human with pd pub, consumers: [c, ghost]}
        """,
    )
    path = tmp_path / "pd-fleet.yml"
    warnings = sorted(cfg.warnings, key=lambda w: int(w.split(":")[1]))
    assert len(warnings) == 4, warnings
    assert warnings[0].startswith(f"{path}:5: agents.a.on_success: channel 'a:done' is published but not declared")
    assert warnings[1].startswith(f"{path}:7: agents.b.trigger: channel 'nobody:sends' is never published")
    assert warnings[2].startswith(f"{path}:14: watchers.w.trigger: channel 'also:nobody' is never published")
    assert warnings[3].startswith(f"{path}:17: channels.external.consumers: 'ghost' is not an agent")


# --- values ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ("10m", 600.0),
        ("90s", 90.0),
        ("1h30m", 5400.0),
        ("2h", 7200.0),
        ("45", 45.0),
        ("2.5", 2.5),
        ("1d", 86400.0),
    ],
)
def test_timeout_durations(tmp_path: Path, raw: str, seconds: float) -> None:
    for key in ("timeout", "timeout_s"):
        cfg = load(tmp_path, f"agents:\n  a:\n    trigger: git:committed\n    prompt: p\n    {key}: {raw}\n")
        assert cfg.agents["a"].timeout_s == seconds


def test_custom_backend_and_flags(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
        agents:
          g:
            schedule: "*/10 * * * *"
            backend: custom
            command: git status --porcelain
            enabled: false
            run_on_start: true
            on_success: publish git:status
        channels:
          git:status:
        """,
    )
    g = cfg.agents["g"]
    assert (g.backend, g.command, g.prompt, g.enabled, g.run_on_start) == (
        "custom",
        "git status --porcelain",
        "",
        False,
        True,
    )
    assert cfg.warnings == []


def test_render_template_leaves_unknown_tokens() -> None:
    assert render_template("{project}/{nope}/{branch}{ x }", VARS) == "myapp/{nope}/main{ x }"
    assert render_template("{project}", {"project": "{branch}", "branch": "b"}) == "{branch}"  # one pass


# --- template values in shell commands --------------------------------------------------------------------

HOSTILE = "a b'c\"d $(touch pwned) `touch pwned` \\ * ;x #y"  # what a directory or branch name may hold


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ('printf "[%s]" {project}', "[V]"),
        ('printf "[%s]" x{project}y', "[xVy]"),
        ('printf "[%s]" "in {project}"', "[in V]"),
        ('printf "[%s]" "$(printf %s {project})"', "[V]"),
        ('printf "[%s]" "`printf %s {project}`"', "[V]"),
        ('printf "[%s]" \\"{project}\\"', '["V"]'),
        ('# it\'s a comment\nprintf "[%s]" {project}', "[V]"),
        ('for project in a b; do printf "[%s]" "${project}"; done', "[a][b]"),  # the shell's own ${project}
        # Next to what hands text to another shell, but as data: an argument of sh -c's script, or a word "eval".
        ('sh -c \'printf "[%s]" "$1"\' sh {project}', "[V]"),
        ('printf "[%s]" eval {project} 2>/dev/null', "[eval][V]"),
    ],
)
def test_a_template_value_in_a_shell_command_is_one_word(tmp_path: Path, command: str, expected: str) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PD_PROJECT": HOSTILE}
    ran = subprocess.run(["/bin/sh", "-c", shell_template(command)], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=10)  # fmt: skip
    assert (ran.returncode, ran.stdout) == (0, expected.replace("V", HOSTILE)), ran.stderr
    assert not list(tmp_path.iterdir())  # nothing in the value ran


@pytest.mark.parametrize(
    "command",
    [
        "sh -c 'printf \"[%s]\" {project}'",  # was: '"${PD_PROJECT}"' closed the quotes, and sh ran the value
        "printf '[%s]' 'in {project}'",
        "printf '[%s]' $'{project}'",
        "cat <<EOF\nit's {project}\nEOF",  # a here-document's quote is read as one: refused, not misread
    ],
)
def test_a_template_value_inside_single_quotes_is_refused(tmp_path: Path, command: str) -> None:
    """Single-quoted text is not expanded by the shell that runs the command, and is often code another shell
    runs: no quoting put there keeps a value from being read as code by that one."""
    with pytest.raises(ValueError, match=r"\{project\} stands inside '…'.*write \"\$PD_PROJECT\" in them"):
        shell_template(command)
    [error] = fail(tmp_path, f"agents:\n  a: {{trigger: t, backend: custom, command: {json.dumps(command)}}}\n").errors
    assert error.startswith(f"{tmp_path / 'pd-fleet.yml'}:2: agents.a.command: {{project}} stands inside '…'")


@pytest.mark.parametrize(
    ("command", "runner"),
    [
        ('sh -c "printf %s {project}"', "the command text sh -c gives another shell"),
        ("bash -ec {project}", "the command text bash -c gives another shell"),
        ('cd /tmp && /bin/dash -o errexit -c "x $(echo {project})"', "the command text dash -c gives another shell"),
        ('find . -exec zsh -c "x {project}" \\;', "the command text zsh -c gives another shell"),
        ("eval {project}", "the text eval runs as a command"),
        ('if true; then X=1 eval "x {project}"; fi', "the text eval runs as a command"),
        ("ssh -p 22 host ./deploy.sh {project}", "the command ssh runs through the remote host's shell"),
        ('timeout 60 ssh -i key host "deploy {project}" 2>&1', "the command ssh runs through the remote host's shell"),
    ],
)
def test_a_template_value_in_text_handed_to_another_shell_is_refused(tmp_path: Path, command: str, runner: str) -> None:
    """The value is one word for the shell that runs the command, but that word is code for the next one (sh -c,
    eval, the remote shell of ssh): quoting it for the first cannot protect it from the second."""
    [error] = fail(tmp_path, f"agents:\n  a: {{trigger: t, backend: custom, command: {json.dumps(command)}}}\n").errors
    assert error.startswith(f"{tmp_path / 'pd-fleet.yml'}:2: agents.a.command: {{project}} is in {runner}, which")
    fix = "printf '%s\\n' \"$PD_PROJECT\" | ssh HOST" if "ssh" in runner else "inside single quotes"
    assert fix in error


def test_an_env_variable_named_command_or_prompt_gets_the_value(tmp_path: Path) -> None:
    """Which scalars were shell commands (or prompts) went by the last key alone, so env: {command: ...} got a
    shell reference instead of the value, and one with a quote was refused as a command."""
    cfg = load(tmp_path, """
        agents:
          a:
            trigger: t
            prompt: review {sha}
            env: {command: "it's {project_dir}", prompt: "{sha}", exec: "{branch}"}
        """)  # fmt: skip
    assert cfg.agents["a"].env == {"command": "it's /src/myapp", "prompt": "abc1234", "exec": "main"}
    assert cfg.agents["a"].prompt == "review {sha}"  # the run fills it
    listed = load(tmp_path, """
        agents:
          - {name: b, trigger: t, backend: custom, command: "./x {project_dir}", prompt: "{branch}"}
        """)  # fmt: skip
    assert (listed.agents["b"].command, listed.agents["b"].prompt) == ('./x "${PD_PROJECT_DIR}"', "{branch}")
    error = fail(tmp_path, "agents:\n  - {name: c, trigger: t, backend: custom, command: \"sh -c 'x {sha}'\"}\n")
    assert ":2: agents[0].command: {sha} stands inside" in error.errors[0]


def test_a_command_refers_to_template_values_and_its_program_is_still_checked(tmp_path: Path) -> None:
    project = tmp_path / "it's a $(touch pwned)"
    (project / "scripts").mkdir(parents=True)
    (project / "scripts" / "run.sh").write_text("#!/bin/sh\n")
    path = write(
        project,
        """
        agents:
          a: {trigger: t, backend: custom, command: "{project_dir}/scripts/run.sh \\"{branch}\\" # {sha}"}
          gone: {trigger: t, backend: custom, command: "{project_dir}/scripts/missing.sh"}
        """,
    )
    cfg = load_fleet(path, {**VARS, "project_dir": str(project)})
    # Was: the values pasted in, unquoted. Now references the run's environment fills (and {sha} stays a comment).
    assert cfg.agents["a"].command == '"${PD_PROJECT_DIR}"/scripts/run.sh "${PD_BRANCH}" # {sha}'
    assert check_backends(cfg, which=lambda b: None) == [
        f"agent 'gone' uses backend custom but {str(project / 'scripts/missing.sh')!r} does not exist; fix its command"
    ]


# --- templating with a real git repository ----------------------------------------------------------------


def git(cwd: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def test_run_variables_come_from_the_commit_that_fired_the_run() -> None:
    loaded = {"sha": "abc1234", "branch": "main"}
    commit = {"source": "channel", "channel": "git:committed",
              "payload": {"sha": "d" * 40, "shortSha": "ddddddd", "branch": "feature/x"}}  # fmt: skip
    assert run_variables(commit, loaded) == {"sha": "ddddddd", "branch": "feature/x"}
    # Up a chain: qa:passed carries the trigger of the qa run that the commit fired.
    chained = {"source": "channel", "channel": "qa:passed", "payload": {"agent": "qa", "trigger": commit}}
    assert run_variables(chained, loaded) == {"sha": "ddddddd", "branch": "feature/x"}
    for other in (None, {"source": "manual"}, {"source": "schedule"},
                  {"source": "channel", "channel": "x", "payload": "text"}):  # fmt: skip
        assert run_variables(other, loaded) == loaded
    # Values that git would never produce (they may reach a shell command) are not taken.
    hostile = {"source": "channel", "channel": "git:committed", "payload": {"sha": "$(rm -rf ~)", "branch": "a;b"}}
    assert run_variables(hostile, loaded) == loaded


def test_template_vars_from_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # never see a repo above tmp_path
    plain = tmp_path / "plain"
    plain.mkdir()
    assert template_vars(plain) == {
        "project": "plain",
        "project_dir": str(plain.resolve()),
        "branch": "main",
        "sha": "unknown",
    }

    repo = tmp_path / "shop"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "checkout", "-q", "-b", "feature/cart")
    assert template_vars(repo)["branch"] == "feature/cart"  # known before the first commit
    assert template_vars(repo)["sha"] == "unknown"
    git(repo, "commit", "-q", "--allow-empty", "-m", "init")
    sha = git(repo, "rev-parse", "--short", "HEAD")
    assert template_vars(repo) == {
        "project": "shop",
        "project_dir": str(repo.resolve()),
        "branch": "feature/cart",
        "sha": sha,
    }

    # load_fleet without variables reads them itself; .portdaddy/fleet.yml belongs to the repo root.
    path = write(
        repo,
        """
        fleet:
          harbor: "{project}:fleet:{sha}"
          agents:
            a:
              trigger: git:committed
              prompt: "on {branch} at {sha} in {project_dir}; keep {unknown}"
        """,
        ".portdaddy/fleet.yml",
    )
    cfg = load_fleet(path)
    assert cfg.name == "shop" and cfg.harbor == f"shop:fleet:{sha}"  # outside prompt/command: at load
    # {branch} and {sha} wait for the run (run_variables); the rest is filled now.
    assert cfg.agents["a"].prompt == f"on {{branch}} at {{sha}} in {repo.resolve()}; keep {{unknown}}"
    assert cfg.variables == template_vars(repo)
    assert cfg.agents["a"].identity == "shop:fleet:a"
    assert cfg.project_dir == repo


# --- backends --------------------------------------------------------------------------------------------


def test_check_backends(tmp_path: Path) -> None:
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "run.sh").write_text("#!/bin/sh\n")
    cfg = load(
        tmp_path,
        """
        agents:
          qa: {trigger: git:committed, prompt: p}
          cx: {trigger: git:committed, prompt: p, backend: codex}
          local: {trigger: git:committed, prompt: p, backend: ollama}
          off: {trigger: git:committed, prompt: p, backend: gemini, enabled: false}
          script: {trigger: git:committed, backend: custom, command: ./scripts/run.sh --fast}
          gone: {trigger: git:committed, backend: custom, command: ./scripts/missing.sh}
          tool: {trigger: git:committed, backend: custom, command: "FOO=1 mytool --x 'a b'"}
          shell: {trigger: git:committed, backend: custom, command: cd sub && make}
        """,
    )
    on_path = {"codex"}
    problems = check_backends(cfg, which=lambda b: f"/usr/bin/{b}" if b in on_path else None)
    assert problems == [
        "agent 'qa' uses backend claude-cli but 'claude' is not on PATH; install it or pick another backend",
        "agent 'gone' uses backend custom but './scripts/missing.sh' does not exist; fix its command",
        "agent 'tool' uses backend custom but 'mytool' is not on PATH; install it or pick another backend",
    ]
    on_path |= {"claude", "mytool"}
    assert check_backends(cfg, which=lambda b: f"/usr/bin/{b}" if b in on_path else None) == [
        "agent 'gone' uses backend custom but './scripts/missing.sh' does not exist; fix its command"
    ]


def test_each_backend_but_custom_takes_its_prompt_on_stdin(tmp_path: Path) -> None:
    """Never as an argument, whatever its size: any local user reads a process's argv (/proc/PID/cmdline, ps), and
    Linux refuses one over 128 KiB. Each CLI's own way to read it there."""
    for name in ("claude", "codex", "gemini", "aider"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    small, big = "Review it", "é" * (64 * 1024)  # 128 KiB: over, with PD_PROMPT= and the NUL
    assert prompt_fits(small) and not prompt_fits(big) and prompt_fits("é" * (64 * 1024 - 6))
    bin_ = str(tmp_path)
    expected = {
        "claude-cli": [f"{bin_}/claude", "-p", "--model", "m"],
        "codex": [f"{bin_}/codex", "exec", "--model", "m", "-"],
        "gemini": [f"{bin_}/gemini", "-m", "m"],  # headless: its stdin is not a terminal
        "aider": [f"{bin_}/aider", "--yes", "--no-stream", "--model", "m", "--message-file", "/dev/stdin"],
        "ollama": [sys.executable, "-m", "portdaddy.fleet.ollama", "--model", "m"],
    }  # fmt: skip
    assert set(expected) == STDIN_BACKENDS
    for backend, argv in expected.items():
        for prompt in (small, big):
            assert argv_for(Task(backend=backend, prompt=prompt, model="m", path=bin_)) == argv, backend
            assert too_large(backend, prompt) is None
    assert argv_for(Task(backend="custom", prompt=small, command="echo hi")) == ["/bin/sh", "-c", "echo hi"]
    assert too_large("custom", small) is None
    assert too_large("custom", big) == (
        "is 131,072 bytes; backend custom gets it only in PD_PROMPT, and Linux refuses an environment variable over "
        "128 KiB: shorten it, or put its long part in a file the command reads"
    )


def test_a_command_or_env_value_too_large_for_an_exec_is_refused_by_line(tmp_path: Path) -> None:
    """Linux refuses one argument or environment string over 128 KiB (E2BIG): such a command or env value made
    every run fail to start, after it was registered (one more salvage entry each time)."""
    limit = 128 * 1024  # bytes, the NUL included
    over = "é" * (limit // 2)  # 128 KiB of UTF-8 in 64 Ki characters
    command, value = "x" * (limit - len("echo ") - 1), "v" * (limit - len("EDGE=") - 1)  # each just fits
    text = textwrap.dedent("""
        agents:
          big:
            trigger: go
            backend: custom
            command: echo OVER
            env: {SMALL: "ok", LARGE: "OVER", EDGE: "VALUEv"}
          tools:
            trigger: go
            prompt: p
            allowedTools: "OVER"
          edge:
            trigger: go
            backend: custom
            command: echo COMMAND
            env: {EDGE: "VALUE"}
        """).lstrip("\n")
    text = text.replace("OVER", over).replace("COMMAND", command).replace("VALUE", value)
    path = tmp_path / "pd-fleet.yml"
    path.write_text(text)
    with pytest.raises(FleetConfigError) as info:
        load_fleet(path, VARS)
    env = "Linux refuses an environment variable over 128 KiB: shorten it, or put it in a file and pass its path"
    assert info.value.errors == [
        f"{path}:5: agents.big.command: is {len(f'echo {over}'.encode()):,} bytes; backend custom runs it as one "
        "argument of /bin/sh -c, and Linux refuses an argument over 128 KiB: put the command in a script, and run that",
        f"{path}:6: agents.big.env.LARGE: is {len(over.encode()):,} bytes; {env}",
        f"{path}:6: agents.big.env.EDGE: is {len(value) + 1:,} bytes; {env}",  # one more byte than edge's EDGE
        f"{path}:10: agents.tools.allowedTools: is {len(over.encode()):,} bytes; Linux refuses an argument over "
        "128 KiB: shorten it",
    ]
    path.write_text("agents:\n  edge:" + text.split("  edge:")[1])
    assert load_fleet(path, VARS).agents["edge"].command == f"echo {command}"  # what fits loads


def test_the_ollama_client_reads_its_prompt_from_stdin_only(tmp_path: Path) -> None:
    """Stdin is its one way in (the fleet always sends the prompt there): a PD_PROMPT is not read, and the
    --prompt-stdin a daemon started before that still passes means nothing."""
    got: list[Any] = []

    class Ollama(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            reply = json.dumps({"message": {"content": "done"}}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Ollama)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {**os.environ, "OLLAMA_HOST": f"127.0.0.1:{server.server_port}", "PD_PROMPT": "from the environment"}
        prompt = "日本語 " * 50_000
        cases = (([], prompt.encode(), prompt), (["--prompt-stdin"], prompt.encode(), prompt), ([], b"", ""))
        for extra, stdin, expected in cases:
            out = subprocess.run([sys.executable, "-m", "portdaddy.fleet.ollama", "--model", "m", *extra], input=stdin,
                                 env=env, capture_output=True, timeout=30, check=True)  # fmt: skip
            assert out.stdout == b"done\n" and got.pop()["messages"] == [{"role": "user", "content": expected}]
    finally:
        server.shutdown()
        server.server_close()


# --- cron ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "after", "expected"),
    [
        ("0 * * * *", datetime(2024, 1, 1, 9, 0), datetime(2024, 1, 1, 10, 0)),  # strictly after
        ("0 * * * *", datetime(2024, 1, 1, 9, 59, 59), datetime(2024, 1, 1, 10, 0)),
        ("*/15 9-17 * * 1-5", datetime(2024, 1, 8, 9, 7), datetime(2024, 1, 8, 9, 15)),  # Monday
        ("*/15 9-17 * * 1-5", datetime(2024, 1, 8, 9, 15), datetime(2024, 1, 8, 9, 30)),
        ("*/15 9-17 * * 1-5", datetime(2024, 1, 8, 17, 45), datetime(2024, 1, 9, 9, 0)),
        ("*/15 9-17 * * 1-5", datetime(2024, 1, 5, 17, 50), datetime(2024, 1, 8, 9, 0)),  # Fri -> Mon
        ("30 2 1 * *", datetime(2024, 1, 15), datetime(2024, 2, 1, 2, 30)),
        ("0 0 29 2 *", datetime(2023, 3, 1), datetime(2024, 2, 29)),
    ],
)
def test_next_fire(expr: str, after: datetime, expected: datetime) -> None:
    assert next_fire(expr, after) == expected


def test_next_fire_keeps_timezone_and_refuses_bad_cron() -> None:
    tz = timezone(timedelta(hours=2))
    got = next_fire("0 9 * * *", datetime(2024, 6, 1, 10, 0, tzinfo=tz))
    assert got == datetime(2024, 6, 2, 9, 0, tzinfo=tz) and got.utcoffset() == timedelta(hours=2)
    for bad in ("* * * *", "0 0 30 2 *", "nope"):
        with pytest.raises(PDError) as info:
            next_fire(bad, datetime(2024, 1, 1))
        assert info.value.code == "VALIDATION_ERROR"
