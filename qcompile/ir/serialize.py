"""JSON (de)serialization of an entry's fx graph — no pickle, no code execution.

Each node becomes ``{"name", "op", "target", "args", "kwargs", "path"}``. Call targets are ATen /
qcompile op overloads (``"aten::linear.default"``) or functions of a small allow-list of modules
(``operator``, ``math``, ``builtins``, ``torch``: the symbolic-shape arithmetic ``torch.export``
emits). Arguments are JSON scalars, node references, lists/tuples, dtypes, devices, layouts,
memory formats and slices, each tagged so loading is exact.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch
import torch.fx as fx

from qcompile.errors import ArtifactError
from qcompile.ir.program import PATH_KEY

_FUNC_MODULES = ("operator", "_operator", "math", "builtins", "torch")
_LAYOUTS = {str(v): v for v in (torch.strided, torch.sparse_coo)}
_FORMATS = {
    str(v): v for v in (torch.contiguous_format, torch.channels_last, torch.preserve_format, torch.channels_last_3d)
}


def _target_to_str(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        ns, rest = target.name().split("::", 1)
        name, _, overload = rest.partition(".")
        return f"op:{ns}::{name}.{overload or 'default'}"
    mod = getattr(target, "__module__", None)
    qual = getattr(target, "__qualname__", getattr(target, "__name__", None))
    if mod in _FUNC_MODULES and qual and "." not in qual:
        return f"fn:{mod}.{qual}"
    raise ArtifactError(
        f"cannot serialize call target {target!r}: only ATen/qcompile ops and operator functions are supported"
    )


def _target_from_str(s: str) -> Any:
    kind, _, body = s.partition(":")
    try:
        if kind == "op":
            ns, rest = body.split("::", 1)
            name, overload = rest.rsplit(".", 1)
            return getattr(getattr(getattr(torch.ops, ns), name), overload)
        if kind == "fn":
            mod, name = body.rsplit(".", 1)
            if mod not in _FUNC_MODULES:
                raise ArtifactError(f"function module {mod!r} is not allowed")
            return getattr(importlib.import_module(mod), name)
    except (AttributeError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"unknown call target {s!r} in artifact graph ({e}); is this qcompile too old?") from None
    raise ArtifactError(f"malformed call target {s!r}")


def _enc(x: Any) -> Any:
    if isinstance(x, fx.Node):
        return {"node": x.name}
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, int):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else {"float": repr(x)}
    if isinstance(x, list):
        return {"list": [_enc(v) for v in x]}
    if isinstance(x, tuple):
        return {"tuple": [_enc(v) for v in x]}
    if isinstance(x, dict):
        return {"dict": [[k, _enc(v)] for k, v in x.items()]}
    if isinstance(x, torch.dtype):
        return {"dtype": str(x).removeprefix("torch.")}
    if isinstance(x, torch.device):
        return {"device": str(x)}
    if isinstance(x, torch.layout):
        return {"layout": str(x)}
    if isinstance(x, torch.memory_format):
        return {"memory_format": str(x)}
    if isinstance(x, slice):
        return {"slice": [_enc(x.start), _enc(x.stop), _enc(x.step)]}
    raise ArtifactError(f"cannot serialize graph argument {x!r} of type {type(x).__name__}")


def _dec(x: Any, env: dict[str, fx.Node]) -> Any:
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if not isinstance(x, dict) or len(x) != 1:
        raise ArtifactError(f"malformed graph argument {x!r}")
    ((tag, v),) = x.items()
    if tag == "node":
        if v not in env:
            raise ArtifactError(f"graph refers to node {v!r} before it is defined")
        return env[v]
    if tag == "float":
        return float(v)
    if tag == "list":
        return [_dec(a, env) for a in v]
    if tag == "tuple":
        return tuple(_dec(a, env) for a in v)
    if tag == "dict":
        return {k: _dec(a, env) for k, a in v}
    if tag == "dtype":
        dt = getattr(torch, v, None)
        if not isinstance(dt, torch.dtype):
            raise ArtifactError(f"unknown dtype {v!r}")
        return dt
    if tag == "device":
        return torch.device(v)
    if tag == "layout":
        return _LAYOUTS[v]
    if tag == "memory_format":
        return _FORMATS[v]
    if tag == "slice":
        return slice(*(_dec(a, env) for a in v))
    raise ArtifactError(f"unknown graph argument tag {tag!r}")


def graph_to_json(gm: fx.GraphModule) -> dict[str, Any]:
    nodes = []
    for n in gm.graph.nodes:
        if n.op not in ("placeholder", "call_function", "output"):
            raise ArtifactError(f"cannot serialize node %{n.name}: op {n.op!r}")
        nodes.append(
            {
                "name": n.name,
                "op": n.op,
                "target": _target_to_str(n.target) if n.op == "call_function" else str(n.target),
                "args": _enc(tuple(n.args)),
                "kwargs": _enc(dict(n.kwargs)),
                "path": n.meta.get(PATH_KEY, ""),
            }
        )
    return {"nodes": nodes}


def graph_from_json(data: dict[str, Any]) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    try:
        items = data["nodes"]
        for item in items:
            op = item["op"]
            if op == "placeholder":
                node = graph.placeholder(item["name"])
            elif op == "call_function":
                args = _dec(item["args"], env)
                kwargs = _dec(item["kwargs"], env)
                node = graph.create_node(
                    "call_function", _target_from_str(item["target"]), tuple(args), dict(kwargs), name=item["name"]
                )
            elif op == "output":
                (out,) = _dec(item["args"], env)
                node = graph.output(out)
            else:
                raise ArtifactError(f"unknown node op {op!r}")
            node.meta[PATH_KEY] = item.get("path", "")
            if op != "output":
                if node.name != item["name"]:
                    raise ArtifactError(f"duplicate node name {item['name']!r} in artifact graph")
                env[item["name"]] = node
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"artifact graph is malformed: {type(e).__name__}: {e}") from None
    gm = fx.GraphModule(torch.nn.Module(), graph)
    return gm


__all__ = ["graph_to_json", "graph_from_json"]
