"""Pass interface.

A pass is a frozen dataclass whose fields are its options, typed (numbers, booleans, enums,
``QuantSpec``, small frozen dataclasses) and read from a plan by the same serializer the Plan uses
(:func:`qcompile.plan.from_plain`). ``name``, ``requires``, ``provides`` and ``invalidates`` are
class variables; the last three are sets of :class:`~qcompile.ir.facts.Fact` that the
PassManager checks when it reads the plan.

``run(program, ctx)`` rewrites the Program (in place or into a new one) and returns a
:class:`PassResult` whose ``modified`` flag is honest. A pass that refines the plan (say,
``assign_precision`` adding per-layer rules) returns the refined plan in ``PassResult.plan``; the
context is frozen, so a pass cannot change the plan behind the manager's back. While it walks the
graph a pass records the node it is on (``ctx.at(entry, node)``), so a failure can say where.
``summarize(notes)`` turns the pass's notes into the lines the compile report prints.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.fx as fx

from qcompile.errors import PlanError
from qcompile.ir.facts import Fact
from qcompile.ir.program import Entry, Program
from qcompile.plan import Plan, from_plain


@dataclass
class Location:
    """Where a pass is working (for error messages)."""

    entry: Entry | None = None
    node: fx.Node | None = None


@dataclass(frozen=True)
class PassContext:
    """What a pass may consult besides the Program: the plan, calibration data, progress flag."""

    plan: Plan
    calib: Any = None
    progress: bool = False
    where: Location = field(default_factory=Location)

    def at(self, entry: Entry | None, node: fx.Node | None) -> None:
        self.where.entry, self.where.node = entry, node

    @property
    def entry(self) -> Entry | None:
        return self.where.entry

    @property
    def node(self) -> fx.Node | None:
        return self.where.node


@dataclass
class PassResult:
    program: Program
    modified: bool
    layers_changed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module path, reason)
    notes: dict[str, Any] = field(default_factory=dict)
    plan: Plan | None = None  # the refined plan, when the pass refines it


class Pass(abc.ABC):
    name: ClassVar[str]
    requires: ClassVar[frozenset[Fact]] = frozenset({Fact.CAPTURED})
    provides: ClassVar[frozenset[Fact]] = frozenset()
    invalidates: ClassVar[frozenset[Fact]] = frozenset()

    @abc.abstractmethod
    def run(self, program: Program, ctx: PassContext) -> PassResult: ...

    @classmethod
    def summarize(cls, notes: dict[str, Any]) -> list[str]:
        """Lines for the compile report that read this pass's notes (none by default)."""
        return []


E = typing.TypeVar("E", bound=enum.Enum)


def as_enum(owner: Pass, option: str, tp: type[E]) -> E:
    """Option ``option`` of the frozen pass ``owner`` as a member of ``tp`` (stored back, so a pass
    built directly with the plain value is typed too); PlanError listing the allowed values."""
    value = getattr(owner, option)
    try:
        member = tp(value)
    except ValueError:
        raise PlanError(f"{owner.name}: {option} {value!r} is not allowed; allowed: {[m.value for m in tp]}") from None
    object.__setattr__(owner, option, member)
    return member


PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"pass {cls.__name__} must be a frozen dataclass")
    if cls.name in PASSES:
        raise TypeError(f"pass name {cls.name!r} registered twice")
    for what in ("requires", "provides", "invalidates"):
        facts = getattr(cls, what)
        if not all(isinstance(f, Fact) for f in facts):
            raise TypeError(f"pass {cls.name!r}: {what} must be a frozenset of Fact, got {sorted(map(str, facts))}")
    PASSES[cls.name] = cls
    return cls


def make_pass(name: str, options: Iterable[tuple[str, Any]]) -> Pass:
    """Instantiate the registered pass ``name`` with ``options`` (plain plan values, typed here
    from the pass's dataclass fields); PlanError on bad input."""
    if name not in PASSES:
        raise PlanError(f"unknown pass {name!r}; passes: {sorted(PASSES)}")
    cls = PASSES[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    opts = dict(options)
    unknown = sorted(set(opts) - set(fields))
    if unknown:
        raise PlanError(f"pass {name!r}: unknown option(s) {unknown}; allowed: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: from_plain(hints[k], v, f"pass {name!r} option {k!r}") for k, v in opts.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise PlanError(f"pass {name!r}: bad options {opts}: {e}") from None
