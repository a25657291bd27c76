"""quantize_weights on convolutions: which layers change, what is skipped and why, Winograd
composition and the refused order, static calibration on input batches and its hostile inputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import qcompile
from qcompile import PassConfig, Plan, PlanError
from qcompile.errors import DataError, NonFiniteError, PassError
from qcompile.eval.zoo import tiny_cnn
from qcompile.plan import PRESETS, LayerRule
from qcompile.quant.spec import Granularity, QuantSpec

QCONV = torch.ops.qcompile.quant_conv2d.default
X = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
CALIB = [torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in (1, 2)]
W8 = QuantSpec(8, Granularity.PER_CHANNEL)
A8_STATIC = QuantSpec(8, Granularity.PER_TENSOR, dynamic=False)
A8_PIXEL = QuantSpec(8, Granularity.PER_TOKEN)


def _plan(weight=W8, activation=None, passes=("quantize_weights",), **kw) -> Plan:
    return Plan(name="t", passes=tuple(PassConfig(p) for p in passes), weight=weight, activation=activation, **kw)


def _compile(plan, model=None, calib=CALIB):
    return qcompile.compile(model or tiny_cnn(), plan=plan, example_inputs=(X,), calib=calib)


def _convs(cm):
    return [n for _, n in cm.program.nodes() if n.op == "call_function" and n.target == QCONV]


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize(
    ("preset", "act_bits", "static", "tol"),
    [("cnn-w8a8", 8, True, 0.02), ("cnn-w4a16", 0, False, 0.2)],
)
def test_presets_quantize_every_conv_and_the_linear(preset, act_bits, static, tol):
    m = tiny_cnn()
    cm = _compile(preset, m)
    rep = cm.report.passes[0]
    assert rep.modified and rep.layers_changed == ["8", "0", "2", "4"] and rep.skipped == []
    convs = _convs(cm)
    assert [n.args[8] for n in convs] == [1, 8, 1]  # groups: dense, depthwise, dense
    assert [n.args[5] for n in convs] == [[1, 1], [1, 1], [2, 2]]
    assert all(n.args[9] == act_bits and (n.args[3] is not None) == static for n in convs)
    prog = cm.program
    assert "0.weight" not in prog.state and prog.weight_bits["0.qweight"] == (8 if preset == "cnn-w8a8" else 4)
    assert _rel(cm(X), m(X)) < tol


def test_static_steps_are_the_calibrated_absmax_and_the_graph_is_the_reference_computation():
    m = tiny_cnn()
    cm = _compile("cnn-w8a8", m)
    st = cm.program.state
    first = torch.cat(CALIB).abs().max() / 127  # the first conv sees the calibration inputs themselves
    assert torch.equal(st["0.x_scale"], first.reshape(1))
    # recompute the graph's output from the state with the op and plain torch
    x = X
    for i in (0, 2, 4):
        n = _convs(cm)[[0, 2, 4].index(i)]
        x = torch.relu(QCONV(x, st[f"{i}.qweight"], st[f"{i}.w_scale"], st[f"{i}.x_scale"], m[i].bias, *n.args[5:]))
    x = x.mean((2, 3))
    q = torch.clamp(torch.round(x / st["8.x_step"]), -127, 127)
    want = q @ st["8.qweight"].float().t() * st["8.w_scale_static"].view(1, -1) + m[8].bias
    torch.testing.assert_close(cm(X), want, rtol=1e-5, atol=1e-5)


def test_dynamic_per_pixel_and_rules_and_skip_globs():
    m = tiny_cnn()
    a4 = dataclasses.replace(A8_PIXEL, bits=4)
    plan = _plan(activation=A8_PIXEL, skip=("4",), rules=(LayerRule("2", activation=a4),))
    cm = _compile(plan, m, calib=None)  # nothing static: no calibration needed
    rep = cm.report.passes[0]
    assert rep.layers_changed == ["8", "0", "2"]
    assert rep.skipped == [("4", "kept in float by the plan (skip glob or rule)")]
    assert [n.args[9] for n in _convs(cm)] == [8, 4]
    assert _rel(cm(X), m(X)) < 0.03


def test_per_group_weight_spec_is_applied_per_output_channel_and_reported():
    spec = QuantSpec(4, Granularity.PER_GROUP, group_size=8)
    cm = _compile(_plan(weight=spec, rules=(LayerRule("8", skip=True),)))
    assert cm.report.passes[0].notes["conv_per_group_as_per_channel"] == ["0", "2", "4"]
    assert "per_group weight spec applied per output channel in convolution(s): 0, 2, 4" in cm.report.summary()
    assert cm.program.state["2.w_scale"].shape == (8,)


def test_winograd_then_quantize_composes_and_lists_the_winograd_convs():
    m = tiny_cnn()
    cm = _compile("cnn-w8a8-winograd-f4", m)
    wino, quant = cm.report.passes
    assert wino.layers_changed == ["0", "2"] and quant.layers_changed == ["8", "4"]
    reason = "Winograd transforms leave the integer domain; kept in float"
    assert quant.skipped == [("0", reason), ("2", reason)]
    assert len(_convs(cm)) == 1 and _rel(cm(X), m(X)) < 0.02


def test_winograd_after_quantize_weights_is_refused_naming_the_fact():
    passes = (PassConfig("quantize_weights"), PassConfig("winograd_conv"))
    plan = dataclasses.replace(PRESETS["cnn-w8a8"], passes=passes)
    with pytest.raises(PlanError, match=r"'winograd_conv' \(position 1\) requires float_convs .*'quantize_weights'"):
        _compile(plan)


@pytest.mark.parametrize(
    ("weight", "activation", "what"),
    [
        (dataclasses.replace(W8, symmetric=False), None, "weight"),
        (QuantSpec(8, Granularity.PER_TENSOR), None, "weight"),
        (W8, QuantSpec(8, Granularity.PER_TENSOR), "activation"),  # per-tensor dynamic
        (W8, dataclasses.replace(A8_STATIC, symmetric=False), "activation"),
        (W8, QuantSpec(8, Granularity.PER_CHANNEL, dynamic=False), "activation"),
    ],
)
def test_unsupported_specs_are_plan_errors_naming_the_layer(weight, activation, what):
    plan = _plan(weight=weight, activation=activation, rules=(LayerRule("8", skip=True),))
    with pytest.raises(PassError, match=rf"convolution '0': {what} .* is not supported; supported: weights: symmetric"):
        _compile(plan)


def _fails(calib, cause, match, model=None):
    with pytest.raises(PassError, match=match) as e:
        _compile("cnn-w8a8", model, calib=calib)
    assert isinstance(e.value.__cause__, cause)


def test_calibration_inputs_are_checked():
    _fails(None, PlanError, r"needs calibration data: pass compile\(\.\.\., calib=input batches")
    _fails([torch.randn(4, 3, 10, 12)], DataError, r"calibration item 0 must be a tensor float32\[4, 3, 12, 12\]")
    _fails([CALIB[0], CALIB[0].to(torch.float64)], DataError, "calibration item 1 must be a tensor")
    _fails("images", DataError, "must be an input tensor")
    bad = CALIB[0].clone()
    bad[1, 2, 3, 4] = float("nan")
    _fails([bad], NonFiniteError, r"calibration item 0 \(torch.float32\[4, 3, 12, 12\]\) holds 1 NaN")
    # tuples holding one batch are accepted (as compile's example_inputs are written)
    assert _convs(_compile("cnn-w8a8", calib=[(c,) for c in CALIB]))


def test_overflowing_calibration_activation_names_the_layer():
    m = tiny_cnn()
    with torch.no_grad():
        m[0].weight.mul_(1e30)  # finite weights, but the depthwise output overflows float32
        m[2].weight.mul_(1e30)
    _fails(CALIB, NonFiniteError, "calibration activations entering layer '4'", m)


def test_dynamic_batch_capture_takes_any_calibration_batch_and_artifacts_round_trip(tmp_path):
    m = tiny_cnn()
    batch = torch.export.Dim("batch", min=1, max=64)
    cm = qcompile.compile(
        m, plan="cnn-w8a8", example_inputs=(X,), dynamic_shapes=({0: batch},), calib=[torch.randn(7, 3, 12, 12)]
    )
    back = qcompile.load(cm.save(tmp_path / "a"))
    x = torch.randn(3, 3, 12, 12)
    assert torch.equal(back(x), cm(x))
    assert _rel(cm(x), m(x)) < 0.03


def test_quantize_weights_conv_matches_an_independent_float_computation_w4():
    m = tiny_cnn()
    cm = _compile("cnn-w4a16", m)
    w = m[4].weight.detach().reshape(16, -1)
    s = w.abs().amax(1) / 7
    wq = torch.clamp(torch.round(w / s[:, None]), -7, 7) * s[:, None]
    x = torch.randn(2, 8, 6, 6)
    n = _convs(cm)[2]
    st = cm.program.state
    got = QCONV(x, st["4.qweight"], st["4.w_scale"], None, m[4].bias, *n.args[5:])
    want = F.conv2d(x, wq.view_as(m[4].weight), m[4].bias, 2, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
