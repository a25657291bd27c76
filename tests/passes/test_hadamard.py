"""The hadamard pass and QuEST PTQ through compile: the rotated model equals the original, the fold of
v→o is found by graph matching, QuEST grids become quest ops, and bad plans name the layer."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import qcompile
from qcompile.errors import PassError, PlanError
from qcompile.plan import PRESETS, Granularity, Grid, PassConfig, Plan, QuantSpec, WeightMethod
from qcompile.quant.hadamard import BlockRule
from qcompile.runtime.onnx_export import InexpressibleOpError, check_expressible
from tests.conftest import make_tiny_llama

CALIB = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(7))
IDS = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(8))
ROTATE = Plan(name="rotate-only", passes=(PassConfig("hadamard"),))


@pytest.fixture(scope="module")
def llama():
    m = make_tiny_llama(layers=2, seed=3)
    with torch.no_grad():  # outlier channels, so a rotation has something to spread
        for layer in m.model.layers:
            layer.input_layernorm.weight[[3, 17]] = 25.0
    return m


_CAPTURED: dict[int, object] = {}


def _compile(model, plan, calib=None):
    """Compile from one shared capture of the forward entry (capture dominates a tiny model's compile time)."""
    if id(model) not in _CAPTURED:
        _CAPTURED[id(model)] = (model, qcompile.capture(model, max_cache_len=64))
    return qcompile.compile(_CAPTURED[id(model)][1].copy(), plan=plan, calib=calib)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("rule", list(BlockRule))
def test_rotated_model_equals_the_original(llama, rule):
    plan = dataclasses.replace(ROTATE, passes=(PassConfig("hadamard", (("max_block", 32), ("rule", rule))),))
    cm = qcompile.compile(llama, plan=plan, max_cache_len=64, lm_entries=("forward", "prefill", "decode"))
    with torch.no_grad():
        ref = llama(IDS).logits
    assert _rel(cm(IDS), ref) <= 1e-5
    ref_tokens = llama.generate(IDS[:, :8], max_new_tokens=10, do_sample=False)
    assert torch.equal(cm.generate(IDS[:, :8], max_new_tokens=10), ref_tokens)
    notes = cm.report.passes[0].notes
    layers = notes["layers"]
    # o_proj's rotation is folded into v_proj's rows (heads of 16), everything else is online
    for i in range(2):
        assert layers[f"model.layers.{i}.self_attn.o_proj"]["input"] == "folded"
        assert layers[f"model.layers.{i}.self_attn.o_proj"]["blocks"] == [16] * 4
        for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"):
            assert layers[f"model.layers.{i}.{p}"]["input"] == "online"
    assert layers["model.layers.0.mlp.down_proj"]["blocks"] == [32] * 4
    # one online op per input node (norm→q/k/v, norm→gate/up, product→down) per layer and entry
    assert notes["online_ops"] == 3 * 2 * 3
    assert dict(cm.report.passes[0].skipped)["lm_head"].startswith("kept in float")
    weights = [n for _, n in cm.program.nodes() if n.target == torch.ops.qcompile.hadamard.default]
    assert len(weights) == notes["online_ops"]


def test_rotation_changes_the_weights_and_no_fold_is_online(llama):
    plan = dataclasses.replace(ROTATE, passes=(PassConfig("hadamard", (("fold_value_out", False),)),))
    cm = _compile(llama, plan)
    layers = cm.report.passes[0].notes["layers"]
    assert {v["input"] for v in layers.values()} == {"online"} and cm.report.passes[0].notes["online_ops"] == 4 * 2 * 3
    assert _rel(cm(IDS), llama(IDS).logits.detach()) <= 1e-5
    base = _compile(llama, Plan(name="none", passes=()))
    key = "model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(cm.program.state[key], base.program.state[key])


def test_tied_head_is_reported_not_rotated():
    m = make_tiny_llama(layers=1, seed=1, tied=True)
    plan = dataclasses.replace(ROTATE, skip=())  # select the head too
    cm = _compile(m, plan)
    skipped = dict(cm.report.passes[0].skipped)
    assert "cannot be rotated" in skipped["lm_head"] and "also read by" in skipped["lm_head"]
    assert _rel(cm(IDS), m(IDS).logits.detach()) <= 1e-5


def test_w4a4_quest_uses_quest_ops_and_saves(llama, tmp_path):
    cm = _compile(llama, "w4a4-quest", CALIB)
    ops = {str(n.target) for _, n in cm.program.nodes() if n.op == "call_function"}
    assert "qcompile.quest_linear.default" in ops and "qcompile.hadamard.default" in ops
    assert "aten.linear.default" in ops  # the float head
    with torch.no_grad():
        ref = llama(IDS).logits
    out = cm(IDS)
    assert 0 < _rel(out, ref) < 1.0
    cm.save(tmp_path / "a")
    assert torch.equal(qcompile.load(tmp_path / "a")(IDS), out)
    with pytest.raises(InexpressibleOpError, match="hadamard"):
        check_expressible(cm.program.entries["forward"])


def test_weight_only_quest_runs_as_the_equal_asymmetric_grid(llama):
    plan = dataclasses.replace(PRESETS["w4a4-quest"], activation=None)
    cm = _compile(llama, plan)
    ops = {str(n.target) for _, n in cm.program.nodes() if n.op == "call_function"}
    assert "qcompile.quant_linear.default" in ops and "qcompile.quest_linear.default" not in ops
    a4 = _compile(llama, "w4a4-quest", CALIB)
    ref = llama(IDS).logits.detach()
    assert _rel(cm(IDS), ref) < _rel(a4(IDS), ref)  # 4-bit activations add error


def test_bad_quest_plans_name_the_layer(llama):
    quest = PRESETS["w4a4-quest"]
    with pytest.raises(PassError, match="q_proj.*not weight_method 'gptq'"):
        _compile(llama, dataclasses.replace(quest, weight_method=WeightMethod.GPTQ), CALIB)
    uniform_w = QuantSpec(bits=4, granularity=Granularity.PER_CHANNEL)
    with pytest.raises(PassError, match="q_proj.*quest activations need quest weights"):
        _compile(llama, dataclasses.replace(quest, weight=uniform_w))
    uniform_a = QuantSpec(bits=4, granularity=Granularity.PER_TOKEN)
    with pytest.raises(PassError, match="q_proj.*activations must be quest per_token"):
        _compile(llama, dataclasses.replace(quest, activation=uniform_a))
    with pytest.raises(PlanError, match="max_block"):
        _compile(llama, Plan(passes=(PassConfig("hadamard", (("max_block", 96),)),)))


def test_quest_convolution_is_a_plan_error():
    from qcompile.eval.zoo import tiny_cnn

    w = QuantSpec(bits=4, granularity=Granularity.PER_CHANNEL, grid=Grid.QUEST)
    plan = Plan(passes=(PassConfig("quantize_weights"),), weight=w, skip=())
    with pytest.raises(PassError, match="convolution '0': grid 'quest' is not supported"):
        qcompile.compile(tiny_cnn(), plan=plan, example_inputs=(torch.randn(2, 3, 12, 12),))


def test_quest_plan_files_round_trip():
    from pathlib import Path

    from qcompile.plan import get_plan

    root = Path(__file__).resolve().parents[2] / "benchmarks" / "plans"
    nohad = get_plan(root / "w4a4-quest-nohadamard.yaml")
    assert [p.name for p in nohad.passes] == ["quantize_weights"]
    assert nohad.weight == PRESETS["w4a4-quest"].weight and nohad.activation == PRESETS["w4a4-quest"].activation
