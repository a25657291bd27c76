"""Converters that qcompile adds to TVM's PyTorch importer: node → Relax value.

* qcompile's linear ops (``linear_w8a8``, ``quant_linear``, ``packed_linear``) and ``aten.linear``
  with a constant weight become a :class:`~.rules.LinearCall` (its :class:`~.recipe.LinearRecipe`:
  weight bits from ``Program.bits_of``, or the op's own arguments for packed codes) handed to the
  target's linear rules;
* ``quant_conv2d`` (:func:`quant_conv2d`) → Relax ``nn.conv2d``: with static activations an int8 ×
  int8 convolution with int32 accumulation (``out_dtype="int32"``; LLVM lowers TVM's conv2d), then
  the fp32 rescale; weight-only and dynamic per-pixel activations a fp32 convolution of the
  dequantized weights (repacked once), after the per-pixel fake quantization;
* ``scaled_dot_product_attention`` → the target's attention rules (causal / dropout / enable_gqa
  forms are declined);
* ``index_copy_`` into a cache slot → the target's cache-write rules (in place; into anything else
  it is declined);
* ATen ops TVM 0.27's importer lacks or gets wrong here: ``diff``, ``cumsum`` (of bools),
  ``to.device``.

A converter declines a node by raising :class:`~.rules.NoRule`; anything else it raises is a bug
(:class:`~.lower.LoweringError`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import tvm
from tvm import relax

from qcompile.codegen.tvm import quest_converters
from qcompile.codegen.tvm.recipe import LinearRecipe, NoFormat
from qcompile.codegen.tvm.rules import AttentionCall, CacheWrite, LinearCall, LinearWeights, NoRule, apply_rules
from qcompile.ir.program import SlotKind
from qcompile.ops.packed import unpack_codes

if TYPE_CHECKING:
    from qcompile.codegen.tvm.lower import Lowering

Converter = Callable[[fx.Node], relax.Var]


def converters(lw: Lowering) -> dict[str, Converter]:
    """qcompile's converters (by the importer's op names) for the lowering ``lw``."""
    table: dict[str, Callable[[Lowering, fx.Node], relax.Var]] = {
        "linear.default": aten_linear,
        "linear_w8a8.default": linear_w8a8,
        "quant_linear.default": quant_linear,
        "packed_linear.default": packed_linear,
        "quant_conv2d.default": quant_conv2d,
        "index_copy_.default": index_copy_,
        "diff.default": diff,
        "cumsum.default": cumsum,
        "scaled_dot_product_attention.default": sdpa,
        "to.device": lambda lw, node: lw.env(node.args[0]),
        "where.ScalarOther": where_scalar,
        "where.ScalarSelf": where_scalar,
        "clip.default": clip,
        "batch_norm.default": batch_norm,
        "upsample_nearest2d.vec": upsample_nearest2d,
        "hadamard.default": quest_converters.hadamard,  # QuEST (issue 19)
        "quest_linear.default": quest_converters.quest_linear,
    }
    return {name: functools.partial(f, lw) for name, f in table.items()}


# ---- linear layers ------------------------------------------------------------------------------


def _is_state(lw: Lowering, node: Any) -> bool:
    slot = lw.slots.get(node) if isinstance(node, fx.Node) else None
    return slot is not None and slot.kind is SlotKind.STATE


def _state_key(lw: Lowering, node: Any, what: str) -> str:
    if not _is_state(lw, node):
        raise NoRule(f"its {what} is not a constant of the Program")
    return lw.slots[node].name


def _bias_key(lw: Lowering, node: Any) -> str | None:
    return None if node is None else _state_key(lw, node, "bias")


def _linear(
    lw: Lowering, node: fx.Node, x: fx.Node, recipe: LinearRecipe, weights: LinearWeights, bias: str | None
) -> relax.Var:
    return apply_rules(lw.target.rules.linear, lw, LinearCall(node, lw.env(x), recipe, weights, bias), "linear")


def _codes_recipe(n: int, k: int, bits: int, group: int, act_bits: int, act_group: int, offset: bool) -> LinearRecipe:
    try:
        return LinearRecipe.codes(n, k, bits, group, act_bits, bool(act_group), offset)
    except NoFormat as e:
        raise NoRule(str(e)) from e


def aten_linear(lw: Lowering, node: fx.Node) -> relax.Var:
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else None
    if not _is_state(lw, w) or (b is not None and not _is_state(lw, b)) or node.meta["val"].dtype != torch.float32:
        return lw.tvm_linear(node)  # a weight or bias computed in the graph, or not fp32: TVM's own converter
    wkey = _state_key(lw, w, "weight")
    n, k = lw.program.state[wkey].shape
    return _linear(lw, node, x, LinearRecipe.dense(n, k), LinearWeights(wkey, lambda st: st[wkey]), _bias_key(lw, b))


def linear_w8a8(lw: Lowering, node: fx.Node) -> relax.Var:
    x, qw, ws, b = node.args
    wkey, skey = _state_key(lw, qw, "weight"), _state_key(lw, ws, "scale")
    n, k = lw.program.state[wkey].shape
    weights = LinearWeights(wkey, lambda st: st[wkey], lambda st: st[skey].float()[:, None])
    return _linear(lw, node, x, LinearRecipe.w8a8(n, k), weights, _bias_key(lw, b))


def quant_linear(lw: Lowering, node: fx.Node) -> relax.Var:
    x, codes, scale, offset, b, group, act_bits, act_group = node.args
    wkey, skey = _state_key(lw, codes, "codes"), _state_key(lw, scale, "scale")
    okey = _state_key(lw, offset, "offset") if offset is not None else None
    n, k = lw.program.state[wkey].shape
    recipe = _codes_recipe(n, k, lw.program.bits_of(wkey), group, act_bits, act_group, okey is not None)
    off = (lambda st: st[okey].float()) if okey is not None else None
    weights = LinearWeights(wkey, lambda st: st[wkey], lambda st: st[skey].float(), off)
    return _linear(lw, node, x, recipe, weights, _bias_key(lw, b))


def packed_linear(lw: Lowering, node: fx.Node) -> relax.Var:
    x, packed, scale, b, k, w_bits, group, act_bits, act_group = node.args[:9]  # packed codes carry their width
    offset = _arg(node, 9, "offset", None)  # asymmetric: unsigned codes and a float offset
    pkey, skey = _state_key(lw, packed, "packed weight"), _state_key(lw, scale, "scale")
    okey = _state_key(lw, offset, "offset") if offset is not None else None
    n = lw.program.state[pkey].shape[0]
    recipe = _codes_recipe(n, k, w_bits, group, act_bits, act_group, okey is not None)
    signed = okey is None
    off = (lambda st: st[okey].float()) if okey is not None else None
    weights = LinearWeights(
        pkey, lambda st: unpack_codes(st[pkey], k, w_bits, signed=signed), lambda st: st[skey].float(), off
    )
    return _linear(lw, node, x, recipe, weights, _bias_key(lw, b))


# ---- convolutions --------------------------------------------------------------------------------


def _nonfinite_samples(lw: Lowering, x: relax.Var) -> relax.Var:
    """[N, 1, 1, 1]: NaN for a sample of ``x`` holding NaN/Inf, else 0 (TVM folds ``x * 0`` to 0, so
    this tests ``isfinite``)."""
    bad = relax.op.where(relax.op.isfinite(x), relax.const(0.0, "float32"), relax.const(float("nan"), "float32"))
    return lw.bb.emit(relax.op.sum(bad, axis=[1, 2, 3], keepdims=True))


def quant_conv2d(lw: Lowering, node: fx.Node) -> relax.Var:
    """``qcompile::quant_conv2d`` in Relax, the same float operations as the reference op (codes
    ``clamp(round_half_even(x / step))``, NaN to code 0 and a NaN sample output, rescale
    ``acc · step · w_scale[o]`` then the bias), so the int32 accumulator is bit-exact."""
    x, codes, ws, xs, b, stride, padding, dilation, groups, act_bits = node.args
    ckey, skey = _state_key(lw, codes, "codes"), _state_key(lw, ws, "scale")
    bkey = _bias_key(lw, b)
    if node.meta["val"].dtype != torch.float32:
        raise NoRule("only float32 convolutions are converted")
    bb = lw.bb
    f32 = lambda v: relax.const(v, "float32")  # noqa: E731
    o = int(lw.program.state[ckey].shape[0])
    xv = lw.env(x)
    conv = dict(strides=list(stride), padding=[*padding, *padding], dilation=list(dilation), groups=int(groups))
    qmax = float(2 ** (act_bits - 1) - 1) if act_bits else 0.0
    if act_bits and xs is not None:
        step = lw.env(xs)
        r = bb.emit(relax.op.round(relax.op.divide(xv, step)))
        r = bb.emit(relax.op.where(relax.op.isnan(r), f32(0.0), r))
        q = bb.emit(relax.op.astype(relax.op.clip(r, -qmax, qmax), "int8"))
        acc = bb.emit(relax.op.nn.conv2d(q, lw.env(codes), out_dtype="int32", **conv))
        sw = lw.param(f"{skey}@o11", lambda st: st[skey].float().view(1, -1, 1, 1), (1, o, 1, 1), "float32")
        y = bb.emit(relax.op.multiply(relax.op.multiply(relax.op.astype(acc, "float32"), step), sw))
        y = bb.emit(relax.op.add(y, _nonfinite_samples(lw, xv)))
    else:
        if act_bits:  # dynamic per pixel: simulated (see qcompile.ops.conv)
            amax = bb.emit(relax.op.max(relax.op.abs(xv), axis=[1], keepdims=True))
            scale = bb.emit(relax.op.where(relax.op.equal(amax, f32(0.0)), f32(1.0), relax.op.divide(amax, f32(qmax))))
            r = relax.op.clip(relax.op.round(relax.op.divide(xv, scale)), -qmax, qmax)
            xq = bb.emit(relax.op.multiply(r, scale))
            xv = bb.emit(relax.op.add(xq, _nonfinite_samples(lw, xv)))
        shape = tuple(int(d) for d in lw.program.state[ckey].shape)

        def deq(st: dict[str, torch.Tensor]) -> torch.Tensor:
            return st[ckey].float() * st[skey].float().view(-1, 1, 1, 1)

        w = lw.param(f"{ckey}@dequant", deq, shape, "float32")
        y = bb.emit(relax.op.nn.conv2d(xv, w, out_dtype="float32", **conv))
    if bkey is not None:
        key = bkey
        bias = lw.param(f"{key}@o11", lambda st: st[key].float().view(1, -1, 1, 1), (1, o, 1, 1), "float32")
        y = bb.emit(relax.op.add(y, bias))
    return y


# ---- attention and cache writes -----------------------------------------------------------------


def _arg(node: fx.Node, i: int, name: str, default: Any) -> Any:
    """Argument ``i`` (or keyword ``name``) of ``node``."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def sdpa(lw: Lowering, node: fx.Node) -> relax.Var:
    # (query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False)
    mask = _arg(node, 3, "attn_mask", None)
    if _arg(node, 5, "is_causal", False) or _arg(node, 4, "dropout_p", 0.0) or node.kwargs.get("enable_gqa", False):
        raise NoRule("causal / dropout / enable_gqa attention is not converted")
    scale = node.kwargs.get("scale") or 1.0 / math.sqrt(node.args[0].meta["val"].shape[-1])
    q, k, v = node.args[:3]
    return apply_rules(lw.target.rules.attention, lw, AttentionCall(node, q, k, v, mask, float(scale)), "attention")


def index_copy_(lw: Lowering, node: fx.Node) -> relax.Var:
    dst, dim, index, src = node.args
    slot = lw.slots.get(dst)
    if slot is None or slot.kind is not SlotKind.CACHE:
        raise NoRule("in-place index_copy_ is supported into cache tensors only")
    cache = lw.env(dst)
    shape = tuple(int(d) for d in lw.imp.shape_of(cache))
    rows_dim = lw.imp.shape_of(lw.env(index))[0]
    rows_n = int(rows_dim) if isinstance(rows_dim, tvm.tirx.IntImm) else None
    write = CacheWrite(node, cache, lw.env(index), lw.env(src), shape, str(cache.ty.dtype), dim % len(shape), rows_n)
    new = apply_rules(lw.target.rules.cache_write, lw, write, "cache write")
    lw.imp.env[dst] = new  # later reads of the cache see the written tensor
    return new


# ---- ATen ops the importer lacks ----------------------------------------------------------------


def diff(lw: Lowering, node: fx.Node) -> relax.Var:
    bb = lw.bb
    x = lw.env(node.args[0])
    n = node.args[1] if len(node.args) > 1 else 1
    dim = node.args[2] if len(node.args) > 2 else -1
    pre = node.args[3] if len(node.args) > 3 else node.kwargs.get("prepend")
    app = node.args[4] if len(node.args) > 4 else node.kwargs.get("append")
    parts = ([lw.env(pre)] if pre is not None else []) + [x] + ([lw.env(app)] if app is not None else [])
    if len(parts) > 1:
        x = bb.emit(relax.op.concat(parts, axis=dim))
    for _ in range(n):
        shape = lw.imp.shape_of(x)
        ax = dim % len(shape)
        hi = bb.emit(relax.op.strided_slice(x, [ax], [1], [shape[ax]], assume_inbound=True))
        lo = bb.emit(relax.op.strided_slice(x, [ax], [0], [shape[ax] - 1], assume_inbound=True))
        x = bb.emit(relax.op.subtract(hi, lo))
    return x


def where_scalar(lw: Lowering, node: fx.Node) -> relax.Var:
    """``where(cond, x, scalar)`` / ``where(cond, scalar, x)`` (Gemma 2's soft-capped attention mask): the
    scalar as a constant of the output's dtype; a non-boolean condition means non-zero, as in torch."""
    dt = lw.imp._convert_data_type(node.meta["val"].dtype)
    cond = lw.env(node.args[0])
    cdt = str(cond.ty.dtype)  # what the importer made of it (a bool mask may arrive as int64)
    if cdt != "bool":
        cond = lw.bb.emit(relax.op.not_equal(cond, relax.const(0, cdt)))
    a, b = (lw.env(x) if isinstance(x, fx.Node) else relax.const(x, dt) for x in node.args[1:3])
    return lw.bb.emit(relax.op.where(cond, a, b))


def batch_norm(lw: Lowering, node: fx.Node) -> relax.Var:
    """``aten.batch_norm(x, weight, bias, mean, var, training, momentum, eps, cudnn)`` in inference mode.
    TVM 0.27's importer maps this op to its ``_native_batch_norm_legit`` reader, which takes momentum
    from ``training`` and eps from ``momentum`` and normalizes with the batch's statistics: a BatchNorm
    in eval mode came out 20 % off."""
    if _arg(node, 5, "training", False):
        raise NotImplementedError("batch_norm in training mode")
    x = lw.env(node.args[0])
    val = node.args[0].meta["val"]
    c, dt = int(val.shape[1]), lw.imp._convert_data_type(val.dtype)

    def param(i: int, fill: float) -> relax.Expr:
        a = node.args[i] if len(node.args) > i else None
        return lw.env(a) if isinstance(a, fx.Node) else relax.const(torch.full((c,), fill).numpy(), dt)

    eps = float(_arg(node, 7, "eps", 1e-5))
    bn = relax.op.nn.batch_norm(
        x, param(1, 1.0), param(2, 0.0), param(3, 0.0), param(4, 1.0), axis=1, epsilon=eps, training=False
    )
    return lw.bb.emit(relax.TupleGetItem(lw.bb.emit(bn), 0))


def upsample_nearest2d(lw: Lowering, node: fx.Node) -> relax.Var:
    """``aten.upsample_nearest2d.vec`` on a tensor of symbolic height/width with integer scale factors
    (TVM 0.27's importer asks each dim for a ``.value``, which a symbolic dim does not have)."""
    x = lw.env(node.args[0])
    size = _arg(node, 1, "output_size", None)
    scales = _arg(node, 2, "scale_factors", None)
    shape = lw.imp.shape_of(x)
    if size is None:
        if scales is None or any(float(f) != int(f) or f < 1 for f in scales):
            raise NotImplementedError(f"upsample_nearest2d with scale factors {scales} (integers >= 1 only)")
        size = [shape[2] * int(scales[0]), shape[3] * int(scales[1])]
    elif any(isinstance(d, fx.Node) for d in size):
        raise NotImplementedError("upsample_nearest2d to a computed size")
    return lw.bb.emit(
        relax.op.image.resize2d(
            x,
            size,
            layout="NCHW",
            method="nearest_neighbor",
            coordinate_transformation_mode="asymmetric",
            rounding_method="floor",
        )
    )


def clip(lw: Lowering, node: fx.Node) -> relax.Var:
    """``aten.clip(x, min, max)`` with scalar bounds (onnx2torch's Clip, HardSigmoid): an unset bound is
    no bound."""
    x = lw.env(node.args[0])
    lo = _arg(node, 1, "min", None)
    hi = _arg(node, 2, "max", None)
    if isinstance(lo, fx.Node) or isinstance(hi, fx.Node):
        raise NotImplementedError("clip with tensor bounds")
    return lw.bb.emit(
        relax.op.clip(x, float("-inf") if lo is None else float(lo), float("inf") if hi is None else float(hi))
    )


def cumsum(lw: Lowering, node: fx.Node) -> relax.Var:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
    dt = lw.imp._convert_data_type(node.meta["val"].dtype)
    return lw.bb.emit(relax.op.cumsum(lw.env(node.args[0]), axis=dim, dtype=dt))
