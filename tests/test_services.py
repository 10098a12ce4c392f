"""Services and ports probed as a user would: shell-safe `pd env`, ports held by other processes, ranges,
preferred ports on a re-claim."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import Daemon


def test_env_output_is_safe_to_eval(daemon: Daemon, tmp_path: Path) -> None:
    """Any agent may set a service's URL; whoever evals `pd env` must get the text, not run it."""
    marker = tmp_path / "pwned"
    hostile = f"http://x/;touch${{IFS}}{marker};`id`$(id)'\"&|<>"
    daemon.call("port.claim", id="evil:api")
    daemon.call("port.claim", id="3d:api")
    daemon.call("port.endpoint", id="evil:api", env="local", url=hostile)
    out = daemon.pd("env", "*")
    assert out.returncode == 0, out.stderr
    script = 'eval "$(sed "s/^/export /")" && printf "%s\\n%s" "$EVIL_API_URL" "$_3D_API_PORT"'
    shell = subprocess.run(["sh", "-c", script], input=out.stdout, capture_output=True, text=True, timeout=10)
    assert shell.returncode == 0, (out.stdout, shell.stderr)
    assert not marker.exists()
    port = daemon.call("port.get", id="3d:api")["service"]["port"]
    assert shell.stdout.split("\n") == [hostile, str(port)]
    assert json.loads(daemon.pd("env", "evil:*", "--json").stdout)["env"]["EVIL_API_URL"] == hostile
