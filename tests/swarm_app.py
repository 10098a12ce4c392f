"""An in-process App on a temporary store, as daemon.py builds it, for tests that drive subsystems directly
(forged events through app.bus, trio's MockClock)."""

from __future__ import annotations

from pathlib import Path

from portdaddy.config import Settings
from portdaddy.core.app import App
from portdaddy.core.store import Store


def make_app(home: Path) -> App:
    return App(Settings.from_env({"PORT_DADDY_HOME": str(home)}), Store(home / "portdaddy.db"))


class PublishRecorder:
    """Stands in for the broker (issue 4, not on this branch): records what App.publish would post."""

    name = "broker"

    def __init__(self) -> None:
        self.published: list[tuple[str, object, str]] = []

    def publish(self, channel: str, payload: object, *, sender: str) -> None:
        self.published.append((channel, payload, sender))
