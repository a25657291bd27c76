"""A Relax rewrite of ops that move no data into what they are: views, or nothing.

* A ``permute_dims`` that moves only dimensions of size 1 is a ``reshape``. A decoder's one-token step
  transposes ``[1, 1, heads, dim]`` to ``[1, heads, 1, dim]`` (V before the cache write) and back (the
  attention output before o_proj): the elements keep their order in memory, yet TVM lowers each
  transpose to a copy kernel, two kernel calls per layer and step. As a reshape it becomes a view of
  the same memory (``RewriteDataflowReshape``) or fuses into the kernel beside it. It applies when the
  permuted tensor's shape is known and the dimensions that are not the constant 1 (symbolic ones
  included) keep their relative order.
* A ``reshape`` of a ``reshape``'s output reshapes the first one's input (one view, not a chain that
  TVM fuses into a copy kernel); a ``reshape`` to its input's own shape is that input.
* An ``astype`` to the dtype its input already has is that input (an RMSNorm's ``x.to(float32)`` on
  a float32 model): TVM lowers it to a copy kernel whenever nothing else fuses with it.

Anything else is left as it is.
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm import relax
from tvm.relax import PyExprMutator, expr_functor


def _is_one(d: Any) -> bool:
    return isinstance(d, tvm.tirx.IntImm) and int(d.value) == 1


def unit_permute_shape(shape: list[Any], axes: list[int] | None) -> list[Any] | None:
    """The output shape of permuting ``shape`` by ``axes`` (None: reversed) when that permutation only
    moves dimensions equal to the constant 1; else None."""
    rank = len(shape)
    order = list(range(rank))[::-1] if axes is None else [int(a) % rank for a in axes]
    moved = [a for a in order if not _is_one(shape[a])]
    if moved != sorted(moved) or order == list(range(rank)):
        return None
    return [shape[a] for a in order]


@expr_functor.mutator
class _Moves(PyExprMutator):
    def _source(self, x: relax.Expr) -> relax.Expr:
        """What ``x`` is bound to, through plain aliases (``a = b``)."""
        while isinstance(x, relax.Var):
            bound = self.lookup_binding(x)
            if not isinstance(bound, relax.Var):
                return x if bound is None else bound
            x = bound
        return x

    def _reshape(self, x: relax.Expr, shape: Any) -> relax.Expr:
        """``x`` reshaped to ``shape``, reading through a reshape that produced ``x`` (one view, not two);
        ``x`` itself when it has that shape already."""
        src = self._source(x)
        if isinstance(src, relax.Call) and isinstance(src.op, tvm.ir.Op) and src.op.name == "relax.reshape":
            x = src.args[0]
        want = shape.values if isinstance(shape, relax.ShapeExpr) else shape  # a list, or a shape-valued Var
        have = x.ty.shape if isinstance(x.ty, relax.TensorType) else None
        if isinstance(have, relax.ShapeExpr) and isinstance(want, (list, tvm.ir.Array)):
            if [str(d) for d in have.values] == [str(d) for d in want]:
                return x
        return relax.op.reshape(x, shape)

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        name = call.op.name if isinstance(call.op, tvm.ir.Op) else ""
        ty = call.args[0].ty if call.args else None
        if not isinstance(ty, relax.TensorType):
            return super().visit_call_(call)
        if name == "relax.astype" and str(ty.dtype) == str(call.attrs.dtype):
            return self.visit_expr(call.args[0])
        if name == "relax.reshape":
            return self._reshape(self.visit_expr(call.args[0]), call.args[1])
        if name == "relax.permute_dims" and isinstance(ty.shape, relax.ShapeExpr):
            axes = None if call.attrs.axes is None else [int(a) for a in call.attrs.axes]
            out = unit_permute_shape(list(ty.shape.values), axes)
            if out is not None:
                return self._reshape(self.visit_expr(call.args[0]), out)
        return super().visit_call_(call)


@tvm.transform.module_pass(opt_level=0, name="MovesAsViews")
class MovesAsViews:
    """In every Relax function: each ``permute_dims`` of :func:`unit_permute_shape`'s kind as a
    reshape, each reshape of a reshape as one reshape (none to the input's own shape), each
    same-dtype ``astype`` as its input."""

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Moves(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get()
