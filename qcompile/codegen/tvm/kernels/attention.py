"""Scaled dot-product attention over a (static) cache, grouped-query heads read in place.

``out[b, h, s] = softmax(scale · q[b, h, s] · k[b, h // g]ᵀ, masked) · v[b, h // g]``

The importer's graph repeats each KV head ``g`` times (``expand`` + ``reshape``) before attention,
which materializes a copy of the whole cache per layer and step; the lowering matches that
pattern and hands the un-repeated K and V to this kernel, which maps query head ``h`` to KV head
``h // g``. One (batch, head, query) row per parallel task: scores as ``D/8``-way vector partial dot
products, a max-subtracted exponent (heads in parallel), and the value sum vectorized along the head dimension.
A fully masked row gives NaN, as torch does.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule

LANES = 8


@dataclass(frozen=True)
class Attention:
    batch: int
    heads: int
    kv_heads: int
    keys: int | None  # L (the cache length); None: dynamic, equal to the number of queries
    dim: int  # D
    queries: int | None  # S; None: dynamic
    mask: str  # "bool", "float" or "none"
    mask_heads: int  # 1 (broadcast over heads) or heads
    scale: float

    @property
    def name(self) -> str:
        s = "dyn" if self.queries is None else self.queries
        keys = "dyn" if self.keys is None else self.keys
        return (
            f"qc_attention_b{self.batch}_h{self.heads}_kv{self.kv_heads}_l{keys}_d{self.dim}_s{s}_"
            f"{self.mask}{self.mask_heads}_sc{self.scale:.6g}".replace(".", "p").replace("-", "m")
        )


def unsupported(heads: int, kv_heads: int, dim: int) -> str | None:
    """Why the kernel cannot take these shapes, or None: query heads must be a multiple of the KV
    heads, and the head dimension a multiple of the vector width with at least two vectors (the
    schedule splits the dot products into ``D/8`` partial sums; one vector leaves nothing to split)."""
    if heads % kv_heads:
        return f"{heads} query heads are not a multiple of {kv_heads} KV heads"
    if dim % LANES or dim < 2 * LANES:
        return f"head dim {dim} is not a multiple of {LANES} of at least {2 * LANES}"
    return None


def attention_primfunc(spec: Attention) -> tvm.tirx.PrimFunc:
    why = unsupported(spec.heads, spec.kv_heads, spec.dim)
    if why is not None:
        raise ValueError(f"the attention kernel does not cover {spec}: {why}")
    g = spec.heads // spec.kv_heads
    s_ = te.var("s", "int64") if spec.queries is None else spec.queries
    l_ = (s_ if spec.queries is None else spec.queries) if spec.keys is None else spec.keys
    b_, h_, d_ = spec.batch, spec.heads, spec.dim
    q = te.placeholder((b_, h_, s_, d_), "float32", name="Q")
    k = te.placeholder((b_, spec.kv_heads, l_, d_), "float32", name="K")
    v = te.placeholder((b_, spec.kv_heads, l_, d_), "float32", name="V")
    args = [q, k, v]
    m = None
    if spec.mask != "none":
        m = te.placeholder((b_, spec.mask_heads, s_, l_), "bool" if spec.mask == "bool" else "float32", name="M")
        args.append(m)
    do = te.reduce_axis((0, d_ // LANES), "do")
    part = te.compute(
        (b_, h_, s_, l_, LANES),
        lambda b, h, s, l, di: te.sum(q[b, h, s, do * LANES + di] * k[b, h // g, l, do * LANES + di], axis=do),
        name="PART",
    )
    di = te.reduce_axis((0, LANES), "di")
    raw = te.compute((b_, h_, s_, l_), lambda b, h, s, l: te.sum(part[b, h, s, l, di], axis=di), name="RAW")
    scale = tirx.const(spec.scale, "float32")
    ninf = tirx.const(float("-inf"), "float32")

    def masked(b, h, s, l):  # type: ignore[no-untyped-def]
        x = raw[b, h, s, l] * scale
        if m is None:
            return x
        mh = h if spec.mask_heads > 1 else 0
        return tirx.Select(m[b, mh, s, l], x, ninf) if spec.mask == "bool" else x + m[b, mh, s, l]

    score = te.compute((b_, h_, s_, l_), masked, name="SCORE")
    r1 = te.reduce_axis((0, l_), "r1")
    mx = te.compute((b_, h_, s_), lambda b, h, s: te.max(score[b, h, s, r1], axis=r1), name="MX")
    e = te.compute((b_, h_, s_, l_), lambda b, h, s, l: te.exp(score[b, h, s, l] - mx[b, h, s]), name="E")
    r2 = te.reduce_axis((0, l_), "r2")
    z = te.compute((b_, h_, s_), lambda b, h, s: te.sum(e[b, h, s, r2], axis=r2), name="Z")
    r3 = te.reduce_axis((0, l_), "r3")
    acc = te.compute(
        (b_, h_, s_, d_), lambda b, h, s, d: te.sum(e[b, h, s, r3] * v[b, h // g, r3, d], axis=r3), name="ACC"
    )
    out = te.compute((b_, h_, s_, d_), lambda b, h, s, d: acc[b, h, s, d] / z[b, h, s], name="OUT")
    func = te.create_prim_func(args + [out])
    return _schedule(func, spec.keys is not None).with_attr("tir.is_scheduled", True)


def _schedule(func: tvm.tirx.PrimFunc, static_keys: bool) -> tvm.tirx.PrimFunc:
    sch = Schedule(func)
    out = sch.get_sblock("OUT")
    b, h, s, d = sch.get_loops(out)
    sch.reorder(h, b, s, d)
    row = s  # one (head, batch, query) row at a time; heads run in parallel
    sch.vectorize(d)
    acc = sch.get_sblock("ACC")
    sch.compute_at(acc, row)
    ad, ar = sch.get_loops(acc)[-2:]
    sch.reorder(ar, ad)
    sch.vectorize(ad)
    for name in ("Z", "E", "MX", "SCORE", "RAW", "PART"):
        blk = sch.get_sblock(name)
        sch.compute_at(blk, row)
    for name in ("ACC", "Z", "E", "MX", "SCORE", "RAW", "PART"):
        sch.set_scope(sch.get_sblock(name), 0, "local")
    part = sch.get_sblock("PART")
    pl, pdi, pdo = sch.get_loops(part)[-3:]
    sch.reorder(pl, pdo, pdi)
    sch.vectorize(pdi)
    if static_keys:
        sch.vectorize(sch.get_loops(sch.get_sblock("E"))[-1])
    sch.parallel(h)
    sch.decompose_reduction(part, pdo)
    sch.decompose_reduction(acc, ar)
    return sch.mod["main"]
