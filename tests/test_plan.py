import dataclasses
import json

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile import PRESETS, LayerRule, Plan, PlanError, QuantSpec
from qcompile.plan import W8_PER_CHANNEL, Granularity, LmHead, PassConfig, get_plan


def quant_specs():
    def build(bits, gran, sym, dyn, gs):
        return QuantSpec(bits, gran, sym, gs if gran is Granularity.PER_GROUP else None, dyn)

    return st.builds(
        build,
        st.sampled_from([2, 3, 4, 6, 8]),
        st.sampled_from(list(Granularity)),
        st.booleans(),
        st.booleans(),
        st.sampled_from([32, 64, 128]),
    )


globs = st.text(alphabet="abcxyz_.*?0123", min_size=1, max_size=12)
scalars = st.one_of(
    st.integers(-5, 5), st.floats(allow_nan=False, allow_infinity=False, width=32), st.text(max_size=5), st.booleans()
)

plans = st.builds(
    Plan,
    name=st.text(min_size=1, max_size=10),
    description=st.text(max_size=20),
    passes=st.lists(
        st.builds(
            PassConfig,
            st.sampled_from(["quantize_weights", "x"]),
            st.lists(st.tuples(st.sampled_from(["a", "b"]), scalars), unique_by=lambda t: t[0]).map(tuple),
        ),
        max_size=3,
    ).map(tuple),
    weight=st.none() | quant_specs(),
    activation=st.none() | quant_specs(),
    skip=st.lists(globs, max_size=2).map(tuple),
    lm_head=st.sampled_from(list(LmHead)),
    rules=st.lists(
        st.builds(LayerRule, globs, st.none() | quant_specs(), st.none() | quant_specs(), st.none() | st.booleans()),
        max_size=3,
    ).map(tuple),
)


@settings(max_examples=60, deadline=None)
@given(plans)
def test_plan_round_trips_yaml_and_json_exactly(plan):
    assert Plan.from_yaml(plan.to_yaml()) == plan
    assert Plan.from_json(plan.to_json()) == plan
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_presets_round_trip_and_are_named():
    assert {"fp32", "w8a8-rtn"} <= set(PRESETS)
    for name, plan in PRESETS.items():
        assert plan.name == name
        assert Plan.from_yaml(plan.to_yaml()) == plan


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(PlanError, match=r"unknown key\(s\) \['wieght'\].*allowed keys: \['name'"):
        Plan.from_dict({"name": "x", "wieght": None})


def test_bad_enum_lists_allowed_values():
    with pytest.raises(PlanError, match=r"plan.weight.granularity: 'per_row' is not allowed; allowed: \['per_tensor'"):
        Plan.from_dict({"weight": {"bits": 8, "granularity": "per_row"}})


def test_bad_bits_lists_allowed():
    with pytest.raises(PlanError, match=r"bits=5 is not supported; allowed: \[2, 3, 4, 6, 8\]"):
        Plan.from_dict({"weight": {"bits": 5, "granularity": "per_channel"}})


def test_bad_types_are_rejected():
    with pytest.raises(PlanError, match="expected an integer"):
        Plan.from_dict({"weight": {"bits": "8", "granularity": "per_channel"}})
    with pytest.raises(PlanError, match="expected true/false"):
        Plan.from_dict({"weight": {"bits": 8, "granularity": "per_channel", "symmetric": "yes"}})
    with pytest.raises(PlanError, match="expected a list"):
        Plan.from_dict({"rules": {"match": "*"}})


def test_group_size_rules():
    with pytest.raises(PlanError, match="needs a positive group_size"):
        QuantSpec(4, Granularity.PER_GROUP)
    with pytest.raises(PlanError, match="only meaningful"):
        QuantSpec(4, Granularity.PER_CHANNEL, group_size=128)


def test_malformed_yaml_and_json():
    with pytest.raises(PlanError, match="malformed plan YAML"):
        Plan.from_yaml("name: [unclosed")
    with pytest.raises(PlanError, match="malformed plan JSON"):
        Plan.from_json("{name: 1")
    with pytest.raises(PlanError, match="expected a mapping"):
        Plan.from_yaml("- just\n- a list\n")


def test_newer_plan_version_is_rejected():
    with pytest.raises(PlanError, match="newer than this qcompile"):
        Plan.from_dict({"version": 99})


def test_get_plan_by_name_file_and_object(tmp_path):
    assert get_plan("w8a8-rtn") is PRESETS["w8a8-rtn"]
    with pytest.raises(PlanError, match=r"unknown preset 'w9a9'; presets: \["):
        get_plan("w9a9")
    p = tmp_path / "plan.yaml"
    p.write_text(PRESETS["w8a8-rtn"].to_yaml())
    assert get_plan(str(p)) == PRESETS["w8a8-rtn"]
    j = tmp_path / "plan.json"
    j.write_text(PRESETS["w8a8-rtn"].to_json())
    assert get_plan(j) == PRESETS["w8a8-rtn"]
    with pytest.raises(PlanError, match="cannot read plan file"):
        get_plan(str(tmp_path / "missing.yaml"))


def test_rules_override_in_order_and_field_by_field():
    w4 = QuantSpec(4, Granularity.PER_GROUP, group_size=128)
    a6 = QuantSpec(6, Granularity.PER_TOKEN)
    plan = PRESETS["w8a8-rtn"].with_rules(
        LayerRule("*.mlp.*", weight=w4),
        LayerRule("*.down_proj", activation=a6),
        LayerRule("*.layers.0.*", skip=True),
    )
    r = plan.resolve("model.layers.3.mlp.down_proj")
    assert r.weight == w4 and r.activation == a6 and not r.skip and r.rules == (0, 1)
    r = plan.resolve("model.layers.3.self_attn.q_proj")
    assert r.weight == PRESETS["w8a8-rtn"].weight and r.rules == ()
    assert plan.resolve("model.layers.0.mlp.up_proj").skip
    assert plan.resolve("lm_head").skip  # default skip glob


def test_plans_are_frozen():
    plan = PRESETS["fp32"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.name = "other"  # type: ignore[misc]
    assert yaml.safe_load(plan.to_yaml())["version"] == 1


def test_every_preset_that_quantizes_weights_says_how():
    """A preset running quantize_weights or fold_quant_steps with no weight spec would quantize nothing
    (each layer reported as skipped): every such preset carries a weight spec."""
    for name, plan in PRESETS.items():
        if {p.name for p in plan.passes} & {"quantize_weights", "fold_quant_steps"}:
            assert plan.weight is not None or any(r.weight is not None for r in plan.rules), name


# ---- the lm_head option (issue 17) ----------------------------------------------------------


@pytest.mark.parametrize("setting", ["fp32", "int8", "plan"])
def test_lm_head_round_trips_and_is_typed(setting):
    plan = get_plan("w4a16-rtn-g128").with_lm_head(setting)
    assert plan.lm_head is LmHead(setting)
    assert plan.to_dict()["lm_head"] == setting
    assert Plan.from_yaml(plan.to_yaml()) == plan and Plan.from_json(plan.to_json()) == plan
    assert Plan(lm_head=setting).lm_head is LmHead(setting)  # a string is read as the enum


def test_lm_head_bad_value_is_a_plan_error_listing_the_settings():
    for bad in ("int4", "", None, 8):
        with pytest.raises(PlanError, match=r"lm_head.*\['fp32', 'int8', 'plan'\]"):
            Plan(lm_head=bad)
        with pytest.raises(PlanError, match=r"fp32.*int8.*plan"):
            get_plan("w8a8-rtn").with_lm_head(bad)
    with pytest.raises(PlanError, match=r"plan.lm_head: 'int4' is not allowed; allowed: \['fp32', 'int8', 'plan'\]"):
        Plan.from_yaml("name: x\nlm_head: int4\n")


def test_lm_head_settings_resolve_the_head_weight_only():
    w4 = get_plan("w4a16-rtn-g128")
    w8a8 = get_plan("w8a8-rtn")
    for plan in (w4, w8a8):
        fp32 = plan.resolve("lm_head")
        assert fp32.skip and fp32.lm_head is LmHead.FP32  # today's behaviour: the default skip glob
        int8 = plan.with_lm_head("int8").resolve("lm_head")
        assert not int8.skip and int8.weight == W8_PER_CHANNEL and int8.activation is None
        own = plan.with_lm_head("plan").resolve("lm_head")
        assert not own.skip and own.weight == plan.weight and own.activation is None
        # other layers are untouched by the setting
        assert plan.with_lm_head("int8").resolve("model.layers.0.mlp.up_proj") == plan.resolve(
            "model.layers.0.mlp.up_proj"
        )
    assert get_plan("fp32").with_lm_head("plan").resolve("lm_head").weight is None  # nothing to quantize
    # rules still override the head setting, field by field
    kept = w4.with_lm_head("int8").with_rules(LayerRule("lm_head", skip=True))
    assert kept.resolve("lm_head").skip
    # the name says what changed; the same setting is the same plan
    assert w4.with_lm_head("int8").name == "w4a16-rtn-g128+lm_head-int8"
    assert w4.with_lm_head("fp32") is w4
