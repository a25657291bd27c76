"""Hostile inputs, item 4: NaN / +Inf / -Inf in weights, buffers, example inputs and calibration.

Every case must end in a clear error naming the tensor and the layer, or, under the plan option
``nonfinite: zero``, in a module with finite outputs whose report lists every replacement. The
quantizers themselves refuse non-finite weights (property test against the pre-change algorithm
for finite weights) instead of turning a NaN scale into 1.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import qcompile
from qcompile.errors import CaptureError, NonFiniteError, PassError, PlanError
from qcompile.ir.calib import calib_batches
from qcompile.plan import PRESETS, NonFinite, Plan
from qcompile.quant.gptq import gptq_quantize
from qcompile.quant.lowrank import latent_factors
from qcompile.quant.quantizer import (
    fake_quantize_weight,
    params_from_range,
    quantize,
    quantize_activation_groups,
    quantize_per_token,
    quantize_weight_groups,
    quantize_weight_per_channel,
    search_clip,
)
from qcompile.quant.spec import Granularity, QuantSpec, levels
from qcompile.quant.winograd import transform_weight

NAN, INF = float("nan"), float("inf")
VALUES = {"nan": NAN, "+inf": INF, "-inf": -INF}
COUNTS = {"nan": "1 NaN, 0 +Inf, 0 -Inf", "+inf": "0 NaN, 1 +Inf, 0 -Inf", "-inf": "0 NaN, 0 +Inf, 1 -Inf"}
LLAMA_PRESETS = ("fp32", "w8a8-rtn", "w8a8-smooth", "w6a8-flexq", "w4a16-rtn-g128", "w4a16-gptq-g128", "xcache-4bit")
# (state key, layer, index of the bad value)
LLAMA_SITES = {
    "linear": ("model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.up_proj", (3, 5)),
    "embedding": ("model.embed_tokens.weight", "model.embed_tokens", (7, 1)),
    "norm": ("model.layers.1.input_layernorm.weight", "model.layers.1.input_layernorm", (9,)),
}
CALIB = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))  # 256 tokens: enough for all
IDS = torch.tensor([[1, 7, 42, 7, 200, 3, 9, 255]])  # token 7: the embedding row the cases poison


def _poisoned(program: qcompile.Program, key: str, index: tuple[int, ...], value: float) -> qcompile.Program:
    prog = program.copy()  # the state dict is copied; the poisoned tensor is a clone
    prog.state[key] = prog.state[key].clone()
    prog.state[key][index] = value
    return prog


# ---- weights: refused before any pass, naming tensor, layer, count and index -----------------------


@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("site", list(LLAMA_SITES))
def test_nonfinite_llama_weight_is_refused_by_every_preset_naming_the_layer(tiny_llama_program, site, value):
    key, layer, index = LLAMA_SITES[site]
    prog = _poisoned(tiny_llama_program, key, index, VALUES[value])
    for preset in LLAMA_PRESETS:  # the guard runs before any pass: the program is never rewritten
        with pytest.raises(NonFiniteError) as e:
            qcompile.compile(prog, plan=preset, calib=CALIB)
        msg = str(e.value)
        assert f"{key!r} of layer {layer!r}" in msg, (preset, msg)
        assert f"{COUNTS[value]} among" in msg and f"first at index {list(index)}" in msg
        assert "nonfinite: zero" in msg  # says what to do


def test_nan_in_the_source_model_is_not_a_misleading_capture_error():
    """A NaN weight made capture claim the state 'differs from the tensor of the same name in another
    entry' (torch.equal(NaN, NaN) is False). Now capture succeeds and compile names the weight."""
    from qcompile.eval.zoo import tiny_llama

    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] = NAN
    try:
        qcompile.compile(model, plan="w8a8-rtn", max_cache_len=16, lm_entries=("forward", "decode"))
    except CaptureError as e:  # pragma: no cover - the defect
        pytest.fail(f"misleading capture error: {e}")
    except NonFiniteError as e:
        assert "'model.layers.1.self_attn.v_proj.weight' of layer 'model.layers.1.self_attn.v_proj' (Linear)" in str(e)
        assert "1 NaN" in str(e)
    else:  # pragma: no cover
        pytest.fail("a NaN weight compiled")


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv1(x)))
        return self.head(self.conv2(h).mean(dim=(2, 3)))


def _cnn() -> SmallCNN:
    torch.manual_seed(0)
    m = SmallCNN()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


X = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(1))
CNN_SITES = {  # parameter or buffer -> (state key, layer, class, index)
    "conv": ("conv1.weight", "conv1", "Conv2d", (1, 0, 2, 2)),
    "bn_weight": ("bn.weight", "bn", "BatchNorm2d", (2,)),
    "bn_running_var": ("bn.running_var", "bn", "BatchNorm2d", (3,)),
    "linear": ("head.weight", "head", "Linear", (2, 1)),
}


@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("site", list(CNN_SITES))
def test_nonfinite_cnn_weight_or_buffer_is_refused_naming_the_layer(site, value):
    key, layer, cls, index = CNN_SITES[site]
    model = _cnn()
    with torch.no_grad():
        dict([*model.named_parameters(), *model.named_buffers()])[key][index] = VALUES[value]
    for preset in ("fp32", "winograd-f4"):
        with pytest.raises(NonFiniteError) as e:
            qcompile.compile(model, plan=preset, example_inputs=X)
        assert f"{key!r} of layer {layer!r} ({cls}): {COUNTS[value]}" in str(e.value)
        assert f"first at index {list(index)}" in str(e.value)


# ---- nonfinite: zero --------------------------------------------------------------------------------


def _zero(preset: str) -> Plan:
    return dataclasses.replace(PRESETS[preset], nonfinite=NonFinite.ZERO)


@pytest.fixture(scope="module")
def poisoned_everywhere(tiny_llama_program):
    """NaN in a linear, +Inf in an embedding row that IDS use, -Inf in a norm weight."""
    prog = tiny_llama_program
    for site, value in zip(LLAMA_SITES, VALUES.values()):
        key, _, index = LLAMA_SITES[site]
        prog = _poisoned(prog, key, index, value)
    return prog


@pytest.mark.parametrize("preset", ["fp32", "w8a8-rtn", "w8a8-smooth", "w6a8-flexq", "w4a16-rtn-g128", "xcache-4bit"])
def test_nonfinite_zero_compiles_reports_every_tensor_and_outputs_are_finite(poisoned_everywhere, preset):
    cm = qcompile.compile(poisoned_everywhere.copy(), plan=_zero(preset), calib=CALIB)
    assert cm.plan.nonfinite is NonFinite.ZERO
    assert bool(cm(IDS).isfinite().all())
    got = cm.report.nonfinite
    want = {key: (layer, COUNTS[v]) for (key, layer, _), v in zip(LLAMA_SITES.values(), VALUES)}
    assert set(got) == set(want)
    for key, (layer, counts) in want.items():
        nan, pos, neg = (int(c.split()[0]) for c in counts.split(", "))
        assert (got[key]["nan"], got[key]["posinf"], got[key]["neginf"], got[key]["replaced"]) == (nan, pos, neg, 1)
        assert any(layer in entry for entry in got[key]["layers"])
    summary = cm.report.summary()
    assert "nonfinite: zero: replaced 3 NaN/Inf value(s) by 0 in 3 tensor(s)" in summary
    assert all(key in summary for key in want)
    # the JSON report (saved with every artifact) carries the same record
    back = qcompile.report.CompileReport.from_dict(json.loads(json.dumps(cm.report.to_dict())))
    assert back.nonfinite == got


def test_nonfinite_zero_is_exactly_zero_and_leaves_the_model_alone(tmp_path):
    from qcompile.eval.zoo import tiny_llama

    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[4, 4] = NAN
    clean = tiny_llama()
    with torch.no_grad():
        clean.model.layers[0].mlp.down_proj.weight[4, 4] = 0.0
    kw = {"max_cache_len": 16, "lm_entries": ("forward", "decode")}
    cm = qcompile.compile(model, plan=_zero("w8a8-rtn"), **kw)
    assert torch.isnan(model.model.layers[0].mlp.down_proj.weight[4, 4])  # the user's model is untouched
    ref = qcompile.compile(clean, plan="w8a8-rtn", **kw)
    assert torch.equal(cm(IDS), ref(IDS))
    cm.save(tmp_path / "a")
    loaded = qcompile.load(tmp_path / "a")
    assert loaded.report.nonfinite == cm.report.nonfinite and loaded.plan.nonfinite is NonFinite.ZERO
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["report"]["nonfinite"]["model.layers.0.mlp.down_proj.weight"]["nan"] == 1


def test_nonfinite_zero_on_a_cnn_with_winograd():
    model = _cnn()
    with torch.no_grad():
        model.conv2.weight[0, 1, 1, 1] = INF
        model.bn.running_var[0] = NAN
    cm = qcompile.compile(model, plan=_zero("winograd-f4"), example_inputs=X)
    assert bool(cm(X).isfinite().all())
    assert set(cm.report.nonfinite) == {"conv2.weight", "bn.running_var"}


@pytest.mark.tvm
def test_nonfinite_on_the_tvm_backend():
    model = _cnn()
    with torch.no_grad():
        model.head.weight[1, 1] = -INF
    with pytest.raises(NonFiniteError, match=r"'head.weight' of layer 'head' \(Linear\)"):
        qcompile.compile(model, plan="fp32", example_inputs=X, backend="tvm")
    cm = qcompile.compile(model, plan=_zero("fp32"), example_inputs=X, backend="tvm")
    assert cm.backend == "tvm" and bool(cm(X).isfinite().all())
    assert cm.report.nonfinite["head.weight"]["neginf"] == 1


def test_nonfinite_plan_option_round_trips_and_rejects_bad_values():
    plan = _zero("w8a8-rtn")
    assert Plan.from_yaml(plan.to_yaml()) == plan and Plan.from_json(plan.to_json()) == plan
    assert "nonfinite: zero" in plan.to_yaml() and PRESETS["w8a8-rtn"].nonfinite is NonFinite.ERROR
    assert Plan(nonfinite="zero").nonfinite is NonFinite.ZERO  # typed even when built with the plain value
    for bad in ("nan", "ignore", 0, True, None):
        with pytest.raises(PlanError, match=r"nonfinite.*\['error', 'zero'\]"):
            Plan.from_dict({"nonfinite": bad})
    with pytest.raises(PlanError, match=r"allowed: \['error', 'zero'\]"):
        Plan.from_yaml("name: x\nnonfinite: replace\n")


# ---- calibration ------------------------------------------------------------------------------------


def test_nan_calibration_data_is_refused_naming_the_item(tiny_llama_program):
    bad = torch.rand(2, 64)
    bad[1, 3] = NAN
    with pytest.raises(NonFiniteError, match=r"smooth: calibration item 0 \(torch.float32\[2, 64\]\) holds 1 NaN"):
        calib_batches([bad], who="smooth", program=tiny_llama_program)


def test_nan_example_input_is_refused_at_capture():
    x = X.clone()
    x[0, 1, 2, 3] = -INF
    with pytest.raises(NonFiniteError, match=r"example input 0 \(float32\[1, 2, 8, 8\]\) holds 0 NaN, 0 \+Inf, 1 -Inf"):
        qcompile.compile(_cnn(), plan="fp32", example_inputs=x)


@pytest.mark.parametrize(
    "preset,where",
    [
        ("w8a8-smooth", "calibration activations entering layer 'model.layers.0.mlp.gate_proj' contain NaN or Inf"),
        ("w4a16-gptq-g128", "calibration activations entering layer 'model.layers.0.mlp.gate_proj' contain NaN or Inf"),
        ("w6a8-flexq", "calibration activations entering layer 'model.layers.0.mlp.gate_proj' (node"),
    ],
)
def test_overflowing_calibration_activations_name_layer_and_window(tiny_llama_program, preset, where):
    """Finite weights, non-finite activations: the norm's float32-max weight overflows its output."""
    big = torch.finfo(torch.float32).max
    key = "model.layers.0.post_attention_layernorm.weight"
    prog = tiny_llama_program.copy()
    prog.state[key] = torch.full_like(prog.state[key], big)
    with pytest.raises(PassError) as e:
        qcompile.compile(prog, plan=preset, calib=CALIB)
    msg = str(e.value)
    assert where in msg and "calibration window 0" in msg, msg
    assert isinstance(e.value.__cause__, NonFiniteError)
    # the first node whose output overflowed, found by re-running the window
    assert "first produced by node" in msg and "in layer 'model.layers.0.post_attention_layernorm'" in msg


def test_quantizer_overflow_in_the_pipeline_is_a_pass_error_naming_the_layer(tiny_llama_program):
    """Finite weights whose range overflows float32 give an infinite asymmetric scale: refused."""
    key = "model.layers.1.mlp.gate_proj.weight"
    prog = _poisoned(tiny_llama_program, key, (0, 0), 3e38)
    prog.state[key][0, 1] = -3e38
    with pytest.raises(PassError) as e:
        qcompile.compile(prog, plan="w4a16-rtn-g32-asym")
    msg = str(e.value)
    assert "pass 'quantize_weights' failed" in msg and f"layer 'model.layers.1.mlp.gate_proj' (weight {key!r})" in msg
    assert "the quantization scale of a weight group holds 0 NaN, 1 +Inf" in msg and "overflows float32" in msg


# ---- the quantizers, directly -----------------------------------------------------------------------


def _ref_per_channel(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The algorithm before the change (scale 1 for a zero row), finite weights only."""
    qmin, qmax = levels(bits, True)
    absmax = w.abs().amax(dim=1)
    s = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    return torch.clamp(torch.round(w / s[:, None]), qmin, qmax).to(torch.int8), s


def _ref_groups(w: torch.Tensor, bits: int, gs: int, sym: bool):
    n, k = w.shape
    g = -(-k // gs)
    wp = torch.nn.functional.pad(w, (0, g * gs - k)).view(n, g, gs)
    if sym:
        qmax = levels(bits, True)[1]
        absmax = wp.abs().amax(-1)
        s = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
        q, off = torch.clamp(torch.round(wp / s[..., None]), -qmax, qmax), None
    else:
        top = 2**bits - 1
        valid = torch.nn.functional.pad(torch.ones(1, k), (0, g * gs - k)).view(1, g, gs).bool()
        lo = torch.where(valid, wp, torch.full_like(wp, INF)).amin(-1)
        hi = torch.where(valid, wp, torch.full_like(wp, -INF)).amax(-1)
        d = hi - lo
        s = torch.where(d > 0, d / top, torch.ones_like(d))
        q, off = torch.clamp(torch.round((wp - lo[..., None]) / s[..., None]), 0, top), lo
    return q.reshape(n, g * gs)[:, :k], s, off


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6),
    k=st.integers(1, 40),
    bits=st.sampled_from([2, 3, 4, 6, 8]),
    gs=st.sampled_from([4, 8, 16]),
    sym=st.booleans(),
    zero_row=st.booleans(),
    bad=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from(list(VALUES))), max_size=3),
    seed=st.integers(0, 10_000),
)
def test_quantizers_refuse_nonfinite_weights_and_are_unchanged_otherwise(n, k, bits, gs, sym, zero_row, bad, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 2
    if zero_row:
        w[0] = 0.0  # an all-zero channel: scale 1, codes 0 (legitimate, must keep working)
    for pos, kind in bad:
        w.view(-1)[int(pos * n * k)] = VALUES[kind]
    finite = bool(torch.isfinite(w).all())
    calls = {
        "per_channel": lambda: quantize_weight_per_channel(w, 8),
        "groups": lambda: quantize_weight_groups(w, bits, gs, sym),
        "fake": lambda: fake_quantize_weight(w, QuantSpec(bits, Granularity.PER_GROUP, sym, group_size=gs)),
        "blocked": lambda: quantize(w, bits, Granularity.PER_CHANNEL, symmetric=sym),
        "gptq": lambda: gptq_quantize(w, torch.eye(k, dtype=torch.float64), bits, gs, symmetric=sym),
        "clip": lambda: search_clip(w, torch.randn(4, k), bits, gs, symmetric=sym),
    }
    if not finite:
        bad_mask = ~torch.isfinite(w)
        first = [int(i) for i in bad_mask.nonzero()[0]]
        counts = f"{int(w.isnan().sum())} NaN, {int(w.isposinf().sum())} +Inf, {int(w.isneginf().sum())} -Inf"
        for name, call in calls.items():
            with pytest.raises(NonFiniteError) as e:
                call()
            assert f"holds {counts} among {n * k} values (first at index {first})" in str(e.value), name
        return
    for call in calls.values():
        call()  # no error for finite weights
    q, s = quantize_weight_per_channel(w, 8)
    rq, rs = _ref_per_channel(w, 8)
    assert torch.equal(q, rq) and torch.equal(s, rs)
    codes, scale, offset = quantize_weight_groups(w, bits, gs, sym)
    rc, rsc, roff = _ref_groups(w, bits, gs, sym)
    assert torch.equal(codes.to(torch.float32), rc) and torch.equal(scale, rsc)
    assert (offset is None and roff is None) or torch.equal(offset, roff)
    if zero_row:
        assert bool((s[0] == 1) & (q[0] == 0).all()) and bool((scale[0] == 1).all())


@pytest.mark.parametrize("value", list(VALUES))
def test_other_numeric_routines_refuse_nonfinite(value):
    w = torch.randn(6, 8)
    w[2, 3] = VALUES[value]
    with pytest.raises(NonFiniteError, match=r"projection weight \[6, 8\] being factored \(SVD\) holds"):
        latent_factors(w)
    conv = torch.randn(2, 2, 3, 3)
    conv[1, 0, 2, 1] = VALUES[value]
    with pytest.raises(NonFiniteError, match=r"first at index \[1, 0, 2, 1\]"):
        transform_weight(conv, torch.randn(6, 3))
    h = torch.eye(8, dtype=torch.float64)
    h[1, 1] = VALUES[value]
    with pytest.raises(NonFiniteError, match="Hessian of the layer's calibration inputs"):
        gptq_quantize(torch.randn(4, 8), h, 4, 8)
    with pytest.raises(NonFiniteError, match="calibration inputs"):
        search_clip(torch.randn(4, 8), w, 4, 8)
    with pytest.raises(NonFiniteError, match="the static scale holds"):
        quantize(
            torch.randn(4, 8), 8, Granularity.PER_TOKEN, scale=torch.tensor([[1.0], [VALUES[value]], [1.0], [1.0]])
        )
    with pytest.raises(NonFiniteError):
        params_from_range(torch.tensor([VALUES[value]]), torch.tensor([1.0]), 4, True)


def test_runtime_activation_quantizers_propagate_nan_instead_of_zeroing_the_row():
    """The reference ops' dynamic quantizers used to give a NaN row scale 1 (codes 0: a plausible zero
    output). Now the row's scale is NaN, so the op's output is NaN like float; other rows unchanged."""
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    x[1] = 0.0
    clean_q, clean_s = quantize_per_token(x, 8)
    bad = x.clone()
    bad[2, 5] = NAN
    q, s = quantize_per_token(bad, 8)
    assert bool(torch.isnan(s[2]).all()) and float(s[1]) == 1.0  # zero row: still scale 1
    keep = [0, 1, 3]
    assert torch.equal(q[keep], clean_q[keep]) and torch.equal(s[keep], clean_s[keep])
    qg, sg = quantize_activation_groups(bad, 8, 8)
    assert bool(torch.isnan(sg[2, 0])) and bool(torch.isfinite(sg[2, 1])) and bool(torch.isfinite(sg[[0, 1, 3]]).all())
    y = torch.ops.qcompile.linear_w8a8(bad, *quantize_weight_per_channel(torch.randn(3, 16)), None)
    assert bool(torch.isnan(y[2]).all()) and bool(torch.isfinite(y[keep]).all())


def test_cache_quantize_keeps_a_nan_visible_and_zero_groups_exact():
    from qcompile.ops.cache import cache_dequantize, cache_quantize

    x = torch.randn(1, 2, 4, 16)
    x[0, 0, 1, 3] = float("nan")
    x[0, 1, 2] = 0.0  # an all-zero group: scale 1, decoded exactly
    for symmetric in (True, False):
        q, scale, offset = cache_quantize(x, 4, 8, symmetric)
        y = cache_dequantize(q, scale, None if symmetric else offset, 8)
        assert torch.isnan(y[0, 0, 1, :8]).all(), "a NaN in K/V must not decode to plausible numbers"
        assert torch.isfinite(y[0, 0, 1, 8:]).all() and (y[0, 1, 2] == 0).all()
