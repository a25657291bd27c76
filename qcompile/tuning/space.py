"""Design spaces of qcompile's kernels: each tunable kernel's schedule knobs, as MetaSchedule sees them.

A :class:`Tunable` is one distinct kernel of a compiled Program (a lane-blocked template linear,
or a hand-written x86 dot-product linear: :mod:`qcompile.codegen.tvm.kernels.tunable`) with:

* its **workload**: the PrimFunc tuning records are keyed by (the plain compute for the template,
  whose schedule is all knobs; the default-knob kernel for the hand-written loop nests, whose knobs
  are construction parameters);
* its **knobs** (:class:`Knob`): names and candidate values, the hand-picked value first;
* :meth:`Tunable.build`: the scheduled kernel for one choice of knob values.

In MetaSchedule's terms the design space is a ``sample_categorical`` decision per knob
(:func:`sample`): a tuning record's trace holds exactly those decisions, and qcompile rebuilds the
kernel from them (:func:`choice_of`). The search is exhaustive in a fixed order — the default first
(so tuning can never pick something slower than the default it measured), then the rest of the
space in a seeded shuffle — cut at the trial budget.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Protocol

import tvm
from tvm.s_tir import Schedule

# rows a kernel with a dynamic number of rows is measured at (prefill and evaluation batches)
DYNAMIC_ROWS = 64


@dataclass(frozen=True)
class Knob:
    name: str
    values: tuple[int, ...]  # values[0]: the hand-picked default


class Tunable(Protocol):
    """One distinct kernel the tuner can schedule differently."""

    @property
    def name(self) -> str: ...

    @property
    def rows(self) -> int | None: ...  # None: dynamic rows (measured at DYNAMIC_ROWS)

    def knobs(self) -> tuple[Knob, ...]: ...

    def workload(self) -> tvm.tirx.PrimFunc: ...

    def build(self, choice: dict[str, int]) -> tvm.tirx.PrimFunc: ...


def dedup(values: list[int]) -> tuple[int, ...]:
    """``values`` without repeats, in order (a knob's candidates, the default first)."""
    return tuple(dict.fromkeys(values))


def default_choice(t: Tunable) -> dict[str, int]:
    """The hand-picked schedule: every knob's first value."""
    return {k.name: k.values[0] for k in t.knobs()}


def candidates(t: Tunable, seed: int = 0) -> list[dict[str, int]]:
    """Every choice of ``t``'s knobs: the default (every knob's first value) first, then the rest
    in a shuffle seeded by ``seed``."""
    knobs = t.knobs()
    combos = [dict(zip([k.name for k in knobs], vals)) for vals in itertools.product(*[k.values for k in knobs])]
    head, rest = combos[:1], combos[1:]
    random.Random(seed).shuffle(rest)
    return head + rest


def sample(sch: Schedule, knobs: tuple[Knob, ...], choice: dict[str, int]) -> None:
    """Record ``choice`` in ``sch``'s trace as one ``sample_categorical`` decision per knob (the
    design space's decisions; the trace MetaSchedule stores in a tuning record)."""
    for k in knobs:
        sch.sample_categorical(list(k.values), [1.0 / len(k.values)] * len(k.values), k.values.index(choice[k.name]))


def choice_of(trace: tvm.s_tir.schedule.Trace, knobs: tuple[Knob, ...]) -> dict[str, int] | None:
    """The knob values a record's trace decided (None when the trace is not of these knobs: a
    record written by another version of the design space)."""
    decided = [(inst, trace.decisions[inst]) for inst in trace.insts if inst.kind.name == "SampleCategorical"]
    if len(decided) != len(knobs):
        return None
    out: dict[str, int] = {}
    for k, (inst, decision) in zip(knobs, decided):
        values = tuple(int(v) for v in inst.attrs[0])
        if values != k.values or not 0 <= int(decision) < len(values):
            return None
        out[k.name] = values[int(decision)]
    return out


__all__ = [
    "DYNAMIC_ROWS",
    "Knob",
    "Tunable",
    "candidates",
    "choice_of",
    "dedup",
    "default_choice",
    "sample",
]
