"""Ordinary ops: the fused elementwise, normalization, rotary, gather and mask kernels that TVM's
Relax legalization emits around qcompile's own kernels, tuned with MetaSchedule's default CPU
design space (``post-order-apply`` with the LLVM target's default schedule rules and
postprocessors: inlining, parallel / vectorize / unroll annotations, compute locations, tiles).

* **Which** (:func:`ordinary_ops`): the call sites MetaSchedule's ``extract_tasks`` finds in the
  legalized module (after reshapes become views, so no copy kernel is tuned for nothing), minus
  qcompile's kernels (they carry ``tir.is_scheduled`` and have their own design spaces,
  :mod:`.space`). Reported as not tunable, with the reason: a kernel with a dynamic dimension
  (prefill's and evaluation's sequence length: MetaSchedule's rules need static loop extents), and
  one with integer or boolean buffers (gathers, positions, masks: measured on the runner's random
  data, an index could read out of bounds, which crashed the runner on the embedding gather).
* **Search** (:func:`sampled`): the untuned default, TVM's own lowering of the op (recorded with
  :func:`~qcompile.tuning.db.default_trace`), is measured first, so tuning cannot pick something
  slower than what it measured; then random
  samples of the design spaces' decisions (MetaSchedule's ``replay-trace`` strategy), seeded by the
  number already measured, so that a resumed run samples new schedules.
* **Applying** (:func:`apply_pass`): inside the CPU pipeline, right after legalization, every op
  whose best record on this target is not the default gets that record's trace, by MetaSchedule's
  ``MetaScheduleApplyDatabase`` over an in-memory database of just those records (the JSON
  database's own query does not look at the target).
"""

from __future__ import annotations

import sys
import types
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import tvm
import tvm.s_tir.meta_schedule as ms
from tvm.s_tir import Schedule
from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

from qcompile.codegen.target import CpuTarget
from qcompile.tuning.db import TraceLookup, TuningDB, is_default, to_ms, tuning_target

DYNAMIC = "dynamic shape (MetaSchedule's rules need static loop extents)"
SCHEDULED = ("tir.is_scheduled", "tirx.is_scheduled")
INTEGER = "integer or boolean buffers (random measurement data could index out of bounds)"


@dataclass(frozen=True, eq=False)
class OrdinaryOp:
    """One distinct ordinary kernel: its name in the module and its workload, the PrimFunc as
    MetaSchedule keys it (``main``, no aliasing)."""

    name: str
    func: tvm.tirx.PrimFunc
    uses: int

    @property
    def rows(self) -> int | None:
        return None  # static shapes only: the runner uses the buffers' own

    def workload(self) -> tvm.tirx.PrimFunc:
        return self.func


def legalize(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """``mod`` as the CPU pipeline has it where tuned schedules are applied (:func:`apply_pass`)."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    from qcompile.codegen.tvm.cuda import front_passes

    with target:
        return tvm.transform.Sequential(front_passes(target, cpu_generic))(mod)


def _static(func: tvm.tirx.PrimFunc) -> bool:
    for p in func.params:
        if not isinstance(p.ty, tvm.tirx.BufferType):
            return False  # a scalar parameter: a shape variable
        if not all(isinstance(d, tvm.tirx.IntImm) for d in p.ty.shape):
            return False
    return True


def _float(func: tvm.tirx.PrimFunc) -> bool:
    return all(str(p.ty.dtype).startswith(("float", "bfloat")) for p in func.params)


def _untunable(func: tvm.tirx.PrimFunc) -> str | None:
    """Why an unscheduled PrimFunc is not tuned (None: it is)."""
    if not _static(func):
        return DYNAMIC
    if not _float(func):
        return INTEGER
    return None


def _scheduled(func: tvm.tirx.PrimFunc) -> bool:
    """Already scheduled: qcompile's kernels (``tir.is_scheduled``) or TVM 0.27's own mark."""
    return func.attrs is not None and any(bool(func.attrs.get(k, False)) for k in SCHEDULED)


def ordinary_ops(mod: tvm.IRModule, target: CpuTarget) -> tuple[list[OrdinaryOp], list[str]]:
    """The distinct tunable ordinary kernels of the (not yet legalized) Relax module ``mod``, and
    the others as "name: reason"."""
    from tvm import relax

    legal = legalize(mod, target.tvm)
    legal = relax.transform.RewriteDataflowReshape()(legal)  # reshapes become views: no kernel to tune
    tasks = ms.relax_integration.extract_tasks(legal, tuning_target(target))
    ops, rest = [], []
    for task in tasks:
        func = task.dispatched[0]["main"]
        if _scheduled(func):
            continue  # qcompile's kernels: their own design spaces
        why = _untunable(func)
        if why is not None:
            rest.append(f"{task.task_name}: {why}")
            continue
        ops.append(OrdinaryOp(task.task_name, func, int(task.weight)))
    return ops, rest


@contextmanager
def _without_tensor_intrinsics() -> Iterator[None]:
    """``TuneContext`` imports ``tvm.s_tir.tensor_intrin`` every time, which parses ~500 TVMScript
    intrinsics (40-65 s here, minutes under a profiler). The generic LLVM rules use none of them,
    so while a context is built that import finds a placeholder (removed afterwards; a real import
    already done is left alone)."""
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    sys.modules[name] = types.ModuleType(name)
    try:
        yield
    finally:
        del sys.modules[name]


def sampled(op: OrdinaryOp, target: CpuTarget, n: int, seed: int, seen: set[str]) -> list[Schedule]:
    """Up to ``n`` schedules of ``op`` sampled from MetaSchedule's default design spaces for
    ``target``, none whose trace is in ``seen`` (the text of traces already measured; updated)."""
    with _without_tensor_intrinsics():
        ctx = ms.TuneContext(
            mod=tvm.IRModule({"main": op.func}),
            target=tuning_target(target),
            # the generic LLVM rules: no tensorization (x86's VNNI rules need the tensor intrinsics)
            space_generator=ms.space_generator.PostOrderApply(sch_rules="llvm", postprocs="llvm", mutator_probs="llvm"),
            search_strategy="replay-trace",
            task_name=op.name,
            rand_state=seed,
            num_threads=1,
        )
    spaces = ctx.generate_design_space()
    ctx.pre_tuning(max_trials=2 * n, num_trials_per_iter=2 * n, design_spaces=spaces, database=None, cost_model=None)
    out: list[Schedule] = []
    for cand in ctx.generate_measure_candidates() or []:
        text = str(cand.sch.trace)
        if text not in seen and len(out) < n:
            seen.add(text)
            out.append(cand.sch)
    ctx.post_tuning()
    return out


def _report(look: TraceLookup) -> dict[str, Any]:
    best = look.best()
    if best is None:
        return {"tuned": False, "why": "no record for this target"}
    default = look.default()
    return {
        "tuned": True,
        "untuned_ms": to_ms(default) if default is not None else None,
        "tuned_ms": to_ms(best[1]),
        "won": "default" if is_default(best[0]) else "tuned",
        "schedule": "metaschedule",
        "records": len(look.measured),
    }


def apply_pass(
    db: TuningDB, target: CpuTarget, used: dict[str, dict[str, Any]], ignored: Counter[str]
) -> tvm.transform.Pass:
    """A module pass: each unscheduled, static PrimFunc of the legalized module gets the schedule of
    its best record on ``target`` in ``db`` (none: TVM's own lowering, as without a database). What
    it used goes to ``used`` (kernel -> build-report entry), what it ignored to ``ignored``."""

    @tvm.transform.module_pass(opt_level=0, name="qcompile.ApplyTunedOrdinaryOps")
    def _apply(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        memory = ms.database.MemoryDatabase()
        chosen = 0
        for gv, func in mod.functions.items():
            if not isinstance(func, tvm.tirx.PrimFunc) or _scheduled(func) or _untunable(func) is not None:
                continue
            op = OrdinaryOp(gv.name_hint, _normalize_mod(func)["main"], 1)
            look = db.traces(op, target)
            ignored.update(look.ignored)
            best = look.best()
            if best is None:
                continue  # an op the tuner never saw (e.g. a reshape that became a view): not reported
            used[gv.name_hint] = _report(look)
            if not is_default(best[0]):
                wl = memory.commit_workload(tvm.IRModule({"main": op.func}))
                memory.commit_tuning_record(ms.database.TuningRecord(best[0], wl, [best[1]], tuning_target(target)))
                chosen += 1
        if not chosen:
            return mod
        with memory:
            return tvm.relax.transform.MetaScheduleApplyDatabase()(mod)

    return _apply


__all__ = ["DYNAMIC", "INTEGER", "SCHEDULED", "OrdinaryOp", "apply_pass", "legalize", "ordinary_ops", "sampled"]
