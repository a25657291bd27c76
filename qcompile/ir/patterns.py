"""Graph matchers: find structures by what the graph does, not by names.

* linears with constant weights (:func:`find_linears`);
* per-channel scale producers for SmoothQuant / MergeQuant (:func:`find_scale_groups`: a norm's
  affine weight feeding q/k/v or gate/up, v→o through attention with the GQA head map, up→down);
* attention blocks (:func:`find_cache_attention`, :func:`find_forward_attention`): K/V
  projections of a normed X, their cache writes and the attention reading them through GQA
  repeats; the path from a projection to its cache with RoPE (:func:`head_path`); the norm
  producing X and the residual stream it reads (:func:`norm_source`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from qcompile.errors import PassError
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


def non_linear_uses(program: Program, key: str) -> list[str]:
    """Module paths (else node names) of the nodes, in any entry, that read state tensor ``key`` other
    than as an ``aten.linear`` weight: e.g. the embedding gather of a head weight tied to the embedding."""
    out: list[str] = []
    for entry in program.entries.values():
        for ph, slot in entry.bindings().items():
            if slot.kind is not SlotKind.STATE or slot.name != key:
                continue
            for u in ph.users:
                if u.op == "call_function" and u.target == aten.linear.default and u.args[1] is ph:
                    continue
                where = str(u.meta.get(PATH_KEY, "")) or u.name
                if where not in out:
                    out.append(where)
    return out


# ---- linear-like ops: float aten.linear and qcompile's quantized linears -------------------------


@dataclass(frozen=True)
class LinearForm:
    """Where a linear-like op ``op(x, weight, ...)`` keeps its bias, and how to read its weight back in
    float: ``weight(state, args)`` returns the ``[out, in]`` float32 weight the op multiplies by."""

    bias_index: int
    weight: Callable[[dict[str, torch.Tensor], tuple[Any, ...], Entry], torch.Tensor]


def _state_arg(state: dict[str, torch.Tensor], entry: Entry, arg: object) -> torch.Tensor | None:
    key = state_key(entry.bindings(), arg)
    return None if key is None else state[key]


def _need(state: dict[str, torch.Tensor], entry: Entry, arg: object) -> torch.Tensor:
    t = _state_arg(state, entry, arg)
    if t is None:
        raise PassError(f"%{arg} is not a constant weight; a linear whose weight is computed cannot be read back")
    return t


def _w_float(state: dict[str, torch.Tensor], args: tuple[Any, ...], entry: Entry) -> torch.Tensor:
    return _need(state, entry, args[1]).to(torch.float32)


def _w_w8a8(state: dict[str, torch.Tensor], args: tuple[Any, ...], entry: Entry) -> torch.Tensor:
    return _need(state, entry, args[1]).to(torch.float32) * _need(state, entry, args[2]).to(torch.float32)[:, None]


def _w_groups(state: dict[str, torch.Tensor], args: tuple[Any, ...], entry: Entry) -> torch.Tensor:
    from qcompile.quant.quantizer import dequantize_weight_groups

    offset = _state_arg(state, entry, args[3]) if args[3] is not None else None
    return dequantize_weight_groups(_need(state, entry, args[1]), _need(state, entry, args[2]), offset, int(args[5]))


def _w_packed(state: dict[str, torch.Tensor], args: tuple[Any, ...], entry: Entry) -> torch.Tensor:
    from qcompile.ops.packed import unpack_codes
    from qcompile.quant.quantizer import dequantize_weight_groups

    offset = _need(state, entry, args[9]) if len(args) > 9 and args[9] is not None else None
    codes = unpack_codes(_need(state, entry, args[1]), int(args[4]), int(args[5]), signed=offset is None)
    return dequantize_weight_groups(codes, _need(state, entry, args[2]), offset, int(args[6]))


def _w_static(state: dict[str, torch.Tensor], args: tuple[Any, ...], entry: Entry) -> torch.Tensor:
    from qcompile.quant.quantizer import dequantize_weight_groups

    return dequantize_weight_groups(_need(state, entry, args[1]), _need(state, entry, args[2]), None, int(args[4]))


@functools.cache
def _linear_forms() -> dict[object, LinearForm]:
    import qcompile.ops  # noqa: F401  (registers the qcompile ops)

    q = torch.ops.qcompile
    return {
        aten.linear.default: LinearForm(2, _w_float),
        q.linear_w8a8.default: LinearForm(3, _w_w8a8),  # (x, qweight, w_scale, bias)
        q.quant_linear.default: LinearForm(4, _w_groups),  # (x, codes, scale, offset, bias, group, ...)
        q.packed_linear.default: LinearForm(3, _w_packed),  # (x, packed, scale, bias, k, bits, group, ..., offset)
        q.linear_static.default: LinearForm(3, _w_static),  # (x, codes, scale, bias, group, act_bits)
    }


def linear_form(node: object) -> LinearForm | None:
    """How ``node`` computes ``x·Wᵀ (+ b)`` when it is a float ``aten.linear`` or one of qcompile's quantized
    linears (the forms ``quantize_weights`` and ``fold_quant_steps`` write), else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    return _linear_forms().get(node.target)


def projection_weight(program: Program, entry: Entry, node: fx.Node) -> torch.Tensor:
    """The float32 ``[out, in]`` weight a linear-like ``node`` multiplies by: the float weight, or its
    quantized codes times their scales (what the quantized op computes with)."""
    form = linear_form(node)
    if form is None:
        raise PassError(f"%{node.name} ({node.target}) is not a linear")
    return form.weight(program.state, tuple(node.args), entry)


# ---- per-channel scale producers (for scale migration and step folding) -----------------------

LAYOUT_OPS = frozenset(
    {
        aten.view.default,
        aten.reshape.default,
        aten._unsafe_view.default,
        aten.transpose.int,
        aten.clone.default,
        aten.contiguous.default,
        aten.unsqueeze.default,
        aten.expand.default,
    }
)
SDPA_OPS = frozenset({aten.scaled_dot_product_attention.default})


@dataclass(frozen=True)
class ScaleGroup:
    """Linears whose shared input ``X`` can absorb a per-input-channel scale ``s`` exactly.

    ``producer`` says how ``X / s`` is made at no run-time cost:

    * ``"norm"``: ``X = h ⊙ (w + c) (+ b)`` with a 1-D state weight ``w`` (RMSNorm/LayerNorm affine;
      ``c`` = ``producer_offset`` is 0, or 1 for Gemma's ``(1 + w)`` norms; ``aten.layer_norm`` with
      its weight and bias is one such norm): ``w' = (w + c) / s − c``, ``b' = b / s``;
    * ``"linear"``: ``X`` is the output rows of another linear (``up_proj`` through the
      elementwise product with the gate, or ``v_proj`` through attention, which mixes tokens but
      not channels): divide that linear's rows ``channel_map`` maps to by ``s``.

    ``channel_map[j]`` is the producer channel that feeds input channel ``j`` (several ``j`` may share
    one producer channel, e.g. GQA heads sharing a V head; their scales must then be equal).
    """

    producer: str  # "norm" or "linear"
    producer_weight: str  # state key: norm weight, or the producing linear's weight
    producer_bias: str | None
    linears: tuple[str, ...]  # weight keys of the consuming linears
    paths: tuple[str, ...]  # their module paths
    channel_map: tuple[int, ...] | None = None  # None: identity
    producer_offset: float = 0.0  # c in X = h ⊙ (w + c): 1.0 for (1 + w) norms

    def producer_index(self) -> torch.Tensor | None:
        return None if self.channel_map is None else torch.tensor(self.channel_map)

    def shared_max(self, v: torch.Tensor) -> torch.Tensor:
        """Per consumer channel, the max of ``v`` over the consumer channels fed by the same producer channel."""
        idx = self.producer_index()
        if idx is None:
            return v
        return torch.zeros(int(idx.max()) + 1).scatter_reduce(0, idx, v, "amax")[idx]

    def divide_producer(self, state: dict[str, torch.Tensor], s: torch.Tensor) -> None:
        """Divide the producer (norm weight and bias, or the producing linear's rows and bias) by the
        per-consumer-channel scales ``s`` (equal within a producer channel, see :meth:`shared_max`)."""
        idx = self.producer_index()
        sp = s if idx is None else torch.ones(int(idx.max()) + 1).scatter(0, idx, s)
        for key, offset in ((self.producer_weight, self.producer_offset), (self.producer_bias, 0.0)):
            if key is not None:
                t = state[key].to(torch.float32)
                state[key] = ((t + offset) / (sp if t.dim() == 1 else sp[:, None]) - offset).to(state[key].dtype)


def _linear_weight_key(node: fx.Node, bindings: dict[fx.Node, Slot]) -> str | None:
    if node.op != "call_function" or node.target != aten.linear.default:
        return None
    return state_key(bindings, node.args[1])


@dataclass(frozen=True)
class NormAffine:
    """The affine part of a norm: ``X = h ⊙ (w + offset) (+ b)`` with 1-D state ``w`` (and ``b``)."""

    weight: str
    bias: str | None
    offset: float = 0.0

    def keys(self) -> tuple[str, ...]:
        return (self.weight,) if self.bias is None else (self.weight, self.bias)


_FLOAT_CASTS = frozenset({aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default})


def _same_dtype_cast(node: object) -> object:
    """``node`` without casts that keep its dtype (``x.float()`` of an fp32 x, ``type_as`` to the same
    dtype): the no-ops a norm written for mixed precision leaves in an fp32 graph."""
    while (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and node.target in _FLOAT_CASTS
        and isinstance(node.args[0], fx.Node)
        and getattr(node.meta.get("val"), "dtype", None) is not None
        and node.meta["val"].dtype == getattr(node.args[0].meta.get("val"), "dtype", None)
        and len(real_users(node.args[0])) == 1
    ):
        node = node.args[0]
    return node


def real_users(node: fx.Node) -> list[fx.Node]:
    """``node``'s users other than torch.export's ``_assert_tensor_metadata`` checks."""
    return [u for u in node.users if u.target != aten._assert_tensor_metadata.default]


def _state_1d(arg: object, bindings: dict[fx.Node, Slot], program: Program) -> str | None:
    key = state_key(bindings, _same_dtype_cast(arg))
    return key if key is not None and program.state[key].dim() == 1 else None


def _norm_affine(node: fx.Node, bindings: dict[fx.Node, Slot], program: Program) -> NormAffine | None:
    """The norm affine ``node`` computes: ``h ⊙ w``, ``h ⊙ (w + c)`` (c a number: Gemma's ``1 + w``),
    either plus ``b``, or ``aten.layer_norm`` with state weight and bias; 1-D state w, b. Same-dtype
    casts around the result and the weight are looked through."""
    node = _same_dtype_cast(node)  # type: ignore[assignment]
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target == aten.layer_norm.default:
        w = _state_1d(node.args[2], bindings, program) if len(node.args) > 2 else None
        b = _state_1d(node.args[3], bindings, program) if len(node.args) > 3 and node.args[3] is not None else None
        if w is None or (len(node.args) > 3 and node.args[3] is not None and b is None):
            return None
        return NormAffine(w, b)
    bias = None
    if node.target == aten.add.Tensor:
        bias = _state_1d(node.args[1], bindings, program)
        if bias is None or not isinstance(node.args[0], fx.Node):
            return None
        node = _same_dtype_cast(node.args[0])  # type: ignore[assignment]
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target != aten.mul.Tensor:
        return None
    for a, h in (node.args, node.args[::-1]):
        if not isinstance(h, fx.Node):
            continue
        if (key := _state_1d(a, bindings, program)) is not None:
            return NormAffine(key, bias)
        if (
            isinstance(a, fx.Node)
            and a.target == aten.add.Tensor
            and len(a.users) == 1
            and isinstance(a.args[1], (int, float))
            and (key := _state_1d(a.args[0], bindings, program)) is not None
        ):
            return NormAffine(key, bias, float(a.args[1]))
    return None


def _strip_layout(node: fx.Node) -> fx.Node:
    while node.op == "call_function" and node.target in LAYOUT_OPS and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _attention_value_producer(x: fx.Node, bindings: dict[fx.Node, Slot]) -> tuple[fx.Node, str, int] | None:
    """For ``x`` = layout(SDPA(q, k, layout(V(...)))), the V linear node, its weight key and head dim."""
    sdpa = _strip_layout(x)
    if sdpa.op != "call_function" or sdpa.target not in SDPA_OPS or len(sdpa.users) != 1:
        return None
    value = sdpa.args[2]
    if not isinstance(value, fx.Node):
        return None
    v = _strip_layout(value)
    wkey = _linear_weight_key(v, bindings)
    if wkey is None:
        return None
    head_dim = int(value.meta["val"].shape[-1])
    return v, wkey, head_dim


def attention_value_output(x: fx.Node, bindings: dict[fx.Node, Slot]) -> tuple[fx.Node, str, int] | None:
    """When ``x`` (a linear's input) is the attention output over a V projection's heads,
    ``layout(SDPA(q, k, layout(V(...))))``: (the V linear node, its weight key, the head dim)."""
    return _attention_value_producer(x, bindings)


def find_scale_groups(
    program: Program, *, norms: bool = True, value_out: bool = False, up_down: bool = False
) -> list[ScaleGroup]:
    """Every group of linears whose input can absorb a per-channel scale (see :class:`ScaleGroup`).

    Matched in every entry; a group is returned when all entries agree on it and its producer
    tensors are used nowhere else (so rescaling them changes nothing but this group's input).
    """
    found: dict[tuple, ScaleGroup] = {}
    present: dict[str, set[str]] = {}  # state key -> entries that use it
    matched: dict[str, set[str]] = {}  # norm producer key -> entries where every use is a matched norm
    weight_only: dict[str, bool] = {}  # state key -> used only as a linear's weight, everywhere
    for entry in program.entries.values():
        bindings = entry.bindings()
        for ph, slot in bindings.items():
            if slot.kind is SlotKind.STATE and ph.users:
                present.setdefault(slot.name, set()).add(entry.name)
                only = all(
                    u.target == aten.linear.default and u.args[1] is ph and u.args[0] is not ph for u in ph.users
                )
                weight_only[slot.name] = weight_only.get(slot.name, True) and only
        for node in entry.graph.graph.nodes:
            if node.op != "call_function":
                continue
            users = list(node.users)
            keys = [_linear_weight_key(u, bindings) for u in users]
            if not users or any(k is None for k in keys) or any(u.args[0] is not node for u in users):
                continue
            paths = tuple(str(u.meta.get(PATH_KEY, "")) for u in users)
            lin = tuple(k for k in keys if k is not None)
            group: ScaleGroup | None = None
            if norms and (aff := _norm_affine(node, bindings, program)) is not None:
                group = ScaleGroup("norm", aff.weight, aff.bias, lin, paths, producer_offset=aff.offset)
                placeholders = {n: s.name for n, s in bindings.items() if s.name in aff.keys()}
                if all(len(real_users(ph)) == 1 for ph in placeholders):
                    for k in aff.keys():
                        matched.setdefault(k, set()).add(entry.name)
            elif len(users) == 1 and (value_out or up_down):
                group = _linear_producer_group(node, bindings, lin, paths, value_out, up_down)
            if group is not None:
                found[(group.producer, group.producer_weight, group.linears)] = group
    out = []
    for g in found.values():
        weights = g.linears if g.producer == "norm" else (*g.linears, g.producer_weight)
        if not all(weight_only.get(k, False) for k in weights):
            continue  # e.g. a weight tied to an embedding
        if g.producer == "norm":
            # rescaling the norm's weight must change nothing but this group's input, in every entry
            keys = [k for k in (g.producer_weight, g.producer_bias) if k]
            if any(matched.get(k) != present.get(k) for k in keys):
                continue
        out.append(g)
    return out


def _linear_producer_group(node, bindings, lin, paths, value_out, up_down) -> ScaleGroup | None:
    if up_down and node.target == aten.mul.Tensor:
        for a in node.args:
            if isinstance(a, fx.Node) and len(a.users) == 1 and (pkey := _linear_weight_key(a, bindings)) is not None:
                n_out = int(a.meta["val"].shape[-1])
                if n_out == int(node.meta["val"].shape[-1]):
                    return ScaleGroup("linear", pkey, _bias_key(a, bindings), lin, paths)
    if value_out:
        found = _attention_value_producer(node, bindings)
        if found is not None:
            v, vkey, hd = found
            k_in = int(node.meta["val"].shape[-1])
            n_v = int(v.meta["val"].shape[-1])
            if k_in % n_v == 0 and n_v % hd == 0:
                rep = k_in // n_v
                cmap = tuple(((j // hd) // rep) * hd + j % hd for j in range(k_in))
                return ScaleGroup("linear", vkey, _bias_key(v, bindings), lin, paths, None if rep == 1 else cmap)
    return None


def _bias_key(node: fx.Node, bindings: dict[fx.Node, Slot]) -> str | None:
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return state_key(bindings, bias) if bias is not None else None


# ---- attention blocks: K/V projections, their caches, the RoPE path, the norm producing X ----------

ATTENTION_EXPECTED = (
    "an attention block: a normed activation X feeding two linear projections (K and V: aten.linear or "
    "a qcompile quantized linear) with constant weights, whose outputs (after view/transpose and, for K, "
    "RoPE) are written with aten.index_copy_ into cache tensors that aten.scaled_dot_product_attention "
    "reads as key and value"
)
HEAD_SHAPE_OPS = frozenset({aten.view.default, aten.reshape.default, aten.transpose.int, aten._unsafe_view.default})
# what may sit between a cached K/V tensor and the attention that reads it (GQA head repeats, copies)
KV_REPEAT_OPS = frozenset(
    {
        aten.unsqueeze.default,
        aten.expand.default,
        aten.reshape.default,
        aten.view.default,
        aten.clone.default,
        aten.contiguous.default,
        aten._unsafe_view.default,
        aten.repeat_interleave.self_int,
        aten.alias.default,
    }
)


@dataclass
class KVProjection:
    """The K or V projection of an attention block."""

    lin: fx.Node  # aten.linear(X, W, b) or a quantized linear (:func:`linear_form`) of X
    weight_key: str  # the state tensor in the weight position (float weight, codes or packed codes)
    bias: object  # the bias argument (a node or None)
    write: fx.Node | None = None  # cache entries: the index_copy_ writing the cache
    src: fx.Node | None = None  # what is written (cache layout [B, H, T, hd]); forward: K/V fed to attention
    cache_key: str | None = None


@dataclass
class AttentionBlock:
    """One attention: the normed input X, its K and V projections, the attention node."""

    x: fx.Node
    k: KVProjection
    v: KVProjection
    sdpa: fx.Node
    path: str
    index: int = -1  # position among the Program's blocks (set by the caller)

    @property
    def head_dim(self) -> int:
        return int((self.k.src or self.k.lin).meta["val"].shape[-1])


def _single_linear_ancestor(program: Program, bindings: dict[fx.Node, Slot], node: fx.Node) -> fx.Node | None:
    """The one linear-like node (float ``aten.linear`` or a quantized linear, :func:`linear_form`) with a
    constant weight that ``node`` derives from (not looking past linears)."""
    found, seen, todo = [], set(), [node]
    while todo:
        n = todo.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        if linear_form(n) is not None:
            wkey = state_key(bindings, n.args[1])
            if wkey is not None and (n.target != aten.linear.default or program.state[wkey].dim() == 2):
                found.append(n)
            continue
        todo.extend(n.all_input_nodes)
    return found[0] if len(found) == 1 else None


def _attention_reader(node: fx.Node) -> tuple[fx.Node, int] | None:
    """(sdpa node, 1 for key / 2 for value) reading ``node`` through GQA repeat/reshape ops."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if u.op != "call_function":
                continue
            if u.target in SDPA_OPS:
                for i in (1, 2):
                    if len(u.args) > i and u.args[i] is n:
                        return u, i
            elif u.target in KV_REPEAT_OPS:
                todo.append(u)
    return None


def _projection(bindings: dict[fx.Node, Slot], lin: fx.Node) -> KVProjection:
    form = linear_form(lin)
    assert form is not None  # _single_linear_ancestor only returns linear-like nodes
    bias = lin.args[form.bias_index] if len(lin.args) > form.bias_index else lin.kwargs.get("bias")
    wkey = state_key(bindings, lin.args[1])
    assert wkey is not None  # ... with constant weights
    return KVProjection(lin, wkey, bias)


def _group_blocks(pairs: list[tuple[fx.Node, int, KVProjection]], entry: Entry) -> list[AttentionBlock]:
    by_sdpa: dict[fx.Node, dict[int, KVProjection]] = {}
    for sdpa, role, proj in pairs:
        by_sdpa.setdefault(sdpa, {})[role] = proj
    blocks = []
    order = {n: i for i, n in enumerate(entry.graph.graph.nodes)}
    for sdpa, roles in sorted(by_sdpa.items(), key=lambda kv: order[kv[0]]):
        if set(roles) != {1, 2}:
            continue
        k, v = roles[1], roles[2]
        path = str(sdpa.meta.get(PATH_KEY, ""))
        if k.lin.args[0] is not v.lin.args[0]:
            raise PassError(
                f"the K and V projections of attention %{sdpa.name} (entry {entry.name!r}, module path {path!r}) read "
                "different "
                f"inputs (%{k.lin.args[0]} and %{v.lin.args[0]}); expected {ATTENTION_EXPECTED}"
            )
        blocks.append(AttentionBlock(k.lin.args[0], k, v, sdpa, path))
    return blocks


def find_cache_attention(program: Program, entry: Entry) -> list[AttentionBlock]:
    """The attention blocks of a cache entry (``prefill``/``decode``): cache writes
    ``index_copy_(cache, dim, pos, src)`` whose ``src`` derives from exactly one constant-weight
    linear and whose result the attention reads as key or value. In graph order."""
    bindings = entry.bindings()
    pairs = []
    for node in list(entry.graph.graph.nodes):
        if node.op != "call_function" or node.target != aten.index_copy_.default:
            continue
        slot = bindings.get(node.args[0])
        if slot is None or slot.kind is not SlotKind.CACHE:
            continue
        src = node.args[3]
        lin = _single_linear_ancestor(program, bindings, src)
        reader = _attention_reader(node)
        if lin is None or reader is None:
            continue
        proj = _projection(bindings, lin)
        proj.write, proj.src, proj.cache_key = node, src, slot.name
        pairs.append((reader[0], reader[1], proj))
    return _group_blocks(pairs, entry)


def find_forward_attention(program: Program, entry: Entry) -> list[AttentionBlock]:
    """The attention blocks of an entry without a cache: the attention's key and value, through GQA
    repeats, derive from exactly one constant-weight linear each. In graph order."""
    bindings = entry.bindings()
    pairs = []
    for node in list(entry.graph.graph.nodes):
        if node.op != "call_function" or node.target not in SDPA_OPS:
            continue
        for role in (1, 2):
            src = node.args[role]
            while (
                isinstance(src, fx.Node)
                and src.op == "call_function"
                and src.target in KV_REPEAT_OPS - {aten.view.default}
            ):
                src = src.args[0]  # undo GQA repeat (unsqueeze/expand/reshape) to the [B, Hkv, T, hd] tensor
            lin = _single_linear_ancestor(program, bindings, src)
            if lin is None:
                continue
            proj = _projection(bindings, lin)
            proj.src = src
            pairs.append((node, role, proj))
    return _group_blocks(pairs, entry)


def ancestors(nodes: list[fx.Node]) -> set[fx.Node]:
    """``nodes`` and every node they depend on."""
    seen: set[fx.Node] = set()
    todo = list(nodes)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen


def _descendants_within(start: fx.Node, allowed: set[fx.Node]) -> set[fx.Node]:
    desc: set[fx.Node] = set()
    todo = [start]
    while todo:
        m = todo.pop()
        for u in m.users:
            if u in allowed and u not in desc:
                desc.add(u)
                todo.append(u)
    return desc


@dataclass(frozen=True)
class HeadPath:
    """How a K/V projection reaches what is cached: ``nodes`` (graph order) from the linear to the cached
    tensor, among them one ``view`` to ``[B, T, heads, head_dim]``; the others are per-token (a norm
    over the projection such as OLMo 2's k_norm, the transpose to ``[B, heads, T, head_dim]``, per-head
    norms such as Qwen3's or Gemma 3's k_norm, RoPE for K). Their other inputs are constants (weights,
    or values computed from weights only) or ``externals``, which depend on positions only (the rotary
    cos/sin)."""

    view: fx.Node
    nodes: tuple[fx.Node, ...]
    externals: tuple[fx.Node, ...]


def _constant(node: fx.Node, bindings: dict[fx.Node, Slot]) -> bool:
    """``node`` is computed from STATE placeholders only (a weight, or ``1 + w`` of a weight)."""
    leaves = [a for a in ancestors([node]) if a.op == "placeholder"]
    return all(a in bindings and bindings[a].kind is SlotKind.STATE for a in leaves)


def head_path(graph: fx.Graph, block: AttentionBlock, proj: KVProjection, bindings: dict[fx.Node, Slot]) -> HeadPath:
    """Match the path from ``proj``'s linear to its cached tensor (the RoPE of K included)."""
    assert proj.src is not None
    anc_src = ancestors([proj.src])
    where = f"(module path {block.path!r})"
    desc = _descendants_within(proj.lin, anc_src)
    path_nodes = [m for m in graph.nodes if m in desc]
    views = [m for m in path_nodes if m.target in HEAD_SHAPE_OPS - {aten.transpose.int}]
    if len(views) != 1 or getattr(views[0].meta.get("val"), "ndim", 0) != 4:
        raise PassError(
            f"the projection %{proj.lin.name} {where} reaches its cache through "
            f"{[str(m.target) for m in path_nodes]}; expected one view to [B, T, heads, head_dim] on the way "
            f"(per-token ops, transposes, per-head norms and RoPE around it); {ATTENTION_EXPECTED}"
        )
    x_desc = _descendants_within(block.x, set(graph.nodes))
    externals: list[fx.Node] = []
    for m in path_nodes:
        for a in [m.args[0]] if m is views[0] else m.all_input_nodes:  # the view's sizes are remade
            if a is proj.lin or a in desc or a in externals or _constant(a, bindings):
                continue
            if a in x_desc or a is block.x:
                raise PassError(
                    f"the transform between %{proj.lin.name} {where} and the cache write reads %{a.name}, which "
                    "depends on the token content; only position-dependent inputs (RoPE cos/sin) and weights can "
                    "be rematerialized"
                )
            externals.append(a)
    return HeadPath(views[0], tuple(path_nodes), tuple(externals))


def norm_source(graph: fx.Graph, x: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """``(h, nodes)`` for ``x = norm(h)``: the residual-stream tensor ``h`` that the norm producing ``x``
    reads (the nearest ancestor of ``x`` that also feeds something else) and the norm's nodes from
    ``h`` to ``x`` in graph order; their other inputs must be placeholders (weights, constants)."""
    anc_x = ancestors([x])
    h = None
    todo, seen = [x], set()
    while todo and h is None:  # breadth-first up from X: the first node that also feeds something else
        nxt = []
        for n in todo:
            for a in n.all_input_nodes:
                if a in seen or a.op != "call_function":
                    continue
                seen.add(a)
                if any(
                    u not in anc_x and u is not x and u.target != aten._assert_tensor_metadata.default for u in a.users
                ):
                    h = a
                    break
                nxt.append(a)
            if h is not None:
                break
        todo = nxt
    if h is None:
        raise PassError(f"found no residual-stream input of the norm producing %{x.name}")
    desc = _descendants_within(h, anc_x)
    nodes = [m for m in graph.nodes if m in desc or m is x]
    for m in nodes:
        for a in m.all_input_nodes:
            if a is not h and a not in desc and a.op != "placeholder":
                raise PassError(
                    f"the norm between %{h.name} and %{x.name} reads %{a.name}, which is not "
                    "a weight; X = norm(h) with constant parameters is expected"
                )
    return h, nodes


# ---- RMSNorm and GQA repeat (used by the TVM lowering) -------------------------------------------

_F32_CASTS = ("to.dtype", "_to_copy.default", "to.dtype_layout")
_REPEAT_RESHAPES = ("reshape.default", "view.default", "_unsafe_view.default")


@dataclass(frozen=True)
class RMSNormMatch:
    """``weight · (x · rsqrt(mean(x², -1, keepdim) + eps))`` with a constant 1-D ``weight``."""

    x: fx.Node
    weight: fx.Node  # the STATE placeholder
    eps: float
    offset: float = 0.0  # the norm multiplies by (weight + offset): 1.0 for Gemma's (1 + w)


def _call_name(node: object) -> str:
    """The op name (e.g. ``"mul.Tensor"``) of a call_function node; "" for anything else."""
    return node.target.__name__ if isinstance(node, fx.Node) and node.op == "call_function" else ""


def _through_f32_casts(node: object) -> object:
    """``node`` without the float32 → float32 casts in front of it (no-ops in an fp32 graph)."""
    while _call_name(node) in _F32_CASTS and getattr(node.meta.get("val"), "dtype", None) == torch.float32:  # type: ignore[union-attr]
        node = node.args[0]  # type: ignore[union-attr]
    return node


def _is_state(node: object, bindings: dict[fx.Node, Slot]) -> bool:
    return isinstance(node, fx.Node) and node in bindings and bindings[node].kind is SlotKind.STATE


def _weight_factor(node: fx.Node, bindings: dict[fx.Node, Slot]) -> tuple[fx.Node, object, float] | None:
    """(w, y, c) for ``node = y · (w + c)`` (c = 0 when the factor is ``w`` itself) with ``w`` a 1-D STATE
    placeholder, same-dtype casts looked through."""
    for factor, y in (node.args, node.args[::-1]):
        offset = 0.0
        if _call_name(factor) == "add.Tensor" and isinstance(factor.args[1], (int, float)) and len(factor.users) == 1:  # type: ignore[union-attr]
            factor, offset = factor.args[0], float(factor.args[1])  # type: ignore[union-attr]
        w = _same_dtype_cast(factor)
        if _is_state(w, bindings) and w.meta["val"].dim() == 1:  # type: ignore[union-attr]
            return w, y, offset  # type: ignore[return-value]
    return None


def rmsnorm_source(node: object, bindings: dict[fx.Node, Slot]) -> RMSNormMatch | None:
    """The RMSNorm that ``node`` computes (``weight · (x · rsqrt(mean(x², -1, keepdim) + eps))``, the
    weight a 1-D STATE placeholder, float32 casts allowed around the normalized value), else None.
    ``bindings``: ``Entry.bindings()``."""
    node = _same_dtype_cast(node)
    if _call_name(node) != "mul.Tensor":
        return None
    assert isinstance(node, fx.Node)
    found = _weight_factor(node, bindings)
    if found is None:
        return None
    w, y, offset = found
    y = _through_f32_casts(y)
    if _call_name(y) != "mul.Tensor":
        return None
    x, r = y.args  # type: ignore[union-attr]
    if _call_name(r) != "rsqrt.default" and _call_name(x) == "rsqrt.default":
        x, r = r, x
    add = r.args[0] if _call_name(r) == "rsqrt.default" else None
    if _call_name(add) != "add.Tensor" or not isinstance(add.args[1], float) or not isinstance(x, fx.Node):
        return None
    mean = add.args[0]
    if _call_name(mean) != "mean.dim" or list(mean.args[1]) not in ([-1], [x.meta["val"].dim() - 1]):
        return None
    if not (len(mean.args) > 2 and mean.args[2]):  # keepdim
        return None
    sq = mean.args[0]
    if _call_name(sq) != "pow.Tensor_Scalar" or sq.args[1] != 2:
        return None
    if _through_f32_casts(sq.args[0]) is not _through_f32_casts(x):
        return None
    return RMSNormMatch(x, w, float(add.args[1]), offset)  # type: ignore[arg-type]


@dataclass(frozen=True)
class GatedMatch:
    """``silu(gate) · up`` (a SwiGLU MLP's input to its down projection)."""

    gate: fx.Node
    up: fx.Node


def silu_gate_source(node: object) -> GatedMatch | None:
    """The ``silu(gate) · up`` that ``node`` computes (either operand order, same shapes), else None."""
    if _call_name(node) != "mul.Tensor":
        return None
    assert isinstance(node, fx.Node)
    a, b = node.args[:2]
    if _call_name(a) != "silu.default":
        a, b = b, a
    if _call_name(a) != "silu.default" or not isinstance(b, fx.Node):
        return None
    gate = a.args[0]  # type: ignore[union-attr]
    gv, uv = getattr(gate, "meta", {}).get("val"), b.meta.get("val")
    if not (isinstance(gv, torch.Tensor) and isinstance(uv, torch.Tensor)) or gv.shape != uv.shape:
        return None
    return GatedMatch(gate, b)  # type: ignore[arg-type]


def gqa_unrepeat(node: fx.Node) -> tuple[fx.Node, int]:
    """(K/V before the grouped-query repeat, repeat count): matches ``reshape(expand(unsqueeze(x, 2)))``
    that turns ``[B, KVH, L, D]`` into ``[B, KVH·g, L, D]``; anything else is itself with count 1."""
    exp = node.args[0] if _call_name(node) in _REPEAT_RESHAPES and node.args else None
    uns = exp.args[0] if _call_name(exp) == "expand.default" and exp.args else None  # type: ignore[union-attr]
    if _call_name(uns) != "unsqueeze.default" or len(uns.args) < 2 or uns.args[1] != 2:  # type: ignore[union-attr]
        return node, 1
    src = uns.args[0]  # type: ignore[union-attr]
    sval = src.meta.get("val") if isinstance(src, fx.Node) else None
    eval_ = exp.meta.get("val")  # type: ignore[union-attr]
    if not (isinstance(sval, torch.Tensor) and isinstance(eval_, torch.Tensor)) or (sval.dim(), eval_.dim()) != (4, 5):
        return node, 1
    b, kvh, length, dim = sval.shape
    shape = eval_.shape
    if shape[0] == b and shape[1] == kvh and shape[3] == length and shape[4] == dim:
        return src, int(shape[2])
    return node, 1
