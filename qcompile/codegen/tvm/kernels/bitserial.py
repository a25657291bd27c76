"""Bit-serial linear kernel (FlexQ's arithmetic on the CPU): the alternative to unpacking.

Activation and weight codes as two's-complement bit planes packed 32 per ``uint32`` word along K;
for every group of K::

    acc[m, n, g] = Σ_i Σ_j c_i·c_j·2^(i+j) · Σ_{words w of g} popcount(A[i, m, w] AND W[j, n, w])

with ``c = -1`` for the sign plane and ``+1`` otherwise (36 plane pairs for W6A6, 48 for W6A8):
exactly :func:`qcompile.ops.packed.packed_linear_bitserial`. Weight planes are lane-blocked
(``int32[planes, N/NBB, words, NBB]``, a word's 32 bits in an int32) so a vector of NBB output
channels is ANDed with one broadcast activation word and popcounted per lane. Without a vector
popcount instruction (AVX2 has none; LLVM emulates it with a nibble table) this does more work per
weight than unpacking to integers, which the kernel benchmark measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule

from qcompile.quant.packing import to_bitplanes

NBB = 8  # output channels per vector (uint32 lanes of a 256-bit register)


@dataclass(frozen=True)
class BitSerial:
    n: int  # multiple of NBB
    k: int  # multiple of the group, which is a multiple of 32
    group: int
    w_bits: int
    a_bits: int
    act_group: int  # 0: one activation scale per token; else == group
    m: int | None

    def __post_init__(self) -> None:
        if self.group % 32 or self.k % self.group or self.n % NBB:
            raise ValueError(f"bit-serial kernel needs groups of a multiple of 32 and N % {NBB} == 0, got {self}")

    @property
    def groups(self) -> int:
        return self.k // self.group

    @property
    def name(self) -> str:
        m = "mdyn" if self.m is None else f"m{self.m}"
        act = "g" if self.act_group else "t"
        return f"qc_bitserial_w{self.w_bits}a{self.a_bits}{act}_n{self.n}_k{self.k}_g{self.group}_{m}"


def _coef(i: tirx.PrimExpr, bits: int) -> tirx.PrimExpr:
    """The plane's signed weight 2^i (negative for the sign plane), as int32."""
    p = tirx.const(1, "int32") << i.astype("int32")
    return tirx.Select(i == bits - 1, -p, p)


def act_planes_primfunc(spec: BitSerial) -> tvm.tirx.PrimFunc:
    """int8 codes ``[M, K]`` → ``int32[a_bits, M, K/32]`` planes (two's complement bits; an int32
    holds the 32 bits of a word)."""
    m = te.var("m", "int64") if spec.m is None else spec.m
    q = te.placeholder((m, spec.k), "int8", name="QX")
    b = te.reduce_axis((0, 32), "b")
    planes = te.compute(
        (spec.a_bits, m, spec.k // 32),
        lambda i, r, w: te.sum(
            ((q[r, w * 32 + b].astype("int32") >> i.astype("int32")) & 1) << b.astype("int32"), axis=b
        ),
        name="P",
    )
    func = te.create_prim_func([q, planes])
    return func.with_attr("tir.is_scheduled", True)


def bitserial_primfunc(spec: BitSerial) -> tvm.tirx.PrimFunc:
    m = te.var("m", "int64") if spec.m is None else spec.m
    wpg = spec.group // 32  # words per group
    a = te.placeholder((spec.a_bits, m, spec.k // 32), "int32", name="A")
    sx = te.placeholder((m, spec.groups if spec.act_group else 1), "float32", name="SX")
    w = te.placeholder((spec.w_bits, spec.n // NBB, spec.k // 32, NBB), "int32", name="W")
    s = te.placeholder((spec.n // NBB, spec.groups, NBB), "float32", name="S")
    i = te.reduce_axis((0, spec.a_bits), "i")
    j = te.reduce_axis((0, spec.w_bits), "j")
    ww = te.reduce_axis((0, wpg), "ww")
    acc = te.compute(
        (m, spec.n, spec.groups),
        lambda r, n, g: te.sum(
            _coef(i, spec.a_bits)
            * _coef(j, spec.w_bits)
            * tirx.popcount(a[i, r, g * wpg + ww] & w[j, n // NBB, g * wpg + ww, n % NBB]).astype("int32"),
            axis=[i, j, ww],
        ),
        name="ACC",
    )
    gg = te.reduce_axis((0, spec.groups), "g")
    y = te.compute(
        (m, spec.n),
        lambda r, n: te.sum(
            acc[r, n, gg].astype("float32") * (sx[r, gg] if spec.act_group else sx[r, 0]) * s[n // NBB, gg, n % NBB],
            axis=gg,
        ),
        name="Y",
    )
    func = te.create_prim_func([a, sx, w, s, y])
    sch = Schedule(func)
    yb = sch.get_sblock("Y")
    r, n, g = sch.get_loops(yb)
    no, ni = sch.split(n, [None, NBB])
    sch.reorder(no, r, g, ni)
    ab = sch.get_sblock("ACC")
    sch.compute_at(ab, g)
    sch.set_scope(ab, 0, "local")
    loops = sch.get_loops(ab)
    an, ai, aj, aw = loops[-4:]
    sch.reorder(ai, aj, aw, an)
    sch.vectorize(an)
    sch.vectorize(ni)
    sch.parallel(no)
    sch.decompose_reduction(ab, ai)
    sch.decompose_reduction(yb, g)
    return sch.mod["main"].with_attr("tir.is_scheduled", True)


def pack_plane_scales(spec: BitSerial, scales: torch.Tensor) -> torch.Tensor:
    """Per-(output, group) scales ``[N, G]`` → ``[N/NBB, G, NBB]`` (padded with zeros)."""
    s = torch.nn.functional.pad(scales.to(torch.float32), (0, 0, 0, spec.n - scales.shape[0]))
    return s.view(spec.n // NBB, NBB, spec.groups).transpose(1, 2).contiguous()


def pack_weight_planes(spec: BitSerial, codes: torch.Tensor) -> torch.Tensor:
    """Signed codes ``[N, K]`` → ``int32[w_bits, N/NBB, K/32, NBB]`` bit-plane words (padded)."""
    n, k = codes.shape
    c = torch.nn.functional.pad(codes.to(torch.int32), (0, spec.k - k, 0, spec.n - n))
    planes = to_bitplanes(c, spec.w_bits, signed=True)  # int32 [bits, N, K/32] (bit patterns)
    p = planes.view(spec.w_bits, spec.n // NBB, NBB, spec.k // 32).permute(0, 1, 3, 2).contiguous()
    return p
