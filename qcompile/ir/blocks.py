"""Decoder blocks of a captured graph, found by module path, run alone on recorded inputs.

A *block* is the contiguous range of an entry's nodes, in graph order, from the first to the last node
whose module path (``PATH_KEY``) is ``prefix`` or lies under it (``model.layers.3`` covers
``model.layers.3.self_attn.q_proj``); nodes of other paths inside that range (none in a Llama block)
belong to it too. Its *inputs* are the values from outside the range that its nodes read (the residual
stream, the rotary tables and attention mask computed once for the model, and the state placeholders:
weights, norm weights); its *outputs* are the values of the range read after it (the residual stream
leaving the block). Nothing is model-specific: the range comes from the module paths the capture
records, the inputs and outputs from the graph's edges.

:class:`Stepper` runs an entry over calibration windows a stretch of nodes at a time (keeping per window
only the values later nodes read) and hands out a block's inputs per window; :func:`run_block` evaluates
the block's nodes alone on such inputs, with some state tensors overridden (trainable weights: under
``torch.enable_grad()`` the result is differentiable) and optional observers of node arguments (the
Hessians of GPTQ and decoupleQ). Calibrating blocks one after another thus costs one pass over the model.
A non-finite block input is a :class:`~qcompile.errors.NonFiniteError` naming the block and the window.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from qcompile.errors import NonFiniteError
from qcompile.ir.calib import entry_args
from qcompile.ir.program import PATH_KEY, Program, SlotKind
from qcompile.quant.finite import nonfinite_counts


@dataclass(frozen=True)
class Block:
    """The nodes of one decoder block (graph order), the values it reads from outside and the values
    read after it."""

    prefix: str
    entry: str
    nodes: tuple[fx.Node, ...]
    inputs: tuple[fx.Node, ...]
    outputs: tuple[fx.Node, ...]

    def state_inputs(self, program: Program) -> dict[str, fx.Node]:
        """State key → placeholder, for the state tensors the block reads."""
        bindings = program.entries[self.entry].bindings()
        return {bindings[n].name: n for n in self.inputs if n in bindings and bindings[n].kind is SlotKind.STATE}


def _inside(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def find_block(program: Program, prefix: str, entry: str = "forward") -> Block:
    """The block of ``entry`` whose nodes' module paths lie under ``prefix``; ValueError when none does."""
    nodes = list(program.entries[entry].graph.graph.nodes)
    idx = [i for i, n in enumerate(nodes) if n.op != "placeholder" and _inside(str(n.meta.get(PATH_KEY, "")), prefix)]
    if not idx:
        raise ValueError(f"no node of entry {entry!r} has a module path under {prefix!r}")
    body = nodes[idx[0] : idx[-1] + 1]
    inside = set(body)
    inputs: dict[fx.Node, None] = {}
    for n in body:
        for a in n.all_input_nodes:
            if a not in inside:
                inputs[a] = None
    outputs = [n for n in body if any(u not in inside for u in n.users)]
    return Block(prefix, entry, tuple(body), tuple(inputs), tuple(outputs))


@dataclass
class BlockWindow:
    """One calibration window's recorded block inputs (non-state) and outputs."""

    label: str
    inputs: dict[fx.Node, Any]
    outputs: dict[fx.Node, Any]


def windows(program: Program, batches: list[torch.Tensor], entry: str = "forward") -> list[tuple[str, torch.Tensor]]:
    """The calibration windows ``entry`` runs on: each batch, or each row of it when the entry was captured
    with a static batch of 1 (as :func:`qcompile.ir.calib.run_observed` does)."""
    if program.entries[entry].user_inputs[0].shape[0] == 1:
        return [(f"item {i}, row {r}", row[None]) for i, b in enumerate(batches) for r, row in enumerate(b)]
    return [(f"item {i}, rows 0..{b.shape[0] - 1}", b) for i, b in enumerate(batches)]


def run_block(
    program: Program,
    block: Block,
    window: BlockWindow,
    overrides: Mapping[str, torch.Tensor] | None = None,
    observe: Mapping[fx.Node, Callable[[fx.Node, tuple[Any, ...]], None]] | None = None,
) -> list[Any]:
    """The block's outputs (in ``block.outputs`` order) evaluated on ``window``'s inputs; state tensors from
    ``program.state`` unless ``overrides`` (state key → tensor, e.g. trainable parameters) replaces them.
    ``observe[node](node, args)`` is called with a node's concrete arguments before it runs."""
    interp = fx.Interpreter(program.entries[block.entry].graph, garbage_collect_values=False)
    env: dict[fx.Node, Any] = dict(window.inputs)
    for key, node in block.state_inputs(program).items():
        env[node] = overrides[key] if overrides is not None and key in overrides else program.state[key]
    interp.env = env
    for n in block.nodes:
        if observe is not None and n in observe:
            args, _ = interp.fetch_args_kwargs_from_env(n)
            observe[n](n, args)
        env[n] = interp.run_node(n)
    return [env[n] for n in block.outputs]


class Stepper:
    """Runs an entry over calibration windows a stretch of nodes at a time, keeping per window only the
    values still needed later (the residual stream at a block boundary, the rotary tables, the mask). State
    placeholders read ``program.state`` when a stretch runs, so a block quantized in between is run quantized:
    calibrating blocks one after another costs one pass over the model, not one per block."""

    def __init__(self, program: Program, batches: list[torch.Tensor], entry: str = "forward") -> None:
        self.program, self.entry = program, entry
        e = program.entries[entry]
        self.nodes = list(e.graph.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.last_use = {n: max((self.index[u] for u in n.users), default=len(self.nodes)) for n in self.nodes}
        self.state = {n: s.name for n, s in e.bindings().items() if s.kind is SlotKind.STATE}
        self.interp = fx.Interpreter(e.graph, garbage_collect_values=False)
        self.labels: list[str] = []
        self.batches: list[torch.Tensor] = []  # each window's user input
        self.envs: list[dict[fx.Node, Any]] = []
        for label, b in windows(program, batches, entry):
            args = entry_args(program, entry, [b])
            env = {n: a for n, a in zip(e.placeholders(), args) if n not in self.state}
            self.labels.append(label)
            self.batches.append(b)
            self.envs.append(env)
        self.pos = len(e.placeholders())

    def advance(self, stop: int) -> None:
        """Run nodes ``[pos, stop)`` on every window, then drop the values no later node reads."""
        todo = [n for n in self.nodes[self.pos : stop] if n.op != "output"]
        with torch.no_grad():
            for env in self.envs:
                env.update({n: self.program.state[k] for n, k in self.state.items()})
                self.interp.env = env
                for n in todo:
                    env[n] = self.interp.run_node(n)
                for n in [n for n in env if n.op != "placeholder" and self.last_use[n] < stop]:
                    del env[n]
        self.pos = max(self.pos, stop)

    def block_windows(self, block: Block) -> list[BlockWindow]:
        """Advance to the block's first node; its inputs (non-state) per window, NaN/Inf refused."""
        self.advance(self.index[block.nodes[0]])
        out = []
        for label, env in zip(self.labels, self.envs):
            inputs = {n: env[n] for n in block.inputs if n not in self.state}
            for n, v in inputs.items():
                if isinstance(v, torch.Tensor) and (c := nonfinite_counts(v)) is not None:
                    raise NonFiniteError(
                        f"the input %{n.name} of block {block.prefix!r} holds {c.describe()} in calibration window "
                        f"{label}; check the calibration data and the model's weights"
                    )
            out.append(BlockWindow(label, inputs, {}))
        return out


__all__ = ["Block", "BlockWindow", "Stepper", "find_block", "run_block", "windows"]
