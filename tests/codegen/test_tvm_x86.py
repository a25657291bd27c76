"""The x86 dot-product kernels (qcompile/codegen/tvm/kernels/x86.py) against the exact integer
reference, on every instruction set this machine runs (each path forced explicitly), the generic
template as the second oracle for the fp32 rescale, the build-time dispatch on the target's
features, and compile-only builds of every ISA for CPUs this machine is not."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcompile
import qcompile.api as api
import qcompile.ops  # noqa: F401  (registers the reference ops)
from qcompile.codegen.target import CpuTarget
from qcompile.codegen.tvm.kernels.linear import LinearKernel, linear_primfunc, padded
from qcompile.codegen.tvm.kernels.linear import pack_groups as generic_groups
from qcompile.codegen.tvm.kernels.linear import pack_weight as generic_weight
from qcompile.codegen.tvm.kernels.x86 import ISAS, X86Linear, act_codes, isa_for, pack, x86_primfunc
from qcompile.ops.linear import exact_block_products

pytestmark = pytest.mark.tvm

# what each ISA's instructions need from LLVM's host features (vpdpbusd on ymm: AVX-VNNI, or AVX-512 VNNI + VL)
_RUNS = {
    "vnni512": [("avx512f", "avx512bw", "avx512vnni")],
    "vnni256": [("avxvnni",), ("avx512vnni", "avx512vl")],
    "avx2": [("avx2",)],
}
# a CPU per ISA for builds this machine need not run: LLVM targets it from anywhere
_MCPU = {"vnni512": "cascadelake", "vnni256": "alderlake", "avx2": "haswell"}
_INSN = {"vnni512": "vpdpbusd\t%zmm", "vnni256": "vpdpbusd\t%ymm", "avx2": "vpmaddubsw\t%ymm"}


@functools.cache
def _host_features() -> frozenset[str]:
    import tvm

    host = CpuTarget()
    return frozenset(str(f) for f in tvm.target.codegen.llvm_get_cpu_features(host.tvm))


def _runnable() -> list[str]:
    feats = _host_features()
    return [isa for isa in ISAS if any(all(f in feats for f in need) for need in _RUNS[isa])]


@functools.cache
def _lib(spec: object, mcpu: str | None = None):
    import tvm

    target = CpuTarget(mcpu, 2).tvm if mcpu else CpuTarget().tvm
    f = x86_primfunc(spec) if isinstance(spec, X86Linear) else linear_primfunc(spec)
    return tvm.compile(f, target=target)


def _call(spec: object, args: list[torch.Tensor], m: int) -> torch.Tensor:
    import tvm

    y = tvm.runtime.tensor(np.zeros((m, spec.n), "float32"))
    _lib(spec)(*[tvm.runtime.tensor(a.contiguous().numpy()) for a in args], y)
    return torch.from_numpy(y.numpy())


_RANGE = {"i8": (-128, 127), "i6": (-32, 31), "i4": (-8, 7)}  # every code each format stores


def _codes(g: torch.Generator, shape: tuple[int, int], lo: int, hi: int, extreme: bool) -> torch.Tensor:
    """Random codes in [lo, hi]; with ``extreme``, half of them at lo or hi."""
    c = torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int32)
    if extreme:
        pick = torch.randint(0, 4, shape, generator=g)
        c = torch.where(pick == 0, lo, torch.where(pick == 1, hi, c))
    return c


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    m=st.integers(1, 40),  # beyond 24: several row chunks per block (small N)
    n=st.integers(1, 150),
    k=st.integers(1, 300),
    wfmt=st.sampled_from(["i8", "i6", "i4"]),
    act_bits=st.sampled_from([8, 6]),
    grouping=st.sampled_from(["channel", "group-token", "group-group"]),
    gsize=st.sampled_from([32, 64, 128]),
    dynamic=st.booleans(),
    extreme=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_dot_kernels_are_exact_on_every_isa_here(m, n, k, wfmt, act_bits, grouping, gsize, dynamic, extreme, seed):
    """Unit scales make the output the integer sum itself (every partial sum < 2^24: exact in fp32).
    Weights span the whole format (-128…127 for i8, -32…31 for i6, -8…7 for i4), activations ±qmax
    (what the quantizer emits); ``extreme`` puts half of them at the ends, where vpmaddubsw would saturate."""
    g = torch.Generator().manual_seed(seed)
    wlo, whi = _RANGE[wfmt]
    amax = 2 ** (act_bits - 1) - 1
    n_p, k_p, group = padded(n, k, k if grouping == "channel" else gsize)
    act_group = group if grouping == "group-group" else 0
    codes = _codes(g, (n, k), wlo, whi, extreme)
    qx = _codes(g, (m, k), -amax, amax, extreme)
    groups = k_p // group
    qxp = torch.nn.functional.pad(qx, (0, k_p - k))
    ref = exact_block_products(
        qxp.view(m, groups, group), torch.nn.functional.pad(codes, (0, k_p - k)).view(n, groups, group)
    )
    want = ref.to(torch.int64).sum(-1)
    sx = torch.ones(m, groups if act_group else 1)
    runnable = _runnable()
    assert runnable, "this machine runs none of the dot-product ISAs (the generic path is tested elsewhere)"
    for isa in runnable:
        spec = X86Linear(n_p, k_p, wfmt, group, act_bits, act_group, False, None if dynamic else m, isa)
        y = _call(spec, [act_codes(spec, qxp), sx, *pack(spec, codes, torch.ones(n, groups))], m)
        assert torch.equal(y[:, :n].to(torch.int64), want), f"{isa}: integer sums differ"


@pytest.mark.parametrize("residual", [False, True])
@settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    m=st.integers(1, 9),
    nblocks=st.integers(1, 3),
    groups=st.integers(1, 3),
    wfmt=st.sampled_from(["i8", "i6", "i4"]),
    per_group=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rescale_and_bias_match_the_generic_template(m, nblocks, groups, wfmt, per_group, bias, residual, seed):
    """Random scales, a bias and a fused residual: the same fp32 result as the lane-blocked template
    (same operation order), and the residual is torch's ``(x·Wᵀ + b) + r`` bit for bit."""
    g = torch.Generator().manual_seed(seed)
    n, group = 64 * nblocks, 64
    k = group * groups
    wlo, whi = _RANGE[wfmt]
    codes = torch.randint(wlo, whi + 1, (n, k), generator=g)
    qx = torch.randint(-127, 128, (m, k), generator=g).to(torch.int8)
    sw = torch.rand(n, groups, generator=g) + 0.01
    sx = torch.rand(m, groups if per_group else 1, generator=g) + 0.01
    b = torch.randn(n, generator=g)
    ag = group if per_group else 0
    r = torch.randn(m, n, generator=g)
    base = LinearKernel(n, k, wfmt, group, 8, ag, False, bias, m, residual)
    extra = ([b] if bias else []) + ([r] if residual else [])
    wargs = [*generic_weight(base, codes), generic_groups(base, sw)]
    want = _call(base, [qx, sx, *wargs, *extra], m)
    if residual:  # the same kernel without the residual, plus r in torch
        plain = LinearKernel(n, k, wfmt, group, 8, ag, False, bias, m)
        assert torch.equal(want, _call(plain, [qx, sx, *wargs, *extra[:-1]], m) + r)
    for isa in _runnable():
        spec = X86Linear(n, k, wfmt, group, 8, ag, bias, m, isa, residual)
        y = _call(spec, [act_codes(spec, qx), sx, *pack(spec, codes, sw), *extra], m)
        torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6, msg=lambda s, isa=isa: f"{isa}: {s}")


def test_saturation_extremes_are_exact():
    """The worst cases of each arithmetic, deterministically: i8 weights all -128 or 127 against
    activations all ±127 (the avx2 sign trick's pair sum 2·128·127 just fits int16), i6 weights -32
    against 127 (the +128 form's 2·255·32), i4 weights -8 and 7 (on vnni decoded as 16·w = -128, 112)."""
    m, n, k = 3, 64, 256
    cases = [("i8", -128, 127), ("i8", -128, -127), ("i8", 127, -127), ("i6", -32, 127), ("i6", 31, -127)]
    cases += [("i4", -8, 127), ("i4", -8, -127), ("i4", 7, 127), ("i4", 7, -127)]
    for wfmt, w, x in cases:
        codes = torch.full((n, k), w, dtype=torch.int32)
        qx = torch.full((m, k), x, dtype=torch.int8)
        for isa in _runnable():
            spec = X86Linear(n, k, wfmt, k, 8, 0, False, m, isa)
            y = _call(spec, [act_codes(spec, qx), torch.ones(m, 1), *pack(spec, codes, torch.ones(n, 1))], m)
            assert torch.equal(y, torch.full((m, n), float(w * x * k))), f"{isa} {wfmt} w={w} x={x}"


def test_bad_specs_and_codes_are_rejected():
    with pytest.raises(ValueError, match="ISA"):
        X86Linear(64, 64, "i8", 64, 8, 0, False, 1, "neon")
    with pytest.raises(ValueError, match="no dot-product kernel"):
        X86Linear(64, 64, "u2", 64, 8, 0, False, 1, "avx2")
    with pytest.raises(ValueError, match="multiple of 4"):
        X86Linear(64, 66, "i8", 66, 8, 0, False, 1, "avx2")
    spec = X86Linear(64, 64, "i6", 64, 8, 0, False, 1, "avx2")
    with pytest.raises(ValueError, match=r"\[-32, 31\]"):
        pack(spec, torch.full((64, 64), 40), torch.ones(64, 1))
    for isa in ISAS:
        with pytest.raises(ValueError, match=r"\[-8, 7\]"):
            pack(X86Linear(64, 64, "i4", 64, 8, 0, False, 1, isa), torch.full((64, 64), -9), torch.ones(64, 1))


def test_isa_follows_the_features():
    assert isa_for({"avx2", "fma", "avx512f", "avx512bw", "avx512vnni"}) == "vnni512"
    assert isa_for({"avx2", "avxvnni"}) == "vnni256"
    assert isa_for({"avx2", "fma"}) == "avx2"
    assert isa_for(set()) is None
    assert isa_for(CpuTarget("x86-64", 2).features) is None
    assert isa_for(CpuTarget("sapphirerapids", 2).features) == "vnni512"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("wfmt", ["i8", "i6", "i4"])
def test_every_isa_compiles_for_its_cpu(isa, wfmt):
    """Built (not run) for a CPU that has the ISA, whatever this machine is, with its instructions in the code."""
    spec = X86Linear(64, 128, wfmt, 64, 8, 64, True, None, isa)
    lib = _lib(spec, _MCPU[isa])
    asm = lib.inspect_source("asm") if hasattr(lib, "inspect_source") else lib.mod.inspect_source("asm")
    assert _INSN[isa] in asm


_MLP = torch.nn.Sequential(torch.nn.Linear(256, 200), torch.nn.ReLU(), torch.nn.Linear(200, 96, bias=False))


def compiled_mlp_for(
    monkeypatch, mcpu: str | None, plan: str, isa: str | None
) -> tuple[qcompile.CompiledModule, str | None]:
    """``_MLP`` under ``plan`` for a CPU ``mcpu`` (None: the host), checked against the torch reference
    backend, and the ISA expected (``"host"`` resolved to the host's best); skips an ISA this machine
    cannot run."""
    if isa == "host":
        isa = isa_for(CpuTarget().features)
    if isa is not None and isa not in _runnable():
        pytest.skip(f"this machine cannot run {isa}")
    torch.manual_seed(0)
    model, x = _MLP.eval(), (torch.randn(5, 256),)
    if mcpu is not None:
        monkeypatch.setattr(api, "parse_target", lambda target, arch=None: CpuTarget(mcpu, 2))
    cm = qcompile.compile(model, plan=plan, example_inputs=x)
    ref = qcompile.compile(model, plan=plan, example_inputs=x, backend="torch")
    torch.testing.assert_close(cm(*x), ref(*x), rtol=1e-5, atol=1e-5)
    return cm, isa


@pytest.mark.parametrize(
    ("mcpu", "plan", "isa"),
    [
        (None, "w6a8", "host"),
        (None, "w4a8", "host"),
        ("haswell", "w4a8", "avx2"),
        ("haswell", "w8a8-rtn", "avx2"),
        ("x86-64", "w8a8-rtn", None),
        ("x86-64", "w4a8", None),
    ],
)
def test_backend_dispatches_on_the_target_features(monkeypatch, mcpu, plan, isa):
    """The compiled module picks the kernel the target's features allow (the host's best ISA, AVX2 for
    a Haswell, the generic template for a baseline x86-64), says so in the report, and computes what
    the torch reference does."""
    cm, isa = compiled_mlp_for(monkeypatch, mcpu, plan, isa)
    b = cm.report.backend
    dot = [c for c in b["kernel_choices"].values() if c.get("chosen") in ISAS]
    if isa is None:
        assert not dot and all(name.startswith(("qc_linear", "qc_quant")) for name in b["kernels"])
    else:
        assert len(dot) == 2 and {c["chosen"] for c in dot} == {isa}
        assert all(set(c["features"]) == set(b["target"]["features"]) for c in dot)
        assert sum(name.startswith(f"qc_{isa}_") for name in b["kernels"]) == 2
        assert f"dot-product kernels: {isa} for 2 linear kernels" in cm.report.summary()


@pytest.mark.parametrize("bits", [8, 6])
def test_flipped_activation_codes_are_the_quantizers_plus_128(bits):
    """The quantization kernel the vpdpbusd paths read writes exactly ``code + 128`` (as bytes)."""
    import tvm

    from qcompile.codegen.tvm.kernels.linear import QuantRows, quant_rows_primfunc
    from qcompile.quant.quantizer import quantize_activation_groups

    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(bits)) * 3
    spec = X86Linear(64, 128, "i8", 64, bits, 64, False, 3, "vnni512")
    qr = spec.quant_rows()
    assert qr == QuantRows(128, bits, 64, 3, flip=True) and qr.name != QuantRows(128, bits, 64, 3).name
    lib = tvm.compile(quant_rows_primfunc(qr), target=CpuTarget().tvm)
    q, s = tvm.runtime.tensor(np.zeros((3, 128), "int8")), tvm.runtime.tensor(np.zeros((3, 2), "float32"))
    lib(tvm.runtime.tensor(x.numpy()), q, s)
    codes = quantize_activation_groups(x, bits, 64)[0].reshape(3, 128)
    got = torch.from_numpy(q.numpy()).view(torch.uint8).to(torch.int32)
    assert torch.equal(got, codes.to(torch.int32) + 128)
