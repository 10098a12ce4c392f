"""Services and ports probed as a user would: shell-safe `pd env`, ports held by other processes, ranges,
preferred ports on a re-claim."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import Daemon

from portdaddy.core.registry import seed_port
from portdaddy.errors import PDError


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


def test_nothing_to_release_or_export_says_so_on_stderr(daemon: Daemon) -> None:
    """`pd release` of an identity nobody claimed printed "service not found" as if it were a result, and
    `pd env` of a pattern nothing matches printed nothing at all."""
    for args, said in [(("release", "nobody:here"), "Nothing released: no claimed service matches nobody:here"),
                       (("env", "nobody:*"), "No services match nobody:*")]:  # fmt: skip
        r = daemon.pd(*args)
        assert (r.returncode, r.stdout) == (0, "") and said in r.stderr, r
    assert json.loads(daemon.pd("release", "nobody:here", "--json").stdout)["released"] == 0


def test_endpoint_url_with_control_characters_refused(daemon: Daemon) -> None:
    """A URL is printed to terminals (pd url, pd find): an escape sequence in it could retitle or clear them."""
    daemon.call("port.claim", id="ctl:api")
    before = daemon.call("port.get", id="ctl:api")["service"]["urls"]
    for url in ("http://x/\x1b]0;owned\x07", "http://x/\u202etxt", "http://x/a\x00b"):
        with pytest.raises(PDError, match="printable ASCII") as refused:
            daemon.call("port.endpoint", id="ctl:api", env="local", url=url)
        assert refused.value.code == "VALIDATION_ERROR"
    assert daemon.call("port.get", id="ctl:api")["service"]["urls"] == before


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_claim_skips_a_port_held_on_ipv6_loopback_only(daemon: Daemon) -> None:
    """A dev server on `localhost` often binds only ::1 (Node, Vite); handing out its port would send
    http://localhost:<port> to the wrong service."""
    identity, preferred = "v6:web", "v6:api"
    seeded = seed_port(identity, 3100, 9999)
    with socket.socket(socket.AF_INET6) as s, socket.socket(socket.AF_INET6) as s2:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(("::1", seeded))
        s.listen()
        s2.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s2.bind(("::1", 0))
        s2.listen()
        taken = s2.getsockname()[1]
        assert daemon.call("port.claim", id=identity)["port"] != seeded
        reply = daemon.call("port.claim", id=preferred, port=taken)
    assert reply["port"] != taken and "another process" in reply["message"]


@pytest.mark.parametrize("args", [("--range", "1-100"), ("--range", "20-2000"), ("--port", "80")])
def test_privileged_ports_are_never_handed_out(daemon: Daemon, args: tuple[str, ...]) -> None:
    """An explicit port below 1024 was refused while a range below 1024 handed out 67 (as root: bound)."""
    r = daemon.pd("claim", "priv:api", *args)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "1024" in r.stderr, (r.stdout, r.stderr)
    assert daemon.call("port.find", pattern="priv:*")["count"] == 0


def test_reclaim_with_another_port_says_it_was_ignored(daemon: Daemon) -> None:
    port = daemon.call("port.claim", id="move:api")["port"]
    other = port + 1 if port < 9999 else port - 1
    r = daemon.pd("claim", "move:api", "--port", str(other))
    assert r.returncode == 0 and int(r.stdout) == port
    assert r.stderr.startswith(f"Warning: preferred port {other} ignored") and "pd release" in r.stderr
    assert "Warning" not in daemon.pd("claim", "move:api", "--port", str(port)).stderr
