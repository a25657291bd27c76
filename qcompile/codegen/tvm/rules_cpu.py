"""The CPU target's kernel rules, in the order they are tried.

* linear layers: with integer activations on ``i8``/``i6``/``i4``/``u4`` weights (``u4``: asymmetric,
  llama.cpp's Q4_1 × Q8_1), the dot-product kernel of the
  best instruction set the target's features have (:mod:`.kernels.x86`: ``vpdpbusd`` on AVX-512
  VNNI or AVX-VNNI, ``vpmaddubsw`` + ``vpmaddwd`` on AVX2; the choice and the features recorded in
  the report's ``kernel_choices``); then the bit-serial W6 kernel when measuring on this CPU finds it faster than
  unpacking (:func:`.select.measure_w6`, recorded in the report), then the lane-blocked template
  (:mod:`.kernels.linear`, every format), then TVM's own dense lowering for float weights;
* attention: qcompile's kernel over the un-repeated GQA heads when the shapes fit it, then TVM's
  matmul/softmax;
* cache writes: the in-place index-copy kernel.

Per-ISA kernels (``lw.target.features`` says which the CPU has) go in front of the ones they beat,
each returning None where its instructions are missing; the lane-blocked template stays the generic
path for every CPU (``CpuTarget(mcpu="x86-64")`` builds it everywhere).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import tvm
from torch import fx
from tvm import relax

from qcompile.codegen.tvm.kernels.attention import Attention, attention_primfunc, takes_prefix, unsupported
from qcompile.codegen.tvm.kernels.bitserial import NBB, act_planes_primfunc, bitserial_primfunc
from qcompile.codegen.tvm.kernels.cache import IndexCopy, index_copy_primfunc
from qcompile.codegen.tvm.kernels.tunable import AttentionTunable, Bf16Tunable, X86Tunable
from qcompile.codegen.tvm.kernels.x86 import XFMTS, X86Linear, isa_for, pack_corr
from qcompile.codegen.tvm.kernels.x86 import pack_groups as x86_groups
from qcompile.codegen.tvm.kernels.x86 import pack_weight as x86_weight
from qcompile.codegen.tvm.kernels.x86_bf16 import NEEDS as BF16_NEEDS
from qcompile.codegen.tvm.kernels.x86_bf16 import Bf16Linear, bf16_rows_primfunc
from qcompile.codegen.tvm.kernels.x86_bf16 import pack_groups as bf16_groups
from qcompile.codegen.tvm.kernels.x86_bf16 import pack_weight as bf16_weight
from qcompile.codegen.tvm.recipe import bitserial_spec
from qcompile.codegen.tvm.rules import (
    AttentionCall,
    CacheWrite,
    KernelRules,
    LinearCall,
    emit_template,
    finish,
    finish_fused,
    fused_producer,
    fused_residual,
    pad_k,
    padded_bias,
    quantize_rows,
    rows,
    same_dim,
    static_rows,
    template_spec,
)
from qcompile.codegen.tvm.select import measure_w6
from qcompile.ir.patterns import gqa_unrepeat

if TYPE_CHECKING:
    from qcompile.codegen.tvm.lower import Lowering


# ---- linear layers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class X86Dot:
    """Integer activations × ``i8``/``i6``/``i4``/``u4`` weights on the target's dot-product instructions
    (:mod:`.kernels.x86`), the same integer sums as the template's; None when the target has none
    of them (the template then runs)."""

    name: str = "x86_dot"

    def apply(self, lw: Lowering, call: LinearCall) -> relax.Var | None:
        recipe, w = call.recipe, call.weights
        if not recipe.act_bits or recipe.wfmt not in XFMTS:
            return None
        features = getattr(lw.target, "features", frozenset())
        isa = isa_for(features)
        if isa is None:
            return None
        base = template_spec(lw, call)
        if base is None:
            return None
        try:
            spec = X86Linear(
                base.n, base.k, base.wfmt, base.group, base.act_bits, base.act_group, base.bias, base.m, isa
            )
        except ValueError as e:
            call.declines.append(str(e))
            return None
        res = fused_residual(lw, call, spec.n)
        spec = replace(spec, residual=res is not None)
        lw.choices[spec.name] = {"chosen": isa, "generic": base.name, "features": sorted(features)}
        scale = w.scale
        assert scale is not None, f"{recipe.wfmt} codes need scales"
        bb = lw.bb
        flat, lead = rows(lw, call.x)
        mdim = lw.imp.shape_of(flat)[0]
        flat = pad_k(lw, flat, recipe.k, spec.k)
        # flipped codes (x + 128) for vpdpbusd / the +128 form
        args: list[relax.Expr] = list(quantize_rows(lw, spec.quant_rows(), flat, mdim, src=call.node.args[0]))
        tag = f"{isa}_{spec.wfmt}"
        for i, (wshape, wdt) in enumerate(spec.weight_shapes()):
            packed = lambda st, i=i: x86_weight(spec, w.codes(st))[i]  # noqa: E731
            args.append(lw.param(f"{w.key}@{tag}{i}", packed, wshape, wdt))
        gshape = spec.group_shape()
        args.append(lw.param(f"{w.key}@scale_x{spec.nbx}", lambda st: x86_groups(spec, scale(st)), gshape, "float32"))
        if spec.corrected:
            args.append(lw.param(f"{w.key}@corr_x{spec.nbx}", lambda st: pack_corr(spec, w.codes(st)), gshape, "int32"))
        if spec.offset:  # u4: the offset term c = offset − zero·scale, times sx·Σqx (quant_rows' third output)
            off = lambda st: x86_groups(spec, call.cterm(st))  # noqa: E731
            args.append(lw.param(f"{w.key}@off_x{spec.nbx}", off, gshape, "float32"))
        if call.bias is not None:
            args.append(padded_bias(lw, call.bias, recipe.n, spec.n))
        if res is not None:
            args.append(res.value)
        f = lw.tuned_kernel(X86Tunable(spec))
        y = bb.emit(relax.call_tir(f, args, relax.TensorType([mdim, spec.n], "float32")))
        return finish_fused(lw, finish(lw, y, call.x, lead, spec.n, recipe.n), res)


@dataclass(frozen=True)
class X86Bf16:
    """Weight-only ``u4`` × bf16-rounded activations on ``vdpbf16ps`` (:mod:`.kernels.x86_bf16`), when
    the plan asks for it (``float_compute: bf16``) and the CPU has AVX-512 BF16. Every weight-only
    linear the setting does not reach is recorded with the reason (the compile report warns)."""

    name: str = "x86_bf16"

    def apply(self, lw: Lowering, call: LinearCall) -> relax.Var | None:
        recipe, w = call.recipe, call.weights
        if lw.float_compute != "bf16" or recipe.act_bits or recipe.wfmt == "f32":
            return None
        where = f"{lw.entry.name}:{call.node.name}"
        features = getattr(lw.target, "features", frozenset())
        missing = [f for f in BF16_NEEDS if f not in features]
        if missing or recipe.wfmt != "u4":
            why = f"the CPU lacks {', '.join(missing)}" if missing else f"{recipe.wfmt} weights have no bf16 kernel"
            lw.float_fp32.append(f"{where} ({why})")
            return None
        base = template_spec(lw, call)
        if base is None:  # the template's rule records why; it declines too
            lw.float_fp32.append(f"{where} ({call.declines[-1]})")
            return None
        try:
            spec = Bf16Linear(base.n, base.k, base.group, base.bias, base.m)
        except ValueError as e:
            lw.float_fp32.append(f"{where} ({e})")
            return None
        res = fused_residual(lw, call, spec.n)
        spec = replace(spec, residual=res is not None)
        lw.choices[spec.name] = {"chosen": "avx512bf16", "generic": base.name, "features": sorted(features)}
        lw.float_bf16.append(where)
        scale = w.scale
        assert scale is not None, "u4 codes need scales"
        bb = lw.bb
        flat, lead = rows(lw, call.x)
        mdim = lw.imp.shape_of(flat)[0]
        flat = pad_k(lw, flat, recipe.k, spec.k)
        args: list[relax.Expr] = list(bf16_rows(lw, spec, flat, mdim, call.node.args[0]))
        unsigned = lambda st: bf16_weight(spec, w.codes(st).to(torch.int32) + recipe.zero)  # noqa: E731
        args.append(lw.param(f"{w.key}@bf16u4", unsigned, spec.weight_shape(), "uint16"))
        gshape = spec.group_shape()
        args.append(lw.param(f"{w.key}@scale_bf16", lambda st: bf16_groups(spec, scale(st)), gshape, "float32"))
        args.append(lw.param(f"{w.key}@zero_bf16", lambda st: bf16_groups(spec, call.cterm(st)), gshape, "float32"))
        if call.bias is not None:
            args.append(padded_bias(lw, call.bias, recipe.n, spec.n))
        if res is not None:
            args.append(res.value)
        f = lw.tuned_kernel(Bf16Tunable(spec))
        y = bb.emit(relax.call_tir(f, args, relax.TensorType([mdim, spec.n], "float32")))
        return finish_fused(lw, finish(lw, y, call.x, lead, spec.n, recipe.n), res)


def bf16_rows(lw: Lowering, spec: Bf16Linear, flat: relax.Var, mdim: Any, src: Any) -> tuple[relax.Var, ...]:
    """The bf16 bits and per-group sums of ``flat`` (one call per distinct input node and shape: q/k/v
    and gate/up share it). Like :func:`.rules.quantize_rows`, when ``src`` is an RMSNorm or a SwiGLU
    product that only quantized linears read, the kernel computes it from its inputs."""
    rs = spec.rows()
    memo = lw.quant_memo.setdefault(lw.entry.name, {})
    node = src if isinstance(src, fx.Node) else None
    key = (rs.name, node.name) if node is not None else None
    if key is not None and key in memo:
        return memo[key]
    args: list[relax.Expr] = [flat]
    fields, inputs = fused_producer(lw, node, rs.k)
    if inputs is not None:
        rs, args = replace(rs, **fields), inputs
    f = lw.kernel(rs.name, lambda: bf16_rows_primfunc(rs))
    outs = [relax.TensorType([mdim, rs.k], "uint16"), relax.TensorType([mdim, rs.groups], "float32")]
    q = lw.bb.emit(relax.call_tir(f, args, outs))
    out = tuple(lw.bb.emit(relax.TupleGetItem(q, i)) for i in range(2))
    if key is not None:
        memo[key] = out
    return out


@dataclass(frozen=True)
class BitSerialW6:
    """W6 with integer activations as bit planes ANDed and popcounted (FlexQ's arithmetic), when it
    measures faster than unpacking on this CPU. Only with ``select`` (measuring) on."""

    name: str = "bitserial_w6"

    def apply(self, lw: Lowering, call: LinearCall) -> relax.Var | None:
        if not lw.select:
            return None
        recipe, w = call.recipe, call.weights
        m = static_rows(lw, call.x)
        try:
            spec = recipe.kernel(m, call.bias is not None)
        except ValueError:
            return None  # the template's rule says why
        bs = bitserial_spec(spec)
        if bs is None:
            return None
        choice = measure_w6(recipe, m, lw.target)
        lw.choices[spec.name] = choice
        if choice["chosen"] != "bitserial":
            return None
        scale = w.scale
        assert scale is not None, "W6 codes need their scales"
        bb = lw.bb
        flat, lead = rows(lw, call.x)
        mdim = lw.imp.shape_of(flat)[0]
        flat = pad_k(lw, flat, recipe.k, spec.k)
        qx, sx = quantize_rows(lw, spec.quant_rows(), flat, mdim, src=call.node.args[0])
        pf = lw.kernel("qc_planes_" + bs.name, lambda: act_planes_primfunc(bs))
        planes = bb.emit(relax.call_tir(pf, [qx], relax.TensorType([bs.a_bits, mdim, bs.k // 32], "int32")))
        wp = lw.param(
            f"{w.key}@planes",
            lambda st: recipe.pack_planes(bs, w.codes(st)),
            (6, bs.n // NBB, bs.k // 32, NBB),
            "int32",
        )
        sp = lw.param(
            f"{w.key}@scale{NBB}",
            lambda st: recipe.pack_plane_scales(bs, scale(st)),
            (bs.n // NBB, bs.groups, NBB),
            "float32",
        )
        f = lw.kernel(bs.name, lambda: bitserial_primfunc(bs))
        y = bb.emit(relax.call_tir(f, [planes, sx, wp, sp], relax.TensorType([mdim, bs.n], "float32")))
        n = recipe.n
        if bs.n != n:
            y = bb.emit(relax.op.strided_slice(y, [1], [0], [n], assume_inbound=True))
        if call.bias is not None:
            b_key = call.bias
            y = bb.emit(relax.op.add(y, lw.param(f"{b_key}@f32", lambda st: st[b_key].float(), (n,), "float32")))
        return bb.emit(relax.op.reshape(y, [*lead, n]))


@dataclass(frozen=True)
class LaneBlocked:
    """The lane-blocked template for every weight format (:mod:`.kernels.linear`), scheduled for the CPU."""

    name: str = "lane_blocked"

    def apply(self, lw: Lowering, call: LinearCall) -> relax.Var | None:
        spec = template_spec(lw, call)
        return None if spec is None else emit_template(lw, call, spec)


@dataclass(frozen=True)
class TvmDense:
    """A float weight through TVM's own ``linear`` converter (dense compute, TVM's default lowering;
    on CUDA, dlight's GEMV/matmul schedules)."""

    name: str = "tvm_dense"

    def apply(self, lw: Lowering, call: LinearCall) -> relax.Var | None:
        return lw.tvm_linear(call.node) if call.recipe.wfmt == "f32" else None


# ---- attention ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GqaAttention:
    """qcompile's attention kernel on the un-repeated K/V heads (:mod:`.kernels.attention`), when the
    graph's shapes fit it."""

    name: str = "gqa_attention"

    def apply(self, lw: Lowering, call: AttentionCall) -> relax.Var | None:
        bb, env, shape_of = lw.bb, lw.env, lw.imp.shape_of
        (kn, gk), (vn, gv) = gqa_unrepeat(call.k), gqa_unrepeat(call.v)
        q = env(call.q)
        qs, ks = list(shape_of(q)), list(shape_of(env(kn)))
        if gk != gv or len(qs) != 4 or len(ks) != 4:
            return None
        if not all(isinstance(d, tvm.tirx.IntImm) for d in ks[:2] + ks[3:]):
            return None
        if not isinstance(ks[2], tvm.tirx.IntImm) and not same_dim(ks[2], qs[2]):
            return None  # dynamic keys only when they are the queries (no cache)
        if any(str(t.ty.dtype) != "float32" for t in (q, env(kn), env(vn))):
            return None
        b, kvh, dim = int(ks[0]), int(ks[1]), int(ks[3])
        keys = int(ks[2]) if isinstance(ks[2], tvm.tirx.IntImm) else None
        heads = int(qs[1])
        queries = int(qs[2]) if isinstance(qs[2], tvm.tirx.IntImm) else None
        if unsupported(heads, kvh, dim) is not None:
            return None
        mkind, mheads, mv = "none", 1, None
        if call.mask is not None:
            mv = env(call.mask)
            ms = list(shape_of(mv))
            if len(ms) != 4 or not same_dim(ms[3], ks[2]) or not same_dim(ms[2], qs[2]):
                return None
            if int(ms[0]) != b or int(ms[1]) not in (1, heads):
                return None
            mkind = "bool" if call.mask.meta["val"].dtype == torch.bool else "float"
            mheads = int(ms[1])
        spec = Attention(b, heads, kvh, keys, dim, queries, mkind, mheads, call.scale)
        margs = []
        if mv is not None:
            if mkind == "bool" and str(mv.ty.dtype) != "bool":
                mv = bb.emit(relax.op.astype(mv, "bool"))
            margs = [mv]
        if takes_prefix(spec):
            f = lw.tuned_kernel(AttentionTunable(spec))
        else:
            f = lw.kernel(spec.name, lambda: attention_primfunc(spec))
        return bb.emit(relax.call_tir(f, [q, env(kn), env(vn), *margs], relax.TensorType(qs, "float32")))


@dataclass(frozen=True)
class ComposedAttention:
    """``softmax(q·kᵀ·scale + mask)·v`` as TVM ops (TVM's default lowering; dlight's on CUDA)."""

    name: str = "composed_attention"

    def apply(self, lw: Lowering, call: AttentionCall) -> relax.Var | None:
        bb, env = lw.bb, lw.env
        q, k, v = env(call.q), env(call.k), env(call.v)
        rank = len(lw.imp.shape_of(k))
        kt = bb.emit(relax.op.permute_dims(k, list(range(rank - 2)) + [rank - 1, rank - 2]))
        s = bb.emit(relax.op.multiply(bb.emit(relax.op.matmul(q, kt)), relax.const(call.scale, "float32")))
        if call.mask is not None:
            m = env(call.mask)
            if call.mask.meta["val"].dtype == torch.bool:
                m = m if str(m.ty.dtype) == "bool" else bb.emit(relax.op.astype(m, "bool"))
                s = bb.emit(relax.op.where(m, s, relax.const(float("-inf"), "float32")))
            else:
                s = bb.emit(relax.op.add(s, m))
        p = bb.emit(relax.op.nn.softmax(s, axis=-1))
        return bb.emit(relax.op.matmul(p, v))


# ---- cache writes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class InPlaceCopy:
    """``call_tir_inplace`` of the index-copy kernel (:mod:`.kernels.cache`), thread-bound on GPUs."""

    gpu: bool = False
    name: str = "index_copy"

    def apply(self, lw: Lowering, call: CacheWrite) -> relax.Var | None:
        spec = IndexCopy(call.shape, call.dtype, call.dim, call.rows, cuda=self.gpu)
        f = lw.kernel(spec.name, lambda: index_copy_primfunc(spec))
        src = call.src
        if str(src.ty.dtype) != call.dtype:
            src = lw.bb.emit(relax.op.astype(src, call.dtype))
        out = relax.TensorType(list(call.shape), call.dtype)
        return lw.bb.emit(relax.call_tir_inplace(f, [call.cache, call.index, src], [0], out))


CPU_RULES = KernelRules(
    linear=(X86Dot(), X86Bf16(), BitSerialW6(), LaneBlocked(), TvmDense()),
    attention=(GqaAttention(), ComposedAttention()),
    cache_write=(InPlaceCopy(),),
)
