"""Find, parse and check a project's fleet file: what ``pd fleet validate`` prints and ``pd fleet up`` requires.

Blocking (file reads, ``git`` for the template variables): the daemon calls it in a worker thread.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from portdaddy.errors import PDError
from portdaddy.fleet.config import (
    FLEET_FILES,
    FleetConfig,
    FleetConfigError,
    check_backends,
    find_fleet_file,
    load_fleet,
)


def locate(project_dir: str | Path) -> Path:
    path = find_fleet_file(Path(project_dir))
    if path is None:
        raise PDError("NOT_FOUND", f"no fleet file in {project_dir} (looked for {', '.join(FLEET_FILES)}); "
                                   "create one with: pd fleet init")  # fmt: skip
    return path


def load_checked(project_dir: str | Path, path_env: str | None = None) -> FleetConfig:
    """The parsed fleet, or FleetConfigError listing every problem, missing backend programs included
    (resolved against ``path_env``, the PATH the fleet's children will get)."""
    path = locate(project_dir)
    cfg = load_fleet(path)
    problems = check_backends(cfg, lambda binary: shutil.which(binary, path=path_env))
    if problems:
        raise FleetConfigError([f"{path}: {p}" for p in problems], path)
    return cfg
