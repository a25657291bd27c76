"""kv_to_xcache (XQuant): exact rewrite without quantization, forward = decode, accounting, errors, ops."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qcompile
from qcompile.errors import PassError, PlanError
from qcompile.plan import PassConfig, Plan
from qcompile.quant.spec import BITS

MAX_LEN = 72


def _plan(**opts) -> Plan:
    return Plan(name="xq-test", passes=(PassConfig("kv_to_xcache", tuple(opts.items())),))


def _calib() -> torch.Tensor:
    return torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))


_COMPILED: dict = {}
_CAPTURED: dict = {}


def _program(model):
    """One capture per model (torch.export is the slow part); each compile rewrites a copy."""
    if id(model) not in _CAPTURED:
        _CAPTURED[id(model)] = qcompile.capture(model, max_cache_len=MAX_LEN)
    return _CAPTURED[id(model)].copy()


def _compiled(model, **opts):
    key = tuple(sorted(opts.items()))
    if key not in _COMPILED:
        _COMPILED[key] = qcompile.compile(_program(model), plan=_plan(**opts), calib=_calib())
    return _COMPILED[key]


@pytest.fixture(scope="module")
def kv_model(tiny_llama):
    return qcompile.compile(_program(tiny_llama), plan="fp32", backend="torch")


def _prompt() -> torch.Tensor:
    return torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))


def _step_logits(cm, tokens: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits of prefill(prompt) (its last position) then decode for every later token (what generate
    computes): positions ``prompt_len - 1`` onwards."""
    cm.reset_cache()
    outs = [cm.run_entry("prefill", tokens[:, :prompt_len], torch.arange(prompt_len))]
    for t in range(prompt_len, tokens.shape[1]):
        outs.append(cm.run_entry("decode", tokens[:, t : t + 1], torch.tensor([t])))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("mode", ["x", "latent", "cl-residual"])
def test_unquantized_rewrite_matches_kv_cache_model(tiny_llama, kv_model, mode):
    opts = dict(mode="x", cross_layer=True, cl_space="residual") if mode == "cl-residual" else dict(mode=mode)
    cm = _compiled(tiny_llama, bits=0, **opts)
    assert not any(k.startswith(("key_cache", "value_cache")) for k in cm.program.cache_specs)
    assert any(k.startswith("xcache.") for k in cm.program.cache_specs)
    ids = _prompt()
    if "kv" not in _COMPILED:  # the KV-cache model's tokens and logits, computed once
        tokens = kv_model.generate(ids, 64, eos_token_id=[])
        _COMPILED["kv"] = (tokens, _step_logits(kv_model, tokens, 8), kv_model(tokens))
    want, ref, fwd_ref = _COMPILED["kv"]
    got = cm.generate(ids, 64, eos_token_id=[])
    assert torch.equal(got, want)  # same 64 greedy tokens
    out = _step_logits(cm, want, 8)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    fwd = cm(want)
    assert (fwd - fwd_ref).abs().max() <= 1e-4 * fwd_ref.abs().max()


@pytest.mark.parametrize(
    "opts",
    [
        dict(mode="x", bits=4, group_size=16, symmetric=False),
        dict(mode="latent", bits=3, group_size=16),
        dict(mode="x", bits=2, group_size=16, symmetric=False, cross_layer=True),
        dict(mode="x", bits=3, group_size=16, cross_layer=True, cl_space="residual"),
        dict(mode="kv", bits=4, group_size=8, symmetric=False),  # K per-channel (calibrated), V per-token
        dict(mode="latent", bits=4, granularity="per_channel", symmetric=False),
    ],
    ids=["x4", "latent3", "cl2", "clr3", "kv4", "latent4-pc"],
)
def test_forward_matches_token_by_token_decoding(tiny_llama, opts):
    """Perplexity's forward entry sees exactly the quantized cache that prefill/decode read back."""
    cm = _compiled(tiny_llama, **opts)
    text = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(7))
    steps = _step_logits(cm, text, 5)
    fwd = cm(text)
    # equal up to float summation order (a code can flip at a rounding tie only in rare cases)
    assert (steps - fwd[:, 4:]).abs().max() <= 1e-3 * fwd.abs().max()
    assert cm.generate(text[:, :6], 8, eos_token_id=[]).shape == (1, 14)


def test_quantized_cache_changes_logits_and_cl_drift_is_bounded(tiny_llama, kv_model):
    text = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(5))
    ref = kv_model(text)
    err = {}
    for name, opts in {
        "x8": dict(mode="x", bits=8, group_size=16),
        "x2": dict(mode="x", bits=2, group_size=16),
        "cl8": dict(mode="x", bits=8, group_size=16, cross_layer=True),
    }.items():
        err[name] = float((_compiled(tiny_llama, **opts)(text) - ref).abs().max() / ref.abs().max())
    assert 0 < err["x8"] < err["x2"]
    assert err["cl8"] < 10 * err["x8"] + 1e-3  # closed-loop differences: CL error stays at the per-layer level


def test_cache_accounting(tiny_llama):
    # tiny Llama: 2 layers, hidden 64, K and V 2 heads x 16 = 32 each -> fp16 KV = 2 x (32 + 32) x 2 B = 256 B/token
    cm = _compiled(tiny_llama, mode="x", bits=4, group_size=16, symmetric=False)
    prog = cm.program
    # per layer: 64 codes x 4 bit = 32 B, 4 groups x (fp16 scale + fp16 offset) = 16 B
    assert prog.cache_bytes_per_token() == 2 * (32 + 16)
    assert prog.fp16_kv_bytes_per_token() == 256
    notes = cm.report.passes[-1].notes
    assert notes["saving_vs_fp16_kv"] == pytest.approx(256 / 96, abs=1e-3)
    assert notes["mode"] == "x" and "Q(X)" in notes["cached_per_layer"]
    assert prog.cache_specs["xcache.0.x.codes"] == ((1, MAX_LEN, 64), "uint8")
    assert prog.cache_specs["xcache.0.x.scale"] == ((1, MAX_LEN, 4), "float16")
    # static per-channel scales cost nothing per token; kv mode: K codes only, V codes + scales
    kv = _compiled(tiny_llama, mode="kv", bits=4, group_size=8, symmetric=False).program
    assert kv.cache_bytes_per_token() == 2 * (32 * 4 // 8 + 32 * 4 // 8 + 4 * 2 * 2)  # V: 4 groups x (scale + offset)
    # auto picks X when K+V is not narrower than X (tiny: 32 + 32 = 64)
    assert _compiled(tiny_llama, mode="auto", bits=0).program.meta["xcache"]["mode"] == "x"


def test_save_load_roundtrip(tiny_llama, tmp_path):
    cm = _compiled(tiny_llama, mode="latent", bits=4, group_size=16)
    ids = _prompt()
    want = cm.generate(ids, 12, eos_token_id=[])
    cm.save(tmp_path / "a")
    back = qcompile.load(tmp_path / "a")
    assert torch.equal(back.generate(ids, 12, eos_token_id=[]), want)
    assert back.program.cache_bytes_per_token() == cm.program.cache_bytes_per_token()


def test_bad_options_are_plan_errors(tiny_llama):
    with pytest.raises(PlanError, match="cache bits"):
        qcompile.compile(_program(tiny_llama), plan=_plan(bits=9))
    with pytest.raises(PlanError, match="mode"):
        qcompile.compile(_program(tiny_llama), plan=_plan(mode="kq"))
    with pytest.raises(PlanError, match="cross_layer"):
        qcompile.compile(_program(tiny_llama), plan=_plan(mode="latent", cross_layer=True))
    with pytest.raises((PlanError, PassError), match=r"group_size 48 does not divide the 64 channels"):
        qcompile.compile(_program(tiny_llama), plan=_plan(mode="x", bits=4, group_size=48))
    with pytest.raises((PlanError, PassError), match="calib"):
        qcompile.compile(_program(tiny_llama), plan=_plan(mode="kv", bits=4, group_size=8))


def test_no_attention_block_is_a_clear_error():
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    with pytest.raises(PassError, match="found no attention block.*expected an attention block: a normed activation X"):
        qcompile.compile(mlp, plan=_plan(bits=4, group_size=16), example_inputs=(torch.randn(2, 16),))


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    groups=st.integers(1, 4),
    gs=st.sampled_from([4, 8, 16]),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
    scale=st.floats(1e-2, 1e2),
)
def test_cache_quant_ops_error_bound(bits, groups, gs, symmetric, seed, scale):
    x = torch.randn(3, groups * gs, generator=torch.Generator().manual_seed(seed)) * scale
    codes, s, off = torch.ops.qcompile.cache_quantize(x, bits, gs, symmetric)
    assert s.dtype == torch.float16 and s.shape == (3, groups)
    lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert int(codes.min()) >= lo and int(codes.max()) <= hi
    y = torch.ops.qcompile.cache_dequantize(codes, s, None if symmetric else off, gs)
    # float64 oracle: q * s (+ m) reproduces y exactly, and the rounding error is at most half a step
    ref = codes.double().view(3, groups, gs) * s.double()[..., None] + (0 if symmetric else off.double()[..., None])
    assert torch.allclose(y.double(), ref.view(3, -1), rtol=1e-6, atol=0)
    step = s.double().repeat_interleave(gs, dim=1)
    # half a step, plus what rounding the scale (and offset) to float16 can add: 2^-9 of the group's |x| max
    amax = x.double().abs().view(3, groups, gs).amax(-1).repeat_interleave(gs, dim=1)
    assert ((y.double() - x.double()).abs() <= 0.5 * step + 2**-9 * amax).all()


@pytest.mark.slow
def test_smollm2_latent_rewrite_is_exact(smollm2):
    """SmolLM2-135M (GQA 9/3 heads): auto picks the latent cache; unquantized it generates the KV model's tokens."""
    ids = smollm2.tokenizer("The king said", return_tensors="pt").input_ids
    ref = qcompile.compile(smollm2.model, plan="fp32", max_cache_len=48, lm_entries=("prefill", "decode"))
    cm = qcompile.compile(smollm2.model, plan=_plan(bits=0), max_cache_len=48, lm_entries=("prefill", "decode"))
    assert cm.program.meta["xcache"]["mode"] == "latent"
    assert torch.equal(cm.generate(ids, 24, eos_token_id=[]), ref.generate(ids, 24, eos_token_id=[]))
