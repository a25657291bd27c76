"""quantize_weights: round-to-nearest quantization of linear layers into qcompile ops.

What it does: for every ``aten.linear`` whose weight is a constant (found by graph matching,
:func:`qcompile.ir.patterns.find_linears`), it resolves the plan's settings for the layer's module
path and, unless the layer is skipped, quantizes the weight once (shared by every entry that
uses it) and replaces the linear with the fused qcompile op for the (weight, activation) pair:

* W8 per-channel symmetric + A8 per-token symmetric dynamic → ``qcompile::linear_w8a8``;
* any other weight spec (2–8 bits, per-channel or per-group, symmetric or asymmetric) with no
  activation quantization, or with dynamic symmetric per-token / per-group activations →
  ``qcompile::quant_linear`` (weight codes stored one per int8; the report also gives the
  packed size); symmetric 6-bit weights (FlexQ's W6) are stored densely packed, 4 codes in 3 bytes,
  and run by ``qcompile::packed_linear``. A group size that does not divide K is a PlanError naming the layer, unless the
  spec sets ``partial_last_group`` (then the last group is shorter, as if K were zero-padded).

Requires: a captured Program. Guarantees after it runs: no selected linear remains in float;
each layer it did not change is listed in ``skipped`` with the reason; float weights no longer
used by any entry are dropped from the state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from qcompile.errors import PlanError
from qcompile.ir.patterns import find_linears
from qcompile.ir.program import Program
from qcompile.passes.base import Pass, PassContext, PassResult, register_pass
from qcompile.ops.packed import pack_codes
from qcompile.plan import Granularity, LayerQuant, QuantSpec, WeightMethod
from qcompile.quant.rtn import quantize_weight_groups, quantize_weight_per_channel

# symmetric weights of these widths are stored densely packed and run by qcompile::packed_linear
PACKED_BITS = (6,)

SUPPORTED = (
    "weights: 2-8 bits, per_channel or per_group, symmetric or not; activations: none, or 2-8 bits "
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


def check_group(path: str, k: int, spec: QuantSpec) -> None:
    """PlanError unless ``spec``'s group size divides ``k`` (or the spec allows a partial last group)."""
    g = spec.group_size
    if spec.granularity is not Granularity.PER_GROUP or g is None or k % g == 0 or spec.partial_last_group:
        return
    divisors = [d for d in range(8, k + 1, 8) if k % d == 0][-4:]
    raise PlanError(
        f"layer {path!r}: group_size {g} does not divide its {k} input channels; use a divisor "
        f"(e.g. {divisors}) or set partial_last_group: true to allow a shorter last group"
    )


@register_pass
@dataclass(frozen=True)
class QuantizeWeights(Pass):
    name: ClassVar[str] = "quantize_weights"
    requires: ClassVar[frozenset[str]] = frozenset({"captured"})
    provides: ClassVar[frozenset[str]] = frozenset({"quantized_weights"})

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        if ctx.plan.weight_method is not WeightMethod.RTN:
            raise PlanError(f"quantize_weights implements weight_method 'rtn' only, not {ctx.plan.weight_method.value!r}")
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
                done[m.weight_key] = self._quantize(program, m.weight_key, lq.weight, lq.activation, m.path)
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

    @staticmethod
    def _quantize(
        program: Program, wkey: str, w: QuantSpec, a: QuantSpec | None, path: str
    ) -> tuple[list[str | None], Any, tuple[int, ...]]:
        """Quantize weight ``wkey`` once; returns (state keys, op, extra op args)."""
        weight = program.state[wkey]
        k = weight.shape[1]
        base = wkey.removesuffix(".weight")
        bits = program.meta.setdefault("weight_bits", {})
        if _is_w8_per_channel(w) and _is_a8_per_token(a):
            q, scale = quantize_weight_per_channel(weight, 8)
            qkey = program.add_state(f"{base}.qweight", q)
            bits[qkey] = 8
            return [qkey, program.add_state(f"{base}.w_scale", scale)], torch.ops.qcompile.linear_w8a8.default, ()
        if w.granularity not in (Granularity.PER_CHANNEL, Granularity.PER_GROUP):
            raise PlanError(f"layer {path!r}: weight granularity {w.granularity.value!r} is not supported; supported: {SUPPORTED}")
        group = k if w.granularity is Granularity.PER_CHANNEL else int(w.group_size or k)
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
        codes, scale, offset = quantize_weight_groups(weight, w.bits, group, w.symmetric)
        if w.bits in PACKED_BITS and w.symmetric:  # stored densely packed (6-bit: 4 codes in 3 bytes)
            pkey = program.add_state(f"{base}.qweight_packed", pack_codes(codes, w.bits))
            skey = program.add_state(f"{base}.w_scale", scale)
            return [pkey, skey], torch.ops.qcompile.packed_linear.default, (k, w.bits, group, act_bits, act_group)
        qkey = program.add_state(f"{base}.qweight", codes)
        bits[qkey] = w.bits
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
