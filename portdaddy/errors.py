"""One error vocabulary for every transport.

An error has a stable ``code`` string (the original's codes, e.g. ``LOCK_HELD``). The code decides the HTTP
status, the IPC performative and the CLI exit code, so no transport invents its own mapping. This module is
imported by the CLI, so it must stay free of heavy imports.
"""

from __future__ import annotations

from portdaddy.text import clip

# ``pd`` never imports typing (~15 ms of a ``pd claim -q``); annotations only need the names for checkers.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# CLI exit codes (DESIGN §4).
EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_BAD_INPUT = 2
EXIT_UNREACHABLE = 3

# IPC performatives used for errors (reference §20.3); duplicated from ipc.frame to keep this module leaf-level.
_REFUSE = 0x21
_FAILURE = 0x22
_NOT_UNDERSTOOD = 0x23

# code -> (HTTP status, IPC performative, CLI exit code)
_TABLE: dict[str, tuple[int, int, int]] = {
    "VALIDATION_ERROR": (400, _NOT_UNDERSTOOD, EXIT_BAD_INPUT),
    "IDENTITY_INVALID": (400, _NOT_UNDERSTOOD, EXIT_BAD_INPUT),
    "INVALID_TTL": (400, _NOT_UNDERSTOOD, EXIT_BAD_INPUT),
    "PAYLOAD_TOO_LARGE": (413, _NOT_UNDERSTOOD, EXIT_BAD_INPUT),
    "unknown_action": (404, _NOT_UNDERSTOOD, EXIT_BAD_INPUT),
    "METHOD_NOT_ALLOWED": (405, _NOT_UNDERSTOOD, EXIT_BAD_INPUT),
    "frame_decode_error": (400, _NOT_UNDERSTOOD, EXIT_BAD_INPUT),
    "UNAUTHORIZED": (401, _REFUSE, EXIT_REFUSED),
    "FORBIDDEN": (403, _REFUSE, EXIT_REFUSED),
    "NOT_FOUND": (404, _REFUSE, EXIT_REFUSED),
    "SERVICE_NOT_FOUND": (404, _REFUSE, EXIT_REFUSED),
    "SESSION_NOT_FOUND": (404, _REFUSE, EXIT_REFUSED),
    "AGENT_NOT_FOUND": (404, _REFUSE, EXIT_REFUSED),
    "LOCK_NOT_FOUND": (404, _REFUSE, EXIT_REFUSED),
    "NO_ACTIVE_SESSION": (404, _REFUSE, EXIT_REFUSED),
    "TIMEOUT": (408, _REFUSE, EXIT_REFUSED),
    "LOCK_HELD": (409, _REFUSE, EXIT_REFUSED),
    "NOT_OWNER": (403, _REFUSE, EXIT_REFUSED),
    "FILE_CONFLICT": (409, _REFUSE, EXIT_REFUSED),
    "CONFLICT": (409, _REFUSE, EXIT_REFUSED),
    "PORT_EXHAUSTED": (409, _REFUSE, EXIT_REFUSED),
    "RESOURCE_LIMIT": (429, _REFUSE, EXIT_REFUSED),
    "rate_limited": (429, _REFUSE, EXIT_REFUSED),
    "max_connections": (503, _REFUSE, EXIT_REFUSED),
    "agent_mismatch": (403, _REFUSE, EXIT_REFUSED),
    "disconnected": (400, _REFUSE, EXIT_REFUSED),
    "DAEMON_UNAVAILABLE": (503, _FAILURE, EXIT_UNREACHABLE),
    "NO_REPLY": (504, _FAILURE, EXIT_UNREACHABLE),  # a client's, never sent: see NoReply
    "CANCELLED": (499, _FAILURE, EXIT_REFUSED),
    "INTERNAL": (500, _FAILURE, EXIT_REFUSED),
    # The store cannot take a write just now; nothing was changed (spec/decisions.md, "Storage failures").
    "STORE_LOCKED": (503, _FAILURE, EXIT_REFUSED),
    "STORE_FULL": (507, _FAILURE, EXIT_REFUSED),
    "STORE_READONLY": (503, _FAILURE, EXIT_REFUSED),
    "STORE_GONE": (503, _FAILURE, EXIT_REFUSED),
    "STORE_FAILED": (500, _FAILURE, EXIT_REFUSED),
    # Outcomes pd reports when the daemon answered and the answer is a no; the daemon never sends these.
    "CHAIN_BROKEN": (409, _REFUSE, EXIT_REFUSED),
    "RUN_FAILED": (409, _REFUSE, EXIT_REFUSED),
    "DELIVERY_FAILED": (502, _FAILURE, EXIT_REFUSED),
}
_DEFAULT = (500, _FAILURE, EXIT_REFUSED)


def http_status(code: str) -> int:
    return _TABLE.get(code, _DEFAULT)[0]


def performative(code: str) -> int:
    return _TABLE.get(code, _DEFAULT)[1]


def exit_code(code: str) -> int:
    return _TABLE.get(code, _DEFAULT)[2]


# A refusal says what was wrong, and what to do, in one line: the quoted values in it (a 4,096-character worktree,
# a tuple path 32 levels deep) are what can make it long, and they are cut here, the one place every message of
# every transport passes, from the middle, so the line keeps its start and its end.
MAX_MESSAGE = 300


class PDError(Exception):
    """An error with a stable code. ``extra`` fields travel to the client beside ``error``/``message``."""

    max_message: int | None = MAX_MESSAGE

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        if self.max_message is not None:
            message = clip(message, self.max_message)
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra

    def to_wire(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra}

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> PDError:
        extra = {k: v for k, v in body.items() if k not in ("error", "message", "code", "action")}
        code = str(body.get("error") or body.get("code") or "INTERNAL")
        message = str(body.get("message") or body.get("error") or "request failed")
        return _BY_CODE.get(code, cls)(code, message, **extra)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"


def bad_input(message: str, code: str = "VALIDATION_ERROR", **extra: Any) -> PDError:
    """The error for input we refuse to act on; the message should say what to do instead."""
    return BadInput(code, message, **extra)


class BadInput(PDError):
    pass


class NotFound(PDError):
    pass


class Conflict(PDError):
    pass


class LockHeld(Conflict):
    pass


class Timeout(PDError):
    pass


class NoReply(Timeout):
    """A client gave up waiting for a reply (code ``NO_REPLY``, exit 3): not the daemon saying a wait timed out
    (``TIMEOUT``, exit 1), but a daemon that did not answer in time, stopped or stuck. The clients' waits cover
    each operation's own, so no reply means the daemon is not answering."""

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__("NO_REPLY", f"{message}: the daemon is not answering (pd status says why)", **extra)


class StoreError(PDError):
    """The daemon's store refused a write (locked by another process, disk full, read-only, deleted, I/O error):
    the operation changed nothing, and may succeed once the condition is gone."""


class DaemonUnavailable(PDError):
    def __init__(self, message: str = "Port Daddy daemon is not reachable", **extra: Any) -> None:
        super().__init__("DAEMON_UNAVAILABLE", message, **extra)


_BY_CODE: dict[str, type[PDError]] = {
    "LOCK_HELD": LockHeld,
    "FILE_CONFLICT": Conflict,
    "CONFLICT": Conflict,
    "PORT_EXHAUSTED": Conflict,
    "TIMEOUT": Timeout,
}
for _code, (_status, _perf, _exit) in _TABLE.items():
    if _code.startswith("STORE_"):
        _BY_CODE[_code] = StoreError
    elif _exit == EXIT_BAD_INPUT:
        _BY_CODE.setdefault(_code, BadInput)
    elif _status == 404:
        _BY_CODE.setdefault(_code, NotFound)
