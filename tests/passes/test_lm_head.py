"""The plan's lm_head setting (issue 17) on the torch reference backend: fp32 / int8 / plan heads, tied and
untied, what the report says, the embedding gather of a tied head unchanged, save/load without loss."""

from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile.eval.zoo import tiny_llama as zoo_tiny_llama
from qcompile.ir.patterns import find_linears
from qcompile.plan import W8_PER_CHANNEL, LmHead, Plan, get_plan
from qcompile.quant.quantizer import quantize_weight_groups, quantize_weight_per_channel

IDS = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
PLAN = "w4a16-rtn-g128"


def tied_llama(vocab: int = 256, seed: int = 0) -> torch.nn.Module:
    """The zoo's tiny Llama with its head tied to the embedding table (SmolLM2 / Gemma 3 style)."""
    model = zoo_tiny_llama(vocab, seed=seed, tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@pytest.fixture(scope="module")
def models(tiny_llama):
    return {"untied": tiny_llama, "tied": tied_llama()}


def _head(cm):
    """(node, entry) of the head in the forward entry: the node whose module path is lm_head."""
    entry = cm.program.entries["forward"]
    for n in entry.graph.graph.nodes:
        if n.op == "call_function" and n.meta.get("qcompile_path") == "lm_head":
            return n, entry
    raise AssertionError("no lm_head node")


def _embedding_table(cm) -> torch.Tensor:
    entry = cm.program.entries["forward"]
    b = entry.bindings()
    for n in entry.graph.graph.nodes:
        if n.op == "call_function" and n.target == torch.ops.aten.embedding.default:
            return cm.program.state[b[n.args[0]].name]
    raise AssertionError("no embedding gather")


def _note(cm):
    (p,) = [p for p in cm.report.passes if p.name == "quantize_weights"]
    return p, p.notes.get("lm_head", {}).get("lm_head")


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_fp32_head_is_todays_behaviour_and_the_report_says_kept(models, kind):
    cm = qcompile.compile(models[kind], plan=PLAN, max_cache_len=64)
    assert {m.path for m in find_linears(cm.program)} == {"lm_head"}  # only the head stays float
    p, note = _note(cm)
    assert ("lm_head", "lm_head kept in float (plan lm_head: fp32; int8 or plan quantizes it)") in p.skipped
    assert note["quantized"] is False and note["setting"] == "fp32"
    assert note["tied_to"] == (["model.embed_tokens"] if kind == "tied" else [])
    assert any("lm_head 'lm_head' (plan lm_head: fp32): lm_head kept in float" in s for s in p.summary)


@pytest.mark.parametrize("kind", ["untied", "tied"])
@pytest.mark.parametrize("setting", ["int8", "plan"])
def test_quantized_head_codes_are_exact_and_the_embedding_is_unchanged(models, kind, setting):
    model = models[kind]
    plan = get_plan(PLAN).with_lm_head(setting)
    cm = qcompile.compile(model, plan=plan, max_cache_len=64)
    ref = qcompile.compile(model, plan=PLAN, max_cache_len=64)  # the same plan with the fp32 head
    assert not list(find_linears(cm.program))  # no float linear left
    node, entry = _head(cm)
    assert node.target == torch.ops.qcompile.quant_linear.default
    b = entry.bindings()
    codes, scale = cm.program.state[b[node.args[1]].name], cm.program.state[b[node.args[2]].name]
    w = model.lm_head.weight.detach()
    if setting == "int8":  # symmetric per output channel: the reference quantizer, exactly
        want_codes, want_scale = quantize_weight_per_channel(w, 8)
        assert torch.equal(codes, want_codes) and torch.equal(scale.reshape(-1), want_scale.reshape(-1))
        assert cm.program.weight_bits[b[node.args[1]].name] == 8
        assert cm.plan.resolve("lm_head").weight == W8_PER_CHANNEL
    else:  # the plan's own weight spec (4-bit symmetric, group 128 along K = 64: one group per row)
        spec = get_plan(PLAN).weight
        want = quantize_weight_groups(w, spec.bits, spec.block(w.shape[1]), spec.symmetric)
        assert torch.equal(codes, want[0]) and torch.equal(scale, want[1])
        assert cm.program.weight_bits[b[node.args[1]].name] == 4
    assert tuple(node.args[6:]) == (0, 0)  # weight-only: no activation bits or groups (float activations)
    # the embedding gather reads the untouched fp32 table (tied: the same tensor the head was quantized from)
    table = _embedding_table(cm)
    assert table.dtype == torch.float32 and torch.equal(table, model.model.embed_tokens.weight.detach())
    # only the head changed: the logits move by the head's rounding error, not more
    x = cm(IDS)
    y = ref(IDS)
    rel = float((x - y).abs().max() / y.abs().max())
    assert 0 < rel < (0.02 if setting == "int8" else 0.2)
    p, note = _note(cm)
    assert "lm_head" in p.layers_changed and "lm_head" not in dict(p.skipped)
    assert note["quantized"] is True and note["setting"] == setting
    assert note["code_bytes"] == codes.numel() + scale.numel() * 4
    if kind == "tied":
        assert note["tied_to"] == ["model.embed_tokens"]
        assert "lm_head.qweight" in cm.program.state and "model.embed_tokens.qweight" not in cm.program.state
        assert any("keeps the fp32 table for the gather" in s for s in p.summary)
        # the fp32 table stays (for the gather) and the head's codes are stored beside it
        assert cm.report.weight_bytes["float32"] - ref.report.weight_bytes["float32"] == scale.numel() * 4
    else:
        assert note["tied_to"] == [] and "lm_head.weight" not in cm.program.state  # the float head is dropped


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_quantized_head_survives_save_and_load(models, kind, tmp_path):
    cm = qcompile.compile(models[kind], plan=get_plan(PLAN).with_lm_head("int8"), max_cache_len=64)
    cm.save(tmp_path / "a")
    cm2 = qcompile.load(tmp_path / "a")
    assert cm2.plan == cm.plan and cm2.plan.lm_head is LmHead.INT8
    assert sorted(cm2.program.state) == sorted(cm.program.state)
    for k, v in cm.program.state.items():
        assert torch.equal(cm2.program.state[k], v), k
    assert torch.equal(cm2(IDS), cm(IDS))
    assert torch.equal(cm2.generate(IDS, 6, eos_token_id=[]), cm.generate(IDS, 6, eos_token_id=[]))
    assert _note(cm2)[1] == _note(cm)[1]  # the report's head entry, as saved


def test_head_setting_that_selects_no_layer_warns():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    plan = Plan(
        name="w8", passes=get_plan("w4a16-rtn-g128").passes, weight=get_plan("w4a16-rtn-g128").weight, lm_head="int8"
    )
    cm = qcompile.compile(model, plan=plan, example_inputs=(torch.randn(2, 8),))
    assert any("lm_head: int8 selects no layer" in w for w in cm.report.warnings)


@pytest.mark.parametrize("base", ["fp32", "w4a4-mergequant"])
def test_a_quantized_head_on_a_plan_without_quantize_weights_is_a_plan_error(base):
    from qcompile.passes.manager import PassManager

    with pytest.raises(qcompile.PlanError, match="would have no effect: plan .* has no quantize_weights pass"):
        PassManager(get_plan(base).with_lm_head("int8"))
