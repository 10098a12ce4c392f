"""The contracts in spec/ stay true to the code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from conftest import Daemon

from portdaddy import errors
from portdaddy.core.ops import load_table
from portdaddy.fleet import hook
from portdaddy.fleet.backends import Task
from portdaddy.fleet.runs import Run
from portdaddy.http.routes import ROUTES, STREAMS
from tests.fleet_helpers import git, make_project

SPEC = Path(__file__).parent.parent / "spec"


def _openapi_routes() -> dict[tuple[str, str], dict]:
    doc = yaml.safe_load((SPEC / "openapi.yaml").read_text())
    return {(m.upper(), p): op for p, item in doc["paths"].items() for m, op in item.items()}


def _quart_to_openapi(path: str) -> str:
    return re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", path)


def test_every_http_route_is_documented() -> None:
    documented = _openapi_routes()
    served = {(r.method, _quart_to_openapi(r.path)): r.op for r in ROUTES}
    served.update({(m, _quart_to_openapi(p)): None for m, p, _ in STREAMS})
    missing = sorted(set(served) - set(documented))
    assert not missing, f"routes missing from spec/openapi.yaml: {missing}"
    stale = sorted(set(documented) - set(served))
    assert not stale, f"spec/openapi.yaml documents routes the daemon does not serve: {stale}"
    for key, op in served.items():
        if op is not None:
            assert documented[key].get("x-operation") == op, key


def test_every_operation_is_listed_in_the_ipc_spec() -> None:
    text = (SPEC / "ipc.md").read_text()
    missing = sorted(name for name in load_table() if f"`{name}`" not in text)
    assert not missing, f"operations missing from spec/ipc.md: {missing}"


def test_every_error_code_is_listed_with_its_mapping() -> None:
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(r"^\| `(\w+)` \| (\d+) \| (\w+) \| (\d) \|",
                                                              (SPEC / "errors.md").read_text(), re.M)}  # fmt: skip
    names = {0x21: "REFUSE", 0x22: "FAILURE", 0x23: "NOT_UNDERSTOOD"}
    table = {code: (str(status), names[perf], str(exit_)) for code, (status, perf, exit_) in errors._TABLE.items()}
    assert rows == table


def _schema_fields(name: str) -> set[str]:
    doc = yaml.safe_load((SPEC / "openapi.yaml").read_text())
    return set(doc["components"]["schemas"][name]["properties"])


def _fleet_ipc_lines() -> str:
    return "\n".join(re.findall(r"^- `fleet\.[^\n]*(?:\n  [^\n]*)*", (SPEC / "ipc.md").read_text(), re.M))


def _assert_documented(schema: str, wire: dict[str, Any]) -> None:
    assert set(wire) == _schema_fields(schema), f"openapi {schema} differs from what the daemon sends"
    said = set(re.findall(r"\w+", " ".join(re.findall(r"`([^`]*)`", _fleet_ipc_lines()))))  # in code spans
    unsaid = sorted(set(wire) - said)
    assert not unsaid, f"spec/ipc.md does not name these {schema} fields: {unsaid}"


def test_fleet_wire_shapes_are_documented(daemon: Daemon, tmp_home: Path) -> None:
    _assert_documented("FleetRun", Run("r", "fleet", "qa", "p:fleet:qa", Task(backend="custom")).to_wire())
    project = make_project(tmp_home, "agents:\n  qa: {trigger: work, backend: custom, command: 'true'}\n")
    git(project, "add", ".")
    git(project, "commit", "-qm", "first")
    commit = hook.commit_payload(project)
    _assert_documented("GitCommitted", commit)
    assert not [f for f in commit if f"`{f}`" not in (SPEC / "events.md").read_text()]
    daemon.call("fleet.up", projectDir=str(project))
    try:
        [view] = daemon.call("fleet.status", projectDir=str(project))["fleets"]
    finally:
        daemon.call("fleet.down", projectDir=str(project))
    _assert_documented("FleetView", view)
    assert set(view["agents"][0]) == _schema_fields("FleetAgent")
    run = daemon.call("spawn.start", backend="custom", task="true", workdir=str(project))["run"]
    daemon.call("spawn.wait", id=run["id"], timeout=20_000)
    shown = daemon.call("fleet.show", runId=run["id"])
    _assert_documented("FleetRunShown", {k: v for k, v in shown.items() if k != "success"})


def test_every_route_that_takes_arguments_documents_its_400() -> None:
    """Bad input is a 400 on every route that takes arguments (spec/errors.md); the spec said so for half."""
    table = load_table()
    documented = _openapi_routes()
    missing = sorted(f"{r.method} {r.path}" for r in ROUTES
                     if (table[r.op].params or "<" in r.path)
                     and "400" not in documented[(r.method, _quart_to_openapi(r.path))]["responses"])  # fmt: skip
    assert not missing, f"routes whose 400 spec/openapi.yaml does not list: {missing}"
