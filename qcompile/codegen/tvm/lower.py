"""Program → one Relax IRModule (a function per entry) through TVM's own PyTorch importer.

Each entry's graph is already a ``torch.export`` ATen graph; it is handed to
``tvm.relax.frontend.torch``'s ``ExportedProgramImporter`` with the Program's slots standing in
for the ExportedProgram's signature (every placeholder becomes a function parameter, in slot
order) and a converter map that adds, to TVM's own converters:

* ``qcompile`` ops → ``call_tir`` of qcompile's TIR kernels (:mod:`.kernels.linear`), with their
  weights repacked into the kernels' layouts (extra parameters after the slots);
* ``aten.linear`` with a constant 2-D weight → the fp32 kernel (so every linear layer is a
  qcompile kernel with a known schedule);
* ``aten.index_copy_`` into a cache slot → ``call_tir_inplace`` (the cache stays in the runtime's
  tensors; a decode step writes its rows only);
* a few ATen ops TVM 0.27's importer lacks or gets wrong here (``diff``, ``cumsum`` of bools,
  ``to.device``, ``scaled_dot_product_attention`` with a boolean mask or an explicit scale).

An op with no converter is a :class:`LoweringError` naming the op and the node, unless the plan
sets ``fallback: torch``: then the node runs its torch implementation from the VM through a packed
function (``call_dps_packed``) and is listed in :attr:`Lowered.fallbacks`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
import torch.fx as fx
import tvm
import tvm_ffi
from tvm import relax
from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

from qcompile.codegen.tvm.kernels.attention import Attention, attention_primfunc
from qcompile.codegen.tvm.kernels.bitserial import NBB, act_planes_primfunc, bitserial_primfunc, pack_plane_scales, pack_weight_planes
from qcompile.codegen.tvm.kernels.cache import IndexCopy, index_copy_primfunc
from qcompile.codegen.tvm.kernels.cuda import (
    CudaLinear,
    CudaQuant,
    Uncovered,
    linear_cuda_primfunc,
    pack_cuda_weight,
    quant_cuda_primfunc,
)
from qcompile.codegen.tvm.kernels.linear import (
    LinearKernel,
    QuantRows,
    linear_primfunc,
    pack_groups,
    pack_weight,
    padded,
    quant_rows_primfunc,
)
from qcompile.codegen.tvm.cuda import CudaTarget
from qcompile.codegen.tvm.select import bitserial_spec, cuda_w6_choice, measure_w6
from qcompile.errors import QCompileError
from qcompile.ir.program import Entry, Program, SlotKind
from qcompile.ops.packed import unpack_codes


class LoweringError(QCompileError):
    """A graph the TVM backend cannot lower (names the op and the node)."""


# A repacked tensor: computed from the Program's state when the module is built or loaded.
Repack = Callable[[dict[str, torch.Tensor]], torch.Tensor]


@dataclass
class Lowered:
    mod: tvm.IRModule
    extra_params: dict[str, list[str]]  # entry -> repacked-tensor keys passed after the slots
    repacks: dict[str, Repack]  # key -> how to compute it from the Program's state
    fallbacks: list[str]  # "entry:node (op)" run by torch
    kernels: dict[str, int] = field(default_factory=dict)  # kernel name -> call sites
    choices: dict[str, dict[str, Any]] = field(default_factory=dict)  # kernel -> measured alternatives
    generic: list[str] = field(default_factory=list)  # CUDA: linears on the generic (dlight) kernel, and why


def fallback_name(entry: str, node: str) -> str:
    return f"qcompile.fallback.{entry}.{node}"


class _Lowering:
    def __init__(self, program: Program, allow_fallback: bool, select: bool, cuda: CudaTarget | None = None) -> None:
        self.program = program
        self.cuda = cuda
        self.generic: list[str] = []
        self.quant_memo: dict[str, dict[tuple[str, str], tuple[relax.Var, relax.Var]]] = {}
        self.allow_fallback = allow_fallback
        self.select = select
        self.choices: dict[str, dict[str, Any]] = {}
        self.bb = relax.BlockBuilder()
        self.kernels: dict[str, tvm.ir.GlobalVar] = {}
        self.kernel_uses: dict[str, int] = {}
        self.repacks: dict[str, Repack] = {}
        self.extra: dict[str, list[str]] = {}
        self.fallbacks: list[str] = []

    # ---- helpers used by converters ------------------------------------------------------
    def kernel(self, name: str, make: Callable[[], tvm.tirx.PrimFunc]) -> tvm.ir.GlobalVar:
        if name not in self.kernels:
            func = make().with_attr("op_pattern", 8).with_attr("global_symbol", name)
            self.kernels[name] = self.bb.add_func(func, name)
        self.kernel_uses[name] = self.kernel_uses.get(name, 0) + 1
        return self.kernels[name]

    def generic_gpu(self, func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
        """On CUDA, the plain compute with one thread per output element of every stage (reductions
        serial in the thread): slow but correct, for the shapes the tensor-core kernels do not
        cover. (dlight's rules, Fallback included, fail on these multi-stage dequantizing computes.)"""
        if self.cuda is None:
            return func
        from tvm.s_tir import Schedule

        sch = Schedule(func)
        for blk in sch.get_child_blocks(sch.get_sblock("root")):
            loops = sch.get_loops(blk)
            spatial = sum(1 for iv in sch.get(blk).iter_vars if iv.iter_type == 0)  # data-parallel axes lead
            bx, tx = sch.split(sch.fuse(*loops[:spatial]), [None, 128])
            sch.bind(bx, "blockIdx.x")
            sch.bind(tx, "threadIdx.x")
        return sch.mod["main"].with_attr("tirx.is_scheduled", True)

    def param(self, key: str, repack: Repack, shape: tuple[int, ...], dtype: str) -> relax.Var:
        """A repacked tensor as an extra parameter of the entry being lowered."""
        self.repacks.setdefault(key, repack)
        if key not in self.cur_extra:
            self.cur_extra[key] = relax.Var(key, relax.TensorType(list(shape), dtype))
        return self.cur_extra[key]

    def state_key(self, node: Any, what: str, at: fx.Node) -> str:
        slot = self.slots.get(node) if isinstance(node, fx.Node) else None
        if slot is None or slot.kind is not SlotKind.STATE:
            raise _Unsupported(f"its {what} is not a constant of the Program")
        return slot.name

    # ---- one entry ------------------------------------------------------------------------
    def lower_entry(self, entry: Entry) -> None:
        imp = ExportedProgramImporter()
        imp.block_builder = self.bb
        self.imp = imp
        self.entry = entry
        self.slots = entry.bindings()
        _ensure_fake_values(entry, self.program)
        self.cur_extra: dict[str, relax.Var] = {}
        self.tvm_linear = imp.convert_map["linear.default"]
        converters = _converters(self)
        # every converter (TVM's own too) takes (node, importer) and names the node when it fails
        imp.convert_map = {k: self._guard(k, f, k in converters) for k, f in {**imp.convert_map, **converters}.items()}
        symvars: dict[str, tvm.tirx.Var] = {}
        inputs: dict[str, relax.Var] = {}
        for node, slot in self.slots.items():
            if slot.kind is SlotKind.STATE:  # placeholders added by passes carry no fake value
                t = self.program.state[slot.name]
                dims, dtype = list(t.shape), t.dtype
            elif slot.kind is SlotKind.CACHE:
                shape_, dt = self.program.cache_specs[slot.name]
                dims, dtype = list(shape_), getattr(torch, dt)
            else:
                dims, dtype = list(node.meta["val"].shape), node.meta["val"].dtype
            shape = [symvars.setdefault(str(d), tvm.tirx.Var(str(d), "int64")) if isinstance(d, torch.SymInt) else int(d) for d in dims]
            inputs[node.name] = relax.Var(node.name, relax.TensorType(shape, imp._convert_data_type(dtype)))
        self.symvars = symvars
        nodes = list(entry.graph.graph.nodes)
        for node in nodes:
            if node.op == "call_function" and node.target.__name__ not in imp.convert_map:
                self._unsupported(node, "no converter for this op")
        attrs: dict[str, Any] = {}
        if entry.dims:
            attrs["tir_var_lower_bound"] = {k: r.min for k, r in entry.dims.items()}
            attrs["tir_var_upper_bound"] = {k: r.max for k, r in entry.dims.items()}
        # parameters: slots in order, then the repacked tensors (known only after conversion,
        # so the function is built with a placeholder list that is extended in place)
        with self.bb.function(entry.name, attrs=attrs, pure=True):
            with self.bb.dataflow():
                outs = imp._translate_fx_graph(entry.graph, nodes, inputs, set(imp.convert_map))
                out = self.bb.emit_output(relax.Tuple(list(outs)))
            self.bb.emit_func_output(out, params=list(inputs.values()) + list(self.cur_extra.values()))
        self.extra[entry.name] = list(self.cur_extra)

    def _guard(self, key: str, fn: Callable[..., relax.Var], ours: bool) -> Callable[[fx.Node, Any], relax.Var]:
        def convert(node: fx.Node, _imp: Any = None) -> relax.Var:
            try:
                return fn(node, self.imp) if ours else fn(node)
            except (_Unsupported, AssertionError, ValueError, TypeError, KeyError, NotImplementedError, tvm.error.InternalError, RuntimeError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                self._refuse(node, f"{type(e).__name__}: {first}", e)
                return self.fallback(node)

        return convert

    def _refuse(self, node: fx.Node, why: str, cause: BaseException | None = None) -> None:
        """Raise the LoweringError for ``node`` unless the plan allows the torch fallback."""
        if not self.allow_fallback:
            raise LoweringError(
                f"the TVM backend cannot lower node {node.name!r} ({node.target}) of entry {self.entry.name!r}: {why}. "
                "Set `fallback: torch` in the plan to run such nodes with torch, or use backend='torch'."
            ) from cause

    def _unsupported(self, node: fx.Node, why: str) -> None:
        self._refuse(node, why)
        self.imp.convert_map[node.target.__name__] = lambda n, _imp=None: self.fallback(n)

    def fallback(self, node: fx.Node) -> relax.Var:
        """Run ``node`` with torch from the VM (destination-passing packed function)."""
        name = fallback_name(self.entry.name, node.name)
        register_fallback(name, node)
        val = node.meta["val"]
        vals = list(val) if isinstance(val, (tuple, list)) else [val]
        outs = [relax.TensorType([self._dim(d) for d in v.shape], self.imp._convert_data_type(v.dtype)) for v in vals]
        args = [self.imp.env[a] for a in _tensor_args(node)]
        self.fallbacks.append(f"{self.entry.name}:{node.name} ({node.target})")
        return self.bb.emit(relax.call_dps_packed(name, args, outs if isinstance(val, (tuple, list)) else outs[0]))

    def _dim(self, d: Any) -> Any:
        if not isinstance(d, torch.SymInt):
            return int(d)
        key = str(d)
        if key not in self.symvars:
            raise LoweringError(f"entry {self.entry.name!r}: output dimension {key} is not an input dimension")
        return self.symvars[key]


class _Unsupported(Exception):
    pass


_CASTS = ("to.dtype", "_to_copy.default", "to.dtype_layout")
_QUANT_LINEARS = ("linear_w8a8.default", "quant_linear.default", "packed_linear.default")


def _name(node: Any) -> str:
    return node.target.__name__ if isinstance(node, fx.Node) and node.op == "call_function" else ""


def _uncast(node: Any) -> Any:
    """Through float32 casts (no-ops in an fp32 graph)."""
    while _name(node) in _CASTS and node.meta.get("val") is not None and node.meta["val"].dtype == torch.float32:
        node = node.args[0]
    return node


def _rmsnorm_source(node: Any, slots: dict[Any, Any]) -> tuple[fx.Node, fx.Node, float] | None:
    """``(x, weight, eps)`` when ``node`` is ``weight · (x · rsqrt(mean(x², -1) + eps))`` with a
    constant 1-D weight, and every user of ``node`` is a quantized linear (so fusing the norm into
    their activation quantization leaves nothing that needs the normalized tensor)."""
    if _name(node) != "mul.Tensor" or not all(_name(u) in _QUANT_LINEARS for u in node.users):
        return None
    a, b = node.args
    w, y = (a, b) if isinstance(a, fx.Node) and a in slots and slots[a].kind is SlotKind.STATE else (b, a)
    if not (isinstance(w, fx.Node) and w in slots and slots[w].kind is SlotKind.STATE and w.meta["val"].dim() == 1):
        return None
    y = _uncast(y)
    if _name(y) != "mul.Tensor":
        return None
    x, r = y.args
    if _name(r) != "rsqrt.default" and _name(x) == "rsqrt.default":
        x, r = r, x
    add = r.args[0] if _name(r) == "rsqrt.default" else None
    if _name(add) != "add.Tensor" or not isinstance(add.args[1], float):
        return None
    mean = add.args[0]
    if _name(mean) != "mean.dim" or list(mean.args[1]) not in ([-1], [x.meta["val"].dim() - 1]) or not (len(mean.args) > 2 and mean.args[2]):
        return None
    sq = mean.args[0]
    if _name(sq) != "pow.Tensor_Scalar" or sq.args[1] != 2 or _uncast(sq.args[0]) is not _uncast(x):
        return None
    return x, w, float(add.args[1])


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.args if isinstance(a, fx.Node)]


_FALLBACKS: dict[str, fx.Node] = {}


def register_fallback(name: str, node: fx.Node) -> None:
    """Register the packed function ``name`` that runs ``node``'s op with torch (destination
    passing: the node's tensor arguments, then one output tensor per result)."""
    _FALLBACKS[name] = node
    if tvm.get_global_func(name, allow_missing=True) is not None:
        return

    def run(*args: Any) -> None:
        n = _FALLBACKS[name]
        n_in = sum(isinstance(a, fx.Node) for a in n.args)
        tensors = iter(torch.from_dlpack(a) for a in args[:n_in])
        call_args = [next(tensors) if isinstance(a, fx.Node) else a for a in n.args]
        with torch.no_grad():
            res = n.target(*call_args, **n.kwargs)
        for dst, r in zip(args[n_in:], res if isinstance(res, (tuple, list)) else [res]):
            torch.from_dlpack(dst).copy_(r)

    tvm_ffi.register_global_func(name, run, override=True)


# ---- converters ---------------------------------------------------------------------------------


def _converters(lw: _Lowering) -> dict[str, Callable[[fx.Node, Any], relax.Var]]:
    bb = lw.bb

    env = lambda n: lw.imp.env[n]  # noqa: E731

    def rows(x: relax.Var) -> tuple[relax.Var, list[Any]]:
        shape = list(lw.imp.shape_of(x))
        lead = shape[:-1]
        m = math.prod(int(d) for d in lead) if all(isinstance(d, tvm.tirx.IntImm) for d in lead) else None
        flat = bb.emit(relax.op.reshape(x, [m if m is not None else _prod(lead), shape[-1]]))
        return flat, lead

    def linear_call(node: fx.Node, x: relax.Var, spec_args: dict[str, Any], w_codes: Repack, zero: int,
                    s_of: Repack | None, c_of: Repack | None, b_key: str | None, n: int, k: int, key: str) -> relax.Var:
        if lw.cuda is not None:
            y = cuda_linear(node, x, spec_args, w_codes, zero, s_of, c_of, b_key, n, k, key)
            if y is not None:
                return y
        flat, lead = rows(x)
        shp = lw.imp.shape_of(flat)
        m_static = int(shp[0]) if isinstance(shp[0], tvm.tirx.IntImm) else None
        n_p, k_p, group = padded(n, k, spec_args["group"])
        act_group = group if spec_args["act_group"] else 0
        try:
            spec = LinearKernel(n_p, k_p, m=m_static, bias=b_key is not None, **{**spec_args, "group": group, "act_group": act_group})
        except ValueError as e:
            raise _Unsupported(str(e)) from None
        if k_p != k:
            flat = bb.emit(relax.op.nn.pad(flat, [0, 0, 0, k_p - k]))
        if lw.select and lw.cuda is None and bitserial_spec(spec) is not None:
            choice = measure_w6(spec)
            lw.choices[spec.name] = choice
            if choice["chosen"] == "bitserial":
                return bitserial_call(spec, flat, lead, shp[0], w_codes, s_of, b_key, n, key)
        args: list[relax.Expr] = []
        if spec.act_bits:
            args += list(quantize(spec, flat, shp[0]))
        else:
            args.append(flat)
        for i, (wshape, wdt) in enumerate(spec.weight_shapes()):
            args.append(lw.param(f"{key}@{spec.wfmt}{i}", lambda st, i=i: pack_weight(spec, w_codes(st), zero)[i], wshape, wdt))
        gshape = (n_p // 64, spec.groups, 64)
        if s_of is not None:
            args.append(lw.param(f"{key}@scale", lambda st: pack_groups(spec, s_of(st)), gshape, "float32"))
        if c_of is not None:
            args.append(lw.param(f"{key}@zero", lambda st: pack_groups(spec, c_of(st)), gshape, "float32"))
        if b_key is not None:
            args.append(lw.param(f"{b_key}@pad{n_p}", lambda st: torch.nn.functional.pad(st[b_key].float(), (0, n_p - n)), (n_p,), "float32"))
        f = lw.kernel(spec.name, lambda: lw.generic_gpu(linear_primfunc(spec, schedule=lw.cuda is None)))
        y = bb.emit(relax.call_tir(f, args, relax.TensorType([shp[0], n_p], "float32")))
        return finish(y, x, lead, n_p, n)

    def cuda_quantize(node: fx.Node, qspec: CudaQuant, flat: relax.Var, mdim: Any, k: int) -> tuple[relax.Var, relax.Var]:
        """Activation codes (+ planes) and scales for a CUDA linear: one kernel per distinct input
        (q/k/v and gate/up share it), fused with the RMSNorm that produces the input when the graph
        has one whose output only feeds quantized linears."""
        norm = _rmsnorm_source(node.args[0], lw.slots)
        args = [flat, None]
        if norm is not None:
            x0, w, eps = norm
            qspec = replace(qspec, norm=True, eps=eps, valid=k if qspec.k != k else 0)
            pre, _ = rows(env(x0))
            wv = env(w)
            if qspec.k != k:
                pre = bb.emit(relax.op.nn.pad(pre, [0, 0, 0, qspec.k - k]))
                wv = bb.emit(relax.op.nn.pad(wv, [0, qspec.k - k]))
            args = [pre, wv]
        memo_key = (qspec.name, str(node.args[0]))
        if memo_key in lw.quant_memo.get(lw.entry.name, {}):
            return lw.quant_memo[lw.entry.name][memo_key]
        if args[1] is None:
            args[1] = lw.param("qc@one", lambda st: torch.ones(1), (1,), "float32")
        qf = lw.kernel(qspec.name, lambda: quant_cuda_primfunc(qspec))
        pshape = [mdim, qspec.k // 128, 8, 4] if qspec.planes else [1, 1, 8, 4]
        q = bb.emit(relax.call_tir(qf, args, [relax.TensorType([mdim, qspec.k], "int8"),
                                              relax.TensorType([mdim, qspec.groups], "float32"),
                                              relax.TensorType(pshape, "uint32")]))
        out = bb.emit(relax.TupleGetItem(q, 2 if qspec.planes else 0)), bb.emit(relax.TupleGetItem(q, 1))
        lw.quant_memo.setdefault(lw.entry.name, {})[memo_key] = out
        return out

    def finish(y: relax.Var, x: relax.Var, lead: list[Any], n_p: int, n: int) -> relax.Var:
        if n_p != n:
            y = bb.emit(relax.op.strided_slice(y, [1], [0], [n], assume_inbound=True))
        y = bb.emit(relax.op.reshape(y, [*lead, n]))
        want = str(x.ty.dtype)  # qcompile's linear ops return x's dtype
        return bb.emit(relax.op.astype(y, want)) if want != "float32" else y

    def cuda_linear(node: fx.Node, x: relax.Var, spec_args: dict[str, Any], w_codes: Repack, zero: int,
                    s_of: Repack | None, c_of: Repack | None, b_key: str | None, n: int, k: int, key: str) -> relax.Var | None:
        """A tensor-core kernel for this linear, or None (reported) when none covers it."""
        assert lw.cuda is not None
        wfmt, act_bits, group = spec_args["wfmt"], spec_args["act_bits"], spec_args["group"]
        kind = {("i8", 8): "s8", ("i6", 6): "w6", ("i6", 8): "w6", ("u4", 0): "f16"}.get((wfmt, act_bits))
        if kind is None or s_of is None:
            lw.generic.append(f"{node.name}: {wfmt} weights with {act_bits or 'fp32'}-bit activations have no tensor-core kernel")
            return None
        if kind == "w6":
            choice = cuda_w6_choice(lw.cuda.arch, n, k, act_bits)
            kind = choice["chosen"]
        per_channel = group == k
        align = 16 if kind == "f16" else 128  # activation codes are produced 128 at a time
        k_p = -(-k // align) * align if per_channel else -(-k // group) * group
        grp = k_p if per_channel else group
        n_p = -(-n // 16) * 16
        flat, lead = rows(x)
        mdim = lw.imp.shape_of(flat)[0]
        m_static = int(mdim) if isinstance(mdim, tvm.tirx.IntImm) else None
        try:
            spec = CudaLinear(kind, n_p, k_p, grp, act_bits, 0 if per_channel or not spec_args["act_group"] else grp,
                              b_key is not None, zero_term=c_of is not None,
                              tokens=8 if m_static is not None and m_static <= 8 else 32)
            qspec = CudaQuant(k_p, act_bits, spec.act_group, planes=kind == "b1") if act_bits else None
        except Uncovered as e:
            lw.generic.append(f"{node.name}: {e}")
            return None
        if kind in ("b1", "u6"):
            lw.choices[spec.name] = choice
        if k_p != k:
            flat = bb.emit(relax.op.nn.pad(flat, [0, 0, 0, k_p - k]))
        if qspec is not None:
            act, fourth = cuda_quantize(node, qspec, flat, mdim, k)
        else:
            act = flat
        ((wshape, wdt),) = spec.weight_shapes()
        codes = lambda st: torch.nn.functional.pad(w_codes(st).to(torch.int64) + (zero if kind == "f16" else 0), (0, k_p - k, 0, n_p - n))  # noqa: E731
        w = lw.param(f"{key}@cuda_{kind}", lambda st: pack_cuda_weight(spec, codes(st)), wshape, wdt)
        groups = spec.groups
        padg = lambda t: torch.nn.functional.pad(t.float(), (0, groups - t.shape[1], 0, n_p - n))  # noqa: E731
        sw = lw.param(f"{key}@cuda_scale{n_p}x{groups}", lambda st: padg(s_of(st)), (n_p, groups), "float32")
        if qspec is None:
            fourth = lw.param(f"{key}@cuda_offset{n_p}x{groups}", lambda st: padg(c_of(st)), (n_p, groups), "float32") if c_of is not None else sw
        if b_key is not None:
            bias = lw.param(f"{b_key}@pad{n_p}", lambda st: torch.nn.functional.pad(st[b_key].float(), (0, n_p - n)), (n_p,), "float32")
        else:
            bias = lw.param(f"qc@zeros{n_p}", lambda st: torch.zeros(n_p), (n_p,), "float32")
        f = lw.kernel(spec.name, lambda: linear_cuda_primfunc(spec))
        y = bb.emit(relax.call_tir(f, [act, w, sw, fourth, bias], relax.TensorType([mdim, n_p], "float32")))
        return finish(y, x, lead, n_p, n)

    def quantize(spec: LinearKernel, flat: relax.Var, mdim: Any) -> tuple[relax.Var, relax.Var]:
        qr = QuantRows(spec.k, spec.act_bits, spec.act_group, spec.m)
        qf = lw.kernel(qr.name, lambda: lw.generic_gpu(quant_rows_primfunc(qr, schedule=lw.cuda is None)))
        q = bb.emit(relax.call_tir(qf, [flat], [relax.TensorType([mdim, spec.k], "int8"), relax.TensorType([mdim, qr.groups], "float32")]))
        return bb.emit(relax.TupleGetItem(q, 0)), bb.emit(relax.TupleGetItem(q, 1))

    def bitserial_call(spec: LinearKernel, flat: relax.Var, lead: list[Any], mdim: Any, w_codes: Repack,
                       s_of: Repack | None, b_key: str | None, n: int, key: str) -> relax.Var:
        bs = bitserial_spec(spec)
        assert bs is not None and s_of is not None
        qx, sx = quantize(spec, flat, mdim)
        pf = lw.kernel("qc_planes_" + bs.name, lambda: act_planes_primfunc(bs))
        planes = bb.emit(relax.call_tir(pf, [qx], relax.TensorType([bs.a_bits, mdim, bs.k // 32], "int32")))
        wp = lw.param(f"{key}@planes", lambda st: pack_weight_planes(bs, w_codes(st)), (6, bs.n // NBB, bs.k // 32, NBB), "int32")
        sp = lw.param(
            f"{key}@scale{NBB}",
            lambda st: pack_plane_scales(bs, s_of(st)),
            (bs.n // NBB, bs.groups, NBB), "float32",
        )
        f = lw.kernel(bs.name, lambda: bitserial_primfunc(bs))
        y = bb.emit(relax.call_tir(f, [planes, sx, wp, sp], relax.TensorType([mdim, bs.n], "float32")))
        if bs.n != n:
            y = bb.emit(relax.op.strided_slice(y, [1], [0], [n], assume_inbound=True))
        if b_key is not None:
            y = bb.emit(relax.op.add(y, lw.param(f"{b_key}@f32", lambda st: st[b_key].float(), (n,), "float32")))
        return bb.emit(relax.op.reshape(y, [*lead, n]))

    def bias_key(node: Any) -> str | None:
        return None if node is None else lw.state_key(node, "bias", node)

    def aten_linear(node: fx.Node) -> relax.Var:
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else None
        slot = lw.slots.get(w)
        if slot is None or slot.kind is not SlotKind.STATE or node.meta["val"].dtype != torch.float32 or lw.cuda is not None:
            return lw.tvm_linear(node)  # TVM's own converter (dense weights computed in-graph; on CUDA, dlight's GEMV/matmul)
        wkey = slot.name
        n, k = lw.program.state[wkey].shape
        return linear_call(node, env(x), dict(wfmt="f32", group=k, act_bits=0, act_group=0, zero_term=False),
                           lambda st: st[wkey], 0, None, None, bias_key(b), n, k, wkey)

    def linear_w8a8(node: fx.Node) -> relax.Var:
        x, qw, ws, b = node.args
        wkey, skey = lw.state_key(qw, "weight", node), lw.state_key(ws, "scale", node)
        n, k = lw.program.state[wkey].shape
        return linear_call(node, env(x), dict(wfmt="i8", group=k, act_bits=8, act_group=0, zero_term=False),
                           lambda st: st[wkey], 0, lambda st: st[skey].float()[:, None], None, bias_key(b), n, k, wkey)

    def grouped(node: fx.Node, x: fx.Node, codes_of: Repack, wkey: str, skey: str, okey: str | None, b: Any,
                n: int, k: int, bits: int, group: int, act_bits: int, act_group: int) -> relax.Var:
        if act_bits and okey is not None:
            raise _Unsupported("integer activations with asymmetric weights have no kernel")
        if bits > 8:
            raise _Unsupported(f"{bits}-bit weights have no kernel")
        if okey is not None and bits > 4:
            raise _Unsupported("asymmetric codes above 4 bits have no kernel")
        if act_bits:
            wfmt = "i6" if bits == 6 else "i8"
        else:
            wfmt = "u4" if bits <= 4 else ("i6" if bits == 6 else "i8")
        zero = 0 if (okey is not None or wfmt != "u4") else 8
        s_of = lambda st: st[skey].float()  # noqa: E731
        c_of = None
        if okey is not None or zero:
            c_of = lambda st: (st[okey].float() if okey else 0) - zero * st[skey].float()  # noqa: E731
        spec_args = dict(wfmt=wfmt, group=group, act_bits=act_bits, act_group=act_group, zero_term=c_of is not None)
        return linear_call(node, env(x), spec_args, codes_of, zero, s_of, c_of, bias_key(b), n, k, wkey)

    def quant_linear(node: fx.Node) -> relax.Var:
        x, codes, scale, offset, b, group, act_bits, act_group = node.args
        wkey, skey = lw.state_key(codes, "codes", node), lw.state_key(scale, "scale", node)
        okey = lw.state_key(offset, "offset", node) if offset is not None else None
        n, k = lw.program.state[wkey].shape
        bits = lw.program.bits_of(wkey)
        return grouped(node, x, lambda st: st[wkey], wkey, skey, okey, b, n, k, bits, group, act_bits, act_group)

    def packed_linear(node: fx.Node) -> relax.Var:
        x, packed, scale, b, k, w_bits, group, act_bits, act_group = node.args
        pkey, skey = lw.state_key(packed, "packed weight", node), lw.state_key(scale, "scale", node)
        n = lw.program.state[pkey].shape[0]
        return grouped(node, x, lambda st: unpack_codes(st[pkey], k, w_bits), pkey, skey, None, b, n, k, w_bits, group, act_bits, act_group)

    def index_copy_(node: fx.Node) -> relax.Var:
        dst, dim, index, src = node.args
        slot = lw.slots.get(dst)
        if slot is None or slot.kind is not SlotKind.CACHE:
            raise _Unsupported("in-place index_copy_ is supported into cache tensors only")
        cache = env(dst)
        shape = tuple(int(d) for d in lw.imp.shape_of(cache))
        rows_dim = lw.imp.shape_of(env(index))[0]
        rows_n = int(rows_dim) if isinstance(rows_dim, tvm.tirx.IntImm) else None
        dtype = str(cache.ty.dtype)
        spec = IndexCopy(shape, dtype, dim % len(shape), rows_n, cuda=lw.cuda is not None)
        f = lw.kernel(spec.name, lambda: index_copy_primfunc(spec))
        srcv = env(src)
        if str(srcv.ty.dtype) != dtype:
            srcv = bb.emit(relax.op.astype(srcv, dtype))
        new = bb.emit(relax.call_tir_inplace(f, [cache, env(index), srcv], [0], relax.TensorType(list(shape), dtype)))
        lw.imp.env[dst] = new  # later reads of the cache see the written tensor
        return new

    def diff(node: fx.Node) -> relax.Var:
        x = env(node.args[0])
        n = node.args[1] if len(node.args) > 1 else 1
        dim = node.args[2] if len(node.args) > 2 else -1
        pre = node.args[3] if len(node.args) > 3 else node.kwargs.get("prepend")
        app = node.args[4] if len(node.args) > 4 else node.kwargs.get("append")
        parts = ([env(pre)] if pre is not None else []) + [x] + ([env(app)] if app is not None else [])
        if len(parts) > 1:
            x = bb.emit(relax.op.concat(parts, axis=dim))
        for _ in range(n):
            shape = lw.imp.shape_of(x)
            ax = dim % len(shape)
            hi = bb.emit(relax.op.strided_slice(x, [ax], [1], [shape[ax]], assume_inbound=True))
            lo = bb.emit(relax.op.strided_slice(x, [ax], [0], [shape[ax] - 1], assume_inbound=True))
            x = bb.emit(relax.op.subtract(hi, lo))
        return x

    def cumsum(node: fx.Node) -> relax.Var:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
        dt = lw.imp._convert_data_type(node.meta["val"].dtype)
        return bb.emit(relax.op.cumsum(env(node.args[0]), axis=dim, dtype=dt))

    def sdpa(node: fx.Node) -> relax.Var:
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if node.kwargs.get("is_causal", False) or node.kwargs.get("dropout_p", 0.0) or node.kwargs.get("enable_gqa", False):
            raise _Unsupported("causal / dropout / enable_gqa attention is not converted")
        scale = node.kwargs.get("scale") or 1.0 / math.sqrt(node.args[0].meta["val"].shape[-1])
        fused = attention_kernel(node, mask, float(scale))
        if fused is not None:
            return fused
        q, k, v = (env(a) for a in node.args[:3])
        rank = len(lw.imp.shape_of(k))
        kt = bb.emit(relax.op.permute_dims(k, list(range(rank - 2)) + [rank - 1, rank - 2]))
        s = bb.emit(relax.op.multiply(bb.emit(relax.op.matmul(q, kt)), relax.const(scale, "float32")))
        if mask is not None:
            m = env(mask)
            if mask.meta["val"].dtype == torch.bool:
                m = m if str(m.ty.dtype) == "bool" else bb.emit(relax.op.astype(m, "bool"))
                s = bb.emit(relax.op.where(m, s, relax.const(float("-inf"), "float32")))
            else:
                s = bb.emit(relax.op.add(s, m))
        p = bb.emit(relax.op.nn.softmax(s, axis=-1))
        return bb.emit(relax.op.matmul(p, v))

    def attention_kernel(node: fx.Node, mask: fx.Node | None, scale: float) -> relax.Var | None:
        """qcompile's attention kernel on the un-repeated K/V heads, when the graph's shapes fit it
        (CPU only: on CUDA attention is TVM's matmul/softmax under dlight's schedules)."""
        if lw.cuda is not None:
            return None
        (kn, gk), (vn, gv) = _unrepeat(node.args[1]), _unrepeat(node.args[2])
        q = env(node.args[0])
        qs, ks = list(lw.imp.shape_of(q)), list(lw.imp.shape_of(env(kn)))
        if gk != gv or len(qs) != 4 or len(ks) != 4:
            return None
        if not all(isinstance(d, tvm.tirx.IntImm) for d in ks[:2] + ks[3:]):
            return None
        if not isinstance(ks[2], tvm.tirx.IntImm) and not _same(ks[2], qs[2]):
            return None  # dynamic keys only when they are the queries (no cache)
        if str(q.ty.dtype) != "float32" or str(env(kn).ty.dtype) != "float32" or str(env(vn).ty.dtype) != "float32":
            return None
        b, kvh, dim = int(ks[0]), int(ks[1]), int(ks[3])
        keys = int(ks[2]) if isinstance(ks[2], tvm.tirx.IntImm) else None
        heads = int(qs[1])
        queries = int(qs[2]) if isinstance(qs[2], tvm.tirx.IntImm) else None
        mkind, mheads, margs = "none", 1, []
        if mask is not None:
            mv = env(mask)
            ms = list(lw.imp.shape_of(mv))
            if len(ms) != 4 or not _same(ms[3], ks[2]) or not _same(ms[2], qs[2]):
                return None
            if int(ms[0]) != b or int(ms[1]) not in (1, heads):
                return None
            mkind = "bool" if mask.meta["val"].dtype == torch.bool else "float"
            mheads = int(ms[1])
            if mkind == "bool" and str(mv.ty.dtype) != "bool":
                mv = bb.emit(relax.op.astype(mv, "bool"))
            margs = [mv]
        spec = Attention(b, heads, kvh, keys, dim, queries, mkind, mheads, scale)
        try:
            f = lw.kernel(spec.name, lambda: attention_primfunc(spec))
        except ValueError:
            return None
        return bb.emit(relax.call_tir(f, [q, env(kn), env(vn), *margs], relax.TensorType(qs, "float32")))

    table: dict[str, Callable[[fx.Node], relax.Var]] = {
        "linear.default": aten_linear,
        "linear_w8a8.default": linear_w8a8,
        "quant_linear.default": quant_linear,
        "packed_linear.default": packed_linear,
        "index_copy_.default": index_copy_,
        "diff.default": diff,
        "cumsum.default": cumsum,
        "scaled_dot_product_attention.default": sdpa,
        "to.device": lambda node: env(node.args[0]),
    }
    return {k: (lambda f: lambda node, _imp: f(node))(f) for k, f in table.items()}


def _ensure_fake_values(entry: Entry, program: Program) -> None:
    """Give every node a fake value (shape, dtype): nodes that passes inserted have none, and the
    converters and the torch fallback need them. Re-propagates through the graph in the fake mode
    (and symbolic shapes) of the captured user inputs."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    nodes = [n for n in entry.graph.graph.nodes if n.op != "output"]
    if all("val" in n.meta for n in nodes):
        return
    mode = next((n.meta["val"].fake_mode for n in nodes if hasattr(n.meta.get("val"), "fake_mode")), None)
    if mode is None:
        raise LoweringError(f"entry {entry.name!r} carries no fake values to infer shapes from")
    fakes = []
    for node, slot in entry.bindings().items():
        if "val" in node.meta:
            fakes.append(node.meta["val"])
        elif slot.kind is SlotKind.STATE:
            fakes.append(mode.from_tensor(program.state[slot.name], static_shapes=True))
        else:
            shape, dt = program.cache_specs[slot.name]
            fakes.append(mode.from_tensor(torch.zeros(shape, dtype=getattr(torch, dt)), static_shapes=True))
    with mode:
        FakeTensorProp(entry.graph, mode).propagate_dont_convert_inputs(*fakes)


def _same(a: Any, b: Any) -> bool:
    """Two shape dimensions that are the same constant or the same symbolic variable."""
    return str(a) == str(b)


_RESHAPES = {"reshape.default", "view.default", "_unsafe_view.default"}


def _unrepeat(node: fx.Node) -> tuple[fx.Node, int]:
    """(K/V before the grouped-query repeat, repeat count): matches ``reshape(expand(unsqueeze(x, 2)))``
    that turns ``[B, KVH, L, D]`` into ``[B, KVH·g, L, D]``; anything else is itself with count 1."""
    try:
        exp = node.args[0]
        uns = exp.args[0]
        if (
            node.target.__name__ in _RESHAPES
            and exp.target.__name__ == "expand.default"
            and uns.target.__name__ == "unsqueeze.default"
            and uns.args[1] == 2
        ):
            src = uns.args[0]
            b, kvh, length, dim = src.meta["val"].shape
            shape = exp.meta["val"].shape
            if len(shape) == 5 and shape[0] == b and shape[1] == kvh and shape[3] == length and shape[4] == dim:
                return src, int(shape[2])
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        pass
    return node, 1


def _prod(dims: list[Any]) -> Any:
    out: Any = 1
    for d in dims:
        out = out * d
    return out


def lower_program(program: Program, allow_fallback: bool = False, select: bool = True, cuda: CudaTarget | None = None) -> Lowered:
    """Lower every entry of ``program`` into one IRModule (a Relax function per entry).
    ``select``: choose between alternative CPU kernels by timing them here (see :mod:`.select`).
    ``cuda``: lower for that GPU target (tensor-core kernels; anything else scheduled by dlight)."""
    lw = _Lowering(program, allow_fallback, select, cuda)
    for entry in program.entries.values():
        lw.lower_entry(entry)
    return Lowered(lw.bb.get(), lw.extra, lw.repacks, lw.fallbacks, dict(lw.kernel_uses), lw.choices, lw.generic)
