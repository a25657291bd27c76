"""The TVM CPU backend's 2- and 3-bit weight-only kernels (``u2`` / ``u3`` lane-blocked formats):
the lane layouts decode to the codes exactly, the kernels equal the reference op
(``qcompile::packed_linear`` over the packed storage) for symmetric and asymmetric, per-group and
per-channel weights at M = 1, 5 and a dynamic M, and a tiny model compiled with the W2 / W3 RTN
plans runs like the torch reference backend, also after an artifact round trip."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcompile
from qcompile.codegen.tvm.kernels.linear import NB, LinearKernel, linear_primfunc, pack_weight
from qcompile.codegen.tvm.recipe import LinearRecipe
from qcompile.codegen.tvm.target import host_target
from qcompile.ops.packed import pack_codes, unpack_codes
from qcompile.plan import get_plan
from qcompile.quant.packing import code_range
from qcompile.quant.quantizer import quantize_weight_groups
from qcompile.quant.spec import Granularity, QuantSpec

pytestmark = pytest.mark.tvm


def _run(spec: LinearKernel, inputs: list[torch.Tensor], m: int) -> torch.Tensor:
    import tvm

    lib = tvm.compile(linear_primfunc(spec), target=host_target().tvm)
    y = tvm.runtime.tensor(np.zeros((m, spec.n), "float32"))
    lib(*[tvm.runtime.tensor(a.contiguous().numpy()) for a in inputs], y)
    return torch.from_numpy(y.numpy())


@pytest.mark.parametrize("wfmt", ["u2", "u3"])
def test_lane_layouts_hold_each_lane_in_its_documented_bits(wfmt):
    """Decode the packed arrays by the documented layout (plain Python indexing) and get the codes back."""
    bits = int(wfmt[1])
    n, k = 2 * NB, 12  # u3: a partial last byte of the K-wise plane
    u = torch.randint(0, 2**bits, (n, k), generator=torch.Generator().manual_seed(bits))
    spec = LinearKernel(n, k, wfmt, k, 0, 0, True, False, 1)
    arrays = pack_weight(spec, u, 0)
    assert [tuple(a.shape) for a in arrays] == [s for s, _ in spec.weight_shapes()]
    crumbs = arrays[0].to(torch.int64)
    for row in range(n):
        blk, lane = divmod(row, NB)
        for col in range(k):
            v = (int(crumbs[blk, col, lane % (NB // 4)]) >> (2 * (lane // (NB // 4)))) & 3
            if wfmt == "u3":
                v |= ((int(arrays[1][blk, col // 8, lane]) >> (col % 8)) & 1) << 2
            assert v == int(u[row, col]), (row, col)
    with pytest.raises(ValueError, match=f"{bits}-bit codes"):
        pack_weight(spec, torch.full((n, k), 2**bits), 0)


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    m=st.integers(1, 5),
    n=st.integers(1, 150),
    k=st.integers(1, 300),
    bits=st.sampled_from([2, 3]),
    signed=st.booleans(),
    gsize=st.sampled_from([0, 32, 64, 128]),
    dynamic=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_lowbit_kernels_sum_integer_products_exactly(m, n, k, bits, signed, gsize, dynamic, seed):
    """Integer activations, unit scales and offsets 0 or 1: every fp32 partial sum is an integer below 2^24,
    so the kernel's output must equal the reference op's exactly (any wrong lane or shift shows)."""
    g = torch.Generator().manual_seed(seed)
    group = gsize or k
    lo, hi = code_range(bits, signed)
    if signed:
        lo = -hi  # the symmetric grid
    codes = torch.randint(lo, hi + 1, (n, k), generator=g, dtype=torch.int8)
    groups = -(-k // group)
    scale = torch.ones(n, groups)
    offset = None if signed else torch.randint(0, 2, (n, groups), generator=g).float()
    x = torch.randint(-8, 9, (m, k), generator=g).float()
    packed = pack_codes(codes, bits, signed=signed)
    ref = torch.ops.qcompile.packed_linear(x, packed, scale, None, k, bits, group, 0, 0, offset)
    recipe = LinearRecipe.codes(n, k, bits, group, 0, False, offset is not None)
    assert recipe.wfmt == f"u{bits}"
    spec = recipe.kernel(None if dynamic else m)
    args = recipe.pack(spec, unpack_codes(packed, k, bits, signed=signed), scale, offset)
    y = _run(spec, [torch.nn.functional.pad(x, (0, spec.k - k)), *args], m)
    assert torch.equal(y[:, :n], ref)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [64, 0])  # 0: per channel
def test_lowbit_kernels_match_packed_linear(bits, symmetric, group):
    """Real weights, scales and offsets, a bias; M = 1 and 5 (static) and a dynamic M run with 3 rows."""
    torch.manual_seed(bits * 10 + symmetric)
    n, k = 130, 200  # padded to 192 x 256 (groups of 64) or 192 x 200 (per channel)
    gs = group or k
    w, bias = torch.randn(n, k), torch.randn(n)
    codes, scale, offset = quantize_weight_groups(w, bits, gs, symmetric)
    packed = pack_codes(codes, bits, signed=symmetric)
    assert packed.shape == (n, (k * bits + 7) // 8)
    recipe = LinearRecipe.codes(n, k, bits, gs, 0, False, not symmetric)
    for m, rows in ((1, 1), (5, 5), (None, 3)):
        x = torch.randn(rows, k)
        ref = torch.ops.qcompile.packed_linear(x, packed, scale, bias, k, bits, gs, 0, 0, offset)
        spec = recipe.kernel(m, bias=True)
        args = recipe.pack(spec, unpack_codes(packed, k, bits, signed=symmetric), scale, offset)
        b = torch.nn.functional.pad(bias, (0, spec.n - n))
        y = _run(spec, [torch.nn.functional.pad(x, (0, spec.k - k)), *args, b], rows)
        torch.testing.assert_close(y[:, :n], ref, rtol=1e-5, atol=1e-4)


def test_recipes_pick_the_lowbit_formats_only_for_weight_only_layers():
    assert LinearRecipe.codes(64, 64, 2, 64, 0, False, False).wfmt == "u2"
    assert LinearRecipe.codes(64, 64, 2, 64, 0, False, False).zero == 2
    assert LinearRecipe.codes(64, 64, 3, 64, 0, False, False).zero == 4
    assert LinearRecipe.codes(64, 64, 3, 64, 0, False, True).wfmt == "u3"
    assert LinearRecipe.codes(64, 64, 3, 64, 0, False, True).zero == 0
    assert LinearRecipe.codes(64, 64, 4, 64, 0, False, False).wfmt == "u4"
    # integer activations: signed nibbles up to 4 bits (W4A8), i6 for 6, int8 bytes otherwise
    assert [LinearRecipe.codes(64, 64, b, 64, 8, False, False).wfmt for b in (2, 3, 4, 5, 6, 8)] == [
        "i4",
        "i4",
        "i4",
        "i8",
        "i6",
        "i8",
    ]
    assert LinearRecipe.codes(64, 64, 4, 64, 8, True, False).zero == 0
    with pytest.raises(ValueError, match="fp32 activations"):
        LinearKernel(64, 64, "u3", 64, 8, 0, False, False, 1)


IDS = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
PLANS = {  # two compiles (the kernel tests above cover the other bits x symmetry x grouping pairs)
    "w2-g64-asym": QuantSpec(2, Granularity.PER_GROUP, False, 64, partial_last_group=True),
    "w3-g32-sym": QuantSpec(3, Granularity.PER_GROUP, True, 32),
}


def _plan(name: str):
    return dataclasses.replace(get_plan("w4a16-rtn-g128"), name=name, weight=PLANS[name])


@pytest.fixture(scope="module")
def built(tiny_llama):
    out = {}
    for name in PLANS:
        ref = qcompile.compile(tiny_llama, plan=_plan(name), backend="torch", max_cache_len=64)
        out[name] = (ref, qcompile.compile(tiny_llama, plan=_plan(name), max_cache_len=64))
    return out


@pytest.mark.parametrize("name", list(PLANS))
def test_tiny_model_on_the_lowbit_kernels_matches_the_reference_backend(built, name):
    ref, cm = built[name]
    spec = PLANS[name]
    packed = [k for k, t in cm.program.state.items() if k.endswith("qweight_packed")]
    assert packed and all(cm.program.state[k].dtype == torch.uint8 for k in packed)
    assert not any(k.endswith(".qweight") for k in cm.program.state)  # no one-code-per-byte copies left
    offsets = [k for k in cm.program.state if k.endswith("w_offset")]
    assert bool(offsets) == (not spec.symmetric)
    y, r = cm(IDS), ref(IDS)
    assert float((y - r).abs().max() / r.abs().max()) < 1e-4
    assert torch.equal(cm.generate(IDS, 10, eos_token_id=[]), ref.generate(IDS, 10, eos_token_id=[]))
    kernels = cm.report.backend["kernels"]
    assert any(f"_u{spec.bits}_" in name for name in kernels), kernels
    assert not cm.report.backend["fallbacks"]


def test_lowbit_artifact_round_trips(built, tmp_path):
    _, cm = built["w2-g64-asym"]
    cm.save(tmp_path / "a")
    cm2 = qcompile.load(tmp_path / "a")
    assert torch.equal(cm2(IDS), cm(IDS))
    for k, t in cm.program.state.items():
        assert torch.equal(cm2.program.state[k], t)


@pytest.mark.slow  # two nvcc builds (about 30 s)
@pytest.mark.skipif(
    __import__("shutil").which("nvcc") is None, reason="nvcc is not on PATH: CUDA builds need the CUDA toolkit"
)
def test_cuda_runs_lowbit_weights_on_its_four_bit_kernel(tiny_llama):
    """CUDA has no 2/3-bit layout: u2/u3 recipes map to the f16 tensor-core kernel's nibbles (codes + zero
    fit in 4 bits), every quantized linear gets it, none falls back."""
    for name in PLANS:
        cm = qcompile.compile(tiny_llama, target="cuda:sm_80", plan=_plan(name), max_cache_len=64)
        info = cm.report.backend
        kinds = {k.split("_")[2] for k in info["kernels"] if k.startswith("qc_cuda_") and "quant" not in k}
        assert kinds == {"f16"} and not info["fallbacks"] and info["generic_kernels"] == []
