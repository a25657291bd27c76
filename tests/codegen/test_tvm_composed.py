"""Composed presets on the TVM backend: the same logits and the same greedy tokens as the reference."""

from __future__ import annotations

import pytest
import torch

import qcompile

pytestmark = pytest.mark.tvm
IDS = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
CALIB = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("plan", ["w8a8-smooth-xc4", "w6a8-flexq-smooth-xc4"])
def test_composed_presets_match_the_reference_backend(tiny_llama_program, plan):
    ref = qcompile.compile(tiny_llama_program.copy(), plan=plan, backend="torch", calib=CALIB)
    cm = qcompile.compile(tiny_llama_program.copy(), plan=plan, calib=CALIB)
    assert cm.backend == "tvm"
    assert all(p.modified for p in cm.report.passes if p.name != "assign_precision")  # it refines the plan
    got, want = cm(IDS), ref(IDS)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-3
    assert torch.equal(cm.generate(IDS[:, :4], 6, eos_token_id=[]), ref.generate(IDS[:, :4], 6, eos_token_id=[]))
