"""Autotuning: design spaces (every candidate computes what the default computes), the database
(resume after a kill, reuse with zero trials, records of another target refused, a corrupt file
reported and left alone), applying records at compile time, and tuning through an RPC tracker
with a server killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.tvm

tvm = pytest.importorskip("tvm")

import qcompile  # noqa: E402
import qcompile.tuning.tuner  # noqa: E402
from qcompile.codegen.target import CpuTarget  # noqa: E402
from qcompile.codegen.tvm.kernels.attention import Attention  # noqa: E402
from qcompile.codegen.tvm.kernels.linear import LinearKernel, QuantRows  # noqa: E402
from qcompile.codegen.tvm.kernels.tunable import (  # noqa: E402
    AttentionTunable,
    QuantRowsTunable,
    TemplateTunable,
    X86Tunable,
)
from qcompile.codegen.tvm.kernels.x86 import X86Linear, isa_for  # noqa: E402
from qcompile.errors import TuneError  # noqa: E402
from qcompile.eval.zoo import tiny_llama  # noqa: E402
from qcompile.tuning.db import TuningDB, tuning_target  # noqa: E402
from qcompile.tuning.space import candidates, choice_of, sample  # noqa: E402

PLAN = "w4a16-rtn-g32-asym"  # template kernels (their design space is the larger one)
CACHE = 64
ENTRIES = ("forward",)  # one entry: its linears run with a dynamic number of rows
RECORDS = "database_tuning_record.json"


def _shape(ty, rows: int) -> list[int]:
    return [rows if isinstance(d, tvm.tirx.Var) else int(d) for d in ty.shape]


def _run(func, inputs: list[np.ndarray], rows: int) -> list[np.ndarray]:
    lib = tvm.compile(func.with_attr("global_symbol", "main"), target=CpuTarget().tvm)
    outs = [tvm.runtime.tensor(np.zeros(_shape(p.ty, rows), str(p.ty.dtype))) for p in func.params[len(inputs) :]]
    lib(*[tvm.runtime.tensor(a) for a in inputs], *outs)
    return [y.numpy() for y in outs]


def _inputs(func, rows: int, seed: int, outputs: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for p in func.params[:-outputs]:
        shape = _shape(p.ty, rows)
        dt = str(p.ty.dtype)
        if dt.startswith("float"):
            out.append(rng.standard_normal(shape).astype(dt))
        elif dt == "bool":  # an attention mask: random, every row with its first key unmasked
            mask = rng.random(shape) < 0.7
            mask[..., 0] = True
            out.append(mask)
        else:
            info = np.iinfo(dt)
            lo, hi = (max(info.min, -127), min(info.max, 127)) if dt != "uint8" else (0, 255)
            out.append(rng.integers(lo, hi + 1, shape).astype(dt))
    return out


def _tunables() -> list[object]:
    out: list[object] = [
        TemplateTunable(LinearKernel(128, 256, "u4", 64, 0, 0, True, True, None)),
        TemplateTunable(LinearKernel(128, 256, "i8", 256, 8, 0, False, False, None)),
        TemplateTunable(LinearKernel(128, 256, "i4", 128, 8, 128, False, False, None)),
        TemplateTunable(LinearKernel(64, 128, "f32", 128, 0, 0, False, False, 1)),
        TemplateTunable(LinearKernel(128, 256, "i6", 128, 8, 128, False, True, 6)),  # 6 rows: tiles of 4 pad
        QuantRowsTunable(QuantRows(256, 8, 128, None, flip=True)),
        QuantRowsTunable(QuantRows(192, 6, 0, 1)),
        QuantRowsTunable(QuantRows(256, 8, 32, None, sums=32)),  # w4a8-g32-asym: also sx·Σqx per group
        TemplateTunable(LinearKernel(128, 256, "u4", 32, 8, 32, True, False, None)),  # its generic kernel
        AttentionTunable(Attention(1, 6, 2, 32, 16, None, "bool", 1, 0.25)),
    ]
    isa = isa_for(CpuTarget().features)
    if isa is not None:
        out.append(X86Tunable(X86Linear(128, 256, "i6", 128, 8, 128, True, None, isa)))
        out.append(X86Tunable(X86Linear(128, 256, "i4", 128, 8, 0, True, None, isa)))
        out.append(X86Tunable(X86Linear(128, 256, "u4", 32, 8, 32, False, None, isa)))
    return out


@pytest.mark.parametrize("t", _tunables(), ids=lambda t: t.name)
def test_every_candidate_computes_what_the_default_computes(t) -> None:
    space = candidates(t, seed=3)
    assert space[0] == {k.name: k.values[0] for k in t.knobs()}  # the default first
    assert len({tuple(sorted(c.items())) for c in space}) == len(space)
    rows = t.rows or 13  # a row count no tile divides
    default = t.build(space[0])
    outputs = (3 if t.spec.sums else 2) if isinstance(t, QuantRowsTunable) else 1
    inputs = _inputs(default, rows, seed=1, outputs=outputs)
    want = _run(default, inputs, rows)
    assert all(np.abs(w).max() > 0 for w in want)
    # every candidate of a small space; the template: a few, and one per row-tile size (tiles that do
    # not divide the rows pad them); the x86 kernels (2 s per build): two
    tried = space[1:5] + [next(c for c in space if c.get("rows") == r) for r in {c.get("rows") for c in space}]
    tried = space[1:] if len(space) <= 16 else space[1:3] if isinstance(t, X86Tunable) else tried
    for choice in tried:
        got = _run(t.build(choice), inputs, rows)
        for g, w in zip(got, want):
            if t.name.startswith("qc_linear_f32") or "_af32_" in t.name:
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=str(choice))
            else:  # integer sums then the same fp32 rescale in the same order; the same quantization
                np.testing.assert_array_equal(g, w, err_msg=str(choice))


def test_a_trace_holds_the_knob_decisions() -> None:
    t = _tunables()[0]
    for choice in candidates(t)[:6]:
        sch = tvm.s_tir.Schedule(tvm.IRModule({"main": t.workload()}))
        sample(sch, t.knobs(), choice)
        assert choice_of(sch.trace, t.knobs()) == choice
    other = next(u for u in _tunables() if u.name.startswith("qc_linear_f32"))  # fewer knobs: no decode
    assert choice_of(sch.trace, other.knobs()) is None


# ---- the database on a tiny model ---------------------------------------------------------------


def _records(db: Path) -> list[str]:
    p = db / RECORDS
    return p.read_text().splitlines() if p.exists() else []


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_llama()


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, model) -> tuple[Path, qcompile.tuning.tuner.TuneReport]:
    db = tmp_path_factory.mktemp("tune") / "db"
    report = qcompile.tune(model, PLAN, db=db, trials=2, max_cache_len=CACHE, lm_entries=ENTRIES, progress=False)
    return db, report


def test_tune_records_every_kernel_and_a_second_run_measures_nothing(tuned, model) -> None:
    db, report = tuned
    ours = [k for k in report.kernels if k.kind == "qcompile"]
    assert ours and sum(k.measured_now for k in ours) == sum(min(2, k.space) for k in ours)
    assert all(1 <= k.measured_now <= 2 for k in report.kernels if k.kind == "metaschedule")
    assert all(not k.failed and k.best_ms is not None and k.best_ms <= k.default_ms for k in report.kernels)
    assert len(_records(db)) == report.trials
    assert report.not_tunable  # attention, cache writes, activation quantization: reported, not skipped
    again = qcompile.tune(model, PLAN, db=db, trials=2, max_cache_len=CACHE, lm_entries=ENTRIES, progress=False)
    assert again.trials == 0 and len(_records(db)) == report.trials


def test_compile_applies_the_best_record_per_kernel_with_the_same_outputs(tuned, model) -> None:
    db, report = tuned
    before = (db / RECORDS).read_bytes()
    cm = qcompile.compile(model, "cpu", PLAN, max_cache_len=CACHE, lm_entries=ENTRIES, tuning_db=db)
    plain = qcompile.compile(model, "cpu", PLAN, max_cache_len=CACHE, lm_entries=ENTRIES)
    info = cm.report.backend["tuning"]
    assert info["applied"] == len(report.kernels) and not info["untuned"] and not info["ignored"]
    for k in report.kernels:
        used = info["kernels"][k.name]
        assert used["schedule"] == (k.best or "metaschedule") and used["tuned_ms"] <= used["untuned_ms"]
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cm(ids), plain(ids), rtol=1e-5, atol=1e-5)
    assert (db / RECORDS).read_bytes() == before  # nothing measured or written by a compile
    assert "tuning database" in cm.report.summary()


def test_ordinary_ops_are_tuned_by_metaschedule_and_a_winning_schedule_is_applied(model, tmp_path) -> None:
    from qcompile.codegen.tvm.lower import lower_program
    from qcompile.tuning.ordinary import DYNAMIC, INTEGER, apply_pass, legalize, ordinary_ops
    from qcompile.tuning.tuner import TuneOptions, tune_tunables

    target = CpuTarget()
    decode = ("prefill", "decode")  # the decode step's ops have static shapes
    plain = qcompile.compile(model, "cpu", PLAN, max_cache_len=CACHE, lm_entries=decode)
    ops, rest = ordinary_ops(lower_program(plain.program, target).mod, target)
    assert ops and any(DYNAMIC in r for r in rest) and any(INTEGER in r for r in rest)
    norm = next(op for op in ops if "rsqrt" in op.name)  # an RMSNorm of the decode step
    db = tmp_path / "db"
    report = tune_tunables([], target, db, TuneOptions(trials=3), progress=False, ordinary=[norm])
    (k,) = report.kernels
    assert k.kind == "metaschedule" and k.measured_now == 3 and not k.failed and k.default_ms is not None
    # whichever schedule measured fastest is applied; to exercise applying a MetaSchedule schedule
    # (not the default) regardless of this machine's timings, one more record of a sampled schedule
    # is made the fastest (a test of the applying logic only; no figure comes from it)
    tdb = TuningDB(db)
    trace = next(tr for tr, _ in tdb.traces(norm, target).measured if len(tr.insts) > 1)
    tdb.commit_trace(norm, trace, [1e-9], target)
    used: dict = {}
    legal = legalize(lower_program(plain.program, target).mod, target.tvm)
    with target.tvm:
        applied = apply_pass(TuningDB(db), target, used, Counter())(legal)
    entry = next(v for v in used.values() if v["won"] == "tuned")
    assert entry["schedule"] == "metaschedule" and entry["tuned_ms"] == 1e-6
    scheduled = [
        gv.name_hint
        for gv, f in applied.functions.items()
        if isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint in used and f.attrs and f.attrs.get("tirx.is_scheduled")
    ]
    assert scheduled  # the norm's PrimFunc now carries MetaSchedule's schedule
    cm = qcompile.compile(model, "cpu", PLAN, max_cache_len=CACHE, lm_entries=decode, tuning_db=db)
    assert cm.report.backend["tuning"]["kernels"][scheduled[0]]["won"] == "tuned"
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(cm.generate(ids, 6, eos_token_id=[]), plain.generate(ids, 6, eos_token_id=[]))


def _retarget(line: str) -> str:
    rec = json.loads(line)

    def walk(x: object) -> object:
        if isinstance(x, dict) and x.get("kind") == "llvm":
            return {**x, "mcpu": "haswell", "mattr": ["+avx2", "+fma"]}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return json.dumps(walk(rec))


def test_records_of_another_cpu_are_reported_and_not_applied(tuned, model, tmp_path) -> None:
    db, _ = tuned
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "database_workload.json").write_bytes((db / "database_workload.json").read_bytes())
    (foreign / RECORDS).write_text("\n".join(_retarget(x) for x in _records(db)) + "\n")
    cm = qcompile.compile(model, "cpu", PLAN, max_cache_len=CACHE, lm_entries=ENTRIES, tuning_db=foreign)
    info = cm.report.backend["tuning"]
    assert info["applied"] == 0 and info["untuned"]
    (reason,) = info["ignored"]
    assert "another target" in reason and "haswell" in reason
    assert str(tuning_target(CpuTarget())) not in reason


def test_a_corrupt_database_is_an_error_and_left_as_it_is(tuned, model, tmp_path) -> None:
    db, _ = tuned
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "database_workload.json").write_bytes((db / "database_workload.json").read_bytes())
    text = (db / RECORDS).read_text() + '[0, "half a rec\n'
    (bad / RECORDS).write_text(text)
    n = len(text.splitlines())
    with pytest.raises(TuneError, match=f"line {n}.*left as it is"):
        qcompile.compile(model, "cpu", PLAN, max_cache_len=CACHE, lm_entries=ENTRIES, tuning_db=bad)
    with pytest.raises(TuneError, match=f"line {n}"):
        qcompile.tune(model, PLAN, db=bad, trials=2, max_cache_len=CACHE, lm_entries=ENTRIES, progress=False)
    assert (bad / RECORDS).read_text() == text
    with pytest.raises(TuneError, match="does not exist"):
        TuningDB(tmp_path / "missing")


def test_bad_arguments_are_refused_before_any_work(model, tmp_path) -> None:
    with pytest.raises(TuneError, match="trials"):
        qcompile.tune(model, PLAN, db=tmp_path / "x", trials=0)
    with pytest.raises(TuneError, match="go together"):
        qcompile.tune(model, PLAN, db=tmp_path / "x", rpc_tracker="127.0.0.1:9")
    with pytest.raises(TuneError, match="not a CPU"):
        qcompile.tune(model, PLAN, target="cuda:sm_90", db=tmp_path / "x")
    with pytest.raises(qcompile.QCompileError, match="torch backend"):
        qcompile.compile(model, "cpu", PLAN, backend="torch", tuning_db=tmp_path)
    assert not (tmp_path / "x").exists()


_TUNE_SCRIPT = """
import sys
import qcompile
from qcompile.eval.zoo import tiny_llama
qcompile.tune(
    tiny_llama(), {plan!r}, db=sys.argv[1], trials=3, max_cache_len={cache}, lm_entries=("forward",), progress=False
)
"""


def test_a_killed_run_resumes_without_losing_a_record(model, tmp_path) -> None:
    db = tmp_path / "db"
    script = _TUNE_SCRIPT.format(plan=PLAN, cache=CACHE)
    proc = subprocess.Popen([sys.executable, "-c", script, str(db)], start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while len(_records(db)) < 3:
            assert proc.poll() is None, "the tuning run ended before it could be killed"
            assert time.monotonic() < deadline, "no records after 300 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its runner's worker
        proc.wait()
    kept = (db / RECORDS).read_text()
    report = qcompile.tune(model, PLAN, db=db, trials=3, max_cache_len=CACHE, lm_entries=ENTRIES, progress=False)
    after = (db / RECORDS).read_text()
    assert after.startswith(kept.rstrip("\n"))  # every record written before the kill is still there
    assert sum(k.measured_before for k in report.kernels) == len(kept.splitlines())
    assert report.trials > 0  # killed with work left
    assert all(k.measured_before + k.measured_now == min(3, k.space) for k in report.kernels)
    measured = [json.loads(x) for x in after.splitlines()]
    assert len({json.dumps(r[:2]) for r in measured}) == len(measured)  # no candidate measured twice


def test_tuning_through_an_rpc_tracker_survives_a_killed_server(model, tmp_path) -> None:
    from qcompile.tuning.rpc import LocalCluster

    db = tmp_path / "db"
    result: dict[str, object] = {}
    with LocalCluster(servers=2, key="qcompile-tune-test") as cluster:

        def run() -> None:
            try:
                result["report"] = qcompile.tune(
                    model,
                    PLAN,
                    db=db,
                    trials=3,
                    max_cache_len=CACHE,
                    lm_entries=ENTRIES,
                    rpc_tracker=cluster.tracker,
                    rpc_key=cluster.key,
                    progress=False,
                )
            except BaseException as e:  # noqa: BLE001 - handed to the test thread
                result["error"] = e

        th = threading.Thread(target=run)
        th.start()
        deadline = time.monotonic() + 300
        while len(_records(db)) < 2 and th.is_alive():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        cluster.kill_server(0)
        th.join(600)
        assert not th.is_alive()
        assert cluster.alive() == 1
    assert "error" not in result, result.get("error")
    report = result["report"]
    assert report.trials == sum(min(3, k.space) for k in report.kernels) == len(_records(db))
    assert not any(k.failed for k in report.kernels)
