"""The graph rewriters of ``kv_to_xcache``, one per mode (not a pass: the pass is in kv_to_xcache.py).

Each rewriter works on one entry. In a cache entry (``prefill``/``decode``) ``cache_block``
replaces a block's two K/V cache writes by writes of what the mode caches and computes K and V
for every cache position from it; in ``forward`` ``forward_block`` makes K and V from the same
quantize→dequantize of the cached quantity, so that ``forward`` equals prefill + decode.

* :class:`XRewriter` caches X (or, XQuant-CL, per-layer differences of X — or of the residual
  stream the attention norm reads — against a running reconstruction) and rematerializes
  ``K = RoPE(X̂·W_kᵀ)``, ``V = X̂·W_vᵀ``;
* :class:`LatentRewriter` caches ``X·U`` per projection and rematerializes ``(X̂U)·(Σ·Bᵀ)``;
* :class:`KVRewriter` (the KIVI-style baseline) quantizes the K/V caches themselves.

RoPE is re-applied by copying the graph's own path from the projection to its cache
(:func:`qcompile.ir.patterns.head_path`), with its position-dependent inputs replaced by tables for
positions ``0..max_cache_len-1`` evaluated once from the graph's own rotary subgraph.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from qcompile.errors import PassError
from qcompile.ir.patterns import AttentionBlock, HeadPath, KVProjection, ancestors, head_path, norm_source
from qcompile.ir.program import PATH_KEY, Entry, Program, Slot, SlotKind
from qcompile.quant.spec import Granularity, QuantSpec

aten = torch.ops.aten
qops = torch.ops.qcompile

StaticScales = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor | None]]  # (block, cache) -> (scale, offset)


def is_static(spec: QuantSpec | None) -> bool:
    """A cache quantizer with calibrated per-channel scales (stored as weights, nothing per token)."""
    return spec is not None and spec.granularity is Granularity.PER_CHANNEL


@dataclass(frozen=True)
class CacheLayout:
    """One block's caches: K and V cache shapes, the sequence axis, its length, X's dtype."""

    k_shape: tuple[int, ...]
    v_shape: tuple[int, ...]
    dim: int
    length: int
    x_dtype: torch.dtype


@dataclass
class CacheLedger:
    """The caches the rewriters add, across entries: specs must agree between entries."""

    caches: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # key -> (shape, dtype)
    bits: dict[str, int] = field(default_factory=dict)  # code cache key -> bits


class CacheGraph:
    """Graph building over one entry: ops, state and cache placeholders, quantize / store / finish."""

    def __init__(
        self,
        program: Program,
        entry: Entry,
        specs: dict[str, QuantSpec | None],
        static: StaticScales,
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
        ledger: CacheLedger,
        *,
        cross_layer: bool = False,
        residual: bool = False,
    ) -> None:
        self.p, self.e, self.g = program, entry, entry.graph.graph
        self.specs, self.static, self.factors, self.ledger = specs, static, factors, ledger
        self.cross_layer, self.residual = cross_layer, residual  # XQuant-CL, and over the residual stream
        self.path = ""

    # ---- graph building ---------------------------------------------------------------------
    def call(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        n = self.g.call_function(target, args, kwargs)
        n.meta[PATH_KEY] = self.path
        return n

    def state(self, name: str, t: torch.Tensor) -> fx.Node:
        for k, v in self.p.state.items():  # reuse an identical tensor added before (shared tables)
            if k.startswith("xcache.") and v.shape == t.shape and v.dtype == t.dtype and torch.equal(v, t):
                return self.e.state_input(k)
        return self.e.state_input(self.p.add_state(name, t))

    def cache_input(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> fx.Node:
        spec = (tuple(shape), str(dtype).removeprefix("torch."))
        if self.ledger.caches.setdefault(key, spec) != spec:
            raise PassError(
                f"kv_to_xcache: cache {key!r} gets shapes {self.ledger.caches[key]} and {spec} in different entries"
            )
        placeholders = self.e.placeholders()
        first_user = next(i for i, s in enumerate(self.e.slots) if s.kind is SlotKind.USER)
        with self.g.inserting_before(placeholders[first_user]):
            node = self.g.placeholder("c_" + "".join(c if c.isalnum() else "_" for c in key))
        node.meta[PATH_KEY] = ""
        self.e.slots.insert(first_user, Slot(SlotKind.CACHE, key))
        return node

    # ---- quantizers ---------------------------------------------------------------------------
    def fake_quant(self, x: fx.Node, spec: QuantSpec | None, static_key: tuple[int, str], width: int) -> fx.Node:
        """deq(Q(x)) for the forward entry."""
        if spec is None:
            return x
        codes, scale, offset, gs = self.quantize(x, spec, static_key, width)
        return self.call(qops.cache_dequantize.default, codes, scale, offset, gs)

    def quantize(
        self, x: fx.Node, spec: QuantSpec, static_key: tuple[int, str], width: int
    ) -> tuple[Any, Any, Any, int]:
        """(codes, scale, offset, group size; 0 for static per-channel scales held as state)."""
        if is_static(spec):
            s, o = self.static[static_key]
            sn = self.state(f"xcache.{static_key[0]}.{static_key[1]}.scale", s)
            on = self.state(f"xcache.{static_key[0]}.{static_key[1]}.offset", o) if o is not None else None
            codes = self.call(qops.cache_quantize_static.default, x, sn, on, spec.bits, spec.symmetric)
            return codes, sn, on, 0
        gs = spec.block(width)
        q = self.call(qops.cache_quantize.default, x, spec.bits, gs, spec.symmetric)
        codes = self.call(operator.getitem, q, 0)
        scale = self.call(operator.getitem, q, 1)
        offset = None if spec.symmetric else self.call(operator.getitem, q, 2)
        return codes, scale, offset, gs

    def store(
        self,
        x: fx.Node,
        spec: QuantSpec | None,
        static_key: tuple[int, str],
        key: str,
        shape: list[int],
        dim: int,
        pos: fx.Node,
        dtype: torch.dtype,
    ) -> tuple[fx.Node, fx.Node]:
        """Write x's new tokens into the cache(s) ``key.*``; returns (deq of the whole cache, deq of the new tokens)."""
        if spec is None:
            w = self.call(aten.index_copy_.default, self.cache_input(f"{key}", tuple(shape), dtype), dim, pos, x)
            return w, x
        codes, scale, offset, gs = self.quantize(x, spec, static_key, shape[-1])
        cdt = torch.int8 if spec.symmetric else torch.uint8
        wc = self.call(aten.index_copy_.default, self.cache_input(f"{key}.codes", tuple(shape), cdt), dim, pos, codes)
        self.ledger.bits[f"{key}.codes"] = spec.bits
        if gs == 0:  # static per-channel: scales are state, nothing per token
            ws, wo = scale, offset
        else:
            sshape = (*shape[:-1], shape[-1] // gs)
            ws = self.call(
                aten.index_copy_.default, self.cache_input(f"{key}.scale", sshape, torch.float16), dim, pos, scale
            )
            wo = None
            if offset is not None:
                wo = self.call(
                    aten.index_copy_.default, self.cache_input(f"{key}.offset", sshape, torch.float16), dim, pos, offset
                )
        all_ = self.call(qops.cache_dequantize.default, wc, ws, wo, gs)
        new = self.call(qops.cache_dequantize.default, codes, scale, offset, gs)
        return all_, new

    # ---- blocks -------------------------------------------------------------------------------
    def prepare(self, blocks: list[AttentionBlock]) -> None:
        """Whatever the cache blocks of this entry need computed once (nothing by default)."""

    def cache_block(self, b: AttentionBlock) -> int:
        """Rewrite one block of a cache entry; returns the bytes/token an fp16 K+V cache of it takes."""
        self.path = b.path
        assert b.k.cache_key is not None and b.v.cache_key is not None and b.k.write is not None
        k_shape = self.p.cache_specs[b.k.cache_key][0]
        v_shape = self.p.cache_specs[b.v.cache_key][0]
        dim = int(b.k.write.args[1])
        x_dtype = b.x.meta["val"].dtype if "val" in b.x.meta else torch.float32
        at = CacheLayout(k_shape, v_shape, dim, int(k_shape[dim]), x_dtype)
        self.rewrite_cache(b, at)
        return 2 * (math.prod(k_shape) + math.prod(v_shape)) // at.length

    def rewrite_cache(self, b: AttentionBlock, at: CacheLayout) -> None:
        raise NotImplementedError

    def forward_block(self, b: AttentionBlock) -> None:
        raise NotImplementedError

    def copy_nodes(self, nodes: Sequence[fx.Node], env: dict[fx.Node, fx.Node]) -> None:
        """Copy ``nodes`` (in graph order) at the insertion point, their inputs remapped through
        ``env``, which gains each copy; the copies carry the block's module path."""
        for n in nodes:
            env[n] = self.g.node_copy(n, lambda a: env.get(a, a))
            env[n].meta[PATH_KEY] = self.path

    def replace_write(self, proj: KVProjection, new: fx.Node) -> None:
        assert proj.write is not None
        proj.write.replace_all_uses_with(new)
        self.g.erase_node(proj.write)

    def finish(self) -> None:
        self.g.eliminate_dead_code()
        keep = []
        for slot, node in zip(list(self.e.slots), self.e.placeholders()):
            if slot.kind is SlotKind.CACHE and not node.users:
                self.g.erase_node(node)
            else:
                keep.append(slot)
        self.e.slots = keep
        self.e.graph.recompile()


class KVRewriter(CacheGraph):
    """``mode: kv``: the (post-RoPE) K and V caches themselves hold codes."""

    def rewrite_cache(self, b: AttentionBlock, at: CacheLayout) -> None:
        for name, proj, shape in (("k", b.k, at.k_shape), ("v", b.v, at.v_shape)):
            assert proj.write is not None and proj.src is not None
            with self.g.inserting_before(proj.write):
                all_, _ = self.store(
                    proj.src,
                    self.specs[name],
                    (b.index, name),
                    f"kvq.{b.index}.{name}",
                    list(shape),
                    at.dim,
                    proj.write.args[2],
                    at.x_dtype,
                )
            self.replace_write(proj, all_)

    def forward_block(self, b: AttentionBlock) -> None:
        self.path = b.path
        for name, proj in (("k", b.k), ("v", b.v)):
            assert proj.src is not None
            users = list(proj.src.users)
            order = {n: i for i, n in enumerate(self.g.nodes)}
            with self.g.inserting_before(min(users, key=order.__getitem__)):
                fq = self.fake_quant(proj.src, self.specs[name], (b.index, name), int(proj.src.meta["val"].shape[-1]))
            for u in users:
                u.replace_input_with(proj.src, fq)


class _Remat(CacheGraph):
    """K and V rematerialized for every cache position from a cached source, through the graph's
    own head path (view, transpose, per-head norms, RoPE for K)."""

    def prepare(self, blocks: list[AttentionBlock]) -> None:
        """Plan the K/V rematerialization of every block and compute the position tables (RoPE cos/sin
        for positions 0..max_cache_len-1) of all blocks in one evaluation per position."""
        self.remat: dict[int, tuple[HeadPath, list[torch.Tensor]]] = {}
        if not blocks:
            return
        bindings = self.e.bindings()
        plans = {id(proj): head_path(self.g, b, proj, bindings) for b in blocks for proj in (b.k, b.v)}
        ext = list(dict.fromkeys(e for pl in plans.values() for e in pl.externals))
        first = blocks[0].k
        assert first.write is not None and first.cache_key is not None
        dim = int(first.write.args[1])
        length = int(self.p.cache_specs[first.cache_key][0][dim])
        values = dict(zip(ext, _position_tables(self.p, self.e, ext, dim, length))) if ext else {}
        for key, hp in plans.items():
            self.remat[key] = (hp, [values[e] for e in hp.externals])

    def sources(self, b: AttentionBlock, pos: fx.Node, length: int, x_dtype: torch.dtype) -> dict[int, fx.Node]:
        """Per projection (by id), the dequantized cache contents K or V is computed from."""
        raise NotImplementedError

    def project(self, b: AttentionBlock, name: str, proj: KVProjection, source: fx.Node) -> fx.Node:
        """K or V (before the head path) for every cache position from ``source``."""
        raise NotImplementedError

    def rewrite_cache(self, b: AttentionBlock, at: CacheLayout) -> None:
        assert b.k.write is not None and b.v.write is not None
        pos = b.k.write.args[2]
        order = {n: i for i, n in enumerate(self.g.nodes)}
        first = min(b.k.write, b.v.write, key=order.__getitem__)
        outs = {}
        with self.g.inserting_before(first):
            sources = self.sources(b, pos, at.length, at.x_dtype)
            for name, proj, shape in (("k", b.k, at.k_shape), ("v", b.v, at.v_shape)):
                lin = self.project(b, name, proj, sources[id(proj)])
                hp, tables = self.remat[id(proj)]
                env: dict[fx.Node, fx.Node] = {proj.lin: lin}
                for i, (ext, t) in enumerate(zip(hp.externals, tables)):
                    env[ext] = self.state(f"xcache.rope_table.{b.index}.{name}.{i}", t)
                for n in hp.nodes:  # the graph's own path, its one view resized to every cache position
                    if n is hp.view:
                        env[n] = self.call(aten.view.default, env[n.args[0]], [shape[0], at.length, shape[1], shape[3]])
                    else:
                        self.copy_nodes([n], env)
                outs[name] = env[proj.src]
        self.replace_write(b.k, outs["k"])
        self.replace_write(b.v, outs["v"])


class LatentRewriter(_Remat):
    """``mode: latent``: per projection the cache holds ``Q(X·U)``; ``K = (X̂U)·(Σ·Bᵀ)`` (same for V).

    The two factor linears carry the projection's module path, so a later ``quantize_weights`` gives
    them the projection's own rule. Over an already quantized projection the factors are those of the
    weight its codes encode (``X·W_qᵀ`` exactly); they are float, and the projection's activation
    quantization is replaced by the cache's quantizer of ``X·U``."""

    def latent_linear(self, proj: KVProjection, x: fx.Node, key: str, t: torch.Tensor, *bias: object) -> fx.Node:
        n = self.call(aten.linear.default, x, self.state(key, t), *bias)
        n.meta[PATH_KEY] = proj.lin.meta.get(PATH_KEY, self.path)
        return n

    def sources(self, b: AttentionBlock, pos: fx.Node, length: int, x_dtype: torch.dtype) -> dict[int, fx.Node]:
        out = {}
        for name, proj in (("k", b.k), ("v", b.v)):
            u_t, _ = self.factors[proj.weight_key]
            z = self.latent_linear(proj, b.x, f"xcache.{b.index}.{name}.U_t", u_t)
            r = u_t.shape[0]
            out[id(proj)], _ = self.store(
                z, self.specs[name], (b.index, name), f"xcache.{b.index}.{name}_latent", [1, length, r], 1, pos, x_dtype
            )
        return out

    def project(self, b: AttentionBlock, name: str, proj: KVProjection, source: fx.Node) -> fx.Node:
        _, sb_t = self.factors[proj.weight_key]
        return self.latent_linear(proj, source, f"xcache.{b.index}.{name}.SB_t", sb_t, proj.bias)

    def forward_block(self, b: AttentionBlock) -> None:
        self.path = b.path
        for name, proj in (("k", b.k), ("v", b.v)):
            u_t, sb_t = self.factors[proj.weight_key]
            with self.g.inserting_before(proj.lin):
                z = self.latent_linear(proj, b.x, f"xcache.{b.index}.{name}.U_t", u_t)
                zh = self.fake_quant(z, self.specs[name], (b.index, name), int(u_t.shape[0]))
                new = self.latent_linear(proj, zh, f"xcache.{b.index}.{name}.SB_t", sb_t, proj.bias)
            proj.lin.replace_all_uses_with(new)
            self.g.erase_node(proj.lin)


class XRewriter(_Remat):
    """``mode: x``: the cache holds ``Q(X)``, or with ``cross_layer`` (XQuant-CL) ``Q(X_0)`` and the
    per-layer differences ``Q(X_l − A_(l-1))`` against the running reconstruction ``A`` (over the
    residual stream the attention norm reads with ``cl_space: residual``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acc_new: fx.Node | None = None  # XQuant-CL accumulators (new tokens / all cached positions)
        self.acc_all: fx.Node | None = None

    def sources(self, b: AttentionBlock, pos: fx.Node, length: int, x_dtype: torch.dtype) -> dict[int, fx.Node]:
        x_all = self._store_x(b, pos, length, x_dtype)
        return {id(b.k): x_all, id(b.v): x_all}

    def project(self, b: AttentionBlock, name: str, proj: KVProjection, source: fx.Node) -> fx.Node:
        # the projection's own op on X̂: the same (float or quantized) weights the forward uses
        return self.call(proj.lin.target, source, *proj.lin.args[1:], **proj.lin.kwargs)

    def _store_x(self, b: AttentionBlock, pos: fx.Node, length: int, x_dtype: torch.dtype) -> fx.Node:
        d = int(b.x.meta["val"].shape[-1])
        key = f"xcache.{b.index}.x"
        if not self.cross_layer:
            all_, _ = self.store(b.x, self.specs["x"], (b.index, "x"), key, [1, length, d], 1, pos, x_dtype)
            return all_
        src = b.x
        if self.residual:
            src, norm_nodes = norm_source(self.g, b.x)
        if self.acc_new is None:
            all_, new = self.store(src, self.specs["x0"], (b.index, "x0"), key, [1, length, d], 1, pos, x_dtype)
        else:
            assert self.acc_all is not None
            diff = self.call(aten.sub.Tensor, src, self.acc_new)
            d_all, d_new = self.store(
                diff, self.specs["x"], (b.index, "x"), f"{key}_delta", [1, length, d], 1, pos, x_dtype
            )
            all_ = self.call(aten.add.Tensor, self.acc_all, d_all)
            new = self.call(aten.add.Tensor, self.acc_new, d_new)
        self.acc_all, self.acc_new = all_, new
        if self.residual:
            return self._copy_norm(src, norm_nodes, b.x, all_)
        return all_

    def _copy_norm(self, h: fx.Node, nodes: list[fx.Node], x: fx.Node, new_h: fx.Node) -> fx.Node:
        env: dict[fx.Node, fx.Node] = {h: new_h}
        self.copy_nodes(nodes, env)
        return env[x]

    def forward_block(self, b: AttentionBlock) -> None:
        self.path = b.path
        d = int(b.x.meta["val"].shape[-1])
        with self.g.inserting_before(b.k.lin):
            if self.cross_layer:
                src = b.x
                if self.residual:
                    src, norm_nodes = norm_source(self.g, b.x)
                if self.acc_new is None:
                    xh = self.fake_quant(src, self.specs["x0"], (b.index, "x0"), d)
                else:
                    diff = self.call(aten.sub.Tensor, src, self.acc_new)
                    xh = self.call(
                        aten.add.Tensor, self.acc_new, self.fake_quant(diff, self.specs["x"], (b.index, "x"), d)
                    )
                self.acc_new = xh
                if self.residual:
                    xh = self._copy_norm(src, norm_nodes, b.x, xh)
            else:
                xh = self.fake_quant(b.x, self.specs["x"], (b.index, "x"), d)
            b.k.lin.replace_input_with(b.x, xh)
            b.v.lin.replace_input_with(b.x, xh)


def _position_tables(
    program: Program, entry: Entry, nodes: list[fx.Node], seq_dim: int, length: int
) -> list[torch.Tensor]:
    """Values of ``nodes`` (position-dependent, content-independent) for positions 0..length-1,
    by evaluating the entry's own subgraph for one token at each position; concatenated on ``seq_dim``."""
    anc = ancestors(nodes)
    placeholders = entry.placeholders()
    ordered = [n for n in entry.graph.graph.nodes if n.op == "call_function" and n in anc]
    cols: list[list[torch.Tensor]] = [[] for _ in nodes]
    for p in range(length):
        env: dict[fx.Node, Any] = {}
        for ph, slot in zip(placeholders, entry.slots):
            if ph not in anc:
                continue
            if slot.kind is SlotKind.STATE:
                env[ph] = program.state[slot.name]
            elif slot.kind is SlotKind.CACHE:
                shape, dt = program.cache_specs[slot.name]
                env[ph] = torch.zeros(shape, dtype=getattr(torch, dt))
        users = [ph for ph, s in zip(placeholders, entry.slots) if s.kind is SlotKind.USER]
        for ph, spec in zip(users, entry.user_inputs):
            if len(spec.shape) == 1:
                env[ph] = torch.tensor([p], dtype=spec.torch_dtype)  # positions
            else:
                env[ph] = torch.zeros([1] * len(spec.shape), dtype=spec.torch_dtype)  # token ids
        with torch.no_grad():
            for n in ordered:
                args = fx.node.map_arg(n.args, env.__getitem__)
                kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
                env[n] = n.target(*args, **kwargs)
        for i, n in enumerate(nodes):
            cols[i].append(env[n])
    return [torch.cat(c, dim=seq_dim).contiguous() for c in cols]
