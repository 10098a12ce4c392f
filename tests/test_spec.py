"""The contracts in spec/ stay true to the code."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from portdaddy import errors
from portdaddy.core.ops import load_table
from portdaddy.http.routes import ROUTES, STREAMS

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


def test_every_route_that_takes_arguments_documents_its_400() -> None:
    """Bad input is a 400 on every route that takes arguments (spec/errors.md); the spec said so for half."""
    table = load_table()
    documented = _openapi_routes()
    missing = sorted(f"{r.method} {r.path}" for r in ROUTES
                     if (table[r.op].params or "<" in r.path)
                     and "400" not in documented[(r.method, _quart_to_openapi(r.path))]["responses"])  # fmt: skip
    assert not missing, f"routes whose 400 spec/openapi.yaml does not list: {missing}"
