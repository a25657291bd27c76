"""The tuner: extract a compiled Program's distinct kernels, measure their design spaces with
MetaSchedule's builder and runner (local, or the devices of a TVM RPC tracker), and append every
measurement to the tuning database; and the other half, applying a database at compile time.

Per kernel the tuner measures up to ``trials`` candidates of :func:`.space.candidates` (the default
first), skipping those this target already has records of, so a run killed at any point and started
again measures only what is missing. A candidate whose build or run fails is reported with its
error and not recorded (a lost RPC session is retried, :mod:`.rpc`).
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tvm
import tvm.s_tir.meta_schedule as ms
from tqdm.auto import tqdm
from tvm.s_tir import Schedule

from qcompile.codegen.target import CpuTarget, Target
from qcompile.errors import TuneError
from qcompile.tuning.db import (
    Lookup,
    Measured,
    TraceLookup,
    TuningDB,
    default_trace,
    is_default,
    to_ms,
    tuning_target,
)
from qcompile.tuning.ordinary import OrdinaryOp, apply_pass, ordinary_ops, sampled
from qcompile.tuning.rpc import parse_tracker, rpc_runner
from qcompile.tuning.space import DYNAMIC_ROWS, Tunable, candidates, default_choice


@dataclass(frozen=True)
class TuneOptions:
    """How much to measure and where. ``trials``: candidates per kernel, the default included;
    ``repeats`` × at least ``min_repeat_ms`` per candidate (the runner's evaluator); ``rpc_tracker``
    ("HOST:PORT") with ``rpc_key``: measure on that tracker's servers instead of this machine."""

    trials: int = 16
    repeats: int = 3
    min_repeat_ms: int = 40
    rpc_tracker: str | None = None
    rpc_key: str | None = None
    seed: int = 0

    def check(self) -> None:
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise TuneError(f"trials must be a positive integer (candidates per kernel), got {self.trials!r}")
        if self.repeats < 1 or self.min_repeat_ms < 0:
            raise TuneError(f"repeats must be >= 1 and min_repeat_ms >= 0, got {self.repeats}, {self.min_repeat_ms}")
        if (self.rpc_tracker is None) != (self.rpc_key is None):
            raise TuneError("--rpc-tracker and --rpc-key go together (the tracker, and the key its servers use)")
        if self.rpc_tracker is not None:
            parse_tracker(self.rpc_tracker)


@dataclass
class KernelTuning:
    """One kernel's tuning: its space, what was measured before and now, and the best."""

    name: str
    uses: int  # call sites in the Program
    space: int  # candidates in its design space (0: MetaSchedule's sampled space, no fixed size)
    measured_before: int  # this target's records found in the database at the start
    measured_now: int = 0
    failed: list[str] = field(default_factory=list)  # "choice: error"
    default_ms: float | None = None
    best_ms: float | None = None
    best: dict[str, int] | None = None  # the winning knobs (qcompile's design spaces)
    seconds: float = 0.0
    kind: str = "qcompile"  # "qcompile": knobs of :mod:`.space`; "metaschedule": an ordinary op (:mod:`.ordinary`)
    won: str | None = None  # "default" or "tuned"

    def finish(self, look: Lookup, default_choice: dict[str, int]) -> None:
        d, b = look.default(default_choice), look.best()
        self.default_ms = to_ms(d.seconds) if d else None
        self.best_ms = to_ms(b.seconds) if b else None
        self.best = b.choice if b else None
        self.won = None if b is None else "default" if b.choice == default_choice else "tuned"


@dataclass
class TuneReport:
    db: str
    target: str
    options: dict[str, Any]
    kernels: list[KernelTuning] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)  # reason -> records not used
    not_tunable: list[str] = field(default_factory=list)  # kernels without a design space
    seconds: float = 0.0

    @property
    def trials(self) -> int:
        return sum(k.measured_now for k in self.kernels)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "trials": self.trials}

    def summary(self) -> str:
        lines = [
            f"tuning database {self.db} for {self.target}: {len(self.kernels)} kernels, "
            f"{self.trials} candidates measured in {self.seconds:.0f} s"
        ]
        for k in self.kernels:
            gain = f"{k.default_ms / k.best_ms:.2f}x" if k.default_ms and k.best_ms else "-"
            space = k.space or "sampled"
            lines.append(
                f"  {k.name}: {k.measured_before}+{k.measured_now}/{space} measured, default {k.default_ms} ms, "
                f"best {k.best_ms} ms ({gain}) {k.best or k.won or ''}"
                + (f", {len(k.failed)} failed" if k.failed else "")
            )
        for reason, n in self.ignored.items():
            lines.append(f"  ignored {n} records: {reason}")
        if self.not_tunable:
            lines.append(f"  no design space (untuned): {', '.join(self.not_tunable)}")
        return "\n".join(lines)


# ---- extraction ---------------------------------------------------------------------------------


@dataclass
class Extracted:
    """The distinct kernels of a lowered Program: qcompile's tunable kernels (in order of first use)
    with their call sites, the ordinary ops MetaSchedule can tune, and the rest ("name" or
    "name: why")."""

    tunables: list[Tunable]
    uses: dict[str, int]
    ordinary: list[OrdinaryOp]
    not_tunable: list[str]


def extract(program: Any, target: CpuTarget, float_compute: str = "fp32") -> Extracted:
    """The kernels lowering ``program`` for ``target`` emits (:class:`Extracted`), under the plan's
    ``float_compute`` (:class:`qcompile.plan.FloatCompute`)."""
    from qcompile.codegen.tvm.lower import lower_program

    lowered = lower_program(program, target, float_compute=float_compute)
    tunables = list(lowered.tunables.values())
    names = {t.name for t in tunables}
    rest = sorted(k for k in lowered.kernels if k not in names)
    ordinary, dynamic = ordinary_ops(lowered.mod, target)
    return Extracted(tunables, {t.name: lowered.kernels.get(t.name, 0) for t in tunables}, ordinary, rest + dynamic)


# ---- measuring ----------------------------------------------------------------------------------


def args_info(func: tvm.tirx.PrimFunc, rows: int) -> list[ms.arg_info.ArgInfo]:
    """The runner's arguments for ``func``: its buffers' shapes, a dynamic row count set to ``rows``
    (the kernel itself stays dynamic: it is measured as the build will run it)."""
    out: list[ms.arg_info.ArgInfo] = []
    for p in func.params:
        ty = p.ty
        shape = [rows if isinstance(d, tvm.tirx.Var) else int(d) for d in ty.shape]
        out.append(ms.arg_info.TensorInfo(str(ty.dtype), shape))
    return out


class _Engine:
    """Builds candidates here (TVM's compiler, in this process: MetaSchedule's own popen builder
    imports every tensor intrinsic, a minute per batch on these machines) and measures them with
    MetaSchedule's runner: local, or the servers of an RPC tracker."""

    def __init__(self, target: CpuTarget, options: TuneOptions) -> None:
        self.target, self.options = target, options
        evaluator = ms.runner.EvaluatorConfig(
            number=1, repeat=options.repeats, min_repeat_ms=options.min_repeat_ms, enable_cpu_cache_flush=False
        )
        self.tmp = tempfile.TemporaryDirectory(prefix="qcompile-tune-")
        self.runner: ms.runner.Runner
        if options.rpc_tracker is None:
            self.runner, self.workers = ms.runner.LocalRunner(evaluator_config=evaluator), 1
        else:
            self.runner = rpc_runner(options.rpc_tracker, str(options.rpc_key), evaluator)
            self.workers = max(1, int(getattr(self.runner, "max_workers", 1) or 1))
        self.count = 0

    def close(self) -> None:
        self.tmp.cleanup()

    def _build(self, func: tvm.tirx.PrimFunc) -> str:
        self.count += 1
        path = str(Path(self.tmp.name) / f"candidate{self.count}.so")
        func = func.with_attr("global_symbol", "main")  # private kernels have none: the runner calls main
        tvm.compile(tvm.IRModule({"main": func}), target=self.target.tvm).export_library(path)
        return path

    def measure(self, t: Tunable, choices: list[dict[str, int]]) -> list[list[float] | str]:
        """Run seconds per repeat for each choice, or the error that stopped it."""
        return self.measure_builds([lambda c=c: t.build(c) for c in choices], t.rows or DYNAMIC_ROWS)

    def measure_builds(self, builds: list[Callable[[], tvm.tirx.PrimFunc]], rows: int) -> list[list[float] | str]:
        """Run seconds per repeat for each candidate kernel ``builds`` makes (a dynamic row count
        set to ``rows``), or the error that stopped it."""
        out: list[list[float] | str] = ["" for _ in builds]
        inputs, where = [], []
        for i, make in enumerate(builds):
            try:
                func = make()
                path = self._build(func)
            except Exception as e:  # noqa: BLE001 - a candidate that does not build is reported, not fatal
                out[i] = f"build failed: {type(e).__name__}: {str(e).strip()[-300:]}"
                continue
            inputs.append(ms.runner.RunnerInput(path, "cpu", args_info(func, rows)))
            where.append(i)
        if inputs:
            if self.options.rpc_tracker is None:
                results = [fut.result() for fut in self.runner.run(inputs)]
            else:
                from qcompile.tuning.rpc import measure_with_retries

                results = measure_with_retries(self.runner, inputs)
            for i, r in zip(where, results):
                out[i] = f"run failed: {r.error_msg.strip()[-300:]}" if r.error_msg else [float(x) for x in r.run_secs]
        for inp in inputs:
            Path(inp.artifact_path).unlink(missing_ok=True)
        return out


def tune_program(
    program: Any,
    target: Target,
    db_dir: str | Path,
    options: TuneOptions | None = None,
    progress: bool = True,
    float_compute: str = "fp32",
) -> TuneReport:
    """Tune the kernels of an already rewritten ``program`` for ``target`` into ``db_dir`` (the kernels
    a plan with this ``float_compute`` builds)."""
    options = options or TuneOptions()
    options.check()
    if not isinstance(target, CpuTarget):
        raise TuneError(
            f"tuning measures kernels where they run; target {target} is not a CPU (CUDA kernels have no "
            "design space in qcompile yet)"
        )
    found = extract(program, target, float_compute)
    return tune_tunables(
        found.tunables, target, db_dir, options, progress, found.uses, found.not_tunable, found.ordinary
    )


def tune_tunables(
    tunables: list[Tunable],
    target: CpuTarget,
    db_dir: str | Path,
    options: TuneOptions,
    progress: bool = True,
    uses: dict[str, int] | None = None,
    not_tunable: list[str] | None = None,
    ordinary: list[OrdinaryOp] | None = None,
) -> TuneReport:
    """Tune ``tunables`` (distinct kernels) and the ``ordinary`` ops for ``target`` into ``db_dir``."""
    options.check()
    t0 = time.perf_counter()
    db = TuningDB(db_dir, create=True)
    uses = uses or {t.name: 1 for t in tunables}
    report = TuneReport(str(db_dir), str(tuning_target(target)), asdict(options), not_tunable=not_tunable or [])
    ignored: Counter[str] = Counter()
    plans: list[tuple[Tunable, KernelTuning, Lookup, list[dict[str, int]]]] = []
    for t in tunables:
        look = db.lookup(t, target)
        ignored.update(look.ignored)
        space = candidates(t, options.seed)
        done = [m.choice for m in look.measured]
        todo = [c for c in space if c not in done][: max(0, options.trials - len(done))]
        plans.append((t, KernelTuning(t.name, uses[t.name], len(space), len(done)), look, todo))
    ops = [(op, db.traces(op, target)) for op in ordinary or []]
    for _, tl in ops:
        ignored.update(tl.ignored)
    total = sum(len(todo) for *_, todo in plans) + sum(max(0, options.trials - len(tl.measured)) for _, tl in ops)
    engine = _Engine(target, options) if total else None
    bar = tqdm(total=total, desc="tuning", unit="trial", disable=not progress or total == 0)
    try:
        for t, kt, look, todo in plans:
            k0 = time.perf_counter()
            for start in range(0, len(todo), engine.workers if engine else 1):
                assert engine is not None
                batch = todo[start : start + engine.workers]
                for choice, res in zip(batch, engine.measure(t, batch)):
                    bar.update(1)
                    if isinstance(res, str):
                        kt.failed.append(f"{choice}: {res}")
                        continue
                    db.commit(t, choice, res, target)
                    kt.measured_now += 1
                    look.measured.append(Measured(choice, sum(res) / len(res)))
                best = look.best()
                bar.set_postfix_str(
                    f"{t.name} {kt.measured_before + kt.measured_now}/{min(options.trials, kt.space)}"
                    + (f" best {best.seconds * 1e3:.3f} ms" if best else "")
                )
            kt.seconds = round(time.perf_counter() - k0, 2)
            kt.finish(look, default_choice(t))
            report.kernels.append(kt)
        for op, tl in ops:
            report.kernels.append(_tune_op(op, tl, target, db, options, engine, bar))
    finally:
        bar.close()
        if engine is not None:
            engine.close()
    report.ignored = dict(ignored)
    report.seconds = round(time.perf_counter() - t0, 2)
    return report


def _tune_op(
    op: OrdinaryOp,
    look: TraceLookup,
    target: CpuTarget,
    db: TuningDB,
    options: TuneOptions,
    engine: _Engine | None,
    bar: Any,
) -> KernelTuning:
    """Measure up to ``options.trials`` schedules of an ordinary op (its default first, then samples
    of MetaSchedule's design space) into ``db``; ``look`` gets the new measurements."""
    k0 = time.perf_counter()
    kt = KernelTuning(op.name, op.uses, 0, len(look.measured), kind="metaschedule")
    need = options.trials - len(look.measured)
    if need > 0:
        assert engine is not None
        plain = Schedule(tvm.IRModule({"main": op.func}))  # TVM's own lowering
        default_trace(plain)
        todo = [plain] if look.default() is None else []
        try:
            seen = {str(tr) for tr, _ in look.measured}
            todo += sampled(op, target, need - len(todo), options.seed + len(look.measured), seen)
        except Exception as e:  # noqa: BLE001 - a design space MetaSchedule cannot generate is reported
            kt.failed.append(f"design space: {type(e).__name__}: {str(e).strip()[-300:]}")
        bar.total -= need - len(todo)  # a small space can have fewer distinct schedules than trials
        for start in range(0, len(todo), engine.workers):
            batch = todo[start : start + engine.workers]
            builds = [lambda s=s: s.mod["main"] for s in batch]
            for sch, res in zip(batch, engine.measure_builds(builds, DYNAMIC_ROWS)):
                bar.update(1)
                if isinstance(res, str):
                    kt.failed.append(f"{'default' if sch is plain else 'sample'}: {res}")
                    continue
                db.commit_trace(op, sch.trace, res, target)
                kt.measured_now += 1
                look.measured.append((sch.trace, sum(res) / len(res)))
            bar.set_postfix_str(f"{op.name} {kt.measured_before + kt.measured_now}/{options.trials}")
    best, default = look.best(), look.default()
    kt.default_ms = to_ms(default) if default is not None else None
    kt.best_ms = to_ms(best[1]) if best else None
    kt.won = None if best is None else "default" if is_default(best[0]) else "tuned"
    kt.seconds = round(time.perf_counter() - k0, 2)
    return kt


# ---- applying -----------------------------------------------------------------------------------


@dataclass
class Applied:
    """A tuning database opened for a build: per kernel, the best record of this target (none are
    measured here: a compile with a database runs zero trials)."""

    db: TuningDB
    target: CpuTarget
    used: dict[str, dict[str, Any]] = field(default_factory=dict)  # kernel -> what the build report shows
    ignored: Counter[str] = field(default_factory=Counter)

    @staticmethod
    def open(directory: str | Path, target: Target) -> Applied:
        if not isinstance(target, CpuTarget):
            raise TuneError(f"tuning records are for CPU targets; target {target} has none")
        return Applied(TuningDB(directory), target)

    def build(self, t: Tunable) -> tvm.tirx.PrimFunc:
        """``t`` with the schedule of its best record on this target (the default without one)."""
        look = self.db.lookup(t, self.target)
        self.ignored.update(look.ignored)
        default = default_choice(t)
        best, measured_default = look.best(), look.default(default)
        if best is None:
            self.used[t.name] = {"tuned": False, "why": "no record for this target"}
            return t.build(default)
        self.used[t.name] = {
            "tuned": True,
            "untuned_ms": to_ms(measured_default.seconds) if measured_default else None,
            "tuned_ms": to_ms(best.seconds),
            "won": "default" if best.choice == default else "tuned",
            "schedule": best.choice,
            "records": len(look.measured),
        }
        return t.build(best.choice)

    def ordinary_pass(self) -> tvm.transform.Pass:
        """The pipeline pass that gives the ordinary ops their best records (:mod:`.ordinary`)."""
        return apply_pass(self.db, self.target, self.used, self.ignored)

    def summary(self) -> dict[str, Any]:
        return {
            "db": str(self.db.dir),
            "target": str(tuning_target(self.target)),
            "applied": sum(1 for u in self.used.values() if u["tuned"]),
            "untuned": sorted(k for k, u in self.used.items() if not u["tuned"]),
            "ignored": dict(self.ignored),
        }


__all__ = ["Applied", "KernelTuning", "TuneOptions", "TuneReport", "extract", "tune_program", "tune_tunables"]
