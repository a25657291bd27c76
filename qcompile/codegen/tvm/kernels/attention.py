"""Scaled dot-product attention over a (static) cache, grouped-query heads read in place.

``out[b, h, s] = softmax(scale · q[b, h, s] · k[b, h // g]ᵀ, masked) · v[b, h // g]``

The importer's graph repeats each KV head ``g`` times (``expand`` + ``reshape``) before attention,
which materializes a copy of the whole cache per layer and step; the lowering matches that
pattern and hands the un-repeated K and V to this kernel, which maps query head ``h`` to KV head
``h // g``. One (batch, head, query) row per parallel task: scores as ``D/8``-way vector partial dot
products, a max-subtracted exponent (heads in parallel), and the value sum vectorized along the head dimension.
A fully masked row gives NaN, as torch does.

With a bool mask over a static cache (decode and prefill over the static KV cache) each row stops at
its last unmasked key (:func:`prefix_attention_primfunc`): a decode step at position ``p`` of an
``L``-slot cache reads ``p + 1`` keys instead of ``L``, with the full kernel's result bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule

LANES = 8
# Private switch for benchmarks (benchmarks/decode_profile.py --compare builds the pre-issue-21 path with
# it off): False gives every bool-masked static-cache attention the full kernel.
PREFIX_KEYS = True


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


def takes_prefix(spec: Attention) -> bool:
    """Whether ``spec`` gets :func:`prefix_attention_primfunc` (a bool mask over a static cache)."""
    return (
        PREFIX_KEYS
        and spec.mask == "bool"
        and spec.keys is not None
        and unsupported(spec.heads, spec.kv_heads, spec.dim) is None
    )


def attention_primfunc(spec: Attention, spread_rows: bool = False) -> tvm.tirx.PrimFunc:
    """The kernel for ``spec``: with a bool mask over a static cache the one that stops at each row's
    last unmasked key (:func:`prefix_attention_primfunc`, the same result; ``spread_rows`` is its
    schedule knob), else the full one."""
    if takes_prefix(spec):
        return prefix_attention_primfunc(spec, spread_rows)
    return full_attention_primfunc(spec)


def full_attention_primfunc(spec: Attention) -> tvm.tirx.PrimFunc:
    """Every key of every row (a te definition, scheduled by :func:`_schedule`)."""
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


def prefix_attention_primfunc(spec: Attention, spread_rows: bool = False) -> tvm.tirx.PrimFunc:
    """The bool-masked kernel over a static cache that visits, per (batch, head, query) row, only the
    keys up to the row's last unmasked one: a decode step with ``p`` filled positions of an
    ``L``-slot cache reads ``p`` keys, not ``L``. Keys past the last unmasked one contribute exactly
    nothing to the softmax (``exp(-inf) = 0``, and adding 0 changes no sum), so the result is the
    full kernel's: same sums in the same order (scores as ``D/8`` vector partial sums added lane by
    lane, then the exponent sum and the value sum in key order). A fully masked row gives NaN.

    Parallel tasks: one per head (default), or with ``spread_rows`` one per (head, query) row, which
    balances prefill's causal rows (row ``s`` reads ``s + 1`` keys) across the threads when the
    heads do not divide evenly among them."""
    why = unsupported(spec.heads, spec.kv_heads, spec.dim)
    if why is not None or spec.mask != "bool" or spec.keys is None:
        raise ValueError(f"the prefix attention kernel does not cover {spec}: {why or 'bool mask, static keys only'}")
    g, lanes, dv = spec.heads // spec.kv_heads, LANES, spec.dim // LANES
    b_, h_, kv_, l_, d_ = spec.batch, spec.heads, spec.kv_heads, spec.keys, spec.dim
    s_ = "s" if spec.queries is None else str(spec.queries)
    decl = "s = T.int64()" if spec.queries is None else ""
    mh = "h" if spec.mask_heads > 1 else "0"
    j = f"do * {lanes} + di"  # the lane's channel
    if spread_rows:  # one parallel task per (head, query) row
        rows = (
            f"for hs in T.parallel({h_} * {s_}):\n        for b in range({b_}):\n"
            f"            h: T.int64 = hs // {s_}\n            s: T.int64 = hs % {s_}"
        )
    else:
        rows = f"for h in T.parallel({h_}):\n        for b, s in T.grid({b_}, {s_}):"
    src = f"""
@T.prim_func(private=True)
def main(q_h: T.handle, K: T.Buffer(({b_}, {kv_}, {l_}, {d_}), "float32"),
         V: T.Buffer(({b_}, {kv_}, {l_}, {d_}), "float32"), m_h: T.handle, o_h: T.handle):
    T.func_attr({{"tir.noalias": True, "tir.is_scheduled": True, "tirx.is_scheduled": True}})
    {decl}
    Q = T.match_buffer(q_h, ({b_}, {h_}, {s_}, {d_}), "float32")
    M = T.match_buffer(m_h, ({b_}, {spec.mask_heads}, {s_}, {l_}), "bool")
    OUT = T.match_buffer(o_h, ({b_}, {h_}, {s_}, {d_}), "float32")
    {rows}
            n = T.decl_buffer((1,), "int64", scope="local")
            mx = T.decl_buffer((1,), "float32", scope="local")
            z = T.decl_buffer((1,), "float32", scope="local")
            sc = T.decl_buffer(({-(-l_ // lanes) * lanes},), "float32", scope="local")
            part = T.decl_buffer(({l_ * lanes},), "float32", scope="local")
            acc = T.decl_buffer(({d_},), "float32", scope="local")
            raw = T.decl_buffer((1,), "float32", scope="local")
            n[0] = T.int64({l_})
            while n[0] > T.int64(0) and not M[b, {mh}, s, n[0] - T.int64(1)]:
                n[0] = n[0] - T.int64(1)
            mx[0] = T.float32("-inf")
            nn: T.int64 = n[0]
            for l in range(nn):
                for di in T.vectorized({lanes}):
                    part[l * {lanes} + di] = T.float32(0)
                for do in range({dv}):
                    for di in T.vectorized({lanes}):
                        part[l * {lanes} + di] = part[l * {lanes} + di] + Q[b, h, s, {j}] * K[b, h // {g}, l, {j}]
            for l in range(nn):
                raw[0] = T.float32(0)
                for di in range({lanes}):
                    raw[0] = raw[0] + part[l * {lanes} + di]
                sc[l] = T.Select(M[b, {mh}, s, l], raw[0] * T.float32({spec.scale!r}), T.float32("-inf"))
            for l in range(nn):
                mx[0] = T.max(mx[0], sc[l])
            nv: T.int64 = (nn + {lanes - 1}) // {lanes}
            for l in range(nn, nv * {lanes}):
                sc[l] = T.float32("-inf")
            for lo in range(nv):
                for li in T.vectorized({lanes}):
                    sc[lo * {lanes} + li] = T.exp(sc[lo * {lanes} + li] - mx[0])
            z[0] = T.float32(0)
            for l in range(nn):
                z[0] = z[0] + sc[l]
            for d in T.vectorized({d_}):
                acc[d] = T.float32(0)
            for l in range(nn):
                for d in T.vectorized({d_}):
                    acc[d] = acc[d] + sc[l] * V[b, h // {g}, l, d]
            for d in T.vectorized({d_}):
                OUT[b, h, s, d] = acc[d] / z[0]
"""
    return tvm.script.from_source(src)
