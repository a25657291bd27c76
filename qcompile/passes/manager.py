"""PassManager: checks a plan's order, runs its passes, verifies after each, reports, dumps, explains failures.

Before the first pass it checks the Program's state for NaN/±Inf (:func:`qcompile.ir.finite.guard_state`):
an error naming every bad tensor and its layer, or, under the plan's ``nonfinite: zero``, the
values replaced by 0 and listed in the report (``CompileReport.nonfinite``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os
import time
from pathlib import Path

from qcompile.errors import PassError, PlanError, QCompileError
from qcompile.ir.facts import CAPTURED_FACTS, DESCRIPTIONS, Fact
from qcompile.ir.finite import guard_state
from qcompile.ir.printer import format_program
from qcompile.ir.program import PATH_KEY, Program
from qcompile.ir.verify import verify
from qcompile.passes.base import Pass, PassContext, make_pass
from qcompile.plan import LM_HEAD_GLOB, LmHead, Plan
from qcompile.report import CompileReport, PassReport

log = logging.getLogger(__name__)


_DEFAULT_SKIP = next(f.default for f in dataclasses.fields(Plan) if f.name == "skip")


def _node_ids(program: Program) -> set[tuple[str, str]]:
    return {(e.name, n.name) for e, n in program.nodes()}


class PassManager:
    """Runs ``plan``'s passes. Constructing it instantiates every pass from its options and checks
    the order against the facts the passes require, provide and invalidate, starting from what
    capture provides: plan errors surface before anything is captured or calibrated."""

    def __init__(self, plan: Plan, *, dump_dir: str | Path | None = None, verify_deep: bool = True) -> None:
        self.plan = plan
        self.dump_dir = Path(dump_dir) if dump_dir else None
        if self.dump_dir is not None:
            check_writable_dir(self.dump_dir, "dump_dir (--dump-dir)")
        self.verify_deep = verify_deep
        self.passes: list[Pass] = [make_pass(pc.name, pc.options) for pc in plan.passes]
        if plan.lm_head is not LmHead.FP32 and "quantize_weights" not in {pc.name for pc in plan.passes}:
            raise PlanError(
                f"lm_head: {plan.lm_head.value} would have no effect: plan {plan.name!r} has no quantize_weights "
                f"pass (passes: {[pc.name for pc in plan.passes] or 'none'}), and only quantize_weights quantizes "
                "the head; add one, or use a plan that has it (e.g. w8a8-rtn)"
            )
        self.check_order(CAPTURED_FACTS)

    def check_order(self, start: frozenset[Fact], what: str = "capture") -> frozenset[Fact]:
        """Replay the passes over the facts, from ``start`` (what ``what`` established); PlanError
        naming the first pass whose requirement is missing and, when an earlier pass invalidated
        it, that pass. Returns the facts after the last pass."""
        facts = set(start)
        lost: dict[Fact, str] = {}  # fact -> the pass that invalidated it
        for i, p in enumerate(self.passes):
            missing = sorted(p.requires - facts, key=lambda f: f.value)
            if missing:
                before = [q.name for q in self.passes[:i]] or [f"(none: the Program as {what} left it)"]
                why = "; ".join(
                    f"{f.value} ({DESCRIPTIONS[f]}), which {lost[f]!r} invalidates"
                    if f in lost
                    else f"{f.value} ({DESCRIPTIONS[f]}), which no earlier pass provides"
                    for f in missing
                )
                raise PlanError(
                    f"pass {p.name!r} (position {i}) requires {why}; passes before it: {before}. Reorder the plan's "
                    "passes."
                )
            for f in p.invalidates:
                lost[f] = p.name
            facts = (facts - p.invalidates) | p.provides
            for f in p.provides:
                lost.pop(f, None)
        return frozenset(facts)

    def rule_warnings(self, program: Program) -> list[str]:
        """A warning for each ``skip`` glob and rule ``match`` that selects no module path of
        ``program`` (a typo there would otherwise quantize what was meant to stay in float). The
        default skip glob (``*lm_head*``) is exempt: models without an lm_head are common; an ``lm_head``
        setting other than fp32 that selects no layer is not (it would quantize nothing)."""
        paths = program.module_paths()
        out = []
        for glob in self.plan.skip:
            if glob not in _DEFAULT_SKIP and not any(fnmatch.fnmatchcase(p, glob) for p in paths):
                out.append(f"skip glob {glob!r} matches no layer of this model, so it keeps nothing in float")
        if self.plan.lm_head is not LmHead.FP32 and not any(fnmatch.fnmatchcase(p, LM_HEAD_GLOB) for p in paths):
            out.append(
                f"lm_head: {self.plan.lm_head.value} selects no layer of this model (no module path matches "
                f"{LM_HEAD_GLOB!r}), so no head is quantized"
            )
        for i, rule in enumerate(self.plan.rules):
            if not any(fnmatch.fnmatchcase(p, rule.match) for p in paths):
                out.append(f"rule {i} (match {rule.match!r}) matches no layer of this model")
        return out

    def run(self, program: Program, ctx: PassContext, report: CompileReport) -> tuple[Program, Plan]:
        """Run the passes; returns the rewritten Program and the plan as refined by the passes."""
        if program.facts != CAPTURED_FACTS:  # a Program that passes already rewrote
            self.check_order(program.facts, "earlier passes")
        report.nonfinite.update(guard_state(program, self.plan.nonfinite))  # before any pass sees a NaN
        for w in self.rule_warnings(program):
            log.warning(w)
            report.warnings.append(w)
        self._dump(program, 0, "captured")
        done: list[str] = []
        for i, p in enumerate(self.passes, start=1):
            before = _node_ids(program)
            t0 = time.perf_counter()
            ctx.at(None, None)
            try:
                result = p.run(program, ctx)
                verify(result.program, deep=self.verify_deep)
            except Exception as e:
                raise self._explain(p, e, ctx, done) from e
            after = _node_ids(result.program)
            program = result.program
            program.facts = (program.facts - p.invalidates) | p.provides
            if result.plan is not None:
                ctx = dataclasses.replace(ctx, plan=result.plan)
            report.passes.append(
                PassReport(
                    name=p.name,
                    seconds=round(time.perf_counter() - t0, 4),
                    modified=result.modified,
                    nodes_before=len(before),
                    nodes_after=len(after),
                    nodes_added=len(after - before),
                    nodes_removed=len(before - after),
                    layers_changed=result.layers_changed,
                    skipped=result.skipped,
                    notes=result.notes,
                    summary=p.summarize(result.notes),
                )
            )
            for path, reason in result.skipped:
                log.info("%s skipped %s: %s", p.name, path, reason)
            done.append(p.name)
            self._dump(program, i, p.name)
        return program, ctx.plan

    def _explain(self, p: Pass, e: Exception, ctx: PassContext, done: list[str]) -> PassError:
        node = ctx.node
        where = ""
        if node is not None:
            entry = ctx.entry.name if ctx.entry is not None else "?"
            where = (
                f" on node %{node.name} ({node.target}) in entry {entry!r}, module path {node.meta.get(PATH_KEY, '')!r}"
            )
        kind = "" if isinstance(e, QCompileError) else f"{type(e).__name__}: "
        return PassError(f"pass {p.name!r} failed{where} after passes {done or ['(none)']}: {kind}{e}")

    def _dump(self, program: Program, index: int, name: str) -> None:
        if self.dump_dir is None:
            return
        path = self.dump_dir / f"{index:02d}_{name}.txt"
        try:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(format_program(program) + "\n", encoding="utf-8")
        except OSError as e:
            raise QCompileError(f"cannot write the graph dump {path}: {e.strerror}; pass another --dump-dir") from None


def check_writable_dir(path: Path, what: str) -> None:
    """QCompileError unless ``path`` is a directory this process can write into, or can be created
    as one (its nearest existing ancestor is a writable directory). Creates nothing."""
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise QCompileError(f"{what} {path} exists and is not a directory; name a directory (it is created)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise QCompileError(f"{what} {path} is not writable by this user; name a directory you can write")
        return
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise QCompileError(f"{what} {path} cannot be created: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QCompileError(f"{what} {path} cannot be created: {parent} is not writable by this user")
