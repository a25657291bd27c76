"""CPU kernels for QuEST (TE compute + s_tir schedules): the block Walsh–Hadamard transform and the
QuEST row quantizer.

* :class:`Hadamard` / :func:`hadamard_primfunc` — ``y = x @ diag(H_b for b in blocks)`` over the
  last axis of ``x[M, K]``: ``log2(max b)`` butterfly stages (stage ``h``: within its block, column
  ``j`` becomes ``x[j] + x[j + h]`` when bit ``h`` of ``j`` is clear, else ``x[j − h] − x[j]``;
  blocks already finished pass through), then one multiply by ``1/√b`` per block: the same float
  operations, in the same order, as the reference butterfly (:func:`qcompile.quant.hadamard.fwht`),
  so the results are bitwise equal.
* :class:`QuestRows` / :func:`quest_rows_primfunc` — ``x[M, K_p]`` (zero-padded from ``K``) →
  odd codes ``int8[M, K_p]`` (0 in the padding) and half steps ``f32[M, 1]`` with the reference's
  operations (:func:`qcompile.quant.quest.quest_codes`): ``σ = sqrt(Σx² / K)`` (1 when 0),
  ``h = σ·(α_b / (2^b − 1))``, ``i = clamp(floor(x / (2h)), −2^(b−1), 2^(b−1) − 1)`` (0 for NaN), code
  ``2i + 1``. Given the same ``h``, the codes are exactly the reference's; ``h`` itself may differ in
  the last bit (the sum of squares is reduced in another order).

The QuEST linear then runs on the ``i8`` lane-blocked linear kernel (:mod:`.linear`) with the odd
weight codes and these activation codes: ``Σ c_x·c_w`` exact in int32, rescaled by ``h·Δ_w/2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule

from qcompile.quant.hadamard import _runs
from qcompile.quant.quest import optimal_alpha


def _rows(m: int | None) -> tvm.tirx.PrimExpr | int:
    return te.var("m", "int64") if m is None else m


@dataclass(frozen=True)
class Hadamard:
    """The block Walsh–Hadamard transform of rows of width ``sum(blocks)``."""

    blocks: tuple[int, ...]
    m: int | None  # None: dynamic number of rows

    @property
    def k(self) -> int:
        return sum(self.blocks)

    @property
    def name(self) -> str:
        runs = "_".join(f"{b}x{c}" for _, b, c in _runs(self.blocks))
        return f"qc_hadamard_{runs}_{'mdyn' if self.m is None else f'm{self.m}'}"


def _in_run(c: tirx.PrimExpr, start: int, b: int, count: int) -> tirx.PrimExpr:
    return tirx.all(c >= start, c < start + b * count)


def _butterfly_stage(cur: te.Tensor, runs: list[tuple[int, int, int]], h: int, k: int):  # type: ignore[no-untyped-def]
    def butterfly(i, c):  # type: ignore[no-untyped-def]
        out = cur[i, c]  # blocks of h or fewer columns are done
        for start, b, count in runs:
            if b <= h:
                continue
            lo = ((c - start) % (2 * h)) < h  # bit h of the column's index in its block is clear
            v = tirx.Select(lo, cur[i, c] + cur[i, tirx.min(c + h, k - 1)], cur[i, tirx.max(c - h, 0)] - cur[i, c])
            out = tirx.Select(_in_run(c, start, b, count), v, out)
        return out

    return butterfly


def hadamard_primfunc(spec: Hadamard, schedule: bool = True) -> tvm.tirx.PrimFunc:
    """``(x f32[M, K]) -> y f32[M, K]``."""
    m, k = _rows(spec.m), spec.k
    runs = _runs(spec.blocks)
    x = te.placeholder((m, k), "float32", name="X")
    cur = x
    h, top = 1, max(spec.blocks)
    stage = 0
    while h < top:
        cur = te.compute((m, k), _butterfly_stage(cur, runs, h, k), name=f"S{stage}")
        h *= 2
        stage += 1

    def scale(i, c):  # type: ignore[no-untyped-def]
        out = cur[i, c]
        for start, b, count in runs:
            out = tirx.Select(_in_run(c, start, b, count), cur[i, c] * tirx.const(1.0 / math.sqrt(b), "float32"), out)
        return out

    y = te.compute((m, k), scale, name="Y")
    func = te.create_prim_func([x, y])
    if not schedule:
        return func
    sch = Schedule(func)
    for s in range(stage + 1):
        blk = sch.get_sblock("Y" if s == stage else f"S{s}")
        if spec.m is None:
            sch.parallel(sch.get_loops(blk)[0])
        # no explicit vectorize: with one static row, TVM 0.27 miscompiled the vectorized gathers
        # (tests/codegen/test_tvm_quest.py checks m = 1); LLVM vectorizes the plain loop itself
    return sch.mod["main"].with_attr("tir.is_scheduled", True)


@dataclass(frozen=True)
class QuestRows:
    """QuEST ``bits``-bit quantization of each row of ``x[M, k_p]`` whose first ``k`` columns are real."""

    k: int
    k_p: int
    bits: int
    m: int | None

    @property
    def name(self) -> str:
        return f"qc_quest_rows_k{self.k}_p{self.k_p}_b{self.bits}_{'mdyn' if self.m is None else f'm{self.m}'}"


def quest_rows_primfunc(spec: QuestRows, schedule: bool = True) -> tvm.tirx.PrimFunc:
    """``(x f32[M, k_p]) -> (odd codes int8[M, k_p], half steps f32[M, 1])`` (see the module docstring)."""
    if 2**spec.bits - 1 > 127:
        raise ValueError(f"{spec.bits}-bit odd codes do not fit int8")
    m = _rows(spec.m)
    n = 2 ** (spec.bits - 1)
    f32 = lambda v: tirx.const(v, "float32")  # noqa: E731
    x = te.placeholder((m, spec.k_p), "float32", name="X")
    r = te.reduce_axis((0, spec.k), "r")
    ss = te.compute((m, 1), lambda i, _: te.sum(x[i, r] * x[i, r], axis=r), name="SS")

    def half(i, _):  # type: ignore[no-untyped-def]
        s = tirx.sqrt(ss[i, 0] / f32(float(spec.k)))
        s = tirx.Select(s == f32(0.0), f32(1.0), s)
        return s * f32(optimal_alpha(spec.bits) / (2**spec.bits - 1))

    hs = te.compute((m, 1), half, name="HS")

    def code(i, c):  # type: ignore[no-untyped-def]
        v = tirx.floor(x[i, c] / (hs[i, 0] * f32(2.0)))
        v = tirx.Select(tirx.isnan(v), f32(0.0), tirx.max(tirx.min(v, f32(n - 1)), f32(-n)))
        odd = (v * f32(2.0) + f32(1.0)).astype("int8")
        return tirx.Select(c < spec.k, odd, tirx.const(0, "int8"))

    q = te.compute((m, spec.k_p), code, name="Q")
    func = te.create_prim_func([x, q, hs])
    if not schedule:
        return func
    sch = Schedule(func)
    qi, qk = sch.get_loops(sch.get_sblock("Q"))
    if spec.k_p % 16 == 0:
        _, ki = sch.split(qk, [None, 16])
        sch.vectorize(ki)
    if spec.m is None:
        sch.parallel(qi)
    return sch.mod["main"].with_attr("tir.is_scheduled", True)
