"""The CUDA target's kernel rules, in the order they are tried.

* linear layers: float weights through TVM's own converter (dlight's GEMV/matmul schedules); the
  tensor-core kernels (:mod:`.kernels.cuda`: ``s8`` W8A8, ``u6`` / ``b1`` W6 chosen per arch and
  shape by :func:`.select.cuda_w6_choice`, ``f16`` W4A16); then the generic kernel (the CPU
  template's plain compute, one thread per output), listed in the report with the reason the
  tensor-core rule gave;
* attention: TVM's matmul/softmax (scheduled by dlight);
* cache writes: the index-copy kernel, thread-bound.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import tvm
from tvm import relax

from qcompile.codegen.tvm.kernels.cuda import (
    CudaLinear,
    CudaQuant,
    Uncovered,
    linear_cuda_primfunc,
    pack_cuda_weight,
    quant_cuda_primfunc,
)
from qcompile.codegen.tvm.rules import (
    KernelRules,
    LinearCall,
    emit_template,
    finish,
    fused_norm,
    norm_inputs,
    pad_k,
    padded_bias,
    rows,
    static_rows,
    template_spec,
)
from qcompile.codegen.tvm.rules_cpu import ComposedAttention, InPlaceCopy, TvmDense
from qcompile.codegen.tvm.select import cuda_w6_choice

if TYPE_CHECKING:
    from qcompile.codegen.tvm.lower import Lowering

# (format, activation bits) -> kind; 2- and 3-bit weight-only codes run the 4-bit f16 kernel (stored as nibbles);
# 4-bit codes with int8 activations (W4A8) run the int8 kernel
_KINDS = {
    ("i8", 8): "s8",
    ("i4", 8): "s8",
    ("i6", 6): "w6",
    ("i6", 8): "w6",
    ("u4", 0): "f16",
    ("u2", 0): "f16",
    ("u3", 0): "f16",
}


@dataclass(frozen=True)
class TensorCore:
    """Weights on the MMA's M side, tokens on N; K split over warps; exact int32 partials per group."""

    name: str = "tensor_core"

    def apply(self, lw: Lowering, call: LinearCall) -> relax.Var | None:
        recipe, w = call.recipe, call.weights
        n, k, group, act_bits = recipe.n, recipe.k, recipe.group, recipe.act_bits
        kind = _KINDS.get((recipe.wfmt, act_bits))
        if kind is None:
            acts = f"{act_bits or 'fp32'}-bit activations"
            call.declines.append(f"{recipe.wfmt} weights with {acts} have no tensor-core kernel")
            return None
        choice: dict[str, Any] = {}
        if kind == "w6":
            choice = cuda_w6_choice(lw.target.arch, n, k, act_bits)
            kind = choice["chosen"]
        per_channel = group == k
        align = 16 if kind == "f16" else 128  # activation codes are produced 128 at a time
        k_p = -(-k // align) * align if per_channel else -(-k // group) * group
        grp = k_p if per_channel else group
        n_p = -(-n // 16) * 16
        m = static_rows(lw, call.x)
        try:
            act_group = 0 if per_channel or not recipe.act_grouped else grp
            tokens = 8 if m is not None and m <= 8 else 32
            spec = CudaLinear(
                kind,
                n_p,
                k_p,
                grp,
                act_bits,
                act_group,
                call.bias is not None,
                zero_term=recipe.zero_term,
                tokens=tokens,
            )
            qspec = CudaQuant(k_p, act_bits, spec.act_group, planes=kind == "b1") if act_bits else None
        except Uncovered as e:
            call.declines.append(str(e))
            return None
        if kind in ("b1", "u6"):
            lw.choices[spec.name] = choice
        flat, lead = rows(lw, call.x)
        mdim = lw.imp.shape_of(flat)[0]
        flat = pad_k(lw, flat, k, k_p)
        scale = w.scale
        assert scale is not None, f"{recipe.wfmt} codes need scales"
        if qspec is not None:
            act, fourth = _quantize(lw, call, qspec, flat, mdim)
        else:
            act = flat
        ((wshape, wdt),) = spec.weight_shapes()
        zero = recipe.zero if kind == "f16" else 0
        codes = lambda st: torch.nn.functional.pad(w.codes(st).to(torch.int64) + zero, (0, k_p - k, 0, n_p - n))  # noqa: E731
        wv = lw.param(f"{w.key}@cuda_{kind}", lambda st: pack_cuda_weight(spec, codes(st)), wshape, wdt)
        groups = spec.groups
        padg = lambda t: torch.nn.functional.pad(t.float(), (0, groups - t.shape[1], 0, n_p - n))  # noqa: E731
        sw = lw.param(f"{w.key}@cuda_scale{n_p}x{groups}", lambda st: padg(scale(st)), (n_p, groups), "float32")
        if qspec is None:
            if recipe.zero_term:
                fourth = lw.param(
                    f"{w.key}@cuda_offset{n_p}x{groups}", lambda st: padg(call.cterm(st)), (n_p, groups), "float32"
                )
            else:
                fourth = sw
        if call.bias is not None:
            bias = padded_bias(lw, call.bias, n, n_p)
        else:
            bias = lw.param(f"qc@zeros{n_p}", lambda st: torch.zeros(n_p), (n_p,), "float32")
        f = lw.kernel(spec.name, lambda: linear_cuda_primfunc(spec))
        y = lw.bb.emit(relax.call_tir(f, [act, wv, sw, fourth, bias], relax.TensorType([mdim, n_p], "float32")))
        return finish(lw, y, call.x, lead, n_p, n)


def _quantize(
    lw: Lowering, call: LinearCall, qspec: CudaQuant, flat: relax.Var, mdim: Any
) -> tuple[relax.Var, relax.Var]:
    """Activation codes (+ planes) and scales for a tensor-core linear: one kernel per distinct input
    (q/k/v and gate/up share it), fused with the RMSNorm that produces the input when that norm
    feeds only quantized linears (nothing else needs the normalized tensor)."""
    bb, k = lw.bb, call.recipe.k
    src = call.node.args[0]
    norm = fused_norm(lw, src)
    if norm is not None:
        qspec = replace(qspec, norm=True, eps=norm.eps, valid=k if qspec.k != k else 0)
    memo_key = (qspec.name, str(src))
    memo = lw.quant_memo.setdefault(lw.entry.name, {})
    if memo_key in memo:
        return memo[memo_key]
    if norm is not None:  # the norm's input and its weight (+ offset, for a (1 + w) norm), padded to the kernel's K
        args = list(norm_inputs(lw, norm, qspec.k))
    else:
        args = [flat, lw.param("qc@one", lambda st: torch.ones(1), (1,), "float32")]
    qf = lw.kernel(qspec.name, lambda: quant_cuda_primfunc(qspec))
    pshape = [mdim, qspec.k // 128, 8, 4] if qspec.planes else [1, 1, 8, 4]
    q = bb.emit(
        relax.call_tir(
            qf,
            args,
            [
                relax.TensorType([mdim, qspec.k], "int8"),
                relax.TensorType([mdim, qspec.groups], "float32"),
                relax.TensorType(pshape, "uint32"),
            ],
        )
    )
    out = bb.emit(relax.TupleGetItem(q, 2 if qspec.planes else 0)), bb.emit(relax.TupleGetItem(q, 1))
    memo[memo_key] = out
    return out


def one_thread_per_output(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """The plain compute with one thread per output element of every stage (reductions serial in
    the thread): slow but correct. (dlight's rules, Fallback included, fail on these multi-stage
    dequantizing computes.)"""
    from tvm.s_tir import Schedule

    sch = Schedule(func)
    for blk in sch.get_child_blocks(sch.get_sblock("root")):
        loops = sch.get_loops(blk)
        spatial = sum(1 for iv in sch.get(blk).iter_vars if iv.iter_type == 0)  # data-parallel axes lead
        bx, tx = sch.split(sch.fuse(*loops[:spatial]), [None, 128])
        sch.bind(bx, "blockIdx.x")
        sch.bind(tx, "threadIdx.x")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


@dataclass(frozen=True)
class GenericGpu:
    """The lane-blocked template's plain compute under :func:`one_thread_per_output`, for the shapes
    and formats no tensor-core kernel covers (reported in ``generic_kernels`` with the reason)."""

    name: str = "generic_gpu"

    def apply(self, lw: Lowering, call: LinearCall) -> relax.Var | None:
        spec = template_spec(lw, call)
        if spec is None:
            return None
        lw.generic.append(f"{call.node.name}: {'; '.join(call.declines)}")
        return emit_template(lw, call, spec, one_thread_per_output)


CUDA_RULES = KernelRules(
    linear=(TvmDense(), TensorCore(), GenericGpu()),
    attention=(ComposedAttention(),),
    cache_write=(InPlaceCopy(gpu=True),),
)
