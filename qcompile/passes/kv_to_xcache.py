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

Quantizers (``qcompile/ops/cache.py``): ``bits`` one of 2, 3, 4, 6, 8 (0 = no quantization: a float X / latent
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

Matching is :func:`qcompile.ir.patterns.find_cache_attention` / ``find_forward_attention`` (and
``head_path`` / ``norm_source`` for RoPE and the norm); the graph rewriting, one rewriter per mode,
is :mod:`qcompile.passes.xcache_rewrite`.

Requires: float linears and the captured attention (a causal LM with an entry with attention).
Provides: xcache; invalidates: the captured attention. Guarantees: the K/V caches of every
matched block are gone from ``cache_specs``, replaced by the new caches; ``Program.cache_bits``
gives the packed width of every code cache (for ``Program.cache_bytes_per_token``),
``meta['xcache']`` what is cached and ``Program.fp16_kv_bytes`` the fp16 KV cache it replaces.
A model without a recognizable attention block is an error naming the pattern expected.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from qcompile.errors import PassError, PlanError
from qcompile.ir.calib import calib_batches, run_observed
from qcompile.ir.facts import Fact
from qcompile.ir.patterns import (
    ATTENTION_EXPECTED,
    AttentionBlock,
    find_cache_attention,
    find_forward_attention,
    projection_weight,
)
from qcompile.ir.program import Entry, Program, SlotKind
from qcompile.passes.base import Pass, PassContext, PassResult, as_enum, register_pass
from qcompile.passes.xcache_rewrite import (
    CacheGraph,
    CacheLedger,
    KVRewriter,
    LatentRewriter,
    StaticScales,
    XRewriter,
    is_static,
)
from qcompile.quant.finite import check_scale, naming
from qcompile.quant.lowrank import latent_factors
from qcompile.quant.spec import BITS, Granularity, QuantSpec


class Mode(str, enum.Enum):
    AUTO = "auto"  # latent when K and V together are narrower than X, else x
    X = "x"
    LATENT = "latent"
    KV = "kv"


class ClSpace(str, enum.Enum):
    X = "x"  # XQuant-CL over the normed X
    RESIDUAL = "residual"  # over the residual stream the norm reads


GRANULARITIES = (Granularity.PER_TOKEN, Granularity.PER_CHANNEL)


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


@register_pass
@dataclass(frozen=True)
class KVToXCache(Pass):
    name: ClassVar[str] = "kv_to_xcache"
    requires: ClassVar[frozenset[Fact]] = frozenset({Fact.CAPTURED, Fact.KV_ATTENTION})
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
                raise PlanError(
                    f"kv_to_xcache: {name} must be 0 (no quantization) or one of {list(BITS)} cache bits, got {b!r}"
                )
        if not isinstance(self.group_size, int) or self.group_size < 0:
            raise PlanError(
                "kv_to_xcache: group_size must be 0 (whole token) or a positive divisor of the cached width, got "
                f"{self.group_size!r}"
            )
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
        found = {e.name: find_cache_attention(program, e) for e in cache_entries}
        fwd = program.entries.get("forward")
        fwd_blocks = find_forward_attention(program, fwd) if fwd is not None else []
        any_blocks = [b for bs in found.values() for b in bs] or fwd_blocks
        if not any_blocks:
            where = ", ".join(program.entries) or "(no entries)"
            raise PassError(
                f"kv_to_xcache found no attention block in entries [{where}]; expected {ATTENTION_EXPECTED}"
            )
        order = [b.k.weight_key for b in (next((bs for bs in found.values() if bs), None) or fwd_blocks)]
        for bs in [*found.values(), fwd_blocks]:
            keys = [b.k.weight_key for b in bs]
            if bs and keys != order:
                raise PassError(
                    f"kv_to_xcache: entries disagree on the attention blocks ({len(keys)} vs {len(order)} K "
                    "projections)"
                )
            for i, b in enumerate(bs):
                b.index = i
        first = any_blocks[0]
        home = next((e for e in cache_entries if found[e.name]), fwd)  # the entry of any_blocks
        assert home is not None
        d_k, d_x = projection_weight(program, home, first.k.lin).shape
        d_v = projection_weight(program, home, first.v.lin).shape[0]
        mode = (
            self.mode.value
            if self.mode is not Mode.AUTO
            else ("latent" if d_k + d_v < d_x and not self.cross_layer else "x")
        )

        specs = self._specs(mode)
        self._check_groups(mode, specs, d_x, d_k, d_v, first)
        # static per-channel scales: calibrated on the original forward entry, before rewriting
        factors = (
            _factors(program, fwd if fwd is not None and fwd_blocks else home, fwd_blocks or any_blocks)
            if mode == "latent"
            else {}
        )
        static = (
            self._calibrate(program, ctx, mode, specs, fwd, fwd_blocks, factors)
            if any(is_static(s) for s in specs.values())
            else {}
        )

        kv_fp16 = 0
        ledger = CacheLedger()
        rewriter: type[CacheGraph] = REWRITERS[mode]
        flags = {"cross_layer": self.cross_layer, "residual": self.cl_space is ClSpace.RESIDUAL}
        for e in cache_entries:
            blocks = found[e.name]
            if not blocks:
                continue
            kv_fp16 = 0
            rw = rewriter(program, e, specs, static, factors, ledger, **flags)
            rw.prepare(blocks)
            for b in blocks:
                ctx.at(e, b.k.write)
                kv_fp16 += rw.cache_block(b)
            rw.finish()
        if fwd is not None and fwd_blocks:
            rw = rewriter(program, fwd, specs, static, factors, ledger, **flags)
            for b in fwd_blocks:
                ctx.at(fwd, b.k.lin)
                rw.forward_block(b)
            rw.finish()
        ctx.at(None, None)
        program.cache_specs.update(ledger.caches)
        program.cache_bits.update(ledger.bits)
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
            f"{notes.get('fp16_kv_bytes_per_token')} B/token: saving x{notes.get('saving_vs_fp16_kv')}; "
            f"{notes.get('cached_per_layer', '')}"
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
                out["x0"] = cache_spec(
                    self.first_layer_bits or self.bits, self.group_size, self.symmetric, Granularity.PER_TOKEN
                )
            return out
        return {"k": base, "v": base}

    def _check_groups(
        self, mode: str, specs: dict[str, QuantSpec | None], d_x: int, d_k: int, d_v: int, b: AttentionBlock
    ) -> None:
        widths = {"x": d_x, "x0": d_x}
        if mode == "latent":
            widths.update(k=d_k, v=d_v)
        elif mode == "kv":
            hd = b.head_dim
            widths.update(k=hd, v=hd)
        for name, s in specs.items():
            if s is None or s.granularity is not Granularity.PER_GROUP or s.group_size is None:
                continue
            c = widths[name]
            if c % s.group_size:
                divisors = [d for d in range(8, c + 1, 8) if c % d == 0]
                raise PlanError(
                    f"kv_to_xcache: group_size {s.group_size} does not divide the {c} channels of the "
                    f"{'head of ' if mode == 'kv' else ''}{name} cache (mode {mode!r}); use 0 (whole token) or one of "
                    f"{divisors}"
                )

    def _calibrate(
        self,
        program: Program,
        ctx: PassContext,
        mode: str,
        specs: dict[str, QuantSpec | None],
        fwd: Entry | None,
        blocks: list[AttentionBlock],
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> StaticScales:
        if fwd is None or not blocks:
            raise PlanError(
                "kv_to_xcache: per_channel cache quantization calibrates its scales on the forward entry, which this "
                "Program lacks"
            )
        batches = calib_batches(ctx.calib, who="kv_to_xcache (per_channel cache scales)", program=program)
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

        for b in blocks:
            for name, s in specs.items():
                if not is_static(s):
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
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            check_scale(scale, f"the {key[1]} cache of attention block {key[0]} ({blocks[key[0]].path!r})")
            out[key] = (scale, offset)
        return out

    def _describe(
        self, mode: str, specs: dict[str, QuantSpec | None], layers: int, d_x: int, d_k: int, d_v: int
    ) -> dict[str, Any]:
        def q(s: QuantSpec | None) -> str:
            if s is None:
                return "float (no quantization)"
            g = f"groups of {s.group_size}" if s.granularity is Granularity.PER_GROUP else "whole token"
            where = "static per_channel scales (calibrated)" if is_static(s) else f"per_token fp16 scales, {g}"
            return f"{s.bits}-bit {'symmetric' if s.symmetric else 'asymmetric'} codes, {where}"

        if mode == "x" and self.cross_layer and self.cl_space is ClSpace.RESIDUAL:
            what = (
                f"layer 0: Q(h_0) [{d_x}] ({q(specs['x0'])}); layer l>0: Q(h_l - A_(l-1)) [{d_x}] ({q(specs['x'])}), "
                "where h_l is "
                "the residual stream the layer's attention norm reads, A_l = A_(l-1) + deq(Q(.)) its running "
                "reconstruction "
                "and X_l = norm_l(A_l) is recomputed with the layer's own norm"
            )
        elif mode == "x" and self.cross_layer:
            what = (
                f"layer 0: Q(X_0) [{d_x}] ({q(specs['x0'])}); layer l>0: Q(X_l - A_(l-1)) [{d_x}] ({q(specs['x'])}), "
                "A_l = A_(l-1) + deq(Q(.)) the running reconstruction"
            )
        elif mode == "x":
            what = f"Q(X) [{d_x}] per layer ({q(specs['x'])})"
        elif mode == "latent":
            what = f"Q(X·U_k) [{d_k}] and Q(X·U_v) [{d_v}] per layer ({q(specs['k'])})"
        else:
            what = f"K (post-RoPE) [{d_k}]: {q(specs['k'])}; V [{d_v}]: {q(specs['v'])}"
        return {"mode": mode, "cross_layer": self.cross_layer, "layers": layers, "cached_per_layer": what}


REWRITERS: dict[str, type[CacheGraph]] = {"x": XRewriter, "latent": LatentRewriter, "kv": KVRewriter}


def _factors(
    program: Program, entry: Entry, blocks: list[AttentionBlock]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Weight key -> latent factors (:func:`qcompile.quant.lowrank.latent_factors`) of every K/V projection:
    of its float weight, or of the weight its quantized codes and scales encode (the factors reproduce
    the quantized projection exactly, rank = its output width)."""
    out = {}
    for b in blocks:
        for proj in (b.k, b.v):
            if proj.weight_key not in out:
                with naming(f"layer {b.path!r} (weight {proj.weight_key!r})"):
                    out[proj.weight_key] = latent_factors(projection_weight(program, entry, proj.lin))
    return out
