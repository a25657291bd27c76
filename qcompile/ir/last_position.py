"""Prefill computes the last position's logits only.

``generate`` reads one row of the prefill's logits, the last; a graph as captured computes all
``T`` rows, and the LM head's ``T × vocab`` product is the largest single matmul of a long prompt's
prefill (SmolLM2-135M, 128 tokens: ~39 ms of ~160 ms on 2 cores). This rewrite makes the prefill
entry return ``logits[:, -1:]`` computed from one row:

Walking back from the output, a node joins the *tail* when it works on each position alone
(elementwise ops, casts, a reduction over the last dim, a linear or quantized linear, a Hadamard
transform, a static activation quantizer) and every user of its value is in the tail. Every
value entering the tail along the sequence dim is sliced to its last row there. On a decoder this
is the final norm, the LM head and, further back, the last layer's MLP and output projection (the
attention itself mixes positions and stays whole; so does anything a cache write reads).

It is applied by ``compile`` after the plan's passes (which match one form of every entry), to both
backends alike; ``forward`` keeps every position for evaluation. Anything that stops the rewrite
(no single ``[1, T, vocab]`` output, a tail that is not found) leaves the entry as it was and says why.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from qcompile.ir.program import Program, SlotKind

aten = torch.ops.aten
ENTRY = "prefill"
META_KEY = "prefill_logits"

# one output per position from that position's input row alone (other operands must not carry the sequence dim)
_ROWWISE: frozenset[Any] = frozenset(
    {
        aten.add.Tensor,
        aten.sub.Tensor,
        aten.mul.Tensor,
        aten.div.Tensor,
        aten.neg.default,
        aten.pow.Tensor_Scalar,
        aten.rsqrt.default,
        aten.sqrt.default,
        aten.tanh.default,
        aten.sigmoid.default,
        aten.silu.default,
        aten.gelu.default,
        aten.relu.default,
        aten.exp.default,
        aten.clamp.default,
        aten.to.dtype,
        aten._to_copy.default,
        aten.alias.default,
        aten.clone.default,
        aten.linear.default,
    }
)
_LAST_DIM_REDUCTIONS: frozenset[Any] = frozenset({aten.mean.dim, aten.sum.dim_IntList, aten.amax.default})
# qcompile's ops that quantize activations per token (or per static channel step) and act on the last dim
_QCOMPILE_ROWWISE = (
    "linear_w8a8",
    "quant_linear",
    "packed_linear",
    "quest_linear",
    "linear_static",
    "quantize_static",
    "dequantize_static",
    "hadamard",
)


def _rowwise_targets() -> frozenset[Any]:
    ops = torch.ops.qcompile
    return _ROWWISE | frozenset(getattr(ops, name).default for name in _QCOMPILE_ROWWISE if hasattr(ops, name))


def _shape(node: Any) -> tuple[Any, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _symbolic(node: Any) -> bool:
    """``node``'s value has a dim that depends on the sequence length (any symbolic dim does here)."""
    shape = _shape(node)
    return shape is not None and any(isinstance(d, torch.SymInt) for d in shape)


def _rows_at(shape: tuple[Any, ...], seq: Any, rank: int) -> bool:
    """The only symbolic dim is the sequence, at index 1 of a tensor of ``rank`` dims."""
    symbolic = [i for i, d in enumerate(shape) if isinstance(d, torch.SymInt)]
    return len(shape) == rank and symbolic == [1] and str(shape[1]) == str(seq)


def _is_shape_free_assert(node: fx.Node) -> bool:
    return node.target == aten._assert_tensor_metadata.default and node.kwargs.get("size") is None


def _rowwise(node: fx.Node, seq: Any, targets: frozenset[Any]) -> bool:
    """``node`` computes position ``t`` of its output from position ``t`` of its inputs alone."""
    out = _shape(node)
    if out is None or not _rows_at(out, seq, len(out)):
        return False
    if node.target in _LAST_DIM_REDUCTIONS:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        rank = len(out)
        if not isinstance(dims, list | tuple) or [d % rank for d in dims] != [rank - 1]:
            return False
    elif node.target not in targets:
        return False
    for arg in node.all_input_nodes:
        if "val" not in arg.meta:
            return False  # an operand of unknown shape might carry the sequence dim
        shape = _shape(arg)
        if shape is not None and _symbolic(arg) and not _rows_at(shape, seq, len(out)):
            return False  # the sequence dim elsewhere: broadcasting would not keep rows apart
    return True


def trim_prefill_logits(program: Program) -> tuple[bool, str]:
    """Rewrite ``program``'s prefill entry to return the last position's logits (see the module
    docstring). Returns whether its prefill returns the last position's logits now, and a one-line
    note of what was done or why the entry was left as it was ("" when there is no prefill entry)."""
    entry = program.entries.get(ENTRY)
    if entry is None or program.meta.get("kind") != "causal_lm":
        return False, ""
    if program.meta.get(META_KEY) == "last":
        return True, "prefill returns the last position's logits (already)"
    graph = entry.graph.graph
    state = {
        node: program.state[slot.name]
        for slot, node in zip(entry.slots, entry.placeholders())
        if slot.kind is SlotKind.STATE and slot.name in program.state
    }
    _fill_missing_values(entry.graph, state)
    output = next(n for n in graph.nodes if n.op == "output")
    outs = [a for a in torch.utils._pytree.tree_leaves(output.args) if isinstance(a, fx.Node)]
    shape = _shape(outs[0]) if len(outs) == 1 else None
    if shape is None or len(shape) != 3 or isinstance(shape[1], int):
        return False, f"prefill keeps every position's logits: its output is not one [1, T, vocab] tensor ({shape})"
    seq, head = shape[1], outs[0]
    targets = _rowwise_targets()
    tail: set[fx.Node] = set()
    candidates = {head}
    for node in reversed(list(graph.nodes)):  # users before producers
        if node not in candidates or not _rowwise(node, seq, targets):
            continue
        if any(u not in tail and u is not output and not _is_shape_free_assert(u) for u in node.users):
            continue
        if node is not head and output in node.users:
            continue
        tail.add(node)
        candidates.update(a for a in node.all_input_nodes if _symbolic(a))
    if head not in tail:
        return False, f"prefill keeps every position's logits: {head.name} ({head.target}) does not work row by row"
    entering = [n for n in graph.nodes if n not in tail and _symbolic(n) and any(u in tail for u in n.users)]
    for node in entering:
        with graph.inserting_after(node):
            last = graph.call_function(aten.slice.Tensor, (node, 1, -1, torch.iinfo(torch.int64).max))
        node.replace_all_uses_with(last, delete_user_cb=lambda u: u in tail)
        last.meta["val"] = node.meta["val"][:, -1:]
    _repropagate(entry.graph, tail)
    entry.graph.recompile()
    program.meta[META_KEY] = "last"
    rows = sum(1 for n in tail if n.target not in (aten.alias.default, aten._assert_tensor_metadata.default))
    return True, f"prefill returns the last position's logits: {rows} op(s) after {len(entering)} cut(s) run on one row"


def _fake_mode(gm: fx.GraphModule) -> Any:
    mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"])
    if mode is None:
        raise RuntimeError("the prefill graph has no fake values to derive shapes from")
    return mode


def _fill_missing_values(gm: fx.GraphModule, state: dict[fx.Node, torch.Tensor]) -> None:
    """Fake values for the nodes passes added without one (constants, state inputs, their ops), so
    that the walk sees every operand's shape; a node whose value cannot be derived stays without."""
    mode = _fake_mode(gm)
    with mode:
        for node in gm.graph.nodes:
            if "val" in node.meta:
                continue
            if node.op == "get_attr":
                node.meta["val"] = mode.from_tensor(operator.attrgetter(str(node.target))(gm), static_shapes=True)
            elif node.op == "placeholder" and node in state:
                node.meta["val"] = mode.from_tensor(state[node], static_shapes=True)
            elif node.op == "call_function" and all("val" in a.meta for a in node.all_input_nodes):
                try:
                    node.meta["val"] = _run(node)
                except RuntimeError:  # no fake kernel, or a data-dependent shape: its value stays unknown
                    continue


def _run(node: fx.Node) -> Any:
    def val(a: Any) -> Any:
        return a.meta["val"] if isinstance(a, fx.Node) else a

    return node.target(*fx.node.map_aggregate(node.args, val), **fx.node.map_aggregate(node.kwargs, val))


def _repropagate(gm: fx.GraphModule, tail: set[fx.Node]) -> None:
    """New fake values for the tail's nodes, in graph order, from their (now one-row) inputs."""
    with _fake_mode(gm):
        for node in gm.graph.nodes:
            if node in tail:
                node.meta["val"] = _run(node)
