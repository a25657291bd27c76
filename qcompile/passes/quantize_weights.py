"""quantize_weights: round-to-nearest quantization of linear layers into qcompile ops.

What it does: for every ``aten.linear`` whose weight is a constant (found by graph matching,
:func:`qcompile.ir.patterns.find_linears`), it resolves the plan's settings for the layer's module
path and, unless the layer is skipped, quantizes the weight once (shared by every entry that
uses it) and replaces the linear with the fused qcompile op for the (weight, activation) pair:

* W8 per-channel symmetric + A8 per-token symmetric dynamic → ``qcompile::linear_w8a8``;
* any other weight spec (2, 3, 4, 6 or 8 bits, per-channel or per-group, symmetric or asymmetric) with no
  activation quantization, or with dynamic symmetric per-token / per-group activations →
  ``qcompile::quant_linear`` (weight codes stored one per int8; the report also gives the
  packed size); symmetric 6-bit weights (FlexQ's W6) are stored densely packed, 4 codes in 3 bytes,
  and run by ``qcompile::packed_linear``. A group size that does not divide K is a PlanError naming
  the layer, unless the spec sets ``partial_last_group`` (then the last group is shorter, as if K
  were zero-padded).

Weight methods (``plan.weight_method``): ``rtn`` (round to nearest; with the option
``clip_search`` the per-group clip ratio is grid-searched on calibration inputs to minimize the
output error, :func:`qcompile.quant.quantizer.search_clip`), and ``gptq``
(:mod:`qcompile.quant.gptq`, options ``damp`` and ``act_order``). GPTQ runs decoder block by block
(blocks are the module-path prefixes up to the layer index): each block's Hessians are
collected from a calibration run that stops after the block, the block's weights are quantized
and written back dequantized, so later blocks calibrate on the quantized model's activations
(the sequential GPTQ of the paper) and only one block's Hessians are held at a time.

Requires: float linears (so it runs after passes that rewrite float linears, such as
``smooth_migration`` and ``assign_precision``, and at most once). Provides: quantized linears;
invalidates: float linears. Guarantees after it runs: no selected linear remains in float; each
layer it did not change is listed in ``skipped`` with the reason; every one-code-per-byte weight
tensor it writes has its width in ``Program.weight_bits``; float weights no longer used by any
entry are dropped from the state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from qcompile.errors import PlanError
from qcompile.ir.calib import calib_batches, observe_linear_inputs
from qcompile.ir.facts import Fact
from qcompile.ir.patterns import find_linears
from qcompile.ir.program import Program
from qcompile.ops.packed import pack_codes
from qcompile.passes.base import Pass, PassContext, PassResult, register_pass
from qcompile.plan import LayerQuant, WeightMethod
from qcompile.quant.finite import naming
from qcompile.quant.gptq import Hessian, gptq_quantize
from qcompile.quant.observers import SampleObserver
from qcompile.quant.quantizer import (
    code_dtype,
    dequantize_weight_groups,
    quantize,
    quantize_weight_groups,
    quantize_weight_per_channel,
    search_clip,
)
from qcompile.quant.spec import Granularity, QuantSpec, check_group

Codes = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]

# symmetric weights of these widths are stored densely packed and run by qcompile::packed_linear
PACKED_BITS = (6,)

SUPPORTED = (
    "weights: 2, 3, 4, 6 or 8 bits, per_channel or per_group, symmetric or not; activations: none, or those widths "
    "symmetric dynamic per_token or per_group (with the weights' group size)"
)


def _is_w8_per_channel(spec: QuantSpec | None) -> bool:
    return spec is not None and spec.bits == 8 and spec.granularity is Granularity.PER_CHANNEL and spec.symmetric


def _is_a8_per_token(spec: QuantSpec | None) -> bool:
    return (
        spec is not None
        and spec.bits == 8
        and spec.granularity is Granularity.PER_TOKEN
        and spec.symmetric
        and spec.dynamic
    )


def _block_of(path: str) -> str:
    """The decoder block of a module path: the prefix up to its first numeric part (else the parent)."""
    parts = path.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1])


@register_pass
@dataclass(frozen=True)
class QuantizeWeights(Pass):
    name: ClassVar[str] = "quantize_weights"
    requires: ClassVar[frozenset[Fact]] = frozenset({Fact.CAPTURED, Fact.FLOAT_LINEARS})
    provides: ClassVar[frozenset[Fact]] = frozenset({Fact.QUANTIZED_LINEARS})
    invalidates: ClassVar[frozenset[Fact]] = frozenset({Fact.FLOAT_LINEARS})

    damp: float = 0.01  # gptq: fraction of the mean Hessian diagonal added
    act_order: bool = False  # gptq: columns by decreasing Hessian diagonal
    clip_search: bool = False  # rtn: grid-search clip ratios on calibration inputs
    samples: int = 512  # rtn clip search: calibration rows per layer

    def __post_init__(self) -> None:
        if not math.isfinite(self.damp) or self.damp < 0:
            raise PlanError(f"quantize_weights: damp must be a finite number >= 0, got {self.damp!r}")
        if self.samples < 1:
            raise PlanError(f"quantize_weights: samples must be >= 1 calibration rows, got {self.samples!r}")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        pre = self._calibrated_codes(program, ctx)
        done: dict[str, tuple[str, str]] = {}  # weight key -> (qweight key, scale key)
        changed: list[str] = []
        skipped: dict[str, str] = {}
        touched = set()
        for m in list(find_linears(program)):
            ctx.at(m.entry, m.node)
            lq: LayerQuant = ctx.plan.resolve(m.path)
            reason = self._skip_reason(lq)
            if reason:
                skipped[m.path] = reason
                continue
            assert lq.weight is not None
            if m.weight_key not in done:
                with naming(f"layer {m.path!r} (weight {m.weight_key!r})"):
                    done[m.weight_key] = self._quantize(
                        program, m.weight_key, lq.weight, lq.activation, m.path, pre.get(m.weight_key)
                    )
            keys, op, extra = done[m.weight_key]
            inputs = [m.entry.state_input(key) if key else None for key in keys]
            bias = m.node.args[2] if len(m.node.args) > 2 else m.node.kwargs.get("bias")
            if op in (torch.ops.qcompile.linear_w8a8.default, torch.ops.qcompile.packed_linear.default):
                args = (m.node.args[0], inputs[0], inputs[1], bias, *extra)
            else:
                args = (m.node.args[0], inputs[0], inputs[1], inputs[2], bias, *extra)
            m.entry.replace_call(m.node, op, args)
            touched.add(m.entry.name)
            if m.path not in changed:
                changed.append(m.path)
        ctx.at(None, None)
        program.finish_rewrite(touched)
        return PassResult(program, modified=bool(changed), layers_changed=changed, skipped=sorted(skipped.items()))

    def _targets(self, program: Program, plan: Any) -> list[tuple[str, str, QuantSpec]]:
        """(weight key, path, weight spec) of every linear to quantize, forward entry order."""
        out, seen = [], set()
        for m in find_linears(program):
            lq = plan.resolve(m.path)
            if self._skip_reason(lq) or m.weight_key in seen or lq.weight is None:
                continue
            seen.add(m.weight_key)
            check_group(m.path, program.state[m.weight_key].shape[1], lq.weight)
            out.append((m.weight_key, m.path, lq.weight))
        return out

    def _calibrated_codes(self, program: Program, ctx: PassContext) -> dict[str, Codes]:
        method = ctx.plan.weight_method
        if method is WeightMethod.RTN and not self.clip_search:
            return {}
        targets = self._targets(program, ctx.plan)
        if not targets:
            return {}
        who = f"quantize_weights ({'gptq' if method is WeightMethod.GPTQ else 'clip search'})"
        batches = calib_batches(ctx.calib, who=who, program=program, min_tokens=64)
        if method is WeightMethod.GPTQ:
            return self._gptq(program, ctx, batches, targets)
        obs = observe_linear_inputs(
            program,
            batches,
            [k for k, _, _ in targets],
            lambda _k: [SampleObserver(cap=self.samples, stride=7)],
            progress=ctx.progress,
            desc="quantize_weights: clip search",
        )
        out: dict[str, Codes] = {}
        for key, path, spec in targets:
            w = program.state[key].to(torch.float32)
            k = w.shape[1]
            gs = spec.block(k)
            with naming(f"layer {path!r} (weight {key!r})"):
                ratio = search_clip(w, obs[key][0].value(), spec.bits, gs, symmetric=spec.symmetric)
                q = quantize(
                    w,
                    spec.bits,
                    Granularity.PER_GROUP,
                    symmetric=spec.symmetric,
                    group_size=gs,
                    partial_last_group=True,
                    clip=ratio,
                )
            codes = q.codes.reshape(w.shape[0], -1)[:, :k]
            out[key] = (
                codes.to(code_dtype(spec.bits, spec.symmetric)),
                q.scale[..., 0],
                None if q.offset is None else q.offset[..., 0],
            )
        return out

    def _gptq(
        self, program: Program, ctx: PassContext, batches: list[torch.Tensor], targets: list[tuple[str, str, QuantSpec]]
    ) -> dict[str, Codes]:
        from tqdm.auto import tqdm

        blocks: dict[str, list[tuple[str, str, QuantSpec]]] = {}
        for t in targets:
            blocks.setdefault(_block_of(t[1]), []).append(t)
        out: dict[str, Codes] = {}
        for block, items in tqdm(blocks.items(), desc="quantize_weights: gptq", disable=not ctx.progress, unit="block"):
            hs = observe_linear_inputs(
                program,
                batches,
                [k for k, _, _ in items],
                lambda key: [Hessian(program.state[key].shape[1])],
                desc=f"gptq {block}",
                stop_early=True,
            )
            for key, path, spec in items:
                w = program.state[key]
                gs = spec.block(w.shape[1])
                with naming(f"layer {path!r} (weight {key!r})"):
                    codes, scale, offset = gptq_quantize(
                        w,
                        hs[key][0].value(),
                        spec.bits,
                        gs,
                        symmetric=spec.symmetric,
                        damp=self.damp,
                        act_order=self.act_order,
                    )
                out[key] = (codes, scale, offset)
                program.state[key] = dequantize_weight_groups(codes, scale, offset, gs).to(w.dtype)
        return out

    @staticmethod
    def _quantize(
        program: Program, wkey: str, w: QuantSpec, a: QuantSpec | None, path: str, pre: Codes | None = None
    ) -> tuple[list[str | None], Any, tuple[int, ...]]:
        """Quantize weight ``wkey`` once; returns (state keys, op, extra op args)."""
        weight = program.state[wkey]
        k = weight.shape[1]
        base = wkey.removesuffix(".weight")
        if _is_w8_per_channel(w) and _is_a8_per_token(a):
            q, scale = (pre[0], pre[1][:, 0]) if pre is not None else quantize_weight_per_channel(weight, 8)
            qkey = program.add_state(f"{base}.qweight", q)
            program.weight_bits[qkey] = 8
            return [qkey, program.add_state(f"{base}.w_scale", scale)], torch.ops.qcompile.linear_w8a8.default, ()
        if w.granularity not in (Granularity.PER_CHANNEL, Granularity.PER_GROUP):
            raise PlanError(
                f"layer {path!r}: weight granularity {w.granularity.value!r} is not supported; supported: {SUPPORTED}"
            )
        group = w.block(k)
        check_group(path, k, w)
        act_bits, act_group = 0, 0
        if a is not None:
            if not a.symmetric or not a.dynamic or a.granularity not in (Granularity.PER_TOKEN, Granularity.PER_GROUP):
                raise PlanError(f"layer {path!r}: activation {a} is not supported; supported: {SUPPORTED}")
            act_bits = a.bits
            if a.granularity is Granularity.PER_GROUP:
                check_group(path, k, a)
                act_group = int(a.group_size or 0)
                if group not in (k, act_group):
                    raise PlanError(
                        f"layer {path!r}: activation group {act_group} must equal the weight group {group} "
                        "(or use per_channel weights)"
                    )
        codes, scale, offset = pre if pre is not None else quantize_weight_groups(weight, w.bits, group, w.symmetric)
        if w.bits in PACKED_BITS and w.symmetric:  # stored densely packed (6-bit: 4 codes in 3 bytes)
            pkey = program.add_state(f"{base}.qweight_packed", pack_codes(codes, w.bits))
            skey = program.add_state(f"{base}.w_scale", scale)
            return [pkey, skey], torch.ops.qcompile.packed_linear.default, (k, w.bits, group, act_bits, act_group)
        qkey = program.add_state(f"{base}.qweight", codes)
        program.weight_bits[qkey] = w.bits
        okey = program.add_state(f"{base}.w_offset", offset) if offset is not None else None
        keys = [qkey, program.add_state(f"{base}.w_scale", scale), okey]
        return keys, torch.ops.qcompile.quant_linear.default, (group, act_bits, act_group)

    @staticmethod
    def _skip_reason(lq: LayerQuant) -> str:
        if lq.skip:
            return "kept in float by the plan (skip glob or rule)"
        if lq.weight is None:
            return "the plan quantizes no weights for this layer"
        return ""
