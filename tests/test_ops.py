import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qcompile  # noqa: F401  (registers ops)
from qcompile.ops.linear import int8_matmul_int32
from qcompile.quant.rtn import dequantize, qrange, quantize_per_token, quantize_weight_per_channel


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
    err = (dequantize(q, s[:, None]) - w).abs()
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
def test_qrange(bits):
    lo, hi = qrange(bits)
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
