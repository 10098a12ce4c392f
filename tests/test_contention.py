"""Contention is exact: wherever concurrent callers compete for one thing, exactly one wins, every loser gets
the documented refusal, and nothing half-done is left behind."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import PYTHON

_REMEMBERING = """
import sys
from pathlib import Path
from portdaddy.cli.context import save_current
size = int(sys.argv[2])
for n in range(300):
    save_current({"agentId": "a" * size, "sessionId": f"session-{n}", "purpose": "p" * 7 * size}, Path(sys.argv[1]))
"""


def test_current_json_is_never_read_torn_while_pd_processes_rewrite_it(tmp_path: Path) -> None:
    """What `pd begin`/`pd agent register` do to the shared file, from 8 processes at once, while another reads
    it as every pd command does: each read finds one writer's file whole (in place, reads found it empty or
    with another's tail, and the reader forgot its agent)."""
    from portdaddy.cli.context import current_path, save_current

    save_current({"agentId": "first"}, tmp_path)
    writers = [subprocess.Popen([PYTHON, "-c", _REMEMBERING, str(tmp_path), str(n)]) for n in range(1, 9)]
    torn = 0
    while any(w.poll() is None for w in writers):
        try:
            json.loads(current_path(tmp_path).read_text())
        except ValueError:
            torn += 1
    assert [w.wait() for w in writers] == [0] * 8
    assert torn == 0
    assert json.loads(current_path(tmp_path).read_text())["sessionId"] == "session-299"
    assert sorted(p.name for p in current_path(tmp_path).parent.iterdir()) == [".gitignore", "current.json"]
