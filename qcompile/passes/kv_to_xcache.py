"""kv_to_xcache: XQuant — cache quantized X (or a low-rank latent of it) instead of K and V.

What it does. Every attention block is found by graph matching (no module names): in the
cache entries (``prefill``/``decode``) a cache write ``aten.index_copy_(cache, dim, pos, src)``
whose ``src`` comes from exactly one ``aten.linear(X, W)`` with a constant weight (through
view/transpose and, for K, RoPE), and whose result is read (through GQA repeat ops) as the key
or value of one ``aten.scaled_dot_product_attention``; the K and V writes of one attention must
share the same X (the normed activation). In ``forward`` (no cache) the same K/V projections are
found from the attention's key/value inputs. Then, depending on ``mode``:

* ``x``: per layer the cache holds ``Q(X)`` (codes + float16 scales) for every position;
  each step writes the new tokens' codes, dequantizes the whole cache and rematerializes
  ``K = RoPE(X̂·W_kᵀ)`` and ``V = X̂·W_vᵀ`` for all cache positions. RoPE is re-applied by copying
  the graph's own RoPE subgraph (whatever it is) onto the rematerialized K, with its
  position-dependent inputs (cos/sin) replaced by tables for positions ``0..max_cache_len-1``
  that the pass computes once by evaluating the graph's own rotary subgraph per position.
* ``latent`` (GQA, where X is wider than K and V together): offline SVD in float64,
  ``W_kᵀ = U·Σ·Bᵀ`` with rank = the K width; the cache holds ``Q(X·U)`` and
  ``K = (X̂U)·(Σ·Bᵀ)`` (same for V with its own SVD). ``auto`` picks ``latent`` when
  ``dim(K) + dim(V) < dim(X)``, else ``x``.
* ``kv``: the KIVI-style baseline: the (post-RoPE) K and V caches themselves are quantized,
  K with ``k_granularity`` (default per-channel), V with ``v_granularity`` (default per-token).

Quantizers (``qcompile/ops/cache.py``): ``bits`` 2..8 (0 = no quantization: a float X / latent
cache, for checking the rewrite itself), ``per_token``: dynamic, one fp16 scale (and offset when
asymmetric) per ``group_size`` consecutive channels of a token (0 = the whole token);
``per_channel``: one static scale (offset) per channel, calibrated on the calibration data
(``max |x|`` or min/max per channel over the calibration tokens; values outside are clipped) and
stored with the weights, so it costs no bytes per token. KIVI quantizes K per channel over groups
of tokens with a float residual window; a static calibrated per-channel scale is the causal
variant that keeps every token's code independent of later tokens.

Why ``forward`` equals token-by-token decoding. Every quantizer here quantizes each token on its
own (per-token scales from that token only; per-channel scales fixed in advance), and the
XQuant-CL accumulator runs along layers, not tokens. So the value of the cache at position t is
the same whether t was written by ``prefill``, ``decode`` or seen by ``forward``; ``forward``
applies the same quantize→dequantize to X (the K/V projections' input only; Q still sees the
exact X, as in decoding) and computes K, V from it, which is what decoding reads back from the
cache. Perplexity therefore runs with the quantized cache in the loop. (tested:
``forward`` logits = prefill + decode logits for every position.)

XQuant-CL (``cross_layer: true``, mode ``x``). Per layer l and token the cache holds the codes
and fp16 scales of ``D_0 = X_0`` and ``D_l = X_l − A_{l-1}`` (l ≥ 1), where the accumulator
``A_l = A_{l-1} + deq(Q(D_l))`` (``A_0 = deq(Q(X_0))``) is the running reconstruction, and
layer l uses ``X̂_l = A_l``. The difference is taken against the *reconstruction*, not against
the exact ``X_{l-1}``, so ``X_l − X̂_l = D_l − deq(Q(D_l))`` is only layer l's own quantization
error: errors do not accumulate over depth (closed loop). Decoding rebuilds ``A_l`` for all
cached positions as ``Σ_{j≤l} deq(cache_j)``, one dequantize and add per layer.
``first_layer_bits`` (default: ``bits``) sets the width of layer 0's absolute ``X_0``.
``cl_space: residual`` applies the same closed loop to the residual stream ``h_l`` that the
layer's attention norm reads (found by matching: the nearest ancestor of X that also feeds the
residual path; the nodes between must read only weights): the cache holds ``Q(h_0)`` and
``Q(h_l − A_{l-1})``, and ``X̂_l = norm_l(A_l)`` is recomputed by a copy of the graph's own norm.
On SmolLM2 (calibration text) consecutive post-norm X differ by 26–104 % of their norm (the
per-layer norm weights differ), the residual stream by 3–13 % in most middle layers, which is the
cross-layer similarity XQuant-CL relies on.

Requires: a captured causal LM (an entry with attention). Guarantees: the K/V caches of every
matched block are gone from ``cache_specs``, replaced by the new caches; ``meta['cache_bits']``
gives the packed width of every code cache (for ``Program.cache_bytes_per_token``),
``meta['xcache']`` what is cached and ``meta['fp16_kv_bytes_per_token']`` the fp16 KV cache it
replaces. A model without a recognizable attention block is an error naming the pattern expected.
"""

from __future__ import annotations

import enum
import math
import operator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx

from qcompile.errors import PassError, PlanError
from qcompile.ir.facts import Fact
from qcompile.ir.patterns import state_key
from qcompile.ir.program import PATH_KEY, Entry, Program, Slot, SlotKind
from qcompile.passes.base import Pass, PassContext, PassResult, as_enum, register_pass
from qcompile.quant.spec import BITS, Granularity, QuantSpec, levels

aten = torch.ops.aten
qops = torch.ops.qcompile



class Mode(str, enum.Enum):
    AUTO = "auto"  # latent when K and V together are narrower than X, else x
    X = "x"
    LATENT = "latent"
    KV = "kv"


class ClSpace(str, enum.Enum):
    X = "x"  # XQuant-CL over the normed X
    RESIDUAL = "residual"  # over the residual stream the norm reads


GRANULARITIES = (Granularity.PER_TOKEN, Granularity.PER_CHANNEL)
EXPECTED = (
    "an attention block: a normed activation X feeding two aten.linear projections (K and V) with "
    "constant weights, whose outputs (after view/transpose and, for K, RoPE) are written with "
    "aten.index_copy_ into cache tensors that aten.scaled_dot_product_attention reads as key and value"
)
_SHAPE_OPS = {aten.view.default, aten.reshape.default, aten.transpose.int, aten._unsafe_view.default}
_REPEAT_OPS = {
    aten.unsqueeze.default, aten.expand.default, aten.reshape.default, aten.view.default, aten.clone.default,
    aten.contiguous.default, aten._unsafe_view.default, aten.repeat_interleave.self_int, aten.alias.default,
}


def cache_spec(bits: int, group_size: int, symmetric: bool, granularity: Granularity) -> QuantSpec | None:
    """The quantizer of one cache: None for a float cache (``bits == 0``); ``per_token`` with groups of
    ``group_size`` channels of a token (0: the whole token) is dynamic; ``per_channel`` is static."""
    if bits == 0:
        return None
    if granularity is Granularity.PER_CHANNEL:
        return QuantSpec(bits, Granularity.PER_CHANNEL, symmetric, dynamic=False)
    if group_size == 0:
        return QuantSpec(bits, Granularity.PER_TOKEN, symmetric)
    return QuantSpec(bits, Granularity.PER_GROUP, symmetric, group_size=group_size)


def _static(spec: QuantSpec | None) -> bool:
    return spec is not None and spec.granularity is Granularity.PER_CHANNEL


@dataclass
class _Proj:
    """One K or V projection of an attention block."""

    lin: fx.Node
    weight_key: str
    bias: Any
    write: fx.Node | None = None  # cache entries: the index_copy_ writing the cache
    src: fx.Node | None = None  # what is written (cache layout [B, H, T, hd]); forward: K/V fed to attention
    cache_key: str | None = None


@dataclass
class _Block:
    x: fx.Node
    k: _Proj
    v: _Proj
    sdpa: fx.Node
    path: str
    index: int = -1
    extra: dict[str, Any] = field(default_factory=dict)


@register_pass
@dataclass(frozen=True)
class KVToXCache(Pass):
    name: ClassVar[str] = "kv_to_xcache"
    requires: ClassVar[frozenset[Fact]] = frozenset({Fact.CAPTURED, Fact.FLOAT_LINEARS, Fact.KV_ATTENTION})
    provides: ClassVar[frozenset[Fact]] = frozenset({Fact.XCACHE})
    invalidates: ClassVar[frozenset[Fact]] = frozenset({Fact.KV_ATTENTION})

    mode: Mode = Mode.AUTO
    bits: int = 4
    group_size: int = 64
    symmetric: bool = True
    granularity: Granularity = Granularity.PER_TOKEN
    cross_layer: bool = False
    first_layer_bits: int = 0
    cl_space: ClSpace = ClSpace.X
    k_granularity: Granularity = Granularity.PER_CHANNEL
    v_granularity: Granularity = Granularity.PER_TOKEN

    def __post_init__(self) -> None:
        as_enum(self, "mode", Mode)
        as_enum(self, "cl_space", ClSpace)
        for name in ("bits", "first_layer_bits"):
            b = getattr(self, name)
            if not isinstance(b, int) or isinstance(b, bool) or not (b == 0 or b in BITS):
                raise PlanError(f"kv_to_xcache: {name} must be 0 (no quantization) or one of {list(BITS)} cache bits, got {b!r}")
        if not isinstance(self.group_size, int) or self.group_size < 0:
            raise PlanError(f"kv_to_xcache: group_size must be 0 (whole token) or a positive divisor of the cached width, got {self.group_size!r}")
        for name in ("granularity", "k_granularity", "v_granularity"):
            g = as_enum(self, name, Granularity)
            if g not in GRANULARITIES:
                raise PlanError(f"kv_to_xcache: {name} {g.value!r} is not one of {[x.value for x in GRANULARITIES]}")
        if self.cross_layer and self.mode in (Mode.LATENT, Mode.KV):
            raise PlanError("kv_to_xcache: cross_layer (XQuant-CL) caches X differences; it needs mode 'x' (or 'auto')")
        if self.cross_layer and self.granularity is not Granularity.PER_TOKEN:
            raise PlanError("kv_to_xcache: cross_layer (XQuant-CL) needs per_token quantization")

    # ---- top level -----------------------------------------------------------------------
    def run(self, program: Program, ctx: PassContext) -> PassResult:
        cache_entries = [e for e in program.entries.values() if any(s.kind is SlotKind.CACHE for s in e.slots)]
        found = {e.name: _match_cache_entry(program, e, ctx) for e in cache_entries}
        fwd = program.entries.get("forward")
        fwd_blocks = _match_forward(program, fwd, ctx) if fwd is not None else []
        ctx.at(None, None)
        any_blocks = [b for bs in found.values() for b in bs] or fwd_blocks
        if not any_blocks:
            where = ", ".join(program.entries) or "(no entries)"
            raise PassError(f"kv_to_xcache found no attention block in entries [{where}]; expected {EXPECTED}")
        order = [b.k.weight_key for b in (next((bs for bs in found.values() if bs), None) or fwd_blocks)]
        for bs in [*found.values(), fwd_blocks]:
            keys = [b.k.weight_key for b in bs]
            if bs and keys != order:
                raise PassError(f"kv_to_xcache: entries disagree on the attention blocks ({len(keys)} vs {len(order)} K projections)")
            for i, b in enumerate(bs):
                b.index = i
        first = any_blocks[0]
        d_x = int(program.state[first.k.weight_key].shape[1])
        d_k = int(program.state[first.k.weight_key].shape[0])
        d_v = int(program.state[first.v.weight_key].shape[0])
        mode = self.mode.value if self.mode is not Mode.AUTO else ("latent" if d_k + d_v < d_x and not self.cross_layer else "x")

        specs = self._specs(mode)
        self._check_groups(mode, specs, d_x, d_k, d_v, first)
        # static per-channel scales: calibrated on the original forward entry, before rewriting
        static = self._calibrate(program, ctx, mode, specs, fwd, fwd_blocks) if any(_static(s) for s in specs.values()) else {}
        factors = _latent_factors(program, order, fwd_blocks or any_blocks) if mode == "latent" else {}

        kv_fp16 = 0
        new_caches: dict[str, tuple[tuple[int, ...], str]] = {}
        bits_meta: dict[str, int] = {}
        for e in cache_entries:
            blocks = found[e.name]
            if not blocks:
                continue
            kv_fp16 = 0
            rw = _Rewriter(program, e, mode, specs, static, factors, self, new_caches, bits_meta)
            rw.prepare(blocks)
            for b in blocks:
                ctx.at(e, b.k.write)
                kv_fp16 += rw.rewrite_cache_block(b)
            rw.finish()
        if fwd is not None and fwd_blocks:
            rw = _Rewriter(program, fwd, mode, specs, static, factors, self, new_caches, bits_meta)
            for b in fwd_blocks:
                ctx.at(fwd, b.k.lin)
                rw.rewrite_forward_block(b)
            rw.finish()
        ctx.at(None, None)
        program.cache_specs.update(new_caches)
        program.cache_bits.update(bits_meta)
        for key in list(program.cache_specs):  # drop caches no entry uses any more
            if not any(s.kind is SlotKind.CACHE and s.name == key for en in program.entries.values() for s in en.slots):
                del program.cache_specs[key]
                program.cache_bits.pop(key, None)
        program.finish_rewrite(set(program.entries))
        per_token = program.cache_bytes_per_token()
        describe = self._describe(mode, specs, len(order), d_x, d_k, d_v)
        program.meta["xcache"] = describe
        if kv_fp16:
            program.fp16_kv_bytes = kv_fp16
        notes = {
            **describe,
            "cache_bytes_per_token": per_token,
            "fp16_kv_bytes_per_token": kv_fp16 or None,
            "saving_vs_fp16_kv": round(kv_fp16 / per_token, 3) if per_token and kv_fp16 else None,
        }
        paths = [b.path for b in (fwd_blocks or any_blocks)]
        return PassResult(program, modified=True, layers_changed=paths, notes=notes)

    @classmethod
    def summarize(cls, notes: dict[str, Any]) -> list[str]:
        if notes.get("cache_bytes_per_token") is None:
            return []
        return [
            f"cache: {notes['cache_bytes_per_token']} B/token (all layers, scales included) vs fp16 KV "
            f"{notes.get('fp16_kv_bytes_per_token')} B/token: saving x{notes.get('saving_vs_fp16_kv')}; {notes.get('cached_per_layer', '')}"
        ]

    # ---- options -> quantizers ------------------------------------------------------------
    def _specs(self, mode: str) -> dict[str, QuantSpec | None]:
        if mode == "kv":
            return {
                "k": cache_spec(self.bits, self.group_size, self.symmetric, self.k_granularity),
                "v": cache_spec(self.bits, self.group_size, self.symmetric, self.v_granularity),
            }
        base = cache_spec(self.bits, self.group_size, self.symmetric, self.granularity)
        if mode == "x":
            out = {"x": base}
            if self.cross_layer:
                out["x0"] = cache_spec(self.first_layer_bits or self.bits, self.group_size, self.symmetric, Granularity.PER_TOKEN)
            return out
        return {"k": base, "v": base}

    def _check_groups(self, mode: str, specs: dict[str, QuantSpec | None], d_x: int, d_k: int, d_v: int, b: _Block) -> None:
        widths = {"x": d_x, "x0": d_x}
        if mode == "latent":
            widths.update(k=d_k, v=d_v)
        elif mode == "kv":
            hd = _head_dim(b)
            widths.update(k=hd, v=hd)
        for name, s in specs.items():
            if s is None or s.granularity is not Granularity.PER_GROUP or s.group_size is None:
                continue
            c = widths[name]
            if c % s.group_size:
                divisors = [d for d in range(8, c + 1, 8) if c % d == 0]
                raise PlanError(
                    f"kv_to_xcache: group_size {s.group_size} does not divide the {c} channels of the "
                    f"{'head of ' if mode == 'kv' else ''}{name} cache (mode {mode!r}); use 0 (whole token) or one of {divisors}"
                )

    def _calibrate(self, program: Program, ctx: PassContext, mode: str, specs: dict[str, QuantSpec | None], fwd: Entry | None, blocks: list[_Block]) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor | None]]:
        from qcompile.quant.calib import calib_batches, run_observed

        if fwd is None or not blocks:
            raise PlanError("kv_to_xcache: per_channel cache quantization calibrates its scales on the forward entry, which this Program lacks")
        batches = calib_batches(ctx.calib, who="kv_to_xcache (per_channel cache scales)")
        stats: dict[tuple[int, str], list[torch.Tensor]] = {}
        observers = {}

        def observe(key: tuple[int, str], which: int, transform=None):
            def fn(_node: fx.Node, args: tuple) -> None:
                t = args[which].detach().to(torch.float32)
                if transform is not None:
                    t = transform(t)
                dims = (0, 2) if t.dim() == 4 else tuple(range(t.dim() - 1))  # all but the channel axes
                lo, hi = t.amin(dim=dims, keepdim=True), t.amax(dim=dims, keepdim=True)
                old = stats.get(key)
                stats[key] = [lo, hi] if old is None else [torch.minimum(old[0], lo), torch.maximum(old[1], hi)]
            return fn

        factors = _latent_factors(program, [b.k.weight_key for b in blocks], blocks) if mode == "latent" else {}
        for b in blocks:
            for name, s in specs.items():
                if not _static(s):
                    continue
                if mode == "x":
                    observers[b.k.lin] = observe((b.index, name), 0)
                elif mode == "latent":
                    proj = b.k if name == "k" else b.v
                    u = factors[proj.weight_key][0]
                    observers.setdefault(proj.lin, observe((b.index, name), 0, lambda t, u=u: t @ u.t()))
                else:  # kv: the K / V tensors the attention reads (post-RoPE K)
                    proj = b.k if name == "k" else b.v
                    user = next(iter(proj.src.users))
                    observers[user] = observe((b.index, name), list(user.args).index(proj.src))
        run_observed(program, batches, observers, entry="forward", progress=ctx.progress, desc="kv_to_xcache scales")
        out = {}
        for key, (lo, hi) in stats.items():
            s = specs[key[1]]
            assert s is not None
            qmin, qmax = s.levels
            if s.symmetric:
                scale = torch.maximum(lo.abs(), hi.abs()) / qmax
                offset = None
            else:
                scale = (hi - lo) / (qmax - qmin)
                offset = lo
            out[key] = (torch.where(scale > 0, scale, torch.ones_like(scale)), offset)
        return out

    def _describe(self, mode: str, specs: dict[str, QuantSpec | None], layers: int, d_x: int, d_k: int, d_v: int) -> dict[str, Any]:
        def q(s: QuantSpec | None) -> str:
            if s is None:
                return "float (no quantization)"
            g = f"groups of {s.group_size}" if s.granularity is Granularity.PER_GROUP else "whole token"
            where = "static per_channel scales (calibrated)" if _static(s) else f"per_token fp16 scales, {g}"
            return f"{s.bits}-bit {'symmetric' if s.symmetric else 'asymmetric'} codes, {where}"

        if mode == "x" and self.cross_layer and self.cl_space is ClSpace.RESIDUAL:
            what = (f"layer 0: Q(h_0) [{d_x}] ({q(specs['x0'])}); layer l>0: Q(h_l - A_(l-1)) [{d_x}] ({q(specs['x'])}), where h_l is "
                    "the residual stream the layer's attention norm reads, A_l = A_(l-1) + deq(Q(.)) its running reconstruction "
                    "and X_l = norm_l(A_l) is recomputed with the layer's own norm")
        elif mode == "x" and self.cross_layer:
            what = (f"layer 0: Q(X_0) [{d_x}] ({q(specs['x0'])}); layer l>0: Q(X_l - A_(l-1)) [{d_x}] ({q(specs['x'])}), "
                    "A_l = A_(l-1) + deq(Q(.)) the running reconstruction")
        elif mode == "x":
            what = f"Q(X) [{d_x}] per layer ({q(specs['x'])})"
        elif mode == "latent":
            what = f"Q(X·U_k) [{d_k}] and Q(X·U_v) [{d_v}] per layer ({q(specs['k'])})"
        else:
            what = f"K (post-RoPE) [{d_k}]: {q(specs['k'])}; V [{d_v}]: {q(specs['v'])}"
        return {"mode": mode, "cross_layer": self.cross_layer, "layers": layers, "cached_per_layer": what}


# ---- matching ----------------------------------------------------------------------------------


def _single_linear_ancestor(program: Program, bindings: dict, node: fx.Node) -> fx.Node | None:
    """The one aten.linear with a constant weight that ``node`` derives from (not looking past linears)."""
    found, seen, todo = [], set(), [node]
    while todo:
        n = todo.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        if n.op == "call_function" and n.target == aten.linear.default:
            wkey = state_key(bindings, n.args[1])
            if wkey is not None and program.state[wkey].dim() == 2:
                found.append(n)
            continue
        todo.extend(n.all_input_nodes)
    return found[0] if len(found) == 1 else None


def _attention_reader(node: fx.Node) -> tuple[fx.Node, int] | None:
    """(sdpa node, 1 for key / 2 for value) reading ``node`` through GQA repeat/reshape ops."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if u.op != "call_function":
                continue
            if u.target == aten.scaled_dot_product_attention.default:
                for i in (1, 2):
                    if len(u.args) > i and u.args[i] is n:
                        return u, i
            elif u.target in _REPEAT_OPS:
                todo.append(u)
    return None


def _proj_of(program: Program, bindings: dict, lin: fx.Node) -> _Proj:
    bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
    return _Proj(lin, state_key(bindings, lin.args[1]), bias)


def _group_blocks(pairs: list[tuple[fx.Node, fx.Node, int, _Proj]], entry: Entry, ctx: PassContext) -> list[_Block]:
    by_sdpa: dict[fx.Node, dict[int, _Proj]] = {}
    for sdpa, _anchor, role, proj in pairs:
        by_sdpa.setdefault(sdpa, {})[role] = proj
    blocks = []
    order = {n: i for i, n in enumerate(entry.graph.graph.nodes)}
    for sdpa, roles in sorted(by_sdpa.items(), key=lambda kv: order[kv[0]]):
        if set(roles) != {1, 2}:
            continue
        k, v = roles[1], roles[2]
        if k.lin.args[0] is not v.lin.args[0]:
            ctx.at(entry, sdpa)
            raise PassError(f"kv_to_xcache: the K and V projections of this attention read different inputs "
                            f"(%{k.lin.args[0]} and %{v.lin.args[0]}); expected {EXPECTED}")
        path = str(sdpa.meta.get(PATH_KEY, ""))
        blocks.append(_Block(k.lin.args[0], k, v, sdpa, path))
    return blocks


def _match_cache_entry(program: Program, entry: Entry, ctx: PassContext) -> list[_Block]:
    bindings = entry.bindings()
    pairs = []
    for node in list(entry.graph.graph.nodes):
        if node.op != "call_function" or node.target != aten.index_copy_.default:
            continue
        slot = bindings.get(node.args[0])
        if slot is None or slot.kind is not SlotKind.CACHE:
            continue
        ctx.at(entry, node)
        src = node.args[3]
        lin = _single_linear_ancestor(program, bindings, src)
        reader = _attention_reader(node)
        if lin is None or reader is None:
            continue
        proj = _proj_of(program, bindings, lin)
        proj.write, proj.src, proj.cache_key = node, src, slot.name
        pairs.append((reader[0], node, reader[1], proj))
    return _group_blocks(pairs, entry, ctx)


def _match_forward(program: Program, entry: Entry, ctx: PassContext) -> list[_Block]:
    bindings = entry.bindings()
    pairs = []
    for node in list(entry.graph.graph.nodes):
        if node.op != "call_function" or node.target != aten.scaled_dot_product_attention.default:
            continue
        ctx.at(entry, node)
        for role in (1, 2):
            src = node.args[role]
            while isinstance(src, fx.Node) and src.op == "call_function" and src.target in _REPEAT_OPS - {aten.view.default}:
                src = src.args[0]  # undo GQA repeat (unsqueeze/expand/reshape) to the [B, Hkv, T, hd] tensor
            lin = _single_linear_ancestor(program, bindings, src)
            if lin is None:
                continue
            proj = _proj_of(program, bindings, lin)
            proj.src = src
            pairs.append((node, None, role, proj))
    return _group_blocks(pairs, entry, ctx)


def _head_dim(b: _Block) -> int:
    val = (b.k.src or b.k.lin).meta.get("val")
    return int(val.shape[-1])


# ---- numerics helpers ----------------------------------------------------------------------------


def _latent_factors(program: Program, weight_keys: list[str], blocks: list[_Block]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """weight key -> (Uᵀ [r, D], (Σ·Bᵀ)ᵀ [N, r]) with W = ((Σ·Bᵀ)ᵀ)·Uᵀ, from a float64 SVD of Wᵀ."""
    out = {}
    for b in blocks:
        for proj in (b.k, b.v):
            if proj.weight_key in out:
                continue
            w = program.state[proj.weight_key]
            wt = w.detach().to(torch.float64).t()  # [D, N]
            u, s, vh = torch.linalg.svd(wt, full_matrices=False)  # rank = N when N <= D
            r = min(w.shape)
            u_t = u[:, :r].t().contiguous()  # [r, D]
            sb_t = (s[:r, None] * vh[:r]).t().contiguous()  # [N, r]
            out[proj.weight_key] = (u_t.to(w.dtype), sb_t.to(w.dtype))
    return out


def _ancestors(nodes: list[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(nodes)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen


def _position_tables(program: Program, entry: Entry, nodes: list[fx.Node], seq_dim: int, length: int) -> list[torch.Tensor]:
    """Values of ``nodes`` (position-dependent, content-independent) for positions 0..length-1,
    by evaluating the entry's own subgraph for one token at each position; concatenated on ``seq_dim``."""
    anc = _ancestors(nodes)
    placeholders = entry.placeholders()
    ordered = [n for n in entry.graph.graph.nodes if n.op == "call_function" and n in anc]
    cols: list[list[torch.Tensor]] = [[] for _ in nodes]
    for p in range(length):
        env: dict[fx.Node, Any] = {}
        for ph, slot, in zip(placeholders, entry.slots):
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
                args = fx.node.map_arg(n.args, lambda a: env[a])
                kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
                env[n] = n.target(*args, **kwargs)
        for i, n in enumerate(nodes):
            cols[i].append(env[n])
    return [torch.cat(c, dim=seq_dim).contiguous() for c in cols]


# ---- rewriting ----------------------------------------------------------------------------------


class _Rewriter:
    def __init__(self, program: Program, entry: Entry, mode: str, specs: dict[str, QuantSpec | None], static: dict, factors: dict,
                 opts: KVToXCache, new_caches: dict, bits_meta: dict) -> None:
        self.p, self.e, self.g = program, entry, entry.graph.graph
        self.mode, self.specs, self.static, self.factors, self.opts = mode, specs, static, factors, opts
        self.new_caches, self.bits_meta = new_caches, bits_meta
        self.length = int(program.meta.get("max_cache_len") or 0)
        self.acc_new: fx.Node | None = None  # XQuant-CL accumulators (new tokens / all cached positions)
        self.acc_all: fx.Node | None = None
        self.path = ""
        self.tables: dict[str, str] = {}

    # graph building
    def call(self, target: Any, *args: Any) -> fx.Node:
        n = self.g.call_function(target, args)
        n.meta[PATH_KEY] = self.path
        return n

    def state(self, name: str, t: torch.Tensor) -> fx.Node:
        for k, v in self.p.state.items():  # reuse an identical tensor added before (shared tables)
            if k.startswith("xcache.") and v.shape == t.shape and v.dtype == t.dtype and torch.equal(v, t):
                return self.e.state_input(k)
        return self.e.state_input(self.p.add_state(name, t))

    def cache_input(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> fx.Node:
        spec = (tuple(shape), str(dtype).removeprefix("torch."))
        if self.new_caches.setdefault(key, spec) != spec:
            raise PassError(f"kv_to_xcache: cache {key!r} gets shapes {self.new_caches[key]} and {spec} in different entries")
        placeholders = self.e.placeholders()
        first_user = next(i for i, s in enumerate(self.e.slots) if s.kind is SlotKind.USER)
        with self.g.inserting_before(placeholders[first_user]):
            node = self.g.placeholder("c_" + "".join(c if c.isalnum() else "_" for c in key))
        node.meta[PATH_KEY] = ""
        self.e.slots.insert(first_user, Slot(SlotKind.CACHE, key))
        return node

    def fake_quant(self, x: fx.Node, spec: QuantSpec | None, static_key: tuple[int, str], width: int) -> fx.Node:
        """deq(Q(x)) for the forward entry."""
        if spec is None:
            return x
        codes, scale, offset, gs = self.quantize(x, spec, static_key, width)
        return self.call(qops.cache_dequantize.default, codes, scale, offset, gs)

    def quantize(self, x: fx.Node, spec: QuantSpec, static_key: tuple[int, str], width: int):
        if _static(spec):
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

    def store(self, x: fx.Node, spec: QuantSpec | None, static_key: tuple[int, str], key: str, shape: list[int], dim: int, pos: fx.Node,
              dtype: torch.dtype) -> tuple[fx.Node, fx.Node]:
        """Write x's new tokens into the cache(s) ``key.*``; returns (deq of the whole cache, deq of the new tokens)."""
        if spec is None:
            w = self.call(aten.index_copy_.default, self.cache_input(f"{key}", tuple(shape), dtype), dim, pos, x)
            return w, x
        codes, scale, offset, gs = self.quantize(x, spec, static_key, shape[-1])
        cdt = torch.int8 if spec.symmetric else torch.uint8
        wc = self.call(aten.index_copy_.default, self.cache_input(f"{key}.codes", tuple(shape), cdt), dim, pos, codes)
        self.bits_meta[f"{key}.codes"] = spec.bits
        if gs == 0:  # static per-channel: scales are state, nothing per token
            ws, wo = scale, offset
        else:
            sshape = (*shape[:-1], shape[-1] // gs)
            ws = self.call(aten.index_copy_.default, self.cache_input(f"{key}.scale", sshape, torch.float16), dim, pos, scale)
            wo = None
            if offset is not None:
                wo = self.call(aten.index_copy_.default, self.cache_input(f"{key}.offset", sshape, torch.float16), dim, pos, offset)
        all_ = self.call(qops.cache_dequantize.default, wc, ws, wo, gs)
        new = self.call(qops.cache_dequantize.default, codes, scale, offset, gs)
        return all_, new

    # per-block rewrites
    def prepare(self, blocks: list[_Block]) -> None:
        """Plan the K/V rematerialization of every block and compute the position tables (RoPE cos/sin
        for positions 0..max_cache_len-1) of all blocks in one evaluation per position."""
        self.remat: dict[int, tuple] = {}
        if self.mode == "kv" or not blocks:
            return
        plans = {}
        for b in blocks:
            for proj in (b.k, b.v):
                plans[id(proj)] = self._remat_plan(b, proj)
        ext = list(dict.fromkeys(e for pl in plans.values() for e in pl[2]))
        dim = int(blocks[0].k.write.args[1])
        length = int(self.p.cache_specs[blocks[0].k.cache_key][0][dim])
        values = dict(zip(ext, _position_tables(self.p, self.e, ext, dim, length))) if ext else {}
        for key, (heads, path_nodes, externals) in plans.items():
            self.remat[key] = (heads, path_nodes, externals, [values[e] for e in externals])

    def rewrite_cache_block(self, b: _Block) -> int:
        """Rewrite one block of a cache entry; returns the bytes/token an fp16 K+V cache of it takes."""
        self.path = b.path
        k_shape = self.p.cache_specs[b.k.cache_key][0]
        v_shape = self.p.cache_specs[b.v.cache_key][0]
        dim = int(b.k.write.args[1])
        length = int(k_shape[dim])
        fp16 = 2 * (math.prod(k_shape) + math.prod(v_shape)) // length
        pos = b.k.write.args[2]
        order = {n: i for i, n in enumerate(self.g.nodes)}
        first = min(b.k.write, b.v.write, key=order.__getitem__)
        x_dtype = b.x.meta["val"].dtype if "val" in b.x.meta else torch.float32
        if self.mode == "kv":
            for name, proj, shape in (("k", b.k, k_shape), ("v", b.v, v_shape)):
                with self.g.inserting_before(proj.write):
                    all_, _ = self.store(proj.src, self.specs[name], (b.index, name), f"kvq.{b.index}.{name}", list(shape), dim,
                                         proj.write.args[2], x_dtype)
                self._replace_write(proj, all_)
            return fp16
        remat = self.remat
        with self.g.inserting_before(first):
            if self.mode == "x":
                x_all = self._store_x(b, pos, length, x_dtype)
                sources = {id(b.k): x_all, id(b.v): x_all}
            else:
                sources = {}
                for name, proj in (("k", b.k), ("v", b.v)):
                    u_t, _ = self.factors[proj.weight_key]
                    z = self.call(aten.linear.default, b.x, self.state(f"xcache.{b.index}.{name}.U_t", u_t))
                    r = u_t.shape[0]
                    z_all, _ = self.store(z, self.specs[name], (b.index, name), f"xcache.{b.index}.{name}_latent", [1, length, r], 1,
                                          pos, x_dtype)
                    sources[id(proj)] = z_all
            outs = {}
            for name, proj, shape in (("k", b.k, k_shape), ("v", b.v, v_shape)):
                if self.mode == "x":
                    lin = self.call(aten.linear.default, sources[id(proj)], proj.lin.args[1], proj.bias)
                else:
                    _, sb_t = self.factors[proj.weight_key]
                    lin = self.call(aten.linear.default, sources[id(proj)], self.state(f"xcache.{b.index}.{name}.SB_t", sb_t), proj.bias)
                heads, path_nodes, externals, tables = remat[id(proj)]
                h = self.call(aten.view.default, lin, [shape[0], length, shape[1], shape[3]])
                h = self.call(aten.transpose.int, h, 1, 2)
                env: dict[fx.Node, fx.Node] = {heads: h}
                for i, (ext, t) in enumerate(zip(externals, tables)):
                    env[ext] = self.state(f"xcache.rope_table.{b.index}.{name}.{i}", t)
                for n in path_nodes:
                    env[n] = self.g.node_copy(n, lambda a: env.get(a, a))
                    env[n].meta[PATH_KEY] = self.path
                outs[name] = env[proj.src] if proj.src in env else h
        self._replace_write(b.k, outs["k"])
        self._replace_write(b.v, outs["v"])
        return fp16

    def _store_x(self, b: _Block, pos: fx.Node, length: int, x_dtype: torch.dtype) -> fx.Node:
        d = int(self.p.state[b.k.weight_key].shape[1])
        key = f"xcache.{b.index}.x"
        if not self.opts.cross_layer:
            all_, _ = self.store(b.x, self.specs["x"], (b.index, "x"), key, [1, length, d], 1, pos, x_dtype)
            return all_
        src = b.x
        if self.opts.cl_space is ClSpace.RESIDUAL:
            src, norm_nodes = self._norm_plan(b)
        if self.acc_new is None:
            all_, new = self.store(src, self.specs["x0"], (b.index, "x0"), key, [1, length, d], 1, pos, x_dtype)
        else:
            diff = self.call(aten.sub.Tensor, src, self.acc_new)
            d_all, d_new = self.store(diff, self.specs["x"], (b.index, "x"), f"{key}_delta", [1, length, d], 1, pos, x_dtype)
            all_ = self.call(aten.add.Tensor, self.acc_all, d_all)
            new = self.call(aten.add.Tensor, self.acc_new, d_new)
        self.acc_all, self.acc_new = all_, new
        if self.opts.cl_space is ClSpace.RESIDUAL:
            return self._copy_norm(src, norm_nodes, b.x, all_)
        return all_

    def _norm_plan(self, b: _Block) -> tuple[fx.Node, list[fx.Node]]:
        """(h, nodes): the residual-stream tensor h the norm producing X reads, and the norm's nodes
        from h to X in graph order (their other inputs must be weights/constants)."""
        anc_x = _ancestors([b.x])
        h = None
        todo, seen = [b.x], set()
        while todo and h is None:  # breadth-first up from X: the first node that also feeds something else
            nxt = []
            for n in todo:
                for a in n.all_input_nodes:
                    if a in seen or a.op != "call_function":
                        continue
                    seen.add(a)
                    if any(u not in anc_x and u is not b.x and u.target != aten._assert_tensor_metadata.default for u in a.users):
                        h = a
                        break
                    nxt.append(a)
                if h is not None:
                    break
            todo = nxt
        if h is None:
            raise PassError(f"kv_to_xcache: cl_space 'residual' found no residual-stream input of the norm producing %{b.x.name}")
        desc, todo = set(), [h]
        while todo:
            m = todo.pop()
            for u in m.users:
                if u in anc_x and u not in desc:
                    desc.add(u)
                    todo.append(u)
        nodes = [m for m in self.g.nodes if m in desc or m is b.x]
        for m in nodes:
            for a in m.all_input_nodes:
                if a is not h and a not in desc and a.op != "placeholder":
                    raise PassError(f"kv_to_xcache: the norm between %{h.name} and %{b.x.name} reads %{a.name}, which is not "
                                    "a weight; cl_space 'residual' needs X = norm(h) with constant parameters")
        return h, nodes

    def _copy_norm(self, h: fx.Node, nodes: list[fx.Node], x: fx.Node, new_h: fx.Node) -> fx.Node:
        env: dict[fx.Node, fx.Node] = {h: new_h}
        for n in nodes:
            env[n] = self.g.node_copy(n, lambda a: env.get(a, a))
            env[n].meta[PATH_KEY] = self.path
        return env[x]

    def _remat_plan(self, b: _Block, proj: _Proj) -> tuple[fx.Node, list[fx.Node], list[fx.Node]]:
        """(heads node [B,H,T,hd] = transpose(view(linear)), nodes from it to the cache source in
        order, position-dependent external inputs of those nodes)."""
        chain = [proj.lin]
        n = proj.lin
        anc_src = _ancestors([proj.src])
        while n is not proj.src:
            nxt = [u for u in n.users if u in anc_src]
            if len(nxt) != 1 or nxt[0].target not in _SHAPE_OPS:
                break
            n = nxt[0]
            chain.append(n)
        targets = [c.target for c in chain[1:]]
        if targets[:1] not in ([aten.view.default], [aten.reshape.default], [aten._unsafe_view.default]) or len(chain) < 3 \
                or chain[2].target != aten.transpose.int or sorted(int(a) for a in chain[2].args[1:3]) != [1, 2]:
            raise PassError(f"kv_to_xcache: the projection %{proj.lin.name} reaches its cache through "
                            f"{[str(t) for t in targets]}; expected view to [B, T, heads, head_dim] then transpose(1, 2); {EXPECTED}")
        heads = chain[2]
        if heads is proj.src:
            return heads, [], []
        desc: set[fx.Node] = set()
        todo = [heads]
        while todo:
            m = todo.pop()
            for u in m.users:
                if u not in desc and u in anc_src:
                    desc.add(u)
                    todo.append(u)
        path_nodes = [m for m in self.g.nodes if m in desc]
        x_desc = set()
        todo = [b.x]
        while todo:
            m = todo.pop()
            for u in m.users:
                if u not in x_desc:
                    x_desc.add(u)
                    todo.append(u)
        externals: list[fx.Node] = []
        for m in path_nodes:
            for a in m.all_input_nodes:
                if a is heads or a in desc or a in externals:
                    continue
                if a in x_desc or a is b.x:
                    raise PassError(f"kv_to_xcache: the transform between %{heads.name} and the cache write reads %{a.name}, "
                                    "which depends on the token content; only position-dependent inputs (RoPE cos/sin) can be rematerialized")
                externals.append(a)
        return heads, path_nodes, externals

    def _replace_write(self, proj: _Proj, new: fx.Node) -> None:
        proj.write.replace_all_uses_with(new)
        self.g.erase_node(proj.write)

    def rewrite_forward_block(self, b: _Block) -> None:
        self.path = b.path
        if self.mode == "kv":
            for name, proj in (("k", b.k), ("v", b.v)):
                users = list(proj.src.users)
                order = {n: i for i, n in enumerate(self.g.nodes)}
                with self.g.inserting_before(min(users, key=order.__getitem__)):
                    fq = self.fake_quant(proj.src, self.specs[name], (b.index, name), int(proj.src.meta["val"].shape[-1]))
                for u in users:
                    u.replace_input_with(proj.src, fq)
            return
        d = int(self.p.state[b.k.weight_key].shape[1])
        with self.g.inserting_before(b.k.lin):
            if self.mode == "x":
                if self.opts.cross_layer:
                    src = b.x
                    if self.opts.cl_space is ClSpace.RESIDUAL:
                        src, norm_nodes = self._norm_plan(b)
                    if self.acc_new is None:
                        xh = self.fake_quant(src, self.specs["x0"], (b.index, "x0"), d)
                    else:
                        diff = self.call(aten.sub.Tensor, src, self.acc_new)
                        xh = self.call(aten.add.Tensor, self.acc_new, self.fake_quant(diff, self.specs["x"], (b.index, "x"), d))
                    self.acc_new = xh
                    if self.opts.cl_space is ClSpace.RESIDUAL:
                        xh = self._copy_norm(src, norm_nodes, b.x, xh)
                else:
                    xh = self.fake_quant(b.x, self.specs["x"], (b.index, "x"), d)
                b.k.lin.replace_input_with(b.x, xh)
                b.v.lin.replace_input_with(b.x, xh)
                return
        for name, proj in (("k", b.k), ("v", b.v)):
            u_t, sb_t = self.factors[proj.weight_key]
            with self.g.inserting_before(proj.lin):
                z = self.call(aten.linear.default, b.x, self.state(f"xcache.{b.index}.{name}.U_t", u_t))
                zh = self.fake_quant(z, self.specs[name], (b.index, name), int(u_t.shape[0]))
                new = self.call(aten.linear.default, zh, self.state(f"xcache.{b.index}.{name}.SB_t", sb_t), proj.bias)
            proj.lin.replace_all_uses_with(new)
            self.g.erase_node(proj.lin)

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
