"""The operation table: every operation defined once, dispatched by HTTP, IPC, MCP and the CLI alike.

An operation has a name (the IPC action, e.g. ``port.claim``), typed parameters (validated here, once, for
every transport), a handler ``handler(ctx, **params)`` (plain functions run atomically on the trio thread;
``async`` ones may wait), whether it may arrive fire-and-forget, and, if its reply hands something over (a
taken tuple, a granted lock), how to take that back when the reply cannot reach its caller. Each subsystem
declares its ``OPS`` next to its logic; this module assembles them into ``TABLE``.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from portdaddy.errors import PDError, bad_input

if TYPE_CHECKING:
    from portdaddy.core.app import App

Check = Callable[[str, Any], Any]
_MISSING = object()


@dataclass(frozen=True, slots=True)
class Param:
    """One argument. ``check(name, value)`` returns the clean value or raises a PDError."""

    name: str
    check: Check
    required: bool = False
    default: Any = None
    aliases: tuple[str, ...] = ()


@dataclass(slots=True)
class Ctx:
    """Who is calling and over what; ``conn`` lets an op tie state to a live IPC connection."""

    app: App
    transport: str
    agent_id: str | None = None
    pid: int | None = None
    conn: Any = None
    # False while a synchronous handler serves a fire-and-forget frame (nobody waits for its reply), so a hot
    # path may defer its store write; True for every request.
    acknowledged: bool = True
    # The fleet agent a fleet run's calls are made for. Only the fleet sets it, never a transport from a request, so
    # a session is known as a run's by it, not by metadata any client sets (spec/journal.md, "Fleet runs in the views").
    fleet_agent: str | None = None


class Later:
    """What a synchronous handler returns when it must wait (a blocking take, a lock queue): the transport
    awaits ``run()`` for the real result. Requests that can be answered at once, the common case, then never
    pay for a task; only the ones that truly block do."""

    __slots__ = ("run",)

    def __init__(self, run: Callable[[], Awaitable[Any]]) -> None:
        self.run = run


@dataclass(frozen=True, slots=True)
class Op:
    name: str
    handler: Callable[..., Any]
    params: tuple[Param, ...] = ()
    fire_and_forget: bool = False
    summary: str = ""
    # ``undo(ctx, result)``: give back what the reply ``result`` handed over (a taken tuple, a granted lock), when
    # a transport knows that reply never reached the caller (spec/decisions.md, "Durability"). None: nothing to.
    undo: Callable[[Ctx, Any], None] | None = None
    is_async: bool = field(init=False)
    # For bind, which walks the request's keys, not the parameters: a request names a few of them.
    _defaults: dict[str, Any] = field(init=False, repr=False, compare=False)
    _by_spelling: dict[str, tuple[Param, int]] = field(init=False, repr=False, compare=False)  # (param, rank)
    _required: tuple[Param, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "is_async", inspect.iscoroutinefunction(self.handler))
        defaults = {p.name: _MISSING if p.required else p.default for p in self.params}
        by_spelling = {spelling: (p, rank) for p in self.params for rank, spelling in enumerate((p.name, *p.aliases))}
        object.__setattr__(self, "_defaults", defaults)
        object.__setattr__(self, "_by_spelling", by_spelling)
        object.__setattr__(self, "_required", tuple(p for p in self.params if p.required))

    def spellings(self, name: str) -> tuple[str, ...]:
        """Every key a request may give the parameter that ``name`` names (its name, then its aliases)."""
        for p in self.params:
            if name == p.name or name in p.aliases:
                return (p.name, *p.aliases)
        return (name,)

    def bind(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Validate ``raw`` (transport fields like ``action`` are ignored) into handler kwargs. A None value is
        no value; a parameter's name wins over its aliases, an earlier alias over a later one."""
        by_spelling = self._by_spelling
        for p in self._required:
            if raw.get(p.name) is None and all(raw.get(alias) is None for alias in p.aliases):
                raise bad_input(f"missing required field '{p.name}' for {self.name}")
        kwargs = self._defaults.copy()
        for key, value in raw.items():
            found = by_spelling.get(key)
            if found is None or value is None:
                continue
            p, rank = found
            if rank and (raw.get(p.name) is not None or any(raw.get(a) is not None for a in p.aliases[: rank - 1])):
                continue
            kwargs[p.name] = p.check(p.name, value)
        return kwargs


def build_table(*groups: Iterable[Op]) -> dict[str, Op]:
    table: dict[str, Op] = {}
    for group in groups:
        for op in group:
            if op.name in table:
                raise RuntimeError(f"operation {op.name} is defined twice")
            names = [p.name for p in op.params]
            if len(set(names)) != len(names):
                raise RuntimeError(f"operation {op.name} declares a parameter twice: {names}")
            if op.undo is not None and op.fire_and_forget:  # nobody would be told what it handed over
                raise RuntimeError(f"operation {op.name} hands something over, so it cannot be fire-and-forget")
            table[op.name] = op
    return table


def lookup(table: dict[str, Op], name: object) -> Op:
    op = table.get(name) if isinstance(name, str) else None
    if op is None:
        raise PDError("unknown_action", f"unknown action {str(name)[:64]!r}; see spec/ipc.md for the list")
    return op


async def call(table: dict[str, Op], name: str, raw: dict[str, Any], ctx: Ctx, *,
               waiting: Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]] | None = None) -> Any:  # fmt: skip
    """Validate and run one operation (the slow-but-general path; IPC inlines this for sync ops). ``waiting``
    runs the part that may wait (an async handler, a ``Later``), e.g. to cancel it when the caller leaves."""
    op = lookup(table, name)
    result = op.handler(ctx, **op.bind(raw))
    if op.is_async:
        coro = result
        result = await (waiting(lambda: coro) if waiting else coro)
    if result.__class__ is Later:
        result = await (waiting(result.run) if waiting else result.run())
    return result


def load_table() -> dict[str, Op]:
    """Every subsystem's operations. Imported lazily so that pure modules stay importable alone."""
    from portdaddy.core import (
        activity,
        agents,
        arbiter,
        broker,
        harbors,
        inbox,
        locks,
        pheromones,
        registry,
        sessions,
        sugar,
        system,
        tuples,
        webhooks,
    )
    from portdaddy.fleet import ops as fleet

    return build_table(
        system.OPS,
        registry.OPS,
        agents.OPS,
        sessions.OPS,
        sugar.OPS,
        activity.OPS,
        locks.OPS,
        broker.OPS,
        inbox.OPS,
        webhooks.OPS,
        harbors.OPS,
        tuples.OPS,
        pheromones.OPS,
        arbiter.OPS,
        fleet.OPS,
    )
