"""The composition matrix: passes applied after one another, on a tiny Llama and a tiny CNN.

A cell is a sequence of passes (every ordered pair, and the longer sequences the composed presets
use). Its outcome is one of:

* ``composes``: every pass ran and did its work (its ``modified`` flag, or for ``assign_precision``
  the refined plan's per-layer rules), the output is finite, its error against fp32 is within the
  tolerance built from the passes alone (``≤ 1.5 × Σ errors of the parts + 1e-4``, the errors being
  relative L2 errors of the logits on fixed inputs), and, when ``kv_to_xcache`` rewrote the caches of a
  causal LM, ``forward`` equals ``prefill`` + ``decode`` (the caches are read back as the forward
  computed them);
* ``refused``: the PlanError the PassManager raises when it reads the plan, before capture, naming
  the fact that is missing and the pass that invalidated it;
* ``not applicable``: a pass found none of the structure it rewrites in this model and said so
  (a clear PassError/PlanError naming what it expected, e.g. attention blocks in a CNN);
* ``failed``: anything else — a crash, a traceback from inside a pass, a silent no-op, an error
  beyond the tolerance, or forward disagreeing with decoding.

``run_matrix`` is what the test (tests/passes/test_composition.py) asserts over and what
benchmarks/composition.py prints into RESULTS.md.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

import torch

from qcompile.errors import PassError, PlanError
from qcompile.plan import PRESETS, PassConfig, Plan

PASS_NAMES = (
    "smooth_migration",
    "assign_precision",
    "quantize_weights",
    "fold_quant_steps",
    "kv_to_xcache",
    "winograd_conv",
)
SHORT = {
    "smooth_migration": "smooth",
    "assign_precision": "assign",
    "quantize_weights": "quantize",
    "fold_quant_steps": "fold",
    "kv_to_xcache": "xcache",
    "winograd_conv": "winograd",
}
# options each pass runs with in the matrix (small groups: the tiny models are 64 wide)
OPTIONS: dict[str, tuple[tuple[str, Any], ...]] = {
    "smooth_migration": (("alpha", 0.5), ("value_out", True), ("up_down", True)),
    "assign_precision": (("budget", 0.25),),
    "quantize_weights": (),
    "fold_quant_steps": (),
    "kv_to_xcache": (("bits", 4), ("group_size", 16), ("symmetric", False)),
    "winograd_conv": (("m", 4), ("points", "best")),
}
# the longer sequences that composed presets use (the pairs they use are among the pairs)
PRESET_SEQUENCES: tuple[tuple[str, ...], ...] = (
    ("smooth_migration", "assign_precision", "quantize_weights"),
    ("smooth_migration", "quantize_weights", "kv_to_xcache"),
    ("smooth_migration", "kv_to_xcache", "quantize_weights"),
    ("assign_precision", "quantize_weights", "kv_to_xcache"),
    ("smooth_migration", "assign_precision", "quantize_weights", "kv_to_xcache"),
    ("smooth_migration", "assign_precision", "kv_to_xcache", "quantize_weights"),
)
TOLERANCE_SLACK = 1.5
TOLERANCE_FLOOR = 1e-4

Outcome = str  # "composes" | "refused" | "not applicable" | "failed"


@dataclass(frozen=True)
class Cell:
    model: str  # "llama" or "cnn"
    passes: tuple[str, ...]
    outcome: Outcome
    detail: str = ""  # the fact / the pass's message / what failed
    error: float | None = None  # relative L2 error of the output vs fp32
    bound: float | None = None  # the tolerance it was held to
    modified: tuple[bool, ...] = ()

    @property
    def label(self) -> str:
        return " → ".join(SHORT[p] for p in self.passes)


def base_name(passes: tuple[str, ...]) -> str:
    """The preset whose quantization settings a sequence runs under: MergeQuant's static ones when
    ``fold_quant_steps`` is in it, FlexQ's (W6, A6 with A8 where sensitive) when ``assign_precision``
    is, else W8A8."""
    if "fold_quant_steps" in passes:
        return "w4a4-mergequant"
    return "w6a8-flexq" if "assign_precision" in passes else "w8a8-rtn"


def base_plan(passes: tuple[str, ...], base: str | None = None) -> Plan:
    """``passes`` (with the matrix's options) under the settings of preset ``base`` (default: :func:`base_name`)."""
    return dataclasses.replace(
        PRESETS[base or base_name(passes)],
        name="+".join(SHORT[p] for p in passes),
        passes=tuple(PassConfig(p, OPTIONS[p]) for p in passes),
    )


def sequences() -> list[tuple[str, ...]]:
    """Every single pass, every ordered pair (repeats included) and the presets' longer sequences."""
    singles = [(p,) for p in PASS_NAMES]
    pairs = list(itertools.product(PASS_NAMES, repeat=2))
    return list(dict.fromkeys([*singles, *pairs, *PRESET_SEQUENCES]))


@dataclass
class Subject:
    """One model of the matrix: its captured Program, inputs, calibration data and fp32 output."""

    name: str
    program: Any
    inputs: torch.Tensor
    calib: torch.Tensor | None
    causal_lm: bool
    reference: torch.Tensor = dataclasses.field(default_factory=lambda: torch.empty(0))


def llama_subject() -> Subject:
    import qcompile
    from qcompile.eval.zoo import tiny_llama

    program = qcompile.capture(tiny_llama(), max_cache_len=64)
    g = torch.Generator().manual_seed(11)
    return _with_reference(
        Subject(
            "llama",
            program,
            torch.randint(0, 256, (1, 24), generator=g),
            torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(3)),
            True,
        )
    )


def cnn_subject() -> Subject:
    import qcompile
    from qcompile.eval.zoo import tiny_cnn

    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    program = qcompile.capture(tiny_cnn(), (x,))
    calib = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    return _with_reference(Subject("cnn", program, x, calib, False))


def _with_reference(s: Subject) -> Subject:
    import qcompile

    s.reference = qcompile.compile(s.program.copy(), plan="fp32", backend="torch")(s.inputs).detach()
    return s


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _did_work(report: Any, plan_out: Plan, name: str, index: int) -> bool:
    pr = report.passes[index]
    if name == "assign_precision":  # it refines the plan, not the graph
        return bool(plan_out.rules) or bool(pr.notes)
    return bool(pr.modified)


def run_cell(
    subject: Subject, passes: tuple[str, ...], alone: dict[str, float] | None = None, base: str | None = None
) -> Cell:
    """Compile ``passes`` under preset ``base``'s settings on ``subject`` with the reference backend and
    classify the outcome. ``alone``: each pass's own error under the same settings, for the tolerance
    (None when computing those)."""
    import qcompile
    from qcompile.passes.manager import PassManager

    plan = base_plan(passes, base)
    try:
        PassManager(plan)
    except PlanError as e:
        return Cell(subject.name, passes, "refused", str(e))
    calib = subject.calib if subject.causal_lm else None
    try:
        cm = qcompile.compile(subject.program.copy(), plan=plan, calib=calib, backend="torch")
    except (PassError, PlanError) as e:
        return Cell(subject.name, passes, "not applicable", str(e))
    except Exception as e:  # a crash is the failure this matrix exists to find
        return Cell(subject.name, passes, "failed", f"{type(e).__name__}: {e}")
    report = cm.report
    modified = tuple(bool(p.modified) for p in report.passes)
    lazy = [n for i, n in enumerate(passes) if not _did_work(report, cm.plan, n, i)]
    if lazy:
        return Cell(subject.name, passes, "failed", f"silent no-op: {lazy} changed nothing", modified=modified)
    with torch.no_grad():
        out = cm(subject.inputs).detach()
    if not torch.isfinite(out).all():
        return Cell(subject.name, passes, "failed", "non-finite output", modified=modified)
    err = _rel(out, subject.reference)
    bound = None if alone is None else TOLERANCE_SLACK * sum(alone.get(p, 0.0) for p in passes) + TOLERANCE_FLOOR
    if bound is not None and err > bound:
        return Cell(subject.name, passes, "failed", f"error {err:.3g} > {bound:.3g}", err, bound, modified)
    if subject.causal_lm and "kv_to_xcache" in passes:  # the other passes rewrite forward and decode alike
        prompt = 5
        steps = decoded_logits(cm, subject.inputs, prompt)
        gap = float((steps - out[:, prompt - 1 :]).abs().max() / out.abs().max())
        if gap > 1e-3:
            return Cell(subject.name, passes, "failed", f"forward != prefill+decode ({gap:.2g})", err, bound, modified)
    return Cell(subject.name, passes, "composes", "", err, bound, modified)


def decoded_logits(cm: Any, tokens: torch.Tensor, prompt: int) -> torch.Tensor:
    """The logits of positions ``prompt - 1`` … ``L - 1`` of ``tokens`` (compare with ``forward``'s
    ``[:, prompt - 1 :]``), computed as prefill of the first ``prompt`` (which returns its last
    position's) then one decode step each."""
    cm.reset_cache()
    outs = [cm.run_entry("prefill", tokens[:, :prompt], torch.arange(prompt))]
    for t in range(prompt, tokens.shape[1]):
        outs.append(cm.run_entry("decode", tokens[:, t : t + 1], torch.tensor([t])))
    return torch.cat(outs, dim=1).detach()


class Matrix:
    """Cells of one subject; each pass's error alone, under each base preset, computed once."""

    def __init__(self, subject: Subject) -> None:
        self.subject = subject
        self._alone: dict[tuple[str, str], Cell] = {}
        self._cells: dict[tuple[str, ...], Cell] = {}

    def alone(self, name: str, base: str) -> Cell:
        if (name, base) not in self._alone:
            self._alone[(name, base)] = run_cell(self.subject, (name,), None, base)
        return self._alone[(name, base)]

    def cell(self, passes: tuple[str, ...]) -> Cell:
        if len(passes) == 1:
            return self.alone(passes[0], base_name(passes))
        if passes not in self._cells:
            base = base_name(passes)
            parts = {p: self.alone(p, base) for p in passes}
            errors = {p: c.error for p, c in parts.items() if c.outcome == "composes" and c.error is not None}
            self._cells[passes] = run_cell(self.subject, passes, errors, base)
        return self._cells[passes]


def run_matrix(subjects: list[Subject] | None = None) -> list[Cell]:
    """Every cell of :func:`sequences` on each subject."""
    cells = []
    for s in subjects if subjects is not None else [llama_subject(), cnn_subject()]:
        m = Matrix(s)
        cells += [m.cell(q) for q in sequences()]
    return cells


def short_reason(cell: Cell) -> str:
    """The fact (refused) or the first clause of the pass's message (not applicable) for a table."""
    if cell.outcome == "refused":
        for fact in ("float_linears", "float_convs", "kv_attention"):
            if f"requires {fact}" in cell.detail:
                culprit = (
                    cell.detail.split("which ")[-1].split(" invalidates")[0] if "invalidates" in cell.detail else ""
                )
                return f"{fact} ({culprit} invalidates)" if culprit else fact
        return cell.detail.split(";")[0]
    message = cell.detail.split("]: ", 1)[-1]  # without the PassManager's "pass ... failed after passes [...]"
    return message.split(";")[0][:110]
