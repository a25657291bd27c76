"""decoupleQ through quantize_weights: presets, options, the block-wise stage, block isolation, bad input."""

from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile.errors import PassError, PlanError
from qcompile.ir.blocks import Stepper, find_block, run_block
from qcompile.passes.base import make_pass
from qcompile.plan import PRESETS, Granularity, PassConfig, Plan, QuantSpec, WeightMethod
from qcompile.quant.decoupleq import Rounding
from qcompile.quant.packing import unpack
from tests.conftest import make_tiny_llama

CALIB = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(7))
IDS = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(8))
W2_G32 = QuantSpec(bits=2, granularity=Granularity.PER_GROUP, symmetric=False, group_size=32)


@pytest.fixture(scope="module")
def program():
    return qcompile.capture(make_tiny_llama(layers=2, seed=3), max_cache_len=64, lm_entries=("forward",))


def _plan(method: WeightMethod = WeightMethod.DECOUPLEQ, weight: QuantSpec = W2_G32, **options) -> Plan:
    return Plan(
        name="t", passes=(PassConfig("quantize_weights", tuple(options.items())),), weight=weight, weight_method=method
    )


def test_presets_are_asymmetric_decoupleq():
    for name, gran, group in (
        ("w2a16-decoupleq-g64", Granularity.PER_GROUP, 64),
        ("w3a16-decoupleq-g128", Granularity.PER_GROUP, 128),
        ("w2a16-decoupleq", Granularity.PER_CHANNEL, None),
    ):
        p = PRESETS[name]
        assert p.weight_method is WeightMethod.DECOUPLEQ and p.weight is not None and not p.weight.symmetric
        assert p.weight.granularity is gran and p.weight.group_size == group
        assert Plan.from_yaml(p.to_yaml()) == p


def test_options_round_trip_and_are_checked():
    plan = _plan(dq_iterations=3, dq_inner_steps=7, dq_rounding="nearest", blockwise_epochs=2, blockwise_lr=0.002)
    assert Plan.from_yaml(plan.to_yaml()) == plan and Plan.from_json(plan.to_json()) == plan
    p = make_pass("quantize_weights", plan.passes[0].options)
    assert p.dq_rounding is Rounding.NEAREST and p.dq_iterations == 3 and p.blockwise_lr == 0.002
    for bad in (
        {"dq_iterations": 0},
        {"dq_inner_steps": -1},
        {"dq_rounding": "stochastic"},
        {"blockwise_epochs": -1},
        {"blockwise_lr": 0.0},
        {"blockwise_lr": float("nan")},
    ):
        with pytest.raises(PlanError, match=next(iter(bad))):
            make_pass("quantize_weights", tuple(bad.items()))


def test_block_runs_alone_as_in_the_graph(program):
    """The Stepper's block inputs, run through the block alone, give the block's values in the full graph."""
    blk = find_block(program, "model.layers.1")
    assert [n.name for n in blk.outputs] and all(n in blk.nodes for n in blk.outputs)
    stepper = Stepper(program, [CALIB[:2]])
    wins = stepper.block_windows(blk)
    assert len(wins) == 2  # captured with a static batch of 1: one window per row
    captured: dict = {}
    from qcompile.ir.calib import run_observed

    user = {u: None for n in blk.outputs for u in n.users if u not in blk.nodes}
    run_observed(program, [CALIB[:2]], {u: (lambda n, args: captured.setdefault(n, []).append(args)) for u in user})
    for i, w in enumerate(wins):
        out = run_block(program, blk, w)
        for o, node in zip(out, blk.outputs):
            u = next(x for x in node.users if x in user)
            ref = next(a for a, arg in zip(captured[u][i], u.args) if arg is node)
            assert torch.equal(o, ref)


def test_decoupleq_pass_lowers_the_layer_objective_and_reports_it(program):
    cm = qcompile.compile(program.copy(), plan=_plan(dq_iterations=3), calib=CALIB, backend="torch")
    notes = cm.report.passes[0].notes["decoupleq"]
    assert len(notes["layers"]) == 14 and notes["options"]["iterations"] == 3
    for path, n in notes["layers"].items():
        obj = n["objective"]
        assert all(b <= a for a, b in zip(obj, obj[1:])), path
        assert obj[0] <= min(n["objective_gptq"], n["objective_rtn"]) * (1 + 1e-5) and n["seconds"] >= 0
    assert sum(n["objective"][-1] < n["objective"][0] for n in notes["layers"].values()) >= 10
    state = cm.program.state
    # 2-bit asymmetric codes are stored densely packed (unsigned), with their float offsets
    packed = [k for k in state if k.endswith(".qweight_packed")]
    codes = [
        unpack(state[k], state[k.replace(".qweight_packed", ".w_scale")].shape[1] * 32, 2, signed=False) for k in packed
    ]
    assert len(codes) == 14 and all(int(c.min()) >= 0 and int(c.max()) <= 3 for c in codes)
    assert all(k.replace(".qweight_packed", ".w_offset") in state for k in packed)
    assert torch.isfinite(cm(IDS)).all()


def test_blockwise_stage_trains_scales_and_norms(program):
    base = qcompile.compile(program.copy(), plan=_plan(dq_iterations=1), calib=CALIB, backend="torch")
    cm = qcompile.compile(
        program.copy(),
        plan=_plan(dq_iterations=1, blockwise_epochs=1, blockwise_lr=1e-3),
        calib=CALIB,
        backend="torch",
    )
    bw = cm.report.passes[0].notes["blockwise"]
    assert sorted(bw) == ["model.layers.0", "model.layers.1"]
    norm = "model.layers.0.input_layernorm.weight"
    for n in bw.values():
        assert n["steps"] == 4 and len(n["norms"]) == 2
        assert n["kept"] == (n["mse_after"] < n["mse_before"])
    assert any(n["kept"] for n in bw.values())
    k0 = "model.layers.0.self_attn.q_proj.w_scale"
    changed = not torch.equal(cm.program.state[k0], base.program.state[k0])
    assert changed == bw["model.layers.0"]["kept"]
    assert (not torch.equal(cm.program.state[norm], base.program.state[norm])) == bw["model.layers.0"]["kept"]
    # the integer codes stay frozen
    q0 = "model.layers.0.self_attn.q_proj.qweight_packed"
    assert torch.equal(cm.program.state[q0], base.program.state[q0])


def test_decoupleq_needs_asymmetric_weights(program):
    sym = QuantSpec(bits=2, granularity=Granularity.PER_GROUP, symmetric=True, group_size=32)
    with pytest.raises(PassError, match=r"layer 'model.layers.0.self_attn.q_proj'.*symmetric: false"):
        qcompile.compile(program.copy(), plan=_plan(weight=sym), calib=CALIB, backend="torch")


def test_blockwise_needs_a_calibrated_method(program):
    with pytest.raises(PassError, match="blockwise_epochs"):
        qcompile.compile(program.copy(), plan=_plan(WeightMethod.RTN, blockwise_epochs=1), calib=CALIB)


@pytest.mark.parametrize("bits", [1, 9])
def test_bits_outside_2_to_8_are_plan_errors(bits):
    with pytest.raises(PlanError, match=f"bits={bits}"):
        Plan.from_dict(
            {
                "name": "t",
                "passes": ["quantize_weights"],
                "weight_method": "decoupleq",
                "weight": {"bits": bits, "granularity": "per_group", "symmetric": False, "group_size": 32},
            }
        )


@pytest.mark.parametrize("method", [WeightMethod.GPTQ, WeightMethod.DECOUPLEQ])
def test_group_that_does_not_divide_names_the_layer(program, method):
    w = QuantSpec(bits=3, granularity=Granularity.PER_GROUP, symmetric=False, group_size=48)
    with pytest.raises(PassError, match=r"layer 'model.layers.0.self_attn.q_proj': group_size 48 does not divide"):
        qcompile.compile(program.copy(), plan=_plan(method, weight=w), calib=CALIB, backend="torch")


@pytest.mark.parametrize("method", [WeightMethod.GPTQ, WeightMethod.DECOUPLEQ])
def test_singular_hessian_names_the_layer(program, method):
    """One token repeated: every row of the first block's inputs is the same, a rank-1 Hessian; damp 0."""
    calib = torch.full((1, 64), 5)
    with pytest.raises(PassError, match=r"layer 'model.layers.0.self_attn.q_proj'.*singular even after damping"):
        qcompile.compile(program.copy(), plan=_plan(method, damp=0.0), calib=calib, backend="torch")
