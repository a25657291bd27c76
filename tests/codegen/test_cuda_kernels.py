"""CUDA kernels without a GPU: fragment-order packing against the PTX ISA's fragment tables, target
checks, and compile-only builds (nvcc for every supported arch, PTX instruction checks)."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

pytest.importorskip("tvm")

from qcompile.codegen.tvm import cuda  # noqa: E402
from qcompile.codegen.tvm.kernels.cuda import (  # noqa: E402
    CudaLinear,
    CudaQuant,
    Uncovered,
    act_planes_reference,
    linear_cuda_primfunc,
    pack_cuda_weight,
    quant_cuda_primfunc,
)

needs_nvcc = pytest.mark.skipif(
    shutil.which("nvcc") is None, reason="nvcc is not on PATH: CUDA compile-only checks need the CUDA toolkit"
)

# one instance of every kernel (small shapes; the code is the same at any size)
KERNELS = {
    "s8": CudaLinear("s8", 64, 256, 256, 8, 0, True),
    "u6": CudaLinear("u6", 64, 512, 128, 8, 128, False),
    "u6a6": CudaLinear("u6", 64, 512, 128, 6, 128, False),
    "b1": CudaLinear("b1", 64, 512, 128, 8, 128, True, tokens=1),
    "b1a6": CudaLinear("b1", 64, 512, 128, 6, 128, False),
    "f16": CudaLinear("f16", 64, 256, 64, 0, 0, True, zero_term=True),
}
QUANTS = {
    "quant": CudaQuant(512, 8, 0),
    "quant_planes": CudaQuant(512, 8, 128, planes=True),
    "quant_norm_a6": CudaQuant(512, 6, 128, planes=True, norm=True),
}
PTX = {  # the instruction each kernel exists to use
    "s8": "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32",
    "u6": "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32",
    "u6a6": "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32",
    "b1": "mma.sync.aligned.m8n8k128.row.col.s32.b1.b1.s32.and.popc",
    "b1a6": "mma.sync.aligned.m8n8k128.row.col.s32.b1.b1.s32.and.popc",
    "f16": "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
    "quant_planes": "vote.sync.ballot.b32",
    "quant_norm_a6": "vote.sync.ballot.b32",
}


# ---- packing: fragment order per the ISA tables (loops written from the tables, independently of
# the vectorized index code in the kernels module) -------------------------------------------------


def _codes(n: int, k: int, lo: int, hi: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(lo, hi + 1, (n, k), generator=torch.Generator().manual_seed(seed))


def _u32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64) & 0xFFFFFFFF


def test_s8_fragments_follow_the_isa_table() -> None:
    spec = KERNELS["s8"]
    codes = _codes(spec.n, spec.k, -127, 127)
    w = _u32(pack_cuda_weight(spec, codes))
    for t, s, lane in [(0, 0, 0), (1, 3, 5), (3, 7, 31), (2, 5, 18)]:
        gid, tig = lane // 4, lane % 4
        for r in range(4):  # a0..a15: row gid for a0-3/a8-11, gid+8 otherwise; col tig*4 + (i&3) (+16 for i >= 8)
            for b in range(4):
                i = 4 * r + b
                row = gid + (8 if (4 <= i < 8 or i >= 12) else 0)
                col = tig * 4 + (i & 3) + (16 if i >= 8 else 0)
                byte = (int(w[t, s, lane, r]) >> (8 * b)) & 0xFF
                assert byte - 256 * (byte >> 7) == int(codes[t * 16 + row, s * 32 + col])


def test_u6_words_decode_like_the_kernel() -> None:
    """3 words per lane hold 16 six-bit codes; the kernel's shift/mask/__vsub4 recovers the s8 fragment."""
    spec = KERNELS["u6"]
    codes = _codes(spec.n, spec.k, -32, 31, seed=1)
    raw = _u32(pack_cuda_weight(spec, codes))
    ref = _u32(pack_cuda_weight(CudaLinear("s8", spec.n, spec.k, spec.k, 8, 0, False), codes))

    def vsub4(a: torch.Tensor, b: int) -> torch.Tensor:
        out = torch.zeros_like(a)
        for byte in range(4):
            out |= (((a >> (8 * byte)) - (b >> (8 * byte))) & 0xFF) << (8 * byte)
        return out

    for r in range(4):
        u = ((raw[..., r // 2] >> (4 * (r % 2))) & 0x0F0F0F0F) | (((raw[..., 2] >> (2 * r)) & 0x03030303) << 4)
        assert torch.equal(vsub4(u, 0x20202020), ref[..., r])
    assert raw.shape[-1] * 32 == 16 * 6  # exactly 6 bits per weight


def test_b1_planes_follow_the_isa_table_and_rebuild_the_codes() -> None:
    spec = KERNELS["b1"]
    codes = _codes(spec.n, spec.k, -32, 31, seed=2)
    w = _u32(pack_cuda_weight(spec, codes))  # [N/8, K/128, 6, 32]
    for t, s, lane, bit in [(0, 0, 0, 0), (7, 3, 31, 31), (3, 1, 9, 17)]:
        row, col = lane // 4, (lane % 4) * 32 + bit  # m8n8k128 A: row groupID, col tig*32 + i
        value = sum(((int(w[t, s, p, lane]) >> bit) & 1) << p for p in range(6))
        assert value - 64 * (value >> 5) == int(codes[t * 8 + row, s * 128 + col])
    x = _codes(3, spec.k, -127, 127, seed=3)
    planes = _u32(act_planes_reference(x))  # [M, K/128, 8, 4]: word (p, e) bit l = bit p of x[e*32 + l]
    m, s, e, lane = 2, 3, 2, 13
    value = sum(((int(planes[m, s, p, e]) >> lane) & 1) << p for p in range(8))
    assert value - 256 * (value >> 7) == int(x[m, s * 128 + e * 32 + lane])


def test_bitserial_plane_sum_is_the_integer_product() -> None:
    """What the b1 kernel sums: ±2^(p+q)·popc(w_p & a_q) over plane pairs, sign planes negated."""
    for wb, ab in [(6, 6), (6, 8)]:
        w = _codes(8, 128, -(2 ** (wb - 1)), 2 ** (wb - 1) - 1, seed=4)
        a = _codes(1, 128, -(2 ** (ab - 1)) + 1, 2 ** (ab - 1) - 1, seed=5)
        total = torch.zeros(8, dtype=torch.int64)
        for p in range(wb):
            for q in range(ab):
                pop = (((w >> p) & 1) & ((a >> q) & 1)).sum(-1)
                sign = -1 if (p == wb - 1) != (q == ab - 1) else 1
                total += sign * (pop << (p + q))
        assert torch.equal(total, (w * a).sum(-1))


def test_f16_nibbles_follow_the_isa_table() -> None:
    spec = KERNELS["f16"]
    codes = _codes(spec.n, spec.k, 0, 15, seed=6)
    w = _u32(pack_cuda_weight(spec, codes))  # [N/16, K/16, 32, 1]
    for t, s, lane in [(0, 0, 0), (3, 15, 31), (1, 7, 22)]:
        gid, tig = lane // 4, lane % 4
        for i in range(8):  # a0..a7: row gid for a0,a1,a4,a5 else gid+8; col tig*2 + (i&1) (+8 for i >= 4)
            row = gid + (8 if i in (2, 3, 6, 7) else 0)
            col = tig * 2 + (i & 1) + (8 if i >= 4 else 0)
            assert (int(w[t, s, lane, 0]) >> (4 * i)) & 15 == int(codes[t * 16 + row, s * 16 + col])


def test_uncovered_shapes_are_reported() -> None:
    with pytest.raises(Uncovered, match="group"):
        CudaLinear("f16", 64, 256, 8, 0, 0, False)
    with pytest.raises(Uncovered, match="N % 16"):
        CudaLinear("s8", 24, 256, 256, 8, 0, False)
    with pytest.raises(Uncovered, match="multiples of 128"):
        CudaQuant(576, 8, 0)


# ---- targets --------------------------------------------------------------------------------------


def test_cuda_target_parsing_and_refusals() -> None:
    assert cuda.cuda_target("cuda").arch == cuda.DEFAULT_ARCH
    assert cuda.cuda_target("cuda:sm_86").arch == "sm_86"
    assert cuda.cuda_target("cuda -arch=sm_80").arch == "sm_80"
    assert cuda.cuda_target("cuda", "sm_89").arch == "sm_89"
    with pytest.raises(cuda.CudaTargetError, match="and.popc"):
        cuda.cuda_target("cuda:sm_75")
    with pytest.raises(cuda.CudaTargetError, match="sm_75"):
        cuda.cuda_target("cuda:sm_70")
    with pytest.raises(cuda.CudaTargetError, match="plan names"):
        cuda.cuda_target("cuda:sm_86", "sm_90")
    with pytest.raises(cuda.CudaTargetError, match="built and tested for"):
        cuda.cuda_target("cuda:sm_100")
    with pytest.raises(cuda.CudaTargetError, match="unknown CUDA arch"):
        cuda.cuda_target("cuda:ampere")


def test_prebuilt_fatbins_answer_the_load_hook() -> None:
    import tvm_ffi

    cuda.install_fatbins({cuda.source_key("// kernels"): b"FATBIN"})
    hook = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
    assert bytes(hook("// kernels")) == b"FATBIN"
    with pytest.raises(Exception, match="no ahead-of-time fatbin"):
        hook("// other kernels")


# ---- compile-only: every kernel, every arch --------------------------------------------------------


@pytest.fixture(scope="module")
def source() -> str:
    import tvm

    funcs = {name: linear_cuda_primfunc(spec).with_attr("global_symbol", name) for name, spec in KERNELS.items()}
    funcs.update({name: quant_cuda_primfunc(spec).with_attr("global_symbol", name) for name, spec in QUANTS.items()})
    ex = tvm.compile(tvm.IRModule(funcs), target=cuda.CudaTarget("sm_80").tvm)
    return cuda.device_source(ex)


def _entries(ptx: str) -> dict[str, str]:
    parts = re.split(r"\.entry\s+", ptx)[1:]
    return {re.match(r"(\w+?)(?:_kernel)?\(", p).group(1): p for p in parts}  # type: ignore[union-attr]


@needs_nvcc
@pytest.mark.parametrize("arch", cuda.ARCHS)
def test_kernels_build_for_every_arch(source: str, arch: str) -> None:
    entries = _entries(cuda.compile_ptx(source, arch))
    assert set(entries) == set(KERNELS) | set(QUANTS)
    for name, instr in PTX.items():
        assert instr in entries[name], f"{name} on {arch} does not use {instr}"
    assert "b1.b1" not in entries["u6"] and "s8.s8" not in entries["b1"]
    assert (
        "cp.async.ca.shared.global" in entries["b1"] and "cp.async.wait_group 3" in entries["b1"]
    )  # the staged weight ring
    assert "div.full" not in entries["quant"] and "div.rn.f32" in entries["quant"]  # exact division (no fast math)
    fatbin = cuda.compile_fatbin(source, arch)
    assert len(fatbin) > 1000


@pytest.mark.parametrize("name", list(KERNELS))
def test_packing_round_trips(name: str) -> None:
    from qcompile.codegen.tvm.kernels.cuda_layout import planes_to_codes, unpack_cuda_weight

    spec = KERNELS[name]
    lo, hi = {"s8": (-127, 127), "f16": (0, 15)}.get(spec.kind, (-32, 31))
    codes = _codes(spec.n, spec.k, lo, hi, seed=7)
    assert torch.equal(unpack_cuda_weight(spec, pack_cuda_weight(spec, codes)), codes)
    x = _codes(2, 256, -127, 127, seed=8)
    assert torch.equal(planes_to_codes(act_planes_reference(x)), x)
