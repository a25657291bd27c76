"""Integer linear kernels on x86's dot-product instructions (W8A8, W6A8, W6A6, W4A8: int8 activation codes).

``y[m, n] = Σ_g sx(m, g) · sw(n, g) · Σ_{k in group g} qx(m, k) · w(n, k)  (+ bias[n])``, the same
integer sums as the lane-blocked template's ``i8`` / ``i6`` / ``i4`` formats with integer activations
(:mod:`.linear`), exact in int32, then the same fp32 rescale per group. The asymmetric ``u4`` format
(llama.cpp's Q4_1 × Q8_1: ``w = u·sw + c``, ``u`` = 0…15, a float offset ``c`` per output and group)
adds the offset term: ``y[m, n] = Σ_g (acc·sx(m, g))·sw(n, g) + c(n, g)·xs(m, g)`` with
``acc = Σ_k qx·u`` exact in int32 and ``xs(m, g) = fl32(Σ_{k in g} qx)·sx(m, g)`` (Q8_1's ``s``).

Instruction sets (:data:`ISAS`), chosen by the target's features (:func:`isa_for`):

* ``vnni512`` (AVX-512 VNNI): ``vpdpbusd`` on zmm — 16 int32 lanes, each summing 4 products of an
  unsigned and a signed byte per instruction;
* ``vnni256`` (AVX-VNNI, or AVX-512 VNNI with VL): ``vpdpbusd`` on ymm, 8 lanes;
* ``avx2``: ``vpmaddubsw`` (u8 × s8 → pairs summed in int16, saturating) then ``vpmaddwd`` with ones
  (pairs of int16 → int32).

Arithmetic (why it is exact):

* ``vpdpbusd`` wants unsigned × signed bytes. The activation codes ``x`` are made unsigned by
  flipping their top bit (``x ^ 0x80 = x + 128``, 0…255: the quantization kernel writes them so,
  :func:`act_codes`, and the kernel broadcasts them straight from memory), so each lane sums
  ``Σ (x + 128)·w = Σ x·w + 128·Σ w``; the second term is subtracted per (output, group) with
  ``corr[n, g] = 128·Σ_{k in g} w[n, k]``, computed when the weights are repacked. int32 cannot
  overflow for groups of fewer than 2^31 / (255·128) ≈ 65 000 inputs (checked).
* ``vpmaddubsw`` saturates a pair sum to int16. For ``i6`` weights (|w| ≤ 32) the same ``x + 128``
  form cannot saturate (2·255·32 = 16 320 < 32 767). For ``i8`` weights it can, so the avx2 path
  uses the sign trick instead: ``|w|`` (unsigned, ≤ 128) times ``sign(w)·x``; the activation codes
  of :func:`.linear.quant_rows_primfunc` lie in ±127, so ``-x`` does not wrap and a pair is at most
  2·128·127 = 32 512 — every int8 weight code, -128 included, is exact; no correction term.
* ``i4`` weights (codes -8…7, llama.cpp's Q4 × Q8 dot) on ``vpdpbusd``: each nibble is decoded into
  the TOP half of a byte (a mask, plus one shift for the low nibble), which as a signed byte is
  exactly ``16·w`` (-128…112), so no ``-8`` is needed; the lane sums are ``16·(Σ x·w + 128·Σ w)``,
  shifted right by 4 (exact: a multiple of 16) before the same ``corr`` is subtracted. Products are
  at most 255·128, the ``i8`` bound. (Keeping the unsigned nibble ``u = w + 8`` instead would need
  ``8·Σ x`` per row and group, an activation-side term, besides ``corr``.) On avx2 (``vpmaddubsw``
  would saturate on ``16·w``) the nibble is stored ``code + 8`` and decoded ``u - 8`` (pairs at most
  2·255·8), then the +128 form as ``i6``.
* ``u4`` weights (unsigned codes 0…15, asymmetric): here the WEIGHT is the unsigned operand of
  ``vpdpbusd`` / ``vpmaddubsw`` and the activation codes (±127, not flipped) the signed one, so the
  lanes sum ``Σ x·u`` directly — no flip, no ``corr``, no shift; products at most 15·127 (a
  ``vpmaddubsw`` pair 2·15·127 = 3 810, far from saturating). The offset needs ``Σ x`` per row and
  group: the activation quantization kernel writes it, already times ``sx``, as a float per row and
  group (:attr:`.linear.QuantRows.sums`, the ``s`` of llama.cpp's Q8_1 blocks), because it has each
  code in a register once per row, whereas the kernel would sum the same 32 bytes again for every
  block of outputs (N/NBX times per row); the integer sum is exact (≤ 127·group < 2^24, so its
  float is exact too) and ``fl32(Σ x)·sx`` is the same float operation as the torch reference op's
  ``qsum.float() * sx``. Per group the kernel adds ``(acc·sx)·sw + c·xs`` (the template's order).

Weight layout (repacked at build time, :func:`pack_weight`): output channels in blocks of ``NBX``
lanes (64 for ``vnni512``, 32 otherwise), 4 consecutive K per lane as ``vpdpbusd`` wants:

* ``i8`` — ``W[N/NBX, K/4, NBX·4]`` int8, byte ``4·lane + t`` = ``w[lane, 4·kq + t]``;
* ``i6`` — the same tile of ``u = code + 32`` (6 bits) split into ``LO[N/NBX, K/4, 2·VB]`` (the low
  nibbles of vector 2p in the low half of a byte, of vector 2p+1 in the high half; ``VB`` = bytes of
  a vector) and ``HI[N/NBX, K/4, VB]`` (the top 2 bits of the tile's 4 vectors at bits 4–5, 6–7, 0–1,
  2–3), exactly 6 bits per weight; decoded with shifts and masks that put each 2-bit field straight
  into bits 4–5;
* ``i4`` — the same tile as 4-bit nibbles ``LO[N/NBX, K/4, 2·VB]`` (vector 2p low, 2p+1 high), each
  the two's-complement code (``code & 15``) on the vnni ISAs and ``code + 8`` on avx2; decoded in
  registers per tile (no scratch);
* ``u4`` — the ``i4`` array of the unsigned codes ``u`` themselves (decoded with one mask or shift).

Schedule (a hand-written loop nest; small register tiles live in sub-1 KiB stack arrays, which
TVM keeps off the heap and LLVM keeps in registers): parallel tasks over blocks of NBX outputs (and
over chunks of :data:`CHUNK_ROWS` rows when N has fewer than :data:`SPLIT_BELOW_BLOCKS` blocks);
per group, ``i6`` weights are decoded once into an L1 scratch tile read by every row tile (``i4``
and ``u4`` weights are decoded in registers by each row tile: a mask and a shift per two vectors); rows go
in register tiles of :data:`ROWS` (each weight vector loaded once serves all of them: 6 rows × 64
outputs = 24 zmm accumulators on ``vnni512``), then the leftover rows (a tile of HALF rows when
there are that many, then one at a time); each group's integer sums are rescaled into the output
rows ((acc·sx)·sw, plus c·xs for ``u4``: the template's order) and the bias is added last, then a
fused residual (:attr:`X86Linear.residual`: ``(x·Wᵀ + b) + r``, torch's order, so the fused add changes no bit).
``tirx.noalias``: the output aliases no input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import tvm
from tvm.script import tirx as T

from qcompile.codegen.tvm.kernels.linear import QuantRows, pad2d

ISAS = ("vnni512", "vnni256", "avx2")
# LLVM features each ISA's instructions need (CpuTarget.features names)
NEEDS = {"vnni512": ("avx512f", "avx512bw", "avx512vnni"), "vnni256": ("avxvnni",), "avx2": ("avx2",)}
LANES = {"vnni512": 16, "vnni256": 8, "avx2": 8}  # int32 lanes of a vector
ROWS = {"vnni512": 6, "vnni256": 2, "avx2": 2}  # rows per register tile (at most 2·HALF)
CHUNK_ROWS = 24  # rows per parallel task when N has fewer than SPLIT_BELOW_BLOCKS blocks
SPLIT_BELOW_BLOCKS = 32
HALF = 3  # rows per accumulator array (3 × 64 int32 < 1 KiB: stack, hence registers)
XFMTS = ("i8", "i6", "i4", "u4")  # u4: asymmetric nibbles with a float offset per (output, group)
MAX_GROUP = 2**31 // (255 * 128)  # int32 accumulator bound of the +128 form


def isa_for(features: frozenset[str] | set[str]) -> str | None:
    """The best ISA of :data:`ISAS` whose instructions ``features`` (LLVM names) has, or None."""
    for isa in ISAS:
        if all(f in features for f in NEEDS[isa]):
            return isa
    return None


@dataclass(frozen=True)
class X86Linear:
    """One kernel: an N×K weight (padded sizes) in ``wfmt`` with groups of ``group`` along K, int8
    activation codes (``act_bits`` bits, one scale per token or per group), on ``isa``."""

    n: int  # multiple of the block (64)
    k: int  # multiple of the group
    wfmt: str  # "i8" | "i6" | "i4" | "u4"
    group: int  # multiple of 4
    act_bits: int
    act_group: int  # 0: one activation scale per token; else == group
    bias: bool
    m: int | None  # None: dynamic number of rows
    isa: str
    residual: bool = False  # add ``R[M, N]`` after the bias (a residual connection fused into the epilogue)

    def __post_init__(self) -> None:
        if self.isa not in ISAS:
            raise ValueError(f"unknown ISA {self.isa!r}; ISAs: {ISAS}")
        if self.wfmt not in XFMTS:
            raise ValueError(f"{self.wfmt} weights have no dot-product kernel (formats: {XFMTS})")
        if not 1 < self.act_bits <= 8:
            raise ValueError(f"the dot-product kernels take int8 activation codes, not {self.act_bits}-bit")
        if self.group % 4 or self.k % self.group or self.n % self.nbx:
            raise ValueError(
                f"dot-product kernels need groups of a multiple of 4 and padded sizes, got N={self.n} "
                f"(block {self.nbx}), K={self.k}, group {self.group}"
            )
        if self.group > MAX_GROUP:
            raise ValueError(f"groups of {self.group} inputs could overflow int32 (at most {MAX_GROUP})")

    @property
    def lanes(self) -> int:
        return LANES[self.isa]

    @property
    def nbx(self) -> int:
        """Output channels per block: 4 vectors of int32 lanes."""
        return 4 * self.lanes

    @property
    def vbytes(self) -> int:
        """Bytes of one vector (4 K of ``lanes`` outputs)."""
        return 4 * self.lanes

    @property
    def groups(self) -> int:
        return self.k // self.group

    @property
    def corrected(self) -> bool:
        """Whether the kernel flips activations to ``x + 128`` and subtracts ``corr`` (all but avx2 i8 and u4)."""
        return not (self.isa == "avx2" and self.wfmt == "i8") and self.wfmt != "u4"

    @property
    def offset(self) -> bool:
        """Whether the kernel adds ``c[n, g]·xs[m, g]`` (``u4``: asymmetric weights)."""
        return self.wfmt == "u4"

    @property
    def shift(self) -> int:
        """Bits the integer sums are shifted right before the correction: 4 for ``i4`` on vnni, whose
        weights decode as ``16·w`` (see the module docstring), else 0."""
        return 4 if self.wfmt == "i4" and self.isa != "avx2" else 0

    def quant_rows(self) -> QuantRows:
        """The activation quantization kernel this kernel reads (flipped codes when :attr:`corrected`;
        with :attr:`offset`, also ``sx·Σqx`` per row and group)."""
        sums = self.group if self.offset else 0
        return QuantRows(self.k, self.act_bits, self.act_group, self.m, flip=self.corrected, sums=sums)

    @property
    def name(self) -> str:
        act = f"a{self.act_bits}{'g' if self.act_group else 't'}"
        m = "mdyn" if self.m is None else f"m{self.m}"
        b = ("_b" if self.bias else "") + ("_r" if self.residual else "")
        return f"qc_{self.isa}_{self.wfmt}{act}_n{self.n}_k{self.k}_g{self.group}{b}_{m}"

    def weight_shapes(self) -> list[tuple[tuple[int, ...], str]]:
        nb, kq, vb = self.n // self.nbx, self.k // 4, self.vbytes
        if self.wfmt == "i8":
            return [((nb, kq, 4 * vb), "int8")]
        if self.wfmt in ("i4", "u4"):
            return [((nb, kq, 2 * vb), "uint8")]
        return [((nb, kq, 2 * vb), "uint8"), ((nb, kq, vb), "uint8")]

    def group_shape(self) -> tuple[int, int, int]:
        return (self.n // self.nbx, self.groups, self.nbx)


@dataclass(frozen=True)
class X86Knobs:
    """The hand-written kernel's schedule knobs (the autotuner's design space,
    :mod:`qcompile.tuning.space`): ``rows`` per register tile (at most 2·HALF), rows per parallel
    task ``chunk`` when N has fewer than ``split_below`` blocks (0: never split rows)."""

    rows: int
    chunk: int = CHUNK_ROWS
    split_below: int = SPLIT_BELOW_BLOCKS

    @staticmethod
    def default(spec: X86Linear) -> X86Knobs:
        """The hand-picked schedule (the untuned default and the tuner's first candidate)."""
        return X86Knobs(ROWS[spec.isa])

    def check(self) -> None:
        if not 1 <= self.rows <= 2 * HALF:
            raise ValueError(f"register tiles of 1 to {2 * HALF} rows, not {self.rows}")
        if self.chunk < 1 or self.split_below < 0:
            raise ValueError(f"chunk must be positive and split_below non-negative: {self}")


# ---- the kernel ---------------------------------------------------------------------------------


def _u8(value: tvm.tirx.PrimExpr | int, lanes: int) -> tvm.tirx.PrimExpr:
    """A uint8 vector of ``lanes`` copies of ``value``."""
    return tvm.tirx.Broadcast(tvm.tirx.Cast("uint8", value), lanes)


def _madd(xu: tvm.tirx.PrimExpr, w: tvm.tirx.PrimExpr, lanes: int) -> tvm.tirx.PrimExpr:
    """AVX2: ``lanes`` int32 sums of 4 products of unsigned ``xu`` and signed ``w`` bytes
    (``vpmaddubsw`` into int16 pairs, then ``vpmaddwd`` with ones)."""
    pairs = tvm.tirx.call_llvm_pure_intrin(f"int16x{2 * lanes}", "llvm.x86.avx2.pmadd.ub.sw", xu, w)
    ones = tvm.tirx.Broadcast(tvm.tirx.const(1, "int16"), 2 * lanes)
    return tvm.tirx.call_llvm_pure_intrin(f"int32x{lanes}", "llvm.x86.avx2.pmadd.wd", pairs, ones)


def _madd_signed(x: tvm.tirx.PrimExpr, w: tvm.tirx.PrimExpr, lanes: int) -> tvm.tirx.PrimExpr:
    """AVX2, signed × signed: ``|w|`` (unsigned, ``vpabsb``) times ``sign(w)·x`` (``vpsignb``)."""
    bytes_ = f"int8x{4 * lanes}"
    aw = tvm.tirx.call_llvm_pure_intrin(bytes_, f"llvm.abs.v{4 * lanes}i8", w, tvm.tirx.const(False, "bool"))
    sx = tvm.tirx.call_llvm_pure_intrin(bytes_, "llvm.x86.avx2.psign.b", x, w)
    return _madd(aw, sx, lanes)


def _nibbles(b: tvm.tirx.PrimExpr, high: bool, vnni: bool, vb: int, unsigned: bool = False) -> tvm.tirx.PrimExpr:
    """One vector of ``i4`` weights from the packed bytes ``b`` (the low or ``high`` nibbles): on vnni
    the nibble moved into the top half of each byte (``16·w`` as a signed byte), on avx2 ``u - 8``;
    ``unsigned`` (``u4``): the nibble ``u`` itself (0…15), on every ISA."""
    i8v = f"int8x{vb}"
    if unsigned:
        return T.reinterpret(i8v, b >> _u8(4, vb) if high else b & _u8(15, vb))
    if vnni:
        top = b if high else b << _u8(4, vb)
        return T.reinterpret(i8v, top & _u8(0xF0, vb))
    u = b >> _u8(4, vb) if high else b & _u8(15, vb)
    return T.reinterpret(i8v, u - _u8(8, vb))


def epilogue(f32v: str, bias: bool, residual: bool):  # noqa: ANN201 (a TVMScript helper)
    """``finished(Y, B, R, row, lane)``: the output vector at (``row``, ``lane``) plus the bias, then the
    residual, torch's ``(x·Wᵀ + b) + r`` (the hand-written kernels' last pass over their outputs)."""

    def finished(Y, B, R, row, lane):  # noqa: ANN001, ANN202 (TVMScript buffers and indices)
        out = Y.vload([row, lane], f32v)
        out = out + B.vload([lane], f32v) if bias else out
        return out + R.vload([row, lane], f32v) if residual else out

    return finished


STACK = {"disable_lower_builtin": True}  # small register tiles: stack (promoted to registers), not the heap


def x86_linear_primfunc(spec: X86Linear, knobs: X86Knobs | None = None) -> tvm.tirx.PrimFunc:
    """``(QX int8[M, K] (:func:`act_codes`), SX f32[M, G|1], [XS f32[M, G]], *weights, S f32[nb, G, NBX],
    [CORR int32[nb, G, NBX]], [C f32[nb, G, NBX]], [B f32[N]], [R f32[M, N]], Y f32[M, N])``, scheduled (a hand-written
    loop nest with ``knobs``; None: the default)."""
    knobs = knobs or X86Knobs.default(spec)
    knobs.check()
    isa, wfmt = spec.isa, spec.wfmt
    vl, vb, nbx, gs, ng = spec.lanes, spec.vbytes, spec.nbx, spec.group, spec.groups
    nblk, n_, k_ = spec.n // nbx, spec.n, spec.k
    kq_g = gs // 4
    sxg = ng if spec.act_group else 1
    rt = knobs.rows
    corrected, i6, bias, residual = spec.corrected, wfmt == "i6", spec.bias, spec.residual
    i4, u4 = wfmt in ("i4", "u4"), wfmt == "u4"
    shift = spec.shift
    i32v, f32v, i8v, u8v = f"int32x{vl}", f"float32x{vl}", f"int8x{vb}", f"uint8x{vb}"
    vnni = isa != "avx2"
    dot_name = "llvm.x86.avx512.vpdpbusd.512" if isa == "vnni512" else "llvm.x86.avx512.vpdpbusd.256"
    wshapes = spec.weight_shapes()
    w0shape = wshapes[0][0]
    w1shape = wshapes[1][0] if i6 else (1,)
    gshape = spec.group_shape()
    m_ = tvm.tirx.Var("m", "int64") if spec.m is None else spec.m
    # rows per task: all of them, unless the blocks are too few to keep the threads busy
    chunk = knobs.chunk if nblk < knobs.split_below else (tvm.tirx.max(m_, 1) if spec.m is None else max(spec.m, 1))
    sx_mul = 1 if spec.act_group else 0

    @T.macro
    def dot_row(QX, acc, wv, r, row, kq):
        """Row ``row``'s 4 K at ``kq`` times the tile's 4 weight vectors, into ``acc[r]``."""
        xw = T.meta_var(T.reinterpret("int32", QX.vload([row, kq * 4], "int8x4")))
        if corrected:  # QX holds x + 128 already (flipped by the quantization kernel)
            xb = T.meta_var(T.reinterpret(i8v, T.broadcast(xw, vl)))
            for v in T.unroll(4):
                if vnni:
                    acc[r, v * vl : v * vl + vl] = T.call_llvm_pure_intrin(
                        i32v, dot_name, acc.vload([r, v * vl], i32v), xb, wv.vload([v, 0], i8v)
                    )
                else:
                    acc[r, v * vl : v * vl + vl] = acc.vload([r, v * vl], i32v) + _madd(xb, wv.vload([v, 0], i8v), vl)
        elif u4:  # unsigned weights (0..15) × signed activation codes: the weights are the unsigned operand
            xs = T.meta_var(T.reinterpret(i8v, T.broadcast(xw, vl)))
            for v in T.unroll(4):
                if vnni:
                    acc[r, v * vl : v * vl + vl] = T.call_llvm_pure_intrin(
                        i32v, dot_name, acc.vload([r, v * vl], i32v), wv.vload([v, 0], i8v), xs
                    )
                else:
                    acc[r, v * vl : v * vl + vl] = acc.vload([r, v * vl], i32v) + _madd(wv.vload([v, 0], i8v), xs, vl)
        else:
            xs = T.meta_var(T.reinterpret(i8v, T.broadcast(xw, vl)))
            for v in T.unroll(4):
                acc[r, v * vl : v * vl + vl] = acc.vload([r, v * vl], i32v) + _madd_signed(
                    xs, wv.vload([v, 0], i8v), vl
                )

    finished = epilogue(f32v, bias, residual)

    def sums(a: tvm.tirx.PrimExpr) -> tvm.tirx.PrimExpr:
        """The integer sums of a vector of accumulators (``i4`` on vnni: ``16·`` them, shifted back)."""
        return a >> T.broadcast(T.int32(shift), vl) if shift else a

    @T.macro
    def rescale_row(SX, XS, S, CORR, C, Y, acc, r, row, blk, g):
        """``Y[row] += (acc[r] − corr)·sx·sw`` for group ``g`` ((acc·sx)·sw: the template's order);
        ``u4``: ``Y[row] += (acc[r]·sx)·sw + c·xs``."""
        for v in T.unroll(4):
            if u4:
                Y[row, blk * nbx + v * vl : blk * nbx + v * vl + vl] = Y.vload([row, blk * nbx + v * vl], f32v) + (
                    T.Cast(f32v, acc.vload([r, v * vl], i32v))
                    * T.broadcast(SX[row, g * sx_mul], vl)
                    * S.vload([blk, g, v * vl], f32v)
                    + C.vload([blk, g, v * vl], f32v) * T.broadcast(XS[row, g], vl)
                )
            elif corrected:
                Y[row, blk * nbx + v * vl : blk * nbx + v * vl + vl] = Y.vload(
                    [row, blk * nbx + v * vl], f32v
                ) + T.Cast(f32v, sums(acc.vload([r, v * vl], i32v)) - CORR.vload([blk, g, v * vl], i32v)) * T.broadcast(
                    SX[row, g * sx_mul], vl
                ) * S.vload([blk, g, v * vl], f32v)
            else:
                Y[row, blk * nbx + v * vl : blk * nbx + v * vl + vl] = Y.vload(
                    [row, blk * nbx + v * vl], f32v
                ) + T.Cast(f32v, acc.vload([r, v * vl], i32v)) * T.broadcast(SX[row, g * sx_mul], vl) * S.vload(
                    [blk, g, v * vl], f32v
                )

    @T.macro
    def decode_group(W0, W1, WD, blk, g):
        """The i6 weights of group ``g`` of block ``blk`` as int8 tiles ``WD[kq, 4·VB]``: 2-bit fields
        shifted straight into bits 4–5, OR the nibble, minus 32."""
        for kk in range(kq_g):
            for v in T.unroll(4):
                lo = T.meta_var(W0.vload([blk, g * kq_g + kk, (v // 2) * vb], u8v))
                h = T.meta_var(W1.vload([blk, g * kq_g + kk, 0], u8v))
                nib = T.meta_var((lo >> _u8(4 * (v % 2), vb)) & T.broadcast(T.uint8(15), vb))
                top = T.meta_var(
                    T.if_then_else(
                        v < 2,
                        h >> T.broadcast(T.Cast("uint8", 2 * v), vb),
                        h << T.broadcast(T.Cast("uint8", 8 - 2 * v), vb),
                    )
                    & T.broadcast(T.uint8(48), vb)
                )
                WD[kk, v * vb : v * vb + vb] = T.reinterpret(i8v, (nib | top) - T.broadcast(T.uint8(32), vb))

    @T.macro
    def tile(QX, SX, XS, W0, WD, S, CORR, C, Y, blk, g, row0, nrows):
        # int32 accumulators of rows [0, HALF) and [HALF, nrows): each under 1 KiB, so on the stack
        # (LLVM keeps them in registers)
        acc0 = T.alloc_buffer((HALF, nbx), "int32", scope="global", annotations=STACK)
        acc1 = T.alloc_buffer((HALF, nbx), "int32", scope="global", annotations=STACK)
        wv = T.alloc_buffer((4, vb), "int8", scope="global", annotations=STACK)
        for r in T.unroll(HALF):
            for v in T.unroll(4):
                acc0[r, v * vl : v * vl + vl] = T.broadcast(T.int32(0), vl)
                acc1[r, v * vl : v * vl + vl] = T.broadcast(T.int32(0), vl)
        for kk in range(kq_g):
            if i4:  # decoded in registers: vectors 2p and 2p+1 from the low and high nibbles of one load
                for p in T.unroll(2):
                    wv[2 * p, 0:vb] = _nibbles(W0.vload([blk, g * kq_g + kk, p * vb], u8v), False, vnni, vb, u4)
                    wv[2 * p + 1, 0:vb] = _nibbles(W0.vload([blk, g * kq_g + kk, p * vb], u8v), True, vnni, vb, u4)
            else:
                for v in T.unroll(4):
                    if i6:
                        wv[v, 0:vb] = WD.vload([kk, v * vb], i8v)
                    else:
                        wv[v, 0:vb] = W0.vload([blk, g * kq_g + kk, v * vb], i8v)
            for r in T.unroll(min(nrows, HALF)):
                dot_row(QX, acc0, wv, r, row0 + r, g * kq_g + kk)
            for r in T.unroll(max(nrows - HALF, 0)):
                dot_row(QX, acc1, wv, r, row0 + HALF + r, g * kq_g + kk)
        for r in T.unroll(min(nrows, HALF)):
            rescale_row(SX, XS, S, CORR, C, Y, acc0, r, row0 + r, blk, g)
        for r in T.unroll(max(nrows - HALF, 0)):
            rescale_row(SX, XS, S, CORR, C, Y, acc1, r, row0 + HALF + r, blk, g)

    @T.prim_func
    def main(
        qx: T.handle,
        sx: T.handle,
        xs: T.handle,
        w0: T.handle,
        w1: T.handle,
        s: T.handle,
        corr: T.handle,
        c: T.handle,
        b: T.handle,
        res: T.handle,
        y: T.handle,
    ):
        T.func_attr({"tir.noalias": True})
        QX = T.match_buffer(qx, (m_, k_), "int8")
        SX = T.match_buffer(sx, (m_, sxg), "float32")
        XS = T.match_buffer(xs, (m_, ng), "float32")
        W0 = T.match_buffer(w0, w0shape, wshapes[0][1])
        W1 = T.match_buffer(w1, w1shape, "uint8")
        S = T.match_buffer(s, gshape, "float32")
        CORR = T.match_buffer(corr, gshape, "int32")
        C = T.match_buffer(c, gshape, "float32")
        B = T.match_buffer(b, (n_,), "float32")
        R = T.match_buffer(res, (m_, n_), "float32")
        Y = T.match_buffer(y, (m_, n_), "float32")
        # tasks: (block, chunk of rows); few blocks (small N) are split by rows too, to fill the threads
        for task in T.parallel(nblk * ((m_ + chunk - 1) // chunk)):
            blk = T.meta_var(task % nblk)
            r0 = T.meta_var(task // nblk * chunk)
            nr = T.meta_var(T.min(m_ - r0, chunk))
            # i6: a group's weights decoded once per task into L1, then read by every row tile
            WD = T.alloc_buffer((kq_g if i6 else 1, 4 * vb), "int8", scope="global")
            for row in range(nr):
                for v in T.unroll(4):
                    Y[r0 + row, blk * nbx + v * vl : blk * nbx + v * vl + vl] = T.broadcast(T.float32(0), vl)
            for g in range(ng):
                if i6:
                    decode_group(W0, W1, WD, blk, g)
                for t in range(nr // rt):
                    tile(QX, SX, XS, W0, WD, S, CORR, C, Y, blk, g, r0 + t * rt, rt)
                if rt > HALF:  # leftover rows: a tile of HALF rows where they are that many, then single rows
                    for _t in range(nr % rt // HALF):
                        tile(QX, SX, XS, W0, WD, S, CORR, C, Y, blk, g, r0 + (nr // rt) * rt, HALF)
                    for t in range(nr % rt % HALF):
                        rest = T.meta_var(r0 + (nr // rt) * rt + nr % rt // HALF * HALF)
                        tile(QX, SX, XS, W0, WD, S, CORR, C, Y, blk, g, rest + t, 1)
                else:
                    for t in range(nr % rt):
                        tile(QX, SX, XS, W0, WD, S, CORR, C, Y, blk, g, r0 + (nr // rt) * rt + t, 1)
            if bias or residual:  # one pass over the outputs: the bias, then a fused residual
                for row in range(nr):
                    for v in T.unroll(4):
                        Y[r0 + row, blk * nbx + v * vl : blk * nbx + v * vl + vl] = finished(
                            Y, B, R, r0 + row, blk * nbx + v * vl
                        )

    return main


def x86_primfunc(spec: X86Linear, knobs: X86Knobs | None = None) -> tvm.tirx.PrimFunc:
    """:func:`x86_linear_primfunc` with only the parameters ``spec`` uses, in order: ``QX, SX``, ``XS``
    (with :attr:`X86Linear.offset`), the weight arrays, ``S``, ``CORR`` (when :attr:`X86Linear.corrected`),
    ``C`` (with the offset), ``B`` (with a bias), ``R`` (with :attr:`X86Linear.residual`), ``Y``."""
    f = x86_linear_primfunc(spec, knobs)
    names = ["qx", "sx", "xs", "w0", "w1", "s", "corr", "c", "b", "r", "y"]
    keep = {
        "xs": spec.offset,
        "w1": spec.wfmt == "i6",
        "corr": spec.corrected,
        "c": spec.offset,
        "b": spec.bias,
        "r": spec.residual,
    }
    params = [p for p, nm in zip(f.params, names) if keep.get(nm, True)]
    out = tvm.tirx.PrimFunc(params, f.body, f.ret_type, f.attrs)
    return out.with_attr("tir.is_scheduled", True)


# ---- weight repacking (torch, at build / load time) ----------------------------------------------


def _tiles(spec: X86Linear, codes: torch.Tensor) -> torch.Tensor:
    """``codes[N, K]`` (padded) → ``[N/NBX, K/4, NBX·4]``: per block and 4 K, lane-major, 4 K per lane."""
    nb, nbx = spec.n // spec.nbx, spec.nbx
    t = codes.reshape(nb, nbx, spec.k // 4, 4).permute(0, 2, 1, 3)
    return t.reshape(nb, spec.k // 4, nbx * 4).contiguous()


def pack_weight(spec: X86Linear, codes: torch.Tensor) -> list[torch.Tensor]:
    """The kernel's weight arrays from integer ``codes[N, K]`` (unpadded or padded; int8 range for
    ``i8``, ±31 for ``i6`` — ``-32`` too, stored as 0; -8…7 for ``i4``; 0…15 for ``u4``)."""
    c = pad2d(codes.to(torch.int32), spec.n, spec.k)
    if spec.wfmt == "u4":
        if int(c.min()) < 0 or int(c.max()) > 15:
            raise ValueError(f"u4 codes must lie in [0, 15], got [{int(c.min())}, {int(c.max())}]")
        nib = _tiles(spec, c)
        vb = spec.vbytes
        v4 = [nib[..., i * vb : (i + 1) * vb] for i in range(4)]
        return [torch.cat([v4[0] | (v4[1] << 4), v4[2] | (v4[3] << 4)], dim=-1).to(torch.uint8).contiguous()]
    if spec.wfmt == "i8":
        if int(c.min()) < -128 or int(c.max()) > 127:
            raise ValueError(f"i8 codes must lie in [-128, 127], got [{int(c.min())}, {int(c.max())}]")
        return [_tiles(spec, c).to(torch.int8)]
    if spec.wfmt == "i4":
        if int(c.min()) < -8 or int(c.max()) > 7:
            raise ValueError(f"i4 codes must lie in [-8, 7], got [{int(c.min())}, {int(c.max())}]")
        nib = _tiles(spec, c & 15 if spec.shift else c + 8)  # two's complement nibbles (vnni), or code + 8
        vb = spec.vbytes
        v4 = [nib[..., i * vb : (i + 1) * vb] for i in range(4)]
        return [torch.cat([v4[0] | (v4[1] << 4), v4[2] | (v4[3] << 4)], dim=-1).to(torch.uint8).contiguous()]
    u = c + 32
    if int(u.min()) < 0 or int(u.max()) > 63:
        raise ValueError(f"i6 codes must lie in [-32, 31], got [{int(c.min())}, {int(c.max())}]")
    t = _tiles(spec, u)  # [nb, K/4, 4·VB]: vectors 0..3 of VB bytes
    vb = spec.vbytes
    v = [t[..., i * vb : (i + 1) * vb] for i in range(4)]
    lo = torch.cat([(v[0] & 15) | ((v[1] & 15) << 4), (v[2] & 15) | ((v[3] & 15) << 4)], dim=-1)
    hi = ((v[0] >> 4) << 4) | ((v[1] >> 4) << 6) | (v[2] >> 4) | ((v[3] >> 4) << 2)
    return [lo.to(torch.uint8).contiguous(), hi.to(torch.uint8).contiguous()]


def pack_groups(spec: X86Linear, t: torch.Tensor) -> torch.Tensor:
    """Per-(output, group) values ``[N, G]`` → ``[N/NBX, G, NBX]`` (padding 0)."""
    p = pad2d(t, spec.n, spec.groups)
    return p.reshape(spec.n // spec.nbx, spec.nbx, spec.groups).transpose(1, 2).contiguous()


def pack_corr(spec: X86Linear, codes: torch.Tensor) -> torch.Tensor:
    """``corr[n, g] = 128·Σ_{k in g} w[n, k]`` in the kernel's layout (int32)."""
    c = pad2d(codes.to(torch.int32), spec.n, spec.k)
    sums = c.reshape(spec.n, spec.groups, spec.group).sum(-1, dtype=torch.int32) * 128
    return pack_groups(spec, sums).to(torch.int32)


def act_codes(spec: X86Linear, qx: torch.Tensor) -> torch.Tensor:
    """int8 activation codes as the kernel reads them (what :meth:`X86Linear.quant_rows` writes)."""
    q = qx.to(torch.int8)
    return q ^ torch.tensor(-128, dtype=torch.int8) if spec.corrected else q


def act_sums(spec: X86Linear, qx: torch.Tensor, sx: torch.Tensor) -> torch.Tensor:
    """``xs[m, g] = fl32(Σ_{k in g} qx)·sx`` (``qx[M, K]`` padded, plain codes; ``sx[M, G|1]``): what
    :meth:`X86Linear.quant_rows` writes for a kernel with :attr:`X86Linear.offset`."""
    m = qx.shape[0]
    sums = qx.to(torch.int32).reshape(m, spec.groups, spec.group).sum(-1)
    return sums.to(torch.float32) * sx.to(torch.float32)


def pack(
    spec: X86Linear, codes: torch.Tensor, scale: torch.Tensor, cterm: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """Every weight-side argument of ``spec``'s kernel in order: weight arrays, scales, ``corr``, and
    for ``u4`` the per-(output, group) offset term ``cterm[N, G]`` (the float offset)."""
    out = pack_weight(spec, codes) + [pack_groups(spec, scale.to(torch.float32))]
    if spec.corrected:
        out.append(pack_corr(spec, codes))
    if spec.offset:
        if cterm is None:
            raise ValueError("u4 weights need their offset term (cterm)")
        out.append(pack_groups(spec, cterm.to(torch.float32)))
    return out
