"""The contracts between the parts: facts checked when a plan is read, typed pass options, refined
plans returned instead of mutated, weight bits as a Program fact (never a default)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

import qcompile
from qcompile import ArtifactError, PassConfig, Plan, PlanError, VerifyError
from qcompile.ir.facts import CAPTURED_FACTS, Fact
from qcompile.ir.verify import verify
from qcompile.passes.base import PASSES, PassContext, make_pass
from qcompile.passes.manager import PassManager
from qcompile.plan import PRESETS
from qcompile.runtime.artifact import MANIFEST, _manifest_checksum

W8A8 = PRESETS["w8a8-rtn"]


def _plan(*names: str) -> Plan:
    return dataclasses.replace(W8A8, passes=tuple(PassConfig(n) for n in names))


@pytest.mark.parametrize(
    ("passes", "late", "fact", "culprit"),
    [
        (("quantize_weights", "smooth_migration"), "smooth_migration", "float_linears", "quantize_weights"),
        (("quantize_weights", "assign_precision"), "assign_precision", "float_linears", "quantize_weights"),
        (("kv_to_xcache", "assign_precision"), "assign_precision", "kv_attention", "kv_to_xcache"),
        (("quantize_weights", "quantize_weights"), "quantize_weights", "float_linears", "quantize_weights"),
        (("fold_quant_steps", "quantize_weights"), "quantize_weights", "float_linears", "fold_quant_steps"),
        (("kv_to_xcache", "smooth_migration"), "smooth_migration", "kv_attention", "kv_to_xcache"),
        (("kv_to_xcache", "fold_quant_steps"), "fold_quant_steps", "kv_attention", "kv_to_xcache"),
        (("winograd_conv", "winograd_conv"), "winograd_conv", "float_convs", "winograd_conv"),
    ],
)
def test_misordered_plans_are_refused_before_capture_naming_the_fact(monkeypatch, passes, late, fact, culprit):
    def no_capture(*_a, **_k):  # pragma: no cover - reaching it is the failure
        raise AssertionError("capture ran before the plan was checked")

    monkeypatch.setattr(qcompile.api, "capture", no_capture)
    with pytest.raises(
        PlanError, match=rf"pass {late!r} \(position 1\) requires {fact} \(.*\), which {culprit!r} invalidates"
    ):
        qcompile.compile(torch.nn.Linear(4, 4), plan=_plan(*passes), calib=torch.zeros(1, 64, dtype=torch.int64))


def test_every_preset_and_the_composed_order_pass_the_check():
    for plan in PRESETS.values():
        PassManager(plan)
    PassManager(_plan("smooth_migration", "assign_precision", "kv_to_xcache", "quantize_weights"))


def test_every_pass_declares_real_facts():
    for cls in PASSES.values():
        assert Fact.CAPTURED in cls.requires, cls.name
        assert cls.provides and all(isinstance(f, Fact) for f in cls.requires | cls.provides | cls.invalidates), (
            cls.name
        )
        assert cls.requires - CAPTURED_FACTS - {f for p in PASSES.values() for f in p.provides} == set(), cls.name


def test_a_rewritten_program_is_checked_against_its_own_facts(tiny_llama):
    cm = qcompile.compile(tiny_llama, plan="w8a8-rtn", max_cache_len=32)
    assert Fact.QUANTIZED_LINEARS in cm.program.facts and Fact.FLOAT_LINEARS not in cm.program.facts
    with pytest.raises(
        PlanError, match=r"requires float_linears .* no earlier pass provides.*as earlier passes left it"
    ):
        qcompile.compile(cm.program, plan="w8a8-rtn")


def test_pass_options_are_typed_by_the_plan_serializer():
    from qcompile.passes.assign_precision import Metric, Unit
    from qcompile.passes.kv_to_xcache import ClSpace, Mode
    from qcompile.passes.smooth_migration import AlphaMode
    from qcompile.passes.winograd_conv import Override
    from qcompile.plan import Granularity

    x = make_pass("kv_to_xcache", (("mode", "latent"), ("k_granularity", "per_token"), ("cl_space", "residual")))
    assert x.mode is Mode.LATENT and x.k_granularity is Granularity.PER_TOKEN and x.cl_space is ClSpace.RESIDUAL
    assert make_pass("smooth_migration", (("alpha", "search"),)).alpha is AlphaMode.SEARCH
    assert make_pass("smooth_migration", (("alpha", 1),)).alpha == 1.0
    a = make_pass("assign_precision", (("unit", "flops"), ("metric", "kl")))
    assert a.unit is Unit.FLOPS and a.metric is Metric.KL
    w = make_pass("winograd_conv", (("overrides", [["*.c1", 6, "best"]]),))
    assert w.overrides == (Override("*.c1", 6, "best"),)
    assert make_pass("fold_quant_steps", (("clip_grid", [1, 0.5]),)).clip_grid == (1.0, 0.5)
    with pytest.raises(
        PlanError, match=r"option 'alpha': 'sometimes' is not allowed; expected a number or one of \['search', 'none'\]"
    ):
        make_pass("smooth_migration", (("alpha", "sometimes"),))
    with pytest.raises(
        PlanError, match=r"option 'mode': 'kq' is not allowed; allowed: \['auto', 'x', 'latent', 'kv'\]"
    ):
        make_pass("kv_to_xcache", (("mode", "kq"),))
    with pytest.raises(PlanError, match=r"option 'overrides'\[0\]: expected \[match, m, points\]"):
        make_pass("winograd_conv", (("overrides", [["*", 6]]),))
    with pytest.raises(PlanError, match="k_granularity 'per_group' is not one of"):
        make_pass("kv_to_xcache", (("k_granularity", "per_group"),))


def test_the_context_is_frozen_and_refined_plans_come_back_in_the_result(tiny_llama):
    ctx = PassContext(plan=W8A8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.plan = PRESETS["fp32"]  # type: ignore[misc]
    calib = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    cm = qcompile.compile(tiny_llama, plan="w6a8-flexq", calib=calib, max_cache_len=32)
    assert [pc.name for pc in cm.plan.passes] == ["quantize_weights"] and cm.plan.rules  # the refined plan
    assert "sensitivity on" in cm.report.summary()  # the pass's own summary line


def test_missing_weight_bits_is_an_error_not_a_default(tiny_llama):
    cm = qcompile.compile(tiny_llama, plan="w4a16-rtn-g128", max_cache_len=32)
    prog = cm.program
    key = next(iter(prog.weight_bits))
    assert prog.bits_of(key) == 4
    del prog.weight_bits[key]
    with pytest.raises(VerifyError, match=rf"reads codes {key!r} whose bit width the Program does not record"):
        verify(prog, deep=False)
    with pytest.raises(VerifyError, match="records no bit width"):
        prog.bits_of(key)


def test_format_1_artifacts_load_with_their_facts_migrated(tiny_llama, tmp_path):
    cm = qcompile.compile(tiny_llama, plan="w4a16-rtn-g128", max_cache_len=32)
    cm.save(tmp_path / "a")
    m = json.loads((tmp_path / "a" / MANIFEST).read_text())
    prog = m["program"]
    prog["meta"]["weight_bits"] = prog.pop("weight_bits")  # what format 1 wrote
    for k in ("cache_bits", "fp16_kv_bytes", "facts"):
        prog.pop(k)
    m["format_version"] = 1
    m["checksum"] = _manifest_checksum(m)
    (tmp_path / "a" / MANIFEST).write_text(json.dumps(m))
    back = qcompile.load(tmp_path / "a", backend="torch")
    assert back.program.weight_bits == cm.program.weight_bits and "weight_bits" not in back.program.meta
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(back(ids), cm(ids))


@pytest.mark.parametrize("bad", [5, "4", None])
def test_artifact_with_a_bad_bit_width_is_refused(tiny_llama, tmp_path, bad):
    cm = qcompile.compile(tiny_llama, plan="w4a16-rtn-g128", max_cache_len=32)
    cm.save(tmp_path / "a")
    d = tmp_path / "b"
    shutil.copytree(tmp_path / "a", d)
    m = json.loads((d / MANIFEST).read_text())
    key = next(iter(m["program"]["weight_bits"]))
    m["program"]["weight_bits"][key] = bad
    m["checksum"] = _manifest_checksum(m)
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="bit width"):
        qcompile.load(d, backend="torch")
