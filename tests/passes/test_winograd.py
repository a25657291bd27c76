import zlib
from fractions import Fraction

import pytest
import torch

import qcompile
from qcompile import PassConfig, PassError, Plan, PlanError
from qcompile.quant import winograd
from qcompile.quant.winograd import POINT_SETS, kappa, transforms, verify


@pytest.mark.parametrize(
    "m,name,want",
    [
        (4, "integer", 42.5),
        (4, "nova", 14.5),
        (6, "integer", 2074.5),
        (6, "nova", 76.6),
        (8, "integer", 196_900),
        (8, "nova", 474.1),
    ],
)
def test_kappa_of_the_finite_point_vandermonde_matrices(m, name, want):
    assert abs(kappa(POINT_SETS[(m, name)]) - want) <= max(0.05, 1e-3 * want)  # papers print one decimal


@pytest.mark.parametrize("key", sorted(POINT_SETS))
def test_every_named_set_is_verified_exactly(key):
    m, _ = key
    t = transforms(POINT_SETS[key], m)
    verify(t, trials=4)
    assert len(t.AT) == m and len(t.G) == m + 2 and len(t.BT) == m + 2


def test_verifier_catches_a_wrong_transform():
    t = transforms(POINT_SETS[(4, "nova")], 4)
    bad_bt = [row[:] for row in t.BT]
    bad_bt[1][2] += Fraction(1, 7)
    with pytest.raises(AssertionError, match="1-D F\\(4,3\\)"):
        verify(winograd.Transforms(t.m, t.r, t.points, t.AT, t.G, bad_bt))


def test_bad_point_sets_are_clear_errors():
    with pytest.raises(ValueError, match=r"duplicated: \['1'\]"):
        transforms([0, 1, 1, 2, -2], 4)
    with pytest.raises(ValueError, match="needs 5 distinct finite points"):
        transforms([0, 1, -1], 4)
    with pytest.raises(ValueError, match="exact rationals"):
        transforms([0, 0.5, -0.5, 1, -1], 4)


def _run(m, pts, x, w, b, pad, fp16=False):
    AT, G, BT = (torch.tensor(a) for a in transforms(pts, m).as_arrays())
    return torch.ops.qcompile.winograd_conv2d(
        x, winograd.transform_weight(w, G), AT.float(), BT.float(), b, m, list(pad), fp16
    )


# F(8,3) misses 1e-4 in fp32 with every point set (seen over 12 seeds: integer 1.8e-2..4.3e-2, fractional
# 0.9e-4..2.3e-4, NOVA 1.1e-4..1.5e-4); reported in RESULTS.md, not hidden. They get their own bounds.
FP32_BOUND = {(8, "integer"): 0.1, (8, "fractional"): 5e-4, (8, "nova"): 5e-4}


@pytest.mark.parametrize("key", sorted(POINT_SETS))
@pytest.mark.parametrize("shape,pad", [((2, 5, 13, 11), (1, 1)), ((1, 3, 7, 9), (0, 0)), ((1, 4, 8, 8), (2, 1))])
def test_fp32_winograd_equals_direct_conv(key, shape, pad):
    g = torch.Generator().manual_seed(zlib.crc32(repr((key, shape)).encode()))
    x = torch.randn(shape, generator=g)
    w = torch.randn(6, shape[1], 3, 3, generator=g)
    b = torch.randn(6, generator=g)
    ref = torch.nn.functional.conv2d(x, w, b, padding=pad)
    y = _run(key[0], POINT_SETS[key], x, w, b, pad)
    assert y.shape == ref.shape
    assert float((y - ref).norm() / ref.norm()) <= FP32_BOUND.get(key, 1e-4)


@pytest.mark.parametrize("m", [2, 4, 6])
def test_depthwise_winograd_equals_direct_conv(m):
    g = torch.Generator().manual_seed(m)
    x = torch.randn(2, 6, 10, 9, generator=g)
    w = torch.randn(6, 1, 3, 3, generator=g)
    ref = torch.nn.functional.conv2d(x, w, None, padding=1, groups=6)
    name = "integer" if m == 2 else "nova"
    y = _run(m, POINT_SETS[(m, name)], x, w, None, (1, 1))
    assert float((y - ref).norm() / ref.norm()) <= 1e-4


def test_fp16_mode_is_fp16_arithmetic_and_point_choice_matters():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 16, 16, generator=g)
    w = torch.randn(8, 8, 3, 3, generator=g) * 0.2
    ref = torch.nn.functional.conv2d(x, w, None, padding=1)

    def err(m, name):
        return float((_run(m, POINT_SETS[(m, name)], x, w, None, (1, 1), fp16=True) - ref).norm() / ref.norm())

    assert 1e-4 < err(2, "integer") < 1e-2  # fp16 rounding is really there
    assert err(6, "fractional") < err(6, "integer") / 5  # well-conditioned points keep fp16 usable


class Mixed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c3 = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.c1 = torch.nn.Conv2d(8, 8, 1)
        self.s2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.gr = torch.nn.Conv2d(8, 8, 3, padding=1, groups=2)

    def forward(self, x):
        return self.gr(self.dw(self.s2(self.c1(self.c3(x)))))


def test_pass_converts_eligible_convs_and_lists_the_rest():
    torch.manual_seed(0)
    model = Mixed().eval()
    x = torch.randn(2, 4, 12, 12)
    plan = Plan(passes=(PassConfig("winograd_conv", (("m", 4), ("points", "nova"))),))
    cm = qcompile.compile(model, plan=plan, example_inputs=(x,))
    rep = cm.report.passes[0]
    assert rep.layers_changed == ["c3", "dw"]
    reasons = dict(rep.skipped)
    assert reasons["c1"] == "its kernel is 1x1, not 3x3"
    assert reasons["s2"].startswith("stride [2, 2]")
    assert reasons["gr"].startswith("it is a grouped convolution (groups=2, not depthwise)")
    ops = [n.target for _, n in cm.program.nodes() if n.op == "call_function"]
    assert torch.ops.qcompile.winograd_conv2d.default in ops
    torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)


def test_naming_an_ineligible_layer_or_a_bad_point_set_is_an_error():
    model = Mixed().eval()
    x = torch.randn(1, 4, 8, 8)
    plan = Plan(passes=(PassConfig("winograd_conv", (("layers", ("c3", "c1")),)),))
    with pytest.raises(PassError, match="layer 'c1' was named in the plan but its kernel is 1x1, not 3x3"):
        qcompile.compile(model, plan=plan, example_inputs=(x,))
    plan = Plan(passes=(PassConfig("winograd_conv", (("points", "0,1,1,2,-2"),)),))
    with pytest.raises(
        PlanError, match=r"points '0,1,1,2,-2' for F\(4,3\): interpolation points must be distinct; duplicated: \['1'\]"
    ):
        qcompile.compile(model, plan=plan, example_inputs=(x,))
    with pytest.raises(PlanError, match=r"no point set 'nova' for F\(2,3\)"):
        qcompile.compile(
            model, plan=Plan(passes=(PassConfig("winograd_conv", (("m", 2), ("points", "nova"))),)), example_inputs=(x,)
        )
    with pytest.raises(PlanError, match="m must be in"):
        qcompile.compile(model, plan=Plan(passes=(PassConfig("winograd_conv", (("m", 12),)),)), example_inputs=(x,))


@pytest.mark.slow
def test_winograd_keeps_fmnist_vgg_predictions_in_fp32():
    """On the first 500 Fashion-MNIST test images Winograd F(4,3) and F(6,3) change at most one top-1
    prediction of the fp32 model (the full 10,000-image top-1 is benchmarks/winograd.py's table)."""
    from qcompile.eval.images import fashion_mnist
    from qcompile.eval.zoo import load_model

    zm = load_model("fmnist-vgg")
    x = fashion_mnist("test")[0][:500]
    with torch.no_grad():
        ref = torch.cat([zm.model(b) for b in x.split(250)]).argmax(-1)
    for plan in ("winograd-f4", "winograd-f6"):
        cm = qcompile.compile(zm.model, plan=plan, example_inputs=(x[:250],))
        assert cm.report.passes[0].layers_changed, plan
        got = torch.cat([cm(b) for b in x.split(250)]).argmax(-1)
        assert int((got != ref).sum()) <= 1, (plan, int((got != ref).sum()))


def test_point_search_is_verified_deterministic_and_never_worse_than_its_starts():
    from qcompile.quant.winograd_search import ConvSample, fp16_error, search, snap

    g = torch.Generator().manual_seed(0)
    samples = [ConvSample(torch.randn(4, 8, 12, 12, generator=g), torch.randn(8, 8, 3, 3, generator=g) * 0.2, (1, 1))]
    starts = [POINT_SETS[(6, "nova")], POINT_SETS[(6, "fractional")]]
    a = search(6, samples, starts=starts, generations=3, population=4, seed=1)
    b = search(6, samples, starts=starts, generations=3, population=4, seed=1)
    assert a == b
    verify(transforms(a.points, 6))
    assert a.error == fp16_error(a.points, 6, samples)
    assert a.error <= min(fp16_error(s, 6, samples) for s in starts)
    assert all(x.denominator <= 10 for x in a.points)
    assert snap([0.5, 0.5, 1.0], 10) is None  # duplicates after snapping are rejected


def test_per_layer_overrides_pick_tile_and_points():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, padding=1)
    ).eval()
    x = torch.randn(1, 3, 10, 10)
    opts = (("m", 4), ("points", "nova"), ("overrides", (("2", 6, "0,1/2,-1/2,1,-1,2,-2"),)))
    cm = qcompile.compile(model, plan=Plan(passes=(PassConfig("winograd_conv", opts),)), example_inputs=(x,))
    ops = {
        n.meta["qcompile_path"]: n
        for _, n in cm.program.nodes()
        if n.target == torch.ops.qcompile.winograd_conv2d.default
    }
    assert ops["0"].args[5] == 4 and ops["2"].args[5] == 6
    entry = cm.program.entries["forward"]
    bt = cm.program.state[entry.slot_of(ops["2"].args[3]).name]
    assert bt.shape == (8, 8)  # F(6,3): alpha = 8
    torch.testing.assert_close(cm(x), model(x), rtol=1e-4, atol=1e-5)
