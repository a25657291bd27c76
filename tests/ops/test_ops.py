import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qcompile  # noqa: F401  (registers ops)
from qcompile.ops.linear import int8_matmul_int32
from qcompile.quant.quantizer import quantize_per_token, quantize_weight_per_channel
from qcompile.quant.spec import levels


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 9), n=st.integers(1, 33), k=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
def test_int8_matmul_equals_exact_integer_oracle(m, n, k, seed):
    g = np.random.default_rng(seed)
    a = g.integers(-127, 128, size=(m, k), dtype=np.int64)
    b = g.integers(-127, 128, size=(n, k), dtype=np.int64)
    got = int8_matmul_int32(torch.tensor(a, dtype=torch.int8), torch.tensor(b, dtype=torch.int8))
    assert got.dtype == torch.int32
    np.testing.assert_array_equal(got.numpy().astype(np.int64), a @ b.T)


def test_int8_matmul_extremes_do_not_overflow():
    a = torch.full((2, 4096), -127, dtype=torch.int8)
    b = torch.full((3, 4096), -127, dtype=torch.int8)
    assert int(int8_matmul_int32(a, b)[0, 0]) == 127 * 127 * 4096


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 16), k=st.integers(1, 64), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 1000))
def test_weight_quantizer_properties(n, k, scale, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float() * scale
    q, s = quantize_weight_per_channel(w, 8)
    assert q.dtype == torch.int8 and s.shape == (n,)
    assert int(q.abs().max()) <= 127
    # each row's absmax maps to +-127; the error is at most half a step
    err = (q.to(torch.float32) * s[:, None] - w).abs()
    assert bool((err <= s[:, None] / 2 * (1 + 1e-5) + 1e-12).all())


def test_per_token_quantizer_handles_zero_rows_and_matches_float64_oracle():
    x = torch.randn(5, 17, generator=torch.Generator().manual_seed(1))
    x[2] = 0
    q, s = quantize_per_token(x, 8)
    assert float(s[2]) == 1.0 and int(q[2].abs().max()) == 0
    x64 = x.double()
    s64 = x64.abs().amax(-1, keepdim=True) / 127
    s64[2] = 1
    q64 = torch.clamp(torch.round(x64 / s64), -127, 127)
    assert int((q.double() - q64).abs().max()) <= 1  # float32 vs float64 rounding at .5 ties only
    assert float((q.double() == q64).double().mean()) > 0.99


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_symmetric_grid(bits):
    lo, hi = levels(bits, True)
    assert hi == 2 ** (bits - 1) - 1 and lo == -hi


def test_linear_w8a8_reference_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, generator=g)
    w = torch.randn(24, 40, generator=g)
    b = torch.randn(24, generator=g)
    qw, sw = quantize_weight_per_channel(w)
    y = torch.ops.qcompile.linear_w8a8(x, qw, sw, b)
    qx, sx = quantize_per_token(x.reshape(-1, 40))
    acc = qx.long() @ qw.long().T  # int64 oracle
    want = (acc.double() * sx.double() * sw.double() + b.double()).reshape(2, 3, 24)
    assert y.shape == (2, 3, 24) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=1e-5)
    # and it approximates the float linear
    ref = torch.nn.functional.linear(x, w, b)
    assert float((y - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_linear_w8a8_fake_kernel_and_export():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            qw, sw = quantize_weight_per_channel(torch.randn(8, 16))
            self.register_buffer("qw", qw)
            self.register_buffer("sw", sw)

        def forward(self, x):
            return torch.ops.qcompile.linear_w8a8(x, self.qw, self.sw, None)

    m = M()
    ep = torch.export.export(m, (torch.randn(3, 16),))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "qcompile.linear_w8a8.default" in targets
    x = torch.randn(3, 16)
    assert torch.equal(ep.module()(x), m(x))
    with pytest.raises(ValueError, match="input features"):
        torch.ops.qcompile.linear_w8a8(torch.randn(2, 5), *quantize_weight_per_channel(torch.randn(3, 4)), None)


from qcompile.quant.quantizer import (  # noqa: E402  (kept beside the tests that use it)
    dequantize_weight_groups,
    num_groups,
    quantize_activation_groups,
    quantize_weight_groups,
)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    k=st.integers(1, 80),
    bits=st.sampled_from([2, 3, 4, 6, 8]),
    gs=st.sampled_from([8, 16, 32, 50]),
    sym=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_grouped_weight_quantizer_against_float64_oracle(n, k, bits, gs, sym, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 3
    codes, scale, offset = quantize_weight_groups(w, bits, gs, sym)
    g = num_groups(k, gs)
    assert codes.shape == (n, k) and scale.shape == (n, g)
    w64 = w.double()
    for j in range(g):
        blk = w64[:, j * gs : (j + 1) * gs]
        if sym:
            qmax = 2 ** (bits - 1) - 1
            s = blk.abs().amax(1) / qmax
            assert int(codes[:, j * gs : (j + 1) * gs].abs().max()) <= qmax
        else:
            s = (blk.amax(1) - blk.amin(1)) / (2**bits - 1)
            torch.testing.assert_close(offset[:, j].double(), blk.amin(1))
            assert int(codes[:, j * gs : (j + 1) * gs].min()) >= 0
        torch.testing.assert_close(scale[:, j].double(), torch.where(s > 0, s, torch.ones_like(s)), rtol=1e-6, atol=0)
    err = (dequantize_weight_groups(codes, scale, offset, gs).double() - w64).abs()
    half_step = scale.repeat_interleave(gs, 1)[:, :k].double() / 2
    assert bool((err <= half_step * (1 + 1e-5) + 1e-6).all())


def test_asymmetric_g32_reproduces_a_q4_1_grid_exactly():
    # weights already on a 4-bit min/max grid whose codes span 0..15 in every group are kept exactly
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (4, 64), generator=g)
    q[:, 0], q[:, 1], q[:, 32], q[:, 33] = 0, 15, 0, 15
    d = torch.rand(4, 2, generator=g) + 0.1
    m = torch.randn(4, 2, generator=g)
    w = q.float() * d.repeat_interleave(32, 1) + m.repeat_interleave(32, 1)
    codes, scale, offset = quantize_weight_groups(w, 4, 32, symmetric=False)
    assert torch.equal(codes.long(), q)
    torch.testing.assert_close(dequantize_weight_groups(codes, scale, offset, 32), w, rtol=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 6),
    n=st.integers(1, 10),
    k=st.integers(2, 70),
    wbits=st.sampled_from([2, 4, 6, 8]),
    abits=st.sampled_from([4, 6, 8]),
    gs=st.sampled_from([16, 32]),
    sym=st.booleans(),
    per_group_act=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_quant_linear_integer_path_matches_int64_oracle(m, n, k, wbits, abits, gs, sym, per_group_act, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * 2
    w = torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    codes, scale, offset = quantize_weight_groups(w, wbits, gs, sym)
    act_group = gs if per_group_act else 0
    y = torch.ops.qcompile.quant_linear(x, codes, scale, offset, bias, gs, abits, act_group)
    # oracle: integer dot products per (token, channel, group) in int64, then float64 rescale
    g = num_groups(k, gs)
    if per_group_act:
        qx, sx = quantize_activation_groups(x, abits, gs)
        qx = qx.reshape(m, -1)[:, :k].long()
        sxk = sx.double().repeat_interleave(gs, 1)[:, :k]
    else:
        qx, sx = quantize_activation_groups(x, abits, None)
        qx = qx.reshape(m, k).long()
        sxk = sx.double().expand(m, g).repeat_interleave(gs, 1)[:, :k]
    want = torch.zeros(m, n, dtype=torch.float64)
    for j in range(g):
        sl = slice(j * gs, min((j + 1) * gs, k))
        acc = qx[:, sl] @ codes[:, sl].long().T  # exact
        sxj = sxk[:, sl.start].view(m, 1)
        want += acc.double() * sxj * scale[:, j].double().view(1, n)
        if offset is not None:
            want += (qx[:, sl].sum(1, keepdim=True).double() * sxj) * offset[:, j].double().view(1, n)
    want += bias.double()
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-4)


def test_quant_linear_weight_only_is_a_dequantized_matmul():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 3, 40, generator=gen), torch.randn(5, 40, generator=gen)
    codes, scale, offset = quantize_weight_groups(w, 4, 16, False)
    y = torch.ops.qcompile.quant_linear(x, codes, scale, offset, None, 16, 0, 0)
    torch.testing.assert_close(y, x @ dequantize_weight_groups(codes, scale, offset, 16).T)
    with pytest.raises(ValueError, match="must be 0 \\(per token\\) or equal the weight group 16"):
        torch.ops.qcompile.quant_linear(x, codes, scale, offset, None, 16, 8, 8)


@pytest.mark.parametrize("block", [64, 2048])  # float32 path (bound < 2^24) and float64 path (bound > 2^24)
def test_exact_block_products_both_float_paths(block):
    from qcompile.ops.linear import exact_block_products

    gen = torch.Generator().manual_seed(block)
    qx = torch.randint(-127, 128, (3, 2, block), generator=gen, dtype=torch.int8)
    qw = torch.randint(-127, 128, (5, 2, block), generator=gen, dtype=torch.int8)
    qx[0, 0, :] = 127
    qw[0, 0, :] = 127  # the extreme sum 127*127*block
    got = exact_block_products(qx, qw)
    want = torch.einsum("mgb,ngb->mng", qx.long(), qw.long())
    assert torch.equal(got.long(), want)
    assert int(got[0, 0, 0]) == 127 * 127 * block
