from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import qcompile
from qcompile import LayerRule, PassConfig, PassError, Plan, PlanError
from qcompile.ir.facts import Fact
from qcompile.ir.patterns import find_linears
from qcompile.passes.base import PASSES, Pass, PassContext, PassResult
from qcompile.passes.manager import PassManager
from qcompile.plan import PRESETS


@pytest.fixture()
def extra_passes():
    """Test-only passes that isolate the manager's logic (requires/provides, failures)."""

    @dataclass(frozen=True)
    class NeedsSmoothing(Pass):
        name: ClassVar[str] = "test_needs_smoothing"
        requires: ClassVar[frozenset[Fact]] = frozenset({Fact.CAPTURED, Fact.SMOOTHED})

        def run(self, program, ctx):  # pragma: no cover - never reached
            return PassResult(program, False)

    @dataclass(frozen=True)
    class FailsOnSecondLinear(Pass):
        name: ClassVar[str] = "test_fails"
        limit: int = 1

        def run(self, program, ctx):
            for i, m in enumerate(find_linears(program)):
                ctx.at(m.entry, m.node)
                if i == self.limit:
                    raise ValueError("boom")
            return PassResult(program, False)

    @dataclass(frozen=True)
    class BreaksShapes(Pass):
        name: ClassVar[str] = "test_breaks_shapes"

        def run(self, program, ctx):
            m = next(iter(find_linears(program)))
            w = program.state[m.weight_key]
            program.state[m.weight_key] = torch.zeros(w.shape[0], w.shape[1] + 3)
            return PassResult(program, True)

    for cls in (NeedsSmoothing, FailsOnSecondLinear, BreaksShapes):
        PASSES[cls.name] = cls
    yield
    for cls in (NeedsSmoothing, FailsOnSecondLinear, BreaksShapes):
        del PASSES[cls.name]


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()


def test_w8a8_replaces_every_selected_linear_and_skips_lm_head(tiny_llama):
    cm = qcompile.compile(tiny_llama, plan="w8a8-rtn", max_cache_len=64)
    prog = cm.program
    remaining = [m.path for m in find_linears(prog)]
    assert set(remaining) == {"lm_head"}  # kept in float by the preset's skip glob
    ops = [n for _, n in prog.nodes() if n.op == "call_function" and n.target == torch.ops.qcompile.linear_w8a8.default]
    assert len(ops) == 3 * 2 * 7  # 3 entries x 2 layers x 7 linears
    rep = cm.report.passes[0]
    assert rep.name == "quantize_weights" and rep.modified and len(rep.layers_changed) == 14
    head = ("lm_head", "lm_head kept in float (plan lm_head: fp32; int8 or plan quantizes it)")
    assert head in [tuple(s) for s in rep.skipped]
    assert rep.nodes_added > 0 and rep.nodes_removed > 0
    assert cm.report.weight_bytes["int8"] > 0
    # float weights of quantized layers are gone; quantized ones are shared by the entries
    assert "model.layers.0.mlp.up_proj.weight" not in prog.state
    assert prog.state["model.layers.0.mlp.up_proj.qweight"].dtype == torch.int8
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        ref = tiny_llama(x).logits
    err = (cm(x) - ref).abs().max() / ref.abs().max()
    assert 0 < float(err) < 0.05


def test_rules_select_layers_by_glob(tiny_llama):
    plan = PRESETS["w8a8-rtn"].with_rules(LayerRule("*.mlp.*", skip=True))
    cm = qcompile.compile(tiny_llama, plan=plan, max_cache_len=64)
    assert {m.path for m in find_linears(cm.program)} == {"lm_head"} | {
        f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")
    }


def test_rule_matching_no_layer_is_a_warning_in_the_report(tiny_llama_program):
    plan = PRESETS["w8a8-rtn"].with_rules(LayerRule("*.no_such_layer", skip=True))
    cm = qcompile.compile(tiny_llama_program.copy(), plan=plan)
    assert any("no_such_layer" in w and "matches no layer" in w for w in cm.report.warnings)


def test_fp32_plan_changes_nothing(tiny_llama_program, tiny_llama):
    cm = qcompile.compile(tiny_llama_program.copy(), plan="fp32")
    x = torch.randint(0, 256, (1, 9))
    assert torch.equal(cm(x), tiny_llama(x).logits)


def test_order_is_checked_before_anything_runs(extra_passes):
    plan = Plan(passes=(PassConfig("test_needs_smoothing"),))
    with pytest.raises(PlanError, match=r"requires smoothed \(SmoothQuant scales .*\), which no earlier pass provides"):
        PassManager(plan)


def test_unknown_pass_and_option():
    with pytest.raises(PlanError, match="unknown pass 'smoosh'; passes: \\["):
        PassManager(Plan(passes=(PassConfig("smoosh"),)))
    with pytest.raises(PlanError, match=r"unknown option\(s\) \['alpha'\]"):
        PassManager(Plan(passes=(PassConfig("quantize_weights", (("alpha", 0.5),)),)))


def test_failure_names_pass_node_path_and_previous_passes(extra_passes):
    m = _mlp()
    w8a8 = PRESETS["w8a8-rtn"]
    plan = Plan(
        passes=(PassConfig("quantize_weights"), PassConfig("test_fails", (("limit", 0),))),
        weight=w8a8.weight,
        activation=w8a8.activation,
        rules=(LayerRule("0", skip=True),),
    )
    with pytest.raises(PassError) as ei:
        qcompile.compile(m, plan=plan, example_inputs=(torch.randn(2, 16),))
    msg = str(ei.value)
    assert "pass 'test_fails' failed on node %linear" in msg
    assert "module path '0'" in msg
    assert "after passes ['quantize_weights']" in msg and "ValueError: boom" in msg


def test_verifier_catches_a_pass_that_breaks_shapes(extra_passes):
    plan = Plan(passes=(PassConfig("test_breaks_shapes"),))
    with pytest.raises(PassError, match=r"test_breaks_shapes.*shape/dtype check failed at node %linear"):
        qcompile.compile(_mlp(), plan=plan, example_inputs=(torch.randn(2, 16),))


def test_dump_dir_has_the_graph_after_each_pass(tmp_path):
    qcompile.compile(_mlp(), plan="w8a8-rtn", example_inputs=(torch.randn(2, 16),), dump_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["00_captured.txt", "01_quantize_weights.txt"]
    assert "aten.linear.default" in (tmp_path / files[0]).read_text()
    after = (tmp_path / files[1]).read_text()
    assert "qcompile.linear_w8a8.default" in after and "aten.linear.default" not in after
    assert "# 0" in after  # module paths are printed


def test_unsupported_combination_is_a_plan_error():
    plan = PRESETS["w8a8-rtn"].with_rules(LayerRule("*", weight=qcompile.QuantSpec(4, qcompile.Granularity.PER_TENSOR)))
    with pytest.raises(
        PassError, match="weight granularity 'per_tensor' is not supported; supported: weights: 2, 3, 4, 6 or 8 bits"
    ):
        qcompile.compile(_mlp(), plan=plan, example_inputs=(torch.randn(2, 16),))


def test_pass_context_is_plain_data():
    ctx = PassContext(plan=PRESETS["fp32"])
    assert ctx.node is None and ctx.calib is None


def test_group_size_must_divide_channels_unless_partial_groups_allowed(tiny_llama):
    import qcompile
    from qcompile.errors import PassError
    from qcompile.plan import Granularity, PassConfig, Plan, QuantSpec

    def plan(partial: bool) -> Plan:
        w = QuantSpec(4, Granularity.PER_GROUP, group_size=48, partial_last_group=partial)
        return Plan(name="g48", passes=(PassConfig("quantize_weights"),), weight=w)

    with pytest.raises(
        PassError,
        match=r"group_size 48 does not divide its 64 input channels; use a divisor \(e.g. \[8, 16, 32, 64\]\)",
    ):
        qcompile.compile(tiny_llama, plan=plan(False), lm_entries=("forward",), max_cache_len=64)
    cm = qcompile.compile(tiny_llama, plan=plan(True), lm_entries=("forward",), max_cache_len=64)
    assert cm(torch.randint(0, 256, (1, 8))).isfinite().all()
