"""The TVM backend's ``quant_conv2d``: the same numbers as the reference op on the tiny CNN (dense,
depthwise and strided convs) for W8A8 static, W8A8 dynamic per pixel and W4A16; the int8 conv's int32
accumulator bit for bit, rounding ties included."""

from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile.ops.conv import conv_int_accumulate
from qcompile.plan import PassConfig, Plan
from qcompile.quant.spec import Granularity, QuantSpec
from qcompile.runtime.compiled import CompiledModule
from tests.passes.test_conv_quant import CALIB, X, tiny_cnn

pytestmark = pytest.mark.tvm
QCONV = "qcompile.quant_conv2d.default"
W8A8_PIXEL = Plan(
    name="w8a8-pixel",
    passes=(PassConfig("quantize_weights"),),
    weight=QuantSpec(8, Granularity.PER_CHANNEL),
    activation=QuantSpec(8, Granularity.PER_TOKEN),
)


@pytest.mark.parametrize(("plan", "fallbacks"), [("cnn-w8a8", 1), (W8A8_PIXEL, 0), ("cnn-w4a16", 0)])
def test_tvm_matches_the_reference_on_the_tiny_cnn(plan, fallbacks):
    m = tiny_cnn()
    ref = qcompile.compile(m, plan=plan, example_inputs=(X,), calib=CALIB, backend="torch")
    cm = qcompile.compile(m, plan=plan, example_inputs=(X,), calib=CALIB)
    assert cm.backend == "tvm"
    # only the classifier's linear_static (cnn-w8a8) runs with torch; every conv is lowered
    fb = cm.report.backend["fallbacks"]
    assert len(fb) == fallbacks and not any(QCONV in f for f in fb)
    for x in (X, torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(5))):
        y, want = cm(x), ref(x)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_quantized_cnn_artifact_loads_and_runs_the_same(tmp_path):
    cm = qcompile.compile(tiny_cnn(), plan="cnn-w4a16", example_inputs=(X,))
    back = qcompile.load(cm.save(tmp_path / "a"))
    assert back.backend == "tvm" and torch.equal(back(X), cm(X))


def test_int32_accumulator_is_bit_exact_with_ties_and_nan_stays_nan():
    """One conv with step 1 and unit weight scales and no bias: the output is the accumulator."""
    conv = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)).eval()
    x0 = torch.randn(2, 4, 9, 9)
    ref = qcompile.compile(conv, plan="cnn-w8a8", example_inputs=(x0,), calib=[x0], backend="torch")
    prog = ref.program
    prog.state["0.x_scale"] = torch.ones(1)
    prog.state["0.w_scale"] = torch.ones(6)
    cm = CompiledModule(prog, ref.plan, target="cpu", backend="tvm")
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-160, 160, (2, 4, 9, 9), generator=gen).float() + 0.5 * torch.randint(0, 2, (2, 4, 9, 9))
    qx = torch.clamp(torch.round(x), -127, 127).to(torch.int8)  # ties to even, as the op
    acc = conv_int_accumulate(qx, prog.state["0.qweight"], [2, 2], [1, 1], [1, 1], 1)
    assert torch.equal(cm(x), acc.to(torch.float32)) and torch.equal(ref(x), acc.to(torch.float32))
    x[1, 2, 4, 4] = float("nan")
    y = cm(x)
    assert torch.isnan(y[1]).all() and torch.equal(y[0], acc[0].to(torch.float32))


def test_dynamic_per_pixel_nan_input_gives_the_same_nan_sample_as_the_reference():
    # the conv alone: TVM's relu (max(x, 0)) turns NaN into 0, so a whole CNN would not show it
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1, groups=3)).eval()
    ref = qcompile.compile(m, plan=W8A8_PIXEL, example_inputs=(X,), backend="torch")
    cm = qcompile.compile(m, plan=W8A8_PIXEL, example_inputs=(X,))
    x = X.clone()
    x[2, 1, 5, 5] = float("nan")
    y, want = cm(x), ref(x)
    assert torch.isnan(y[2]).all() and torch.isnan(want[2]).all()
    torch.testing.assert_close(y[[0, 1, 3]], want[[0, 1, 3]], rtol=1e-5, atol=1e-5)
