"""The tuning database: MetaSchedule's ``JSONDatabase`` in a directory, read through qcompile's checks.

Layout: ``DIR/database_workload.json`` and ``DIR/database_tuning_record.json``, MetaSchedule's own
files (one JSON document per line; every measured candidate is appended as soon as it is measured,
so a killed tuning run loses at most the candidate being measured).

Records are keyed by workload (the kernel's structural hash, :mod:`.space`) and by the exact target
string, CPU features included (:func:`tuning_target`): a record measured on another CPU or GPU, with
another number of threads, or by another version of a kernel's design space is never applied; it is
counted and its reason reported (:class:`Lookup`).

A file that does not parse is an error naming the file and line; the database is left as it is
(nothing is rewritten: the tuner only ever appends).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

import tvm
import tvm.s_tir.meta_schedule as ms
from tvm.s_tir import Schedule

from qcompile.codegen.target import CpuTarget
from qcompile.errors import TuneError
from qcompile.tuning.space import Tunable, choice_of, sample

FILES = ("database_workload.json", "database_tuning_record.json")


def tuning_target(target: CpuTarget) -> tvm.target.Target:
    """The target records are keyed by: LLVM's CPU name, the threads and every feature qcompile
    dispatches on, spelled out (two machines that LLVM names alike can still differ in features)."""
    return tvm.target.Target(
        {
            "kind": "llvm",
            "mcpu": target.llvm_cpu,
            "num-cores": target.threads,
            "mattr": [f"+{f}" for f in sorted(target.features)],
        }
    )


def to_ms(seconds: float) -> float:
    """Milliseconds to 4 significant digits (an ordinary op can take a few nanoseconds)."""
    return float(f"{seconds * 1e3:.4g}")


@dataclass(frozen=True)
class Measured:
    """One measured candidate of a kernel on this target."""

    choice: dict[str, int]
    seconds: float  # mean of the runner's repeats


@dataclass
class Lookup:
    """What the database holds for one kernel: this target's usable records, and the others, why
    they were ignored (reason -> count)."""

    measured: list[Measured] = field(default_factory=list)
    ignored: Counter[str] = field(default_factory=Counter)

    def best(self) -> Measured | None:
        return min(self.measured, key=lambda m: m.seconds, default=None)

    def default(self, default_choice: dict[str, int]) -> Measured | None:
        return next((m for m in self.measured if m.choice == default_choice), None)


@dataclass
class TraceLookup:
    """An ordinary op's records on this target: (trace, mean seconds); :func:`default_trace` marks
    TVM's own unscheduled lowering, the untuned default."""

    measured: list[tuple[tvm.s_tir.schedule.Trace, float]] = field(default_factory=list)
    ignored: Counter[str] = field(default_factory=Counter)

    def best(self) -> tuple[tvm.s_tir.schedule.Trace, float] | None:
        return min(self.measured, key=lambda m: m[1], default=None)

    def default(self) -> float | None:
        return next((s for tr, s in self.measured if is_default(tr)), None)


def default_trace(sch: Schedule) -> tvm.s_tir.schedule.Trace:
    """The trace an ordinary op's untuned default is recorded with: one decision with one choice,
    which changes nothing (MetaSchedule's databases drop a record whose trace is empty)."""
    sch.sample_categorical([0], [1.0], 0)
    return sch.trace


def is_default(trace: tvm.s_tir.schedule.Trace) -> bool:
    return len(trace.insts) == 1 and trace.insts[0].kind.name == "SampleCategorical"


def _check_file(path: Path) -> None:
    """Every line of ``path`` is JSON (MetaSchedule's loader aborts on the first bad one with a
    message that names neither file nor line)."""
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                why = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
                raise TuneError(
                    f"tuning database file {path}, line {lineno}, is not a record ({why}); "
                    "the database was left as it is: move the file away, or use another --db directory"
                ) from None


class TuningDB:
    """A tuning database directory (created when ``create`` and missing)."""

    def __init__(self, directory: str | Path, create: bool = False) -> None:
        self.dir = Path(directory)
        if self.dir.exists() and not self.dir.is_dir():
            raise TuneError(f"tuning database {self.dir} is not a directory")
        if not self.dir.exists():
            if not create:
                raise TuneError(
                    f"tuning database {self.dir} does not exist; create it with `qcompile tune --db {self.dir}`"
                )
            self.dir.mkdir(parents=True)
        present = [n for n in FILES if (self.dir / n).exists()]
        if not create and not present:
            raise TuneError(f"{self.dir} holds no tuning database ({' / '.join(FILES)})")
        for n in present:
            _check_file(self.dir / n)
        try:
            self.db = ms.database.JSONDatabase(work_dir=str(self.dir), allow_missing=True)
            self._workloads: dict[Tunable, ms.database.Workload] = {}  # committed or found, per kernel
        except Exception as e:  # noqa: BLE001 - TVM raises its own error types for a malformed record
            raise TuneError(
                f"tuning database {self.dir} could not be read ({type(e).__name__}: {str(e).strip()[-300:]}); "
                "the database was left as it is"
            ) from None

    def _workload(self, t: Tunable, commit: bool) -> ms.database.Workload | None:
        """``t``'s workload in the database (committed first when ``commit``), built and hashed once."""
        if t not in self._workloads:
            mod = tvm.IRModule({"main": t.workload()})
            if not commit and not self.db.has_workload(mod):
                return None
            self._workloads[t] = self.db.commit_workload(mod)
        return self._workloads[t]

    def _records(
        self, t: Tunable, target: CpuTarget, ignored: Counter[str]
    ) -> list[tuple[ms.database.TuningRecord, float]]:
        """This target's measured records of ``t`` with their mean seconds; the rest counted in ``ignored``."""
        wl = self._workload(t, commit=False)
        if wl is None:
            return []
        want = str(tuning_target(target))
        out = []
        for rec in self.db.get_top_k(wl, 1 << 30):
            got = str(rec.target) if rec.target is not None else "(no target)"
            if got != want:
                ignored[f"measured for another target: {got}"] += 1
                continue
            secs = [float(s) for s in (rec.run_secs or [])]
            if not secs or not all(0 < s < 1e9 for s in secs):
                ignored["a failed measurement"] += 1
                continue
            out.append((rec, mean(secs)))
        return out

    def lookup(self, t: Tunable, target: CpuTarget) -> Lookup:
        """This target's measurements of ``t``, and what was ignored and why."""
        out = Lookup()
        knobs = t.knobs()
        for rec, secs in self._records(t, target, out.ignored):
            choice = choice_of(rec.trace, knobs)
            if choice is None:
                out.ignored["knobs of another version of this kernel's design space"] += 1
                continue
            out.measured.append(Measured(choice, secs))
        return out

    def traces(self, t: Tunable, target: CpuTarget) -> TraceLookup:
        """This target's measured schedules of an ordinary op ``t`` (:mod:`.ordinary`): whole traces."""
        out = TraceLookup()
        out.measured = [(rec.trace, secs) for rec, secs in self._records(t, target, out.ignored)]
        return out

    def commit(self, t: Tunable, choice: dict[str, int], run_secs: list[float], target: CpuTarget) -> None:
        """Append one measurement (written to disk before this returns)."""
        wl = self._workload(t, commit=True)
        assert wl is not None
        sch = Schedule(wl.mod)
        sample(sch, t.knobs(), choice)
        self.commit_trace(t, sch.trace, run_secs, target)

    def commit_trace(
        self, t: Tunable, trace: tvm.s_tir.schedule.Trace, run_secs: list[float], target: CpuTarget
    ) -> None:
        """Append one measured schedule of ``t`` (written to disk before this returns)."""
        wl = self._workload(t, commit=True)
        assert wl is not None
        self.db.commit_tuning_record(ms.database.TuningRecord(trace, wl, run_secs, tuning_target(target), None))


__all__ = [
    "FILES",
    "Lookup",
    "Measured",
    "TraceLookup",
    "TuneError",
    "TuningDB",
    "default_trace",
    "is_default",
    "tuning_target",
]
