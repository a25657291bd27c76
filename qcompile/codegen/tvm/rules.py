"""Kernel rules: what a target answers when the lowering asks it for a kernel (dlight's shape).

A converter (:mod:`.converters`) turns a node into a *call* — :class:`LinearCall` (a linear layer
with its :class:`~.recipe.LinearRecipe` and weights), :class:`AttentionCall`, :class:`CacheWrite` —
and hands it to the target's ordered rules (:class:`KernelRules`, owned by the Target:
:mod:`.rules_cpu`, :mod:`.rules_cuda`). Each rule emits the kernel call and returns its value, or
returns None without emitting anything when it does not apply; the generic rule comes last. When
no rule applies, the converter raises :class:`NoRule`, the one signal on which the plan's torch
fallback may run the node. New kernels (per-ISA CPU kernels, tuned schedules) are new rules placed
before the ones they beat; the driver does not change.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
import torch.fx as fx
import tvm
from tvm import relax

from qcompile.codegen.tvm.kernels.linear import NB, LinearKernel, QuantRows, linear_primfunc, quant_rows_primfunc
from qcompile.codegen.tvm.kernels.tunable import QuantRowsTunable, TemplateTunable
from qcompile.codegen.tvm.recipe import LinearRecipe
from qcompile.ir.patterns import GatedMatch, RMSNormMatch, rmsnorm_source, silu_gate_source

if TYPE_CHECKING:
    from qcompile.codegen.tvm.lower import Lowering

# A repacked tensor: computed from the Program's state when the module is built or loaded.
Repack = Callable[[dict[str, torch.Tensor]], torch.Tensor]
# A plain PrimFunc → the same, scheduled (a target's generic schedule).
Finalize = Callable[[tvm.tirx.PrimFunc], tvm.tirx.PrimFunc]


class NoRule(Exception):
    """A converter declines a node: no rule of the target applies to it (or the op's form has no
    converter, e.g. causal attention). The only failure the plan's ``fallback: torch`` covers."""


# ---- calls --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearWeights:
    """Where a linear layer's weight-side tensors come from (functions of the Program's state)."""

    key: str  # state key the repacked tensors are named after
    codes: Repack  # integer codes [N, K] (the float weight for f32)
    scale: Repack | None = None  # [N, G]
    offset: Repack | None = None  # [N, G], asymmetric weights


@dataclass(frozen=True)
class LinearCall:
    node: fx.Node
    x: relax.Var  # the activation [..., K]
    recipe: LinearRecipe
    weights: LinearWeights
    bias: str | None  # state key of the bias
    declines: list[str] = field(default_factory=list)  # why earlier rules passed (a generic rule reports it)

    def cterm(self, st: dict[str, torch.Tensor]) -> torch.Tensor:
        """The recipe's zero/offset term from the state."""
        assert self.weights.scale is not None
        return self.recipe.cterm(self.weights.scale(st), self.weights.offset(st) if self.weights.offset else None)


@dataclass(frozen=True)
class AttentionCall:
    node: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: fx.Node | None
    scale: float


@dataclass(frozen=True)
class CacheWrite:
    """``cache.index_copy_(dim, index, src)`` into a cache slot (written in place)."""

    node: fx.Node
    cache: relax.Var
    index: relax.Var
    src: relax.Var
    shape: tuple[int, ...]
    dtype: str
    dim: int
    rows: int | None  # rows written per call; None: dynamic


# ---- rules --------------------------------------------------------------------------------------

C = TypeVar("C", contravariant=True)


class Rule(Protocol[C]):
    """A kernel for one kind of call: the emitted value, or None (nothing emitted) when it does not apply."""

    name: str

    def apply(self, lw: Lowering, call: C) -> relax.Var | None: ...


@dataclass(frozen=True)
class KernelRules:
    """A target's rules, in order, per kind of call."""

    linear: tuple[Rule[LinearCall], ...]
    attention: tuple[Rule[AttentionCall], ...]
    cache_write: tuple[Rule[CacheWrite], ...]


def apply_rules(rules: tuple[Rule[Any], ...], lw: Lowering, call: Any, what: str) -> relax.Var:
    """The first rule's value; :class:`NoRule` when none applies."""
    for rule in rules:
        out = rule.apply(lw, call)
        if out is not None:
            return out
    names = ", ".join(r.name for r in rules)
    why = "; ".join(getattr(call, "declines", [])) or f"none of the target's rules ({names}) applies"
    raise NoRule(f"no {what} kernel for it: {why}")


# ---- shared emission helpers -------------------------------------------------------------------


def static_rows(lw: Lowering, x: relax.Var) -> int | None:
    """The number of rows of ``x`` flattened to 2-D when every leading dimension is static."""
    lead = list(lw.imp.shape_of(x))[:-1]
    return math.prod(int(d) for d in lead) if all(isinstance(d, tvm.tirx.IntImm) for d in lead) else None


def rows(lw: Lowering, x: relax.Var) -> tuple[relax.Var, list[Any]]:
    """``x`` reshaped to ``[rows, K]``, and its leading dimensions."""
    shape = list(lw.imp.shape_of(x))
    lead = shape[:-1]
    m = static_rows(lw, x)
    want = [m if m is not None else _prod(lead), shape[-1]]
    bound = lw.bb.lookup_binding(x)  # x = reshape(y) of a y already [rows, K] (a linear's own output): y
    if isinstance(bound, relax.Call) and bound.op.same_as(tvm.ir.Op.get("relax.reshape")):
        y = bound.args[0]
        have = list(lw.imp.shape_of(y))
        if len(have) == 2 and all(same_dim(a, b) for a, b in zip(have, want)):
            return y, lead
    return lw.bb.emit(relax.op.reshape(x, want)), lead


def pad_k(lw: Lowering, flat: relax.Var, k: int, k_p: int) -> relax.Var:
    """``flat[M, k]`` zero-padded to ``k_p`` columns."""
    return lw.bb.emit(relax.op.nn.pad(flat, [0, 0, 0, k_p - k])) if k_p != k else flat


def finish(lw: Lowering, y: relax.Var, x: relax.Var, lead: list[Any], n_p: int, n: int) -> relax.Var:
    """A padded ``y[M, n_p]`` back to ``[..., n]`` in ``x``'s dtype (qcompile's linear ops return it)."""
    bb = lw.bb
    if n_p != n:
        y = bb.emit(relax.op.strided_slice(y, [1], [0], [n], assume_inbound=True))
    y = bb.emit(relax.op.reshape(y, [*lead, n]))
    want = str(x.ty.dtype)
    return bb.emit(relax.op.astype(y, want)) if want != "float32" else y


def padded_bias(lw: Lowering, key: str, n: int, n_p: int) -> relax.Var:
    """The bias ``key`` as fp32, zero-padded to ``n_p``."""
    pad = lambda st: torch.nn.functional.pad(st[key].float(), (0, n_p - n))  # noqa: E731
    return lw.param(f"{key}@pad{n_p}", pad, (n_p,), "float32")


@dataclass(frozen=True)
class Residual:
    """A residual add fused into a linear kernel's epilogue: the ``add`` node the kernel computes too,
    and the other operand as ``[rows, N]``."""

    add: fx.Node
    value: relax.Var


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return len(a.shape) == len(b.shape) and all(str(x) == str(y) for x, y in zip(a.shape, b.shape))


def fused_residual(lw: Lowering, call: LinearCall, n_p: int) -> Residual | None:
    """The add that reads ``call``'s output when it is that output's only user (a transformer block's
    ``h + o_proj(...)``, ``h + down_proj(...)``): both operands float32 of one shape, the other one
    already computed, N not padded (``n_p``); else None (the add runs as its own kernel)."""
    node = call.node
    users = list(node.users)
    if len(users) != 1 or n_p != call.recipe.n or str(call.x.ty.dtype) != "float32":
        return None
    add = users[0]
    if add.op != "call_function" or add.target.__name__ != "add.Tensor" or add.kwargs or len(add.args) != 2:
        return None
    others = [a for a in add.args if a is not node]
    if len(others) != 1 or not isinstance(others[0], fx.Node) or others[0] not in lw.imp.env:
        return None
    vals = [others[0].meta.get("val"), node.meta.get("val"), add.meta.get("val")]
    if not all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in vals):
        return None
    if not (_same_shape(vals[0], vals[1]) and _same_shape(vals[1], vals[2])):
        return None
    return Residual(add, rows(lw, lw.env(others[0]))[0])


def finish_fused(lw: Lowering, out: relax.Var, residual: Residual | None) -> relax.Var:
    """``out`` (a linear's value), also the value of the residual add its kernel computed."""
    if residual is not None:
        lw.fused[residual.add] = out
    return out


# ---- the lane-blocked template (kernels/linear.py): CPU rules schedule it, the GPU's generic rule runs it plain


# the qcompile linear ops whose activations a backend quantizes (q/k/v, gate/up, ...)
QUANT_LINEARS = ("linear_w8a8.default", "quant_linear.default", "packed_linear.default")


def _only_quantized(src: fx.Node | None) -> bool:
    return src is not None and all(u.op == "call_function" and u.target.__name__ in QUANT_LINEARS for u in src.users)


def _f32(lw: Lowering, *nodes: fx.Node) -> bool:
    return all(str(lw.env(n).ty.dtype) == "float32" for n in nodes)


def fused_norm(lw: Lowering, src: fx.Node | None) -> RMSNormMatch | None:
    """The RMSNorm computing ``src`` when every user of ``src`` is a quantized linear (then the
    quantization kernel can compute the norm itself and nothing needs the normalized tensor), on
    float32 values; else None."""
    norm = rmsnorm_source(src, lw.slots) if _only_quantized(src) else None
    return norm if norm is not None and _f32(lw, norm.x) else None


def fused_gate(lw: Lowering, src: fx.Node | None) -> GatedMatch | None:
    """``silu(gate) · up`` computing ``src`` when only quantized linears read it, on float32 values."""
    gated = silu_gate_source(src) if _only_quantized(src) else None
    return gated if gated is not None and _f32(lw, gated.gate, gated.up) else None


def padded_rows(lw: Lowering, node: fx.Node, k_p: int) -> relax.Var:
    """``node``'s value as ``[rows, K]``, zero-padded to ``k_p`` columns."""
    value = lw.env(node)
    return pad_k(lw, rows(lw, value)[0], int(lw.imp.shape_of(value)[-1]), k_p)


def norm_inputs(lw: Lowering, norm: RMSNormMatch, k_p: int) -> tuple[relax.Var, relax.Var]:
    """A fused RMSNorm's operands for a quantization kernel of ``k_p`` columns: its input rows and its
    weight (plus the norm's offset, repacked once), both zero-padded to ``k_p``."""
    valid = int(lw.imp.shape_of(lw.env(norm.x))[-1])
    wkey, offset = lw.slots[norm.weight].name, norm.offset

    def weight(st: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.pad(st[wkey].float() + offset, (0, k_p - valid))

    return padded_rows(lw, norm.x, k_p), lw.param(f"{wkey}@rms{k_p}+{offset:g}", weight, (k_p,), "float32")


def fused_producer(lw: Lowering, src: fx.Node | None, k: int) -> tuple[dict[str, Any], list[relax.Expr] | None]:
    """What an activation kernel of ``k`` columns reading ``src`` computes itself: the fields to set on
    its spec (``norm``/``eps``/``valid`` for an RMSNorm, ``silu_gate`` for a SwiGLU product) and its
    inputs instead of ``src``'s value; ``({}, None)`` when ``src`` is neither (or other ops read it)."""
    norm = fused_norm(lw, src)
    if norm is not None:
        valid = int(lw.imp.shape_of(lw.env(norm.x))[-1])
        return {"norm": True, "eps": norm.eps, "valid": valid if valid != k else 0}, list(norm_inputs(lw, norm, k))
    gated = fused_gate(lw, src)
    if gated is not None:
        return {"silu_gate": True}, [padded_rows(lw, n, k) for n in (gated.gate, gated.up)]
    return {}, None


def quantize_rows(
    lw: Lowering,
    qr: QuantRows,
    flat: relax.Var,
    mdim: Any,
    finalize: Finalize | None = None,
    src: fx.Node | None = None,
) -> tuple[relax.Var, ...]:
    """Per-token / per-group int8 codes and scales of ``flat`` by the kernel ``qr`` (a linear kernel's
    ``quant_rows()``; scheduled for the CPU, or plain and passed through ``finalize``), and with
    ``qr.sums`` the per-block ``sx·Σqx`` too. ``src``: the graph node ``flat`` was made from; the
    linears that read the same node with the same quantizer (q/k/v, gate/up) share one call, and
    when ``src`` is an RMSNorm (:func:`fused_norm`) or a SwiGLU product (:func:`fused_gate`) that only
    quantized linears read, the kernel computes it from its inputs (its own kernels then have no
    user left and are removed)."""
    memo = lw.quant_memo.setdefault(lw.entry.name, {})
    key = (qr.name, src.name) if src is not None else None
    if key is not None and key in memo:
        return memo[key]
    args: list[relax.Expr] = [flat]
    fields, inputs = fused_producer(lw, src, qr.k)
    if inputs is not None:
        qr, args = replace(qr, **fields), inputs
    if finalize is None:
        qf = lw.tuned_kernel(QuantRowsTunable(qr))
    else:
        qf = lw.kernel(qr.name, lambda: finalize(quant_rows_primfunc(qr, schedule=False)))
    outs = [relax.TensorType([mdim, qr.k], "int8"), relax.TensorType([mdim, qr.groups], "float32")]
    if qr.sums:
        outs.append(relax.TensorType([mdim, qr.sum_blocks], "float32"))
    q = lw.bb.emit(relax.call_tir(qf, args, outs))
    out = tuple(lw.bb.emit(relax.TupleGetItem(q, i)) for i in range(len(outs)))
    if key is not None:
        memo[key] = out
    return out


def template_spec(lw: Lowering, call: LinearCall) -> LinearKernel | None:
    """The lane-blocked template's kernel for ``call``, or None (the reason added to
    ``call.declines``) when the template does not cover its shape."""
    try:
        return call.recipe.kernel(static_rows(lw, call.x), call.bias is not None)
    except ValueError as e:
        call.declines.append(str(e))
        return None


def emit_template(lw: Lowering, call: LinearCall, spec: LinearKernel, finalize: Finalize | None = None) -> relax.Var:
    """``call`` on the lane-blocked kernel ``spec``: scheduled for the CPU (``finalize`` None), or the
    plain compute passed through ``finalize`` (a GPU's generic schedule)."""
    recipe, w = call.recipe, call.weights
    res = fused_residual(lw, call, spec.n) if finalize is None else None
    spec = replace(spec, residual=res is not None)
    flat, lead = rows(lw, call.x)
    mdim = lw.imp.shape_of(flat)[0]
    flat = pad_k(lw, flat, recipe.k, spec.k)
    args: list[relax.Expr] = (
        list(quantize_rows(lw, spec.quant_rows(), flat, mdim, finalize, call.node.args[0])) if spec.act_bits else [flat]
    )
    for i, (wshape, wdt) in enumerate(spec.weight_shapes()):
        packed = lambda st, i=i: recipe.pack_weight(spec, w.codes(st))[i]  # noqa: E731
        args.append(lw.param(f"{w.key}@{spec.wfmt}{i}", packed, wshape, wdt))
    gshape = (spec.n // NB, spec.groups, NB)
    if recipe.scaled:
        scale = w.scale
        assert scale is not None, f"{recipe.wfmt} codes need scales"
        args.append(lw.param(f"{w.key}@scale", lambda st: recipe.pack_groups(spec, scale(st)), gshape, "float32"))
    if recipe.zero_term:
        args.append(lw.param(f"{w.key}@zero", lambda st: recipe.pack_groups(spec, call.cterm(st)), gshape, "float32"))
    if call.bias is not None:
        args.append(padded_bias(lw, call.bias, recipe.n, spec.n))
    if res is not None:
        args.append(res.value)
    if finalize is None:
        f = lw.tuned_kernel(TemplateTunable(spec))
    else:
        f = lw.kernel(spec.name, lambda: finalize(linear_primfunc(spec, schedule=False)))
    y = lw.bb.emit(relax.call_tir(f, args, relax.TensorType([mdim, spec.n], "float32")))
    return finish_fused(lw, finish(lw, y, call.x, lead, spec.n, recipe.n), res)


def _const(d: Any) -> int | None:
    """A shape dimension's value when it is a constant (a Python int or a TIR ``IntImm``), else None."""
    if isinstance(d, int):
        return d
    return int(d.value) if isinstance(d, tvm.tirx.IntImm) else None


def same_dim(a: Any, b: Any) -> bool:
    """Two shape dimensions that are the same constant or the same symbolic variable."""
    ca, cb = _const(a), _const(b)
    return ca == cb if ca is not None and cb is not None else str(a) == str(b)


def _prod(dims: list[Any]) -> Any:
    out: Any = 1
    for d in dims:
        if _const(d) != 1:  # ``s`` rather than ``1 * s``: the same dimension as a linear's own rows
            out = d if _const(out) == 1 else out * d
    return out
