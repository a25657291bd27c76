"""qcompile::quest_linear and the QuEST weight codes against float64 oracles."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import qcompile  # noqa: F401  (registers ops)
from qcompile.quant.quantizer import dequantize_weight_groups
from qcompile.quant.quest import quest_codes, quest_quantize
from qcompile.quant.quest_linear import as_asymmetric, odd_from_unsigned, quest_dequantize_weight, quest_weight_codes


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 20),
    k=st.integers(2, 300),
    bits=st.sampled_from([2, 3, 4, 6, 8]),
    gdiv=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
@example(n=4, k=13, bits=8, gdiv=2, seed=2)  # CI found a 1.5e-6 cancellation error here
def test_weight_codes_are_quest_per_row_or_group(n, k, bits, gdiv, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 3
    group = max(1, k // gdiv)
    u, hs = quest_weight_codes(w, bits, group)
    assert int(u.min()) >= 0 and int(u.max()) <= 2**bits - 1 and hs.shape == (n, -(-k // group))
    want = torch.cat([quest_quantize(w[:, s : s + group], bits) for s in range(0, k, group)], dim=1)
    assert torch.equal(quest_dequantize_weight(u, hs, bits, group), want)
    c = odd_from_unsigned(u, bits)
    assert bool((c % 2 != 0).all()) and int(c.abs().max()) <= 2**bits - 1
    scale, offset = as_asymmetric(hs, bits)  # the equal asymmetric grid
    # offset + scale·u cancels a term as large as the outermost level: allow a few float32 ulps of it
    atol = 4 * torch.finfo(torch.float32).eps * float(offset.abs().max())
    torch.testing.assert_close(dequantize_weight_groups(u, scale, offset, group), want, atol=atol, rtol=1e-6)


def _oracle(x, u, hs, bits, group, act_bits, bias=None):
    w = quest_dequantize_weight(u, hs, bits, group).double()
    xq = x.double() if act_bits == 0 else quest_quantize(x, act_bits).double()
    y = xq @ w.t()
    return y if bias is None else y + bias.double()


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 6),
    n=st.integers(1, 24),
    k=st.integers(2, 260),
    bits=st.sampled_from([2, 3, 4, 6]),
    act_bits=st.sampled_from([0, 2, 3, 4, 6, 8]),
    per_group=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_quest_linear_equals_float64_oracle(m, n, k, bits, act_bits, per_group, seed):
    g = torch.Generator().manual_seed(seed)
    x, w, b = torch.randn(1, m, k, generator=g) * 2, torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    group = max(1, k // 3) if per_group else k
    u, hs = quest_weight_codes(w, bits, group)
    y = torch.ops.qcompile.quest_linear(x, u, hs, b, group, bits, act_bits)
    want = _oracle(x[0], u, hs, bits, group, act_bits, b)
    assert y.shape == (1, m, n) and y.dtype == x.dtype
    torch.testing.assert_close(y[0].double(), want, atol=1e-4 * float(want.abs().max()) + 1e-5, rtol=1e-5)


def test_integer_products_are_exact():
    """The activation codes are quest_codes' odd codes and acc is their exact integer product."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(5, 512, generator=g), torch.randn(7, 512, generator=g)
    u, hs = quest_weight_codes(w, 4, 512)
    cx, hx = quest_codes(x, 4)
    acc = cx.long() @ odd_from_unsigned(u, 4).long().t()  # int64 oracle
    y = torch.ops.qcompile.quest_linear(x, u, hs, None, 512, 4, 4)
    torch.testing.assert_close(y.double(), acc.double() * hx.double() * hs.double().t(), atol=1e-5, rtol=1e-6)


def test_nan_token_stays_nan():
    x = torch.randn(3, 64)
    x[1, 5] = float("nan")
    u, hs = quest_weight_codes(torch.randn(4, 64), 4, 64)
    y = torch.ops.qcompile.quest_linear(x, u, hs, None, 64, 4, 4)
    assert y[1].isnan().all() and not y[[0, 2]].isnan().any()


def test_shape_mismatch():
    u, hs = quest_weight_codes(torch.randn(4, 64), 4, 64)
    with pytest.raises(ValueError, match="input features"):
        torch.ops.qcompile.quest_linear(torch.randn(2, 63), u, hs, None, 64, 4, 4)
