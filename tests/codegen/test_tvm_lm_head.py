"""The lm_head setting (issue 17) on the TVM backend: tied and untied heads, int8 and the plan's format,
the same logits and greedy tokens as the torch reference backend, and a kernel for the head."""

from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile.plan import get_plan
from tests.passes.test_lm_head import IDS, tied_llama

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def tied():
    return tied_llama()


@pytest.mark.parametrize(
    ("kind", "plan", "setting"),
    [
        ("tied", "w4a16-rtn-g128", "int8"),
        ("tied", "w4a16-rtn-g128", "plan"),
        ("untied", "w8a8-rtn", "int8"),
    ],
)
def test_tvm_head_matches_the_reference(tiny_llama, tied, kind, plan, setting):
    model = tied if kind == "tied" else tiny_llama
    the_plan = get_plan(plan).with_lm_head(setting)
    ref = qcompile.compile(model, plan=the_plan, backend="torch", max_cache_len=64)
    cm = qcompile.compile(model, plan=the_plan, max_cache_len=64)
    assert cm.backend == "tvm"
    x, y = cm(IDS), ref(IDS)
    assert float((x - y).abs().max() / y.abs().max()) < 1e-4
    assert torch.equal(cm.generate(IDS, 8, eos_token_id=[]), ref.generate(IDS, 8, eos_token_id=[]))
    info = cm.report.backend
    assert not info["fallbacks"]
    quantized = 14 + (setting != "fp32")  # 2 layers x 7 linears, plus the head
    assert sum(info["kernels"].values()) >= quantized * 3  # one qcompile kernel per quantized linear per entry
