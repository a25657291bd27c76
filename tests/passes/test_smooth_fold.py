"""smooth_migration (SmoothQuant/SmoothQuant+), GPTQ through compile, fold_quant_steps (MergeQuant QSM)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import qcompile
from qcompile.errors import DataError, PassError
from qcompile.ir.patterns import find_scale_groups
from qcompile.plan import PRESETS, Granularity, PassConfig, Plan, QuantSpec
from tests.conftest import make_tiny_llama

CALIB = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(7))
IDS = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(8))  # held out from CALIB


@pytest.fixture(scope="module")
def outlier_llama():
    """Tiny Llama with SmoothQuant's problem: a few activation channels far larger than the rest,
    and one massive intermediate (down_proj input) channel."""
    m = make_tiny_llama(layers=2, seed=3)
    with torch.no_grad():
        for layer in m.model.layers:
            layer.input_layernorm.weight[[3, 17]] = 25.0
            layer.post_attention_layernorm.weight[9] = 30.0
            layer.mlp.up_proj.weight[5] *= 40
    return m


_CAPTURED: dict[int, object] = {}


def _compile(model, plan, entries=("forward",), calib=CALIB):
    """Compile from one shared capture of the forward entry (capture dominates a tiny model's compile time)."""
    if entries != ("forward",):
        return qcompile.compile(model, plan=plan, calib=calib, max_cache_len=64, lm_entries=entries)
    if id(model) not in _CAPTURED:
        _CAPTURED[id(model)] = (model, qcompile.capture(model, max_cache_len=64, lm_entries=entries))
    return qcompile.compile(_CAPTURED[id(model)][1].copy(), plan=plan, calib=calib)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_scale_groups_are_found_by_graph_matching(tiny_llama_program):
    groups = find_scale_groups(tiny_llama_program, value_out=True, up_down=True)
    kinds = sorted((g.producer, len(g.linears)) for g in groups)
    # per layer: norm->q/k/v, norm->gate/up, v->o, up->down
    assert kinds == sorted([("norm", 3), ("norm", 2), ("linear", 1), ("linear", 1)] * 2)
    vo = next(g for g in groups if g.paths[0].endswith("o_proj"))
    assert vo.channel_map is not None and len(vo.channel_map) == 64  # 4 query heads share 2 V heads


@pytest.mark.parametrize("alpha", [0.5, "search"])
def test_smoothing_without_quantization_keeps_the_function(outlier_llama, alpha):
    plan = Plan(name="smooth-only", passes=(PassConfig("smooth_migration", (("alpha", alpha), ("value_out", True))),))
    cm = _compile(outlier_llama, plan, entries=("forward", "prefill", "decode") if alpha == 0.5 else ("forward",))
    with torch.no_grad():
        ref = outlier_llama(IDS).logits
    assert _rel(cm(IDS), ref) <= 1e-4
    if alpha == 0.5:
        assert cm.report.passes[0].modified and cm.report.passes[0].notes["groups"] == 6
        # the cache entries see the same rescaled weights: greedy decoding is unchanged too
        ref_tokens = outlier_llama.generate(IDS[:, :8], max_new_tokens=12, do_sample=False)
        assert torch.equal(cm.generate(IDS[:, :8], max_new_tokens=12), ref_tokens)


def test_alpha_none_is_plain_rtn(outlier_llama):
    """The issue's "α = 0 equals plain RTN": with s_j = max|X_j|^α / max|W_j|^(1−α), α = 0 gives
    s_j = 1/max|W_j|, not 1. The identity (s ≡ 1) is ``alpha: none``, also a candidate of the search."""
    smooth = dataclasses.replace(
        PRESETS["w8a8-smooth"],
        passes=(PassConfig("smooth_migration", (("alpha", "none"),)), PassConfig("quantize_weights")),
    )
    a, b = _compile(outlier_llama, smooth), _compile(outlier_llama, "w8a8-rtn")
    assert torch.equal(a(IDS), b(IDS))
    assert not a.report.passes[0].modified


def test_smoothing_reduces_w8a8_error_on_outlier_activations(outlier_llama):
    with torch.no_grad():
        ref = outlier_llama(IDS).logits
    err = {
        p: float((_compile(outlier_llama, p)(IDS) - ref).pow(2).mean())
        for p in ("w8a8-rtn", "w8a8-smooth", "w8a8-smoothquant+")
    }
    assert err["w8a8-smooth"] < err["w8a8-rtn"] and err["w8a8-smoothquant+"] < err["w8a8-rtn"]


def test_gptq_beats_rtn_at_w4_through_compile(outlier_llama):
    with torch.no_grad():
        ref = outlier_llama(IDS).logits
    err = {
        p: float((_compile(outlier_llama, p)(IDS) - ref).pow(2).mean()) for p in ("w4a16-rtn-g128", "w4a16-gptq-g128")
    }
    assert err["w4a16-gptq-g128"] < err["w4a16-rtn-g128"]


def _count(cm, *names: str) -> int:
    return sum(
        1
        for e in cm.program.entries.values()
        for n in e.graph.graph.nodes
        if n.op == "call_function" and any(str(n.target).startswith(f"qcompile.{x}") for x in names)
    )


def test_folded_steps_equal_the_unfolded_static_graph(outlier_llama):
    folded_plan = PRESETS["w4a4-mergequant"]
    unfolded_plan = dataclasses.replace(folded_plan, passes=(PassConfig("fold_quant_steps", (("fold", False),)),))
    folded, unfolded = _compile(outlier_llama, folded_plan), _compile(outlier_llama, unfolded_plan)
    a, b = folded(IDS), unfolded(IDS)
    assert _rel(a, b) <= 1e-4  # float rounding only (x/Δ inside the norm vs before rounding)
    # no quantize/dequantize op left after folding; the unfolded graph has one pair per linear
    n_linear = 7 * 2 * len(folded.program.entries)
    assert _count(folded, "quantize_static", "dequantize_static") == 0
    assert _count(folded, "linear_static") == n_linear
    assert _count(unfolded, "quantize_static") == _count(unfolded, "dequantize_static") == n_linear
    notes = folded.report.passes[0].notes
    assert notes["split_channels"], "the massive up_proj channel should have been split"
    assert all(0 < v["clip"] <= 1 for v in notes["groups"].values())


def test_mergequant_beats_static_per_tensor(outlier_llama):
    with torch.no_grad():
        ref = outlier_llama(IDS).logits
    err = {
        p: float((_compile(outlier_llama, p)(IDS) - ref).pow(2).mean())
        for p in ("w4a4-static-per-tensor", "w4a4-mergequant")
    }
    assert err["w4a4-mergequant"] < err["w4a4-static-per-tensor"]


def test_folded_artifact_round_trip(outlier_llama, tmp_path):
    cm = _compile(outlier_llama, "w8a8-mergequant")
    cm.save(tmp_path / "a")
    assert torch.equal(qcompile.load(tmp_path / "a")(IDS), cm(IDS))


def test_bad_calibration_and_plans(outlier_llama):
    with pytest.raises(PassError, match=r"calibration data has 10 tokens; at least 64 are needed"):
        _compile(outlier_llama, "w8a8-smooth", calib=torch.arange(10))
    with pytest.raises(PassError, match=r"smooth_migration needs calibration data"):
        _compile(outlier_llama, "w8a8-smooth", calib=None)
    broken = make_tiny_llama(layers=2, seed=3)
    with torch.no_grad():
        broken.model.layers[1].post_attention_layernorm.weight[2] = torch.finfo(torch.float32).max  # overflows
    with pytest.raises(PassError, match=r"entering layer 'model.layers.1.mlp.gate_proj' contain NaN or Inf") as e:
        _compile(broken, "w4a4-mergequant")
    assert isinstance(e.value.__cause__, DataError)
    g48 = dataclasses.replace(PRESETS["w4a4-mergequant"], weight=QuantSpec(4, Granularity.PER_GROUP, group_size=48))
    with pytest.raises(PassError, match="group_size 48 does not divide its 64 input channels"):
        _compile(outlier_llama, g48)
    with pytest.raises(qcompile.PlanError, match=r"alpha must be in \[0, 1\], got 1.5"):
        qcompile.compile(
            outlier_llama, plan=Plan(name="x", passes=(PassConfig("smooth_migration", (("alpha", 1.5),)),))
        )
