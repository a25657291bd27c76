"""fold_quant_steps: MergeQuant's Quantization Step Migration (QSM), with adaptive clipping and
dimensional reconstruction.

Static per-channel activation quantization whose steps cost nothing at run time. For every
group of linears sharing one input ``X`` whose producer can absorb a per-channel scale (graph
matching, :func:`qcompile.ir.patterns.find_scale_groups`: a norm's affine weight feeding q/k/v or
gate/up; v_proj's rows feeding o_proj through attention; up_proj's rows feeding down_proj through
the product with the gate), with the plan's activation spec for those linears *static* and
symmetric (``per_channel``: one step per input channel; ``per_tensor``: one step):

1. **Calibration** (``ctx.calib``): running max ``|X_j|`` per channel and a sample of rows.
2. **Adaptive clipping**: the steps are ``Δ_j = r·max|X_j| / qmax`` with one ratio ``r`` per group
   chosen from ``clip_grid`` to minimize the group's quantized output error on the calibration
   rows, ``Σ_linears ‖X Wᵀ − X̂ Ŵᵀ‖²`` (``X̂`` the static-quantized input, ``Ŵ`` the quantized
   step-scaled weight mapped back).
3. **Dimensional reconstruction** (``reconstruct``; for up→down groups only, where it is a pure
   weight rewrite): after migration, down_proj's column ``j`` is ``W_j·Δ_j``; a few channels with
   huge steps (massive activations) dominate every row's weight range and coarsen all other
   weights' grid. Each channel whose step exceeds ``split_threshold`` × the median step is split
   into ``m = ceil(Δ_j / (split_threshold · median))`` channels (at most ``max_split``): gate_proj's
   row ``j`` is duplicated, up_proj's row ``j`` is duplicated and divided by ``m``, and down_proj's
   column ``j`` duplicated, so every copy carries ``X_j / m`` with step ``Δ_j / m``. The function is
   unchanged, the activation codes are unchanged (``round((X_j/m)/(Δ_j/m))``), and the migrated
   weight column shrinks ``m``-fold. The intermediate size grows by the number of extra copies
   (reported; capped at ``max_extra`` of the channels, largest steps first).
4. **Folding** (``fold=True``): the producer is divided by ``Δ`` (norm weight and bias, or the
   producing linear's rows and bias; GQA heads sharing a V head share its step), every consumer
   weight becomes ``W′ = W·diag(Δ)``, quantized with the plan's weight spec (symmetric,
   per_channel or per_group), and the linear becomes ``qcompile::linear_static``: it rounds its
   input to integers and runs an integer GEMM rescaled by the weight scales only. No quantize or
   dequantize op remains between producer and linear.
   ``fold=False`` builds the equivalent unfolded graph for comparison: ``quantize_static`` →
   ``dequantize_static`` → float linear with ``Q(W·diag(Δ))·diag(1/Δ)``. The two agree to float
   rounding (the folded form divides by ``Δ`` inside the producer instead of before rounding).

Linears the plan quantizes whose input has no foldable producer stay in float (listed in
``skipped``). Requires: float linears and the captured attention (the steps of the v→o group are
folded into V), and calibration data. Provides: quantized linears and folded steps; invalidates:
float linears.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from qcompile.errors import PlanError
from qcompile.ir.calib import calib_batches, observe_linear_inputs
from qcompile.ir.facts import Fact
from qcompile.ir.patterns import LinearMatch, ScaleGroup, find_linears, find_scale_groups
from qcompile.ir.program import Program
from qcompile.passes.base import Pass, PassContext, PassResult, register_pass
from qcompile.plan import LayerQuant, Plan
from qcompile.quant.finite import naming
from qcompile.quant.observers import AbsMaxObserver, SampleObserver
from qcompile.quant.quantizer import dequantize_weight_groups, fake_quantize_weight, quantize_weight_groups
from qcompile.quant.spec import Granularity, check_group, levels

aten = torch.ops.aten
DEFAULT_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3)


@register_pass
@dataclass(frozen=True)
class FoldQuantSteps(Pass):
    name: ClassVar[str] = "fold_quant_steps"
    requires: ClassVar[frozenset[Fact]] = frozenset({Fact.CAPTURED, Fact.FLOAT_LINEARS, Fact.KV_ATTENTION})
    provides: ClassVar[frozenset[Fact]] = frozenset({Fact.QUANTIZED_LINEARS, Fact.FOLDED_STEPS})
    invalidates: ClassVar[frozenset[Fact]] = frozenset({Fact.FLOAT_LINEARS})

    fold: bool = True
    clip_grid: tuple[float, ...] = DEFAULT_GRID
    reconstruct: bool = True
    split_threshold: float = 8.0
    max_split: int = 16
    max_extra: float = 0.05
    samples: int = 256

    def __post_init__(self) -> None:
        if not self.clip_grid or any(not 0 < r <= 1 for r in self.clip_grid):
            raise PlanError(f"fold_quant_steps: clip_grid ratios must be in (0, 1], got {self.clip_grid}")
        if self.split_threshold <= 1 or self.max_split < 1 or not 0 <= self.max_extra <= 1:
            raise PlanError("fold_quant_steps: need split_threshold > 1, max_split >= 1, 0 <= max_extra <= 1")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        groups = [
            g for g in find_scale_groups(program, value_out=True, up_down=True) if _specs(ctx.plan, g) is not None
        ]
        if not groups:
            raise PlanError(
                "fold_quant_steps found no linear group to fold: it needs linears fed by a norm or another "
                "linear, and a plan whose activation spec for them is static (dynamic: false), symmetric, "
                "per_channel or per_tensor"
            )
        batches = calib_batches(ctx.calib, who="fold_quant_steps", program=program, min_tokens=64)
        stats = observe_linear_inputs(
            program,
            batches,
            [g.linears[0] for g in groups],
            lambda _k: [AbsMaxObserver(), SampleObserver(cap=self.samples, stride=7)],
            progress=ctx.progress,
            desc="fold_quant_steps: calibrating",
        )
        notes: dict[str, dict[str, float]] = {}
        changed: list[str] = []
        splits: dict[str, int] = {}
        plan: list[tuple[ScaleGroup, LayerQuant, torch.Tensor]] = []
        # 1. steps with adaptive clipping, all from the original model
        for g in groups:
            lq = _specs(ctx.plan, g)
            assert lq is not None and lq.activation is not None
            absmax, x = stats[g.linears[0]][0].value(), stats[g.linears[0]][1].value()
            if lq.activation.granularity is Granularity.PER_TENSOR:
                absmax = absmax.max().expand_as(absmax).clone()
            absmax = g.shared_max(absmax)
            with naming(f"layers {list(g.paths)}"):
                ratio = self._clip(program, g, lq, absmax, x)
            notes[g.paths[0]] = {"clip": ratio}
            plan.append((g, lq, absmax.clamp(min=1e-8) * ratio / levels(lq.activation.bits, True)[1]))
        # the graph does not change until step 4, and step 4 only replaces each weight's own linears
        linears: dict[str, list[LinearMatch]] = {}
        for m in find_linears(program):
            linears.setdefault(m.weight_key, []).append(m)
        # 2. dimensional reconstruction (exact weight rewrites) before anything is quantized
        for i, (g, lq, step) in enumerate(plan):
            assert lq.activation is not None
            if (
                self.reconstruct
                and g.producer == "linear"
                and g.channel_map is None
                and lq.activation.granularity is Granularity.PER_CHANNEL
            ):
                new_step, extra = self._split(program, linears, g, step)
                if extra:
                    splits[g.paths[0]] = extra
                    plan[i] = (g, lq, new_step)
        # 3. fold the steps into the producers, 4. then quantize the step-scaled consumers
        if self.fold:
            for g, _lq, step in plan:
                g.divide_producer(program.state, step)
        for g, lq, step in plan:
            with naming(f"layers {list(g.paths)}"):
                self._rewrite(program, linears, g, lq, step)
            changed.extend(g.paths)
        touched = {e.name for e in program.entries.values()}
        program.finish_rewrite(touched)
        leftover = sorted({m.path for m in find_linears(program) if not ctx.plan.resolve(m.path).skip})
        return PassResult(
            program,
            modified=True,
            layers_changed=changed,
            skipped=[(p, "no foldable producer (kept in float)") for p in leftover],
            notes={"groups": notes, "split_channels": splits},
        )

    # ---- steps ---------------------------------------------------------------------------
    def _clip(self, program: Program, g: ScaleGroup, lq: LayerQuant, absmax: torch.Tensor, x: torch.Tensor) -> float:
        if len(self.clip_grid) == 1:
            return float(self.clip_grid[0])
        weights = [program.state[k].to(torch.float32) for k in g.linears]
        ref = [x @ w.t() for w in weights]
        qmax = levels(lq.activation.bits, True)[1]
        best = (math.inf, 1.0)
        for r in self.clip_grid:
            step = absmax.clamp(min=1e-8) * r / qmax
            xq = torch.clamp(torch.round(x / step), -qmax, qmax)
            err = 0.0
            for w, y in zip(weights, ref):
                wq = fake_quantize_weight(w * step, lq.weight)
                err += float((xq @ wq.t() - y).pow(2).sum())
            if err < best[0]:
                best = (err, float(r))
        return best[1]

    def _split(
        self, program: Program, linears: dict[str, list[LinearMatch]], g: ScaleGroup, step: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        """Dimensional reconstruction for an up→down group (see the module docstring)."""
        med = float(step.median())
        m = torch.clamp(torch.ceil(step / (self.split_threshold * med)), 1, self.max_split).to(torch.int64)
        budget = int(self.max_extra * step.numel())
        order = torch.argsort(step, descending=True)
        extra_total = 0
        for j in order.tolist():  # largest steps first, while the budget of extra channels lasts
            e = int(m[j]) - 1
            if e > 0 and extra_total + e <= budget:
                extra_total += e
            else:
                m[j] = 1
        if extra_total == 0:
            return step, 0
        idx = torch.repeat_interleave(torch.arange(step.numel()), m)  # channel of every new position
        div = m[idx].to(torch.float32)
        up_key, (down_key,) = g.producer_weight, g.linears
        gate_key = _gate_of(linears, up_key)
        if gate_key is None:
            return step, 0
        for key, scale_rows in ((gate_key, False), (up_key, True)):
            w = program.state[key]
            new = w.to(torch.float32)[idx]
            program.state[key] = (new / div[:, None] if scale_rows else new).to(w.dtype)
            bkey = linears[key][0].bias_key
            if bkey is not None:
                b = program.state[bkey].to(torch.float32)[idx]
                program.state[bkey] = b / div if scale_rows else b
        if g.producer_bias is not None and g.producer_bias != linears[up_key][0].bias_key:
            raise PlanError("fold_quant_steps: unexpected bias layout in the up/down group")
        w = program.state[down_key]
        program.state[down_key] = w[:, idx]
        return step[idx] / div, extra_total

    def _rewrite(
        self, program: Program, linears: dict[str, list[LinearMatch]], g: ScaleGroup, lq: LayerQuant, step: torch.Tensor
    ) -> None:
        assert lq.activation is not None and lq.weight is not None
        bits = lq.activation.bits
        step_key = (
            None if self.fold else program.add_state(f"{g.linears[0].removesuffix('.weight')}.act_step", step.clone())
        )
        for wkey in g.linears:
            w = program.state[wkey].to(torch.float32)
            k = w.shape[1]
            check_group(g.paths[g.linears.index(wkey)], k, lq.weight)
            gs = lq.weight.block(k)
            codes, scale, _ = quantize_weight_groups(w * step, lq.weight.bits, gs, True)
            base = wkey.removesuffix(".weight")
            if self.fold:
                ck = program.add_state(f"{base}.qweight", codes)
                sk = program.add_state(f"{base}.w_scale", scale)
                program.weight_bits[ck] = lq.weight.bits
            else:
                fk = program.add_state(f"{base}.weight_fq", dequantize_weight_groups(codes, scale, None, gs) / step)
            for m in linears[wkey]:
                bias = m.node.args[2] if len(m.node.args) > 2 else None
                graph = m.entry.graph.graph
                if self.fold:
                    args = (m.node.args[0], m.entry.state_input(ck), m.entry.state_input(sk), bias, gs, bits)
                    m.entry.replace_call(m.node, torch.ops.qcompile.linear_static.default, args)
                else:
                    st = m.entry.state_input(step_key)
                    with graph.inserting_before(m.node):
                        q = graph.call_function(torch.ops.qcompile.quantize_static.default, (m.node.args[0], st, bits))
                        dq = graph.call_function(torch.ops.qcompile.dequantize_static.default, (q, st))
                    for n in (q, dq):
                        n.meta.update(
                            {k: v for k, v in m.node.meta.items() if k in ("qcompile_path", "nn_module_stack")}
                        )
                    m.entry.replace_call(m.node, aten.linear.default, (dq, m.entry.state_input(fk), bias))


def _specs(plan: Plan, g: ScaleGroup) -> LayerQuant | None:
    """The group's (common) quantization when it is foldable; None to leave the group alone."""
    lqs = [plan.resolve(p) for p in g.paths]
    if any(lq.skip or lq.weight is None or lq.activation is None for lq in lqs):
        return None
    a, w = lqs[0].activation, lqs[0].weight
    if any(lq.activation != a or lq.weight != w for lq in lqs):
        raise PlanError(
            f"fold_quant_steps: the linears {list(g.paths)} share one input and must share one quantization"
        )
    assert a is not None and w is not None
    if a.dynamic or a.granularity not in (Granularity.PER_CHANNEL, Granularity.PER_TENSOR):
        return None
    if not a.symmetric or not w.symmetric or w.granularity not in (Granularity.PER_CHANNEL, Granularity.PER_GROUP):
        raise PlanError(
            f"fold_quant_steps: layer {g.paths[0]!r} needs symmetric static activations and symmetric "
            "per_channel/per_group "
            f"weights, got activation {a} and weight {w}"
        )
    return lqs[0]


def _gate_of(linears: dict[str, list[LinearMatch]], up_key: str) -> str | None:
    """The other linear of the elementwise product that feeds down_proj (the gate), by graph."""
    m = linears[up_key][0]
    (prod,) = m.node.users
    other = next(a for a in prod.args if a is not m.node)
    while other.op == "call_function" and other.target != aten.linear.default and other.args:
        other = other.args[0]
    return next((k for k, ms in linears.items() if any(x.node is other for x in ms)), None)
