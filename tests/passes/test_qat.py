"""qat: the trust-masked training linear, short QAT on a tiny Llama, checkpoints, options, presets."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qcompile
from qcompile.errors import ArtifactError, PlanError
from qcompile.passes import PASSES, make_pass
from qcompile.passes import qat as Q
from qcompile.passes.base import PassContext
from qcompile.plan import PRESETS, PassConfig, Plan
from qcompile.quant.quest import optimal_alpha, quest_fake_quant, quest_quantize, trust_mask
from qcompile.quant.spec import Granularity, Grid, QuantSpec

W4 = QuantSpec(bits=4, granularity=Granularity.PER_CHANNEL, grid=Grid.QUEST)
A4 = QuantSpec(bits=4, granularity=Granularity.PER_TOKEN, grid=Grid.QUEST)
PLAN = Plan(name="quest-w4a4", weight=W4, activation=A4)
CALIB = torch.randint(0, 256, (3, 48), generator=torch.Generator().manual_seed(3))


# ---- the training linear ------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 12),
    k=st.integers(2, 96),
    bits=st.sampled_from([2, 3, 4, 6, 8]),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_lean_quantizer_equals_quest_fake_quant(rows, k, bits, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * scale
    x[0, 0] *= 30  # a clipped outlier
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    t = Q.default_trust(bits)
    ya, yb = quest_fake_quant(a, bits, t, -1), Q.quest_trust_fake_quant(b, bits, t)
    grad = torch.randn(rows, k, generator=g)
    ya.backward(grad)
    yb.backward(grad)
    assert torch.equal(ya, yb) and torch.equal(a.grad, b.grad)


def test_default_trust_is_the_half_step():
    for bits in (2, 3, 4, 8):
        assert Q.default_trust(bits) == pytest.approx(optimal_alpha(bits) / (2**bits - 1))
    # every in-range entry's error is at most half a step: only clipped entries lose their gradient
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    m = trust_mask(x, quest_quantize(x, 4), 4, Q.default_trust(4))
    inside = x.abs() <= optimal_alpha(4) * x.pow(2).mean(-1, keepdim=True).sqrt() * 0.999
    assert bool(m[inside].all()) and not bool(m.all())


def test_trust_mask_zeroes_gradients_of_clipped_entries():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 32, generator=g)
    w = torch.randn(5, 32, generator=g) * 0.1
    x[1, 3], x[4, 7], w[2, 9] = 25.0, -40.0, 3.0  # far outside the grid: clipped
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = Q.qat_linear(xr, wr, None, W4, A4)
    up = torch.randn(6, 5, generator=g)
    y.backward(up)
    # oracle in float64: the forward is the QuEST-quantized product, the gradients straight-through
    # (the other factor quantized) times the trust mask of each tensor
    xq, wq = quest_quantize(x, 4), quest_quantize(w, 4)
    mx = trust_mask(x, xq, 4, Q.default_trust(4))
    mw = trust_mask(w, wq, 4, Q.default_trust(4))
    torch.testing.assert_close(y, (xq.double() @ wq.double().t()).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xr.grad, ((up.double() @ wq.double()) * mx).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wr.grad, ((up.double().t() @ xq.double()) * mw).float(), rtol=1e-5, atol=1e-6)
    assert xr.grad[1, 3] == 0 and xr.grad[4, 7] == 0 and wr.grad[2, 9] == 0
    assert int((xr.grad == 0).sum()) == int((~mx).sum()) and 2 <= int((~mx).sum()) < 10
    # the same linear with per-group weights quantizes each group on its own RMS
    wg = QuantSpec(bits=4, granularity=Granularity.PER_GROUP, group_size=8, grid=Grid.QUEST)
    got = Q.fake_quant(w, wg, None)
    assert torch.equal(got, quest_quantize(w.reshape(5, 4, 8), 4).reshape(5, 32))


# ---- the pass on a tiny Llama -------------------------------------------------------------------


def _run(program, plan=PLAN, calib=CALIB, **opts):
    p = program.copy()
    res = Q.QAT(**opts).run(p, PassContext(plan=plan, calib=calib))
    return p, res


FAST = {"seq_len": 32, "lr": 1e-3}


@pytest.mark.parametrize("loss", ["ce", "distill"])
def test_few_steps_lower_the_fake_quantized_loss(tiny_llama_program, loss):
    # distillation starts close to its optimum (the tiny model quantizes well): a smaller step
    fast = {**FAST, "lr": 1e-3 if loss == "ce" else 1e-4}
    opts = Q.QAT(steps=8, loss=loss, **fast)
    windows = [CALIB[i, j : j + 32][None] for i in range(3) for j in (0, 16)]
    before = Q.fake_quant_loss(tiny_llama_program, PLAN, windows, opts)
    trained, res = _run(tiny_llama_program, steps=8, loss=loss, **fast)
    after = Q.fake_quant_loss(trained, PLAN, windows, opts, teacher=tiny_llama_program)
    assert after < before * (0.99 if loss == "ce" else 0.95), (before, after)
    assert res.modified and res.notes["steps"] == 8 and len(res.notes["losses"]) == 8
    # only the trained weights changed; the graphs, the head and everything else are as they were
    changed = {k for k in trained.state if not torch.equal(trained.state[k], tiny_llama_program.state[k])}
    assert changed == {k for k in changed if k.endswith("proj.weight")} and len(changed) == 14
    assert set(trained.state) == set(tiny_llama_program.state)
    for name, e in trained.entries.items():
        assert len(e.graph.graph.nodes) == len(tiny_llama_program.entries[name].graph.graph.nodes)
    assert [p for p, _ in res.skipped] == ["lm_head"]


def _kill_at(monkeypatch, step):
    real = Q._Trainer.lr_at

    def lr_at(self, s):
        if s == step:
            raise KeyboardInterrupt("killed")
        return real(self, s)

    monkeypatch.setattr(Q._Trainer, "lr_at", lr_at)


def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny_llama_program, tmp_path, monkeypatch):
    opts = {"steps": 4, "checkpoint_every": 2, "batch_size": 2, "seq_len": 24, "lr": 1e-3}
    whole, res0 = _run(tiny_llama_program, **opts)
    ck = tmp_path / "ck"
    with monkeypatch.context() as mp:
        _kill_at(mp, 3)  # steps 0..2 done, the checkpoint of step 2 written
        with pytest.raises(KeyboardInterrupt):
            _run(tiny_llama_program, checkpoint_dir=str(ck), **opts)
    assert (ck / Q.CHECKPOINT_NAME / "state.json").is_file()
    resumed, res1 = _run(tiny_llama_program, checkpoint_dir=str(ck), **opts)
    assert res1.notes["resumed_from"] == 2 and res0.notes["resumed_from"] is None
    assert res1.notes["losses"] == res0.notes["losses"]
    for k in whole.state:
        assert torch.equal(whole.state[k], resumed.state[k]), k
    # the finished checkpoint is reused: a third run trains nothing and gives the same weights
    again, res2 = _run(tiny_llama_program, checkpoint_dir=str(ck), **opts)
    assert res2.notes["resumed_from"] == 4 and all(torch.equal(again.state[k], whole.state[k]) for k in whole.state)
    assert sorted(p.name for p in (ck / Q.CHECKPOINT_NAME).iterdir()) == ["state.json", "tensors.safetensors"]


def test_foreign_checkpoint_is_refused(tiny_llama_program, tmp_path):
    ck = str(tmp_path / "ck")
    _run(tiny_llama_program, steps=1, checkpoint_dir=ck, **FAST)
    other = tiny_llama_program.copy()  # another model: one weight differs
    key = "model.layers.1.mlp.up_proj.weight"
    other.state[key] = other.state[key] + 1e-3
    with pytest.raises(ArtifactError, match="starting weights"):
        _run(other, steps=1, checkpoint_dir=ck, **FAST)
    w3 = dataclasses.replace(PLAN, weight=dataclasses.replace(W4, bits=3))
    with pytest.raises(ArtifactError, match="plan's settings"):
        _run(tiny_llama_program, plan=w3, steps=1, checkpoint_dir=ck, **FAST)
    with pytest.raises(ArtifactError, match="qat options"):
        _run(tiny_llama_program, steps=1, checkpoint_dir=ck, seed=1, **FAST)


def test_a_folder_that_is_not_a_checkpoint_is_left_alone(tiny_llama_program, tmp_path):
    mine = tmp_path / "ck" / Q.CHECKPOINT_NAME
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not a qat checkpoint"):
        _run(tiny_llama_program, steps=1, checkpoint_dir=str(tmp_path / "ck"), **FAST)
    assert (mine / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "opts",
    [
        {"steps": -1},
        {"lr": 0},
        {"lr": float("nan")},
        {"seq_len": 1},
        {"batch_size": 0},
        {"trust": -0.5},
        {"loss": "mse"},
        {"checkpoint_every": 0},
        {"max_grad_norm": 0},
        {"checkpoint_dir": ""},
        {"stepz": 3},
    ],
)
def test_bad_options_are_plan_errors(opts):
    with pytest.raises(PlanError):
        make_pass("qat", opts.items())


def test_short_calibration_is_refused(tiny_llama_program):
    from qcompile.errors import DataError

    with pytest.raises((DataError, PlanError)):
        _run(tiny_llama_program, steps=1, seq_len=64, calib=CALIB[:, :40])
    with pytest.raises(PlanError, match="calibration"):
        _run(tiny_llama_program, steps=1, calib=None, **FAST)


def test_the_result_compiles_like_any_plan(tiny_llama, tiny_llama_program):
    plan = dataclasses.replace(
        PLAN, passes=(PassConfig("qat", (("steps", 2), ("seq_len", 32))), PassConfig("quantize_weights"))
    )
    cm = qcompile.compile(tiny_llama_program.copy(), plan=plan, calib=CALIB, backend="torch")
    ids = CALIB[:1, :20]
    out = cm(ids)
    ref = tiny_llama(ids).logits.detach()
    assert out.shape == ref.shape and bool(torch.isfinite(out).all())
    ops = {n.target for _, n in cm.program.nodes() if n.op == "call_function"}
    assert torch.ops.aten.linear.default in ops  # the head stays float
    assert cm.report.passes[0].name == "qat" and cm.report.passes[0].notes["steps"] == 2
    assert any("QAT: 2 steps" in line for line in cm.report.passes[0].summary)


def test_plans_with_qat_options_round_trip():
    plan = dataclasses.replace(
        PLAN,
        passes=(
            PassConfig(
                "qat",
                (("steps", 3), ("lr", 2e-5), ("trust", 0.25), ("loss", "ce"), ("checkpoint_dir", "/tmp/x")),
            ),
            PassConfig("quantize_weights"),
        ),
    )
    for p in (plan, PRESETS["w4a4-quest-qat"], PRESETS["w3a3-quest-qat"]):
        assert Plan.from_yaml(p.to_yaml()) == p and Plan.from_json(p.to_json()) == p
    opts = dict(plan.passes[0].options)
    q = make_pass("qat", opts.items())
    assert q.loss is Q.Loss.CE and q.trust == 0.25 and q.checkpoint_dir == "/tmp/x"


def test_presets_order_and_bits():
    assert "qat" in PASSES
    for bits in (4, 3):
        p = PRESETS[f"w{bits}a{bits}-quest-qat"]
        assert [pc.name for pc in p.passes] == ["hadamard", "qat", "quantize_weights"]
        assert p.weight.bits == p.activation.bits == bits and p.weight.grid is p.activation.grid is Grid.QUEST
    from qcompile.passes.manager import PassManager

    PassManager(PRESETS["w4a4-quest-qat"])  # the order satisfies every pass's requirements
    bad = dataclasses.replace(PRESETS["w4a4-quest-qat"], passes=(PassConfig("quantize_weights"), PassConfig("qat")))
    with pytest.raises(PlanError):
        PassManager(bad)


def test_qat_through_the_online_hadamard(tiny_llama, tiny_llama_program):
    """After the hadamard pass the training differentiates through qcompile::hadamard."""
    plan = dataclasses.replace(
        PRESETS["w4a4-quest-qat"],
        passes=(
            PassConfig("hadamard"),
            PassConfig("qat", (("steps", 2), ("seq_len", 32), ("lr", 1e-3))),
            PassConfig("quantize_weights"),
        ),
    )
    cm = qcompile.compile(tiny_llama_program.copy(), plan=plan, calib=CALIB, backend="torch")
    notes = cm.report.passes[1].notes
    assert notes["steps"] == 2 and notes["layers"] == 14
    out = cm(CALIB[:1, :16])
    assert bool(torch.isfinite(out).all())
