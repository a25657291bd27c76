"""qcompile's additions to onnx2torch's converter registry (used by :mod:`qcompile.ir.onnx_import`).

onnx2torch converts each ONNX node into a small ``nn.Module`` whose inputs are the node's inputs at
run time. Two things in that design stop ``torch.export`` from capturing a converted graph with
dynamic shapes, and this module replaces the converters concerned, per op type, for every opset
onnx2torch registers them under (the replaced converter is still used where ours does not apply):

* **Shape arithmetic.** ``Shape`` gives a tensor, and ``Reshape``/``Slice`` read it back with
  ``.tolist()``/``.numpy()``, which torch.export cannot trace. Here a shape value is a Python list
  of ints and SymInts (a rank-0 shape value a Python int), so a ``Shape → Slice → Squeeze →
  Unsqueeze → Concat → Reshape`` chain stays symbolic. The ops that follow shape values are
  :data:`SHAPE_OPS`; :func:`shape_value_users` lists any other op that consumes one (the importer
  refuses such a graph by name rather than converting it wrongly).
* **Constant operands read at run time.** ``Slice``, ``Reshape``, ``Resize`` and
  ``BatchNormalization`` take their parameters as inputs; when those are initializers they are
  baked into the module here (the ONNX graph fixes them, so nothing is lost).

BatchNormalization is also replaced because onnx2torch picks ``BatchNorm1d/2d/3d`` from the rank
that shape inference gives, which files with cleared ``value_info`` lack; inference-mode batch
norm does not need the rank. Resize modes that torch computes differently are refused (onnx2torch
only warns).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

SHAPE_OPS = ("Shape", "Identity", "Slice", "Squeeze", "Unsqueeze", "Concat", "Reshape", "Cast")
_TORCH_RESIZE = {
    ("nearest", 2): "nearest",
    ("linear", 1): "linear",
    ("linear", 2): "bilinear",
    ("linear", 3): "trilinear",
}


def shape_value_users(model: Any) -> list[str]:
    """``op_type (node 'name')`` for each node that consumes a shape value and is not in :data:`SHAPE_OPS`
    (a shape value: an output of ``Shape`` or of a shape op fed by one; ``Reshape``'s output is data)."""
    shape_vals: set[str] = set()
    bad = []
    for n in model.graph.node:
        fed = [i for i in n.input if i in shape_vals]
        if n.op_type == "Shape":
            shape_vals.update(n.output)
        elif fed and n.op_type == "Reshape" and n.input[0] not in shape_vals:
            continue
        elif fed and n.op_type in SHAPE_OPS:
            shape_vals.update(n.output)
        elif fed:
            bad.append(f"{n.op_type} (node {n.name!r})")
    return bad


# ---------------------------------------------------------------------------------------------
# modules


class ShapeOf(torch.nn.Module):
    def __init__(self, start: int, end: int | None) -> None:
        super().__init__()
        self.start, self.end = start, end

    def forward(self, x: torch.Tensor) -> list[Any]:
        return list(x.shape[self.start : self.end])


class PassShape(torch.nn.Module):
    """Identity/Cast on a shape value (unchanged); on a tensor, the wrapped module."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Any) -> Any:
        return x if isinstance(x, list | int | torch.SymInt) else self.inner(x)


class ConstantSlice(torch.nn.Module):
    """ONNX Slice with constant starts/ends/axes/steps (positive steps), on a tensor or a shape value."""

    def __init__(self, specs: Sequence[tuple[int, int, int, int]]) -> None:
        super().__init__()
        # (axis, start, end, step); ONNX spells "to the end" as a huge end (INT64_MAX), which backends
        # would carry into shape arithmetic: it becomes None, as does a start before any element
        big = 2**62
        self.specs = [(a, None if s <= -big else s, None if abs(e) >= big else e, st) for a, s, e, st in specs]

    def forward(self, x: Any) -> Any:
        if isinstance(x, list):
            (axis, start, end, step), *rest = self.specs
            assert axis in (0, -1) and not rest, "a shape value is one-dimensional"
            return x[start:end:step]
        index: list[Any] = [slice(None)] * x.dim()
        for axis, start, end, step in self.specs:
            index[axis] = slice(start, end, step)
        return x[tuple(index)]


class ShapeSqueeze(torch.nn.Module):
    """Squeeze/Unsqueeze along axis 0 of a shape value; on a tensor, the wrapped module."""

    def __init__(self, inner: torch.nn.Module, unsqueeze: bool) -> None:
        super().__init__()
        self.inner, self.unsqueeze = inner, unsqueeze

    def forward(self, x: Any, *rest: Any) -> Any:
        if self.unsqueeze and isinstance(x, int | torch.SymInt):
            return [x]
        if not self.unsqueeze and isinstance(x, list):
            if len(x) != 1:
                raise ValueError(f"Squeeze of a shape value of length {len(x)}")
            return x[0]
        return self.inner(x, *rest)


class ShapeConcat(torch.nn.Module):
    """Concat along axis 0 where any operand is a shape value; constant operands baked in."""

    def __init__(self, inner: torch.nn.Module, template: Sequence[list[int] | None]) -> None:
        super().__init__()
        self.inner, self.template = inner, list(template)  # None: the next run-time input

    def forward(self, *xs: Any) -> Any:
        it = iter(xs)
        parts = [next(it) if t is None else t for t in self.template]
        if not any(isinstance(p, list | int | torch.SymInt) for p in parts):
            return self.inner(*[torch.as_tensor(p) if isinstance(p, list) else p for p in parts])
        out: list[Any] = []
        for p in parts:
            out.extend(p if isinstance(p, list) else [p] if isinstance(p, int | torch.SymInt) else p.tolist())
        return out


class ShapeReshape(torch.nn.Module):
    """ONNX Reshape (allowzero=0) to a constant shape or a shape value: 0 copies the input's dim."""

    def __init__(self, shape: list[int] | None) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor, shape: Any = None) -> torch.Tensor:
        target = self.shape if self.shape is not None else shape
        if isinstance(target, torch.Tensor):
            target = target.tolist()
        dims = [x.shape[i] if isinstance(d, int) and d == 0 else d for i, d in enumerate(target)]
        return torch.reshape(x, dims)


class InferenceBatchNorm(torch.nn.Module):
    """ONNX BatchNormalization in inference mode, any rank (channels on dim 1)."""

    def __init__(self, scale: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float):
        super().__init__()
        self.register_buffer("weight", scale)
        self.register_buffer("bias", bias)
        self.register_buffer("running_mean", mean)
        self.register_buffer("running_var", var)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class ConstantResize(torch.nn.Module):
    """ONNX Resize whose scales or sizes are constants (spatial dims only)."""

    def __init__(self, mode: str, align_corners: bool | None, scales: list[float] | None, sizes: list[int] | None):
        super().__init__()
        self.mode, self.align_corners, self.scales, self.sizes = mode, align_corners, scales, sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(
            x, size=self.sizes, scale_factor=self.scales, mode=self.mode, align_corners=self.align_corners
        )


# ---------------------------------------------------------------------------------------------
# converters: (node, graph, original converter) -> OperationConverterResult


def _const(graph: Any, name: str) -> torch.Tensor | None:
    return graph.initializers[name].to_torch() if name and name in graph.initializers else None


def _result(module: torch.nn.Module, inputs: Sequence[str], node: Any) -> Any:
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    return OperationConverterResult(
        torch_module=module, onnx_mapping=OnnxMapping(inputs=tuple(inputs), outputs=node.output_values)
    )


def _shape(node: Any, graph: Any, original: Callable) -> Any:
    a = node.attributes
    end = a.get("end")
    return _result(ShapeOf(int(a.get("start", 0)), None if end is None else int(end)), node.input_values[:1], node)


def _pass(node: Any, graph: Any, original: Callable) -> Any:
    res = original(node, graph)
    return _result(PassShape(res.torch_module), res.onnx_mapping.inputs, node)


def _slice(node: Any, graph: Any, original: Callable) -> Any:
    ins = list(node.input_values)
    if len(ins) < 3:  # opset < 10: attributes, onnx2torch's converter bakes them already
        return original(node, graph)
    params = [_const(graph, n) for n in ins[1:5]]
    if any(p is None for p, n in zip(params, ins[1:5]) if n):
        return original(node, graph)
    starts, ends = params[0].tolist(), params[1].tolist()  # type: ignore[union-attr]
    axes = params[2].tolist() if len(ins) > 3 and ins[3] else list(range(len(starts)))  # type: ignore[union-attr]
    steps = params[3].tolist() if len(ins) > 4 and ins[4] else [1] * len(starts)  # type: ignore[union-attr]
    if any(s <= 0 for s in steps):
        raise NotImplementedError(f"Slice node {node.name!r}: steps {steps} (only positive steps are converted)")
    return _result(ConstantSlice(list(zip(axes, starts, ends, steps))), ins[:1], node)


def _squeeze(unsqueeze: bool) -> Callable:
    def convert(node: Any, graph: Any, original: Callable) -> Any:
        res = original(node, graph)
        axes = node.attributes.get("axes")
        if axes is None and len(node.input_values) > 1:
            c = _const(graph, node.input_values[1])
            axes = None if c is None else c.tolist()
        if axes is not None and list(axes) == [0]:
            return _result(ShapeSqueeze(res.torch_module, unsqueeze), res.onnx_mapping.inputs, node)
        return res

    return convert


def _concat(node: Any, graph: Any, original: Callable) -> Any:
    res = original(node, graph)
    if int(node.attributes.get("axis", 0)) != 0:
        return res
    template: list[list[int] | None] = []
    dynamic = []
    for name in node.input_values:
        c = _const(graph, name)
        if c is not None and c.dim() <= 1 and not c.is_floating_point():
            template.append([int(v) for v in c.reshape(-1).tolist()])
        else:
            template.append(None)
            dynamic.append(name)
    return _result(ShapeConcat(res.torch_module, template), dynamic, node)


def _reshape(node: Any, graph: Any, original: Callable) -> Any:
    if int(node.attributes.get("allowzero", 0)):
        return original(node, graph)
    c = _const(graph, node.input_values[1])
    if c is not None:
        return _result(ShapeReshape([int(v) for v in c.tolist()]), node.input_values[:1], node)
    return _result(ShapeReshape(None), node.input_values[:2], node)


def _batch_norm(node: Any, graph: Any, original: Callable) -> Any:
    ins = node.input_values
    params = [_const(graph, v) for v in ins[1:5]]
    if len(node.output_values) != 1 or any(p is None for p in params):
        return original(node, graph)
    scale, bias, mean, var = params
    eps = float(node.attributes.get("epsilon", 1e-5))
    return _result(InferenceBatchNorm(scale, bias, mean, var, eps), ins[:1], node)  # type: ignore[arg-type]


def _resize(node: Any, graph: Any, original: Callable) -> Any:
    ins = list(node.input_values) + [""] * (4 - len(node.input_values))
    scales, sizes = _const(graph, ins[2]), _const(graph, ins[3])
    if scales is not None and not scales.numel():
        scales = None
    if sizes is not None and not sizes.numel():
        sizes = None
    if scales is None and sizes is None:
        return original(node, graph)
    a = node.attributes
    mode, ctm = a.get("mode", "nearest"), a.get("coordinate_transformation_mode", "half_pixel")
    what = f"Resize node {node.name!r}"
    spec = sizes if sizes is not None else scales
    assert spec is not None
    rank = int(spec.numel()) - 2
    if rank < 1 or (sizes is None and spec[:2].tolist() != [1.0, 1.0]):
        raise NotImplementedError(f"{what}: resizes the batch or channel dimension, or has no spatial dims")
    if (mode, rank) not in _TORCH_RESIZE:
        raise NotImplementedError(f"{what}: mode {mode!r} on {rank} spatial dims has no torch equivalent")
    if mode == "nearest" and (a.get("nearest_mode", "round_prefer_floor") != "floor" or ctm != "asymmetric"):
        raise NotImplementedError(f"{what}: torch's nearest is nearest_mode=floor with asymmetric coordinates")
    if mode == "linear" and ctm not in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        raise NotImplementedError(f"{what}: coordinate_transformation_mode {ctm!r} has no torch equivalent")
    align = None if mode == "nearest" else ctm == "align_corners"
    torch_mode = _TORCH_RESIZE[(mode, rank)]
    if sizes is not None:
        mod = ConstantResize(torch_mode, align, None, [int(v) for v in sizes[2:].tolist()])
    else:
        mod = ConstantResize(torch_mode, align, [float(v) for v in spec[2:].tolist()], None)
    return _result(mod, ins[:1], node)


CONVERTERS: dict[str, Callable[[Any, Any, Callable], Any]] = {
    "Shape": _shape,
    "Identity": _pass,
    "Cast": _pass,
    "Slice": _slice,
    "Squeeze": _squeeze(unsqueeze=False),
    "Unsqueeze": _squeeze(unsqueeze=True),
    "Concat": _concat,
    "Reshape": _reshape,
    "BatchNormalization": _batch_norm,
    "Resize": _resize,
}


def register() -> None:
    """Wrap onnx2torch's converters for the op types in :data:`CONVERTERS` (every registered opset).
    ``add_converter`` refuses to replace an entry, so the registry's table is updated directly."""
    from onnx2torch.node_converters import registry

    table = registry._CONVERTER_REGISTRY
    for desc, fn in list(table.items()):
        ours = CONVERTERS.get(desc.operation_type) if desc.domain in ("", "ai.onnx") else None
        if ours is not None and not getattr(fn, "_qcompile", False):
            wrapped = functools.partial(ours, original=fn)
            wrapped._qcompile = True  # type: ignore[attr-defined]
            table[desc] = wrapped
