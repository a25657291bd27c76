"""Program → one Relax IRModule (a function per entry) through TVM's own PyTorch importer: the driver.

Each entry's graph is already a ``torch.export`` ATen graph; it is handed to
``tvm.relax.frontend.torch``'s ``ExportedProgramImporter`` with the Program's slots standing in
for the ExportedProgram's signature (every placeholder becomes a function parameter, in slot
order, then the repacked weights the kernels read) and TVM's converters extended with qcompile's
(:mod:`.converters`), which ask the target's kernel rules (:mod:`.rules`; the Target owns them:
:mod:`.rules_cpu`, :mod:`.rules_cuda`) for the kernel of every linear layer, attention and cache
write.

Failures:

* an op with no converter, or a node a converter declines (:class:`~.rules.NoRule`: no rule of the
  target applies, e.g. ``index_copy_`` into a non-cache tensor, causal attention), is a
  :class:`LoweringError` naming the op and the node, unless the plan sets ``fallback: torch``: then
  the node runs its torch implementation from the VM (:mod:`.fallback`) and is listed in
  :attr:`Lowered.fallbacks`;
* any other exception inside a converter (qcompile's or TVM's own) is a bug: a
  :class:`LoweringError` naming the op, the node and the entry, the exception as its cause; never a
  fallback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import tvm
from tvm import relax
from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

from qcompile.codegen.target import Target
from qcompile.codegen.tvm.converters import converters
from qcompile.codegen.tvm.fallback import fallback_name, register_fallback, tensor_args
from qcompile.codegen.tvm.rules import NoRule, Repack
from qcompile.errors import QCompileError
from qcompile.ir.program import PATH_KEY, Entry, Program, SlotKind

if TYPE_CHECKING:
    from qcompile.tuning.space import Tunable
    from qcompile.tuning.tuner import Applied

# What a converter bug raises (Python's, torch's and TVM's error types; TVM's derive from RuntimeError)
# and qcompile's own errors raised inside a converter (e.g. a Program without a weight's bit width).
CONVERTER_ERRORS = (
    ArithmeticError,
    AssertionError,
    AttributeError,
    LookupError,
    RuntimeError,
    TypeError,
    ValueError,
    QCompileError,
)


class LoweringError(QCompileError):
    """A graph the TVM backend cannot lower (names the op and the node)."""


@dataclass
class Lowered:
    mod: tvm.IRModule
    extra_params: dict[str, list[str]]  # entry -> repacked-tensor keys passed after the slots
    repacks: dict[str, Repack]  # key -> how to compute it from the Program's state
    fallbacks: list[str]  # "entry:node (op)" run by torch
    kernels: dict[str, int] = field(default_factory=dict)  # kernel name -> call sites
    choices: dict[str, dict[str, Any]] = field(default_factory=dict)  # kernel -> measured alternatives
    generic: list[str] = field(default_factory=list)  # CUDA: linears on the generic kernel, and why
    tunables: dict[str, Tunable] = field(default_factory=dict)  # kernels with a design space (qcompile.tuning)
    # a plan's float_compute other than fp32: what it asked, the linears that got it and those that did not (why)
    float_compute: dict[str, Any] = field(default_factory=dict)


class Lowering:
    """One lowering of a Program for a target: the block builder, the kernels and repacked weights so
    far, and the entry being converted. Converters and rules emit through it."""

    def __init__(
        self,
        program: Program,
        target: Target,
        allow_fallback: bool,
        select: bool,
        tuning: Applied | None = None,
        float_compute: str = "fp32",
    ) -> None:
        self.program = program
        self.tuning = tuning  # a tuning database's best schedules (None: every kernel's default)
        self.tunables: dict[str, Tunable] = {}
        self.target = target
        self.allow_fallback = allow_fallback
        self.select = select  # choose between alternative CPU kernels by timing them here
        self.bb = relax.BlockBuilder()
        self.kernels: dict[str, tvm.ir.GlobalVar] = {}
        self.kernel_uses: dict[str, int] = {}
        self.repacks: dict[str, Repack] = {}
        self.extra: dict[str, list[str]] = {}
        self.fallbacks: list[str] = []
        self.choices: dict[str, dict[str, Any]] = {}  # kernel -> measured (or defaulted) alternatives
        self.generic: list[str] = []  # linears on a generic kernel, and why
        # entry -> activation quantizations already emitted (rules share one per distinct input)
        self.quant_memo: dict[str, dict[tuple[str, str], tuple[relax.Var, ...]]] = {}
        # nodes a kernel already computed (a residual add fused into a linear's epilogue) -> their value
        self.fused: dict[fx.Node, relax.Var] = {}
        # Plan.float_compute for weight-only linears, and where it could not be honoured ("node: why")
        self.float_compute = float_compute
        self.float_bf16: list[str] = []
        self.float_fp32: list[str] = []

    # ---- helpers used by converters and rules -----------------------------------------------
    def kernel(self, name: str, make: Callable[[], tvm.tirx.PrimFunc]) -> tvm.ir.GlobalVar:
        """The kernel ``name`` (built by ``make`` on first use), counted once per call site."""
        if name not in self.kernels:
            func = make().with_attr("op_pattern", 8).with_attr("global_symbol", name)
            self.kernels[name] = self.bb.add_func(func, name)
        self.kernel_uses[name] = self.kernel_uses.get(name, 0) + 1
        return self.kernels[name]

    def tuned_kernel(self, t: Tunable) -> tvm.ir.GlobalVar:
        """A kernel with a design space: its best tuned schedule when a tuning database is applied,
        else its default; recorded for ``qcompile tune``'s extraction."""
        self.tunables.setdefault(t.name, t)
        if self.tuning is None:
            return self.kernel(t.name, lambda: t.build({}))
        tuning = self.tuning
        return self.kernel(t.name, lambda: tuning.build(t))

    def param(self, key: str, repack: Repack, shape: tuple[int, ...], dtype: str) -> relax.Var:
        """A repacked tensor as an extra parameter of the entry being lowered."""
        self.repacks.setdefault(key, repack)
        if key not in self.cur_extra:
            self.cur_extra[key] = relax.Var(key, relax.TensorType(list(shape), dtype))
        return self.cur_extra[key]

    def env(self, node: fx.Node) -> relax.Var:
        """The Relax value of an already converted node."""
        return self.imp.env[node]

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
        # every converter (TVM's own too) takes the node and names it when it fails
        imp.convert_map = {k: self._guard(f) for k, f in {**imp.convert_map, **converters(self)}.items()}
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
            shape = [
                symvars.setdefault(str(d), tvm.tirx.Var(str(d), "int64")) if isinstance(d, torch.SymInt) else int(d)
                for d in dims
            ]
            inputs[node.name] = relax.Var(node.name, relax.TensorType(shape, imp._convert_data_type(dtype)))
        self.symvars = symvars
        nodes = list(entry.graph.graph.nodes)
        for node in nodes:
            if node.op == "call_function" and node.target.__name__ not in imp.convert_map:
                self._unsupported(node, "no converter for this op")
        attrs: dict[str, Any] = {}
        if entry.dims:
            attrs["tir_var_lower_bound"] = {k: r.min for k, r in entry.dims.items()}
            # an unbounded dim (2**31 - 1, torch.export's infinity) gets no bound: TVM multiplies the bounds of
            # several dims into int64 sizes (two of them overflow), and plans memory from them
            bounded = {k: r.max for k, r in entry.dims.items() if r.max < 2**31 - 1}
            if bounded:
                attrs["tir_var_upper_bound"] = bounded
        # parameters: slots in order, then the repacked tensors (known only after conversion,
        # so the function is built with a placeholder list that is extended in place)
        with self.bb.function(entry.name, attrs=attrs, pure=True):
            with self.bb.dataflow():
                outs = imp._translate_fx_graph(entry.graph, nodes, inputs, set(imp.convert_map))
                out = self.bb.emit_output(relax.Tuple(list(outs)))
            self.bb.emit_func_output(out, params=list(inputs.values()) + list(self.cur_extra.values()))
        self.extra[entry.name] = list(self.cur_extra)

    def _guard(self, fn: Callable[[fx.Node], relax.Var]) -> Callable[..., relax.Var]:
        def convert(node: fx.Node, _imp: Any = None) -> relax.Var:
            if node in self.fused:
                return self.fused.pop(node)
            try:
                self._align_operands(node)
                return self._known_shape(node, fn(node))
            except NoRule as e:
                self._refuse(node, str(e), e)
                return self.fallback(node)
            except LoweringError:
                raise
            except CONVERTER_ERRORS as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                path = node.meta.get(PATH_KEY)
                raise LoweringError(
                    f"converting node {node.name!r} ({node.target}) of entry {self.entry.name!r}"
                    f"{f' at module path {path!r}' if path else ''} failed: {type(e).__name__}: {first}. "
                    "This is a bug in a converter (qcompile's or TVM's), not a missing kernel, so the plan's torch "
                    "fallback does not cover it; backend='torch' runs the model without TVM"
                ) from e

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
        args = [self.env(a) for a in tensor_args(node)]
        self.fallbacks.append(f"{self.entry.name}:{node.name} ({node.target})")
        return self.bb.emit(relax.call_dps_packed(name, args, outs if isinstance(val, (tuple, list)) else outs[0]))

    def _known_shape(self, node: fx.Node, v: Any) -> Any:
        """``v`` with the shape torch computed for ``node`` when TVM lost it: two sizes torch knows equal
        (it guards them, e.g. a detector's upsampled feature and its skip connection, both functions of
        a dynamic height) can be expressions TVM cannot prove equal, and TVM then gives the sum an
        unknown shape. A match_cast restores torch's shape and checks it when the module runs."""
        ty = getattr(v, "ty", None)
        val = node.meta.get("val")
        if not isinstance(ty, relax.TensorType) or ty.shape is not None or not isinstance(val, torch.Tensor):
            return v
        try:
            shape = [self._dim_expr(d) for d in val.shape]
        except NotImplementedError:
            return v
        return self.bb.match_cast(v, relax.TensorType(shape, ty.dtype))

    def _align_operands(self, node: fx.Node) -> None:
        """Before an elementwise op or a concatenation: an operand whose size torch knows equals the
        output's, but spelled differently (an expression TVM cannot prove equal, so it would leave the
        op unlowered), is match_cast to the output's size: TVM sees equal shapes and checks them when
        the module runs. Broadcast dims (size 1) and the concatenated dim keep their own size."""
        val = node.meta.get("val")
        name = getattr(node.target, "__name__", "")
        if (
            node.op != "call_function"
            or name not in _ALIGNED
            or not isinstance(val, torch.Tensor)
            or not any(isinstance(d, torch.SymInt) for d in val.shape)
        ):
            return
        if name == "cat.default":
            args = list(node.args[0]) if node.args else []
            axis = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % val.dim()
        else:
            args, axis = list(node.args), None
        for arg in args:
            av = arg.meta.get("val") if isinstance(arg, fx.Node) else None
            if not isinstance(av, torch.Tensor) or av.dim() != val.dim() or arg not in self.imp.env:
                continue
            want = [a if i == axis else b for i, (a, b) in enumerate(zip(av.shape, val.shape))]
            if any(not isinstance(a, torch.SymInt) and int(a) == 1 and str(b) != "1" for a, b in zip(av.shape, want)):
                continue  # a broadcast operand
            var = self.imp.env[arg]
            ty = getattr(var, "ty", None)
            if not isinstance(ty, relax.TensorType):
                continue
            try:
                shape = [self._dim_expr(d) for d in want]
            except NotImplementedError:
                continue
            have = getattr(ty.shape, "values", None)  # TVM's own spelling, which may differ from torch's
            if have is not None and len(have) == len(shape) and all(self._equal(a, b) for a, b in zip(have, shape)):
                continue
            self.imp.env[arg] = self.bb.match_cast(var, relax.TensorType(shape, ty.dtype))

    @functools.cached_property
    def _analyzer(self) -> Any:
        return tvm.sym.analyzer.Analyzer()

    def _equal(self, a: Any, b: Any) -> bool:
        return bool(self._analyzer.can_prove_equal(a, b))

    def _dim_expr(self, d: Any) -> Any:
        """A torch size (int, or SymInt over the input dims) as a TIR expression over the same variables."""
        if not isinstance(d, torch.SymInt):
            return tvm.tirx.IntImm("int64", int(d))
        return _sympy_to_tir(d.node.expr, self.symvars)

    def _dim(self, d: Any) -> Any:
        if not isinstance(d, torch.SymInt):
            return int(d)
        try:  # an input dim, or an expression of them (a strided conv's output size)
            return self._dim_expr(d)
        except NotImplementedError:
            raise LoweringError(
                f"entry {self.entry.name!r}: output dimension {d} is not an expression of the input dimensions"
            ) from None


_ELEMENTWISE = frozenset(
    f"{op}.Tensor" for op in ("add", "sub", "mul", "div", "eq", "ne", "lt", "le", "gt", "ge", "pow")
) | frozenset({"maximum.default", "minimum.default", "where.self"})
_ALIGNED = _ELEMENTWISE | {"cat.default"}  # the ops whose operands _align_operands casts


def _sympy_to_tir(e: Any, symvars: dict[str, Any]) -> Any:
    """Integer sympy expressions of torch's symbolic shapes (+, *, floor division, mod) as TIR; anything
    else is NotImplementedError."""
    import sympy

    name = type(e).__name__
    if isinstance(e, sympy.Integer):
        return tvm.tirx.IntImm("int64", int(e))
    if isinstance(e, sympy.Symbol):
        if str(e) not in symvars:
            raise NotImplementedError(str(e))
        return symvars[str(e)]
    args = [_sympy_to_tir(a, symvars) for a in e.args]
    if isinstance(e, sympy.Add):
        return functools.reduce(lambda a, b: a + b, args)
    if isinstance(e, sympy.Mul):
        return functools.reduce(lambda a, b: a * b, args)
    if name == "FloorDiv":
        return tvm.tirx.floordiv(args[0], args[1])
    if name in ("Mod", "PythonMod"):
        return tvm.tirx.floormod(args[0], args[1])
    raise NotImplementedError(name)


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


def lower_program(
    program: Program,
    target: Target,
    allow_fallback: bool = False,
    select: bool = True,
    tuning: Applied | None = None,
    float_compute: str = "fp32",
) -> Lowered:
    """Lower every entry of ``program`` for ``target`` into one IRModule (a Relax function per entry).
    ``select``: let rules choose between alternative kernels by timing them here (see :mod:`.select`);
    ``tuning``: schedules from a tuning database (:mod:`qcompile.tuning`); ``float_compute``: the plan's
    precision for weight-only linears (:class:`qcompile.plan.FloatCompute`)."""
    lw = Lowering(program, target, allow_fallback, select, tuning, float_compute)
    for entry in program.entries.values():
        lw.lower_entry(entry)
    fc: dict[str, Any] = {}
    if float_compute != "fp32":
        fc = {"requested": float_compute, "linears": lw.float_bf16, "fp32": lw.float_fp32}
    return Lowered(
        lw.bb.get(),
        lw.extra,
        lw.repacks,
        lw.fallbacks,
        dict(lw.kernel_uses),
        lw.choices,
        lw.generic,
        lw.tunables,
        fc,
    )


__all__ = [
    "CONVERTER_ERRORS",
    "Lowered",
    "Lowering",
    "LoweringError",
    "NoRule",
    "fallback_name",
    "lower_program",
    "register_fallback",
]
