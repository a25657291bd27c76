"""Prefill returns the last position's logits, computed from one row (qcompile/ir/last_position.py)."""

from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile.ir import last_position
from qcompile.ir.last_position import trim_prefill_logits

IDS = torch.randint(0, 256, (1, 11), generator=torch.Generator().manual_seed(3))
aten = torch.ops.aten


def _row_shapes(cm) -> dict[str, tuple]:
    """Output shape per linear-like op of the prefill graph, by node name."""
    g = cm.program.entries["prefill"].graph.graph
    return {
        n.name: tuple(n.meta["val"].shape)
        for n in g.nodes
        if n.op == "call_function"
        and (n.target == aten.linear.default or "linear" in str(n.target))
        and isinstance(n.meta.get("val"), torch.Tensor)
    }


@pytest.mark.parametrize(
    "plan", ["fp32", "w8a8-rtn", "w4a16-rtn-g32-asym", "w6a8", "w4a4-mergequant", "w4a4-quest", "w8a8-smooth-xc4"]
)
def test_prefill_is_the_last_row_of_forward(tiny_llama, plan):
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(4))
    cm = qcompile.compile(tiny_llama, plan=plan, backend="torch", max_cache_len=64, calib=calib)
    assert cm.program.meta["prefill_logits"] == "last" and not cm.report.warnings
    with torch.no_grad():
        full = cm(IDS)
        cm.reset_cache()
        last = cm.run_entry("prefill", IDS, torch.arange(IDS.shape[1]))
    assert last.shape == (1, 1, full.shape[-1])
    # the same row (a quantizer may round one code the other way under another summation order)
    assert float((last[:, 0] - full[:, -1]).abs().max()) <= 1e-3 * float(full[:, -1].abs().max())
    shapes = list(_row_shapes(cm).values())
    one_row = [s for s in shapes if len(s) == 3 and s[1] == 1]
    # the LM head, the last MLP (gate, up, down) and the last output projection run on one row; q/k/v
    # (whose K and V rows are all written to the cache) and the earlier layers keep every row
    assert len(one_row) >= 5 and len(shapes) - len(one_row) >= 3


def test_generate_and_decode_after_a_one_row_prefill(tiny_llama):
    cm = qcompile.compile(tiny_llama, plan="w8a8-rtn", backend="torch", max_cache_len=64)
    with torch.no_grad():
        tokens = cm.generate(IDS, 6, eos_token_id=[])
        want = cm(tokens[:, :-1])[:, IDS.shape[1] - 1 :].argmax(-1)
    assert torch.equal(tokens[:, IDS.shape[1] :], want)  # greedy: every new token is forward's argmax


def test_compiling_a_trimmed_program_again_cuts_nothing_twice(tiny_llama_program):
    program = tiny_llama_program.copy()
    trimmed, note = trim_prefill_logits(program)
    assert trimmed and "cut(s) run on one row" in note
    before = program.entries["prefill"].graph.code
    assert trim_prefill_logits(program) == (True, "prefill returns the last position's logits (already)")
    assert program.entries["prefill"].graph.code == before


def test_an_output_the_rewrite_cannot_follow_is_kept_and_reported(tiny_llama, monkeypatch):
    """Without a row-wise LM head (here: linear taken off the list), every position is kept and the
    report's warnings say which node stopped the rewrite."""
    monkeypatch.setattr(last_position, "_ROWWISE", last_position._ROWWISE - {aten.linear.default})
    cm = qcompile.compile(tiny_llama, plan="fp32", backend="torch", max_cache_len=64)
    assert "prefill_logits" not in cm.program.meta
    assert any("does not work row by row" in w and "linear" in w for w in cm.report.warnings)
    assert cm.run_entry("prefill", IDS, torch.arange(IDS.shape[1])).shape[1] == IDS.shape[1]


def test_an_entry_without_a_dynamic_sequence_output_is_left_alone(tiny_llama_program):
    program = tiny_llama_program.copy()
    program.entries["prefill"] = program.entries["decode"]  # one static row: nothing to cut
    trimmed, note = trim_prefill_logits(program)
    assert not trimmed and "keeps every position" in note
    assert "prefill_logits" not in program.meta
