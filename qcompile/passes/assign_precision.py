"""assign_precision: FlexQ layer-sensitivity analysis → per-layer activation bits (A6 / A8).

What it does: every linear the plan quantizes with ``low_bits`` activations (6 in FlexQ) is a
candidate. On the calibration data (``compile(..., calib=...)``, never evaluation text) it measures
how much the model suffers when *only that layer's* activations drop from ``high_bits`` (8) to
``low_bits`` (6) while every weight is at the plan's weight quantization (W6) and every other
layer keeps ``high_bits`` activations; ranks the layers; gives ``high_bits`` activations to the
most sensitive ones within ``budget``; and writes that choice into the plan as one
:class:`~qcompile.plan.LayerRule` per chosen layer (``match`` = its exact module path,
``activation`` = the layer's activation spec at ``high_bits``). ``compile`` hands the refined plan
to the CompiledModule, so the assignment is saved with the artifact, printed by
``qcompile report`` (the pass notes hold every layer's score; ``qcompile report --plot`` draws
them) and reproducible: the same calibration data gives the same assignment (scores are rounded
to 6 significant digits and ties broken by module path before ranking).

Sensitivity metric (``metric: fisher``, the default): the second-order (Fisher) estimate of the
increase of the calibration loss caused by that layer's A8 → A6 change,

    s(layer) = 1/(2·T) · Σ_t ( g_t · δ_t )²

where, on the all-``high_bits`` model (W6, fake-quantized in fp32 with the exact same quantizers
as the integer ops), ``δ_t = W·(q_low(x_t) − q_high(x_t))`` is the change of the layer's output at
token ``t`` and ``g_t`` the gradient of the next-token cross-entropy of the calibration text with
respect to that output (straight-through estimator across the activation quantizers), ``T`` the
number of calibration tokens. The exact alternative — re-running the model once per layer and
measuring the output KL — costs O(layers²) (every perturbation re-runs the layers after it); this
estimate needs one forward and one backward pass over the calibration tokens plus one
extra small GEMM per layer, so its cost grows linearly with the number of layers (SmolLM2,
210 linears, 4096 tokens: see benchmarks/RESULTS.md for the measured time). ``metric: kl`` is the
exact measurement, for validation and small models: the mean per-token KL divergence of the
next-token distribution of the all-``high_bits`` model to that of the model with only this layer at
``low_bits``; each of those runs restarts from the stored values of the nodes before the layer
(memory: every node value of one calibration sequence), so it costs O(layers²).

Budget: ``budget`` ∈ [0, 1] is the fraction of candidate linears (``unit: linears``; the number
of A8 layers is ``floor(budget · n)``) or of their FLOPs (``unit: flops``; layers are taken in
sensitivity order while they fit) that gets ``high_bits``. FlexQ's fixed rule (every
``down_proj`` at A8) is 1/7 of a Llama's linears, the default budget.

Requires: float linears (run it before ``quantize_weights``), calibration token ids. Provides:
activation precision. Guarantees: the refined plan it returns (``PassResult.plan``) has the new
rules appended and this pass removed from its pass list (so the saved plan replays to the same
module without calibration data); the Program itself is unchanged (``quantize_weights`` applies
the rules). ``qcompile report --plot`` draws the scores (:mod:`qcompile.eval.plots`).

Non-finite values: a NaN/Inf activation entering a candidate layer, a non-finite calibration loss or
a non-finite gradient at a layer's output is a :class:`~qcompile.errors.NonFiniteError` naming the
layer and the calibration window (sequence), never a NaN score ranked as if it were a number.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from qcompile.errors import DataError, NonFiniteError, PlanError
from qcompile.ir.calib import calib_batches, entry_args, first_nonfinite
from qcompile.ir.facts import Fact
from qcompile.ir.patterns import find_linears
from qcompile.ir.program import Program
from qcompile.passes.base import Pass, PassContext, PassResult, as_enum, register_pass
from qcompile.plan import LayerRule
from qcompile.quant.finite import naming, nonfinite_counts
from qcompile.quant.quantizer import fake_quantize_activation, fake_quantize_weight
from qcompile.quant.spec import Granularity, QuantSpec, check_bits, check_group

log = logging.getLogger(__name__)


class Unit(str, enum.Enum):
    """What the budget is a fraction of."""

    LINEARS = "linears"
    FLOPS = "flops"


class Metric(str, enum.Enum):
    FISHER = "fisher"  # second-order estimate: one forward + backward
    KL = "kl"  # exact: one perturbed run per layer (O(layers^2))


def _glob_escape(path: str) -> str:
    """A glob matching exactly ``path`` (fnmatch specials bracketed)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in path)


@dataclass
class _Candidate:
    path: str
    node: fx.Node
    weight_key: str
    low: QuantSpec
    high: QuantSpec
    weight_spec: QuantSpec
    flops: int  # multiply-adds per token: N·K
    order: int
    score: float = 0.0


class _Simulator(fx.Interpreter):
    """Runs the forward entry with candidate linears fake-quantized (W-bits weights, ``high``
    activations, or ``low`` for the node in ``low``). With ``track`` it records each candidate's
    input and (retained-grad) output for the Fisher estimate."""

    def __init__(
        self,
        gm: fx.GraphModule,
        cands: dict[fx.Node, _Candidate],
        wdq: dict[str, torch.Tensor],
        *,
        track: bool = False,
        low: fx.Node | None = None,
        keep_values: bool = False,
    ) -> None:
        super().__init__(gm, garbage_collect_values=not keep_values)
        self.cands, self.wdq, self.track, self.low = cands, wdq, track, low
        self.window = ""  # which calibration sequence runs (for error messages)
        self.origin: Callable[[], str] = lambda: ""  # where the first non-finite value appears (on error)
        self.inputs: dict[fx.Node, torch.Tensor] = {}
        self.outputs: dict[fx.Node, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        c = self.cands.get(n)
        if c is None:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        x = args[0]
        counts = nonfinite_counts(x)
        if counts is not None:
            raise NonFiniteError(
                f"assign_precision: calibration activations entering layer {c.path!r} (node %{n.name}) contain NaN "
                f"or Inf: {counts.describe()} in calibration window {self.window}{self.origin()}. Check the "
                "calibration data and the model's weights"
            )
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        spec = c.low if n is self.low else c.high
        xq = x + (fake_quantize_activation(x.detach(), spec) - x).detach()  # straight-through
        y = torch.nn.functional.linear(xq, self.wdq[c.weight_key], bias)
        if self.track:
            if y.requires_grad:
                y.retain_grad()
            else:
                y.requires_grad_(True)
            self.inputs[n] = x.detach()
            self.outputs[n] = y
        return y


@register_pass
@dataclass(frozen=True)
class AssignPrecision(Pass):
    name: ClassVar[str] = "assign_precision"
    # the sensitivity analysis differentiates through the model: float linears and the captured attention
    # (a rewritten cache's quantizers have no gradient; assign precision before kv_to_xcache)
    requires: ClassVar[frozenset[Fact]] = frozenset({Fact.CAPTURED, Fact.FLOAT_LINEARS, Fact.KV_ATTENTION})
    provides: ClassVar[frozenset[Fact]] = frozenset({Fact.ACTIVATION_PRECISION})

    budget: float = 1 / 7
    unit: Unit = Unit.LINEARS
    low_bits: int = 6
    high_bits: int = 8
    metric: Metric = Metric.FISHER
    min_tokens: int = 256  # fewer calibration tokens than this: DataError
    max_tokens: int = 4096  # use at most this many calibration tokens (whole sequences)
    entry: str = "forward"

    def __post_init__(self) -> None:
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or not 0 <= b <= 1:
            raise PlanError(
                f"assign_precision: budget must be a number in [0, 1] (the fraction of linears or of linear "
                f"FLOPs given {self.high_bits}-bit activations), got {b!r}"
            )
        as_enum(self, "unit", Unit)
        as_enum(self, "metric", Metric)
        for name in ("low_bits", "high_bits"):
            check_bits(getattr(self, name), f"assign_precision: {name}")
        if self.low_bits >= self.high_bits:
            raise PlanError(f"assign_precision: low_bits ({self.low_bits}) must be below high_bits ({self.high_bits})")
        if (
            not isinstance(self.min_tokens, int)
            or not isinstance(self.max_tokens, int)
            or not 2 <= self.min_tokens <= self.max_tokens
        ):
            raise PlanError(
                f"assign_precision: need 2 <= min_tokens <= max_tokens, got {self.min_tokens}, {self.max_tokens}"
            )

    # ---- the pass ---------------------------------------------------------------------------
    def run(self, program: Program, ctx: PassContext) -> PassResult:
        t0 = time.perf_counter()
        if self.entry not in program.entries:
            raise PlanError(
                f"assign_precision: the program has no entry {self.entry!r}; entries: {list(program.entries)}"
            )
        cands, fixed = self._candidates(program, ctx)
        if not cands:
            return PassResult(
                program,
                modified=False,
                skipped=fixed,
                notes={"reason": "no linear with quantized activations to assign"},
            )
        rows = self._calib_rows(program, ctx)
        self._measure(program, ctx, cands, rows)
        chosen = self._choose(cands)
        plan = ctx.plan
        rules = tuple(LayerRule(match=_glob_escape(c.path), activation=c.high) for c in cands if c.path in chosen)
        # the refined plan replaces this pass by its result, so replaying it needs no calibration and
        # gives the same module (re-running the analysis on top of its own rules would not)
        done = (
            f"A{self.high_bits} layers assigned by assign_precision "
            f"({self.metric.value}, budget {self.budget:.4g} of {self.unit.value})"
        )
        refined = dataclasses.replace(
            plan,
            passes=tuple(pc for pc in plan.passes if pc.name != self.name),
            rules=plan.rules + rules,
            description=f"{plan.description} [{done}]" if plan.description else done,
        )
        total_flops = sum(c.flops for c in cands)
        high_flops = sum(c.flops for c in cands if c.path in chosen)
        seconds = time.perf_counter() - t0
        notes = {
            "metric": self.metric.value,
            "budget": self.budget,
            "unit": self.unit.value,
            "tokens": int(sum(r.numel() for r in rows)),
            "sequences": len(rows),
            "candidates": len(cands),
            f"a{self.high_bits}_layers": [c.path for c in cands if c.path in chosen],
            f"a{self.high_bits}_fraction_linears": len(chosen) / len(cands),
            f"a{self.high_bits}_fraction_flops": high_flops / total_flops if total_flops else 0.0,
            "analysis_seconds": round(seconds, 2),
            "sensitivity": [
                {
                    "path": c.path,
                    "score": c.score,
                    "flops_per_token": c.flops,
                    "act_bits": self.high_bits if c.path in chosen else self.low_bits,
                }
                for c in cands
            ],
        }
        log.info(
            "assign_precision: A%d for %d of %d linears in %.1fs", self.high_bits, len(chosen), len(cands), seconds
        )
        return PassResult(
            program,
            modified=False,
            layers_changed=[c.path for c in cands if c.path in chosen],
            skipped=fixed,
            notes=notes,
            plan=refined,
        )

    @classmethod
    def summarize(cls, notes: dict[str, Any]) -> list[str]:
        high = next((k for k in notes if k.startswith("a") and k.endswith("_layers")), None)
        if high is None or "sensitivity" not in notes:
            return []
        return [
            f"{notes['metric']} sensitivity on {notes['tokens']} calibration tokens in {notes['analysis_seconds']}s; "
            "budget "
            f"{notes['budget']:.4g} of {notes['unit']}: {high.split('_')[0].upper()} for {len(notes[high])} of "
            f"{notes['candidates']} linears"
        ]

    def _candidates(self, program: Program, ctx: PassContext) -> tuple[list[_Candidate], list[tuple[str, str]]]:
        cands: list[_Candidate] = []
        fixed: list[tuple[str, str]] = []
        seen: set[str] = set()
        for m in find_linears(program):
            if m.entry.name != self.entry or m.path in seen:
                continue
            seen.add(m.path)
            ctx.at(m.entry, m.node)
            lq = ctx.plan.resolve(m.path)
            if lq.skip or lq.weight is None:
                fixed.append((m.path, "not quantized by the plan"))
                continue
            a = lq.activation
            if a is None or a.bits != self.low_bits:
                got = "float" if a is None else f"{a.bits}-bit"
                fixed.append((m.path, f"activations fixed by the plan ({got}, not {self.low_bits}-bit)"))
                continue
            if not a.symmetric or not a.dynamic or a.granularity not in (Granularity.PER_TOKEN, Granularity.PER_GROUP):
                raise PlanError(
                    f"layer {m.path!r}: assign_precision handles dynamic symmetric per_token/per_group activations, "
                    f"got {a}"
                )
            if lq.weight.granularity not in (Granularity.PER_CHANNEL, Granularity.PER_GROUP):
                raise PlanError(
                    f"layer {m.path!r}: weight granularity {lq.weight.granularity.value!r} is not supported"
                )
            n, k = program.state[m.weight_key].shape
            check_group(m.path, k, lq.weight)
            check_group(m.path, k, a)
            cands.append(
                _Candidate(
                    m.path,
                    m.node,
                    m.weight_key,
                    a,
                    dataclasses.replace(a, bits=self.high_bits),
                    lq.weight,
                    n * k,
                    len(cands),
                )
            )
        ctx.at(None, None)
        return cands, fixed

    def _calib_rows(self, program: Program, ctx: PassContext) -> list[torch.Tensor]:
        batches = calib_batches(
            ctx.calib, who="assign_precision (sensitivity analysis)", program=program, min_tokens=self.min_tokens
        )
        rows: list[torch.Tensor] = []
        used = 0
        for b in batches:
            if b.shape[1] < 2:
                raise DataError(
                    "assign_precision: calibration sequences need at least 2 tokens (next-token loss), got "
                    f"{b.shape[1]}"
                )
            for row in b:
                if used >= self.max_tokens:
                    break
                rows.append(row[None])
                used += row.numel()
        return rows

    def _measure(self, program: Program, ctx: PassContext, cands: list[_Candidate], rows: list[torch.Tensor]) -> None:
        from tqdm.auto import tqdm

        entry = program.entries[self.entry]
        by_node = {c.node: c for c in cands}
        wdq: dict[str, torch.Tensor] = {}
        for c in cands:
            if c.weight_key not in wdq:
                with naming(f"layer {c.path!r} (weight {c.weight_key!r})"):
                    wdq[c.weight_key] = fake_quantize_weight(program.state[c.weight_key], c.weight_spec)
        vocab = program.meta.get("vocab_size")
        scores = {c.path: 0.0 for c in cands}
        tokens = 0
        if self.metric is Metric.KL:
            self._measure_kl(program, ctx, cands, rows, wdq, scores)
            return
        for w, row in enumerate(tqdm(rows, desc="assign_precision: sensitivity", disable=not ctx.progress, unit="seq")):
            sim = _Simulator(entry.graph, by_node, wdq, track=True)
            sim.window = f"{w} (sequence {w} of {len(rows)})"
            args = entry_args(program, self.entry, [row])
            sim.origin = lambda args=args: first_nonfinite(program, self.entry, args)
            with torch.enable_grad():
                outs = sim.run(*args)
                logits = _logits(outs, vocab)
                loss = torch.nn.functional.cross_entropy(logits[0, :-1].to(torch.float32), row[0, 1:], reduction="sum")
                if not torch.isfinite(loss):
                    raise NonFiniteError(
                        f"assign_precision: the calibration loss is {float(loss)} in calibration window {sim.window}"
                        f"{first_nonfinite(program, self.entry, args)}; the model's activations overflow"
                    )
                loss.backward()
            with torch.no_grad():
                for c in cands:
                    x, y = sim.inputs[c.node], sim.outputs[c.node]
                    if y.grad is None:
                        continue  # the output does not reach the loss
                    counts = nonfinite_counts(y.grad)
                    if counts is not None:
                        raise NonFiniteError(
                            f"assign_precision: the loss gradient at the output of layer {c.path!r} holds "
                            f"{counts.describe()} in calibration window {sim.window}"
                        )
                    dx = fake_quantize_activation(x, c.low) - fake_quantize_activation(x, c.high)
                    delta = torch.nn.functional.linear(dx, wdq[c.weight_key])
                    gd = (y.grad.to(torch.float64) * delta.to(torch.float64)).sum(-1)  # [1, T]
                    scores[c.path] += 0.5 * float((gd * gd).sum())
            tokens += row.numel()
            del sim, outs, logits, loss
        for c in cands:
            c.score = float(f"{scores[c.path] / tokens:.6g}")

    def _measure_kl(
        self,
        program: Program,
        ctx: PassContext,
        cands: list[_Candidate],
        rows: list[torch.Tensor],
        wdq: dict[str, torch.Tensor],
        scores: dict[str, float],
    ) -> None:
        """Exact: mean KL(all-high ‖ only-this-layer-low) of the next-token distributions, per token.
        Each perturbed run starts from the stored values of the nodes before the layer."""
        from tqdm.auto import tqdm

        entry = program.entries[self.entry]
        by_node = {c.node: c for c in cands}
        order = {n: i for i, n in enumerate(entry.graph.graph.nodes)}
        vocab = program.meta.get("vocab_size")
        tokens = 0
        bar = tqdm(
            total=len(rows) * len(cands), desc="assign_precision: exact KL", disable=not ctx.progress, unit="run"
        )
        with torch.no_grad():
            for w, row in enumerate(rows):
                base = _Simulator(entry.graph, by_node, wdq, keep_values=True)
                base.window = f"{w} (sequence {w} of {len(rows)})"
                args = entry_args(program, self.entry, [row])
                base.origin = lambda args=args: first_nonfinite(program, self.entry, args)
                ref = torch.log_softmax(_logits(base.run(*args), vocab).double(), -1)
                env = base.env
                for c in cands:
                    start = {n: v for n, v in env.items() if order[n] < order[c.node]}
                    sim = _Simulator(entry.graph, by_node, wdq, low=c.node)
                    sim.window = base.window
                    out = torch.log_softmax(_logits(sim.run(initial_env=start), vocab).double(), -1)
                    kl = (ref.exp() * (ref - out)).sum(-1)  # [1, T]
                    if not bool(torch.isfinite(kl).all()):
                        raise NonFiniteError(
                            f"assign_precision: the KL divergence for layer {c.path!r} is not finite in calibration "
                            f"window {base.window}; the model's outputs hold NaN or Inf"
                        )
                    scores[c.path] += float(kl.sum())
                    bar.update(1)
                tokens += row.numel()
                del base, env
        bar.close()
        for c in cands:
            c.score = float(f"{scores[c.path] / tokens:.6g}")

    def _choose(self, cands: list[_Candidate]) -> set[str]:
        ranked = sorted(cands, key=lambda c: (-c.score, c.path))
        if self.unit is Unit.LINEARS:
            count = math.floor(self.budget * len(cands) + 1e-9)
            return {c.path for c in ranked[:count]}
        cap = self.budget * sum(c.flops for c in cands) * (1 + 1e-9)
        chosen, used = set(), 0
        for c in ranked:
            if used + c.flops <= cap:
                chosen.add(c.path)
                used += c.flops
        return chosen


def _logits(outs: Any, vocab: Any) -> torch.Tensor:
    flat = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    for t in flat:
        if (
            isinstance(t, torch.Tensor)
            and t.is_floating_point()
            and t.dim() == 3
            and (vocab is None or t.shape[-1] == int(vocab))
        ):
            return t
    raise PlanError("assign_precision needs a causal LM whose entry returns logits [1, T, vocab]")


__all__ = ["AssignPrecision", "Metric", "Unit"]
