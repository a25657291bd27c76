"""One spelling per construct: the rewrites capture applies so that every pass matches one form.

Decoder families spell the same computation differently. Two spellings hide linears from the
passes, and both are rewritten here, exactly (the same products, summed the same way), in every entry:

* **Conv1D** (GPT-2): ``view(addmm(b, view(x, [-1, K]), W), [*lead, N])`` with ``W`` stored as
  ``[K, N]`` becomes ``linear(x, Wᵀ, b)`` (the transposed weight is a new state tensor).
* **A matmul by a stored matrix** (ONNX ``MatMul`` with a weight initializer, as onnx2torch imports
  it): ``matmul(x, W)`` with ``W`` a 2-D state ``[K, N]`` becomes ``linear(x, Wᵀ)``, the same products.
* **Fused projections** (Phi-3's ``qkv_proj`` / ``gate_up_proj``, GPT-2's ``c_attn``, GPT-NeoX's
  ``query_key_value``): a linear whose output is used only to be cut into pieces along its output
  channels — ``slice``, ``split`` or ``chunk`` on the last dim, directly or after a ``view`` to
  ``[..., heads, head_dim]`` (and a ``transpose`` of leading dims) — becomes one linear per piece
  over the weight rows (and bias entries) that piece reads. Piece ``i`` (by first row) carries the
  module path ``<path>.part<i>`` and the state ``<weight key>.part<i>``, so plans and reports name it.

After this, SmoothQuant sees the norm → q/k/v group and the v → o pair, MergeQuant the producer of its
steps, and XQuant the K and V projections, whatever the family fused.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx

from qcompile.ir.program import PATH_KEY, Entry, Program, Slot, SlotKind

aten = torch.ops.aten

_VIEWS = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})
_SPLITS = frozenset({aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default})


def canonicalize(program: Program) -> list[str]:
    """Rewrite every entry of ``program`` in place; returns one note per rewritten module path."""
    notes: list[str] = []
    transposed: dict[str, str] = {}  # Conv1D weight key -> its transposed copy, shared by the entries
    pieces: dict[tuple[str, tuple[int, ...]], str] = {}  # (weight key, rows) -> piece key
    for entry in program.entries.values():
        changed = _addmm_to_linear(program, entry, transposed, notes)
        changed |= _matmul_to_linear(program, entry, transposed, notes)
        changed |= _split_fused(program, entry, pieces, notes)
        if changed:
            entry.remove_unused_placeholders()
            entry.graph.recompile()
    program.prune_state()
    return list(dict.fromkeys(notes))


def _state(bindings: dict[fx.Node, Slot], arg: object) -> str | None:
    slot = bindings.get(arg) if isinstance(arg, fx.Node) else None
    return slot.name if slot is not None and slot.kind is SlotKind.STATE else None


def _val(node: object) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _erase(graph: fx.Graph, nodes: Sequence[fx.Node]) -> None:
    for n in nodes:
        if not n.users:
            graph.erase_node(n)


# ---- Conv1D: addmm over flattened tokens -> linear -------------------------------------------------


def _addmm_to_linear(program: Program, entry: Entry, transposed: dict[str, str], notes: list[str]) -> bool:
    bindings = entry.bindings()
    graph = entry.graph.graph
    changed = False
    for mm in list(graph.nodes):
        if mm.op != "call_function" or mm.target != aten.addmm.default or len(mm.args) != 3 or mm.kwargs:
            continue
        bias, flat, weight = mm.args
        wkey, bkey = _state(bindings, weight), _state(bindings, bias)
        if wkey is None or bkey is None or program.state[wkey].dim() != 2 or program.state[bkey].dim() != 1:
            continue
        if not (isinstance(flat, fx.Node) and flat.target in _VIEWS and isinstance(flat.args[0], fx.Node)):
            continue
        x, xv, out = flat.args[0], _val(flat.args[0]), list(mm.users)
        k, n = program.state[wkey].shape
        if xv is None or xv.dim() < 2 or len(out) != 1 or out[0].target not in _VIEWS:
            continue
        ov = _val(out[0])
        if ov is None or ov.dim() != xv.dim() or int(ov.shape[-1]) != n or int(xv.shape[-1]) != k:
            continue
        if any(not _same_dim(a, b) for a, b in zip(ov.shape[:-1], xv.shape[:-1])):
            continue
        wt = _transposed_input(program, entry, transposed, wkey)
        with graph.inserting_before(out[0]):
            lin = graph.call_function(aten.linear.default, (x, wt, bias))
        lin.meta.update({key: v for key, v in out[0].meta.items() if key in ("val", "stack_trace")})
        lin.meta[PATH_KEY] = mm.meta.get(PATH_KEY, "")
        out[0].replace_all_uses_with(lin)
        _erase(graph, [out[0], mm, flat])
        notes.append(f"{lin.meta[PATH_KEY] or lin.name}: Conv1D (addmm with a [in, out] weight) as a linear")
        changed = True
    return changed


def _matmul_to_linear(program: Program, entry: Entry, transposed: dict[str, str], notes: list[str]) -> bool:
    bindings = entry.bindings()
    graph = entry.graph.graph
    changed = False
    for mm in list(graph.nodes):
        if mm.op != "call_function" or mm.target != aten.matmul.default or len(mm.args) != 2 or mm.kwargs:
            continue
        x, weight = mm.args
        wkey, xv = _state(bindings, weight), _val(x)
        if wkey is None or program.state[wkey].dim() != 2 or xv is None or xv.dim() < 2:
            continue
        if int(xv.shape[-1]) != int(program.state[wkey].shape[0]) or not program.state[wkey].is_floating_point():
            continue
        wt = _transposed_input(program, entry, transposed, wkey)
        with graph.inserting_before(mm):
            lin = graph.call_function(aten.linear.default, (x, wt))
        lin.meta.update({key: v for key, v in mm.meta.items() if key in ("val", "stack_trace", PATH_KEY)})
        mm.replace_all_uses_with(lin)
        graph.erase_node(mm)
        notes.append(f"{lin.meta.get(PATH_KEY) or lin.name}: matmul by a stored [in, out] matrix as a linear")
        changed = True
    return changed


def _transposed_input(program: Program, entry: Entry, transposed: dict[str, str], wkey: str) -> fx.Node:
    """The entry's input for ``Wᵀ`` of the 2-D state ``wkey``, stored once (``<key>.t``) for all entries."""
    if wkey not in transposed:
        transposed[wkey] = program.add_state(f"{wkey}.t", program.state[wkey].t().contiguous())
    return entry.state_input(transposed[wkey])


def _same_dim(a: object, b: object) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return str(a) == str(b)


# ---- fused projections -> one linear per piece ----------------------------------------------------


@dataclass
class _Piece:
    """One output of the cut: ``node`` (a slice or a split's getitem) reading ``lo:hi`` of the last dim."""

    node: fx.Node
    lo: int
    hi: int


def _cuts(node: fx.Node) -> list[_Piece] | None:
    """The pieces ``node``'s users cut it into along its last dim, or None when any use is something else."""
    val = _val(node)
    if val is None or not node.users:
        return None
    last, width = val.dim() - 1, int(val.shape[-1])
    pieces: list[_Piece] = []
    for u in node.users:
        if u.op != "call_function":
            return None
        if u.target == aten.slice.Tensor:
            dim, lo, hi, step = (list(u.args[1:5]) + [None] * 4)[:4]
            lo, hi, step = 0 if lo is None else lo, width if hi is None else hi, 1 if step is None else step
            if dim not in (-1, last) or step != 1 or not isinstance(lo, int) or not isinstance(hi, int) or lo < 0:
                return None
            pieces.append(_Piece(u, lo, min(hi, width)))
        elif u.target in _SPLITS:
            dim = u.args[2] if len(u.args) > 2 else u.kwargs.get("dim", 0)
            if dim not in (-1, last) or not all(g.target is operator.getitem for g in u.users):
                return None
            sizes = _split_sizes(u, width)
            if sizes is None:
                return None
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            pieces += [_Piece(g, starts[g.args[1]], starts[g.args[1]] + sizes[g.args[1]]) for g in u.users]
        else:
            return None
    return pieces if len(pieces) >= 2 and all(p.hi > p.lo for p in pieces) else None


def _split_sizes(u: fx.Node, width: int) -> list[int] | None:
    arg = u.args[1]
    if u.target == aten.chunk.default:
        if not isinstance(arg, int) or arg < 1:
            return None
        size = -(-width // arg)
        return [min(size, width - i) for i in range(0, width, size)]
    if isinstance(arg, int):
        return [min(arg, width - i) for i in range(0, width, arg)] if arg > 0 else None
    if isinstance(arg, (list, tuple)) and all(isinstance(a, int) for a in arg) and sum(arg) == width:
        return list(arg)
    return None


def _split_fused(
    program: Program, entry: Entry, known: dict[tuple[str, tuple[int, ...]], str], notes: list[str]
) -> bool:
    bindings = entry.bindings()
    graph = entry.graph.graph
    changed = False
    for lin in list(graph.nodes):
        if lin.op != "call_function" or lin.target != aten.linear.default:
            continue
        wkey = _state(bindings, lin.args[1])
        bias = lin.args[2] if len(lin.args) > 2 else None
        bkey = _state(bindings, bias) if bias is not None else None
        if wkey is None or program.state[wkey].dim() != 2 or (bias is not None and bkey is None):
            continue
        n_out = int(program.state[wkey].shape[0])
        head = _head_view(lin, n_out)
        pieces = _cuts(head[-1] if head else lin)
        if pieces is None:
            continue
        heads, d = (1, n_out) if not head else (n_out // int(_val(head[0]).shape[-1]), int(_val(head[0]).shape[-1]))  # type: ignore[union-attr]
        pieces.sort(key=lambda p: (p.lo, p.hi))
        path = str(lin.meta.get(PATH_KEY, ""))
        for i, p in enumerate(pieces):
            rows = tuple(h * d + j for h in range(heads) for j in range(p.lo, p.hi))
            if (wkey, rows) not in known:
                idx = torch.tensor(rows)
                known[(wkey, rows)] = program.add_state(f"{wkey}.part{i}", program.state[wkey][idx].contiguous())
                if bkey is not None:
                    known[(bkey, rows)] = program.add_state(f"{bkey}.part{i}", program.state[bkey][idx].contiguous())
            args: tuple = (lin.args[0], entry.state_input(known[(wkey, rows)]))
            if bkey is not None:
                args += (entry.state_input(known[(bkey, rows)]),)
            with graph.inserting_before(p.node):
                new = graph.call_function(aten.linear.default, args)
                new.meta["val"] = _val(lin).narrow(-1, 0, len(rows))  # type: ignore[union-attr]
                new.meta[PATH_KEY] = f"{path}.part{i}" if path else ""
                out = new
                for h in head:  # the view to [..., heads, head_dim] and the transposes, at this piece's width
                    out = _copy_at_width(graph, h, out, p.hi - p.lo)
            p.node.replace_all_uses_with(out)
        for p in pieces:
            if p.node.target is operator.getitem:
                split = p.node.args[0]
                graph.erase_node(p.node)
                if isinstance(split, fx.Node) and not split.users:
                    graph.erase_node(split)
            elif not p.node.users:
                graph.erase_node(p.node)
        _erase(graph, list(reversed(head)) + [lin])
        notes.append(f"{path or lin.name}: fused projection split into {len(pieces)} linears")
        changed = True
    return changed


def _head_view(lin: fx.Node, n_out: int) -> list[fx.Node]:
    """``[view, transpose...]`` when ``lin``'s one use views it as ``[..., heads, head_dim]`` and the
    chain (single uses) only transposes leading dims before being cut; else []."""
    users = list(lin.users)
    if len(users) != 1 or users[0].target not in _VIEWS:
        return []
    view, vv, lv = users[0], _val(users[0]), _val(lin)
    if vv is None or lv is None or vv.dim() != lv.dim() + 1 or not isinstance(view.args[1], (list, tuple)):
        return []
    d = view.args[1][-1]
    if not isinstance(d, int) or d <= 0 or int(vv.shape[-1]) != d or int(vv.shape[-2]) * d != n_out:
        return []
    chain = [view]
    while len(chain[-1].users) == 1:
        t = next(iter(chain[-1].users))
        dims = [int(a) for a in t.args[1:3]] if t.target == aten.transpose.int else []
        nd = vv.dim()
        if not dims or any(x in (-1, nd - 1) for x in dims):
            break
        chain.append(t)
    return chain


def _copy_at_width(graph: fx.Graph, node: fx.Node, src: fx.Node, width: int) -> fx.Node:
    """``node`` (a view whose last size is the head dim, or a transpose) applied to ``src``, whose
    head dim is ``width``."""
    if node.target in _VIEWS:
        shape = list(node.args[1])
        shape[-1] = width
        new = graph.call_function(node.target, (src, shape))
    else:
        new = graph.call_function(node.target, (src, *node.args[1:]))
    new.meta["val"] = _val(node).narrow(-1, 0, width)  # type: ignore[union-attr]
    new.meta[PATH_KEY] = node.meta.get(PATH_KEY, "")
    return new
