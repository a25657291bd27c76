"""Graph matching for 2-D convolutions: what ``torch.export`` emits for ``nn.Conv2d``.

Capture gives ``aten.conv2d.default(x, weight, bias=None, stride=[1, 1], padding=[0, 0],
dilation=[1, 1], groups=1)`` with trailing defaults left out (``aten.conv2d.padding`` when the
padding is a string such as ``"same"``). :func:`find_convs` yields every one of them with its
arguments normalized, and, for each that a rewrite cannot take, the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.fx as fx

from qcompile.ir.patterns import state_key
from qcompile.ir.program import PATH_KEY, Entry, Program

aten = torch.ops.aten
CONV_TARGETS = (aten.conv2d.default, aten.conv2d.padding)


def _pair(v: object, default: int) -> list[int]:
    if v is None:
        return [default, default]
    vals = [int(i) for i in v] if isinstance(v, (list, tuple)) else [int(v)]  # type: ignore[call-overload]
    return vals * 2 if len(vals) == 1 else vals


@dataclass(frozen=True)
class ConvMatch:
    """One ``aten.conv2d``; ``reason`` is empty when its weight (and bias) are Program constants and
    its arguments are plain integers (then ``weight_key`` is set)."""

    entry: Entry
    node: fx.Node
    weight_key: str | None
    bias: fx.Node | None
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int
    reason: str = ""

    @property
    def path(self) -> str:
        return str(self.node.meta.get(PATH_KEY, ""))

    @property
    def x(self) -> fx.Node:
        return self.node.args[0]  # type: ignore[return-value]


def find_convs(program: Program) -> Iterator[ConvMatch]:
    """Every ``aten.conv2d`` node, in graph order over all entries."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    for entry in program.entries.values():
        bindings = entry.bindings()
        for node in list(entry.graph.graph.nodes):
            if node.op != "call_function" or node.target not in CONV_TARGETS:
                continue
            args = list(node.args) + [node.kwargs.get(n) for n in names[len(node.args) :]]
            _, w, b, stride, padding, dilation, groups = args[:7]
            wkey = state_key(bindings, w)
            reason = ""
            if node.target == aten.conv2d.padding or isinstance(padding, str):
                reason = f"padding {padding!r} is a string, not integers"
                padding = None
            elif wkey is None:
                reason = "its weight is not a constant"
            elif program.state[wkey].dim() != 4:
                reason = f"its weight has shape {list(program.state[wkey].shape)}, not [O, C/groups, kh, kw]"
            elif b is not None and state_key(bindings, b) is None:
                reason = "its bias is not a constant"
            yield ConvMatch(
                entry,
                node,
                wkey if not reason else None,
                b,
                _pair(stride, 1),
                _pair(padding, 0),
                _pair(dilation, 1),
                int(groups or 1),
                reason,
            )
