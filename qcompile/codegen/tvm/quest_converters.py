"""Converters for the QuEST ops (registered in :func:`.converters.converters`).

* ``qcompile::hadamard`` → the block Walsh–Hadamard kernel (:mod:`.kernels.quest`) on ``x`` viewed as
  rows (fp32 only; bitwise equal to the reference butterfly);
* ``qcompile::quest_linear`` with QuEST activations (``act_bits`` 2–7: odd codes up to 127 fit int8) →
  the QuEST row quantizer (odd activation codes and one half step per token, the reference's float
  operations) then the CPU ``i8`` lane-blocked linear kernel (:mod:`.kernels.linear`) on the odd weight
  codes ``2u − (2^b − 1)`` with the weight half steps as scales: the int32 products are exact;
  weight-only (``act_bits == 0``) → the target's linear rules with the same ``i8`` recipe and fp32
  activations. CUDA targets, 8-bit codes and shapes the template does not cover decline
  (:class:`~.rules.NoRule`: the plan's torch fallback may run the node).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx
from tvm import relax

from qcompile.codegen.target import CpuTarget
from qcompile.codegen.tvm.kernels.linear import NB
from qcompile.codegen.tvm.kernels.quest import Hadamard, QuestRows, hadamard_primfunc, quest_rows_primfunc
from qcompile.codegen.tvm.kernels.tunable import TemplateTunable
from qcompile.codegen.tvm.recipe import LinearRecipe
from qcompile.codegen.tvm.rules import (
    LinearCall,
    LinearWeights,
    NoRule,
    apply_rules,
    finish,
    pad_k,
    padded_bias,
    rows,
    static_rows,
)
from qcompile.ir.program import SlotKind
from qcompile.quant.quest_linear import odd_from_unsigned

if TYPE_CHECKING:
    from qcompile.codegen.tvm.lower import Lowering


def _state_key(lw: Lowering, node: object, what: str) -> str:
    slot = lw.slots.get(node) if isinstance(node, fx.Node) else None
    if slot is None or slot.kind is not SlotKind.STATE:
        raise NoRule(f"its {what} is not a constant of the Program")
    return slot.name


def hadamard(lw: Lowering, node: fx.Node) -> relax.Var:
    x, blocks = node.args[0], tuple(int(b) for b in node.args[1])  # type: ignore[union-attr]
    if node.meta["val"].dtype != torch.float32:
        raise NoRule("only float32 Hadamard rotations are converted")
    if not isinstance(lw.target, CpuTarget):
        raise NoRule("the Walsh-Hadamard kernel is scheduled for CPUs only")
    xv = lw.env(x)
    flat, lead = rows(lw, xv)
    mdim = lw.imp.shape_of(flat)[0]
    spec = Hadamard(blocks, static_rows(lw, xv))
    f = lw.kernel(spec.name, lambda: hadamard_primfunc(spec))
    y = lw.bb.emit(relax.call_tir(f, [flat], relax.TensorType([mdim, spec.k], "float32")))
    return lw.bb.emit(relax.op.reshape(y, [*lead, spec.k]))


def quest_linear(lw: Lowering, node: fx.Node) -> relax.Var:
    x, codes, scale, b, group, w_bits, act_bits = node.args
    wkey, skey = _state_key(lw, codes, "codes"), _state_key(lw, scale, "scale")
    bkey = None if b is None else _state_key(lw, b, "bias")
    n, k = (int(d) for d in lw.program.state[wkey].shape)
    wb, ab, gs = int(w_bits), int(act_bits), int(group)  # type: ignore[call-overload]
    if 2**wb - 1 > 127 or 2**ab - 1 > 127:
        raise NoRule("8-bit QuEST odd codes do not fit the int8 kernels")
    if node.meta["val"].dtype != torch.float32:
        raise NoRule("only float32 QuEST linears are converted")
    odd = lambda st: odd_from_unsigned(st[wkey], wb)  # noqa: E731
    weights = LinearWeights(wkey, odd, lambda st: st[skey].float())
    if ab == 0:
        call = LinearCall(node, lw.env(x), LinearRecipe(n, k, "i8", gs), weights, bkey)
        return apply_rules(lw.target.rules.linear, lw, call, "linear")
    if not isinstance(lw.target, CpuTarget):
        raise NoRule("the QuEST row quantizer is scheduled for CPUs only")
    xv = lw.env(x)
    recipe = LinearRecipe(n, k, "i8", gs, act_bits=ab)
    try:
        spec = recipe.kernel(static_rows(lw, xv), bkey is not None)
    except ValueError as e:
        raise NoRule(str(e)) from e
    bb = lw.bb
    flat, lead = rows(lw, xv)
    mdim = lw.imp.shape_of(flat)[0]
    flat = pad_k(lw, flat, k, spec.k)
    qr = QuestRows(k, spec.k, ab, spec.m)
    qf = lw.kernel(qr.name, lambda: quest_rows_primfunc(qr))
    outs = [relax.TensorType([mdim, spec.k], "int8"), relax.TensorType([mdim, 1], "float32")]
    q = bb.emit(relax.call_tir(qf, [flat], outs))
    args: list[relax.Expr] = [bb.emit(relax.TupleGetItem(q, 0)), bb.emit(relax.TupleGetItem(q, 1))]
    for i, (wshape, wdt) in enumerate(spec.weight_shapes()):
        packed = lambda st, i=i: recipe.pack_weight(spec, odd(st))[i]  # noqa: E731
        args.append(lw.param(f"{wkey}@quest_i8_{i}", packed, wshape, wdt))
    gshape = (spec.n // NB, spec.groups, NB)
    scales = lambda st: recipe.pack_groups(spec, st[skey].float())  # noqa: E731
    args.append(lw.param(f"{wkey}@quest_scale", scales, gshape, "float32"))
    if bkey is not None:
        args.append(padded_bias(lw, bkey, n, spec.n))
    f = lw.tuned_kernel(TemplateTunable(spec))
    y = bb.emit(relax.call_tir(f, args, relax.TensorType([mdim, spec.n], "float32")))
    return finish(lw, y, xv, lead, spec.n, n)
