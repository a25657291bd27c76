"""The design spaces of qcompile's tunable CPU kernels (:mod:`qcompile.tuning.space` explains how
the tuner searches them): the lane-blocked template, the hand-written x86 dot-product kernels and the
bf16 W4A16 kernel."""

from __future__ import annotations

from dataclasses import dataclass

import tvm

from qcompile.codegen.tvm.kernels.attention import Attention, prefix_attention_primfunc
from qcompile.codegen.tvm.kernels.linear import (
    LinearKernel,
    QuantKnobs,
    QuantRows,
    TemplateKnobs,
    linear_primfunc,
    max_vec,
    quant_rows_primfunc,
)
from qcompile.codegen.tvm.kernels.x86 import HALF, X86Knobs, X86Linear, x86_primfunc
from qcompile.codegen.tvm.kernels.x86_bf16 import ROWS as BF16_ROWS
from qcompile.codegen.tvm.kernels.x86_bf16 import Bf16Linear, bf16_linear_primfunc
from qcompile.tuning.space import Knob, dedup


class _OfSpec:
    """A tunable named after its kernel spec, with the spec's row count."""

    spec: LinearKernel | X86Linear | Bf16Linear | QuantRows | Attention

    @property
    def rows(self) -> int | None:
        return self.spec.m

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class TemplateTunable(_OfSpec):
    """A lane-blocked template linear (:mod:`qcompile.codegen.tvm.kernels.linear`), scheduled by
    :func:`~qcompile.codegen.tvm.kernels.linear.schedule_template` with :class:`TemplateKnobs`."""

    spec: LinearKernel

    def knobs(self) -> tuple[Knob, ...]:
        d = TemplateKnobs.default(self.spec)
        many_rows = self.spec.m is None or self.spec.m > 1
        rows = dedup([d.rows, 1, 2, 4, 8]) if many_rows else (d.rows,)
        if self.spec.m is not None:
            rows = tuple(r for r in rows if r <= self.spec.m)
        out = [
            Knob("rows", rows),
            Knob("k_unroll", dedup([d.k_unroll, 2, 4, 8])),
            Knob("vec", dedup([d.vec, max_vec(self.spec) // 2])),
        ]
        if self.spec.wfmt != "f32" and many_rows:
            out.append(Knob("staged", (int(d.staged), int(not d.staged))))
        return tuple(out)

    def workload(self) -> tvm.tirx.PrimFunc:
        return linear_primfunc(self.spec, schedule=False)

    def build(self, choice: dict[str, int]) -> tvm.tirx.PrimFunc:
        d = TemplateKnobs.default(self.spec)
        knobs = TemplateKnobs(
            choice.get("rows", d.rows),
            choice.get("k_unroll", d.k_unroll),
            choice.get("vec", d.vec),
            bool(choice.get("staged", int(d.staged))),
        )
        return linear_primfunc(self.spec, knobs=knobs)


@dataclass(frozen=True)
class X86Tunable(_OfSpec):
    """A hand-written x86 dot-product linear (:mod:`qcompile.codegen.tvm.kernels.x86`) with
    :class:`X86Knobs`."""

    spec: X86Linear

    def knobs(self) -> tuple[Knob, ...]:
        return _row_knobs(self.spec.m, X86Knobs.default(self.spec))

    def workload(self) -> tvm.tirx.PrimFunc:
        return x86_primfunc(self.spec)

    def build(self, choice: dict[str, int]) -> tvm.tirx.PrimFunc:
        return x86_primfunc(self.spec, _row_choice(choice, X86Knobs.default(self.spec)))


def _row_knobs(m: int | None, d: X86Knobs) -> tuple[Knob, ...]:
    """The hand-written kernels' row knobs: tile height, rows per task, when to split rows."""
    if m == 1:  # one row: nothing to tile or split
        return (Knob("rows", (d.rows,)),)
    return (
        Knob("rows", dedup([d.rows, *range(1, 2 * HALF + 1)])),
        Knob("chunk", dedup([d.chunk, 8, 16, 48])),
        Knob("split_below", dedup([d.split_below, 0, 64])),
    )


def _row_choice(choice: dict[str, int], d: X86Knobs) -> X86Knobs:
    return X86Knobs(choice.get("rows", d.rows), choice.get("chunk", d.chunk), choice.get("split_below", d.split_below))


@dataclass(frozen=True)
class Bf16Tunable(_OfSpec):
    """The bf16 W4A16 linear (:mod:`qcompile.codegen.tvm.kernels.x86_bf16`) with :class:`X86Knobs`."""

    spec: Bf16Linear

    def knobs(self) -> tuple[Knob, ...]:
        return _row_knobs(self.spec.m, X86Knobs(BF16_ROWS))

    def workload(self) -> tvm.tirx.PrimFunc:
        return bf16_linear_primfunc(self.spec)

    def build(self, choice: dict[str, int]) -> tvm.tirx.PrimFunc:
        return bf16_linear_primfunc(self.spec, _row_choice(choice, X86Knobs(BF16_ROWS)))


@dataclass(frozen=True)
class QuantRowsTunable(_OfSpec):
    """The dynamic int8 (or int6) quantization of a linear's input rows
    (:func:`~qcompile.codegen.tvm.kernels.linear.quant_rows_primfunc`) with :class:`QuantKnobs`."""

    spec: QuantRows

    def knobs(self) -> tuple[Knob, ...]:
        d = QuantKnobs.default(self.spec)
        vecs = dedup([d.vec, *(v for v in (8, 32, 64) if self.spec.k % v == 0)])
        many_rows = self.spec.m is None or self.spec.m > 1
        out = [Knob("vec", vecs), Knob("fused", (int(d.fused), int(not d.fused)))]
        if many_rows:
            out.append(Knob("parallel", (int(d.parallel), int(not d.parallel))))
        return tuple(out)

    def workload(self) -> tvm.tirx.PrimFunc:
        return quant_rows_primfunc(self.spec, schedule=False)

    def build(self, choice: dict[str, int]) -> tvm.tirx.PrimFunc:
        d = QuantKnobs.default(self.spec)
        knobs = QuantKnobs(
            choice.get("vec", d.vec), bool(choice.get("parallel", d.parallel)), bool(choice.get("fused", d.fused))
        )
        return quant_rows_primfunc(self.spec, knobs=knobs)


@dataclass(frozen=True)
class AttentionTunable(_OfSpec):
    """The prefix attention kernel over a static cache
    (:func:`~qcompile.codegen.tvm.kernels.attention.prefix_attention_primfunc`): parallel tasks per
    head (default) or per (head, query) row."""

    spec: Attention

    @property
    def rows(self) -> int | None:
        return self.spec.queries

    def knobs(self) -> tuple[Knob, ...]:
        many_rows = self.spec.queries is None or self.spec.queries > 1
        return (Knob("spread_rows", (0, 1) if many_rows else (0,)),)

    def workload(self) -> tvm.tirx.PrimFunc:
        return prefix_attention_primfunc(self.spec)

    def build(self, choice: dict[str, int]) -> tvm.tirx.PrimFunc:
        return prefix_attention_primfunc(self.spec, bool(choice.get("spread_rows", 0)))


__all__ = ["AttentionTunable", "Bf16Tunable", "QuantRowsTunable", "TemplateTunable", "X86Tunable"]
