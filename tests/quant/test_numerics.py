"""Quantizers, clipping search, GPTQ and observers against simple oracles."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.errors import PlanError
from qcompile.plan import Granularity
from qcompile.quant.gptq import Hessian, gptq_quantize
from qcompile.quant.observers import AbsMaxObserver, HistogramObserver, SampleObserver, TokenStatsObserver
from qcompile.quant.quantizer import (
    dequantize,
    dequantize_weight_groups,
    fake_quantize,
    levels,
    quantize,
    quantize_weight_groups,
    search_clip,
)

G = Granularity


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 6, 8]),
    symmetric=st.booleans(),
    gran=st.sampled_from([G.PER_TENSOR, G.PER_CHANNEL, G.PER_TOKEN, G.PER_GROUP]),
    rows=st.integers(1, 5),
    groups=st.integers(1, 4),
    gs=st.sampled_from([1, 4, 8]),
    seed=st.integers(0, 2**16),
)
def test_quantize_round_trip_error_is_at_most_half_a_step(bits, symmetric, gran, rows, groups, gs, seed):
    torch.manual_seed(seed)
    x = torch.randn(rows, groups * gs) * torch.rand(rows, 1) * 10
    q = quantize(x, bits, gran, symmetric=symmetric, group_size=gs if gran is G.PER_GROUP else None)
    qmin, qmax = levels(bits, symmetric)
    assert int(q.codes.min()) >= qmin and int(q.codes.max()) <= qmax
    err = (dequantize(q).reshape(x.shape) - x).abs()
    step = q.scale.expand_as(q.codes).reshape(x.shape)
    assert (err <= step / 2 + 1e-5 * x.abs().max()).all()
    # fake_quantize is the same numbers in x's shape
    fq = fake_quantize(x, bits, gran, symmetric=symmetric, group_size=gs if gran is G.PER_GROUP else None)
    torch.testing.assert_close(fq, dequantize(q).reshape(x.shape))


def test_static_scale_equals_dynamic_when_calibrated_on_the_same_data():
    x = torch.randn(6, 16)
    dyn = quantize(x, 4, G.PER_TOKEN)
    stat = quantize(x, 4, G.PER_TOKEN, scale=dyn.scale)
    assert torch.equal(dyn.codes, stat.codes)
    # static range smaller than the data: values beyond it saturate
    sat = quantize(x * 3, 4, G.PER_TOKEN, scale=dyn.scale)
    assert int(sat.codes.abs().max()) == levels(4, True)[1]


def test_group_size_must_divide_unless_partial_groups_allowed():
    x = torch.randn(3, 20)
    with pytest.raises(
        PlanError, match=r"group_size 8 does not divide the 20 channels; divisors include \[4, 5, 10, 20\]"
    ):
        quantize(x, 4, G.PER_GROUP, group_size=8)
    q = quantize(x, 4, G.PER_GROUP, group_size=8, partial_last_group=True)
    assert q.codes.shape == (3, 3, 8)
    codes, scale, _ = quantize_weight_groups(x, 4, 8)
    torch.testing.assert_close(
        fake_quantize(x, 4, G.PER_GROUP, group_size=8, partial_last_group=True),
        dequantize_weight_groups(codes, scale, None, 8),
    )
    with pytest.raises(PlanError, match="bits=5 is not supported"):
        quantize(x, 5, G.PER_TENSOR)


def test_clip_search_never_worse_than_no_clipping():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    w[:, 3] *= 20  # an outlier column makes clipping worthwhile
    x = torch.randn(128, 64)
    ratio = search_clip(w, x, 3, 16)
    assert ratio.shape == (32, 4, 1) and (ratio <= 1).all() and (ratio < 1).any()

    def out_err(clip):
        wq = fake_quantize(w, 3, G.PER_GROUP, group_size=16, clip=clip)
        return float(((x @ (w - wq).t()) ** 2).sum())

    assert out_err(ratio) < out_err(1.0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_with_identity_hessian_is_rtn(symmetric):
    torch.manual_seed(1)
    w = torch.randn(16, 48)
    codes, scale, offset = gptq_quantize(w, torch.eye(48), 4, 16, symmetric=symmetric, damp=0.0)
    rc, rs, ro = quantize_weight_groups(w, 4, 16, symmetric)
    assert torch.equal(codes, rc)
    torch.testing.assert_close(scale, rs)
    if symmetric:
        assert offset is None
    else:
        torch.testing.assert_close(offset, ro)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_reduces_output_error_on_correlated_inputs(act_order):
    torch.manual_seed(2)
    k = 64
    mix = torch.randn(k, k) / k**0.5 + torch.eye(k)
    x = torch.randn(2048, k) @ mix * torch.linspace(0.2, 3, k)  # correlated, uneven channels
    w = torch.randn(24, k)
    h = Hessian(k)
    h.add(x[:1024])
    h.add(x[1024:])
    codes, scale, _ = gptq_quantize(w, h.value(), 3, 32, act_order=act_order)
    rc, rs, _ = quantize_weight_groups(w, 3, 32)

    def err(c, s):
        return float(((x @ (w - dequantize_weight_groups(c, s, None, 32)).t()) ** 2).mean())

    assert err(codes, scale) < 0.8 * err(rc, rs)


def test_observers():
    torch.manual_seed(3)
    xs = [torch.randn(4, 7, 10) * (i + 1) for i in range(3)]
    am, ts, hist, samp = (
        AbsMaxObserver(),
        TokenStatsObserver(),
        HistogramObserver(bins=64),
        SampleObserver(cap=20, stride=3),
    )
    for x in xs:
        for o in (am, ts, hist, samp):
            o.update(x)
    allx = torch.cat([x.reshape(-1, 10) for x in xs])
    assert torch.equal(am.value(), allx.abs().amax(0)) and am.rows == 84
    s = ts.summary()
    assert s["tokens"] == 84 and s["max"] == pytest.approx(float(allx.abs().amax(1).max()))
    true_p = float(torch.quantile(allx.abs().reshape(-1), 0.9))
    assert abs(hist.percentile(0.9) - true_p) <= 2 * hist.upper / hist.bins
    assert torch.equal(samp.value(), allx[::3][:20])
