"""The decode step on the TVM CPU backend (issue 21): weights bound as constants of the executable,
generate()'s repeat-call fast path and attention over the filled prefix give the same logits, tokens
and cache rows as the old path (every weight a VM argument, every step a checked run_entry call,
attention over every slot); the per-step profile accounts for the step; artifacts with bound weights
load and run the same."""

from __future__ import annotations

import pytest
import torch

import qcompile
import qcompile.codegen.tvm as tvm_backend
from qcompile.codegen.tvm.profile import CATEGORIES, profile_entry
from qcompile.errors import InputError
from qcompile.ir.program import SlotKind

pytestmark = pytest.mark.tvm
IDS = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
PLAN = "w4a16-rtn-g128"  # repacked weights (codes, scales, zeros) besides the float state


@pytest.fixture(scope="module")
def pair(tiny_llama):
    """(old, new): the same plan built the pre-issue-21 way (weights as arguments, attention over every
    cache slot) and the new way (bound constants, attention over the filled prefix)."""
    from qcompile.codegen.tvm.kernels import attention

    tvm_backend.BIND_WEIGHTS = attention.PREFIX_KEYS = False
    try:
        old = qcompile.compile(tiny_llama, plan=PLAN, max_cache_len=48)
    finally:
        tvm_backend.BIND_WEIGHTS = attention.PREFIX_KEYS = True
    old._fast_decode = False
    new = qcompile.compile(tiny_llama, plan=PLAN, max_cache_len=48)
    return old, new


def _steps(cm, n: int) -> list[torch.Tensor]:
    """Prefill IDS, then ``n`` greedy decode steps through generate()'s own step function."""
    cm.reset_cache()
    logits = [cm.run_entry("prefill", IDS, torch.arange(IDS.shape[1]))]
    step = cm._decode_step()
    for i in range(n):
        tok = logits[-1][0, -1].argmax().view(1, 1)
        logits.append(step(tok, IDS.shape[1] + i))
    return logits


def test_bound_weights_are_constants_not_arguments(pair):
    old, new = pair
    assert new.report.backend["bound_weights"] and not old.report.backend["bound_weights"]
    entry = new.program.entries["decode"]
    passed = sum(s.kind is not SlotKind.STATE for s in entry.slots)  # user inputs and caches
    _, new_args = new._built["decode"].prepare(new._build_args(entry, [IDS[:, :1], torch.tensor([3])]))
    _, old_args = old._built["decode"].prepare(old._build_args(entry, [IDS[:, :1], torch.tensor([3])]))
    assert len(new_args) == passed
    assert len(old_args) > len(entry.slots)  # every slot plus the repacked tensors


def test_new_decode_path_gives_the_old_logits_bit_for_bit(pair):
    old, new = pair
    a, b = _steps(old, 6), _steps(new, 6)
    assert len(a) == len(b) == 7
    for x, y in zip(a, b):
        assert torch.isfinite(x).all() and x.abs().max() > 0
        assert torch.equal(x, y)
    assert torch.equal(old.generate(IDS, 10, eos_token_id=[]), new.generate(IDS, 10, eos_token_id=[]))
    # the fast path writes the same cache rows as the checked path
    for k in old._cache:
        assert torch.equal(old._cache[k], new._cache[k])


def test_fast_step_still_refuses_a_token_outside_the_embedding(pair):
    _, new = pair
    new.reset_cache()
    new.run_entry("prefill", IDS, torch.arange(IDS.shape[1]))
    step = new._decode_step()
    step(IDS[:, :1], IDS.shape[1])  # the first step is a checked call; later ones take the fast path
    bad = torch.tensor([[new.token_limit()]])
    with pytest.raises(InputError, match="token ids"):
        step(bad, IDS.shape[1] + 1)


def test_profile_accounts_for_the_step(pair):
    _, new = pair
    new.reset_cache()
    new.run_entry("prefill", IDS, torch.arange(IDS.shape[1]))
    prof = profile_entry(new, "decode", [IDS[:, :1], torch.tensor([IDS.shape[1]])], steps=6, vocab=256)
    d = prof.to_dict()
    assert set(d["kernel_ms"]) == set(CATEGORIES)
    # a 2-layer Llama: 7 linears per layer, one head, one attention and two cache writes per layer
    assert d["kernel_calls"]["linear"] == 14 and d["kernel_calls"]["lm_head"] == 1
    assert d["kernel_calls"]["attention"] == 2 and d["kernel_calls"]["cache_write"] == 4
    assert all(v >= 0 for v in d["kernel_ms"].values()) and d["kernels_total_ms"] > 0
    assert d["vm_args"] == sum(s.kind is not SlotKind.STATE for s in new.program.entries["decode"].slots)
    assert prof.step_ms is not None and prof.vm_ms > 0


def test_bound_artifact_round_trip(pair, tmp_path):
    _, new = pair
    new.save(tmp_path / "a")
    back = qcompile.load(tmp_path / "a")
    assert back.backend == "tvm" and back.report.backend.get("loaded_prebuilt")
    assert back.report.backend["bound_weights"]
    assert torch.equal(back.generate(IDS, 8, eos_token_id=[]), new.generate(IDS, 8, eos_token_id=[]))
    a, b = _steps(back, 3), _steps(new, 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
