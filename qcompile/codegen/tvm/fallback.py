"""The torch fallback: a node the TVM backend declines runs its torch implementation from the VM.

Each such node becomes a packed function (``qcompile.fallback.<entry>.<node>``) called with
``call_dps_packed``: its tensor arguments in, one destination tensor per result. Only nodes whose op
has no converter, or that a converter declines (:class:`~.rules.NoRule`), fall back, and only when
the plan sets ``fallback: torch``; loading an artifact registers them again.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import tvm
import tvm_ffi

_FALLBACKS: dict[str, fx.Node] = {}


def fallback_name(entry: str, node: str) -> str:
    return f"qcompile.fallback.{entry}.{node}"


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """The node's tensor arguments, in order (what the packed function receives)."""
    return [a for a in node.args if isinstance(a, fx.Node)]


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
