"""smooth_migration: SmoothQuant / SmoothQuant+ scale migration into norms and weights.

What it does: for every group of linears that share one input ``X`` whose producer can absorb a
per-channel scale (found by graph matching, :func:`qcompile.ir.patterns.find_scale_groups`: the
affine weight of a norm feeding q/k/v or gate/up; with ``value_out``, v_proj's output rows
feeding o_proj through attention, GQA heads handled by the channel map; with ``up_down``,
up_proj's rows feeding down_proj through the product with the gate), it computes per input
channel ``j``::

    s_j = max|X_j|^α / max|W_j|^(1−α)      (max|W_j| over all linears of the group)

from calibration data (``ctx.calib``), divides the producer (norm weight and bias, or the
producing linear's rows and bias) by ``s`` and multiplies the consumers' weight columns by ``s``.
Without quantization the model computes the same function (up to float rounding).

``alpha``: a number in [0, 1] (SmoothQuant, one α for all groups), ``"none"`` (s ≡ 1: the pass
changes nothing; for A/B plans), or ``"search"``
(SmoothQuant+): per group, every α on a grid of step ``grid_step`` from 0 to 1, *and* no smoothing
(s ≡ 1), are scored by the error of the group's quantized outputs on calibration rows,
``Σ_linears ‖X Wᵀ − Q_a(X/s) Q_w(W·diag(s))ᵀ‖²``, with the quantizers the plan assigns to each
linear; the lowest wins, so the search never does worse than plain RTN on calibration data.
The chosen α per group is in the pass notes. Note that α = 0 is *not* the identity in this
formula (s_j = 1 / max|W_j|); the identity candidate is listed separately as ``"none"``.

Requires: float linears (run it before ``quantize_weights``) and the captured attention (before
``kv_to_xcache``, whose caches would hold the unsmoothed X), and calibration data. Provides:
``smoothed``; the function the model computes is unchanged up to float rounding.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from qcompile.errors import PassError, PlanError
from qcompile.ir.calib import calib_batches, observe_linear_inputs
from qcompile.ir.facts import Fact
from qcompile.ir.patterns import ScaleGroup, find_linears, find_scale_groups
from qcompile.ir.program import Program
from qcompile.passes.base import Pass, PassContext, PassResult, register_pass
from qcompile.plan import Granularity, Plan, QuantSpec
from qcompile.quant.finite import check_finite, naming
from qcompile.quant.observers import AbsMaxObserver, SampleObserver
from qcompile.quant.quantizer import fake_quantize

MIN_CALIB_TOKENS = 64


class AlphaMode(str, enum.Enum):
    """The non-numeric values of ``alpha``."""

    SEARCH = "search"  # SmoothQuant+: per-group search on calibration data
    NONE = "none"  # s = 1: the pass changes nothing (for A/B plans)


@register_pass
@dataclass(frozen=True)
class SmoothMigration(Pass):
    name: ClassVar[str] = "smooth_migration"
    requires: ClassVar[frozenset[Fact]] = frozenset({Fact.CAPTURED, Fact.FLOAT_LINEARS, Fact.KV_ATTENTION})
    provides: ClassVar[frozenset[Fact]] = frozenset({Fact.SMOOTHED})

    alpha: float | AlphaMode = 0.5
    grid_step: float = 0.05
    value_out: bool = False  # also migrate o_proj's input scales into v_proj's rows
    up_down: bool = False  # also migrate down_proj's input scales into up_proj's rows
    samples: int = 512  # calibration rows kept per group for the α search
    min_scale: float = 1e-5

    def __post_init__(self) -> None:
        if isinstance(self.alpha, str):
            if self.alpha not in [m.value for m in AlphaMode]:
                raise PlanError(
                    f"smooth_migration: alpha must be a number in [0, 1], 'search' or 'none', not {self.alpha!r}"
                )
            object.__setattr__(self, "alpha", AlphaMode(self.alpha))
        elif not 0.0 <= float(self.alpha) <= 1.0:
            raise PlanError(f"smooth_migration: alpha must be in [0, 1], got {self.alpha}")
        if not 0 < self.grid_step <= 1:
            raise PlanError(f"smooth_migration: grid_step must be in (0, 1], got {self.grid_step}")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        found = find_scale_groups(program, value_out=self.value_out, up_down=self.up_down)
        if not found:
            raise PassError(
                f"smooth_migration found no group of linears to smooth in entries {list(program.entries)}; expected "
                "linears whose shared input is a norm's affine output (h * w + b with a constant 1-D w)"
                + (
                    ", or another linear's output (v_proj through attention, up_proj through the gate)"
                    if self.value_out or self.up_down
                    else ""
                )
            )
        groups = [g for g in found if not _all_skipped(ctx.plan, g)]
        kept = [(p, "kept in float by the plan (skip glob or rule)") for g in found if g not in groups for p in g.paths]
        kept += _unmatched(program, ctx.plan, found)
        if not groups or self.alpha is AlphaMode.NONE:
            return PassResult(program, modified=False, skipped=kept, notes={"groups": len(groups), "alpha": "none"})
        batches = calib_batches(ctx.calib, who="smooth_migration", program=program, min_tokens=MIN_CALIB_TOKENS)
        search = self.alpha is AlphaMode.SEARCH
        keys = [g.linears[0] for g in groups]

        def make(_key: str) -> list:
            return [AbsMaxObserver(), SampleObserver(cap=self.samples, stride=7)] if search else [AbsMaxObserver()]

        stats = observe_linear_inputs(
            program, batches, keys, make, progress=ctx.progress, desc="smooth_migration: calibrating"
        )
        chosen: dict[str, str] = {}
        changed: list[str] = []
        for g in groups:
            obs = stats[g.linears[0]]
            xmax = obs[0].value()
            weights = [program.state[k].to(torch.float32) for k in g.linears]
            wmax = torch.stack([w.abs().amax(dim=0) for w in weights]).amax(dim=0)
            with naming(f"layers {list(g.paths)}"):
                if search:
                    label, s = self._search(ctx.plan, g, xmax, wmax, weights, obs[1].value())
                else:
                    label, s = f"{float(self.alpha):.2f}", self._scales(g, xmax, wmax, float(self.alpha))
                chosen[g.paths[0]] = label
                if s is not None:
                    _apply(program, g, s)
                    changed.extend(g.paths)
        return PassResult(
            program,
            modified=bool(changed),
            layers_changed=changed,
            skipped=kept,
            notes={"alpha": chosen, "groups": len(groups)},
        )

    def _scales(self, g: ScaleGroup, xmax: torch.Tensor, wmax: torch.Tensor, alpha: float) -> torch.Tensor:
        """Per consumer input channel scales (equal within a producer channel's consumers)."""
        # one scale per producer channel: reduce the maxima over its consumers
        xmax, wmax = g.shared_max(xmax), g.shared_max(wmax)
        s = xmax.clamp(min=self.min_scale).pow(alpha) / wmax.clamp(min=self.min_scale).pow(1 - alpha)
        return torch.where((xmax > 0) & (wmax > 0), s, torch.ones_like(s)).clamp(min=self.min_scale)

    def _search(self, plan: Plan, g: ScaleGroup, xmax, wmax, weights, x) -> tuple[str, torch.Tensor | None]:
        specs = [plan.resolve(p) for p in g.paths]
        ref = [x @ w.t() for w in weights]
        steps = round(1 / self.grid_step)
        best: tuple[float, str, torch.Tensor | None] = (_error(x, weights, specs, ref, None), "none", None)
        for i in range(steps + 1):
            a = min(1.0, i * self.grid_step)
            s = self._scales(g, xmax, wmax, a)
            err = _error(x, weights, specs, ref, s)
            if err < best[0]:
                best = (err, f"{a:.2f}", s)
        return best[1], best[2]


def _unmatched(program: Program, plan: Plan, found: list[ScaleGroup]) -> list[tuple[str, str]]:
    """Linears the plan quantizes that no scale group covers, with what feeds them: their input keeps its
    outliers (e.g. a block without a pre-norm, or an activation between two linears)."""
    covered = {p for g in found for p in g.paths}
    out: dict[str, str] = {}
    for m in find_linears(program):
        if m.path and m.path not in covered and not plan.resolve(m.path).skip:
            src = m.node.args[0]
            what = f"%{src.name} ({src.target})" if isinstance(src, fx.Node) else repr(src)
            out.setdefault(
                m.path, f"not smoothed: its input {what} is neither a norm's affine output nor another linear's output"
            )
    return sorted(out.items())


def _all_skipped(plan: Plan, g: ScaleGroup) -> bool:
    return all(plan.resolve(p).skip for p in g.paths)


def _fake(t: torch.Tensor, spec: QuantSpec | None) -> torch.Tensor:
    """``t`` fake-quantized as ``spec`` says (weights and activations alike; None: unchanged)."""
    if spec is None:
        return t
    gs = spec.group_size if spec.granularity is Granularity.PER_GROUP else None
    return fake_quantize(
        t, spec.bits, spec.granularity, symmetric=spec.symmetric, group_size=gs, partial_last_group=True
    )


def _error(x, weights, specs, ref, s: torch.Tensor | None) -> float:
    total = 0.0
    for w, lq, r in zip(weights, specs, ref):
        if lq.skip:
            continue
        xs, ws = (x, w) if s is None else (x / s, w * s)
        y = _fake(xs, lq.activation) @ _fake(ws, lq.weight).t()
        total += float((y - r).pow(2).sum())
    return total


def _apply(program: Program, g: ScaleGroup, s: torch.Tensor) -> None:
    """Divide the producer by ``s`` and multiply the consumers' columns by ``s`` (exact rewrite)."""
    check_finite(s, "the smoothing scales")
    g.divide_producer(program.state, s)
    for key in g.linears:
        w = program.state[key]
        program.state[key] = (w.to(torch.float32) * s[None, :]).to(w.dtype)
        check_finite(program.state[key], f"weight {key!r} after smoothing", "the smoothing scales overflow it")
