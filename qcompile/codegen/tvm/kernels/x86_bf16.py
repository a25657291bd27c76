"""W4A16 on AVX-512 BF16: 4-bit weights times bf16-rounded activations on ``vdpbf16ps``.

``y[m, n] = Σ_g sw(n, g)·Σ_{k in g} bf16(x[m, k])·u(n, k) + c(n, g)·xs(m, g)  (+ bias[n]) (+ r[m, n])``
with the weight-only ``u4`` format of :mod:`.linear` (``u = code + zero``, 0…15, and the per-(output,
group) term ``c = offset − zero·scale``) and ``xs(m, g) = Σ_{k in g} bf16(x[m, k])`` summed in fp32.

What is rounded, and what is exact:

* the activations are rounded once to bfloat16 (round to nearest even, as torch's
  ``x.to(torch.bfloat16)``; a NaN of any payload becomes the quiet NaN 0x7FC0, never an Inf) by
  :func:`bf16_rows_primfunc`, which also writes ``xs`` (and computes a fused RMSNorm or SwiGLU product
  first, :class:`Bf16Rows`);
* a weight ``u`` (at most 4 significant bits) is exact in bfloat16, and so is every product
  ``bf16(x)·u`` in fp32 (8 + 4 significant bits); ``vdpbf16ps`` adds two of them per lane into an fp32
  accumulator, so the only other rounding is fp32 addition, as in the fp32 template. (The instruction
  treats bf16 denormals, below 1.2e-38, as zero.)

So against the fp32 template the one change is the activation's rounding to 8 significant bits:
an opt-in (``Plan.float_compute = "bf16"``), whose perplexity cost is measured, not assumed.

Instructions (the target needs ``avx512f``, ``avx512bw`` and ``avx512bf16``, :data:`NEEDS`):

* ``vdpbf16ps`` (16 fp32 lanes, each adding the products of 2 bf16 pairs) through a one-line LLVM
  function imported into the kernel (``pragma_import_llvm``) and inlined: TVM's bf16 legalization
  would otherwise widen any bf16-typed TIR value to fp32 before the intrinsic sees it;
* ``vpermw`` looks each 4-bit code up in a 32-entry table of bf16 values (entry ``i`` is ``bf16(i % 16)``,
  so only a shift is needed to bring a nibble into the index's low 5 bits: no mask).

Weight layout (:func:`pack_weight`): ``W[N/64, K/2, 32]`` uint16; word ``w`` of block ``b`` and K pair
``p`` holds 4 nibbles, nibble ``j`` (bits ``4j…4j+3``) = ``u[64·b + 16·j + w // 2, 2·p + w % 2]``: one
64-byte load is the 4 vectors of ``vdpbf16ps`` operands for 64 outputs × 2 inputs, each decoded with a
shift and a ``vpermw``.

Schedule (the x86 integer kernel's, :mod:`.x86`): parallel tasks over blocks of 64 outputs (and chunks
of rows when there are few blocks); per group, rows in register tiles of ``rows`` (6 rows × 64 outputs
= 24 zmm accumulators), each decoded weight vector serving all of them; each group's sums are scaled
into the output rows (``acc·sw + c·xs``, the template's order), then the bias and a fused residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import tvm
from tvm import te
from tvm.s_tir import Schedule
from tvm.script import tirx as T

from qcompile.codegen.tvm.kernels.linear import check_producer, pad2d, producer_suffix
from qcompile.codegen.tvm.kernels.x86 import HALF, STACK, X86Knobs, epilogue

NEEDS = ("avx512f", "avx512bw", "avx512bf16")  # LLVM feature names
NBX = 64  # outputs per block: 4 vectors of 16 fp32 lanes
LANES = 16
ROWS = 6  # rows per register tile by default

_DOT = "qc_dpbf16ps"
# vdpbf16ps on int32-typed operands: a bitcast LLVM folds away, so TIR never holds a bf16 value
_DOT_LL = f"""
define linkonce_odr <16 x float> @{_DOT}(<16 x float> %acc, <16 x i32> %a, <16 x i32> %b) alwaysinline {{
  %x = bitcast <16 x i32> %a to <32 x bfloat>
  %y = bitcast <16 x i32> %b to <32 x bfloat>
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %acc, <32 x bfloat> %x, <32 x bfloat> %y)
  ret <16 x float> %r
}}
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
"""


def has_bf16_dot(features: frozenset[str] | set[str]) -> bool:
    """Whether a CPU with these LLVM ``features`` runs this module's kernels."""
    return all(f in features for f in NEEDS)


@dataclass(frozen=True)
class Bf16Rows:
    """``x f32[M, K]`` → ``(bf16 bits uint16[M, K], xs f32[M, K/group])``; like the int8 quantizer
    (:class:`.linear.QuantRows`) it can compute its input from the producer only quantized linears
    read: an RMSNorm (``norm``: a second input ``w[K]``, ``valid`` the unpadded K the mean divides by)
    or a SwiGLU's ``silu(x)·u`` (``silu_gate``: a second input ``u[M, K]``)."""

    k: int
    group: int
    m: int | None
    norm: bool = False
    eps: float = 0.0
    valid: int = 0
    silu_gate: bool = False

    def __post_init__(self) -> None:
        check_producer(self.k, self.norm, self.valid, self.silu_gate)

    @property
    def groups(self) -> int:
        return self.k // self.group

    @property
    def name(self) -> str:
        n = producer_suffix(self.norm, self.eps, self.valid, self.silu_gate)
        return f"qc_bf16rows_k{self.k}_g{self.group}{n}_{'mdyn' if self.m is None else f'm{self.m}'}"


@dataclass(frozen=True)
class Bf16Linear:
    """One kernel: an N×K ``u4`` weight (padded sizes) with groups of ``group`` along K and the
    offset term, times bf16 activations."""

    n: int  # multiple of NBX
    k: int  # multiple of the group
    group: int  # even
    bias: bool
    m: int | None  # None: dynamic number of rows
    residual: bool = False

    def __post_init__(self) -> None:
        if self.group % 2 or self.k % self.group or self.n % NBX:
            raise ValueError(
                f"the bf16 kernel needs an even group dividing K and N a multiple of {NBX}, got N={self.n}, "
                f"K={self.k}, group {self.group}"
            )

    @property
    def groups(self) -> int:
        return self.k // self.group

    @property
    def name(self) -> str:
        m = "mdyn" if self.m is None else f"m{self.m}"
        b = ("_b" if self.bias else "") + ("_r" if self.residual else "")
        return f"qc_bf16_u4_n{self.n}_k{self.k}_g{self.group}{b}_{m}"

    def rows(self) -> Bf16Rows:
        return Bf16Rows(self.k, self.group, self.m)

    def weight_shape(self) -> tuple[int, int, int]:
        return (self.n // NBX, self.k // 2, 32)

    def group_shape(self) -> tuple[int, int, int]:
        return (self.n // NBX, self.groups, NBX)


# ---- kernels ------------------------------------------------------------------------------------


def _rne(bits: tvm.tirx.PrimExpr) -> tvm.tirx.PrimExpr:
    """The bfloat16 bits of the float32 bits ``bits`` (uint32): round to nearest even, any NaN → 0x7FC0."""
    nan = (bits & T.uint32(0x7FFFFFFF)) > T.uint32(0x7F800000)
    rounded = (bits + T.uint32(0x7FFF) + ((bits >> T.uint32(16)) & T.uint32(1))) >> T.uint32(16)
    return T.Cast("uint16", T.if_then_else(nan, T.uint32(0x7FC0), rounded))


def bf16_rows_primfunc(spec: Bf16Rows) -> tvm.tirx.PrimFunc:
    """``(X f32[M, K][, norm weight | up], XB uint16[M, K], XS f32[M, G])``: the bf16 bits of every
    activation (of the fused norm's or gate's output: torch's order, as the int8 quantizer computes
    them), and per row and group the fp32 sum of the rounded values in K order. Parallel over rows,
    the rounding vectorized."""
    k_, gs, ng = spec.k, spec.group, spec.groups
    m_ = tvm.tirx.Var("m", "int64") if spec.m is None else spec.m
    x = te.placeholder((m_, k_), "float32", name="X")
    ins = [x]
    if spec.norm:  # torch's RMSNorm order: (x · rsqrt(mean(x²) + eps)) · w
        w = te.placeholder((k_,), "float32", name="NW")
        ins.append(w)
        rk = te.reduce_axis((0, spec.valid or k_), "rk")
        ssq = te.compute((m_,), lambda i: te.sum(x[i, rk] * x[i, rk], axis=rk), name="SSQ")
        count, eps = tvm.tirx.const(float(spec.valid or k_), "float32"), tvm.tirx.const(spec.eps, "float32")
        rs = te.compute((m_,), lambda i: tvm.tirx.rsqrt(ssq[i] / count + eps), name="RS")
        x = te.compute((m_, k_), lambda i, k: ins[0][i, k] * rs[i] * w[k], name="XN")
    elif spec.silu_gate:  # TVM's own SiLU (x · sigmoid(x)), times the up projection
        u = te.placeholder((m_, k_), "float32", name="U")
        ins.append(u)
        x = te.compute((m_, k_), lambda i, k: ins[0][i, k] * tvm.tirx.sigmoid(ins[0][i, k]) * u[i, k], name="XN")
    xb = te.compute((m_, k_), lambda i, j: _rne(tvm.tirx.reinterpret("uint32", x[i, j])), name="XB")
    r = te.reduce_axis((0, gs), name="r")
    xs = te.compute(
        (m_, ng),
        lambda i, g: te.sum(
            tvm.tirx.reinterpret("float32", xb[i, g * gs + r].astype("uint32") << T.uint32(16)), axis=r
        ),
        name="XS",
    )
    sch = Schedule(te.create_prim_func([*ins, xb, xs]))
    if spec.norm or spec.silu_gate:
        sch.compute_inline(sch.get_sblock("XN"))
    if spec.norm:  # per row its sum of squares, then its 1/RMS, on the threads
        sch.compute_at(sch.get_sblock("SSQ"), sch.get_loops(sch.get_sblock("RS"))[0])
        sch.parallel(sch.get_loops(sch.get_sblock("RS"))[0])
    rows, cols = sch.get_loops(sch.get_sblock("XB"))
    sch.parallel(rows)
    _, inner = sch.split(cols, [None, LANES])
    sch.vectorize(inner)
    sch.parallel(sch.get_loops(sch.get_sblock("XS"))[0])
    return sch.mod["main"].with_attr("tir.is_scheduled", True)


def bf16_linear_primfunc(spec: Bf16Linear, knobs: X86Knobs | None = None) -> tvm.tirx.PrimFunc:
    """``(XB uint16[M, K], XS f32[M, G], W uint16[N/64, K/2, 32], S f32[N/64, G, 64], C f32[N/64, G, 64],
    [B f32[N]], [R f32[M, N]], Y f32[M, N])``, scheduled (``knobs.rows`` rows per register tile)."""
    knobs = knobs or X86Knobs(ROWS)
    knobs.check()
    vl, n_, k_, ng = LANES, spec.n, spec.k, spec.groups
    nblk, gp = spec.n // NBX, spec.group // 2
    rt, bias, residual = knobs.rows, spec.bias, spec.residual
    f32v, i32v, u16v = f"float32x{vl}", f"int32x{vl}", "uint16x32"
    wshape, gshape = spec.weight_shape(), spec.group_shape()
    m_ = tvm.tirx.Var("m", "int64") if spec.m is None else spec.m
    chunk = knobs.chunk if nblk < knobs.split_below else (tvm.tirx.max(m_, 1) if spec.m is None else max(spec.m, 1))

    @T.macro
    def dot_row(XB, acc, wv, r, row, kp):
        """Row ``row``'s inputs 2·kp, 2·kp + 1 (one int32 of bf16 bits) times the 4 weight vectors."""
        xw = T.meta_var(T.broadcast(T.reinterpret("int32", XB.vload([row, kp * 2], "uint16x2")), vl))
        for v in T.unroll(4):
            acc[r, v * vl : v * vl + vl] = T.call_pure_extern(
                f32v, _DOT, acc.vload([r, v * vl], f32v), wv.vload([v, 0], i32v), xw
            )

    @T.macro
    def rescale_row(XS, S, C, Y, acc, r, row, blk, g):
        """``Y[row] += acc[r]·sw + c·xs`` for group ``g``."""
        for v in T.unroll(4):
            Y[row, blk * NBX + v * vl : blk * NBX + v * vl + vl] = Y.vload([row, blk * NBX + v * vl], f32v) + (
                acc.vload([r, v * vl], f32v) * S.vload([blk, g, v * vl], f32v)
                + C.vload([blk, g, v * vl], f32v) * T.broadcast(XS[row, g], vl)
            )

    @T.macro
    def tile(XB, XS, W, S, C, Y, tab, blk, g, row0, nrows):
        acc0 = T.alloc_buffer((HALF, NBX), "float32", scope="global", annotations=STACK)
        acc1 = T.alloc_buffer((HALF, NBX), "float32", scope="global", annotations=STACK)
        wv = T.alloc_buffer((4, vl), "int32", scope="global", annotations=STACK)
        for r in T.unroll(HALF):
            for v in T.unroll(4):
                acc0[r, v * vl : v * vl + vl] = T.broadcast(T.float32(0), vl)
                acc1[r, v * vl : v * vl + vl] = T.broadcast(T.float32(0), vl)
        for kk in range(gp):
            words = T.meta_var(W.vload([blk, g * gp + kk, 0], u16v))
            for v in T.unroll(4):  # nibble v of every word: a shift, then the table (low 5 bits index it)
                wv[v, 0:vl] = T.reinterpret(
                    i32v,
                    T.call_llvm_pure_intrin(
                        u16v,
                        "llvm.x86.avx512.permvar.hi.512",
                        tab.vload([0], u16v),
                        words >> T.broadcast(T.Cast("uint16", 4 * v), 32),
                    ),
                )
            for r in T.unroll(min(nrows, HALF)):
                dot_row(XB, acc0, wv, r, row0 + r, g * gp + kk)
            for r in T.unroll(max(nrows - HALF, 0)):
                dot_row(XB, acc1, wv, r, row0 + HALF + r, g * gp + kk)
        for r in T.unroll(min(nrows, HALF)):
            rescale_row(XS, S, C, Y, acc0, r, row0 + r, blk, g)
        for r in T.unroll(max(nrows - HALF, 0)):
            rescale_row(XS, S, C, Y, acc1, r, row0 + HALF + r, blk, g)

    finished = epilogue(f32v, bias, residual)

    @T.prim_func
    def main(
        xb: T.handle, xs: T.handle, w: T.handle, s: T.handle, c: T.handle, b: T.handle, res: T.handle, y: T.handle
    ):
        T.func_attr({"tir.noalias": True})
        XB = T.match_buffer(xb, (m_, k_), "uint16")
        XS = T.match_buffer(xs, (m_, ng), "float32")
        W = T.match_buffer(w, wshape, "uint16")
        S = T.match_buffer(s, gshape, "float32")
        C = T.match_buffer(c, gshape, "float32")
        B = T.match_buffer(b, (n_,), "float32")
        R = T.match_buffer(res, (m_, n_), "float32")
        Y = T.match_buffer(y, (m_, n_), "float32")
        for task in T.parallel(nblk * ((m_ + chunk - 1) // chunk)):
            with T.attr(0, "pragma_import_llvm", _DOT_LL):  # inside the loop: the body stays a loop nest
                blk = T.meta_var(task % nblk)
                r0 = T.meta_var(task // nblk * chunk)
                nr = T.meta_var(T.min(m_ - r0, chunk))
                tab = T.alloc_buffer((32,), "uint16", scope="global", annotations=STACK)
                for i in T.unroll(32):  # bf16(i % 16): the top half of the float's bits (exact)
                    tab[i] = T.Cast("uint16", T.reinterpret("uint32", T.Cast("float32", i % 16)) >> T.uint32(16))
                for row in range(nr):
                    for v in T.unroll(4):
                        Y[r0 + row, blk * NBX + v * vl : blk * NBX + v * vl + vl] = T.broadcast(T.float32(0), vl)
                for g in range(ng):
                    for t in range(nr // rt):
                        tile(XB, XS, W, S, C, Y, tab, blk, g, r0 + t * rt, rt)
                    if rt > HALF:
                        for _t in range(nr % rt // HALF):
                            tile(XB, XS, W, S, C, Y, tab, blk, g, r0 + (nr // rt) * rt, HALF)
                        for t in range(nr % rt % HALF):
                            rest = T.meta_var(r0 + (nr // rt) * rt + nr % rt // HALF * HALF)
                            tile(XB, XS, W, S, C, Y, tab, blk, g, rest + t, 1)
                    else:
                        for t in range(nr % rt):
                            tile(XB, XS, W, S, C, Y, tab, blk, g, r0 + (nr // rt) * rt + t, 1)
                if bias or residual:
                    for row in range(nr):
                        for v in T.unroll(4):
                            Y[r0 + row, blk * NBX + v * vl : blk * NBX + v * vl + vl] = finished(
                                Y, B, R, r0 + row, blk * NBX + v * vl
                            )

    keep = {"b": bias, "r": residual}
    names = ["xb", "xs", "w", "s", "c", "b", "r", "y"]
    params = [p for p, nm in zip(main.params, names) if keep.get(nm, True)]
    out = tvm.tirx.PrimFunc(params, main.body, main.ret_type, main.attrs)
    return out.with_attr("tir.is_scheduled", True)


# ---- repacking and references (torch) -------------------------------------------------------------


def pack_weight(spec: Bf16Linear, u: torch.Tensor) -> torch.Tensor:
    """``W[N/64, K/2, 32]`` uint16 from the unsigned codes ``u[N, K]`` (0…15; padded with 0)."""
    c = pad2d(u.to(torch.int32), spec.n, spec.k)
    if int(c.min()) < 0 or int(c.max()) > 15:
        raise ValueError(f"u4 codes must lie in [0, 15], got [{int(c.min())}, {int(c.max())}]")
    nb = spec.n // NBX
    # [nb, 4 (nibble j), 16 (lane), K/2, 2] -> [nb, K/2, 16, 2, 4]: word (lane, t) holds nibbles j
    t = c.reshape(nb, 4, LANES, spec.k // 2, 2).permute(0, 3, 2, 4, 1)
    words = t[..., 0] | (t[..., 1] << 4) | (t[..., 2] << 8) | (t[..., 3] << 12)
    return words.reshape(nb, spec.k // 2, 32).to(torch.int32).to(torch.uint16).contiguous()


def pack_groups(spec: Bf16Linear, t: torch.Tensor) -> torch.Tensor:
    """Per-(output, group) values ``[N, G]`` → ``[N/64, G, 64]`` (padding 0)."""
    p = pad2d(t.to(torch.float32), spec.n, spec.groups)
    return p.reshape(spec.n // NBX, NBX, spec.groups).transpose(1, 2).contiguous()


def reference(
    spec: Bf16Linear,
    x: torch.Tensor,
    u: torch.Tensor,
    scale: torch.Tensor,
    cterm: torch.Tensor,
    bias: torch.Tensor | None = None,
    res: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kernel's result in float64 from the bf16-rounded activations (padded ``x[M, K]``, ``u[N, K]``,
    ``scale``/``cterm`` ``[N, G]``): what the fp32 kernel approximates to fp32 summation error."""
    xb = x.to(torch.bfloat16).double()
    m, g = xb.shape[0], spec.groups
    xg = xb.reshape(m, g, spec.group)
    ug = pad2d(u.to(torch.int32), spec.n, spec.k).double().reshape(spec.n, g, spec.group)
    sums = torch.einsum("mgk,ngk->mng", xg, ug)
    y = (sums * pad2d(scale.double(), spec.n, g)).sum(-1) + xg.sum(-1) @ pad2d(cterm.double(), spec.n, g).T
    if bias is not None:
        y = y + bias.double()
    return y + res.double() if res is not None else y
