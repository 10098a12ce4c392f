"""A test project for the fleet: a git repository with a pd-fleet.yml, and a stand-in ``claude`` on PATH that
records its arguments, environment and standard input (the only fake: an LLM CLI cannot run here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STAND_IN = """\
#!{python}
import json, os, sys, time
record = os.environ.get("PD_TEST_RECORD")
if record:
    with open(os.path.join(record, "claude-%d.stdin" % os.getpid()), "wb") as f:
        f.write(sys.stdin.buffer.read())  # as it came, byte for byte (empty from /dev/null); before the record
    with open(os.path.join(record, "claude-%d.json" % os.getpid()), "w") as f:
        json.dump({{"argv": sys.argv[1:], "env": {{k: v for k, v in os.environ.items()
                                                 if k.startswith(("PD_", "PORT_DADDY_"))}}}}, f)
print("stand-in claude ran:", " ".join(sys.argv[1:2]))
time.sleep(float(os.environ.get("CLAUDE_SLEEP", "0")))
sys.exit(int(os.environ.get("CLAUDE_EXIT", "0")))
"""

# Daemon knobs that keep fleet tests fast.
FAST = {"PORT_DADDY_FLEET_GRACE": "500ms", "PORT_DADDY_FLEET_RESPAWN_DELAY": "50ms",
        "PORT_DADDY_FLEET_HEARTBEAT": "200ms"}  # fmt: skip


def git(cwd: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.strip()


def make_project(root: Path, fleet_yaml: str, name: str = "proj") -> Path:
    project = root / name
    project.mkdir(parents=True)
    git(project, "init", "-q", "-b", "main")
    git(project, "config", "user.email", "t@example.com")
    git(project, "config", "user.name", "Test")
    (project / "pd-fleet.yml").write_text(textwrap.dedent(fleet_yaml).lstrip("\n"))
    return project


def make_bin(root: Path) -> Path:
    """A directory holding the stand-in ``claude``; records go to ``<root>/records``."""
    bin_dir = root / "bin"
    bin_dir.mkdir(exist_ok=True)
    claude = bin_dir / "claude"
    claude.write_text(STAND_IN.format(python=sys.executable))
    claude.chmod(0o755)
    (root / "records").mkdir(exist_ok=True)
    return bin_dir


def env_dumper(root: Path) -> Path:
    """A script for a custom agent: ``dump-env FILE`` writes its whole environment to FILE as JSON."""
    script = root / "dump-env"
    script.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                      "with open(sys.argv[1], 'w') as f:\n    json.dump(dict(os.environ), f)\n")  # fmt: skip
    script.chmod(0o755)
    return script


def path_with(bin_dir: Path) -> str:
    return f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"


def records(root: Path) -> list[dict[str, Any]]:
    """What each stand-in ``claude`` got: ``argv``, ``env`` (``PD_*``, ``PORT_DADDY_*``) and ``stdin`` (bytes)."""
    found = []
    for path in sorted((root / "records").glob("claude-*.json")):
        found.append({**json.loads(path.read_text()), "stdin": path.with_suffix(".stdin").read_bytes()})
    return found


def wait_for(check: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last: {value!r})")
        time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    """True for a live, non-zombie process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"
