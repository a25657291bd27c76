"""Graph matchers: find structures (linears, ...) by what the graph does, not by names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.fx as fx

from qcompile.ir.program import PATH_KEY, Entry, Program, Slot, SlotKind

aten = torch.ops.aten


@dataclass(frozen=True)
class LinearMatch:
    """``aten.linear(x, W, b)`` whose weight (and bias) are Program state tensors."""

    entry: Entry
    node: fx.Node
    weight_key: str
    bias_key: str | None

    @property
    def path(self) -> str:
        return str(self.node.meta.get(PATH_KEY, ""))


def state_key(bindings: dict[fx.Node, Slot], arg: object) -> str | None:
    """The state key bound to ``arg`` when it is a STATE placeholder (``bindings``: ``Entry.bindings()``)."""
    slot = bindings.get(arg) if isinstance(arg, fx.Node) else None
    return slot.name if slot is not None and slot.kind is SlotKind.STATE else None


def find_linears(program: Program) -> Iterator[LinearMatch]:
    """Every ``aten.linear`` with a constant 2-D weight, in graph order, over all entries."""
    for entry in program.entries.values():
        bindings = entry.bindings()
        for node in list(entry.graph.graph.nodes):
            if node.op != "call_function" or node.target != aten.linear.default:
                continue
            wkey = state_key(bindings, node.args[1])
            if wkey is None or program.state[wkey].dim() != 2:
                continue
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            bkey = state_key(bindings, bias) if bias is not None else None
            if bias is not None and bkey is None:
                continue
            yield LinearMatch(entry, node, wkey, bkey)
