"""Passes composed: the composition matrix (every ordered pair of passes, and the presets' longer
sequences, on a tiny Llama and a tiny CNN) and the matching of quantized forms it relies on."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import qcompile
from qcompile import PassConfig, PassError, PlanError
from qcompile.eval.composition import (
    PASS_NAMES,
    Matrix,
    base_plan,
    cnn_subject,
    llama_subject,
    sequences,
    short_reason,
)
from qcompile.ir.patterns import find_cache_attention, linear_form, projection_weight
from qcompile.ir.program import PATH_KEY
from qcompile.plan import PRESETS

FACTS = ("float_linears", "float_convs", "kv_attention")


@pytest.fixture(scope="module")
def matrices() -> dict[str, Matrix]:
    return {"llama": Matrix(llama_subject()), "cnn": Matrix(cnn_subject())}


def _id(seq: tuple[str, ...]) -> str:
    return "-".join(s.split("_")[0] for s in seq)


@pytest.mark.parametrize("model", ["llama", "cnn"])
@pytest.mark.parametrize("seq", sequences(), ids=_id)
def test_every_cell_composes_or_is_refused_naming_the_fact(matrices, model, seq):
    cell = matrices[model].cell(seq)
    assert cell.outcome != "failed", f"{model} {cell.label}: {cell.detail}"
    if cell.outcome == "refused":  # before capture, naming the fact and the pass that invalidated it
        assert any(f"requires {f}" in cell.detail for f in FACTS), cell.detail
        assert "invalidates" in cell.detail and "Reorder" in cell.detail
    elif cell.outcome == "not applicable":  # the pass said what structure it expected
        assert "found no" in cell.detail or "calibrat" in cell.detail or "sensitivity" in cell.detail, cell.detail
    else:
        assert cell.error is not None and cell.error == cell.error  # finite, measured
        assert len(cell.modified) == len(seq)


def test_the_matrix_covers_every_ordered_pair_and_the_llm_pairs_that_compose():
    pairs = [s for s in sequences() if len(s) == 2]
    assert len(pairs) == len(PASS_NAMES) ** 2
    assert ("quantize_weights", "kv_to_xcache") in pairs and ("fold_quant_steps", "kv_to_xcache") in pairs


@pytest.mark.parametrize(
    "seq",
    [
        ("quantize_weights", "kv_to_xcache"),
        ("kv_to_xcache", "quantize_weights"),
        ("fold_quant_steps", "kv_to_xcache"),
        ("smooth_migration", "assign_precision", "quantize_weights", "kv_to_xcache"),
    ],
    ids=_id,
)
def test_the_orders_a_user_tries_compose_on_the_llm(matrices, seq):
    cell = matrices["llama"].cell(seq)
    assert cell.outcome == "composes", cell.detail
    assert all(cell.modified[i] for i, p in enumerate(seq) if p != "assign_precision")


def test_refusals_are_reported_with_the_fact(matrices):
    cell = matrices["llama"].cell(("kv_to_xcache", "assign_precision"))
    assert cell.outcome == "refused"
    assert short_reason(cell) == "kv_attention ('kv_to_xcache' invalidates)"


# ---- matching quantized forms -------------------------------------------------------------------


def _quantized(program, preset: str):
    return qcompile.compile(program.copy(), plan=preset, calib=torch.randint(0, 256, (2, 64)))


@pytest.mark.parametrize("preset", ["w8a8-rtn", "w4a16-rtn-g32-asym", "w6a8", "w4a4-mergequant"])
def test_projection_weight_is_what_the_quantized_op_multiplies_by(tiny_llama_program, preset):
    """Oracle: x·W_qᵀ (+ b), with W_q read back from the codes and scales, equals the quantized op on an
    x that its activation quantizer keeps exactly (integers; one entry 127 so a dynamic 8-bit scale is 1,
    integers within the 4-bit range for MergeQuant's static steps)."""
    cm = _quantized(tiny_llama_program, preset)
    entry = cm.program.entries["forward"]
    bindings = entry.bindings()
    nodes = [
        n for n in entry.graph.graph.nodes if linear_form(n) is not None and n.target != torch.ops.aten.linear.default
    ]
    assert nodes, "the preset wrote no quantized linear"
    for node in nodes:
        w = projection_weight(cm.program, entry, node)
        args = [cm.program.state[bindings[a].name] if a in bindings else a for a in node.args]
        x = torch.randint(-7, 8, (3, w.shape[1])).to(torch.float32)
        if node.target != torch.ops.qcompile.linear_static.default:
            x[:, 0] = 127
        args[0] = x
        i = linear_form(node).bias_index
        bias = args[i] if len(args) > i and args[i] is not None else 0.0
        torch.testing.assert_close(node.target(*args), x @ w.t() + bias, rtol=1e-5, atol=1e-3)


def test_xcache_over_quantized_projections_reuses_the_quantized_op(tiny_llama_program):
    """Mode x after quantize_weights: decode rematerializes K and V with the forward's own quantized op
    (same weight tensors), so forward equals prefill + decode (the matrix checks the logits)."""
    plan = dataclasses.replace(
        PRESETS["w8a8-rtn"],
        passes=(
            PassConfig("quantize_weights"),
            PassConfig("kv_to_xcache", (("mode", "x"), ("bits", 4), ("group_size", 16))),
        ),
    )
    cm = qcompile.compile(tiny_llama_program.copy(), plan=plan, calib=torch.randint(0, 256, (2, 64)))
    decode = cm.program.entries["decode"]
    w8 = [n for n in decode.graph.graph.nodes if n.target == torch.ops.qcompile.linear_w8a8.default]
    remat = [n for n in w8 if n.args[0].target == torch.ops.qcompile.cache_dequantize.default]
    assert len(remat) == 2 * 2  # K and V of both layers read the dequantized X cache
    assert not any(s.name.endswith(("k_proj.weight", "v_proj.weight")) for s in decode.slots)
    assert not find_cache_attention(cm.program, decode)  # the K/V caches are gone


def test_latent_factors_of_a_quantized_projection_reproduce_it(tiny_llama_program):
    """Latent mode over W6 projections: U·(ΣBᵀ) equals the weight the 6-bit codes encode."""
    from qcompile.quant.lowrank import latent_factors

    cm = _quantized(tiny_llama_program, "w6a8")
    entry = cm.program.entries["forward"]
    k_proj = next(
        n for n in entry.graph.graph.nodes if linear_form(n) is not None and "k_proj" in str(n.meta.get(PATH_KEY, ""))
    )
    w = projection_weight(cm.program, entry, k_proj)
    u_t, sb_t = latent_factors(w)
    torch.testing.assert_close((sb_t @ u_t), w, rtol=1e-4, atol=1e-5)


def test_a_pass_with_nothing_to_rewrite_says_so_instead_of_a_silent_no_op(tiny_llama):
    with pytest.raises(PassError, match="winograd_conv found no convolution"):
        qcompile.compile(tiny_llama, plan=base_plan(("winograd_conv",)), max_cache_len=32)
    from qcompile.eval.zoo import tiny_cnn

    with pytest.raises(PassError, match="smooth_migration found no group of linears"):
        qcompile.compile(tiny_cnn(), plan=base_plan(("smooth_migration",)), example_inputs=(torch.randn(1, 3, 8, 8),))


def test_assign_precision_after_the_cache_rewrite_is_refused_before_capture(monkeypatch):
    monkeypatch.setattr(qcompile.api, "capture", lambda *a, **k: pytest.fail("captured before the plan check"))
    with pytest.raises(PlanError, match="requires kv_attention .*'kv_to_xcache' invalidates"):
        qcompile.compile(torch.nn.Linear(2, 2), plan=base_plan(("kv_to_xcache", "assign_precision")))
