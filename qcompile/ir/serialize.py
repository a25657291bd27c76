"""JSON (de)serialization of an entry's fx graph — no pickle, no code from data.

Each node becomes ``{"name", "op", "target", "args", "kwargs", "path"}``. Call targets are ATen /
qcompile op overloads (``"op:aten::linear.default"``) or Python functions (``"fn:_operator.mul"``),
and both directions accept only the explicit allow-list of :mod:`qcompile.ir.allowed_ops`: saving
refuses anything else (so what saves also loads), loading raises :class:`ArtifactError` naming the
node and target. Arguments are JSON scalars, node references, lists/tuples/dicts, dtypes, devices,
layouts, memory formats and slices, each tagged so loading is exact.

A loaded graph becomes an ``fx.GraphModule``, whose Python source fx generates from node names and
keyword names, so those must be plain identifiers (and keywords must be the op's own). Arguments
are bounded: nesting depth :data:`MAX_ARG_DEPTH`, 64-bit integers, strings of at most
:data:`MAX_STR` characters.
"""

from __future__ import annotations

import keyword
import math
import re
from typing import Any

import torch
import torch.fx as fx

from qcompile.errors import ArtifactError
from qcompile.ir.allowed_ops import ATEN_OPS, FUNCTIONS, QCOMPILE_OPS
from qcompile.ir.program import PATH_KEY

MAX_ARG_DEPTH = 16
MAX_STR = 4096
MAX_NODES = 1_000_000
_INT64 = (-(2**63), 2**63 - 1)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")
_OPS = {"aten": ATEN_OPS, "qcompile": QCOMPILE_OPS}
# globals of the Python source fx generates for a graph (torch/fx/graph.py: _register_custom_builtin), plus the
# modules of the listed functions: a node of one of these names would shadow it
_FX_NAMES = frozenset({"inf", "nan", "NoneType", "torch", "device", "fx_pytree", "pytree", "operator", "math", "self"})
_FLOATS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
_DEVICES = ("cpu", "cuda")
_LAYOUTS = {str(v): v for v in (torch.strided,)}
_FORMATS = {
    str(v): v for v in (torch.contiguous_format, torch.channels_last, torch.preserve_format, torch.channels_last_3d)
}
_DTYPES = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)}


def _functions() -> dict[str, Any]:
    import math as _math
    import operator

    modules = {"_operator": operator, "math": _math, "torch": torch}
    return {name: getattr(modules[name.rsplit(".", 1)[0]], name.rsplit(".", 1)[1]) for name in FUNCTIONS}


_FUNCS = _functions()
_FUNC_NAMES = {id(f): name for name, f in _FUNCS.items()}


def _target_to_str(target: Any, where: str) -> str:
    if isinstance(target, torch._ops.OpOverload):
        ns, rest = target.name().split("::", 1)
        name, _, overload = rest.partition(".")
        key = f"{name}.{overload or 'default'}"
        if key in _OPS.get(ns, ()):
            return f"op:{ns}::{key}"
        raise ArtifactError(
            f"cannot save {where}: it calls {ns}::{key}, which is not on the list of operators an artifact may "
            "call (qcompile/ir/allowed_ops.py); run the model with backend='torch' without saving, or rewrite the "
            "model so it exports to listed operators"
        )
    name = _FUNC_NAMES.get(id(target))
    if name is not None:
        return f"fn:{name}"
    raise ArtifactError(
        f"cannot save {where}: it calls {target!r}, which is not an ATen/qcompile operator or a shape function "
        "on the list of what an artifact may call (qcompile/ir/allowed_ops.py)"
    )


def _target_from_str(s: Any, where: str) -> Any:
    """The callable for ``s`` if the allow-list has it; otherwise an ArtifactError naming ``where``."""
    if isinstance(s, str):
        kind, _, body = s.partition(":")
        if kind == "fn" and body in _FUNCS:
            return _FUNCS[body]
        if kind == "op" and "::" in body:
            ns, key = body.split("::", 1)
            if key in _OPS.get(ns, ()):
                name, overload = key.rsplit(".", 1)
                return getattr(getattr(getattr(torch.ops, ns), name), overload)
    raise ArtifactError(
        f"{where} calls {str(s)[:200]!r}, which is not on the list of operators and shape functions an artifact "
        "may call (qcompile/ir/allowed_ops.py); the artifact was not written by qcompile or was altered. "
        "Nothing from it was run"
    )


def _enc(x: Any) -> Any:
    if isinstance(x, fx.Node):
        return {"node": x.name}
    if x is None or isinstance(x, (bool, str, int)):
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


def _malformed(what: str, x: Any) -> ArtifactError:
    return ArtifactError(f"malformed graph argument ({what}): {str(x)[:200]}")


def _dec(x: Any, env: dict[str, fx.Node], depth: int = 0) -> Any:
    if depth > MAX_ARG_DEPTH:
        raise _malformed(f"nested deeper than {MAX_ARG_DEPTH}", "...")
    if x is None or isinstance(x, (bool, float)):
        return x
    if isinstance(x, int):
        if not _INT64[0] <= x <= _INT64[1]:
            raise _malformed("integer out of the 64-bit range", x)
        return x
    if isinstance(x, str):
        if len(x) > MAX_STR:
            raise _malformed(f"string longer than {MAX_STR}", x)
        return x
    if not isinstance(x, dict) or len(x) != 1:
        raise _malformed("not a tagged value", x)
    ((tag, v),) = x.items()
    if tag == "node":
        if not isinstance(v, str) or v not in env:
            raise ArtifactError(f"graph refers to node {str(v)[:200]!r} before it is defined")
        return env[v]
    if tag in ("list", "tuple", "slice") and isinstance(v, list):
        items = [_dec(a, env, depth + 1) for a in v]
        if tag == "slice":
            if len(items) != 3:
                raise _malformed("a slice has three parts", v)
            return slice(*items)
        return items if tag == "list" else tuple(items)
    if tag == "dict" and isinstance(v, list):
        out = {}
        for pair in v:
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], (str, int))):
                raise _malformed("dict items are [key, value] with a string or integer key", pair)
            out[_dec(pair[0], env, depth + 1)] = _dec(pair[1], env, depth + 1)
        return out
    table: dict[str, Any] | None = {
        "float": _FLOATS,
        "dtype": _DTYPES,
        "layout": _LAYOUTS,
        "memory_format": _FORMATS,
    }.get(tag)
    if table is not None and isinstance(v, str) and v in table:
        return table[v]
    if tag == "device" and isinstance(v, str) and _device_ok(v):
        return torch.device(v)
    raise _malformed(f"unknown tag {str(tag)[:50]!r} or bad value", x)


def _device_ok(v: str) -> bool:
    kind, _, index = v.partition(":")
    return kind in _DEVICES and (index == "" or (index.isdigit() and len(index) <= 3))


def graph_to_json(gm: fx.GraphModule) -> dict[str, Any]:
    nodes = []
    for n in gm.graph.nodes:
        if n.op not in ("placeholder", "call_function", "output"):
            raise ArtifactError(f"cannot serialize node %{n.name}: op {n.op!r}")
        nodes.append(
            {
                "name": _identifier(n.name, "node name"),
                "op": n.op,
                "target": _target_to_str(n.target, f"node %{n.name}") if n.op == "call_function" else str(n.target),
                "args": _enc(tuple(n.args)),
                "kwargs": _enc(dict(n.kwargs)),
                "path": n.meta.get(PATH_KEY, ""),
            }
        )
    return {"nodes": nodes}


def _identifier(name: Any, what: str) -> str:
    if not isinstance(name, str) or not _IDENT.fullmatch(name) or keyword.iskeyword(name) or name in _FX_NAMES:
        raise ArtifactError(
            f"artifact graph has a {what} {str(name)[:200]!r} that is not a plain Python identifier, or is one "
            f"of the names fx's generated code uses ({', '.join(sorted(_FX_NAMES))}); fx turns names into Python "
            "source, so anything else is refused"
        )
    return name


def _keep_name(graph: fx.Graph, node: fx.Node, name: str) -> None:
    """Give ``node`` its saved name. fx renames nodes named after Python builtins (``input``, ``abs``)
    that torch.export itself produces; the names reach the backend, so a rebuild needs them as saved.
    Shadowing a builtin in fx's generated code is harmless; the names fx's code relies on are not."""
    if node.name != name:
        node.name = name
        graph._graph_namespace._used_names.add(name)
    if node.op == "placeholder":
        node.target = name  # the generated forward's parameter


def _check_kwargs(target: Any, kwargs: dict[Any, Any], where: str) -> None:
    """Keyword names become Python source: they must be the op's own argument names."""
    allowed = {a.name for a in target._schema.arguments} if isinstance(target, torch._ops.OpOverload) else set()
    for k in kwargs:
        if not isinstance(k, str) or k not in allowed:
            raise ArtifactError(f"{where} passes keyword {str(k)[:200]!r}, which {target} does not take")


def graph_from_json(data: Any) -> fx.GraphModule:
    """The graph ``graph_to_json`` wrote; anything else raises :class:`ArtifactError` before any of it runs."""
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list):
        raise ArtifactError("artifact graph is malformed: it has no list of nodes")
    if len(data["nodes"]) > MAX_NODES:
        raise ArtifactError(f"artifact graph has {len(data['nodes'])} nodes, more than {MAX_NODES}")
    outputs = 0
    for item in data["nodes"]:
        if not isinstance(item, dict):
            raise ArtifactError(f"artifact graph is malformed: node {str(item)[:100]!r} is not an object")
        name = _identifier(item.get("name"), "node name")
        where = f"artifact graph node %{name}"
        op = item.get("op")
        path = item.get("path", "")
        if not isinstance(path, str) or len(path) > MAX_STR:
            raise ArtifactError(f"{where} has a malformed module path")
        if op != "output" and name in env:
            raise ArtifactError(f"duplicate node name {name!r} in artifact graph")
        if op == "placeholder":
            node = graph.placeholder(name)
        elif op == "call_function":
            target = _target_from_str(item.get("target"), where)
            args = _dec(item.get("args"), env)
            kwargs = _dec(item.get("kwargs"), env)
            if not isinstance(args, tuple) or not isinstance(kwargs, dict):
                raise ArtifactError(f"{where}: args must be a tuple and kwargs a dict")
            _check_kwargs(target, kwargs, where)
            node = graph.create_node("call_function", target, args, kwargs, name=name)
        elif op == "output":
            out = _dec(item.get("args"), env)
            if not isinstance(out, tuple) or len(out) != 1:
                raise ArtifactError(f"{where}: the output node takes one argument")
            node = graph.output(out[0])
            outputs += 1
        else:
            raise ArtifactError(f"{where} has unknown op {str(op)[:50]!r}")
        node.meta[PATH_KEY] = path
        if op != "output":
            _keep_name(graph, node, name)
            env[name] = node
    if outputs != 1:
        raise ArtifactError(f"artifact graph has {outputs} output nodes, not one")
    return fx.GraphModule(torch.nn.Module(), graph)


__all__ = ["MAX_ARG_DEPTH", "graph_from_json", "graph_to_json"]
