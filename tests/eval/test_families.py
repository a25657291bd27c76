"""The decoder-family matrix (qcompile.eval.families): every family transformers ships that fits a
causal-LM export, through the preset families, on both backends.

The fast part runs fp32 on every family and the cells that exercise each family-specific pattern; the
whole matrix (10 families x 7 plans x 2 backends, ~1 h on 2 cores, most of it TVM builds) is marked
slow and is also what ``benchmarks/families.py`` tabulates."""

from __future__ import annotations

import copy

import pytest
import torch

import qcompile
from qcompile.eval.families import FAMILIES, PLANS, family_subject, run_family, run_family_cell, tiny_family

SUBJECTS: dict = {}


def subject(name: str):
    if name not in SUBJECTS:
        SUBJECTS[name] = family_subject(name)
    return SUBJECTS[name]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp32_equals_transformers_and_decode_equals_forward(family):
    cell = run_family_cell(subject(family), "fp32", "torch")
    assert cell.outcome == "ok", cell.detail
    assert cell.error is not None and cell.error <= 1e-4


@pytest.mark.parametrize(
    ("family", "plan", "groups"),
    [
        ("gemma3", "w8a8-smooth", 8),  # (1 + w) norms: norm -> q/k/v and norm -> gate/up are smoothed too
        ("gpt2", "w8a8-smooth", 6),  # LayerNorm + Conv1D + fused c_attn; GELU MLP: no up -> down pair
        ("phi3", "w8a8-smooth", 8),  # fused qkv_proj / gate_up_proj split
    ],
)
def test_smoothquant_finds_each_familys_groups(family, plan, groups):
    s = subject(family)
    cm = qcompile.compile(s.program.copy(), plan=plan, calib=s.calib, backend="torch")
    (smooth,) = [p for p in cm.report.passes if p.name == "smooth_migration"]
    assert smooth.notes["groups"] == groups
    cell = run_family_cell(s, plan, "torch")
    assert cell.outcome in ("ok", "reported"), cell.detail


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "olmo2", "gptneox"])
def test_xcache_rematerializes_through_each_familys_k_path(family):
    """q/k norms per head (Qwen3, Gemma 3) or over the projection (OLMo 2), a fused interleaved projection
    with partial rotary (GPT-NeoX): K and V come back from X exactly as the graph computed them."""
    cell = run_family_cell(subject(family), "xcache-4bit", "torch")
    assert cell.outcome == "ok", cell.detail


def test_unsupported_structure_is_reported_not_crashed():
    # Gemma 2's soft-capped eager attention is no scaled_dot_product_attention: the pass says so
    cell = run_family_cell(subject("gemma2"), "xcache-4bit", "torch")
    assert cell.outcome == "reported" and "found no attention block" in cell.detail
    # OLMo 2 has no pre-norm: SmoothQuant names every linear it could not smooth and why
    cell = run_family_cell(subject("olmo2"), "w8a8-smooth", "torch")
    assert cell.outcome == "reported" and "not smoothed: its input" in cell.detail
    # Gemma's (1 + w) norms now fold: MergeQuant reports nothing left in float
    assert run_family_cell(subject("gemma3"), "w4a4-mergequant", "torch").outcome == "ok"


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_sliding_window_decode_past_the_window_equals_transformers(family):
    """40 tokens through an 8-token window: prefill 12, then decode one by one. The window matters
    (full attention differs), and the compiled cache steps follow it."""
    model = tiny_family(family)
    ids = torch.randint(2, 256, (1, 40), generator=torch.Generator().manual_seed(5))
    cfg = copy.deepcopy(model.config)
    cfg.sliding_window = 4096  # wider than the text: full attention
    full = type(model)(cfg).eval()
    full.load_state_dict(model.state_dict())
    with torch.no_grad():
        want = model(ids).logits
        assert float((full(ids).logits - want).abs().max()) > 1e-2
    cm = qcompile.compile(model, plan="fp32", backend="torch", max_cache_len=64)
    outs = [cm.run_entry("prefill", ids[:, :12], torch.arange(12))]
    outs += [cm.run_entry("decode", ids[:, t : t + 1], torch.tensor([t])) for t in range(12, 40)]
    got = torch.cat(outs, dim=1)
    assert float((got - want[:, 11:]).abs().max() / want.abs().max()) < 1e-5


@pytest.mark.slow
@pytest.mark.tvm
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matrix(family):
    cells = run_family(family, PLANS)
    failed = [(c.plan, c.backend, c.detail) for c in cells if c.outcome == "failed"]
    assert not failed
