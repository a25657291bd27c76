"""quantize_weights: round-to-nearest quantization of linear layers into qcompile ops.

What it does: for every ``aten.linear`` whose weight is a constant (found by graph matching,
:func:`qcompile.ir.patterns.find_linears`), it resolves the plan's settings for the layer's module
path and, unless the layer is skipped, quantizes the weight once (shared by every entry that
uses it) and replaces the linear with the fused qcompile op for the (weight, activation) pair:

* W8 per-channel symmetric + A8 per-token symmetric dynamic → ``qcompile::linear_w8a8``;
* any other weight spec (2, 3, 4, 6 or 8 bits, per-channel or per-group, symmetric or asymmetric) with no
  activation quantization, or with dynamic symmetric per-token / per-group activations →
  ``qcompile::quant_linear`` (weight codes stored one per int8; the report also gives the
  packed size); 2- and 3-bit weights (symmetric, or asymmetric with a float offset: unsigned codes)
  and symmetric 6-bit weights (FlexQ's W6) are stored densely packed (4 codes per byte, 8 codes in
  3 bytes, 4 codes in 3 bytes) and run by ``qcompile::packed_linear``. A group size that does not
  divide K is a PlanError naming the layer, unless the spec sets ``partial_last_group`` (then the
  last group is shorter, as if K were zero-padded).

Weight methods (``plan.weight_method``): ``rtn`` (round to nearest; with the option
``clip_search`` the per-group clip ratio is grid-searched on calibration inputs to minimize the
output error, :func:`qcompile.quant.quantizer.search_clip`), ``gptq``
(:mod:`qcompile.quant.gptq`, options ``damp`` and ``act_order``) and ``decoupleq``
(:mod:`qcompile.quant.decoupleq`, asymmetric weights only, a PlanError naming the layer otherwise;
options ``damp``, ``dq_iterations``, ``dq_inner_steps``, ``dq_rounding``). GPTQ and decoupleQ run decoder
block by block (blocks are the module-path prefixes up to the layer index): the calibration windows go
through the model once, a block at a time (:class:`qcompile.ir.blocks.Stepper`); each block's Hessians
are collected by running the block alone on its inputs, the block's weights are quantized and written
back dequantized, and the quantized block produces the next block's inputs, so later blocks calibrate
on the quantized model's activations (the sequential GPTQ of the paper) and only one block's Hessians
are held at a time. (When the blocks' nodes do not form separate ranges of the forward graph, each
block's Hessians come from a calibration run that stops after the block.) With ``blockwise_epochs > 0``
each block's scales, offsets and norm weights are then trained, codes frozen, on the mean squared error
to the float block's output on the same inputs (:mod:`qcompile.quant.blockwise`; Adam, ``blockwise_lr``).
A Hessian singular even after damping is a PlanError naming the layer. The report's notes give, per
layer, the solve time and (decoupleQ) the objective per iteration against RTN's and GPTQ's, and per
block the block-wise loss before and after (and whether the trained values were kept).

Static activations (``activation: {granularity: per_tensor, dynamic: false, symmetric: true}``):
one step per layer input, ``absmax / qmax`` over the calibration data (token ids for a causal LM,
input batches for a CNN: :func:`qcompile.ir.calib.calibration_batches`). A linear becomes
``x / step`` followed by ``qcompile::linear_static`` with the step folded into the weight scales
(symmetric per-channel or per-group weights).

Convolutions (``aten.conv2d`` with a constant weight, found by :func:`qcompile.ir.convs.find_convs`;
dense, grouped and depthwise, any stride / padding / dilation) become ``qcompile::quant_conv2d``
(:mod:`qcompile.ops.conv`): symmetric weight codes with one scale per output channel (a
``per_group`` weight spec is applied per output channel too, and the report says so for each such
layer: a conv's input channels times taps rarely split into the LLM group sizes, and per-channel is
what int8 conv kernels take); activations none, static per-tensor symmetric (calibrated; exact
integer conv), or dynamic per token-pixel (``per_token``: one scale per input pixel, simulated).
Anything else is a PlanError naming the layer. Convolution weights are always rounded to nearest
(GPTQ and the clip search cover linears; the report notes it). ``qcompile::winograd_conv2d`` ops
(an earlier ``winograd_conv``) are listed in ``skipped``: Winograd transforms leave the integer
domain (the transformed weights and tiles are not integer grids), so they stay in float.

The language-model head (the linears matching ``LM_HEAD_GLOB``, ``*lm_head*``) follows the plan's
``lm_head`` setting (:class:`qcompile.plan.LmHead`): ``fp32`` keeps today's behaviour (the default skip
glob keeps it in float), ``int8`` gives it int8 symmetric per-output-channel codes and ``plan`` the
plan's weight spec, both weight-only (``qcompile::quant_linear`` with float activations). A head whose
weight is tied to the embedding (one state tensor read by the embedding gather and the head) gets its
own codes, named after the head's path (``lm_head.qweight``); the gather keeps reading the fp32 table,
so the embedding lookup is unchanged and the codes are extra bytes. The report's notes
(``lm_head``) and summary say, for every head, whether it was quantized (to what, and the bytes its
codes take) or kept (why), and what its weight is tied to.

QuEST grids (``grid: quest`` in a weight / activation spec, :mod:`qcompile.quant.quest`): weights get
σ = the RMS of each row (or group), a clip at ``α_b·σ`` and the midrise grid, stored as unsigned
``b``-bit codes with one half step per row or group (:mod:`qcompile.quant.quest_linear`). Weight-only,
they run through ``qcompile::quant_linear`` as the equal asymmetric grid; with quest activations
(dynamic per token) through ``qcompile::quest_linear`` (:mod:`qcompile.ops.quest`: the exact integer
product of odd codes). Quest activations with uniform weights, other activation granularities, GPTQ
or the clip search on quest weights, and quest convolutions are PlanErrors naming the layer. Run
after the ``hadamard`` pass, the rows are the rotated ones.

Requires: float linears (so it runs after passes that rewrite float linears, such as
``smooth_migration`` and ``assign_precision``, and at most once). Provides: quantized linears;
invalidates: float linears and float convolutions (``winograd_conv`` runs before it, never
after). Guarantees after it runs: no selected linear or convolution remains in float; each layer
it did not change is listed in ``skipped`` with the reason; every one-code-per-byte weight tensor it
writes has its width in ``Program.weight_bits``; float weights no longer used by any entry are
dropped from the state.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from qcompile.errors import PlanError
from qcompile.ir.blocks import Block, BlockWindow, Stepper, find_block, run_block
from qcompile.ir.calib import (
    _finite_check,
    calib_batches,
    calibration_batches,
    entry_args,
    observe_linear_inputs,
    run_observed,
)
from qcompile.ir.convs import ConvMatch, find_convs
from qcompile.ir.facts import Fact
from qcompile.ir.patterns import find_linears, non_linear_uses
from qcompile.ir.program import PATH_KEY, Program
from qcompile.ops.packed import pack_codes
from qcompile.passes.base import Pass, PassContext, PassResult, as_enum, register_pass
from qcompile.plan import LayerQuant, LmHead, WeightMethod
from qcompile.quant.blockwise import BlockTrainer
from qcompile.quant.decoupleq import Rounding, decoupleq_quantize
from qcompile.quant.finite import check_scale, naming
from qcompile.quant.gptq import Hessian, gptq_quantize
from qcompile.quant.observers import SampleObserver
from qcompile.quant.quantizer import (
    code_dtype,
    dequantize_weight_groups,
    quantize,
    quantize_weight_groups,
    quantize_weight_per_channel,
    search_clip,
)
from qcompile.quant.spec import Granularity, Grid, QuantSpec, check_group, levels

Codes = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]

# weights of these widths are stored densely packed and run by qcompile::packed_linear: symmetric
# codes in two's complement, asymmetric ones (PACKED_ASYM_BITS) unsigned with their float offset
PACKED_BITS = (2, 3, 6)
PACKED_ASYM_BITS = (2, 3)

SUPPORTED = (
    "weights: 2, 3, 4, 6 or 8 bits, per_channel or per_group, symmetric or not; activations: none, or those widths "
    "symmetric dynamic per_token or per_group (with the weights' group size)"
)


CONV_SUPPORTED = (
    "weights: symmetric, per_channel (per_group is applied per output channel), 2, 3, 4, 6 or 8 bits; "
    "activations: none, symmetric static per_tensor (calibrated), or symmetric dynamic per_token (per pixel)"
)
WINOGRAD_REASON = "Winograd transforms leave the integer domain; kept in float"


def _is_static_per_tensor(spec: QuantSpec | None) -> bool:
    return spec is not None and spec.granularity is Granularity.PER_TENSOR and spec.symmetric and not spec.dynamic


def _is_w8_per_channel(spec: QuantSpec | None) -> bool:
    return spec is not None and spec.bits == 8 and spec.granularity is Granularity.PER_CHANNEL and spec.symmetric


def _is_a8_per_token(spec: QuantSpec | None) -> bool:
    return (
        spec is not None
        and spec.bits == 8
        and spec.granularity is Granularity.PER_TOKEN
        and spec.symmetric
        and spec.dynamic
    )


@contextmanager
def _layer(path: str, what: str) -> Iterator[None]:
    """Name the layer in a NonFiniteError or PlanError raised inside (e.g. a singular Hessian)."""
    try:
        with naming(f"layer {path!r} ({what})"):
            yield
    except PlanError as e:
        if str(e).startswith("layer "):
            raise
        raise PlanError(f"layer {path!r} ({what}): {e}") from e


def _block_ranges(
    program: Program, blocks: dict[str, list[tuple[str, str, QuantSpec]]]
) -> dict[str, tuple[Block, dict[str, fx.Node]]] | None:
    """Per block: its node range in the forward entry and the first linear node of each of its weights;
    None unless the ranges follow one another without overlap and hold every linear of their block."""
    if "forward" not in program.entries:
        return None
    first: dict[str, fx.Node] = {}
    for m in find_linears(program):
        if m.entry.name == "forward":
            first.setdefault(m.weight_key, m.node)
    out: dict[str, tuple[Block, dict[str, fx.Node]]] = {}
    order = {n: i for i, n in enumerate(program.entries["forward"].graph.graph.nodes)}
    end = -1
    for prefix, items in blocks.items():
        try:
            blk = find_block(program, prefix)
        except ValueError:
            return None
        inside = set(blk.nodes)
        if order[blk.nodes[0]] <= end or any(first.get(k) not in inside for k, _, _ in items):
            return None
        end = order[blk.nodes[-1]]
        out[prefix] = (blk, {k: first[k] for k, _, _ in items})
    return out


def _block_hessians(
    program: Program, stepper: Stepper, blk: Block, wins: list[BlockWindow], firsts: dict[str, fx.Node]
) -> dict[str, list[Hessian]]:
    """Hessians of the block's linears' inputs, the block run alone (float) on each window; the block's
    float outputs are kept in each window (the block-wise stage's targets). A non-finite linear input is
    refused as in :func:`qcompile.ir.calib.run_observed` (layer, window, first non-finite node)."""
    hs = {k: [Hessian(program.state[k].shape[1])] for k in firsts}
    with torch.no_grad():
        for i, w in enumerate(wins):
            run_args = entry_args(program, blk.entry, [stepper.batches[i]])
            observe = {
                node: _finite_check(
                    lambda _n, args, key=k: hs[key][0].add(args[0]), program, blk.entry, i, w.label, run_args
                )
                for k, node in firsts.items()
            }
            w.outputs = dict(zip(blk.outputs, run_block(program, blk, w, observe=observe)))
    return hs


def _block_of(path: str) -> str:
    """The decoder block of a module path: the prefix up to its first numeric part (else the parent)."""
    parts = path.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1])


@register_pass
@dataclass(frozen=True)
class QuantizeWeights(Pass):
    name: ClassVar[str] = "quantize_weights"
    requires: ClassVar[frozenset[Fact]] = frozenset({Fact.CAPTURED, Fact.FLOAT_LINEARS})
    provides: ClassVar[frozenset[Fact]] = frozenset({Fact.QUANTIZED_LINEARS})
    invalidates: ClassVar[frozenset[Fact]] = frozenset({Fact.FLOAT_LINEARS, Fact.FLOAT_CONVS})

    damp: float = 0.01  # gptq: fraction of the mean Hessian diagonal added
    act_order: bool = False  # gptq: columns by decreasing Hessian diagonal
    clip_search: bool = False  # rtn: grid-search clip ratios on calibration inputs
    samples: int = 512  # rtn clip search: calibration rows per layer
    dq_iterations: int = 8  # decoupleq: iterations, the GPTQ/min-max initialization included (1: that only)
    dq_inner_steps: int = 20  # decoupleq, dq_rounding nearest: projected-gradient steps per iteration
    dq_rounding: Rounding = Rounding.GPTQ  # decoupleq integer step: "gptq" (sequential) or "nearest"
    blockwise_epochs: int = 0  # gptq/decoupleq: epochs of block-wise training of scales, offsets, norms (0: off)
    blockwise_lr: float = 1e-3  # block-wise stage: Adam learning rate (relative changes of scales, norms)

    def __post_init__(self) -> None:
        if not math.isfinite(self.damp) or self.damp < 0:
            raise PlanError(f"quantize_weights: damp must be a finite number >= 0, got {self.damp!r}")
        if self.samples < 1:
            raise PlanError(f"quantize_weights: samples must be >= 1 calibration rows, got {self.samples!r}")
        for name, lo in (("dq_iterations", 1), ("dq_inner_steps", 0), ("blockwise_epochs", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise PlanError(f"quantize_weights: {name} must be an integer >= {lo}, got {v!r}")
        if isinstance(self.blockwise_lr, bool) or not math.isfinite(self.blockwise_lr) or self.blockwise_lr <= 0:
            raise PlanError(f"quantize_weights: blockwise_lr must be a finite number > 0, got {self.blockwise_lr!r}")
        as_enum(self, "dq_rounding", Rounding)

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        conv_schemes = self._conv_schemes(program, ctx)  # PlanErrors before any calibration
        _check_quest(program, ctx, self.clip_search)  # QuEST grids: PlanErrors before any calibration
        calib_notes: dict[str, Any] = {}
        pre = self._calibrated_codes(program, ctx, calib_notes)
        steps = self._static_steps(program, ctx, conv_schemes)
        done: dict[str, tuple[str, str]] = {}  # weight key -> (qweight key, scale key)
        changed: list[str] = []
        skipped: dict[str, str] = {}
        touched = set()
        heads: dict[str, dict[str, Any]] = {}  # lm_head path -> what became of it (report notes)
        for m in list(find_linears(program)):
            ctx.at(m.entry, m.node)
            lq: LayerQuant = ctx.plan.resolve(m.path)
            reason = self._skip_reason(lq)
            if lq.lm_head is not None and m.path not in heads:
                heads[m.path] = self._head_note(program, m.weight_key, lq, reason)
            if reason:
                skipped[m.path] = reason
                continue
            assert lq.weight is not None
            if _is_static_per_tensor(lq.activation):
                assert lq.activation is not None
                with naming(f"layer {m.path!r} (weight {m.weight_key!r})"):
                    self._linear_static(program, m, lq.weight, lq.activation.bits, steps[m.weight_key])
                touched.add(m.entry.name)
                if m.path not in changed:
                    changed.append(m.path)
                continue
            if m.weight_key not in done:
                # a head tied to the embedding names its codes after itself: the embedding is not quantized
                base = m.path if heads.get(m.path, {}).get("tied_to") else None
                with naming(f"layer {m.path!r} (weight {m.weight_key!r})"):
                    done[m.weight_key] = self._quantize(
                        program, m.weight_key, lq.weight, lq.activation, m.path, pre.get(m.weight_key), base
                    )
            keys, op, extra = done[m.weight_key]
            inputs = [m.entry.state_input(key) if key else None for key in keys]
            bias = m.node.args[2] if len(m.node.args) > 2 else m.node.kwargs.get("bias")
            if op in (torch.ops.qcompile.linear_w8a8.default, torch.ops.qcompile.quest_linear.default):
                args = (m.node.args[0], inputs[0], inputs[1], bias, *extra)
            elif op is torch.ops.qcompile.packed_linear.default:  # the offset (asymmetric codes) comes last
                args = (m.node.args[0], inputs[0], inputs[1], bias, *extra, *([inputs[2]] if inputs[2] else []))
            else:
                args = (m.node.args[0], inputs[0], inputs[1], inputs[2], bias, *extra)
            m.entry.replace_call(m.node, op, args)
            touched.add(m.entry.name)
            if m.path not in changed:
                changed.append(m.path)
        notes = self._convs(program, ctx, conv_schemes, steps, changed, skipped, touched)
        notes.update(calib_notes)
        for h in heads.values():  # the bytes the quantized head stores (codes, scales, offsets)
            if h["quantized"] and h["weight"] in done:
                t = [program.state[k] for k in done[h["weight"]][0] if k]
                h["code_bytes"] = sum(x.numel() * x.element_size() for x in t)
        if heads:
            notes["lm_head"] = heads
        for _, node in program.nodes():
            if node.op == "call_function" and node.target == torch.ops.qcompile.winograd_conv2d.default:
                skipped[str(node.meta.get(PATH_KEY, node.name))] = WINOGRAD_REASON
        ctx.at(None, None)
        program.finish_rewrite(touched)
        return PassResult(
            program, modified=bool(changed), layers_changed=changed, skipped=sorted(skipped.items()), notes=notes
        )

    @classmethod
    def summarize(cls, notes: dict[str, Any]) -> list[str]:
        lines = []
        for path, h in (notes.get("lm_head") or {}).items():
            tied = (
                f"; its weight is tied to {', '.join(h['tied_to'])}, which keeps the fp32 table for the gather "
                f"(+{h['code_bytes']:,} B of head codes and scales)"
                if h.get("tied_to") and h["quantized"]
                else (f"; weight tied to {', '.join(h['tied_to'])}" if h.get("tied_to") else "")
            )
            lines.append(f"lm_head {path!r} (plan lm_head: {h['setting']}): {h['result']}{tied}")
        if notes.get("conv_per_group_as_per_channel"):
            lines.append(
                "per_group weight spec applied per output channel in convolution(s): "
                + ", ".join(notes["conv_per_group_as_per_channel"])
            )
        if notes.get("conv_rtn"):
            lines.append(f"convolutions rounded to nearest ({notes['conv_rtn']} covers linears only)")
        return lines

    # ---- convolutions and static activations ----------------------------------------------------

    @staticmethod
    def _conv_scheme(path: str, w: QuantSpec, a: QuantSpec | None) -> tuple[int, bool]:
        """(activation bits, static) for a conv, or a PlanError naming the layer."""
        if not w.symmetric or w.granularity not in (Granularity.PER_CHANNEL, Granularity.PER_GROUP):
            raise PlanError(f"convolution {path!r}: weight {w} is not supported; supported: {CONV_SUPPORTED}")
        if a is None:
            return 0, False
        if _is_static_per_tensor(a):
            return a.bits, True
        if a.symmetric and a.dynamic and a.granularity is Granularity.PER_TOKEN:
            return a.bits, False
        raise PlanError(f"convolution {path!r}: activation {a} is not supported; supported: {CONV_SUPPORTED}")

    def _conv_schemes(self, program: Program, ctx: PassContext) -> dict[str, tuple[int, bool]]:
        """Weight key -> (activation bits, static) of every conv this pass rewrites."""
        out: dict[str, tuple[int, bool]] = {}
        for c in find_convs(program):
            lq = ctx.plan.resolve(c.path)
            if c.reason or self._skip_reason(lq):
                continue
            assert lq.weight is not None and c.weight_key is not None
            scheme = self._conv_scheme(c.path, lq.weight, lq.activation)
            if out.setdefault(c.weight_key, scheme) != scheme:
                raise PlanError(
                    f"convolution {c.path!r} shares weight {c.weight_key!r} with another conv under a different "
                    "activation scheme; give both layers the same activation spec"
                )
        return out

    def _static_steps(
        self, program: Program, ctx: PassContext, conv_schemes: dict[str, tuple[int, bool]]
    ) -> dict[str, torch.Tensor]:
        """Weight key -> calibrated step ``[1]`` (absmax / qmax of the layer input, every use in the
        forward entry) of every layer with static per-tensor activations."""
        bits = {k: b for k, (b, static) in conv_schemes.items() if static}
        for m in find_linears(program):
            lq = ctx.plan.resolve(m.path)
            if not self._skip_reason(lq) and _is_static_per_tensor(lq.activation):
                assert lq.activation is not None
                bits[m.weight_key] = lq.activation.bits
        if not bits:
            return {}
        batches = calibration_batches(ctx.calib, who="quantize_weights (static activations)", program=program)
        paths: dict[str, str] = {}
        observers = {}
        absmax: dict[str, float] = {}

        def observer(key: str) -> Callable[[Any, tuple[Any, ...]], None]:
            def fn(_n: Any, args: tuple[Any, ...]) -> None:
                absmax[key] = max(absmax.get(key, 0.0), float(args[0].detach().abs().max()))

            return fn

        layers = [*find_linears(program), *find_convs(program)]  # the same matchers that rewrite them
        for m in layers:
            if m.entry.name == "forward" and m.weight_key in bits:
                observers[m.node] = observer(m.weight_key)
                paths.setdefault(m.weight_key, m.path)
        missing = sorted(set(bits) - set(paths))
        if missing:
            raise PlanError(f"quantize_weights: static activations need the forward entry to use {missing[:3]}")
        run_observed(program, batches, observers, progress=ctx.progress, desc="quantize_weights: static steps")
        out = {}
        for key, b in bits.items():
            qmax = levels(b, True)[1]
            step = torch.tensor([absmax.get(key, 0.0) / qmax], dtype=torch.float32)
            check_scale(step, f"the input of layer {paths[key]!r}")
            out[key] = torch.where(step == 0, torch.ones_like(step), step)
        return out

    @staticmethod
    def _linear_static(program: Program, m: Any, w: QuantSpec, act_bits: int, step: torch.Tensor) -> None:
        """``aten.linear`` → ``x / step`` then ``qcompile::linear_static`` (step folded into the scales)."""
        weight = program.state[m.weight_key]
        k = weight.shape[1]
        if not w.symmetric or w.granularity not in (Granularity.PER_CHANNEL, Granularity.PER_GROUP):
            raise PlanError(
                f"layer {m.path!r}: static per-tensor activations need symmetric per_channel or per_group weights, "
                f"got {w}"
            )
        check_group(m.path, k, w)
        group = w.block(k)
        codes, scale, _ = quantize_weight_groups(weight, w.bits, group, True)
        base = m.weight_key.removesuffix(".weight")
        qkey = program.add_state(f"{base}.qweight", codes)
        program.weight_bits[qkey] = w.bits
        skey = program.add_state(f"{base}.w_scale_static", (scale * step).to(torch.float32))
        xkey = program.add_state(f"{base}.x_step", step)
        graph = m.entry.graph.graph
        with graph.inserting_before(m.node):
            div = graph.call_function(torch.ops.aten.div.Tensor, (m.node.args[0], m.entry.state_input(xkey)))
        div.meta[PATH_KEY] = m.path
        bias = m.node.args[2] if len(m.node.args) > 2 else m.node.kwargs.get("bias")
        args = (div, m.entry.state_input(qkey), m.entry.state_input(skey), bias, group, act_bits)
        m.entry.replace_call(m.node, torch.ops.qcompile.linear_static.default, args)

    def _convs(
        self,
        program: Program,
        ctx: PassContext,
        schemes: dict[str, tuple[int, bool]],
        steps: dict[str, torch.Tensor],
        changed: list[str],
        skipped: dict[str, str],
        touched: set[str],
    ) -> dict[str, Any]:
        """Rewrite every selected conv into ``qcompile::quant_conv2d``; returns the report notes."""
        done: dict[str, tuple[str, str]] = {}
        per_group: list[str] = []
        for c in list(find_convs(program)):
            ctx.at(c.entry, c.node)
            lq = ctx.plan.resolve(c.path)
            reason = c.reason or self._skip_reason(lq)
            if reason:
                skipped[c.path] = reason
                continue
            assert lq.weight is not None and c.weight_key is not None
            act_bits, static = schemes[c.weight_key]
            if lq.weight.granularity is Granularity.PER_GROUP and c.path not in per_group:
                per_group.append(c.path)
            if c.weight_key not in done:
                with naming(f"convolution {c.path!r} (weight {c.weight_key!r})"):
                    done[c.weight_key] = self._quantize_conv(program, c, lq.weight.bits)
            qkey, skey = done[c.weight_key]
            xs = None
            if static:
                base = c.weight_key.removesuffix(".weight")
                xkey = f"{base}.x_scale"
                if xkey not in program.state:
                    program.state[xkey] = steps[c.weight_key]
                xs = c.entry.state_input(xkey)
            args = (
                c.x,
                c.entry.state_input(qkey),
                c.entry.state_input(skey),
                xs,
                c.bias,
                c.stride,
                c.padding,
                c.dilation,
                c.groups,
                act_bits,
            )
            c.entry.replace_call(c.node, torch.ops.qcompile.quant_conv2d.default, args)
            touched.add(c.entry.name)
            if c.path not in changed:
                changed.append(c.path)
        notes: dict[str, Any] = {}
        if per_group:
            notes["conv_per_group_as_per_channel"] = per_group
        if done and (ctx.plan.weight_method is not WeightMethod.RTN or self.clip_search):
            method = ctx.plan.weight_method
            notes["conv_rtn"] = method.value if method is not WeightMethod.RTN else "clip search"
        return notes

    @staticmethod
    def _quantize_conv(program: Program, c: ConvMatch, bits: int) -> tuple[str, str]:
        assert c.weight_key is not None
        weight = program.state[c.weight_key]
        codes, scale = quantize_weight_per_channel(weight.reshape(weight.shape[0], -1), bits)
        base = c.weight_key.removesuffix(".weight")
        qkey = program.add_state(f"{base}.qweight", codes.reshape(weight.shape).contiguous())
        program.weight_bits[qkey] = bits
        return qkey, program.add_state(f"{base}.w_scale", scale)

    def _targets(self, program: Program, plan: Any) -> list[tuple[str, str, QuantSpec]]:
        """(weight key, path, weight spec) of every linear to quantize, forward entry order."""
        out, seen = [], set()
        for m in find_linears(program):
            lq = plan.resolve(m.path)
            if self._skip_reason(lq) or m.weight_key in seen or lq.weight is None:
                continue
            seen.add(m.weight_key)
            check_group(m.path, program.state[m.weight_key].shape[1], lq.weight)
            out.append((m.weight_key, m.path, lq.weight))
        return out

    def _calibrated_codes(self, program: Program, ctx: PassContext, notes: dict[str, Any]) -> dict[str, Codes]:
        method = ctx.plan.weight_method
        if self.blockwise_epochs and method is WeightMethod.RTN:
            raise PlanError(
                "quantize_weights: blockwise_epochs trains the scales of gptq or decoupleq weights; set the plan's "
                "weight_method to decoupleq (or gptq), or blockwise_epochs to 0"
            )
        if method is WeightMethod.RTN and not self.clip_search:
            return {}
        targets = self._targets(program, ctx.plan)
        if not targets:
            return {}
        if method is WeightMethod.DECOUPLEQ:
            for _, path, spec in targets:
                if spec.symmetric:
                    raise PlanError(
                        f"layer {path!r}: decoupleq solves a float offset per group (w = code·scale + offset), so it "
                        f"needs asymmetric weights; set the weight spec's symmetric: false (got {spec})"
                    )
        who = f"quantize_weights ({method.value if method is not WeightMethod.RTN else 'clip search'})"
        batches = calib_batches(ctx.calib, who=who, program=program, min_tokens=64)
        if method in (WeightMethod.GPTQ, WeightMethod.DECOUPLEQ):
            return self._sequential(program, ctx, batches, targets, notes)
        obs = observe_linear_inputs(
            program,
            batches,
            [k for k, _, _ in targets],
            lambda _k: [SampleObserver(cap=self.samples, stride=7)],
            progress=ctx.progress,
            desc="quantize_weights: clip search",
        )
        out: dict[str, Codes] = {}
        for key, path, spec in targets:
            w = program.state[key].to(torch.float32)
            k = w.shape[1]
            gs = spec.block(k)
            with naming(f"layer {path!r} (weight {key!r})"):
                ratio = search_clip(w, obs[key][0].value(), spec.bits, gs, symmetric=spec.symmetric)
                q = quantize(
                    w,
                    spec.bits,
                    Granularity.PER_GROUP,
                    symmetric=spec.symmetric,
                    group_size=gs,
                    partial_last_group=True,
                    clip=ratio,
                )
            codes = q.codes.reshape(w.shape[0], -1)[:, :k]
            out[key] = (
                codes.to(code_dtype(spec.bits, spec.symmetric)),
                q.scale[..., 0],
                None if q.offset is None else q.offset[..., 0],
            )
        return out

    def _sequential(
        self,
        program: Program,
        ctx: PassContext,
        batches: list[torch.Tensor],
        targets: list[tuple[str, str, QuantSpec]],
        notes: dict[str, Any],
    ) -> dict[str, Codes]:
        """GPTQ or decoupleQ, decoder block by decoder block: each block's Hessians come from the model whose
        earlier blocks are already quantized; its weights are written back dequantized (then, with
        ``blockwise_epochs``, its scales, offsets and norm weights are trained on the block's output)."""
        from tqdm.auto import tqdm

        method = ctx.plan.weight_method
        blocks: dict[str, list[tuple[str, str, QuantSpec]]] = {}
        for t in targets:
            blocks.setdefault(_block_of(t[1]), []).append(t)
        out: dict[str, Codes] = {}
        layers: dict[str, dict[str, Any]] = {}
        ranges = _block_ranges(program, blocks)
        if ranges is None and self.blockwise_epochs:
            raise PlanError(
                "quantize_weights: the block-wise stage needs the quantized linears grouped in decoder blocks whose "
                "nodes form separate ranges of the forward graph (module paths with a layer index); this model's do "
                "not: set blockwise_epochs to 0"
            )
        trainer = (
            BlockTrainer(self.blockwise_epochs, self.blockwise_lr, ctx.progress) if self.blockwise_epochs else None
        )
        stepper = Stepper(program, batches) if ranges is not None else None
        bar = tqdm(blocks.items(), desc=f"quantize_weights: {method.value}", disable=not ctx.progress, unit="block")
        for block, items in bar:
            if stepper is not None and ranges is not None:
                blk, firsts = ranges[block]
                wins = stepper.block_windows(blk)
                hs = _block_hessians(program, stepper, blk, wins, firsts)
            else:
                hs = observe_linear_inputs(
                    program,
                    batches,
                    [k for k, _, _ in items],
                    lambda key: [Hessian(program.state[key].shape[1])],
                    desc=f"{method.value} {block}",
                    stop_early=True,
                )
            for key, path, spec in items:
                w = program.state[key]
                gs = spec.block(w.shape[1])
                t0 = time.perf_counter()
                with _layer(path, f"weight {key!r}"):
                    codes, scale, offset, note = self._solve(w, hs[key][0].value(), spec, gs, method)
                note["seconds"] = round(time.perf_counter() - t0, 3)
                layers[path] = note
                out[key] = (codes, scale, offset)
                program.state[key] = dequantize_weight_groups(codes, scale, offset, gs).to(w.dtype)
            if stepper is not None and ranges is not None:
                blk = ranges[block][0]
                if trainer is not None:
                    with _layer(block, "block-wise stage"):
                        notes.setdefault("blockwise", {})[block] = trainer.train(program, blk, wins, items, out)
                stepper.advance(stepper.index[blk.nodes[-1]] + 1)  # the quantized block's outputs
        notes[method.value] = {
            "layers": layers,
            "seconds": round(sum(n["seconds"] for n in layers.values()), 3),
            "options": {"damp": self.damp}
            | (
                {
                    "iterations": self.dq_iterations,
                    "inner_steps": self.dq_inner_steps,
                    "rounding": Rounding(self.dq_rounding).value,
                }
                if method is WeightMethod.DECOUPLEQ
                else {"act_order": self.act_order}
            ),
        }
        return out

    def _solve(
        self, w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, gs: int, method: WeightMethod
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """One layer's codes, scale, offset and report note (per-layer objective for decoupleq)."""
        if method is WeightMethod.GPTQ:
            codes, scale, offset = gptq_quantize(
                w, h, spec.bits, gs, symmetric=spec.symmetric, damp=self.damp, act_order=self.act_order
            )
            return codes, scale, offset, {}
        r = decoupleq_quantize(
            w,
            h,
            spec.bits,
            gs,
            damp=self.damp,
            iterations=self.dq_iterations,
            inner_steps=self.dq_inner_steps,
            rounding=Rounding(self.dq_rounding),
        )
        note = {
            "objective_rtn": float(f"{r.rtn_objective:.6g}"),
            "objective_gptq": float(f"{r.gptq_objective:.6g}"),
            "objective": [float(f"{v:.6g}") for v in r.objective],
            "improved_rows": list(r.improved),
            "gptq_rows": r.gptq_rows,
        }
        return r.codes, r.scale, r.offset, note

    @staticmethod
    def _quantize(
        program: Program,
        wkey: str,
        w: QuantSpec,
        a: QuantSpec | None,
        path: str,
        pre: Codes | None = None,
        base: str | None = None,
    ) -> tuple[list[str | None], Any, tuple[int, ...]]:
        """Quantize weight ``wkey`` once; returns (state keys, op, extra op args). New state keys start
        with ``base`` (default: ``wkey`` without ``.weight``)."""
        if _uses_quest(w, a):
            return _quantize_quest(program, wkey, w, a, path, base)
        weight = program.state[wkey]
        k = weight.shape[1]
        base = base or wkey.removesuffix(".weight")
        if _is_w8_per_channel(w) and _is_a8_per_token(a):
            q, scale = (pre[0], pre[1][:, 0]) if pre is not None else quantize_weight_per_channel(weight, 8)
            qkey = program.add_state(f"{base}.qweight", q)
            program.weight_bits[qkey] = 8
            return [qkey, program.add_state(f"{base}.w_scale", scale)], torch.ops.qcompile.linear_w8a8.default, ()
        if w.granularity not in (Granularity.PER_CHANNEL, Granularity.PER_GROUP):
            raise PlanError(
                f"layer {path!r}: weight granularity {w.granularity.value!r} is not supported; supported: {SUPPORTED}"
            )
        group = w.block(k)
        check_group(path, k, w)
        act_bits, act_group = 0, 0
        if a is not None:
            if not a.symmetric or not a.dynamic or a.granularity not in (Granularity.PER_TOKEN, Granularity.PER_GROUP):
                raise PlanError(f"layer {path!r}: activation {a} is not supported; supported: {SUPPORTED}")
            act_bits = a.bits
            if a.granularity is Granularity.PER_GROUP:
                check_group(path, k, a)
                act_group = int(a.group_size or 0)
                if group not in (k, act_group):
                    raise PlanError(
                        f"layer {path!r}: activation group {act_group} must equal the weight group {group} "
                        "(or use per_channel weights)"
                    )
        codes, scale, offset = pre if pre is not None else quantize_weight_groups(weight, w.bits, group, w.symmetric)
        if w.bits in PACKED_BITS and (w.symmetric or w.bits in PACKED_ASYM_BITS):  # stored densely packed
            pkey = program.add_state(f"{base}.qweight_packed", pack_codes(codes, w.bits, signed=offset is None))
            skey = program.add_state(f"{base}.w_scale", scale)
            okey = program.add_state(f"{base}.w_offset", offset) if offset is not None else None
            return [pkey, skey, okey], torch.ops.qcompile.packed_linear.default, (k, w.bits, group, act_bits, act_group)
        qkey = program.add_state(f"{base}.qweight", codes)
        program.weight_bits[qkey] = w.bits
        okey = program.add_state(f"{base}.w_offset", offset) if offset is not None else None
        keys = [qkey, program.add_state(f"{base}.w_scale", scale), okey]
        return keys, torch.ops.qcompile.quant_linear.default, (group, act_bits, act_group)

    @staticmethod
    def _skip_reason(lq: LayerQuant) -> str:
        if lq.skip:
            if lq.lm_head is LmHead.FP32:
                return "lm_head kept in float (plan lm_head: fp32; int8 or plan quantizes it)"
            return "kept in float by the plan (skip glob or rule)"
        if lq.weight is None:
            if lq.lm_head is LmHead.PLAN:
                return "lm_head kept in float (plan lm_head: plan, and the plan quantizes no weights)"
            return "the plan quantizes no weights for this layer"
        return ""

    @staticmethod
    def _head_note(program: Program, wkey: str, lq: LayerQuant, reason: str) -> dict[str, Any]:
        """What becomes of an lm_head: quantized (to which spec) or kept (why), and the embedding
        gathers its weight is tied to (they keep reading the fp32 table, so the codes are extra bytes)."""
        assert lq.lm_head is not None
        note: dict[str, Any] = {
            "setting": lq.lm_head.value,
            "quantized": not reason,
            "tied_to": non_linear_uses(program, wkey),
            "weight": wkey,
        }
        if reason:
            note["result"] = reason
            return note
        assert lq.weight is not None
        spec = lq.weight
        grid = f"group {spec.group_size}" if spec.granularity is Granularity.PER_GROUP else "per output channel"
        note["result"] = (
            f"quantized: {spec.bits}-bit {'symmetric' if spec.symmetric else 'asymmetric'} {grid}, weight-only "
            f"(float activations){'' if lq.activation is None else f', activations {lq.activation}'}"
        )
        return note


# ---- QuEST grids (issue 19): weights and dynamic per-token activations on QuEST's midrise grid -------

QUEST_SUPPORTED = (
    "grid quest: linear weights per_channel or per_group (any width), weight-only or with quest activations "
    "dynamic per_token; weight_method rtn without clip_search (QuEST's clip is the Gaussian-optimal α_b·RMS)"
)


def _uses_quest(w: QuantSpec | None, a: QuantSpec | None) -> bool:
    return any(s is not None and s.grid is Grid.QUEST for s in (w, a))


def _check_quest(program: Program, ctx: PassContext, clip_search: bool) -> None:
    """PlanErrors, naming the layer, for QuEST grids this pass cannot honor (checked before calibration)."""
    for c in find_convs(program):
        lq = ctx.plan.resolve(c.path)
        if not c.reason and not QuantizeWeights._skip_reason(lq) and _uses_quest(lq.weight, lq.activation):
            raise PlanError(
                f"convolution {c.path!r}: grid 'quest' is not supported for convolutions; {QUEST_SUPPORTED}"
            )
    for m in find_linears(program):
        lq = ctx.plan.resolve(m.path)
        if QuantizeWeights._skip_reason(lq) or not _uses_quest(lq.weight, lq.activation):
            continue
        w, a = lq.weight, lq.activation
        assert w is not None
        if w.grid is not Grid.QUEST:
            raise PlanError(f"layer {m.path!r}: quest activations need quest weights (got {w}); {QUEST_SUPPORTED}")
        if ctx.plan.weight_method is not WeightMethod.RTN or clip_search:
            raise PlanError(
                f"layer {m.path!r}: quest weights are rounded by QuEST's own quantizer, not weight_method "
                f"{ctx.plan.weight_method.value!r}{' with clip_search' if clip_search else ''}; {QUEST_SUPPORTED}"
            )
        if w.granularity not in (Granularity.PER_CHANNEL, Granularity.PER_GROUP):
            raise PlanError(f"layer {m.path!r}: quest weights {w.granularity.value!r}; {QUEST_SUPPORTED}")
        check_group(m.path, program.state[m.weight_key].shape[1], w)
        if a is not None and (a.grid is not Grid.QUEST or a.granularity is not Granularity.PER_TOKEN):
            raise PlanError(
                f"layer {m.path!r}: quest weights with activation {a}: activations must be quest per_token (or "
                f"none); {QUEST_SUPPORTED}"
            )


def _quantize_quest(
    program: Program, wkey: str, w: QuantSpec, a: QuantSpec | None, path: str, base: str | None
) -> tuple[list[str | None], Any, tuple[int, ...]]:
    """QuEST weights (unsigned codes, one half step per row or group: :mod:`qcompile.quant.quest_linear`):
    weight-only → ``qcompile::quant_linear`` with the equal asymmetric grid (scale Δ, float offset);
    with quest activations → ``qcompile::quest_linear`` (exact integer products of odd codes)."""
    from qcompile.quant.quest_linear import as_asymmetric, quest_weight_codes

    weight = program.state[wkey]
    k = weight.shape[1]
    base = base or wkey.removesuffix(".weight")
    group = w.block(k)
    codes, half = quest_weight_codes(weight, w.bits, group)
    check_scale(half, f"layer {path!r} (quest weights)")
    qkey = program.add_state(f"{base}.qweight", codes)
    program.weight_bits[qkey] = w.bits
    if a is None:
        scale, offset = as_asymmetric(half, w.bits)
        keys = [qkey, program.add_state(f"{base}.w_scale", scale), program.add_state(f"{base}.w_offset", offset)]
        return keys, torch.ops.qcompile.quant_linear.default, (group, 0, 0)
    keys = [qkey, program.add_state(f"{base}.w_half_step", half)]
    return keys, torch.ops.qcompile.quest_linear.default, (group, w.bits, a.bits)
