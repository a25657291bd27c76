"""hadamard: rotate the inputs of linears by block-diagonal normalized Hadamards (QuEST, QuaRot).

What it does: for every ``aten.linear`` with a constant weight (:func:`qcompile.ir.patterns.find_linears`)
that the plan does not keep in float (its ``skip`` globs and rules, so the lm_head stays as it is by
default), the input ``x`` is replaced by ``x·H`` and the weight ``W`` by ``W·H``, with ``H`` the
block-diagonal Sylvester Hadamard of :mod:`qcompile.quant.hadamard` (blocks of at most ``max_block``,
cut by ``rule``). Since ``H`` is orthogonal, ``(x·H)(W·H)ᵀ = x·Wᵀ``: without quantization the model
computes the same function up to float rounding (the tests check 1e-5). After the rotation a layer's
input and weight rows are near-Gaussian (outlier channels are spread over their block), which is
what QuEST's RMS-scaled grid assumes.

Where the rotation of ``x`` comes from:

* **folded** (no run-time cost): when ``x`` is the attention output over a V projection's heads
  (found by graph matching: :func:`qcompile.ir.patterns.find_scale_groups` with ``value_out``, GQA
  head maps included), V's output rows are rotated inside each head (``W_v ← H·W_v``, ``b_v ← b_v·H``,
  blocks of the largest power of two ≤ ``max_block`` dividing the head dim); attention mixes tokens,
  not channels, so the o-projection's input arrives rotated. V and o must both be rotated layers
  whose weights nothing else reads;
* **online**: otherwise one ``qcompile::hadamard`` op (the fast Walsh–Hadamard butterfly) is inserted
  after ``x``, once per input node, shared by every rotated linear reading it (a norm's output feeding
  q/k/v, gate/up; the gated product feeding down).

A linear that cannot be rotated is listed in ``skipped`` with the reason (its weight is read by
something else than rotated linears, e.g. an embedding it is tied to, or by a linear the plan keeps
in float). The notes give, per linear, ``online`` or ``folded`` and the blocks; the summary counts them.

Requires: float linears (it runs before ``quantize_weights``, which then quantizes the rotated
weights) and the captured attention. Provides ``rotated``. The K/V caches hold the rotated V.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from qcompile.errors import PlanError
from qcompile.ir.facts import Fact
from qcompile.ir.patterns import LinearMatch, attention_value_output, find_linears, find_scale_groups, non_linear_uses
from qcompile.ir.program import PATH_KEY, Program
from qcompile.passes.base import Pass, PassContext, PassResult, register_pass
from qcompile.quant.hadamard import BlockRule, hadamard_blocks, is_power_of_two, rotate_columns, rotate_rows


@register_pass
@dataclass(frozen=True)
class HadamardRotation(Pass):
    name: ClassVar[str] = "hadamard"
    requires: ClassVar[frozenset[Fact]] = frozenset({Fact.CAPTURED, Fact.FLOAT_LINEARS, Fact.KV_ATTENTION})
    provides: ClassVar[frozenset[Fact]] = frozenset({Fact.ROTATED})

    max_block: int = 128  # the largest Hadamard block (a power of two)
    rule: BlockRule = BlockRule.GREEDY  # how widths max_block does not divide are cut
    fold_value_out: bool = True  # fold o_proj's rotation into v_proj's rows (else online)

    def __post_init__(self) -> None:
        if not is_power_of_two(self.max_block) or self.max_block < 2:
            raise PlanError(f"hadamard: max_block must be a power of two >= 2 (e.g. 128), got {self.max_block!r}")
        if not isinstance(self.rule, BlockRule):
            object.__setattr__(self, "rule", BlockRule(self.rule))

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        matches = list(find_linears(program))
        skipped: dict[str, str] = {}
        uses: dict[str, list[LinearMatch]] = {}
        for m in matches:
            uses.setdefault(m.weight_key, []).append(m)
        # a weight can be rotated when every linear reading it is rotated and nothing else reads it
        rotatable: set[str] = set()
        for wkey, ms in uses.items():
            kept = [m.path for m in ms if ctx.plan.resolve(m.path).skip]
            if len(kept) == len(ms):
                for m in ms:
                    skipped[m.path] = "kept in float by the plan (skip glob or rule): not rotated"
                continue
            other = non_linear_uses(program, wkey)
            reason = (
                f"its weight {wkey!r} is also read by {', '.join(other)}; rotating it would change those"
                if other
                else f"its weight {wkey!r} is shared with {', '.join(kept)}, which the plan keeps in float"
                if kept
                else ""
            )
            if reason:
                for m in ms:
                    skipped[m.path] = f"cannot be rotated: {reason}"
                continue
            rotatable.add(wkey)

        folded = self._fold_value_out(program, rotatable) if self.fold_value_out else {}
        layers: dict[str, dict[str, Any]] = {}
        for wkey, (vkey, blocks) in folded.items():
            for m in uses[wkey]:
                layers[m.path] = {"input": "folded", "into": uses[vkey][0].path, "blocks": list(blocks)}

        online: dict[tuple[str, fx.Node], fx.Node] = {}  # (entry, input node) -> its hadamard node
        col_blocks: dict[str, tuple[int, ...]] = {}
        touched: set[str] = set()
        for m in matches:
            if m.weight_key not in rotatable:
                continue
            k = int(program.state[m.weight_key].shape[1])
            fold = folded.get(m.weight_key)
            blocks = fold[1] if fold else hadamard_blocks(k, self.max_block, self.rule)
            col_blocks[m.weight_key] = blocks
            if m.weight_key in folded:
                continue
            ctx.at(m.entry, m.node)
            x = m.node.args[0]
            assert isinstance(x, fx.Node)
            rot = online.get((m.entry.name, x))
            if rot is None:
                graph = m.entry.graph.graph
                with graph.inserting_after(x):
                    rot = graph.call_function(torch.ops.qcompile.hadamard.default, (x, list(blocks)))
                rot.meta.update({k2: v for k2, v in x.meta.items() if k2 in ("val", "nn_module_stack", "stack_trace")})
                rot.meta[PATH_KEY] = str(x.meta.get(PATH_KEY) or m.path)
                online[(m.entry.name, x)] = rot
                touched.add(m.entry.name)
            elif tuple(rot.args[1]) != blocks:  # type: ignore[arg-type]
                raise AssertionError(f"one input rotated with two block sets at {m.path!r}")
            m.node.replace_input_with(x, rot)
            layers.setdefault(m.path, {"input": "online", "blocks": list(blocks)})
        ctx.at(None, None)
        for wkey, blocks in col_blocks.items():
            program.state[wkey] = rotate_columns(program.state[wkey], blocks)
        if touched:
            program.finish_rewrite(touched)
        n_online = len({id(n) for n in online.values()})
        notes = {"layers": layers, "online_ops": n_online, "folded": len(folded)}
        return PassResult(
            program,
            modified=bool(col_blocks),
            layers_changed=list(layers),
            skipped=sorted(skipped.items()),
            notes=notes,
        )

    def _fold_value_out(self, program: Program, rotatable: set[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Rotate V's output rows per head for every v→o pair found; returns o weight key -> (V weight key,
        the blocks of o's input rotation)."""
        head_dims: dict[str, int] = {}  # o weight key -> head dim of the attention feeding it
        for m in find_linears(program):
            x = m.node.args[0]
            if isinstance(x, fx.Node) and (found := attention_value_output(x, m.entry.bindings())) is not None:
                head_dims[m.weight_key] = found[2]
        out: dict[str, tuple[str, tuple[int, ...]]] = {}
        producers: set[str] = set()
        for g in find_scale_groups(program, norms=False, value_out=True):
            if g.producer != "linear" or len(g.linears) != 1:
                continue
            okey, vkey = g.linears[0], g.producer_weight
            hd = head_dims.get(okey)
            if hd is None or okey not in rotatable or vkey not in rotatable or vkey == okey or vkey in producers:
                continue
            b = min(hd & -hd, self.max_block)  # the largest power of two dividing the head dim, capped
            if b < 2:
                continue
            n_v = int(program.state[vkey].shape[0])
            k_o = int(program.state[okey].shape[1])
            program.state[vkey] = rotate_rows(program.state[vkey], (b,) * (n_v // b))
            if g.producer_bias is not None:
                program.state[g.producer_bias] = rotate_rows(program.state[g.producer_bias], (b,) * (n_v // b))
            producers.add(vkey)
            out[okey] = (vkey, (b,) * (k_o // b))
        return out

    @classmethod
    def summarize(cls, notes: dict[str, Any]) -> list[str]:
        layers = notes.get("layers") or {}
        sizes = sorted({b for v in layers.values() for b in v["blocks"]}, reverse=True)
        return [
            f"hadamard: {len(layers)} linear(s) rotated ({sum(v['input'] == 'folded' for v in layers.values())} "
            f"folded into the V projection, the rest by {notes.get('online_ops', 0)} online op(s)); blocks {sizes}"
        ]
