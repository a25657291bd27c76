"""``qcompile::quant_conv2d`` against oracles: an int64 im2col convolution of the codes (exact),
float64 convolutions of the dequantized tensors, and the plain rounding rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import qcompile  # noqa: F401  (registers the ops)
from qcompile.ops.conv import conv_int_accumulate

OP = torch.ops.qcompile.quant_conv2d.default
GEN = torch.Generator().manual_seed(0)

# (C_in, C_out, k, stride, padding, dilation, groups)
CASES = [
    (3, 8, 3, 1, 1, 1, 1),  # dense
    (8, 8, 3, 1, 1, 1, 8),  # depthwise
    (8, 16, 3, 2, 1, 1, 1),  # strided
    (8, 12, 3, 1, 2, 2, 4),  # grouped, dilated
    (6, 4, 1, 1, 0, 1, 1),  # pointwise
    (4, 6, (3, 5), (2, 1), (0, 2), (1, 2), 2),  # rectangular everything
]


def _pair(v):
    return list(v) if isinstance(v, tuple) else [v, v]


def _setup(case, bits=8, seed=0):
    cin, cout, k, s, p, d, g = case
    kh, kw = _pair(k)
    gen = torch.Generator().manual_seed(seed)
    qmax = 2 ** (bits - 1) - 1
    codes = torch.randint(-qmax, qmax + 1, (cout, cin // g, kh, kw), generator=gen).to(torch.int8)
    scale = torch.rand(cout, generator=gen) * 0.05 + 0.01
    bias = torch.randn(cout, generator=gen)
    x = torch.randn(2, cin, 11, 9, generator=gen)
    return x, codes, scale, bias, _pair(s), _pair(p), _pair(d), g


def _int_conv_oracle(qx, codes, stride, padding, dilation, groups):
    """int64 im2col: Σ over each window, group by group (no floats anywhere)."""
    n = qx.shape[0]
    o, cg, kh, kw = codes.shape
    cols = F.unfold(qx.to(torch.float64), (kh, kw), dilation=dilation, padding=padding, stride=stride)
    cols = cols.round().to(torch.int64).view(n, groups, cg * kh * kw, -1)
    w = codes.to(torch.int64).view(groups, o // groups, cg * kh * kw)
    acc = torch.einsum("gok,ngkl->ngol", w, cols).reshape(n, o, -1)
    h = (qx.shape[2] + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    return acc.view(n, o, h, -1)


@pytest.mark.parametrize("case", CASES)
def test_static_a8_is_the_exact_integer_conv_rescaled(case):
    x, codes, ws, bias, s, p, d, g = _setup(case)
    xs = torch.tensor([x.abs().max().item() / 127 * 0.8])  # some values clip
    y = OP(x, codes, ws, xs, bias, s, p, d, g, 8)
    qx = torch.clamp(torch.round(x / xs), -127, 127)
    acc = _int_conv_oracle(qx, codes, s, p, d, g)
    assert torch.equal(conv_int_accumulate(qx.to(torch.int8), codes, s, p, d, g).to(torch.int64), acc)
    want = acc.to(torch.float32) * xs * ws.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    # and, with an unclipped scale, it approximates the float conv of the dequantized weights
    y = OP(x, codes, ws, xs / 0.8, bias, s, p, d, g, 8)
    ref = F.conv2d(x.double(), (codes.double() * ws.double().view(-1, 1, 1, 1)), bias.double(), s, p, d, g)
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < 0.02


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_is_the_float_conv_of_the_dequantized_weights(case, bits):
    x, codes, ws, bias, s, p, d, g = _setup(case, bits)
    assert int(codes.abs().max()) <= 2 ** (bits - 1) - 1
    y = OP(x, codes, ws, None, bias, s, p, d, g, 0)
    w = codes.double() * ws.double().view(-1, 1, 1, 1)
    torch.testing.assert_close(y.double(), F.conv2d(x.double(), w, bias.double(), s, p, d, g), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES[:4])
def test_dynamic_per_pixel_rounds_each_pixel_on_its_own_grid(case):
    x, codes, ws, bias, s, p, d, g = _setup(case)
    x[0, :, 2, 3] = 0.0  # an all-zero pixel keeps scale 1 (stays zero)
    y = OP(x, codes, ws, None, bias, s, p, d, g, 8)
    xd = x.double()
    scale = xd.abs().amax(dim=1, keepdim=True) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    xq = torch.clamp(torch.round(xd / scale), -127, 127) * scale
    assert float(((xq - xd).abs() / scale).max()) <= 0.5 + 1e-6
    w = codes.double() * ws.double().view(-1, 1, 1, 1)
    torch.testing.assert_close(y.double(), F.conv2d(xq, w, bias.double(), s, p, d, g), rtol=1e-5, atol=1e-4)


def test_exact_accumulation_beyond_float32_uses_float64():
    # 512 channels x 9 taps x 127 x 127 > 2^24: a float32 conv could round, the op must not
    gen = torch.Generator().manual_seed(1)
    qx = torch.randint(-127, 128, (1, 512, 5, 5), generator=gen).to(torch.int8)
    codes = torch.randint(-127, 128, (4, 512, 3, 3), generator=gen).to(torch.int8)
    codes[:, :, :, :] = codes.abs()  # same sign: large sums
    qx[:] = qx.abs()
    acc = conv_int_accumulate(qx, codes, [1, 1], [1, 1], [1, 1], 1)
    want = _int_conv_oracle(qx, codes, [1, 1], [1, 1], [1, 1], 1)
    assert int(want.max()) > 2**24 and torch.equal(acc.to(torch.int64), want)


def test_nonfinite_input_makes_its_sample_nan_never_a_number():
    x, codes, ws, bias, s, p, d, g = _setup(CASES[0])
    x[1, 0, 3, 3] = float("nan")
    for xs, bits in ((torch.tensor([0.02]), 8), (None, 8), (None, 0)):
        y = OP(x, codes, ws, xs, bias, s, p, d, g, bits)
        assert torch.isnan(y[1]).any() and torch.isfinite(y[0]).all(), (xs, bits)
    x[1, 0, 3, 3] = float("inf")
    y = OP(x, codes, ws, torch.tensor([0.02]), bias, s, p, d, g, 8)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all()


def test_bad_shapes_are_refused_and_the_fake_kernel_gives_the_shape():
    x, codes, ws, bias, s, p, d, g = _setup(CASES[2])
    with pytest.raises(ValueError, match="do not make a conv"):
        OP(x[:, :4], codes, ws, None, bias, s, p, d, g, 0)
    with pytest.raises(ValueError, match="w_scale"):
        OP(x, codes, ws[:3], None, bias, s, p, d, g, 0)
    with pytest.raises(ValueError, match="x_scale given without act_bits"):
        OP(x, codes, ws, torch.tensor([1.0]), bias, s, p, d, g, 0)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        out = OP(mode.from_tensor(x), mode.from_tensor(codes), mode.from_tensor(ws), None, None, s, p, d, g, 0)
    assert tuple(out.shape) == tuple(OP(x, codes, ws, None, None, s, p, d, g, 0).shape)


@settings(max_examples=25, deadline=None)
@given(
    cg=st.integers(1, 4),
    groups=st.integers(1, 3),
    og=st.integers(1, 3),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    pad=st.integers(0, 2),
    dil=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_property_static_integer_part_is_exact(cg, groups, og, k, stride, pad, dil, seed):
    gen = torch.Generator().manual_seed(seed)
    cin, cout = cg * groups, og * groups
    size = dil * (k - 1) + 1 + 3
    qx = torch.randint(-127, 128, (2, cin, size, size + 1), generator=gen).to(torch.int8)
    codes = torch.randint(-127, 128, (cout, cg, k, k), generator=gen).to(torch.int8)
    args = ([stride] * 2, [pad] * 2, [dil] * 2, groups)
    assert torch.equal(conv_int_accumulate(qx, codes, *args).to(torch.int64), _int_conv_oracle(qx, codes, *args))
