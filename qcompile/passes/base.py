"""Pass interface.

A pass is a frozen dataclass whose fields are its options; ``name``, ``requires`` and
``provides`` are class variables. ``run(program, ctx)`` rewrites the Program (in place or into a
new one) and returns a :class:`PassResult` whose ``modified`` flag is honest. While it walks the
graph a pass records the node it is on (``ctx.at(entry, node)``), so a failure can say where.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

import torch.fx as fx

from qcompile.errors import PlanError
from qcompile.ir.program import Entry, Program
from qcompile.plan import Plan


@dataclass
class PassContext:
    """What a pass may consult besides the Program: the plan, calibration data, progress flag."""

    plan: Plan
    calib: Any = None
    progress: bool = False
    entry: Entry | None = None
    node: fx.Node | None = None

    def at(self, entry: Entry | None, node: fx.Node | None) -> None:
        self.entry, self.node = entry, node


@dataclass
class PassResult:
    program: Program
    modified: bool
    layers_changed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module path, reason)
    notes: dict[str, Any] = field(default_factory=dict)


class Pass(abc.ABC):
    name: ClassVar[str]
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    needs_calib: ClassVar[bool] = False  # True: run() reads ctx.calib (the CLI then supplies calibration tokens)

    @abc.abstractmethod
    def run(self, program: Program, ctx: PassContext) -> PassResult: ...


PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"pass {cls.__name__} must be a frozen dataclass")
    if cls.name in PASSES:
        raise TypeError(f"pass name {cls.name!r} registered twice")
    PASSES[cls.name] = cls
    return cls


def make_pass(name: str, options: Iterable[tuple[str, Any]]) -> Pass:
    """Instantiate the registered pass ``name`` with ``options``; PlanError on bad input."""
    if name not in PASSES:
        raise PlanError(f"unknown pass {name!r}; passes: {sorted(PASSES)}")
    cls = PASSES[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    opts = dict(options)
    unknown = sorted(set(opts) - set(fields))
    if unknown:
        raise PlanError(f"pass {name!r}: unknown option(s) {unknown}; allowed: {sorted(fields)}")
    try:
        return cls(**opts)
    except (TypeError, ValueError) as e:
        raise PlanError(f"pass {name!r}: bad options {opts}: {e}") from None
