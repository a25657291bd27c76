"""qcompile's TIR kernels against the reference arithmetic: integer accumulators exactly (unit
scales make the kernel's fp32 output the integer sum itself), activation codes exactly, float
formats to rounding error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcompile.ops  # noqa: F401  (registers the reference ops)
from qcompile.codegen.tvm.kernels.linear import (
    LinearKernel,
    QuantRows,
    linear_primfunc,
    pack_groups,
    pack_weight,
    padded,
    quant_rows_primfunc,
)
from qcompile.codegen.tvm.target import host_target
from qcompile.ops.linear import exact_block_products
from qcompile.quant.quantizer import num_groups, quantize_activation_groups, quantize_weight_groups

pytestmark = pytest.mark.tvm


def _run(func, inputs: list[torch.Tensor], outputs: list[tuple[tuple[int, ...], str]]) -> list[torch.Tensor]:
    import tvm

    lib = tvm.compile(func, target=host_target().tvm)
    ins = [tvm.runtime.tensor(a.contiguous().numpy()) for a in inputs]
    outs = [tvm.runtime.tensor(np.zeros(s, d)) for s, d in outputs]
    lib(*ins, *outs)
    return [torch.from_numpy(o.numpy()) for o in outs]


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    m=st.integers(1, 5),
    n=st.integers(1, 150),
    k=st.integers(1, 300),
    wfmt=st.sampled_from(["i8", "i6", "i4"]),
    act_bits=st.sampled_from([8, 6]),
    grouping=st.sampled_from(["channel", "group-token", "group-group"]),
    gsize=st.sampled_from([32, 64, 128]),
    dynamic=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_integer_linear_accumulators_are_exact(m, n, k, wfmt, act_bits, grouping, gsize, dynamic, seed):
    """K not a multiple of the group (or of the vector width) is zero-padded by the lowering, as here."""
    g = torch.Generator().manual_seed(seed)
    wlo, whi = {"i8": (-127, 127), "i6": (-31, 31), "i4": (-8, 7)}[wfmt]
    amax = 2 ** (act_bits - 1) - 1
    n_p, k_p, group = padded(n, k, k if grouping == "channel" else gsize)
    act_group = group if grouping == "group-group" else 0
    codes = torch.randint(wlo, whi + 1, (n, k), generator=g, dtype=torch.int32)
    qx = torch.randint(-amax, amax + 1, (m, k), generator=g, dtype=torch.int32)
    spec = LinearKernel(n_p, k_p, wfmt, group, act_bits, act_group, False, False, None if dynamic else m)
    groups = num_groups(k_p, group)
    ones_w = torch.ones(n, groups)
    sx = torch.ones(m, groups if act_group else 1)
    qxp = torch.nn.functional.pad(qx, (0, k_p - k)).to(torch.int8)
    (y,) = _run(
        linear_primfunc(spec), [qxp, sx, *pack_weight(spec, codes), pack_groups(spec, ones_w)], [((m, n_p), "float32")]
    )
    ref = exact_block_products(
        qxp.view(m, groups, group).to(torch.int32), torch.nn.functional.pad(codes, (0, k_p - k)).view(n, groups, group)
    )
    assert torch.equal(y[:, :n].to(torch.int64), ref.to(torch.int64).sum(-1)), "int32 accumulators differ"


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    m=st.integers(1, 4),
    groups=st.integers(1, 4),
    bits=st.sampled_from([8, 6]),
    per_group=st.booleans(),
    seed=st.integers(0, 2**16),
    zero_row=st.booleans(),
)
def test_activation_quantization_matches_the_reference_exactly(m, groups, bits, per_group, seed, zero_row):
    k = 32 * groups
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 3
    x[0, :5] = torch.tensor([0.5, -0.5, 1.5, 2.5, -2.5]) * (x.abs().max() / 127)  # ties: half to even
    if zero_row:
        x[-1] = 0
    spec = QuantRows(k, bits, 32 if per_group else 0, m)
    q, s = _run(quant_rows_primfunc(spec), [x], [((m, k), "int8"), ((m, spec.groups), "float32")])
    rq, rs = quantize_activation_groups(x, bits, 32 if per_group else None)
    assert torch.equal(q, rq.view(m, k)) and torch.equal(s, rs)


@pytest.mark.parametrize(
    ("valid", "group", "fused", "parallel", "static", "sums"),
    [
        (96, 32, False, False, True, 0),
        (80, 32, True, False, True, 32),
        (96, 0, False, True, False, 0),
        (70, 0, True, True, False, 0),
    ],
)
def test_quantization_with_a_fused_rmsnorm_matches_norm_then_quantize(valid, group, fused, parallel, static, sums):
    """``QuantRows.norm``: the kernel normalizes its input itself (RMSNorm over the first ``valid``
    of K inputs, the rest zero padding, weight padded with zeros) and quantizes that. Its sum of
    squares runs in another order than torch's mean, so the scales agree to rounding and a code
    may sit one step off at a rounding tie, never more."""
    from qcompile.codegen.tvm.kernels.linear import QuantKnobs

    m, k, eps = 4, 96, 1e-5
    g = torch.Generator().manual_seed(valid + group)
    x, w = torch.randn(m, valid, generator=g) * 3, torch.rand(valid, generator=g) + 0.5
    x[2] = 0  # an all-zero row: rsqrt(eps) times zeros, scale 1
    normed = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    spec = QuantRows(
        k, 8, group, m if static else None, sums=sums, norm=True, eps=eps, valid=valid if valid != k else 0
    )
    pad = lambda t: torch.nn.functional.pad(t, (0, k - valid))  # noqa: E731
    outs = [((m, k), "int8"), ((m, spec.groups), "float32")] + ([((m, k // sums), "float32")] if sums else [])
    q, s, *_ = _run(quant_rows_primfunc(spec, knobs=QuantKnobs(16, parallel, fused)), [pad(x), pad(w)], outs)
    rq, rs = quantize_activation_groups(pad(normed), 8, group or None)
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=0)
    off = (q.to(torch.int32) - rq.view(m, k).to(torch.int32)).abs()
    assert off.max() <= 1 and (off > 0).float().mean() < 0.02, off.sum()
    assert torch.equal(q[:, valid:], torch.zeros(m, k - valid, dtype=torch.int8)) and torch.equal(
        q[2], rq.view(m, k)[2]
    )
    assert q.abs().max() == 127


@pytest.mark.parametrize(("fused", "static"), [(False, True), (True, False)])
def test_quantization_with_a_fused_silu_gate_matches_the_product_then_quantize(fused, static):
    """``QuantRows.silu_gate``: the kernel quantizes ``silu(x) · u`` (a SwiGLU's input to its down
    projection) from both operands; TVM's sigmoid rounds unlike torch's SiLU, so the scales agree to
    rounding and a code may sit one step off at a rounding tie."""
    from qcompile.codegen.tvm.kernels.linear import QuantKnobs

    m, k = 3, 128
    g = torch.Generator().manual_seed(7)
    x, u = torch.randn(m, k, generator=g) * 4, torch.randn(m, k, generator=g)
    x[1, 100:] = u[1, 100:] = 0  # zero padding stays zero
    spec = QuantRows(k, 8, 32, m if static else None, silu_gate=True)
    q, s = _run(
        quant_rows_primfunc(spec, knobs=QuantKnobs(16, not static, fused)),
        [x, u],
        [((m, k), "int8"), ((m, spec.groups), "float32")],
    )
    rq, rs = quantize_activation_groups(torch.nn.functional.silu(x) * u, 8, 32)
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=0)
    off = (q.to(torch.int32) - rq.view(m, k).to(torch.int32)).abs()
    assert off.max() <= 1 and (off > 0).float().mean() < 0.02, off.sum()
    assert not q[1, 100:].any() and q.abs().max() == 127
    with pytest.raises(ValueError, match="one producer"):
        QuantRows(k, 8, 32, 1, norm=True, eps=1e-5, silu_gate=True)


def test_fused_norm_quantization_rejects_a_valid_count_out_of_range():
    with pytest.raises(ValueError, match="valid=100"):
        QuantRows(96, 8, 32, 1, norm=True, eps=1e-5, valid=100)
    with pytest.raises(ValueError, match="valid=64 needs a fused norm"):
        QuantRows(96, 8, 32, 1, valid=64)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("m", [1, 3])
def test_w4a16_kernel_matches_quant_linear(symmetric, m):
    torch.manual_seed(0)
    n, k, group = 130, 200, 64  # padded to 192 x 256
    w, x, bias = torch.randn(n, k), torch.randn(m, k), torch.randn(n)
    codes, scale, offset = quantize_weight_groups(w, 4, group, symmetric)
    ref = torch.ops.qcompile.quant_linear(x, codes, scale, offset, bias, group, 0, 0)
    n_p, k_p, group = padded(n, k, group)
    zero = 8 if symmetric else 0
    spec = LinearKernel(n_p, k_p, "u4", group, 0, 0, True, True, m)
    c = (offset if offset is not None else 0) - zero * scale
    inputs = [
        torch.nn.functional.pad(x, (0, k_p - k)),
        *pack_weight(spec, codes, zero),
        pack_groups(spec, scale),
        pack_groups(spec, c),
        torch.nn.functional.pad(bias, (0, n_p - n)),
    ]
    (y,) = _run(linear_primfunc(spec), inputs, [((m, n_p), "float32")])
    torch.testing.assert_close(y[:, :n], ref, rtol=1e-5, atol=1e-4)


def test_f32_kernel_matches_linear():
    torch.manual_seed(0)
    n, k, m = 100, 70, 2
    w, x = torch.randn(n, k), torch.randn(m, k)
    n_p, k_p, group = padded(n, k, k)
    spec = LinearKernel(n_p, k_p, "f32", group, 0, 0, False, False, None)
    (y,) = _run(
        linear_primfunc(spec),
        [torch.nn.functional.pad(x, (0, k_p - k)), *pack_weight(spec, w)],
        [((m, n_p), "float32")],
    )
    torch.testing.assert_close(y[:, :n], x @ w.t(), rtol=1e-5, atol=1e-5)


def test_bad_kernel_specs_are_rejected():
    with pytest.raises(ValueError, match="padded"):
        LinearKernel(100, 64, "i8", 64, 8, 0, False, False, 1)
    with pytest.raises(ValueError, match="fp32 activations"):
        LinearKernel(64, 64, "u4", 64, 8, 0, False, False, 1)
    with pytest.raises(ValueError, match="unknown weight format"):
        LinearKernel(64, 64, "i3", 64, 0, 0, False, False, 1)


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    m=st.integers(1, 3),
    nblocks=st.integers(1, 3),
    groups=st.integers(1, 2),
    a_bits=st.sampled_from([6, 8]),
    per_group=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bitserial_kernel_accumulators_are_exact(m, nblocks, groups, a_bits, per_group, seed):
    """Σ 2^(i+j)·popcount(a_i AND w_j) with the sign planes negated equals the integer product."""
    from qcompile.codegen.tvm.kernels.bitserial import (
        NBB,
        BitSerial,
        act_planes_primfunc,
        bitserial_primfunc,
        pack_weight_planes,
    )

    g = torch.Generator().manual_seed(seed)
    n, k = NBB * nblocks, 128 * groups
    qmax = 2 ** (a_bits - 1) - 1
    qx = torch.randint(-qmax, qmax + 1, (m, k), generator=g, dtype=torch.int8)
    codes = torch.randint(-31, 32, (n, k), generator=g)
    spec = BitSerial(n, k, 128, 6, a_bits, 128 if per_group else 0, m)
    (planes,) = _run(act_planes_primfunc(spec), [qx], [((a_bits, m, k // 32), "int32")])
    sx = torch.ones(m, groups if per_group else 1)
    (y,) = _run(
        bitserial_primfunc(spec),
        [planes, sx, pack_weight_planes(spec, codes), torch.ones(n // NBB, groups, NBB)],
        [((m, n), "float32")],
    )
    ref = exact_block_products(qx.view(m, groups, 128).to(torch.int32), codes.view(n, groups, 128)).sum(-1)
    assert torch.equal(y.to(torch.int64), ref.to(torch.int64))
