"""Facts about a Program that passes require, provide and invalidate.

A fact is a statement about the *form* of a Program, known before any model is captured: capture
establishes :data:`CAPTURED_FACTS`; each pass declares which facts it ``requires``, which it
``provides`` and which it ``invalidates``. The PassManager replays a plan's passes over these sets
when it reads the plan, so a misordered plan is refused (naming the pass and the missing fact)
before anything is captured or calibrated. Whether a particular model *has* the structure a pass
looks for (an attention block, a 3×3 convolution) is a different question, answered by the pass's
graph matching at run time and reported per layer.
"""

from __future__ import annotations

import enum


class Fact(str, enum.Enum):
    CAPTURED = "captured"  # a Program from capture: ATen graphs, state, entries
    FLOAT_LINEARS = "float_linears"  # linear layers are aten.linear over float constant weights
    FLOAT_CONVS = "float_convs"  # convolutions are aten.conv2d over float constant weights
    KV_ATTENTION = "kv_attention"  # attention reads K and V from float projections of X (and caches hold K, V)
    SMOOTHED = "smoothed"  # SmoothQuant scales migrated into norms / producing linears
    ACTIVATION_PRECISION = "activation_precision"  # per-layer activation bits decided (plan rules)
    QUANTIZED_LINEARS = "quantized_linears"  # the plan's linears are qcompile quantized-linear ops
    FOLDED_STEPS = "folded_steps"  # static activation steps folded into producers (MergeQuant QSM)
    XCACHE = "xcache"  # K/V caches replaced by quantized X / latent / KV code caches
    WINOGRAD = "winograd"  # 3×3 convolutions are Winograd F(m, 3) ops
    ROTATED = "rotated"  # linear inputs rotated by block Hadamards, weights rotated to match (hadamard)
    QAT_TRAINED = "qat_trained"  # the plan's QuEST linears' float weights fine-tuned through their quantizers (qat)

    def __str__(self) -> str:
        return self.value


CAPTURED_FACTS: frozenset[Fact] = frozenset({Fact.CAPTURED, Fact.FLOAT_LINEARS, Fact.FLOAT_CONVS, Fact.KV_ATTENTION})

# What each fact means, for error messages and the README's table.
DESCRIPTIONS: dict[Fact, str] = {
    Fact.CAPTURED: "a captured Program",
    Fact.FLOAT_LINEARS: "linear layers still in float (aten.linear with constant weights)",
    Fact.FLOAT_CONVS: "convolutions still in float (aten.conv2d with constant weights)",
    Fact.KV_ATTENTION: "attention over float K/V projections and K/V caches, as captured",
    Fact.SMOOTHED: "SmoothQuant scales migrated into norms and weights",
    Fact.ACTIVATION_PRECISION: "per-layer activation bits assigned in the plan",
    Fact.QUANTIZED_LINEARS: "linear layers rewritten to quantized qcompile ops",
    Fact.FOLDED_STEPS: "static activation steps folded into their producers",
    Fact.XCACHE: "K/V caches replaced by quantized X / latent caches",
    Fact.WINOGRAD: "3x3 convolutions rewritten to Winograd ops",
    Fact.ROTATED: "linear inputs and weights rotated by block-diagonal Hadamards",
    Fact.QAT_TRAINED: "float weights fine-tuned through the plan's QuEST quantizers (QAT)",
}


def names(facts: frozenset[Fact] | set[Fact]) -> list[str]:
    return sorted(f.value for f in facts)
