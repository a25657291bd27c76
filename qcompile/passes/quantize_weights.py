"""quantize_weights: round-to-nearest quantization of linear layers into qcompile ops.

What it does: for every ``aten.linear`` whose weight is a constant (found by graph matching,
:func:`qcompile.ir.patterns.find_linears`), it resolves the plan's settings for the layer's module
path and, unless the layer is skipped, quantizes the weight once (shared by every entry that
uses it) and replaces the linear with the fused qcompile op for the (weight, activation) pair:

* W8 per-channel symmetric + A8 per-token symmetric dynamic → ``qcompile::linear_w8a8``.

Requires: a captured Program. Guarantees after it runs: no selected linear remains in float;
each layer it did not change is listed in ``skipped`` with the reason; float weights no longer
used by any entry are dropped from the state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from qcompile.errors import PlanError
from qcompile.ir.patterns import find_linears
from qcompile.ir.program import PATH_KEY, Program
from qcompile.passes.base import Pass, PassContext, PassResult, register_pass
from qcompile.plan import Granularity, LayerQuant, QuantSpec, WeightMethod
from qcompile.quant.rtn import quantize_weight_per_channel

SUPPORTED = "W8 per_channel symmetric with A8 per_token symmetric dynamic"


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
            if not (_is_w8_per_channel(lq.weight) and _is_a8_per_token(lq.activation)):
                raise PlanError(f"layer {m.path!r}: weight {lq.weight} with activation {lq.activation} is not supported; supported: {SUPPORTED}")
            if m.weight_key not in done:
                q, scale = quantize_weight_per_channel(program.state[m.weight_key], 8)
                base = m.weight_key.removesuffix(".weight")
                done[m.weight_key] = (program.add_state(f"{base}.qweight", q), program.add_state(f"{base}.w_scale", scale))
            qkey, skey = done[m.weight_key]
            graph = m.entry.graph.graph
            qnode, snode = m.entry.state_input(qkey), m.entry.state_input(skey)
            bias = m.node.args[2] if len(m.node.args) > 2 else m.node.kwargs.get("bias")
            with graph.inserting_after(m.node):
                new = graph.call_function(torch.ops.qcompile.linear_w8a8.default, (m.node.args[0], qnode, snode, bias))
            new.meta.update({k: v for k, v in m.node.meta.items() if k in (PATH_KEY, "nn_module_stack", "stack_trace")})
            m.node.replace_all_uses_with(new)
            graph.erase_node(m.node)
            touched.add(m.entry.name)
            if m.path not in changed:
                changed.append(m.path)
        ctx.at(None, None)
        for name in touched:
            entry = program.entries[name]
            entry.remove_unused_placeholders()
            entry.graph.recompile()
        program.prune_state()
        return PassResult(program, modified=bool(changed), layers_changed=changed, skipped=sorted(skipped.items()))

    @staticmethod
    def _skip_reason(lq: LayerQuant) -> str:
        if lq.skip:
            return "kept in float by the plan (skip glob or rule)"
        if lq.weight is None:
            return "the plan quantizes no weights for this layer"
        return ""
