"""Linear-layer kernels for the CPU (TE compute + s_tir schedules), one template for every format.

``y[m, n] = Σ_g scale(m, n, g) · Σ_{k in group g} a(m, k) · b(n, k)  (+ offset term) (+ bias[n])``

Weight formats (the backend repacks the Program's tensors into these at build time; N is padded to
a multiple of the block ``NB``, K to a multiple of the group, with zero weights):

* ``f32``  — ``W[N/NB, K, NB]`` float32 (plain fp32 linear, one group);
* ``i8``   — ``W[N/NB, K, NB]`` int8 codes (W8 per channel);
* ``u4``   — ``W[N/NB, K, NB/2]`` uint8, byte j = lane j (low nibble) | lane j + NB/2 (high nibble),
  unsigned codes ``u = code + zero`` (W4: symmetric codes are stored ``+8``);
* ``i4``   — the ``u4`` array of ``u = code + 8``, decoded as the signed code ``u - 8`` (-8…7): W4
  with integer activations (the generic path of W4A8). ``u4`` with integer activations is the
  asymmetric W4A8 (Q4_1 × Q8_1): the unsigned codes times the int8 activation codes, plus the offset term;
* ``i6``   — the same nibble array for the low 4 bits of ``u = code + 32`` plus ``H[N/NB, K, NB/4]``
  holding the top 2 bits of lanes j, j+NB/4, j+2·NB/4, j+3·NB/4 (exactly 6 bits per weight);
* ``u2``   — ``W[N/NB, K, NB/4]`` uint8, byte j = the 2-bit ``u = code + zero`` of lanes j, j+NB/4,
  j+2·NB/4, j+3·NB/4 (bits 0–1, 2–3, 4–5, 6–7; W2: symmetric codes are stored ``+2``);
* ``u3``   — the ``u2`` array for the low 2 bits of ``u = code + zero`` plus ``P[N/NB, ⌈K/8⌉, NB]``,
  a bit plane along K: bit ``k % 8`` of byte ``(k // 8, lane)`` is bit 2 of ``u[lane, k]`` (exactly
  3 bits per weight; W3: symmetric codes are stored ``+4``). Along K rather than across lanes so that
  a vector of 16 lanes reads 16 consecutive bytes of both arrays with one shift each (a plane across
  lanes — 8 lanes per byte — gives 8-lane vectors and twice the decode work per weight).

Lane-blocked layouts make every weight load a contiguous vector across NB output channels, so the
inner loop is load → unpack (shift/mask, uniform per vector) → multiply-accumulate into NB
register lanes, with no horizontal reductions; blocks of NB outputs are split across threads.

Activations: fp32 (``act_bits == 0``; weight-only formats rescale per group and add the
zero-point/offset term ``c[n, g]·Σ_k x``), or int8 codes with fp32 scales per token or per token
group (``act_bits > 0``) from :func:`quant_rows_primfunc`, multiplied exactly in int32 per group.
With integer activations a zero-point/offset term (asymmetric weights, ``u4``/``u2``/``u3``) is
``c[n, g]·XS[m, g]``, where ``XS = sx·Σ_{k in g} qx`` (llama.cpp Q8_1's ``s``) comes from the same
activation quantization kernel (:attr:`QuantRows.sums`): per group
``y += acc·sx·sw + c·XS`` (``acc`` the exact int32 sum of ``qx·u``), the order the x86 kernels use too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule

NB = 64  # output channels per block (lanes): 8 AVX2 / 4 AVX-512 float registers

WFMTS = ("f32", "i8", "u4", "i6", "u2", "u3", "i4")
UNSIGNED = ("u4", "u2", "u3")  # formats storing ``code + zero`` (weight-only: fp32 activations)


@dataclass(frozen=True)
class LinearKernel:
    """One kernel instance: a weight of N×K (padded sizes) in ``wfmt`` with groups of ``group``."""

    n: int  # padded to a multiple of NB
    k: int  # padded to a multiple of group
    wfmt: str
    group: int  # == k for one scale per output channel
    act_bits: int  # 0: fp32 activations
    act_group: int  # 0: one activation scale per token; else == group
    zero_term: bool  # weight-only: add c[n, g]·Σx (zero point / float offset)
    bias: bool
    m: int | None  # None: dynamic number of rows
    residual: bool = False  # add ``R[M, N]`` after the bias (a residual connection fused into the epilogue)

    def __post_init__(self) -> None:
        if self.wfmt not in WFMTS:
            raise ValueError(f"unknown weight format {self.wfmt!r}; formats: {WFMTS}")
        if self.group < 4:
            raise ValueError(f"groups of {self.group} input channels have no kernel (at least 4)")
        if self.n % NB or self.k % self.group:
            raise ValueError(f"kernel sizes must be padded: N={self.n} (block {NB}), K={self.k} (group {self.group})")
        if self.act_bits and self.wfmt == "f32":
            raise ValueError("f32 weights take fp32 activations")
        if self.act_bits and self.wfmt in UNSIGNED and not self.zero_term:
            raise ValueError(
                f"{self.wfmt} weights take fp32 activations, or integer ones with the zero/offset term (asymmetric)"
            )

    @property
    def groups(self) -> int:
        return self.k // self.group

    def quant_rows(self) -> QuantRows:
        """The activation quantization kernel this kernel reads (integer activations only): with a
        zero term it also writes ``sx·Σqx`` per row and weight group."""
        return QuantRows(self.k, self.act_bits, self.act_group, self.m, sums=self.group if self.zero_term else 0)

    @property
    def name(self) -> str:
        act = f"a{self.act_bits}{'g' if self.act_group else 't'}" if self.act_bits else "af32"
        m = "mdyn" if self.m is None else f"m{self.m}"
        z = "_z" if self.zero_term else ""
        b = ("_b" if self.bias else "") + ("_r" if self.residual else "")
        return f"qc_linear_{self.wfmt}_{act}_n{self.n}_k{self.k}_g{self.group}{z}{b}_{m}"

    def weight_shapes(self) -> list[tuple[tuple[int, ...], str]]:
        nb = self.n // NB
        return {
            "f32": [((nb, self.k, NB), "float32")],
            "i8": [((nb, self.k, NB), "int8")],
            "u4": [((nb, self.k, NB // 2), "uint8")],
            "i4": [((nb, self.k, NB // 2), "uint8")],
            "i6": [((nb, self.k, NB // 2), "uint8"), ((nb, self.k, NB // 4), "uint8")],
            "u2": [((nb, self.k, NB // 4), "uint8")],
            "u3": [((nb, self.k, NB // 4), "uint8"), ((nb, -(-self.k // 8), NB), "uint8")],
        }[self.wfmt]


def _rows(m: int | None) -> tvm.tirx.PrimExpr | int:
    return te.var("m", "int64") if m is None else m


def _decode(spec: LinearKernel, ws: list[te.Tensor], n: tirx.PrimExpr, k: tirx.PrimExpr) -> tirx.PrimExpr:
    """The weight of output ``n``, input ``k`` as an integer (unsigned for u4/u2/u3, signed otherwise)."""
    blk, lane = n // NB, n % NB
    if spec.wfmt in ("f32", "i8"):
        return ws[0][blk, k, lane]
    half, quarter = NB // 2, NB // 4
    if spec.wfmt in ("u2", "u3"):
        lo2 = (ws[0][blk, k, lane % quarter] >> (lane // quarter * 2).astype("uint8")) & tirx.const(3, "uint8")
        if spec.wfmt == "u2":
            return lo2.astype("int32")
        b2 = (ws[1][blk, k // 8, lane] >> (k % 8).astype("uint8")) & tirx.const(1, "uint8")
        return lo2.astype("int32") + b2.astype("int32") * 4
    lo = (ws[0][blk, k, lane % half] >> (lane // half * 4).astype("uint8")) & tirx.const(15, "uint8")
    if spec.wfmt == "u4":
        return lo.astype("int32")
    if spec.wfmt == "i4":
        return lo.astype("int32") - 8
    hi = (ws[1][blk, k, lane % quarter] >> (lane // quarter * 2).astype("uint8")) & tirx.const(3, "uint8")
    return lo.astype("int32") + hi.astype("int32") * 16 - 32


def _pads_rows(spec: LinearKernel, knobs: TemplateKnobs) -> bool:
    """Whether the schedule computes whole row tiles past the real rows (see :func:`linear_primfunc`)."""
    return knobs.rows > 1 and (spec.m is None or spec.m % knobs.rows != 0)


def linear_primfunc(spec: LinearKernel, schedule: bool = True, knobs: TemplateKnobs | None = None) -> tvm.tirx.PrimFunc:
    """The PrimFunc of ``spec``, scheduled for the CPU with ``knobs`` (None: :meth:`TemplateKnobs.default`;
    ``schedule=False``: the plain compute, which the CUDA pipeline schedules with dlight as the
    generic fallback and the autotuner's design space schedules); output last."""
    knobs = knobs or TemplateKnobs.default(spec)
    m = _rows(spec.m)
    # a row tile that does not divide the rows (always so for a dynamic count) would put a bounds
    # predicate on every multiply-add: compute whole tiles instead, reading the last row again for
    # the padding rows, and write only the real rows
    pad = schedule and _pads_rows(spec, knobs)
    mp = (m + knobs.rows - 1) // knobs.rows * knobs.rows if pad else m

    def row(i: tirx.PrimExpr) -> tirx.PrimExpr:
        return te.min(i, m - 1) if pad else i

    n_, k_, g_, gs = spec.n, spec.k, spec.groups, spec.group
    nblk = n_ // NB
    ws = [te.placeholder(shape, dt, name=f"W{i}") for i, (shape, dt) in enumerate(spec.weight_shapes())]
    args: list[te.Tensor] = []
    xsum = None
    if spec.act_bits:
        x = te.placeholder((m, k_), "int8", name="QX")
        sx = te.placeholder((m, g_ if spec.act_group else 1), "float32", name="SX")
        args += [x, sx]
        if spec.zero_term:  # sx·Σqx per row and group, from the quantization kernel (QuantRows.sums)
            xsum = te.placeholder((m, g_), "float32", name="XSUM")
            args.append(xsum)
    else:
        x = te.placeholder((m, k_), "float32", name="X")
        args.append(x)
    args += ws
    s = c = b = None
    if spec.wfmt != "f32":
        s = te.placeholder((nblk, g_, NB), "float32", name="S")
        args.append(s)
    if spec.zero_term:
        c = te.placeholder((nblk, g_, NB), "float32", name="C")
        args.append(c)
    if spec.bias:
        b = te.placeholder((n_,), "float32", name="B")
        args.append(b)
    res = None
    if spec.residual:
        res = te.placeholder((m, n_), "float32", name="R")
        args.append(res)

    if spec.wfmt == "f32":
        kk = te.reduce_axis((0, k_), "k")
        y = te.compute((mp, n_), lambda i, j: te.sum(x[row(i), kk] * _decode(spec, ws, j, kk), axis=kk), name="Y")
        acc = xs = None
    else:
        kk = te.reduce_axis((0, gs), "kk")
        if schedule and knobs.staged:  # decoded once per group into a scratch tile every row of a tile reads
            wd = te.compute(  # lane-blocked like the weights, so that a vector of lanes is contiguous
                (nblk, k_, NB),
                lambda b, k, lane: _decode(spec, ws, b * NB + lane, k).astype("int8" if spec.act_bits else "float32"),
                name="WD",
            )
            wval = lambda j, k: wd[j // NB, k, j % NB].astype("int32") if spec.act_bits else wd[j // NB, k, j % NB]  # noqa: E731
        else:
            wval = lambda j, k: _decode(spec, ws, j, k)  # noqa: E731
        if spec.act_bits:
            acc = te.compute(
                (mp, n_, g_),
                lambda i, j, g: te.sum(x[row(i), g * gs + kk].astype("int32") * wval(j, g * gs + kk), axis=kk),
                name="ACC",
            )
        else:
            acc = te.compute(
                (mp, n_, g_),
                lambda i, j, g: te.sum(x[row(i), g * gs + kk] * wval(j, g * gs + kk).astype("float32"), axis=kk),
                name="ACC",
            )
        xs = None
        if spec.zero_term and not spec.act_bits:
            k2 = te.reduce_axis((0, gs), "k2")
            xs = te.compute((m, g_), lambda i, g: te.sum(x[i, g * gs + k2], axis=k2), name="XS")
        gg = te.reduce_axis((0, g_), "g")

        def term(i: tirx.PrimExpr, j: tirx.PrimExpr) -> tirx.PrimExpr:
            sw = s[j // NB, gg, j % NB]
            if spec.act_bits:
                sa = sx[row(i), gg] if spec.act_group else sx[row(i), 0]
                t = acc[i, j, gg].astype("float32") * sa * sw
                return t + c[j // NB, gg, j % NB] * xsum[row(i), gg] if spec.zero_term else t
            t = acc[i, j, gg] * sw
            return t + c[j // NB, gg, j % NB] * xs[row(i), gg] if spec.zero_term else t

        y = te.compute((mp, n_), lambda i, j: te.sum(term(i, j), axis=gg), name="Y")
    out = y
    if spec.bias or pad or spec.residual:  # an epilogue that writes the real rows (plus the bias, the residual)

        def epilogue(i: tirx.PrimExpr, j: tirx.PrimExpr) -> tirx.PrimExpr:
            v = y[i, j] + b[j] if b is not None else y[i, j]
            return v + res[i, j] if res is not None else v  # torch's (x·Wᵀ + b) + r

        out = te.compute((m, n_), epilogue, name="YB")
    func = te.create_prim_func(args + [out])
    if not schedule:
        return func
    sch = Schedule(func)
    schedule_template(spec, sch, knobs)
    return sch.mod["main"].with_attr("tir.is_scheduled", True)


@dataclass(frozen=True)
class TemplateKnobs:
    """The template's schedule knobs (the autotuner's design space, :mod:`qcompile.tuning.space`).

    ``rows``: output rows per register tile (1 = no row tiling); ``k_unroll``: steps of K unrolled
    inside a group; ``vec``: output lanes per vector instruction (a divisor of the lanes that share
    one shift per byte array); ``staged``: each group's weights of a block decoded once into a
    scratch tile that every row of the tile reads (without it each row decodes them again)."""

    rows: int = 1
    k_unroll: int = 4
    vec: int = NB // 2
    staged: bool = False  # decode a group's weights once into an L1 tile (fp32 / int8) instead of per row

    @staticmethod
    def default(spec: LinearKernel) -> TemplateKnobs:
        """The hand-picked schedule (the untuned default and the tuner's first candidate)."""
        # u3's plane shift is k % 8: unrolling 8 steps of K makes it a constant
        k_unroll = 8 if spec.wfmt == "u3" and spec.group % 8 == 0 else 4
        # 4-row tiles (padded for a dynamic count) won at every M >= 8 the tuner measured on Zen 4
        rows = 4 if spec.m is None or spec.m >= 4 else 1
        return TemplateKnobs(rows, k_unroll, max_vec(spec))

    def check(self, spec: LinearKernel) -> None:
        if self.rows < 1 or self.k_unroll < 1 or self.vec < 1:
            raise ValueError(f"knobs must be positive: {self}")
        if self.staged and spec.wfmt == "f32":
            raise ValueError("f32 weights have nothing to decode (staged)")
        if max_vec(spec) % self.vec:
            raise ValueError(f"vec {self.vec} must divide {max_vec(spec)} for {spec.wfmt}")
        if spec.m is not None and self.rows > max(spec.m, 1):
            raise ValueError(f"a tile of {self.rows} rows for a kernel of {spec.m}")


def max_vec(spec: LinearKernel) -> int:
    """The widest vector of lanes that read consecutive bytes with one shift per weight array."""
    return {"i6": NB // 4, "u2": NB // 4, "u3": NB // 4, "f32": NB}.get(spec.wfmt, NB // 2)


def schedule_template(spec: LinearKernel, sch: Schedule, knobs: TemplateKnobs) -> None:
    """Schedule the plain compute of ``spec`` in ``sch`` (its ``main``) with ``knobs``: parallel over
    blocks of NB outputs; per block, tiles of ``knobs.rows`` rows accumulate in registers over the
    groups; per group, the integer (or fp32) sums over K in registers, NB lanes wide."""
    knobs.check(spec)
    y = sch.get_sblock("Y")
    i, j, r = sch.get_loops(y)
    jo, ji = sch.split(j, [None, NB])
    if knobs.rows > 1:
        io, ii = sch.split(i, [None, knobs.rows])
        sch.reorder(jo, io, r, ii, ji)
        outer = io
    else:
        sch.reorder(jo, i, r, ji)
        ii, outer = None, i
    if spec.bias or spec.residual or _pads_rows(spec, knobs):  # the epilogue writes the output from the register tile
        yl = sch.get_sblock("YB")
        sch.set_scope(y, 0, "local")
    else:
        yl = sch.cache_write(y, 0, "local")
    sch.reverse_compute_at(yl, outer)
    sch.vectorize(sch.get_loops(yl)[-1])
    if spec.wfmt == "f32":
        ro, ri = sch.split(r, [None, knobs.k_unroll])
        if ii is not None:
            sch.reorder(ri, ii)
            sch.unroll(ii)
        sch.unroll(ri)
        if knobs.vec < NB:
            vo, ji = sch.split(ji, [None, knobs.vec])
            sch.unroll(vo)
        sch.vectorize(ji)
        sch.parallel(jo)
        init = sch.decompose_reduction(y, ro)
        sch.vectorize(sch.get_loops(init)[-1])
        return
    acc = sch.get_sblock("ACC")
    sch.compute_at(acc, r)
    sch.set_scope(acc, 0, "local")
    loops = sch.get_loops(acc)
    aj, ak = loops[-2:]  # under r: the 64 lanes and the group's K (unit loops dropped)
    ako, aki = sch.split(ak, [None, knobs.k_unroll])
    if ii is not None:  # the tile's rows between K and the lanes: one decoded weight vector, every row
        ai = loops[-3]
        sch.reorder(ako, aki, ai, aj)
        sch.unroll(ai)
    else:
        sch.reorder(ako, aki, aj)
    # the innermost vector spans lanes that read consecutive bytes with one shift per array
    full_i6 = spec.wfmt == "i6" and knobs.vec == max_vec(spec)
    inner = [None, 2, NB // 4] if full_i6 else [None, knobs.vec]
    parts = sch.split(aj, inner)
    for p in parts[:-1]:
        sch.unroll(p)
    sch.vectorize(parts[-1])
    sch.unroll(aki)
    if knobs.staged:
        wd = sch.get_sblock("WD")
        sch.compute_at(wd, r)
        sch.set_scope(wd, 0, "local")
        wo, wi = sch.split(sch.get_loops(wd)[-1], [None, max_vec(spec)])
        sch.unroll(wo)
        sch.vectorize(wi)
    if spec.zero_term and not spec.act_bits:
        xs = sch.get_sblock("XS")
        xi, xg, _ = sch.get_loops(xs)
        if spec.m is None:
            sch.parallel(sch.fuse(xi, xg))
    sch.vectorize(ji)
    sch.parallel(jo)
    ainit = sch.decompose_reduction(acc, ako)
    sch.vectorize(sch.get_loops(ainit)[-1])
    yinit = sch.decompose_reduction(y, r)
    sch.vectorize(sch.get_loops(yinit)[-1])


# ---- activation quantization ----------------------------------------------------------------


def check_producer(k: int, norm: bool, valid: int, silu_gate: bool) -> None:
    """ValueError unless the fused-producer fields of an activation kernel of ``k`` columns agree."""
    if not 0 <= valid <= k or (valid and not norm):
        raise ValueError(f"valid={valid} needs a fused norm and at most K={k}")
    if norm and silu_gate:
        raise ValueError("an activation kernel fuses one producer: the norm or the SiLU gate, not both")


def producer_suffix(norm: bool, eps: float, valid: int, silu_gate: bool) -> str:
    """The kernel-name suffix of a fused producer: ``_rms<eps>[v<valid>]`` or ``_silu``."""
    n = ""
    if norm:
        n = "_rms" + f"{eps:.3g}".replace(".", "p").replace("-", "m").replace("+", "")
        n += f"v{valid}" if valid else ""
    return n + ("_silu" if silu_gate else "")


@dataclass(frozen=True)
class QuantRows:
    """Dynamic symmetric ``bits``-bit quantization of ``x[M, K]`` per row or per group of K."""

    k: int
    bits: int
    group: int  # 0: one scale per row
    m: int | None
    flip: bool = False  # codes with the top bit flipped: the bytes of uint8 ``code + 128`` (x86 vpdpbusd)
    sums: int = 0  # > 0: also write ``sx·Σ code`` per row and block of ``sums`` inputs (Q8_1's ``s``)
    # RMSNorm fused in front: quantize ``(x · rsqrt(Σx²/valid + eps)) · w`` (a second input ``w[K]``);
    # ``valid``: the unpadded K the mean divides by (0: all of ``k``)
    norm: bool = False
    eps: float = 0.0
    valid: int = 0
    silu_gate: bool = False  # quantize ``silu(x) · u`` (a second input ``u[M, K]``): a SwiGLU's product

    def __post_init__(self) -> None:
        if self.sums and (self.k % self.sums or (self.group and self.sums != self.group)):
            raise ValueError(
                f"activation sums over blocks of {self.sums} need K={self.k} a multiple and the scale group "
                f"{self.group} equal (or per-row scales)"
            )
        check_producer(self.k, self.norm, self.valid, self.silu_gate)

    @property
    def name(self) -> str:
        u = "_u" if self.flip else ""
        s = f"_s{self.sums}" if self.sums else ""
        n = producer_suffix(self.norm, self.eps, self.valid, self.silu_gate)
        return (
            f"qc_quant_rows_k{self.k}_b{self.bits}_g{self.group}{u}{s}{n}_{'mdyn' if self.m is None else f'm{self.m}'}"
        )

    @property
    def groups(self) -> int:
        return self.k // self.group if self.group else 1

    @property
    def sum_blocks(self) -> int:
        """Blocks of :attr:`sums` inputs per row (0 without sums)."""
        return self.k // self.sums if self.sums else 0


@dataclass(frozen=True)
class QuantKnobs:
    """The activation quantization's schedule knobs (its autotuning design space): ``vec`` inputs
    per vector instruction; ``parallel``: rows split across threads; ``fused``: each row's absmax
    and scales computed inside the row loop, just before its codes (one pass while the row is in
    cache; with ``parallel``, the absmax runs on the threads too)."""

    vec: int = 16
    parallel: bool = False
    fused: bool = False

    @staticmethod
    def default(spec: QuantRows) -> QuantKnobs:
        """The hand-picked schedule: rows in parallel when their count is dynamic (prefill)."""
        return QuantKnobs(16, spec.m is None, False)


def quant_rows_primfunc(spec: QuantRows, schedule: bool = True, knobs: QuantKnobs | None = None) -> tvm.tirx.PrimFunc:
    """``(x[, norm weight | up]) -> (codes int8[M, K], scales f32[M, G][, sums f32[M, K/sums]])``: the same float
    operations as ``qcompile.quant.quantizer`` (scale = absmax / qmax, 1 for an all-zero group;
    codes = clamp(round-half-even(x / scale))), so the codes match the reference exactly (``flip``:
    with their top bit flipped, i.e. the bytes of ``code + 128`` as uint8). With ``spec.sums``, also
    ``fl32(Σ code)·scale`` per block of ``sums`` inputs (the integer sum is exact, at most
    127·sums < 2^24, so this is the reference op's ``qsum.float() * sx`` bit for bit). Scheduled with
    ``knobs`` (None: :meth:`QuantKnobs.default`)."""
    m = _rows(spec.m)
    qmax = float(2 ** (spec.bits - 1) - 1)
    gs = spec.group or spec.k
    x = te.placeholder((m, spec.k), "float32", name="X")
    ins = [x]
    if spec.norm:  # torch's RMSNorm order: (x · rsqrt(mean(x²) + eps)) · w
        w = te.placeholder((spec.k,), "float32", name="NW")
        ins.append(w)
        rk = te.reduce_axis((0, spec.valid or spec.k), "rk")
        ssq = te.compute((m,), lambda i: te.sum(x[i, rk] * x[i, rk], axis=rk), name="SSQ")
        count, eps = tirx.const(float(spec.valid or spec.k), "float32"), tirx.const(spec.eps, "float32")
        rs = te.compute((m,), lambda i: tirx.rsqrt(ssq[i] / count + eps), name="RS")
        x = te.compute((m, spec.k), lambda i, k: x[i, k] * rs[i] * w[k], name="XN")
    elif spec.silu_gate:  # TVM's own SiLU (x · sigmoid(x)), times the up projection
        u = te.placeholder((m, spec.k), "float32", name="U")
        ins.append(u)
        x = te.compute((m, spec.k), lambda i, k: x[i, k] * tirx.sigmoid(x[i, k]) * u[i, k], name="XN")
    r = te.reduce_axis((0, gs), "r")
    amax = te.compute((m, spec.groups), lambda i, g: te.max(te.abs(x[i, g * gs + r]), axis=r), name="AMAX")
    sc = te.compute(
        (m, spec.groups),
        lambda i, g: tirx.Select(amax[i, g] > 0, amax[i, g] / tirx.const(qmax, "float32"), tirx.const(1.0, "float32")),
        name="SCALE",
    )

    def code(i: tirx.PrimExpr, k: tirx.PrimExpr) -> tirx.PrimExpr:
        c = tirx.max(tirx.min(tirx.nearbyint(x[i, k] / sc[i, k // gs]), qmax), -qmax).astype("int8")
        return tirx.bitwise_xor(c, tirx.const(-128, "int8")) if spec.flip else c

    q = te.compute((m, spec.k), code, name="Q")
    outs = [q, sc]
    if spec.sums:
        bs = spec.sums
        rs = te.reduce_axis((0, bs), "rs")

        def plain(i: tirx.PrimExpr, k: tirx.PrimExpr) -> tirx.PrimExpr:
            c = q[i, k]
            return (tirx.bitwise_xor(c, tirx.const(-128, "int8")) if spec.flip else c).astype("int32")

        isum = te.compute((m, spec.sum_blocks), lambda i, j: te.sum(plain(i, j * bs + rs), axis=rs), name="QSUM")
        outs.append(
            te.compute(
                (m, spec.sum_blocks),
                lambda i, j: isum[i, j].astype("float32") * sc[i, j if spec.group else 0],
                name="XSUM",
            )
        )
    func = te.create_prim_func([*ins, *outs])
    if not schedule:
        return func
    knobs = knobs or QuantKnobs.default(spec)
    sch = Schedule(func)
    q = sch.get_sblock("Q")
    if spec.norm or spec.silu_gate:  # the fused value is recomputed where the absmax and the codes read it
        sch.compute_inline(sch.get_sblock("XN"))
    if spec.norm:  # per row its sum of squares, then its 1/RMS
        sch.compute_at(sch.get_sblock("SSQ"), sch.get_loops(sch.get_sblock("RS"))[0])
    if knobs.fused and spec.norm:  # per row (of the 1/RMS): its norm, absmax, scales, then its codes
        row = sch.get_loops(sch.get_sblock("RS"))[0]
        for name in ("AMAX", "SCALE"):
            sch.reverse_compute_at(sch.get_sblock(name), row)
        sch.reverse_compute_at(q, row)
    elif knobs.fused:  # per row of the scales: its absmax, its scales, then its codes
        row = sch.get_loops(sch.get_sblock("SCALE"))[0]
        sch.compute_at(sch.get_sblock("AMAX"), row)
        sch.reverse_compute_at(q, row)
    elif spec.norm and knobs.parallel:  # the rows' norms on the threads too
        sch.parallel(sch.get_loops(sch.get_sblock("RS"))[0])
    loops = sch.get_loops(q)
    qi, qk = loops[0], loops[-1]
    if spec.sums:  # the sums read the row's codes just written: per row after them (fused) or their own nest
        xsum, qsum = sch.get_sblock("XSUM"), sch.get_sblock("QSUM")
        if knobs.fused:
            sch.reverse_compute_at(qsum, loops[0])
            sch.reverse_compute_at(xsum, loops[0])
        sch.compute_at(qsum, sch.get_loops(xsum)[-1])
        if knobs.parallel and not knobs.fused:
            sch.parallel(sch.get_loops(xsum)[0])
    ko, ki = sch.split(qk, [None, knobs.vec])
    sch.vectorize(ki)
    if knobs.parallel:
        sch.parallel(qi)
    return sch.mod["main"].with_attr("tir.is_scheduled", True)


# ---- weight repacking (torch, at build / load time) -----------------------------------------


def pad2d(t: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """``t[N0, K0]`` zero-padded at the end to ``[n, k]``."""
    return torch.nn.functional.pad(t, (0, k - t.shape[1], 0, n - t.shape[0]))


def _lanes(t: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` → ``[N/NB, K, NB]``."""
    n, k = t.shape
    return t.view(n // NB, NB, k).transpose(1, 2).contiguous()


def pack_weight(spec: LinearKernel, w: torch.Tensor, zero: int = 0) -> list[torch.Tensor]:
    """The kernel's weight tensors from ``w[N, K]`` (float for f32, integer codes otherwise;
    u4/u2/u3 store ``code + zero``; i6 stores ``code + 32``; i4 ``code + 8``)."""
    if spec.wfmt == "f32":
        return [_lanes(pad2d(w.to(torch.float32), spec.n, spec.k))]
    codes = w.to(torch.int32)
    if spec.wfmt == "i8":
        return [_lanes(pad2d(codes, spec.n, spec.k)).to(torch.int8)]
    u = codes + (zero if spec.wfmt in UNSIGNED else {"i4": 8}.get(spec.wfmt, 32))
    width = {"u2": 2, "u3": 3, "u4": 4, "i4": 4}.get(spec.wfmt, 6)
    if int(u.min()) < 0 or int(u.max()) >= 2**width:
        raise ValueError(f"{spec.wfmt} stores {width}-bit codes + zero, got values in [{int(u.min())}, {int(u.max())}]")
    # padded lanes hold u = 0; their scales are 0, so they contribute nothing
    u = _lanes(pad2d(u, spec.n, spec.k))
    half, quarter = NB // 2, NB // 4
    if spec.wfmt in ("u2", "u3"):
        lo2 = u & 3
        crumbs = lo2[..., :quarter]
        for i in range(1, 4):
            crumbs = crumbs | (lo2[..., i * quarter : (i + 1) * quarter] << (2 * i))
        out = [crumbs.to(torch.uint8).contiguous()]
        if spec.wfmt == "u3":  # [nb, K, NB] -> [nb, ceil(K/8), 8, NB]: bit i of a byte from K row 8·j + i
            b2 = (u >> 2) & 1
            b2 = torch.nn.functional.pad(b2, (0, 0, 0, -spec.k % 8)).view(b2.shape[0], -1, 8, NB)
            plane = (b2 << torch.arange(8, dtype=b2.dtype).view(1, 1, 8, 1)).sum(2)
            out.append(plane.to(torch.uint8).contiguous())
        return out
    lo = u & 15
    nib = (lo[..., :half] | (lo[..., half:] << 4)).to(torch.uint8)
    if spec.wfmt in ("u4", "i4"):
        return [nib.contiguous()]
    hi = u >> 4
    top = (
        hi[..., :quarter]
        | (hi[..., quarter : 2 * quarter] << 2)
        | (hi[..., 2 * quarter : 3 * quarter] << 4)
        | (hi[..., 3 * quarter :] << 6)
    )
    return [nib.contiguous(), top.to(torch.uint8).contiguous()]


def pack_groups(spec: LinearKernel, t: torch.Tensor) -> torch.Tensor:
    """Per-(output, group) values ``[N, G]`` → ``[N/NB, G, NB]`` (padding 0)."""
    return _lanes(pad2d(t.to(torch.float32), spec.n, spec.groups))


def padded(n: int, k: int, group: int) -> tuple[int, int, int]:
    """(N, K, group) of the kernel for an N×K weight with groups of ``group`` (``group == k``: one per
    output channel): N rounded up to the block, K to the group; a per-channel group becomes the padded
    K, itself rounded up to 4."""
    if group == k:
        k_p = -(-k // 4) * 4
        return -(-n // NB) * NB, k_p, k_p
    return -(-n // NB) * NB, -(-k // group) * group, group
