"""The bf16 W4A16 kernels (qcompile/codegen/tvm/kernels/x86_bf16.py): the activation rounding bit for
bit against torch's ``to(torch.bfloat16)`` (NaN, ±Inf, denormals, ties included), the weight layout
against a plain decode, the linear kernel against a float64 oracle within fp32 summation error (on a
CPU with AVX-512 BF16; compile-only elsewhere), and the backend's rule: which linears it takes, what it
reports where it cannot, and the model's outputs against fp32."""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcompile
import qcompile.api as api
from qcompile.codegen.target import CpuTarget
from qcompile.codegen.tvm.kernels.x86_bf16 import (
    NBX,
    NEEDS,
    Bf16Linear,
    Bf16Rows,
    bf16_linear_primfunc,
    bf16_rows_primfunc,
    has_bf16_dot,
    pack_groups,
    pack_weight,
    reference,
)
from qcompile.errors import PlanError
from qcompile.plan import Plan, get_plan

pytestmark = pytest.mark.tvm

_BF16_CPU = "sapphirerapids"  # a CPU with AVX-512 BF16, for builds this machine need not run


@functools.cache
def _host_has_bf16() -> bool:
    return has_bf16_dot(CpuTarget().features)


needs_bf16 = pytest.mark.skipif(not _host_has_bf16(), reason=f"this CPU lacks one of {NEEDS}")


@functools.cache
def _lib(spec: object, mcpu: str | None = None):
    import tvm

    target = CpuTarget(mcpu, 2).tvm if mcpu else CpuTarget().tvm
    f = bf16_rows_primfunc(spec) if isinstance(spec, Bf16Rows) else bf16_linear_primfunc(spec)
    return tvm.compile(f, target=target)


def _rows(spec: Bf16Rows, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    import tvm

    m = x.shape[0]
    xb = tvm.runtime.tensor(np.zeros((m, spec.k), np.uint16))
    xs = tvm.runtime.tensor(np.zeros((m, spec.groups), np.float32))
    _lib(spec)(tvm.runtime.tensor(x.numpy()), xb, xs)
    return xb.numpy(), xs.numpy()


def _bits(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _same_bf16(got: np.ndarray, x: torch.Tensor) -> bool:
    """Bit for bit torch's rounding, except that a NaN only has to stay a NaN (torch's own NaN pattern
    differs between its scalar and vector paths: 0x7FC0 or 0xFFFF)."""
    want = _bits(x)
    nan = ((want & 0x7F80) == 0x7F80) & ((want & 0x7F) != 0)
    got_nan = ((got & 0x7F80) == 0x7F80) & ((got & 0x7F) != 0)
    return bool(np.array_equal(got[~nan], want[~nan]) and np.array_equal(nan, got_nan))


def test_activation_rounding_is_torchs_bit_for_bit():
    """Round to nearest even (ties both ways), NaN of any payload or sign stays NaN, ±Inf and values
    that round up to Inf, denormals and signed zeros."""
    special = torch.tensor(
        [0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, math.nan, 3.4e38, -3.4e38, 1e-40, -1e-40, 1e-45, 65504.0]
    )
    raw = np.array(
        [
            0x3F808000,  # 1 + 2^-8: a tie, rounds down to even
            0x3F818000,  # a tie that rounds up to even
            0x3F808001,  # just above a tie
            0x7F800001,  # a signalling NaN with a low payload (naive rounding makes it Inf)
            0xFFC12345,  # a negative NaN
            0x7F7FFFFF,  # the largest float: rounds to Inf
        ],
        dtype=np.uint32,
    ).view(np.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([special, torch.from_numpy(raw.copy()), torch.randn(64 - 19, generator=g) * 100]).reshape(2, 32)
    spec = Bf16Rows(32, 16, None)
    xb, xs = _rows(spec, x)
    assert _same_bf16(xb, x)
    # the sums are of the rounded values; a NaN or an Inf in a group makes its sum NaN/Inf, never a number
    ref = x.to(torch.bfloat16).float().reshape(2, 2, 16).double().sum(-1).numpy()
    assert np.array_equal(np.isnan(xs), np.isnan(ref)) and np.array_equal(np.isinf(xs), np.isinf(ref))
    finite = np.isfinite(ref)
    assert np.allclose(xs[finite], ref[finite], rtol=1e-6, atol=1e-30)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(m=st.integers(1, 9), groups=st.integers(1, 3), group=st.sampled_from([16, 32]), seed=st.integers(0, 9))
def test_activation_sums_follow_the_rounded_values(m, groups, group, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, groups * group, generator=g) * 10
    spec = Bf16Rows(groups * group, group, m)
    xb, xs = _rows(spec, x)
    assert _same_bf16(xb, x)
    ref = x.to(torch.bfloat16).double().reshape(m, groups, group).sum(-1).numpy()
    bound = 1e-6 * group * x.abs().max().item()
    assert np.abs(xs - ref).max() <= bound


def _rows_fused(spec: Bf16Rows, x: torch.Tensor, second: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    import tvm

    m = x.shape[0]
    xb = tvm.runtime.tensor(np.zeros((m, spec.k), np.uint16))
    xs = tvm.runtime.tensor(np.zeros((m, spec.groups), np.float32))
    _lib(spec)(tvm.runtime.tensor(x.numpy()), tvm.runtime.tensor(second.numpy()), xb, xs)
    return xb.numpy(), xs.numpy()


def _within_one_bf16_step(got: np.ndarray, want: torch.Tensor) -> bool:
    """The fused producer's value is torch's to fp32 rounding (its own summation order), so its bf16
    rounding may land one step away, never more."""
    g = torch.from_numpy(got.view(np.int16)).view(torch.bfloat16).float()
    w = want.to(torch.bfloat16).float()
    step = w.abs() * 2**-7 + 1e-30
    return bool(((g - w).abs() <= step).all())


@pytest.mark.parametrize("valid", [96, 80])
def test_rounding_kernel_computes_a_fused_rmsnorm(valid):
    """The RMSNorm only quantized linears read is computed inside the rounding kernel (torch's order:
    ``(x·rsqrt(mean(x²) + eps))·w``), the mean over the unpadded ``valid`` inputs."""
    g = torch.Generator().manual_seed(valid)
    x = torch.nn.functional.pad(torch.randn(5, valid, generator=g) * 4, (0, 96 - valid))
    w = torch.nn.functional.pad(torch.randn(valid, generator=g), (0, 96 - valid))
    spec = Bf16Rows(96, 32, 5, norm=True, eps=1e-5, valid=0 if valid == 96 else valid)
    xb, xs = _rows_fused(spec, x, w)
    want = x * torch.rsqrt(x[:, :valid].pow(2).mean(-1, keepdim=True) + 1e-5) * w
    assert _within_one_bf16_step(xb, want)
    rounded = torch.from_numpy(xb.view(np.int16)).view(torch.bfloat16).double()
    assert np.allclose(xs, rounded.reshape(5, 3, 32).sum(-1).numpy(), rtol=1e-5, atol=1e-5)


def test_rounding_kernel_computes_a_fused_swiglu_product():
    g = torch.Generator().manual_seed(3)
    gate, up = torch.randn(4, 64, generator=g) * 3, torch.randn(4, 64, generator=g)
    xb, _ = _rows_fused(Bf16Rows(64, 32, None, silu_gate=True), gate, up)
    assert _within_one_bf16_step(xb, torch.nn.functional.silu(gate) * up)
    with pytest.raises(ValueError, match="one producer"):
        Bf16Rows(64, 32, None, norm=True, silu_gate=True)


def _unpack(spec: Bf16Linear, words: torch.Tensor) -> torch.Tensor:
    """The codes back from the packed words, read the way the docstring states the layout."""
    w = words.to(torch.int32)
    u = torch.zeros(spec.n, spec.k, dtype=torch.int32)
    for b in range(spec.n // NBX):
        for p in range(spec.k // 2):
            for word in range(32):
                for j in range(4):
                    u[NBX * b + 16 * j + word // 2, 2 * p + word % 2] = (w[b, p, word] >> (4 * j)) & 15
    return u


def test_weight_layout_holds_every_code_where_the_docstring_says():
    spec = Bf16Linear(128, 8, 4, False, 1)
    u = torch.randint(0, 16, (100, 8), generator=torch.Generator().manual_seed(1))
    words = pack_weight(spec, u)
    assert words.shape == spec.weight_shape() and words.dtype == torch.uint16
    back = _unpack(spec, words)
    assert torch.equal(back[:100], u) and not back[100:].any()  # padded outputs hold code 0
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_weight(spec, u - 1)


def test_shapes_the_kernel_cannot_take_are_refused():
    with pytest.raises(ValueError, match="even group"):
        Bf16Linear(64, 30, 15, False, 1)
    with pytest.raises(ValueError, match="multiple of 64"):
        Bf16Linear(96, 32, 32, False, 1)


def _linear_case(spec: Bf16Linear, m: int, seed: int, scale_x: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, spec.k, generator=g) * scale_x
    u = torch.randint(0, 16, (spec.n, spec.k), generator=g)
    sc = torch.rand(spec.n, spec.groups, generator=g) + 0.01
    ct = torch.randn(spec.n, spec.groups, generator=g)
    b = torch.randn(spec.n, generator=g) if spec.bias else None
    r = torch.randn(m, spec.n, generator=g) if spec.residual else None
    return x, u, sc, ct, b, r


def _run_linear(spec: Bf16Linear, x, u, sc, ct, b, r) -> np.ndarray:
    import tvm

    m = x.shape[0]
    xb, xs = _rows(spec.rows(), x)
    args = [xb, xs, pack_weight(spec, u).numpy(), pack_groups(spec, sc).numpy(), pack_groups(spec, ct).numpy()]
    args += [t.numpy() for t in (b, r) if t is not None]
    y = tvm.runtime.tensor(np.zeros((m, spec.n), np.float32))
    _lib(spec)(*[tvm.runtime.tensor(a) for a in args], y)
    return y.numpy()


def _bound(spec: Bf16Linear, x, u, sc, ct, b, r) -> float:
    """fp32 summation error of the kernel's order: a few ulps of the largest partial sums (|x|·|w| summed)."""
    mag = x.to(torch.bfloat16).double().abs() @ (u.double() * sc.repeat_interleave(spec.group, 1).double()).T
    mag = mag + x.abs().double().reshape(x.shape[0], spec.groups, spec.group).sum(-1) @ ct.abs().double().T
    extra = (b.abs().max().item() if b is not None else 0) + (r.abs().max().item() if r is not None else 0)
    return 2**-20 * (mag.max().item() + extra) * max(spec.group, 8)


@needs_bf16
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.sampled_from([1, 2, 5, 6, 7, 13]),
    n=st.sampled_from([64, 128]),
    groups=st.integers(1, 3),
    group=st.sampled_from([2, 32, 64]),
    bias=st.booleans(),
    residual=st.booleans(),
    dynamic=st.booleans(),
    seed=st.integers(0, 99),
)
def test_bf16_kernel_matches_the_float64_oracle(m, n, groups, group, bias, residual, dynamic, seed):
    """Every row tile path (6 rows, 3, single rows), groups down to one K pair, bias and fused residual,
    static and dynamic row counts: within fp32 summation error of the oracle on the rounded activations."""
    spec = Bf16Linear(n, groups * group, group, bias, None if dynamic else m, residual)
    case = _linear_case(spec, m, seed)
    y = _run_linear(spec, *case)
    ref = reference(spec, *case).numpy()
    assert np.abs(y - ref).max() <= _bound(spec, *case)


@needs_bf16
def test_bf16_kernel_uses_every_code_and_keeps_nan():
    """Codes 0 and 15 at every position of a word, and a NaN activation reaches its row's outputs only."""
    spec = Bf16Linear(64, 64, 32, False, 3)
    x, u, sc, ct, _, _ = _linear_case(spec, 3, 5)
    u = torch.where(torch.rand(u.shape, generator=torch.Generator().manual_seed(2)) < 0.5, 0, 15)
    y = _run_linear(spec, x, u, sc, ct, None, None)
    assert np.abs(y - reference(spec, x, u, sc, ct).numpy()).max() <= _bound(spec, x, u, sc, ct, None, None)
    x[1, 7] = math.nan
    y = _run_linear(spec, x, u, sc, ct, None, None)
    assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()


def test_bf16_kernel_compiles_for_a_bf16_cpu_from_any_machine():
    """LLVM targets AVX-512 BF16 from any host: the kernel's code is checked on AVX2-only CI too."""
    spec = Bf16Linear(128, 64, 32, True, None, True)
    lib = _lib(spec, _BF16_CPU)
    asm = lib.inspect_source("asm") if hasattr(lib, "inspect_source") else lib.mod.inspect_source("asm")
    assert "vdpbf16ps" in asm and "vpermw" in asm
    assert not any("call" in ln and "qc_dpbf16ps" in ln for ln in asm.splitlines())  # inlined, not called


# ---- the plan setting and the backend's rule ----------------------------------------------------------


def test_float_compute_is_a_checked_plan_field():
    p = dataclasses.replace(get_plan("w4a16-rtn-g32-asym"), float_compute="bf16")
    assert p.float_compute.value == "bf16" and Plan.from_dict(p.to_dict()) == p
    with pytest.raises(PlanError, match=r"float_compute.*'fp16'.*\['fp32', 'bf16'\]"):
        Plan.from_dict({**p.to_dict(), "float_compute": "fp16"})


IDS = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))


def _bf16_plan(name: str) -> Plan:
    return dataclasses.replace(get_plan(name), float_compute="bf16", name=f"{name}+bf16")


@needs_bf16
@pytest.mark.parametrize("preset", ["w4a16-rtn-g32-asym", "w4a16-rtn-g128"])
def test_bf16_plan_runs_every_w4_linear_on_the_bf16_kernel(tiny_llama, preset):
    """The 7 linears of every layer in every entry take the bf16 kernel (o_proj and down_proj with the
    residual in their epilogue); logits stay within bf16 rounding of the fp32 build's."""
    cm = qcompile.compile(tiny_llama, plan=_bf16_plan(preset), max_cache_len=64)
    fp32 = qcompile.compile(tiny_llama, plan=preset, max_cache_len=64)
    info = cm.report.backend
    layers = cm.program.meta["config"]["num_hidden_layers"]
    fc = info["float_compute"]
    assert fc["requested"] == "bf16" and not fc["fp32"], fc
    assert len(fc["linears"]) == 7 * layers * len(cm.program.entries)
    assert all(v["chosen"] == "avx512bf16" for k, v in info["kernel_choices"].items() if k.startswith("qc_bf16_u4"))
    decode = info["kernels"]
    assert sum(c for k, c in decode.items() if k.startswith("qc_bf16_u4") and k.endswith("_r_m1")) == 2 * layers
    # q/k/v share one rounding of their input, gate/up another: 4 per layer per entry (o_proj, down_proj their own);
    # the two RMSNorms and down_proj's SwiGLU product are computed inside theirs
    rows = {k: c for k, c in decode.items() if k.startswith("qc_bf16rows") and k.endswith("_m1")}
    assert sum(rows.values()) == 4 * layers
    assert sum(c for k, c in rows.items() if "_rms" in k) == 2 * layers
    assert sum(c for k, c in rows.items() if "_silu" in k) == layers
    a, b = cm(IDS), fp32(IDS)
    assert float((a - b).abs().max() / b.abs().max()) < 2e-2
    assert not [w for w in cm.report.warnings if "float_compute" in w]


def test_bf16_plan_on_a_cpu_without_it_runs_fp32_and_says_which_linears(tiny_llama, monkeypatch):
    """Built for Haswell (no AVX-512 BF16; it runs on this machine): every W4 linear is on the fp32
    template, and the report's warning names them and the missing features."""
    monkeypatch.setattr(api, "parse_target", lambda target, arch=None: CpuTarget("haswell", 2))
    cm = qcompile.compile(tiny_llama, plan=_bf16_plan("w4a16-rtn-g32-asym"), max_cache_len=64)
    fc = cm.report.backend["float_compute"]
    assert not fc["linears"] and fc["fp32"] and all("lacks avx512f" in w for w in fc["fp32"])
    assert any(w.startswith("float_compute bf16:") and "lacks" in w for w in cm.report.warnings)
    ref = qcompile.compile(tiny_llama, plan="w4a16-rtn-g32-asym", backend="torch", max_cache_len=64)
    assert float((cm(IDS) - ref(IDS)).abs().max() / ref(IDS).abs().max()) < 1e-4  # fp32: the reference's numbers


def test_bf16_plan_on_the_torch_backend_says_it_computes_fp32(tiny_llama):
    cm = qcompile.compile(tiny_llama, plan=_bf16_plan("w4a16-rtn-g32-asym"), backend="torch", max_cache_len=64)
    assert any("torch backend computes every float linear in fp32" in w for w in cm.report.warnings)


@needs_bf16
def test_every_schedule_of_the_design_space_computes_the_same_bits():
    """The tuner's knobs (tile height, rows per task, when to split rows) reorder whole rows, never a
    row's sums: each candidate's output equals the default's bit for bit."""
    import tvm

    from qcompile.codegen.tvm.kernels.tunable import Bf16Tunable

    spec = Bf16Linear(128, 96, 32, True, None, True)
    t = Bf16Tunable(spec)
    names = [k.name for k in t.knobs()]
    assert names == ["rows", "chunk", "split_below"]
    case = _linear_case(spec, 11, 3)
    want = _run_linear(spec, *case)
    xb, xs = _rows(spec.rows(), case[0])
    x, u, sc, ct, b, r = case
    args = [xb, xs, pack_weight(spec, u).numpy(), pack_groups(spec, sc).numpy(), pack_groups(spec, ct).numpy()]
    args += [b.numpy(), r.numpy()]
    for choice in ({"rows": 1}, {"rows": 4, "chunk": 8, "split_below": 64}, {"rows": 5, "split_below": 0}):
        lib = tvm.compile(t.build(choice), target=CpuTarget().tvm)
        y = tvm.runtime.tensor(np.zeros((11, spec.n), np.float32))
        lib(*[tvm.runtime.tensor(a) for a in args], y)
        assert np.array_equal(y.numpy(), want), choice
    assert Bf16Tunable(dataclasses.replace(spec, m=1)).knobs()[0].values == (6,)  # one row: nothing to tile


@needs_bf16
def test_a_bf16_artifact_loads_and_computes_the_same(tiny_llama, tmp_path):
    """The imported vdpbf16ps function ships inside module.so: the loaded artifact gives the same logits,
    and its target records avx512bf16 (a CPU without it is refused at load, like any missing feature)."""
    cm = qcompile.compile(tiny_llama, plan=_bf16_plan("w4a16-rtn-g32-asym"), max_cache_len=64)
    cm.save(tmp_path / "a")
    back = qcompile.load(tmp_path / "a")
    assert back.backend == "tvm" and "avx512bf16" in back.report.backend["target"]["features"]
    assert back.report.backend["float_compute"]["linears"] == cm.report.backend["float_compute"]["linears"]
    assert torch.equal(back(IDS), cm(IDS))


@needs_bf16
def test_tuning_measures_and_applies_the_bf16_kernels(tiny_llama, tmp_path):
    """``qcompile.tune`` under a bf16 plan extracts the bf16 kernels (their uint16 inputs measured by
    MetaSchedule's runner) and a compile with the database applies a record to each."""
    plan = get_plan("w4a16-rtn-g32-asym").with_float_compute("bf16")
    rep = qcompile.tune(tiny_llama, plan=plan, db=tmp_path / "db", trials=1, max_cache_len=32, progress=False)
    tuned = [k for k in rep.kernels if k.name.startswith("qc_bf16_u4")]
    assert len(tuned) == 8 and all(k.best is not None for k in tuned)  # 4 shapes, decode (m1) and dynamic rows
    cm = qcompile.compile(tiny_llama, plan=plan, max_cache_len=32, tuning_db=tmp_path / "db")
    used = cm.report.backend["tuning"]["kernels"]
    assert all(used[k.name]["tuned"] for k in tuned)
