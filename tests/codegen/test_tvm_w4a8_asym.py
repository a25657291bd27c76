"""Asymmetric W4A8 (llama.cpp's Q4_1 × Q8_1): the x86 ``u4`` dot-product kernels
(qcompile/codegen/tvm/kernels/x86.py) and the lane-blocked template's ``u4`` with integer activations
(the generic path), against exact integer references and the torch reference op; the activation
quantizer's ``sx·Σqx`` output; the recipe and the backend's dispatch on the target's features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcompile
import qcompile.ops  # noqa: F401  (registers the reference ops)
from qcompile.codegen.target import CpuTarget
from qcompile.codegen.tvm.kernels.linear import LinearKernel, QuantKnobs, QuantRows, padded, quant_rows_primfunc
from qcompile.codegen.tvm.kernels.linear import pack_groups as generic_groups
from qcompile.codegen.tvm.kernels.linear import pack_weight as generic_weight
from qcompile.codegen.tvm.kernels.x86 import ISAS, X86Linear, act_codes, act_sums, pack
from qcompile.codegen.tvm.recipe import LinearRecipe
from qcompile.quant.quantizer import activation_blocks, quantize_weight_groups
from tests.codegen.test_tvm_x86 import _INSN, _MCPU, _call, _codes, _lib, _runnable, compiled_mlp_for

pytestmark = pytest.mark.tvm


def _generic(n: int, k: int, group: int, act_group: int, bias: bool, m: int | None) -> LinearKernel:
    return LinearKernel(n, k, "u4", group, 8, act_group, True, bias, m)


def _generic_args(spec: LinearKernel, qx, sx, xs, codes, sw, c) -> list[torch.Tensor]:  # noqa: ANN001
    return [qx, sx, xs, *generic_weight(spec, codes), generic_groups(spec, sw), generic_groups(spec, c)]


def _sums(qx: torch.Tensor, group: int, sx: torch.Tensor) -> torch.Tensor:
    """``fl32(Σ_{k in g} qx)·sx`` per row and group (float64-free: the integer sum is exact)."""
    m, k = qx.shape
    return qx.to(torch.int32).view(m, k // group, group).sum(-1).to(torch.float32) * sx


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    m=st.integers(1, 30),
    n=st.integers(1, 150),
    k=st.integers(1, 200),
    gsize=st.sampled_from([32, 64]),
    per_group=st.booleans(),
    dynamic=st.booleans(),
    extreme=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_u4_sums_are_exact_on_every_isa_here_and_the_template(m, n, k, gsize, per_group, dynamic, extreme, seed):
    """Unit scales and a unit offset make the output the integer ``Σ qx·u + Σ qx`` (every partial sum
    < 2^24: exact in fp32), so both terms are checked exactly; codes span 0…15, activations ±127
    (``extreme``: half of them at the ends)."""
    g = torch.Generator().manual_seed(seed)
    n_p, k_p, group = padded(n, k, gsize)
    act_group = group if per_group else 0
    codes = _codes(g, (n, k), 0, 15, extreme)
    qx = torch.nn.functional.pad(_codes(g, (m, k), -127, 127, extreme), (0, k_p - k))
    want = (qx.to(torch.int64) @ torch.nn.functional.pad(codes + 1, (0, k_p - k)).to(torch.int64).t())[:, :n]
    groups = k_p // group
    sx = torch.ones(m, groups if act_group else 1)
    xs = _sums(qx, group, sx)
    ones = torch.ones(n, groups)
    rows = None if dynamic else m
    base = _generic(n_p, k_p, group, act_group, False, rows)
    y = _call(base, _generic_args(base, qx.to(torch.int8), sx, xs, codes, ones, ones), m)
    assert torch.equal(y[:, :n].to(torch.int64), want), "generic template: integer sums differ"
    for isa in _runnable():
        spec = X86Linear(n_p, k_p, "u4", group, 8, act_group, False, rows, isa)
        y = _call(spec, [act_codes(spec, qx), sx, act_sums(spec, qx, sx), *pack(spec, codes, ones, ones)], m)
        assert torch.equal(y[:, :n].to(torch.int64), want), f"{isa}: integer sums differ"


def test_extremes_are_exact():
    """Codes 0 and 15 against activations ±127 (the largest products and sums of both terms)."""
    m, n, k, group = 3, 64, 256, 32
    base = _generic(n, k, group, group, False, m)
    ones = torch.ones(n, k // group)
    for u in (0, 15):
        for x in (127, -127):
            codes = torch.full((n, k), u, dtype=torch.int32)
            qx = torch.full((m, k), x, dtype=torch.int8)
            sx = torch.ones(m, k // group)
            want = torch.full((m, n), float((u + 1) * x * k))
            xs = _sums(qx, group, sx)
            y = _call(base, _generic_args(base, qx, sx, xs, codes, ones, ones), m)
            assert torch.equal(y, want), f"template u={u} x={x}"
            for isa in _runnable():
                spec = X86Linear(n, k, "u4", group, 8, group, False, m, isa)
                y = _call(spec, [act_codes(spec, qx), sx, xs, *pack(spec, codes, ones, ones)], m)
                assert torch.equal(y, want), f"{isa} u={u} x={x}"


@pytest.mark.parametrize(("m", "nblocks", "bias", "seed"), [(5, 2, True, 0)])
def test_real_weights_match_the_reference_op_and_the_template(m, nblocks, bias, seed):
    """Asymmetric group-32 weights and activations quantized by the kernel pipeline's quantizer: every
    ISA here gives the template's fp32 result (same operation order per group: rtol 1e-6), and both
    give ``qcompile::quant_linear``'s within float rounding. The reference sums the scale terms and
    the offset terms over the groups separately (torch's summation order), the kernels per group, so
    they differ by a few ulp of Σ|terms|: the bound is 1e-5 of the sum of the terms' magnitudes."""
    g = torch.Generator().manual_seed(seed)
    n, k, group = 64 * nblocks, 96, 32
    w, x, b = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g) * 3, torch.randn(n, generator=g)
    codes, sw, off = quantize_weight_groups(w, 4, group, False)
    assert off is not None and int(codes.min()) >= 0 and int(codes.max()) <= 15
    ref = torch.ops.qcompile.quant_linear(x, codes, sw, off, b if bias else None, group, 8, group)
    qx3, sx = activation_blocks(x, 8, group, group)
    qx = qx3.reshape(m, k)
    xs = _sums(qx, group, sx)
    # Σ|terms| per output: |acc·sx·sw| + |c·xs| over the groups (+ |bias|)
    acc = (qx3.to(torch.float64)[:, None] * codes.view(n, -1, group).to(torch.float64)[None]).sum(-1)
    mag = acc.abs() * sx[:, None].double() * sw[None].double() + off[None].double().abs() * xs[:, None].double().abs()
    tol = 1e-5 * (mag.sum(-1) + (b.abs() if bias else 0)) + 1e-6
    extra = [b] if bias else []
    base = _generic(n, k, group, group, bias, m)
    want = _call(base, _generic_args(base, qx, sx, xs, codes, sw, off) + extra, m)
    assert ((want.double() - ref.double()).abs() <= tol).all(), "template vs reference op"
    for isa in _runnable():
        spec = X86Linear(n, k, "u4", group, 8, group, bias, m, isa)
        y = _call(spec, [act_codes(spec, qx), sx, xs, *pack(spec, codes, sw, off), *extra], m)
        torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6, msg=lambda s, isa=isa: f"{isa}: {s}")


@pytest.mark.parametrize(
    ("group", "sums", "flip", "fused"), [(32, 32, False, False), (0, 32, True, True), (0, 64, False, True)]
)
def test_quantizer_sums_are_the_reference_ops(group, sums, flip, fused):
    """``QuantRows.sums``: ``fl32(Σ code)·sx`` per row and block, bit for bit the reference op's
    ``qsum.float() * sx`` (per group, or a per-row scale with per-block sums), flipped codes or not,
    fused and parallel schedules."""
    import tvm

    m, k = 5, 128
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(sums + group)) * 4
    x[1] = 0  # an all-zero row: scale 1, sums 0
    spec = QuantRows(k, 8, group, m if fused else None, flip=flip, sums=sums)
    lib = tvm.compile(quant_rows_primfunc(spec, knobs=QuantKnobs(16, True, fused)), target=CpuTarget().tvm)
    outs = [np.zeros((m, k), "int8"), np.zeros((m, spec.groups), "float32"), np.zeros((m, k // sums), "float32")]
    outs_t = [tvm.runtime.tensor(o) for o in outs]
    lib(tvm.runtime.tensor(x.numpy()), *outs_t)
    qx3, sx = activation_blocks(x, 8, group, sums)  # [M, K/sums, sums], scales per block
    want = qx3.to(torch.int32).sum(-1).to(torch.float32) * sx
    got = torch.from_numpy(outs_t[2].numpy())
    assert torch.equal(got, want)
    assert want.abs().sum() > 0


def test_quantizer_rejects_sums_the_scales_do_not_cover():
    with pytest.raises(ValueError, match="sums over blocks of 32"):
        QuantRows(128, 8, 64, 1, sums=32)
    with pytest.raises(ValueError, match="sums over blocks of 48"):
        QuantRows(128, 8, 0, 1, sums=48)


def test_recipe_and_packing():
    """Asymmetric ≤4-bit weights with integer activations are stored as ``u4`` with the offset term
    (symmetric ones stay ``i4``); codes outside 0…15 and a missing offset are rejected."""
    r = LinearRecipe.codes(200, 256, 4, 32, 8, True, True)
    assert (r.wfmt, r.zero, r.zero_term) == ("u4", 0, True)
    assert LinearRecipe.codes(200, 256, 3, 32, 8, True, True).wfmt == "u4"
    assert LinearRecipe.codes(200, 256, 4, 32, 8, True, False).wfmt == "i4"
    spec = r.kernel(None)
    assert spec.quant_rows().sums == 32 and "_z" in spec.name
    with pytest.raises(ValueError, match="zero/offset term"):  # unsigned codes need their offset term
        LinearKernel(64, 64, "u4", 32, 8, 32, False, False, 1)
    for isa in ISAS:
        xs = X86Linear(64, 64, "u4", 32, 8, 32, False, 1, isa)
        assert xs.offset and not xs.corrected and xs.quant_rows().sums == 32 and not xs.quant_rows().flip
        with pytest.raises(ValueError, match=r"\[0, 15\]"):
            pack(xs, torch.full((64, 64), 16), torch.ones(64, 2), torch.ones(64, 2))
        with pytest.raises(ValueError, match="offset term"):
            pack(xs, torch.full((64, 64), 3), torch.ones(64, 2))


@pytest.mark.parametrize("isa", ISAS)
def test_u4_compiles_for_every_isa(isa):
    """Built (not run) for a CPU that has the ISA, whatever this machine is, with its instructions in the code."""
    spec = X86Linear(64, 128, "u4", 32, 8, 32, True, None, isa)
    lib = _lib(spec, _MCPU[isa])
    asm = lib.inspect_source("asm") if hasattr(lib, "inspect_source") else lib.mod.inspect_source("asm")
    assert _INSN[isa] in asm


@pytest.mark.parametrize(("mcpu", "isa"), [(None, "host"), ("haswell", "avx2"), ("x86-64", None)])
def test_backend_runs_w4a8_g32_asym_on_the_targets_kernel(monkeypatch, mcpu, isa):
    """``w4a8-g32-asym`` compiled for the host (its best ISA), a Haswell (AVX2) and a baseline x86-64
    (the generic template, no dot-product kernel) computes what the torch reference does, and the
    report names the kernels."""
    cm, isa = compiled_mlp_for(monkeypatch, mcpu, "w4a8-g32-asym", isa)
    b = cm.report.backend
    dot = [c for c in b["kernel_choices"].values() if c.get("chosen") in ISAS]
    if isa is None:  # the generic template: u4 with integer activations and the offset term
        assert not dot
        assert sum(name.startswith("qc_linear_u4_a8g") and "_z" in name for name in b["kernels"]) == 2
    else:
        assert len(dot) == 2 and {c["chosen"] for c in dot} == {isa}
        assert sum(name.startswith(f"qc_{isa}_u4a8g") for name in b["kernels"]) == 2
        assert f"dot-product kernels: {isa} for 2 linear kernels" in cm.report.summary()
    assert sum("_s32_" in name for name in b["kernels"]) == 2  # the quantizer writes sx·Σqx
