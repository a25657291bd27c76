"""Index bounds of an entry's user inputs, found by matching the graph.

A token id picks a row of an embedding table, a cache position the row a cache write goes to.
Kernels do not check them: on the TVM backend an id past the table reads foreign memory and a
position past the cache writes it. :func:`index_bounds` follows every USER input of an entry to the
ops that use it as an index and derives, from the shapes of the tensors they index (the Program's
state and the runtime's cache tensors, never the manifest), the range its values must lie in. The
runtime checks values against these bounds before every call, so a rejected call runs nothing.

Followed from an input to an index (value-exact steps only):

* ops that keep values: views, reshapes, copies, dtype casts, ``copy_`` from it;
* ``select`` of constant elements straight off the input (only those elements are bounded);
* ``add``/``sub`` of a constant or of an ``arange``, whose length may be an input's dimension
  (the check then uses that dimension's length at each call: ``pos[0] + arange(T) < cache``);
* unless the value is mutated in place between being made and being used.

Indexing ops (sinks): ``embedding`` (rows of the weight), ``index_select``/``index_copy``/
``index_add``/``index_fill``/``gather``/``scatter*`` (dim ``dim`` of self), ``index``/``index_put``
(dim ``i`` for ``indices[i]``), ``take`` (all elements), ``select``/``narrow``/``slice`` at a
tensor-derived position. An input that reaches the index of a sink along any other route (or
indexes a tensor whose shape is only known by running the graph) is *unbounded*: it is listed in
:attr:`EntryBounds.unbounded` so that the runtime can say so.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.fx as fx

from qcompile.ir.program import Entry, SlotKind

aten = torch.ops.aten


def _ops(names: str) -> frozenset[object]:
    return frozenset(getattr(aten, n) for n in names.split())


# ops whose result has the values of their first argument (maybe fewer of them, maybe another dtype)
_KEEP_VALUES = _ops(
    "view reshape _unsafe_view unsqueeze squeeze expand permute transpose t flatten clone alias detach contiguous "
    "lift_fresh_copy to _to_copy slice select _local_scalar_dense"
)
_SHAPE_OPS = _ops("sym_size sym_numel sym_stride sym_storage_offset")
_BOOL_OPS = _ops("eq ne lt le gt ge logical_and logical_or logical_not logical_xor isnan isinf isfinite")
_DIM_INDEX_OPS = _ops(  # (self, dim, index, ...)
    "index_select index_copy index_copy_ index_add index_add_ index_fill index_fill_ gather scatter scatter_ "
    "scatter_add scatter_add_ scatter_reduce scatter_reduce_"
)
_LIST_INDEX_OPS = _ops("index _unsafe_index index_put index_put_ _unsafe_index_put _index_put_impl_")  # (self, indices)


@dataclass(frozen=True)
class Extent:
    """The length of axis ``axis`` of user input number ``position``, read at each call."""

    position: int
    axis: int
    input: str


@dataclass(frozen=True)
class IndexBound:
    """Values of user input ``input`` (or of its ``element``) must lie in ``[lo, hi - (extent - 1)]``.

    ``element``: the chain of ``(dim, index)`` selects the graph reads the index from (empty: every
    element is an index); ``extent``: an ``arange`` over that input axis is added to the value
    before it indexes; ``why``: the indexing op, the indexed tensor and its size, for messages;
    ``table``: whether that tensor is state (a table) or cache.
    """

    input: str
    position: int
    element: tuple[tuple[int, int], ...]
    lo: int
    hi: int  # exclusive, before ``extent`` narrows it
    extent: Extent | None
    why: str
    table: SlotKind  # what it indexes: a STATE tensor (an embedding table...) or a CACHE tensor
    op: str  # the indexing op ("embedding", "index_copy_"...)

    def allowed(self, inputs: Sequence[torch.Tensor]) -> tuple[int, int]:
        """The inclusive range allowed for these call inputs."""
        widen = 0
        if self.extent is not None:
            widen = max(int(inputs[self.extent.position].shape[self.extent.axis]) - 1, 0)
        return self.lo, self.hi - 1 - widen

    def describe(self) -> str:
        sel = "".join(f"[{i}]" if d == 0 else f".select({d}, {i})" for d, i in self.element)
        return f"{self.input}{sel}"


@dataclass(frozen=True)
class UnboundedIndex:
    """A user input that reaches an index the matcher cannot bound (its values go unchecked)."""

    input: str
    node: str
    op: str
    reason: str

    def describe(self, entry: str) -> str:
        return f"{entry}: input {self.input!r} reaches the index of {self.op} (%{self.node}) but {self.reason}"


@dataclass(frozen=True)
class EntryBounds:
    bounds: tuple[IndexBound, ...] = ()
    unbounded: tuple[UnboundedIndex, ...] = ()


@dataclass(frozen=True)
class _Offset:
    """How a sink's index relates to the input: ``index = input[element] + o``, ``o`` in
    ``[lo, hi + extent - 1]``; ``fresh`` while only selects were applied (more may follow)."""

    element: tuple[tuple[int, int], ...] = ()
    fresh: bool = True
    lo: int = 0
    hi: int = 0
    extent: Extent | None = None


@dataclass(frozen=True)
class _Use:
    """One index argument of a sink: ``arg`` indexes dim ``dim`` of ``table`` (``dim=None``: all
    elements); allowed positions are ``[0, size - span]`` (span 1 for an element, the length for a
    narrow, 0 for a slice end)."""

    arg: fx.Node
    table: fx.Node
    dim: int | None
    span: int | None


def _packet(node: fx.Node) -> object:
    target = node.target
    return target.overloadpacket if isinstance(target, torch._ops.OpOverload) else target


def _arg(node: fx.Node, i: int, name: str) -> object:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def _sink_uses(node: fx.Node) -> list[_Use]:
    if node.op != "call_function":
        return []
    op = _packet(node)
    table = node.args[0] if node.args else None
    if op is aten.embedding:
        table, idx = node.args[0], node.args[1]
        return [_Use(idx, table, 0, 1)] if isinstance(idx, fx.Node) and isinstance(table, fx.Node) else []
    if not isinstance(table, fx.Node):
        return []
    if op in _DIM_INDEX_OPS:
        dim, idx = _arg(node, 1, "dim"), _arg(node, 2, "index")
        return [_Use(idx, table, dim, 1)] if isinstance(idx, fx.Node) and isinstance(dim, int) else []
    if op in _LIST_INDEX_OPS:
        indices = _arg(node, 1, "indices") or []
        return [_Use(i, table, d, 1) for d, i in enumerate(indices) if isinstance(i, fx.Node)]
    if op is aten.take:
        idx = _arg(node, 1, "index")
        return [_Use(idx, table, None, 1)] if isinstance(idx, fx.Node) else []
    if op is aten.select:
        dim, idx = _arg(node, 1, "dim"), _arg(node, 2, "index")
        return [_Use(idx, table, dim, 1)] if isinstance(idx, fx.Node) and isinstance(dim, int) else []
    if op is aten.narrow:
        dim, start, length = _arg(node, 1, "dim"), _arg(node, 2, "start"), _arg(node, 3, "length")
        span = length if isinstance(length, int) else None
        return [_Use(start, table, dim, span)] if isinstance(start, fx.Node) and isinstance(dim, int) else []
    if op is aten.slice:
        dim = _arg(node, 1, "dim")
        ends = (_arg(node, 2, "start"), _arg(node, 3, "end"))
        return [_Use(e, table, dim, 0) for e in ends if isinstance(e, fx.Node) and isinstance(dim, int)]
    return []


class _Aliases:
    """Which nodes share storage (per the op schemas' alias sets) and where each storage is
    written in place, to tell whether a value still holds when a later op reads it."""

    def __init__(self, graph: fx.Graph) -> None:
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        self.parent: dict[fx.Node, fx.Node] = {}
        writes: list[tuple[fx.Node, int]] = []
        for node in graph.nodes:
            if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
                continue
            schema = node.target._schema
            out_sets = {s for r in schema.returns if r.alias_info is not None for s in r.alias_info.before_set}
            for spec, arg in zip(schema.arguments, node.args):
                info = spec.alias_info
                if info is None or not isinstance(arg, fx.Node):
                    continue
                if out_sets & set(info.before_set):
                    self._union(node, arg)
                if info.is_write:
                    writes.append((arg, self.order[node]))
        self.writes: dict[fx.Node, list[int]] = {}
        for arg, at in writes:
            self.writes.setdefault(self._find(arg), []).append(at)

    def _find(self, n: fx.Node) -> fx.Node:
        while n in self.parent:
            n = self.parent[n]
        return n

    def _union(self, a: fx.Node, b: fx.Node) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra is not rb:
            self.parent[ra] = rb

    def holds(self, value: fx.Node, reader: fx.Node) -> bool:
        """No in-place write to ``value``'s storage between its making and ``reader``."""
        lo, hi = self.order[value], self.order[reader]
        return not any(lo < at < hi for at in self.writes.get(self._find(value), ()))


def _range(node: object, users: Mapping[fx.Node, int]) -> tuple[int, int, Extent | None] | None:
    """Values ``node`` takes, as ``(lo, hi, extent)``: ``[lo, hi + extent - 1]`` (a constant, an
    ``arange`` with constant or input-length end, shifted or reshaped); None when unknown."""
    if isinstance(node, int) and not isinstance(node, bool):
        return node, node, None
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    op = _packet(node)
    if op is aten.arange:
        args = list(node.args)
        step = args[2] if len(args) > 2 else node.kwargs.get("step", 1)
        if step != 1 or not args or len(args) > 3:
            return None
        start, end = (0, args[0]) if len(args) == 1 else (args[0], args[1])
        if not isinstance(start, int):
            return None
        if isinstance(end, int):
            return (start, max(end - 1, start), None) if end > start else None
        ext = _extent(end, users)
        return (start, start, ext) if ext is not None and start == 0 else None
    if op in _KEEP_VALUES and op not in (aten.slice, aten.select, aten._local_scalar_dense):
        return _range(node.args[0], users)
    if op in (aten.add, aten.sub) and node.kwargs.get("alpha", 1) == 1:
        a, b = _range(node.args[0], users), _range(node.args[1], users)
        if a is None or b is None or (a[2] is not None and b[2] is not None):
            return None
        if op is aten.add:
            return a[0] + b[0], a[1] + b[1], a[2] or b[2]
        return (a[0] - b[1], a[1] - b[0], a[2]) if b[2] is None else None
    return None


def _extent(node: object, users: Mapping[fx.Node, int]) -> Extent | None:
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target == aten.sym_size.int:
        src, axis = node.args[0], node.args[1]
        if src in users and isinstance(axis, int):
            return Extent(users[src], axis, src.name)
    return None


def _shift(off: _Offset, other: object, sign: int, users: Mapping[fx.Node, int]) -> _Offset | None:
    r = _range(other, users)
    if r is None:
        return None
    lo, hi, ext = r
    if sign < 0:
        if ext is not None:
            return None
        lo, hi = -hi, -lo
    if ext is not None and off.extent is not None:
        return None
    return replace(off, fresh=False, lo=off.lo + lo, hi=off.hi + hi, extent=off.extent or ext)


def _step(node: fx.Node, user: fx.Node, off: _Offset, users: Mapping[fx.Node, int]) -> _Offset | None:
    """The offset after ``user`` consumes ``node``, when ``user`` keeps the value exactly."""
    op = _packet(user)
    if op is aten.copy_:
        return replace(off, fresh=False) if len(user.args) > 1 and user.args[1] is node else None
    if op in _KEEP_VALUES:
        if not user.args or user.args[0] is not node:
            return None
        if op is aten.select and off.fresh:
            dim, idx = _arg(user, 1, "dim"), _arg(user, 2, "index")
            if isinstance(dim, int) and isinstance(idx, int):
                return replace(off, element=(*off.element, (dim, idx)))
        return replace(off, fresh=False)
    if op in (aten.add, aten.sub) and user.kwargs.get("alpha", 1) == 1 and len(user.args) == 2:
        a, b = user.args
        if a is node and b is not node:
            return _shift(off, b, 1 if op is aten.add else -1, users)
        if b is node and a is not node and op is aten.add:
            return _shift(off, a, 1, users)
    if user.target in (operator.add, operator.sub) and len(user.args) == 2 and user.args[0] is node:
        return _shift(off, user.args[1], 1 if user.target is operator.add else -1, users)
    return None


def _reach(start: fx.Node) -> set[fx.Node]:
    """Nodes whose values depend on ``start``'s values (not on its shape only); an index
    argument does not carry into its op's result, nor the destination of ``copy_``."""
    seen = {start}
    todo = [start]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in seen or u.op != "call_function":
                continue
            op = _packet(u)
            if op in _SHAPE_OPS or op in _BOOL_OPS:
                continue
            if op is aten.copy_ and not (len(u.args) > 1 and u.args[1] is n):
                continue
            as_index = sum(use.arg is n for use in _sink_uses(u))
            if as_index and sum(a is n for a in _flat_args(u)) == as_index:  # only an index here
                continue
            seen.add(u)
            todo.append(u)
    return seen


def _flat_args(node: fx.Node) -> Iterable[object]:
    for a in (*node.args, *node.kwargs.values()):
        yield from (a if isinstance(a, (list, tuple)) else (a,))


def index_bounds(entry: Entry, shapes: Mapping[str, Sequence[int]]) -> EntryBounds:
    """The bounds of ``entry``'s user inputs; ``shapes``: state and cache key -> the shape of the
    tensor the runtime passes for it (the tensors themselves, not what a manifest says)."""
    graph = entry.graph.graph
    bindings = entry.bindings()
    users = {node: i for i, node in enumerate(n for n, s in bindings.items() if s.kind is SlotKind.USER)}
    aliases = _Aliases(graph)
    found: list[IndexBound] = []
    unbounded: list[UnboundedIndex] = []
    for ph, position in users.items():
        name = bindings[ph].name
        exact: set[tuple[fx.Node, fx.Node]] = set()  # (sink, index arg) reached value-exactly
        seen: set[tuple[fx.Node, _Offset]] = set()
        todo = [(ph, _Offset())]
        while todo:
            node, off = todo.pop()
            if (node, off) in seen:
                continue
            seen.add((node, off))
            for user in list(node.users):
                if user.op != "call_function" or not aliases.holds(node, user):
                    continue
                for use in _sink_uses(user):
                    if use.arg is node:
                        bound = _bound(name, position, off, use, user, bindings, shapes)
                        if isinstance(bound, IndexBound):
                            found.append(bound)
                            exact.add((user, node))
                nxt = _step(node, user, off, users)
                if nxt is not None:
                    todo.append((user, nxt))
        reached = _reach(ph)
        for node in graph.nodes:
            for use in _sink_uses(node):
                if use.arg in reached and (node, use.arg) not in exact:
                    why = _bound(name, position, _Offset(), use, node, bindings, shapes)
                    reason = why if isinstance(why, str) else "along ops the bound matcher does not follow"
                    unbounded.append(UnboundedIndex(name, node.name, str(node.target), reason))
    return EntryBounds(_merge(found), tuple(dict.fromkeys(unbounded)))


def _bound(
    name: str,
    position: int,
    off: _Offset,
    use: _Use,
    sink: fx.Node,
    bindings: Mapping[fx.Node, object],
    shapes: Mapping[str, Sequence[int]],
) -> IndexBound | str:
    """The bound ``use`` puts on the input, or why there is none."""
    slot = bindings.get(use.table)
    kind = getattr(slot, "kind", None)
    if kind not in (SlotKind.STATE, SlotKind.CACHE) or slot.name not in shapes:  # type: ignore[union-attr]
        return f"it indexes %{use.table.name}, whose shape the matcher does not know (not a state or cache tensor)"
    key = slot.name  # type: ignore[union-attr]
    shape = tuple(int(d) for d in shapes[key])
    if use.dim is None:
        size, where = 1, "all elements"
        for d in shape:
            size *= d
    else:
        if not -len(shape) <= use.dim < len(shape):
            return f"its dim {use.dim} is not a dim of {kind.value} {key!r} of shape {list(shape)}"
        dim = use.dim % len(shape)
        size, where = shape[dim], f"dim {dim}"
    if use.span is None:
        return "the length it spans is not a constant"
    op = str(_packet(sink).__name__)  # type: ignore[attr-defined]
    what = f"{op} indexes {kind.value} {key!r} ({where} has size {size})"  # type: ignore[attr-defined]
    if off.extent is not None or off.lo or off.hi:
        what += " after adding " + _describe_offset(off)
    lo, hi = -off.lo, size - use.span + 1 - off.hi
    return IndexBound(name, position, off.element, lo, hi, off.extent, what, kind, op)  # type: ignore[arg-type]


def _describe_offset(off: _Offset) -> str:
    parts = []
    if off.lo == off.hi and off.lo:
        parts.append(str(off.lo))
    elif off.lo != off.hi:
        parts.append(f"[{off.lo}, {off.hi}]")
    if off.extent is not None:
        parts.append(f"arange({off.extent.input}.shape[{off.extent.axis}])")
    return " + ".join(parts)


def _merge(bounds: list[IndexBound]) -> tuple[IndexBound, ...]:
    """One bound per (input, element, extent, table kind): the intersection, explained by the tightest sink."""
    merged: dict[tuple[int, tuple[tuple[int, int], ...], Extent | None, SlotKind], IndexBound] = {}
    for b in bounds:
        key = (b.position, b.element, b.extent, b.table)
        old = merged.get(key)
        if old is None:
            merged[key] = b
            continue
        why = b.why if b.hi < old.hi or (b.hi == old.hi and b.lo > old.lo and b.why != old.why) else old.why
        merged[key] = replace(old, lo=max(old.lo, b.lo), hi=min(old.hi, b.hi), why=why)
    return tuple(sorted(merged.values(), key=lambda b: (b.position, b.element, b.extent is not None, b.table.value)))


__all__ = ["EntryBounds", "Extent", "IndexBound", "UnboundedIndex", "index_bounds"]
