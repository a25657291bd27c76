"""Plans: what to do to a model, as frozen, typed, versioned data.

A :class:`Plan` lists the passes to run (in order, each with its options), the default
quantization of linear layers' weights and activations, and :class:`LayerRule` s that override
those defaults for layers selected by a glob on their module path (``"*.mlp.down_proj"``).
Later rules override earlier ones, field by field; a rule field left ``None`` inherits.

Plans round-trip exactly through ``to_dict``/``from_dict``, YAML and JSON. Unknown keys and bad
values raise :class:`~qcompile.errors.PlanError` naming the key and listing the allowed values.
Named plans live in :data:`PRESETS`.

Plans come from people a deployment does not control, so reading one is bounded: a plan file is a
regular file of at most :data:`MAX_PLAN_BYTES` of UTF-8; a document holds at most
:data:`MAX_PLAN_NODES` values counted with YAML aliases expanded (a "billion laughs" alias bomb is
refused, not expanded), at most :data:`MAX_PLAN_ALIASES` aliases, nesting at most
:data:`MAX_PLAN_DEPTH` deep, and no YAML tags. Every breach is a PlanError saying which bound.
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import json
import math
import os
import re
import reprlib
import stat
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import yaml

from qcompile.errors import PlanError
from qcompile.quant.spec import BITS, Granularity, Grid, QuantSpec

PLAN_VERSION = 1
ALLOWED_BITS = BITS  # the widths every spec and pass option accepts (qcompile.quant.spec)

# Bounds on reading a plan. The largest plan qcompile writes (assign_precision's per-layer rules for an
# 80-layer model) is ~120 KB and ~9,000 values, nested 6 deep; pure-Python YAML reads 1 MiB in ~1-3 s.
MAX_PLAN_BYTES = 1 << 20  # characters of YAML/JSON text (bytes of a plan file)
MAX_PLAN_NODES = 50_000  # values in the document, YAML aliases expanded
MAX_PLAN_ALIASES = 100  # YAML aliases (*name) in the document
MAX_PLAN_DEPTH = 32  # nesting of mappings and lists

_repr = reprlib.Repr()  # values in messages, bounded: a hostile value does not become a megabyte of message
_repr.maxstring, _repr.maxother, _repr.maxlist, _repr.maxdict, _repr.maxlevel = 80, 80, 6, 6, 3
_short = _repr.repr


class WeightMethod(str, enum.Enum):
    """Weight quantization algorithm."""

    RTN = "rtn"
    GPTQ = "gptq"  # needs calibration data; see qcompile.quant.gptq
    DECOUPLEQ = "decoupleq"  # needs calibration data and asymmetric weights; see qcompile.quant.decoupleq


class LmHead(str, enum.Enum):
    """What the plan does with the language-model head (the linears matching :data:`LM_HEAD_GLOB`).

    Every setting leaves the head's activations in float (weight-only): the head reads the final normed
    hidden state, whose few outlier channels would set every token's int8 step, and its error lands on
    every one of the 49k-262k logits; decode is bound by reading the head's weight, which weight-only
    quantization shrinks.
    """

    FP32 = "fp32"  # today's behaviour: the head follows ``skip`` (whose default glob keeps it in float)
    INT8 = "int8"  # int8 codes, symmetric, one scale per output channel (vocab row); float activations
    PLAN = "plan"  # the plan's own weight spec (``weight``), float activations


# the module paths the lm_head setting selects, and the default ``skip`` glob
LM_HEAD_GLOB = "*lm_head*"


class NonFinite(str, enum.Enum):
    """What compile does with NaN/±Inf values in the model's weights and buffers (Program state)."""

    ERROR = "error"  # refuse, naming every tensor, its layer, the counts and the first index
    ZERO = "zero"  # replace them by 0 before any pass; the compile report lists every replacement


class FloatCompute(str, enum.Enum):
    """The precision weight-only linears (float activations) multiply in, where a kernel offers a choice.

    ``bf16`` rounds the activations of weight-only 4-bit linears to bfloat16 (round to nearest even)
    before the dot product: the TVM backend's CPU kernel on AVX-512 BF16 (``vdpbf16ps``,
    :mod:`qcompile.codegen.tvm.kernels.x86_bf16`), twice the products per instruction of fp32 FMAs.
    It changes the numbers (8 significant bits per activation), so it is an opt-in with its own
    measured perplexity. Where the CPU lacks AVX-512 BF16, or on the torch backend, the linears
    compute in fp32 and the compile report says so.
    """

    FP32 = "fp32"
    BF16 = "bf16"


@dataclass(frozen=True)
class LayerRule:
    """Overrides for the layers whose module path matches ``match`` (fnmatch glob).

    ``skip=True`` keeps matching layers in floating point. ``weight``/``activation`` replace the
    plan's defaults for matching layers; ``None`` inherits from earlier rules and the defaults.
    """

    match: str
    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    skip: bool | None = None

    def matches(self, path: str) -> bool:
        return fnmatch.fnmatchcase(path, self.match)


@dataclass(frozen=True)
class PassConfig:
    """One pass of the plan: its registered name and its options (checked by the pass class)."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)


@dataclass(frozen=True)
class LayerQuant:
    """The resolved quantization of one layer (the result of applying the rules)."""

    weight: QuantSpec | None
    activation: QuantSpec | None
    skip: bool
    rules: tuple[int, ...]  # indices of the rules that matched, in order
    lm_head: LmHead | None = None  # the plan's lm_head setting when the layer is the head (LM_HEAD_GLOB), else None


@dataclass(frozen=True)
class Plan:
    """An ordered list of passes plus per-layer quantization settings."""

    name: str = "custom"
    description: str = ""
    version: int = PLAN_VERSION
    passes: tuple[PassConfig, ...] = ()
    weight: QuantSpec | None = None
    activation: QuantSpec | None = None
    weight_method: WeightMethod = WeightMethod.RTN
    skip: tuple[str, ...] = (LM_HEAD_GLOB,)  # globs kept in float by default
    rules: tuple[LayerRule, ...] = ()
    fallback: str | None = None  # "torch": nodes the backend cannot lower run with torch (reported)
    arch: str | None = None  # CUDA arch for target "cuda" ("sm_80", "sm_86", "sm_89", "sm_90")
    nonfinite: NonFinite = NonFinite.ERROR  # NaN/±Inf weights: "error", or "zero" (replaced by 0, reported)
    lm_head: LmHead = LmHead.FP32  # the head (LM_HEAD_GLOB): "fp32" (follows skip), "int8" or "plan" (weight-only)
    float_compute: FloatCompute = FloatCompute.FP32  # weight-only linears' activations: "fp32" or "bf16"

    def __post_init__(self) -> None:
        for key, kind in (("lm_head", LmHead), ("nonfinite", NonFinite), ("float_compute", FloatCompute)):
            object.__setattr__(self, key, enum_setting(kind, key, getattr(self, key)))
        if self.fallback not in (None, "torch"):
            raise PlanError(f"fallback must be 'torch' or absent, got {self.fallback!r}")
        if self.arch is not None and not re.fullmatch(r"sm_\d+a?", self.arch):
            raise PlanError(f"arch must look like 'sm_90', got {self.arch!r}")
        if self.version > PLAN_VERSION:
            raise PlanError(
                f"plan version {self.version} is newer than this qcompile understands "
                f"(<= {PLAN_VERSION}); upgrade qcompile"
            )
        if self.version < 1:
            raise PlanError(f"plan version must be >= 1, got {self.version}")

    # ---- layer selection -------------------------------------------------------------------
    def resolve(self, path: str) -> LayerQuant:
        """Quantization settings for the layer at module path ``path``: the defaults, the ``skip``
        globs, then (for the head, :data:`LM_HEAD_GLOB`) the ``lm_head`` setting, then the rules."""
        weight, activation = self.weight, self.activation
        skip = any(fnmatch.fnmatchcase(path, g) for g in self.skip)
        head = self.lm_head if fnmatch.fnmatchcase(path, LM_HEAD_GLOB) else None
        if head is LmHead.INT8:
            weight, activation, skip = W8_PER_CHANNEL, None, False
        elif head is LmHead.PLAN:
            activation, skip = None, False
        matched: list[int] = []
        for i, rule in enumerate(self.rules):
            if not rule.matches(path):
                continue
            matched.append(i)
            if rule.weight is not None:
                weight = rule.weight
            if rule.activation is not None:
                activation = rule.activation
            if rule.skip is not None:
                skip = rule.skip
        return LayerQuant(weight, activation, skip, tuple(matched), head)

    # ---- serialization ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        _check_shape(data)
        return from_plain(cls, data, "plan")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        _check_text_size(text, "JSON")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"malformed plan JSON: {e}") from None
        except RecursionError:  # the C decoder's own guard on nesting
            raise PlanError(f"plan JSON is nested deeper than {MAX_PLAN_DEPTH} levels") from None
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Plan:
        _check_text_size(text, "YAML")
        loader = _PlanLoader(text)
        try:
            data = loader.get_single_data()
        except yaml.YAMLError as e:
            raise PlanError(f"malformed plan YAML: {e}") from None
        finally:
            loader.dispose()
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: str | Path) -> Plan:
        p = Path(path)
        text = _read_plan_file(p)
        try:
            if p.suffix.lower() == ".json":
                return cls.from_json(text)
            return cls.from_yaml(text)
        except PlanError as e:
            raise PlanError(f"plan file {p}: {e}") from None

    def with_lm_head(self, setting: LmHead | str) -> Plan:
        """A copy whose head is ``setting`` ("fp32", "int8" or "plan"); the name says so when it changes
        (``w8a8-rtn+lm_head-int8``). PlanError listing the settings for any other value."""
        value = lm_head_setting(setting)
        if value is self.lm_head:
            return self
        return dataclasses.replace(self, lm_head=value, name=f"{self.name}+lm_head-{value.value}")

    def with_float_compute(self, setting: FloatCompute | str) -> Plan:
        """A copy whose weight-only linears compute in ``setting`` ("fp32" or "bf16"); the name says so
        when it changes (``w4a16-rtn-g32-asym+bf16``). PlanError listing the settings for any other value."""
        value = enum_setting(FloatCompute, "float_compute", setting)
        if value is self.float_compute:
            return self
        return dataclasses.replace(self, float_compute=value, name=f"{self.name}+{value.value}")

    def with_rules(self, *rules: LayerRule) -> Plan:
        """A copy with ``rules`` appended (they override the existing ones)."""
        return dataclasses.replace(self, rules=self.rules + tuple(rules))


E = typing.TypeVar("E", bound=enum.Enum)


def enum_setting(kind: type[E], key: str, value: Any) -> E:
    """``value`` as a member of the plan setting ``kind`` (named ``key``); PlanError listing the values otherwise."""
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except (ValueError, TypeError):
        raise PlanError(f"{key} must be one of {[m.value for m in kind]}, got {_short(value)}") from None


def lm_head_setting(value: Any) -> LmHead:
    """``value`` as an :class:`LmHead`; PlanError listing the settings otherwise."""
    return enum_setting(LmHead, "lm_head", value)


# ---- presets ---------------------------------------------------------------------------------

W8_PER_CHANNEL = QuantSpec(bits=8, granularity=Granularity.PER_CHANNEL, symmetric=True)
A8_PER_TOKEN = QuantSpec(bits=8, granularity=Granularity.PER_TOKEN, symmetric=True, dynamic=True)

PRESETS: dict[str, Plan] = {}
# Presets whose ops the TVM backend has no kernels for yet (static activation quantization, quantized
# caches, Winograd convolution): those nodes run with torch under the tvm backend (listed in the report).
TORCH_FALLBACK = "torch"


def register_preset(plan: Plan) -> Plan:
    """Add ``plan`` to :data:`PRESETS` under ``plan.name`` (names are unique)."""
    if plan.name in PRESETS:
        raise PlanError(f"preset {plan.name!r} is already registered")
    PRESETS[plan.name] = plan
    return plan


register_preset(Plan(name="fp32", description="No quantization: the captured graph as is."))
register_preset(
    Plan(
        name="w8a8-rtn",
        description="Round-to-nearest int8 weights (per output channel, symmetric) and dynamic "
        "per-token symmetric int8 activations; int32 accumulation. lm_head stays fp32.",
        passes=(PassConfig("quantize_weights"),),
        weight=W8_PER_CHANNEL,
        activation=A8_PER_TOKEN,
    )
)


register_preset(
    Plan(
        name="w6a6-rtn",
        description="Round-to-nearest 6-bit symmetric weights (group 128 along K) and dynamic per-token "
        "symmetric 6-bit activations; int32 accumulation per group. The RTN baseline for FlexQ.",
        passes=(PassConfig("quantize_weights"),),
        weight=QuantSpec(
            bits=6, granularity=Granularity.PER_GROUP, symmetric=True, group_size=128, partial_last_group=True
        ),
        activation=QuantSpec(bits=6, granularity=Granularity.PER_TOKEN, symmetric=True, dynamic=True),
    )
)
register_preset(
    Plan(
        name="w4a16-rtn-g128",
        description="Weight-only round-to-nearest 4-bit symmetric weights, group 128 along K; fp32 activations.",
        passes=(PassConfig("quantize_weights"),),
        weight=QuantSpec(
            bits=4, granularity=Granularity.PER_GROUP, symmetric=True, group_size=128, partial_last_group=True
        ),
    )
)
register_preset(
    Plan(
        name="w4a16-rtn-g32-asym",
        description="Weight-only round-to-nearest 4-bit asymmetric (min/max, float offset) weights, "
        "group 32 along K; the grid of GGUF Q4_1.",
        passes=(PassConfig("quantize_weights"),),
        weight=QuantSpec(
            bits=4, granularity=Granularity.PER_GROUP, symmetric=False, group_size=32, partial_last_group=True
        ),
    )
)


# ---- SmoothQuant / SmoothQuant+ / GPTQ presets (issue 4) ------------------------------------

W4_G128 = QuantSpec(bits=4, granularity=Granularity.PER_GROUP, symmetric=True, group_size=128, partial_last_group=True)
W4_G128_ASYM = dataclasses.replace(W4_G128, symmetric=False)
SMOOTH_SEARCH = PassConfig("smooth_migration", (("alpha", "search"), ("value_out", True)))
# W8A8 also smooths down_proj's input (up->down): on the calibration split (4x512 tokens) that gave
# perplexity 40.12 against 40.61 without it, at alpha 0.5
SMOOTH_A8 = (("value_out", True), ("up_down", True))
register_preset(
    Plan(
        name="w8a8-smooth",
        description="SmoothQuant: activation outliers migrated into the weights (alpha 0.5, norm->q/k/v and "
        "norm->gate/up groups, v->o, up->down), then W8 per-channel symmetric, A8 dynamic per-token; int32 "
        "accumulation.",
        passes=(PassConfig("smooth_migration", (("alpha", 0.5), *SMOOTH_A8)), PassConfig("quantize_weights")),
        weight=W8_PER_CHANNEL,
        activation=A8_PER_TOKEN,
    )
)
register_preset(
    Plan(
        name="w8a8-smoothquant+",
        description="As w8a8-smooth, with the alpha of each group searched on calibration data (SmoothQuant+).",
        passes=(PassConfig("smooth_migration", (("alpha", "search"), *SMOOTH_A8)), PassConfig("quantize_weights")),
        weight=W8_PER_CHANNEL,
        activation=A8_PER_TOKEN,
    )
)
register_preset(
    Plan(
        name="w4a16-smoothquant+",
        description="SmoothQuant+: per-group alpha searched (step 0.05, or no smoothing) on calibration data to "
        "minimize the quantized group output error, then W4 symmetric group-128 RTN weights; fp32 activations.",
        passes=(SMOOTH_SEARCH, PassConfig("quantize_weights")),
        weight=W4_G128,
    )
)
register_preset(
    Plan(
        name="w4a16-smoothquant+-asym",
        description="As w4a16-smoothquant+ with asymmetric (min/max, float offset) group-128 weights.",
        passes=(SMOOTH_SEARCH, PassConfig("quantize_weights")),
        weight=W4_G128_ASYM,
    )
)
register_preset(
    Plan(
        name="w4a16-gptq-g128",
        description="GPTQ W4 symmetric group-128 weights (sequential, block by block; damp 0.01), no smoothing.",
        passes=(PassConfig("quantize_weights"),),
        weight=W4_G128,
        weight_method=WeightMethod.GPTQ,
    )
)
register_preset(
    Plan(
        name="w4a16-smoothquant+-gptq",
        description="SmoothQuant+ alpha search followed by GPTQ W4 symmetric group-128 weights.",
        passes=(SMOOTH_SEARCH, PassConfig("quantize_weights")),
        weight=W4_G128,
        weight_method=WeightMethod.GPTQ,
    )
)


# ---- MergeQuant presets (issue 4) ---------------------------------------------------------------


def _static(bits: int, granularity: Granularity = Granularity.PER_CHANNEL) -> QuantSpec:
    return QuantSpec(bits=bits, granularity=granularity, symmetric=True, dynamic=False)


def _mergequant(bits: int, weight: QuantSpec) -> Plan:
    return Plan(
        name=f"w{bits}a{bits}-mergequant",
        description=f"MergeQuant: static per-channel {bits}-bit activations whose steps are folded into the producing "
        "norm / linear (QSM), adaptive clipping, dimensional reconstruction of up->down; the weights absorb the "
        f"steps and are quantized to {bits} bits ({weight.granularity.value}"
        f"{'' if weight.group_size is None else f' {weight.group_size}'}); integer GEMM, no activation scale at run "
        "time.",
        passes=(PassConfig("fold_quant_steps"),),
        weight=weight,
        activation=_static(bits),
        fallback=TORCH_FALLBACK,
    )


register_preset(_mergequant(4, W4_G128))
register_preset(_mergequant(8, W8_PER_CHANNEL))
register_preset(
    Plan(
        name="w4a4-static-per-tensor",
        description="Static per-tensor 4-bit activations (one clipped step per layer input, folded as in "
        "w4a4-mergequant); W4 group-128 weights. The naive static baseline for MergeQuant.",
        passes=(PassConfig("fold_quant_steps", (("reconstruct", False),)),),
        weight=W4_G128,
        activation=_static(4, Granularity.PER_TENSOR),
        fallback=TORCH_FALLBACK,
    )
)
register_preset(
    Plan(
        name="w4a4-rtn",
        description="W4 group-128 symmetric RTN weights, dynamic per-token symmetric 4-bit activations "
        "(the dynamic baseline for w4a4-mergequant, same weight quantizer).",
        passes=(PassConfig("quantize_weights"),),
        weight=W4_G128,
        activation=QuantSpec(bits=4, granularity=Granularity.PER_TOKEN, symmetric=True, dynamic=True),
    )
)


for _m in (4, 6, 8):
    register_preset(
        Plan(
            name=f"winograd-f{_m}",
            description=f"3x3 stride-1 convolutions as Winograd F({_m},3) with the best verified point set "
            "(fp32 execution; set the pass option fp16: true to run it in fp16).",
            passes=(PassConfig("winograd_conv", (("m", _m), ("points", "best"))),),
            fallback=TORCH_FALLBACK,
        )
    )

# ---- CNN presets (issue 22): quantized convolutions (qcompile::quant_conv2d), with and without Winograd ----
# Activations are static per tensor: one calibrated step per layer input (compile(..., calib=input batches));
# the linears of the classifier become qcompile::linear_static, which the TVM backend runs with torch (fallback).
A8_STATIC_PER_TENSOR = QuantSpec(bits=8, granularity=Granularity.PER_TENSOR, symmetric=True, dynamic=False)
W4_PER_CHANNEL = QuantSpec(bits=4, granularity=Granularity.PER_CHANNEL, symmetric=True)
register_preset(
    Plan(
        name="cnn-w8a8",
        description="CNNs: int8 symmetric weights per output channel (convolutions, including depthwise and "
        "grouped, and linears) and static per-tensor symmetric int8 activations calibrated on input batches; "
        "exact integer convolution with int32 accumulation.",
        passes=(PassConfig("quantize_weights"),),
        weight=W8_PER_CHANNEL,
        activation=A8_STATIC_PER_TENSOR,
        fallback=TORCH_FALLBACK,
    )
)
register_preset(
    Plan(
        name="cnn-w4a16",
        description="CNNs: weight-only 4-bit symmetric weights per output channel (convolutions and linears); "
        "fp32 activations.",
        passes=(PassConfig("quantize_weights"),),
        weight=W4_PER_CHANNEL,
    )
)
register_preset(
    Plan(
        name="cnn-w8a8-winograd-f4",
        description="CNNs: 3x3 stride-1 convolutions as Winograd F(4,3) (best points, kept in float: Winograd "
        "transforms leave the integer domain, the report lists them), then cnn-w8a8 on the other convolutions "
        "and the linears.",
        passes=(PassConfig("winograd_conv", (("m", 4), ("points", "best"))), PassConfig("quantize_weights")),
        weight=W8_PER_CHANNEL,
        activation=A8_STATIC_PER_TENSOR,
        fallback=TORCH_FALLBACK,
    )
)

# ---- FlexQ presets (arXiv 2508.04405): W6 weights, A6 activations with A8 where it matters ----------
# Weights: 6-bit symmetric RTN, group 128 along K, stored densely packed (qcompile::packed_linear).
# Activations: dynamic symmetric per token, group 128 along K (FlexQ's granularity). SmolLM2's
# K = 576 is not a multiple of 128: the last group is shorter (partial_last_group).
W6_G128 = QuantSpec(bits=6, granularity=Granularity.PER_GROUP, symmetric=True, group_size=128, partial_last_group=True)
A6_G128 = QuantSpec(
    bits=6, granularity=Granularity.PER_GROUP, symmetric=True, group_size=128, dynamic=True, partial_last_group=True
)
A8_G128 = dataclasses.replace(A6_G128, bits=8)
FLEXQ_BUDGET = 1 / 7  # FlexQ's fixed rule (every down_proj at A8) is 1 of a Llama block's 7 linears

register_preset(
    Plan(
        name="w6a6",
        description="FlexQ W6A6: 6-bit symmetric weights (group 128, packed 4 codes / 3 bytes) and dynamic "
        "symmetric 6-bit activations per token and group of 128; int32 accumulation per group, fp32 rescale.",
        passes=(PassConfig("quantize_weights"),),
        weight=W6_G128,
        activation=A6_G128,
    )
)
register_preset(
    Plan(
        name="w6a8",
        description="FlexQ W6A8: 6-bit symmetric weights (group 128, packed) and dynamic symmetric 8-bit "
        "activations per token and group of 128 in every linear.",
        passes=(PassConfig("quantize_weights"),),
        weight=W6_G128,
        activation=A8_G128,
    )
)
register_preset(
    Plan(
        name="w6a8-flexq",
        description="FlexQ: W6 weights everywhere; 6-bit activations except in the linears that the "
        "assign_precision sensitivity analysis (on the calibration data) ranks most sensitive, which get "
        "8-bit activations; default budget 1/7 of the linears (the share of FlexQ's fixed down_proj rule).",
        passes=(PassConfig("assign_precision", (("budget", FLEXQ_BUDGET),)), PassConfig("quantize_weights")),
        weight=W6_G128,
        activation=A6_G128,
    )
)
register_preset(
    Plan(
        name="w6a8-flexq-fixed",
        description="FlexQ's hard-coded rule from its public code: W6 weights everywhere, 8-bit activations "
        "in every mlp.down_proj, 6-bit elsewhere (1/7 of a Llama's linears at A8).",
        passes=(PassConfig("quantize_weights"),),
        weight=W6_G128,
        activation=A6_G128,
        rules=(LayerRule(match="*.mlp.down_proj", activation=A8_G128),),
    )
)


# ---- W4A8 (issue 21): llama.cpp's Q4_0 x Q8_0 dot / onnxruntime MatMulNBits accuracy level 4
# Blocks of 32 as Q4_0 / Q8_0: on SmolLM2-135M (16 x 512 tokens) perplexity 54.87 against 66.54 with
# groups of 128 (fp32 41.95; benchmarks/RESULTS.md, w4a8 section), for 4.25 -> 5 stored bits per weight.
W4_G32 = dataclasses.replace(W4_G128, group_size=32)
A8_G32 = dataclasses.replace(A8_G128, group_size=32)
register_preset(
    Plan(
        name="w4a8",
        description="Round-to-nearest 4-bit symmetric weights (groups of 32 along K, stored as nibbles) and "
        "dynamic symmetric 8-bit activations per token and group of 32: the blocks and the arithmetic of "
        "llama.cpp's Q4_0 x Q8_0 dot and onnxruntime's MatMulNBits accuracy level 4 (exact int32 sums per "
        "group, fp32 rescale).",
        passes=(PassConfig("quantize_weights"),),
        weight=W4_G32,
        activation=A8_G32,
    )
)
register_preset(
    Plan(
        name="w4a8-g128",
        description="As w4a8 with groups of 128 (weights and activations): fewer scales (4.25 bits per "
        "weight) and a faster kernel, at a higher perplexity.",
        passes=(PassConfig("quantize_weights"),),
        weight=W4_G128,
        activation=A8_G128,
    )
)


# ---- W4A8 asymmetric (issue 21): llama.cpp's Q4_1 x Q8_1 dot ------------------------------------------
# SmolLM2-135M's released weights are Q4_1 (4-bit, groups of 32, scale + min), so the asymmetric group-32
# grid is (nearly) lossless on it where the symmetric w4a8 grid (±7) is not; activations as w4a8 (int8 per
# token and group of 32, Q8_1's blocks). The x86 kernels (qcompile/codegen/tvm/kernels/x86.py, format u4)
# multiply the unsigned nibbles by the int8 codes exactly and add offset·(sx·Σqx) per group.
W4_G32_ASYM = dataclasses.replace(W4_G32, symmetric=False)
register_preset(
    Plan(
        name="w4a8-g32-asym",
        description="Round-to-nearest 4-bit asymmetric weights (min/max: code 0..15 times a scale plus a float "
        "offset per group of 32 along K, the grid of GGUF Q4_1) and dynamic symmetric 8-bit activations per "
        "token and group of 32: Q4_1 x Q8_1 arithmetic, as llama.cpp (exact int32 sums of codes times "
        "activation codes per group, then sx * (scale * sum + offset * sum(qx)) in fp32).",
        passes=(PassConfig("quantize_weights"),),
        weight=W4_G32_ASYM,
        activation=A8_G32,
    )
)


# ---- XQuant presets (pass kv_to_xcache; see qcompile/passes/kv_to_xcache.py)
def _xquant_preset(name: str, description: str, **options: Any) -> None:
    register_preset(
        Plan(
            name=name,
            description=description,
            passes=(PassConfig("kv_to_xcache", tuple(options.items())),),
            fallback=TORCH_FALLBACK,
        )
    )


for _b in (8, 4, 3, 2):
    _xquant_preset(
        f"xcache-{_b}bit",
        f"XQuant: cache {_b}-bit quantized X (or, when K and V together are narrower than X as in GQA, the "
        "latent X·U of an offline SVD of W_k / W_v) instead of K and V; K (with RoPE) and V are rematerialized "
        "every step. Asymmetric per-token quantization, fp16 scale+offset per group of 64 channels.",
        mode="auto",
        bits=_b,
        group_size=64,
        symmetric=False,
        granularity="per_token",
    )
    _xquant_preset(
        f"kvquant-{_b}bit",
        f"KIVI-style KV-cache quantization baseline at {_b} bits: post-RoPE K per channel (static scales "
        "calibrated on the calibration split), V per token (fp16 scale+offset per group of 64), asymmetric.",
        mode="kv",
        bits=_b,
        group_size=64,
        symmetric=False,
        k_granularity="per_channel",
        v_granularity="per_token",
    )
for _b in (4, 3, 2):
    _xquant_preset(
        f"xcache-cl-{_b}bit",
        f"XQuant-CL: per layer cache the {_b}-bit quantized difference X_l - A_(l-1) against the running "
        "reconstruction A (layer 0: X_0 itself); X_l is rebuilt as A_l = A_(l-1) + deq(code_l). Asymmetric "
        "per-token groups of 64.",
        mode="x",
        bits=_b,
        group_size=64,
        symmetric=False,
        granularity="per_token",
        cross_layer=True,
    )
for _b in (4, 2):
    _xquant_preset(
        f"xcache-clr-{_b}bit",
        f"XQuant-CL on the residual stream: per layer cache the {_b}-bit quantized difference h_l - A_(l-1) of the "
        "residual stream the attention norm reads against its running reconstruction A; X_l = norm_l(A_l). "
        "Asymmetric per-token groups of 64.",
        mode="x",
        bits=_b,
        group_size=64,
        symmetric=False,
        granularity="per_token",
        cross_layer=True,
        cl_space="residual",
    )
_xquant_preset(
    "xcache-2bit-pc",
    "XQuant 2-bit with static per-channel scales (calibrated on the calibration split): no per-token scale "
    "bytes, so a GQA latent cache is exactly 8x smaller than an fp16 KV cache.",
    mode="auto",
    bits=2,
    group_size=0,
    symmetric=False,
    granularity="per_channel",
)


# ---- composed presets (issue 22): one plan stacking SmoothQuant, FlexQ precision, weights and a cache ----
# The X-cache runs after quantize_weights: it matches the quantized K/V projections and rematerializes
# K and V with the same quantized weights (mode x), or, for GQA models (auto -> latent), factors the
# weight the quantized codes encode, so the latent factors reproduce the quantized projection exactly.
XC4 = PassConfig(
    "kv_to_xcache",
    (("mode", "auto"), ("bits", 4), ("group_size", 64), ("symmetric", False), ("granularity", "per_token")),
)
register_preset(
    Plan(
        name="w8a8-smooth-xc4",
        description="w8a8-smooth (SmoothQuant alpha 0.5, W8 per-channel, A8 dynamic per-token) with the 4-bit "
        "X / latent cache of xcache-4bit over its quantized K/V projections.",
        passes=(PassConfig("smooth_migration", (("alpha", 0.5), *SMOOTH_A8)), PassConfig("quantize_weights"), XC4),
        weight=W8_PER_CHANNEL,
        activation=A8_PER_TOKEN,
        fallback=TORCH_FALLBACK,
    )
)
register_preset(
    Plan(
        name="w6a8-flexq-smooth-xc4",
        description="SmoothQuant (alpha 0.5), then FlexQ's sensitivity analysis picks the A8 linears (budget 1/7), "
        "W6 weights (group 128, packed) with A6/A8 activations, and the 4-bit X / latent cache of xcache-4bit "
        "over the quantized K/V projections.",
        passes=(
            PassConfig("smooth_migration", (("alpha", 0.5), *SMOOTH_A8)),
            PassConfig("assign_precision", (("budget", FLEXQ_BUDGET),)),
            PassConfig("quantize_weights"),
            XC4,
        ),
        weight=W6_G128,
        activation=A6_G128,
        fallback=TORCH_FALLBACK,
    )
)


# ---- decoupleQ presets (issue 19; qcompile/quant/decoupleq.py): 2- and 3-bit asymmetric weights ----------
# decoupleQ solves a float offset per group, so the weights are asymmetric (code·scale + offset). The presets
# run the layer-wise solver only (iterations 8, GPTQ-style rounding); the block-wise stage (pass option
# blockwise_epochs) is measured separately with the plan files benchmarks/plans/*-decoupleq-*-bw.yaml.
W2_G64_ASYM = QuantSpec(
    bits=2, granularity=Granularity.PER_GROUP, symmetric=False, group_size=64, partial_last_group=True
)
W3_G128_ASYM = QuantSpec(
    bits=3, granularity=Granularity.PER_GROUP, symmetric=False, group_size=128, partial_last_group=True
)
W2_PER_CHANNEL_ASYM = QuantSpec(bits=2, granularity=Granularity.PER_CHANNEL, symmetric=False)
for _name, _spec, _what in (
    ("w2a16-decoupleq-g64", W2_G64_ASYM, "2-bit asymmetric weights, group 64 along K"),
    ("w3a16-decoupleq-g128", W3_G128_ASYM, "3-bit asymmetric weights, group 128 along K (a shorter last group)"),
    ("w2a16-decoupleq", W2_PER_CHANNEL_ASYM, "2-bit asymmetric weights, one scale and offset per output channel"),
):
    register_preset(
        Plan(
            name=_name,
            description=f"decoupleQ: {_what}; codes and (scale, offset) solved alternately on the layer's "
            "GPTQ Hessian (GPTQ initialization, 8 iterations, block by block); fp32 activations.",
            passes=(PassConfig("quantize_weights"),),
            weight=_spec,
            weight_method=WeightMethod.DECOUPLEQ,
        )
    )


# ---- QuEST presets (issue 19): Hadamard rotation + QuEST PTQ ----------------------------------

W4_QUEST = QuantSpec(bits=4, granularity=Granularity.PER_CHANNEL, symmetric=True, grid=Grid.QUEST)
A4_QUEST = QuantSpec(bits=4, granularity=Granularity.PER_TOKEN, symmetric=True, dynamic=True, grid=Grid.QUEST)
register_preset(
    Plan(
        name="w4a4-quest",
        description="QuEST PTQ: linear inputs rotated by block Hadamards (128, folded into v_proj where the graph "
        "allows, else an online Walsh-Hadamard op), then 4-bit QuEST weights per output channel and 4-bit QuEST "
        "activations per token (RMS-scaled midrise grid clipped at the Gaussian-optimal alpha_4 sigma); integer "
        "GEMM of odd codes.",
        passes=(PassConfig("hadamard"), PassConfig("quantize_weights")),
        weight=W4_QUEST,
        activation=A4_QUEST,
    )
)


# ---- QuEST QAT presets (issue 19): Hadamard rotation, trust-estimator QAT, QuEST quantization ---------
# QAT is short on purpose (SmolLM2-135M on 2 CPU cores: 29 s idle, 14 min when loaded 5x): 4 steps of one
# 512-token calibration window, distilled from the float model (the qat pass's docstring says why).
QAT_OPTIONS = (("steps", 4), ("lr", 1e-4), ("seq_len", 512))
W3_QUEST = QuantSpec(bits=3, granularity=Granularity.PER_CHANNEL, symmetric=True, grid=Grid.QUEST)
A3_QUEST = QuantSpec(bits=3, granularity=Granularity.PER_TOKEN, symmetric=True, dynamic=True, grid=Grid.QUEST)
for _b, _w, _a in ((4, W4_QUEST, A4_QUEST), (3, W3_QUEST, A3_QUEST)):
    register_preset(
        Plan(
            name=f"w{_b}a{_b}-quest-qat",
            description=f"QuEST QAT: linear inputs rotated by block Hadamards (as w4a4-quest), then a short "
            f"quantization-aware fine-tuning of the linears' weights through {_b}-bit QuEST fake quantization with "
            "the trust estimator (gradients only where |q - x| <= T sigma), distilled from the float model on the "
            f"calibration text, then {_b}-bit QuEST weights per output channel and {_b}-bit QuEST activations per "
            "token.",
            passes=(PassConfig("hadamard"), PassConfig("qat", QAT_OPTIONS), PassConfig("quantize_weights")),
            weight=_w,
            activation=_a,
        )
    )


def get_plan(plan: Plan | str | Path) -> Plan:
    """A Plan from a Plan, a preset name, or a path to a YAML/JSON file."""
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, Path) or (isinstance(plan, str) and plan.lower().endswith((".yaml", ".yml", ".json"))):
        return Plan.from_file(plan)
    if isinstance(plan, str):
        if plan in PRESETS:
            return PRESETS[plan]
        raise PlanError(f"unknown preset {plan!r}; presets: {sorted(PRESETS)} (or a path to a .yaml/.json plan)")
    raise PlanError(f"plan must be a Plan, a preset name or a file path, not {type(plan).__name__}")


# ---- bounded reading of untrusted plan text ---------------------------------------------------


def _check_text_size(text: Any, what: str) -> None:
    if not isinstance(text, str):
        raise PlanError(f"plan {what} must be text (str), not {type(text).__name__}")
    if len(text) > MAX_PLAN_BYTES:
        raise PlanError(
            f"plan {what} is {len(text):,} characters; plans are limited to {MAX_PLAN_BYTES:,} "
            "(qcompile.plan.MAX_PLAN_BYTES)"
        )


def _read_plan_file(p: Path) -> str:
    """The UTF-8 text of the plan file ``p``: a regular file of at most MAX_PLAN_BYTES. Opened without
    blocking, so a FIFO or a device is refused rather than read."""
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise PlanError(f"cannot read plan file {p}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, socket or device)"
            raise PlanError(f"plan file {p} is {kind}; --plan takes a preset name or a .yaml/.json file")
        if st.st_size > MAX_PLAN_BYTES:
            raise PlanError(
                f"plan file {p} is {st.st_size:,} bytes; plans are limited to {MAX_PLAN_BYTES:,} bytes "
                "(qcompile.plan.MAX_PLAN_BYTES)"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_PLAN_BYTES + 1)
    except OSError as e:
        raise PlanError(f"cannot read plan file {p}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_PLAN_BYTES:  # it grew after the stat
        raise PlanError(f"plan file {p} is over {MAX_PLAN_BYTES:,} bytes (qcompile.plan.MAX_PLAN_BYTES)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PlanError(
            f"plan file {p} is not UTF-8 text (byte {e.start}: {raw[e.start : e.start + 4]!r}); save it as UTF-8"
        ) from None


class _PlanLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that bounds a document while it is composed: values (before alias
    expansion; :func:`_check_shape` counts them expanded), aliases, nesting depth; refuses tags."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._nodes = 0
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        line = event.start_mark.line + 1 if event.start_mark is not None else "?"
        if isinstance(event, yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_PLAN_ALIASES:
                raise PlanError(
                    f"plan YAML line {line}: more than {MAX_PLAN_ALIASES} aliases (*name); plans are limited to "
                    f"{MAX_PLAN_ALIASES} (qcompile.plan.MAX_PLAN_ALIASES)"
                )
        elif getattr(event, "tag", None) is not None:
            raise PlanError(
                f"plan YAML line {line}: tag {event.tag!r} is not allowed; plans hold plain mappings, lists, "
                "strings, numbers and booleans"
            )
        self._nodes += 1
        if self._nodes > MAX_PLAN_NODES:
            raise PlanError(
                f"plan YAML line {line}: more than {MAX_PLAN_NODES:,} values; plans are limited to "
                f"{MAX_PLAN_NODES:,} (qcompile.plan.MAX_PLAN_NODES)"
            )
        self._depth += 1
        try:
            if self._depth > MAX_PLAN_DEPTH:
                raise PlanError(
                    f"plan YAML line {line}: nested deeper than {MAX_PLAN_DEPTH} levels (qcompile.plan.MAX_PLAN_DEPTH)"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _check_shape(data: Any) -> None:
    """PlanError unless ``data`` (JSON/YAML values) holds at most MAX_PLAN_NODES values, counting
    shared (aliased) values once per use, nested at most MAX_PLAN_DEPTH deep. Iterative and bounded
    by those numbers: neither an alias bomb nor a self-referencing list is expanded or recursed into."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    seen = 1  # values visited or queued
    while stack:
        value, depth = stack.pop()
        if not (isinstance(value, Mapping) or (isinstance(value, (list, tuple)) and value)):
            continue
        if depth >= MAX_PLAN_DEPTH:
            raise PlanError(f"plan is nested deeper than {MAX_PLAN_DEPTH} levels (qcompile.plan.MAX_PLAN_DEPTH)")
        children = [*value.keys(), *value.values()] if isinstance(value, Mapping) else value
        seen += len(children)
        if seen > MAX_PLAN_NODES:
            raise PlanError(
                f"plan holds more than {MAX_PLAN_NODES:,} values (YAML aliases expanded); plans are limited to "
                f"{MAX_PLAN_NODES:,} (qcompile.plan.MAX_PLAN_NODES)"
            )
        stack.extend((c, depth + 1) for c in children)


# ---- generic typed (de)serialization of frozen dataclasses ----------------------------------


def to_plain(obj: Any) -> Any:
    """JSON/YAML values of ``obj`` (the inverse of :func:`from_plain`)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if isinstance(obj, PassConfig):
            return {"name": obj.name, "options": {k: to_plain(v) for k, v in obj.options}}
        if getattr(obj, "POSITIONAL", False):
            return [to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)]
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, tuple):
        return [to_plain(v) for v in obj]
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def from_plain(tp: Any, data: Any, where: str) -> Any:
    """``data`` (JSON/YAML values) as type ``tp``: enums by value, dataclasses from mappings (or, for
    dataclasses with ``POSITIONAL``, from lists), tuples from lists; PlanError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if data is None:
            if type(None) in typing.get_args(tp):
                return None
            raise PlanError(f"{where}: a value is required")
        if len(args) == 1:
            return from_plain(args[0], data, where)
        errors = []
        for arm in args:  # the first arm that accepts the value (e.g. a number, else a named mode)
            try:
                return from_plain(arm, data, where)
            except PlanError as e:
                errors.append((arm, e))
        for arm, e in errors:  # a number refused by the number arm (not finite, too large): say so
            if arm in (int, float) and isinstance(data, (int, float)) and not isinstance(data, bool):
                raise e from None
        raise PlanError(
            f"{where}: {_short(data)} is not allowed; expected {' or '.join(_describe_type(a) for a in args)}"
        )
    if origin is tuple:
        if not isinstance(data, (list, tuple)):
            raise PlanError(f"{where}: expected a list, got {type(data).__name__}")
        (elem, _ellipsis) = typing.get_args(tp)
        return tuple(from_plain(elem, v, f"{where}[{i}]") for i, v in enumerate(data))
    if tp is PassConfig:
        return _pass_config_from_plain(data, where)
    if dataclasses.is_dataclass(tp):
        if getattr(tp, "POSITIONAL", False) and isinstance(data, (list, tuple)):
            names = [f.name for f in dataclasses.fields(tp)]
            if len(data) != len(names):
                raise PlanError(f"{where}: expected [{', '.join(names)}], got {_short(list(data))}")
            data = dict(zip(names, data))
        return _dataclass_from_plain(tp, data, where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        allowed = [m.value for m in tp]
        if data not in allowed:
            raise PlanError(f"{where}: {_short(data)} is not allowed; allowed: {allowed}")
        return tp(data)
    if tp is bool:
        if not isinstance(data, bool):
            raise PlanError(f"{where}: expected true/false, got {_short(data)}")
        return data
    if tp is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise PlanError(f"{where}: expected an integer, got {_short(data)}")
        return data
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise PlanError(f"{where}: expected a number, got {_short(data)}")
        try:
            value = float(data)
        except OverflowError:  # an integer too large for a float
            raise PlanError(f"{where}: {_short(data)} is out of range for a number") from None
        if not math.isfinite(value):
            raise PlanError(f"{where}: expected a finite number, got {data!r}")
        return value
    if tp is str:
        if not isinstance(data, str):
            raise PlanError(f"{where}: expected a string, got {_short(data)}")
        return data
    raise PlanError(f"{where}: unsupported field type {_type_name(tp)}")  # pragma: no cover


def _describe_type(tp: Any) -> str:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return f"one of {[m.value for m in tp]}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, _type_name(tp))


def _dataclass_from_plain(cls: Any, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise PlanError(
            f"{where}: expected a mapping with keys {[f.name for f in dataclasses.fields(cls)]}, got {_short(data)}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields), key=repr)  # keys may be numbers, booleans or null in YAML
    if unknown:
        raise PlanError(f"{where}: unknown key(s) {_short(unknown)}; allowed keys: {list(fields)}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise PlanError(f"{where}: missing required key {name!r}")
            continue
        kwargs[name] = from_plain(hints[name], data[name], f"{where}.{name}")
    try:
        return cls(**kwargs)
    except PlanError as e:
        raise PlanError(f"{where}: {e}") from None


def _freeze_option(value: Any, where: str) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze_option(v, where) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum) or dataclasses.is_dataclass(value):  # typed values: stored as plain data
        return _freeze_option(to_plain(value), where)
    raise PlanError(f"{where}: option values must be numbers, strings, booleans or lists, got {_short(value)}")


def _pass_config_from_plain(data: Any, where: str) -> PassConfig:
    if isinstance(data, str):
        return PassConfig(data)
    if not isinstance(data, Mapping):
        raise PlanError(f"{where}: expected a pass name or a mapping with keys ['name', 'options']")
    unknown = sorted(set(data) - {"name", "options"}, key=repr)
    if unknown:
        raise PlanError(f"{where}: unknown key(s) {_short(unknown)}; allowed keys: ['name', 'options']")
    if not isinstance(data.get("name"), str):
        raise PlanError(f"{where}: 'name' (the pass name) is required")
    options = data.get("options") or {}
    if not isinstance(options, Mapping):
        raise PlanError(f"{where}.options: expected a mapping")
    return PassConfig(
        data["name"], tuple((str(k), _freeze_option(v, f"{where}.options.{k}")) for k, v in options.items())
    )


__all__ = [
    "PLAN_VERSION",
    "Granularity",
    "WeightMethod",
    "NonFinite",
    "LmHead",
    "LM_HEAD_GLOB",
    "QuantSpec",
    "LayerRule",
    "PassConfig",
    "LayerQuant",
    "Plan",
    "PRESETS",
    "register_preset",
    "get_plan",
    "from_plain",
    "to_plain",
]
