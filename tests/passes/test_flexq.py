"""FlexQ: packed W6 ops (direct and bit-serial forms), assign_precision, presets."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qcompile
from qcompile.errors import DataError, PassError, PlanError
from qcompile.ops.linear import exact_block_products
from qcompile.ops.packed import pack_codes, packed_linear_bitserial, unpack_codes
from qcompile.plan import PRESETS, LayerRule, PassConfig, Plan
from qcompile.quant.bitserial import bitserial_matmul
from qcompile.quant.packing import code_range, packed_size, unpack
from qcompile.quant.quantizer import quantize_weight_groups

# ---- ops ----------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 9), k=st.integers(1, 300), seed=st.integers(0, 10_000))
def test_fast_6bit_unpack_matches_generic_unpack(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-32, 32, (n, k), generator=g).to(torch.int8)
    codes[0, 0] = -32
    packed = pack_codes(codes, 6)
    assert packed.dtype == torch.uint8 and packed.shape == (n, packed_size(k, 6))
    assert torch.equal(unpack_codes(packed, k, 6), codes)
    assert torch.equal(unpack_codes(packed, k, 6), unpack(packed, k, 6))


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 4),
    n=st.integers(1, 5),
    groups=st.integers(1, 3),
    tail=st.integers(0, 127),
    a_bits=st.sampled_from([6, 8]),
    seed=st.integers(0, 10_000),
)
def test_per_group_integer_gemm_direct_and_bitserial_equal_int32_matmul(m, n, groups, tail, a_bits, seed):
    """The two reference forms of the W6A6 / W6A8 group products equal an int32 matmul exactly."""
    g = torch.Generator().manual_seed(seed)
    block = 128
    k = (groups - 1) * block + (tail or block)  # ragged last group as with K = 576
    lo_a, hi_a = code_range(a_bits, True)
    qa = torch.randint(lo_a, hi_a + 1, (m, k), generator=g)
    qw = torch.randint(-32, 32, (n, k), generator=g)
    qa[0, 0], qw[0, 0] = lo_a, -32
    gcount = -(-k // block)
    pa = torch.nn.functional.pad(qa, (0, gcount * block - k)).view(m, gcount, block)
    pw = torch.nn.functional.pad(qw, (0, gcount * block - k)).view(n, gcount, block)
    direct = exact_block_products(pa.to(torch.int16), pw.to(torch.int16))  # [m, n, g]
    for j in range(gcount):
        want = pa[:, j].to(torch.int32) @ pw[:, j].to(torch.int32).T  # int32 matmul
        assert torch.equal(direct[..., j], want)
        assert torch.equal(bitserial_matmul(pa[:, j], pw[:, j], a_bits, 6).to(torch.int32), want)


@settings(max_examples=20, deadline=None)
@given(
    m=st.integers(1, 4),
    n=st.integers(1, 6),
    k=st.sampled_from([64, 128, 200, 256, 576]),
    a_bits=st.sampled_from([6, 8]),
    per_group=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_packed_linear_op_equals_bitserial_form_and_quant_linear(m, n, k, a_bits, per_group, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, m, k, generator=g) * 3
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    gs = 128 if k > 128 else k
    codes, scale, _ = quantize_weight_groups(w, 6, gs, True)
    packed = pack_codes(codes, 6)
    act_group = gs if per_group else 0
    y = torch.ops.qcompile.packed_linear(x, packed, scale, b, k, 6, gs, a_bits, act_group)
    assert torch.equal(y, packed_linear_bitserial(x, packed, scale, b, k, 6, gs, a_bits, act_group))
    assert torch.equal(y, torch.ops.qcompile.quant_linear(x, codes, scale, None, b, gs, a_bits, act_group))


# ---- quantize_weights stores packed 6-bit weights; artifacts round-trip ---------------------------


def test_w6_presets_store_packed_weights_and_round_trip(tiny_llama, tiny_llama_program, tmp_path):
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    ref = tiny_llama(ids).logits.detach()
    for name in ("w6a6", "w6a8", "w6a8-flexq-fixed"):
        cm = _compile(tiny_llama_program, name)
        ops = {n.target for _, n in cm.program.nodes() if n.op == "call_function"}
        assert torch.ops.qcompile.packed_linear.default in ops and torch.ops.aten.linear.default in ops  # lm_head
        packed = {k: v for k, v in cm.program.state.items() if k.endswith("qweight_packed")}
        assert packed and all(v.dtype == torch.uint8 for v in packed.values())
        w = tiny_llama.model.layers[0].mlp.down_proj.weight
        assert packed["model.layers.0.mlp.down_proj.qweight_packed"].numel() == w.numel() * 6 // 8
        y = cm(ids)
        assert ((y - ref).norm() / ref.norm()) < 0.1
        cm.save(tmp_path / name)
        back = qcompile.load(tmp_path / name)
        assert torch.equal(back(ids), y) and back.plan == cm.plan


def test_w6a8_is_closer_to_float_than_w6a6(tiny_llama, tiny_llama_program):
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(4))
    ref = tiny_llama(ids).logits.detach()
    err = {p: float((_compile(tiny_llama_program, p)(ids) - ref).norm()) for p in ("w6a6", "w6a8")}
    assert err["w6a8"] < err["w6a6"]


# ---- assign_precision --------------------------------------------------------------------------


def _compile(program, plan, calib=None):
    return qcompile.compile(program.copy(), plan=plan, calib=calib)


CALIB = torch.randint(0, 256, (4, 96), generator=torch.Generator().manual_seed(1))


def _flexq(budget, unit="linears", **opts):
    base = PRESETS["w6a8-flexq"]
    return dataclasses.replace(
        base,
        name=f"flexq-{budget}",
        passes=(
            PassConfig("assign_precision", (("budget", budget), ("unit", unit), *opts.items())),
            PassConfig("quantize_weights"),
        ),
    )


def _a8_layers(cm):
    return cm.report.passes[0].notes["a8_layers"]


def test_assign_precision_is_deterministic_and_saved(tiny_llama, tiny_llama_program, tmp_path):
    cm1 = _compile(tiny_llama_program, "w6a8-flexq", CALIB)
    cm2 = _compile(tiny_llama_program, "w6a8-flexq", CALIB.clone())
    notes = cm1.report.passes[0].notes
    assert notes["sensitivity"] == cm2.report.passes[0].notes["sensitivity"]
    assert _a8_layers(cm1) == _a8_layers(cm2) and len(_a8_layers(cm1)) == 2  # floor(14 / 7)
    # the chosen layers are the top-scored ones
    ranked = sorted(notes["sensitivity"], key=lambda r: (-r["score"], r["path"]))
    assert {r["path"] for r in ranked[:2]} == set(_a8_layers(cm1))
    assert all(r["score"] > 0 for r in notes["sensitivity"])
    # written into the plan as rules, applied by quantize_weights, saved with the artifact
    assert [r.match for r in cm1.plan.rules] == _a8_layers(cm1)
    for _, n in cm1.program.nodes():
        if n.target == torch.ops.qcompile.packed_linear.default:
            assert n.args[7] == (8 if n.meta["qcompile_path"] in _a8_layers(cm1) else 6)
    cm1.save(tmp_path / "a")
    back = qcompile.load(tmp_path / "a")
    assert back.plan == cm1.plan and back.report.passes[0].notes["a8_layers"] == _a8_layers(cm1)
    # the saved plan reproduces the module without calibration data
    assert [pc.name for pc in back.plan.passes] == ["quantize_weights"]  # the analysis is replaced by its rules
    again = _compile(tiny_llama_program, Plan.from_json(back.plan.to_json()))  # no calibration needed
    ids = torch.randint(0, 256, (1, 16))
    assert torch.equal(again(ids), cm1(ids))


def _run_pass(program, budget, unit="linears"):
    from qcompile.passes.assign_precision import AssignPrecision
    from qcompile.passes.base import PassContext

    ctx = PassContext(plan=PRESETS["w6a8-flexq"], calib=CALIB)
    res = AssignPrecision(budget=budget, unit=unit).run(program, ctx)  # leaves the program as is
    assert not res.modified and [r.match for r in res.plan.rules] == res.notes["a8_layers"]
    assert "assign_precision" not in [pc.name for pc in res.plan.passes]
    assert ctx.plan is PRESETS["w6a8-flexq"]  # the refined plan is returned, the context is left alone
    return res.notes


def test_assign_precision_budget_semantics(tiny_llama_program):
    def a8(budget, unit="linears"):
        return set(_run_pass(tiny_llama_program, budget, unit)["a8_layers"])

    none, some, more, all_ = a8(0.0), a8(2 / 7), a8(3 / 7), a8(1.0)
    assert none == set() and len(all_) == 14 and len(some) == 4 and len(more) == 6
    assert some < more < all_  # nested: a larger budget only adds layers
    notes = _run_pass(tiny_llama_program, 0.25, "flops")
    flops = {r["path"]: r["flops_per_token"] for r in notes["sensitivity"]}
    assert 0 < notes["a8_fraction_flops"] <= 0.25
    assert sum(flops[p] for p in notes["a8_layers"]) <= 0.25 * sum(flops.values())
    # the whole budget takes every layer
    assert _run_pass(tiny_llama_program, 1.0, "flops")["a8_fraction_flops"] == 1.0


def test_budget_zero_and_one_match_w6a6_and_w6a8(tiny_llama, tiny_llama_program):
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(5))
    for budget, preset in ((0.0, "w6a6"), (1.0, "w6a8")):
        got = _compile(tiny_llama_program, _flexq(budget), CALIB)(ids)
        assert torch.equal(got, _compile(tiny_llama_program, preset)(ids))


@pytest.mark.parametrize("budget", [-0.1, 1.5, float("nan"), "half", True])
def test_bad_budget_is_a_plan_error(tiny_llama, tiny_llama_program, budget):
    with pytest.raises(PlanError, match="budget(.* must be a number in \\[0, 1\\]|.*expected a (finite )?number)"):
        _compile(tiny_llama_program, _flexq(budget), CALIB)


def test_bad_unit_and_bits_are_plan_errors():
    from qcompile.passes.base import make_pass

    with pytest.raises(PlanError, match="allowed: \\['linears', 'flops'\\]"):
        make_pass("assign_precision", (("unit", "params"),))
    with pytest.raises(PlanError, match="low_bits"):
        make_pass("assign_precision", (("low_bits", 8), ("high_bits", 6)))


def test_short_calibration_is_a_data_error_with_the_minimum(tiny_llama, tiny_llama_program):
    with pytest.raises(PassError, match="at least 256 are needed") as e:
        _compile(tiny_llama_program, "w6a8-flexq", CALIB[:1, :50])
    assert isinstance(e.value.__cause__, DataError)
    with pytest.raises(PassError, match="needs calibration data"):
        _compile(tiny_llama_program, "w6a8-flexq")


def test_group_not_dividing_k_is_a_plan_error(tiny_llama, tiny_llama_program):
    from qcompile.plan import Granularity, QuantSpec

    bad = QuantSpec(bits=6, granularity=Granularity.PER_GROUP, group_size=48)
    plan = dataclasses.replace(_flexq(0.5), weight=bad)
    with pytest.raises(PassError, match="group_size 48 does not divide its 64 input channels"):
        _compile(tiny_llama_program, plan, CALIB)


def test_layers_fixed_by_rules_are_not_candidates(tiny_llama, tiny_llama_program):
    plan = _flexq(1.0).with_rules(LayerRule(match="*.mlp.*", skip=True))
    cm = _compile(tiny_llama_program, plan, CALIB)
    notes = cm.report.passes[0].notes
    assert notes["candidates"] == 8 and all(".mlp." not in p for p in notes["a8_layers"])
    assert any(".mlp." in p for p, _ in cm.report.passes[0].skipped)


def test_report_plot(tiny_llama, tiny_llama_program, tmp_path):
    from qcompile.cli import main

    cm = _compile(tiny_llama_program, "w6a8-flexq", CALIB)
    cm.save(tmp_path / "art")
    png = tmp_path / "sens.png"
    assert main(["report", str(tmp_path / "art"), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fisher_ranking_agrees_with_exact_kl(tiny_llama_program):
    from qcompile.passes.assign_precision import AssignPrecision
    from qcompile.passes.base import PassContext

    calib = CALIB[:2, :64]
    scores = {}
    for metric in ("fisher", "kl"):
        ctx = PassContext(plan=PRESETS["w6a8-flexq"], calib=calib)
        notes = AssignPrecision(metric=metric, min_tokens=64).run(tiny_llama_program, ctx).notes
        scores[metric] = torch.tensor([r["score"] for r in notes["sensitivity"]])
        assert (scores[metric] > -1e-9).all() and scores[metric].max() > 0
    ranks = {k: v.argsort().argsort().double() for k, v in scores.items()}
    spearman = torch.corrcoef(torch.stack([ranks["fisher"], ranks["kl"]]))[0, 1]
    assert spearman > 0.6, spearman
