"""Calibration plumbing: input normalization, observers, clear errors."""

from __future__ import annotations

import pytest
import torch

from qcompile.errors import DataError, PassError, PlanError
from qcompile.ir.calib import calib_batches, run_observed
from qcompile.ir.patterns import find_linears


def test_calib_batches_normalizes_and_checks(tiny_llama_program):
    p = tiny_llama_program
    assert [b.shape for b in calib_batches(torch.arange(10), who="t", program=p)] == [torch.Size([1, 10])]
    assert len(calib_batches([torch.zeros(2, 4, dtype=torch.int32)] * 3, who="t", program=p)) == 3
    with pytest.raises(PlanError, match="smooth needs calibration data"):
        calib_batches(None, who="smooth", program=p)
    with pytest.raises(DataError, match="has 8 tokens; at least 100 are needed"):
        calib_batches(torch.zeros(2, 4, dtype=torch.int64), who="t", program=p, min_tokens=100)
    with pytest.raises(DataError, match="item 0 must be an integer token tensor"):
        calib_batches([torch.zeros(2, 4)], who="t", program=p)


def test_a_calibrating_plan_on_a_cnn_says_calibration_takes_token_ids():
    import qcompile

    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10)).eval()
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(
        PassError, match=r"calibrates on token ids, which only causal LMs take; .*float32\[1, 1, 8, 8\]"
    ):
        qcompile.compile(
            cnn, plan="w4a16-gptq-g128", example_inputs=(x,), backend="torch", calib=torch.randint(0, 9, (2, 64))
        )
    # SmoothQuant finds nothing to smooth in a CNN before it asks for calibration, and says so
    with pytest.raises(PassError, match=r"smooth_migration found no group of linears to smooth"):
        qcompile.compile(
            cnn,
            plan="w4a16-smoothquant+-gptq",
            example_inputs=(x,),
            backend="torch",
            calib=torch.randint(0, 9, (2, 64)),
        )


def test_observers_see_every_linear_input(tiny_llama, tiny_llama_program):
    seen: dict[str, torch.Tensor] = {}
    obs = {
        m.node: (lambda n, a: seen.setdefault(n.name, a[0]))
        for m in find_linears(tiny_llama_program)
        if m.entry.name == "forward"
    }
    ids = torch.randint(0, 256, (2, 12))
    outs = run_observed(tiny_llama_program, calib_batches(ids, who="t", program=tiny_llama_program), obs)
    assert len(outs) == 2 and len(seen) == len(obs) == 15  # 2 layers x 7 linears + lm_head
    with torch.no_grad():
        ref = tiny_llama(ids[1:2]).logits
    torch.testing.assert_close(outs[1][0], ref, rtol=1e-5, atol=1e-5)


def test_non_finite_calibration_activations_name_the_layer(tiny_llama_program):
    prog = tiny_llama_program.copy()
    key = next(k for k in prog.state if k.endswith("layers.1.post_attention_layernorm.weight"))
    prog.state[key] = prog.state[key].clone()
    prog.state[key][3] = float("nan")
    obs = {m.node: (lambda n, a: None) for m in find_linears(prog) if m.entry.name == "forward"}
    with pytest.raises(DataError, match=r"layer 'model.layers.1.mlp.gate_proj' contain NaN or Inf"):
        run_observed(prog, [torch.randint(0, 256, (1, 8))], obs)


def test_calibrating_without_a_forward_entry_says_which_entries_to_capture(tiny_llama):
    import qcompile

    with pytest.raises(PassError, match=r"calibrates by running the 'forward' entry.*lm_entries including 'forward'"):
        qcompile.compile(
            tiny_llama,
            plan="w8a8-smooth",
            lm_entries=("prefill", "decode"),
            max_cache_len=16,
            calib=torch.zeros(1, 64, dtype=torch.int64),
        )
