"""The IR: a Program is one or more torch.export ATen graphs sharing one set of tensors.

Each :class:`Entry` is a lifted ``torch.fx.GraphModule`` (the graph ``torch.export`` produces):
its leading placeholders are bound to tensors of the Program's ``state`` (parameters, buffers,
constants, keyed by a stable name) or ``cache`` (buffers the graph mutates in place, such as a
static KV cache; the runtime owns them), the remaining placeholders are the user's inputs.

Every ``call_function`` node carries ``node.meta["qcompile_path"]``: the module path of the
innermost ``nn.Module`` that produced it (``"model.layers.3.mlp.down_proj"``), relative to the
user's model. Plan rules match on these paths.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from qcompile.errors import VerifyError
from qcompile.ir.facts import CAPTURED_FACTS, Fact

PATH_KEY = "qcompile_path"


class SlotKind(str, enum.Enum):
    STATE = "state"  # read-only tensor of Program.state (weights, buffers, constants)
    CACHE = "cache"  # tensor of Program.cache_specs, owned by the runtime, mutated in place
    USER = "user"  # a user input


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a user input. A dimension is an int, or a name of a dynamic dimension."""

    shape: tuple[int | str, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "int64"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def describe(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"


@dataclass(frozen=True)
class DimRange:
    """Range of a dynamic dimension (inclusive)."""

    min: int
    max: int


@dataclass(frozen=True)
class Slot:
    """What one placeholder of an entry's graph is bound to."""

    kind: SlotKind
    name: str  # key into state / cache, or the user input's name


@dataclass
class Entry:
    """One entry point of a Program (``forward``, ``prefill``, ``decode``...)."""

    name: str
    graph: fx.GraphModule
    slots: list[Slot]  # one per placeholder, in order
    user_inputs: list[TensorSpec]  # specs of the USER slots, in order
    examples: list[torch.Tensor]  # the inputs the entry was captured with (valid values)
    dims: dict[str, DimRange] = field(default_factory=dict)
    out_spec: str = ""  # torch.utils._pytree.treespec_dumps of the outputs

    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.graph.graph.nodes if n.op == "placeholder"]

    def state_names(self) -> list[str]:
        return [s.name for s in self.slots if s.kind is SlotKind.STATE]

    def state_input(self, key: str) -> fx.Node:
        """The placeholder bound to state ``key``, added (before the user inputs) if missing."""
        placeholders = self.placeholders()
        for slot, node in zip(self.slots, placeholders):
            if slot.kind is SlotKind.STATE and slot.name == key:
                return node
        first_user = next((i for i, s in enumerate(self.slots) if s.kind is SlotKind.USER), len(self.slots))
        graph = self.graph.graph
        if first_user < len(placeholders):
            ctx = graph.inserting_before(placeholders[first_user])
        elif placeholders:
            ctx = graph.inserting_after(placeholders[-1])
        else:
            ctx = graph.inserting_before(next(iter(graph.nodes), None))
        with ctx:
            node = graph.placeholder(_py_name(key))
        node.meta[PATH_KEY] = ""
        self.slots.insert(first_user, Slot(SlotKind.STATE, key))
        return node

    def remove_unused_placeholders(self) -> None:
        """Drop STATE placeholders nothing uses (and their slots)."""
        keep: list[Slot] = []
        for slot, node in zip(list(self.slots), self.placeholders()):
            if slot.kind is SlotKind.STATE and not node.users:
                self.graph.graph.erase_node(node)
            else:
                keep.append(slot)
        self.slots = keep

    def bindings(self) -> dict[fx.Node, Slot]:
        """Placeholder → slot, for looking up many nodes in one pass over the graph."""
        return dict(zip(self.placeholders(), self.slots, strict=True))

    def slot_of(self, node: fx.Node) -> Slot:
        """The slot bound to placeholder ``node``."""
        return self.bindings()[node]

    def replace_call(self, node: fx.Node, target: Any, args: tuple) -> fx.Node:
        """Replace call ``node`` by ``target(*args)``, an op with the same output (shape and dtype), keeping
        its module path, stack metadata and output value description (``meta['val']``)."""
        graph = self.graph.graph
        with graph.inserting_after(node):
            new = graph.call_function(target, args)
        keep = (PATH_KEY, "nn_module_stack", "stack_trace", "val")
        new.meta.update({k: v for k, v in node.meta.items() if k in keep})
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        return new


@dataclass
class Program:
    """A captured model: entries, shared state, cache specs and metadata.

    Besides the graphs and tensors, a Program carries typed facts that later stages rely on:
    ``weight_bits`` (the bit width of every state tensor that holds quantized weight codes stored
    one code per int8/uint8; densely packed codes carry their width in the op's arguments),
    ``cache_bits`` (the same for code caches),
    ``fp16_kv_bytes`` (bytes per token of the fp16 K/V cache that a rewritten cache replaces) and
    ``facts`` (what form the Program is in: see :mod:`qcompile.ir.facts`). ``meta`` holds
    descriptive, JSON-serializable facts from capture (kind, vocabulary size, cache length...).
    """

    entries: dict[str, Entry]
    state: dict[str, torch.Tensor]
    cache_specs: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # name -> (shape, dtype)
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-serializable facts (kind, config...)
    weight_bits: dict[str, int] = field(default_factory=dict)  # state key of one-per-byte weight codes -> bits
    cache_bits: dict[str, int] = field(default_factory=dict)  # cache key of code caches -> bits
    fp16_kv_bytes: int | None = None  # bytes/token of the fp16 K/V cache a rewritten cache replaces
    facts: frozenset[Fact] = CAPTURED_FACTS

    # ---- navigation ----------------------------------------------------------------------
    def nodes(self) -> Iterator[tuple[Entry, fx.Node]]:
        for entry in self.entries.values():
            for node in entry.graph.graph.nodes:
                yield entry, node

    def module_paths(self) -> set[str]:
        return {n.meta[PATH_KEY] for _, n in self.nodes() if n.meta.get(PATH_KEY)}

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind", "module"))

    def new_cache(self) -> dict[str, torch.Tensor]:
        """Fresh zero-filled cache tensors (a new generation starts from these)."""
        return {k: torch.zeros(shape, dtype=getattr(torch, dt)) for k, (shape, dt) in self.cache_specs.items()}

    def add_state(self, name: str, tensor: torch.Tensor) -> str:
        """Add a tensor to the shared state under a unique name derived from ``name``."""
        key, i = name, 1
        while key in self.state:
            key = f"{name}_{i}"
            i += 1
        self.state[key] = tensor
        return key

    def bits_of(self, key: str) -> int:
        """The bit width of the quantized codes in state tensor ``key`` (a VerifyError when the
        Program records none: codes of unknown width cannot be run or lowered)."""
        if key not in self.weight_bits:
            raise VerifyError(
                f"state tensor {key!r} holds quantized codes but the Program records no bit width for it "
                "(Program.weight_bits); the pass that wrote it, or the artifact, is broken"
            )
        return int(self.weight_bits[key])

    def finish_rewrite(self, entry_names: set[str]) -> None:
        """After a pass rewrote ``entry_names``: drop unused placeholders and state, regenerate code."""
        for name in entry_names:
            self.entries[name].remove_unused_placeholders()
            self.entries[name].graph.recompile()
        self.prune_state()

    def prune_state(self) -> list[str]:
        """Drop state tensors no entry refers to; returns the dropped names."""
        used = {s.name for e in self.entries.values() for s in e.slots if s.kind is SlotKind.STATE}
        dropped = [k for k in self.state if k not in used]
        for k in dropped:
            del self.state[k]
            self.weight_bits.pop(k, None)
        return dropped

    def copy(self) -> Program:
        """A copy whose graphs can be rewritten without touching this one (tensors are shared)."""
        entries = {}
        for name, e in self.entries.items():
            gm = fx.GraphModule(e.graph, _deepcopy_graph(e.graph.graph))
            entries[name] = dataclasses.replace(e, graph=gm, slots=list(e.slots), dims=dict(e.dims))
        return Program(
            entries,
            dict(self.state),
            dict(self.cache_specs),
            copy.deepcopy(self.meta),
            dict(self.weight_bits),
            dict(self.cache_bits),
            self.fp16_kv_bytes,
            self.facts,
        )

    def packed_weight_bytes(self) -> int:
        """Bytes of the state if every quantized weight were bit-packed at its own bit-width."""
        total = 0
        for k, t in self.state.items():
            bits = self.weight_bits.get(k)
            total += (t.numel() * bits + 7) // 8 if bits is not None else t.numel() * t.element_size()
        return total

    def cache_bytes_per_token(self) -> int | None:
        """Bytes of cache per cached token (all layers, all cache tensors with a sequence axis of
        ``meta['max_cache_len']``, scales included; caches listed in ``cache_bits`` count
        as bit-packed at that width); None when the Program has no cache."""
        length = self.meta.get("max_cache_len")
        if not self.cache_specs or not length:
            return None
        bits = self.cache_bits
        total = 0
        for key, (shape, dt) in self.cache_specs.items():
            if int(length) in shape:
                per_token = math.prod(shape) // int(length)
                total += (
                    (per_token * int(bits[key]) + 7) // 8 if key in bits else per_token * getattr(torch, dt).itemsize
                )
        return total

    def fp16_kv_bytes_per_token(self) -> int | None:
        """Bytes per token of the fp16 K/V cache this Program's cache replaces (or, for a plain KV
        cache, of it stored in fp16): the reference for cache savings."""
        if self.fp16_kv_bytes is not None:
            return self.fp16_kv_bytes
        length = self.meta.get("max_cache_len")
        if not self.cache_specs or not length:
            return None
        total = 0
        for shape, dt in self.cache_specs.values():
            if int(length) in shape and getattr(torch, dt).is_floating_point:
                total += 2 * math.prod(shape) // int(length)
        return total or None

    def weight_bytes_by_dtype(self) -> dict[str, int]:
        """Bytes of state tensors by dtype (what the model weighs on disk and in memory)."""
        out: dict[str, int] = {}
        for t in self.state.values():
            key = str(t.dtype).removeprefix("torch.")
            out[key] = out.get(key, 0) + t.numel() * t.element_size()
        return dict(sorted(out.items()))


def _deepcopy_graph(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    new.output(new.graph_copy(graph, {}))  # node_copy copies each node's meta
    return new


def _py_name(key: str) -> str:
    """A valid Python identifier for a placeholder bound to state ``key``."""
    out = "".join(c if c.isalnum() else "_" for c in key)
    return f"s_{out}"


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")
