"""Block-wise stage of decoupleQ: with the integer codes of a decoder block frozen, train its linears'
scales and offsets and its norm weights so that the block's output matches the float block's.

:class:`BlockTrainer` takes a block (:mod:`qcompile.ir.blocks`: the nodes under a module-path prefix, found
in the graph) and calibration windows holding the block's inputs (produced by the already-quantized
earlier blocks) and its float outputs on those inputs (the targets: as in GPTQ's and decoupleQ's
sequential calibration, the float block sees the quantized model's inputs; ``quantize_weights`` records
both before it quantizes the block). It runs the block alone with each quantized linear's weight rebuilt
as ``codes·scale + offset`` and with the norm weights feeding the block's linears (graph-matched norms,
:func:`qcompile.ir.patterns.find_scale_groups`) as trainable values. The parameters are relative, all
starting at 0, so one learning rate suits every layer's magnitude: ``scale = s0·(1 + a)``,
``offset = m0 + s0·b`` (``b`` in steps of the grid), ``norm = n0·(1 + c)``. Adam, one step per
calibration window, ``epochs`` passes; the loss is the mean squared error over the block's outputs. The
trained values are kept only when the mean loss over the windows dropped and every value is finite;
otherwise the block keeps its solver's scales (the report says which). The program's state is updated in
place: the dequantized weights, the norm weights, and the scales and offsets in ``out``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from qcompile.ir.blocks import Block, BlockWindow, run_block
from qcompile.ir.patterns import find_scale_groups
from qcompile.ir.program import Program
from qcompile.quant.finite import is_finite
from qcompile.quant.quantizer import dequantize_weight_groups
from qcompile.quant.spec import QuantSpec

Codes = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


@dataclass(frozen=True)
class BlockTrainer:
    epochs: int
    lr: float
    progress: bool = False

    def train(
        self,
        program: Program,
        block: Block,
        windows: list[BlockWindow],
        items: list[tuple[str, str, QuantSpec]],
        out: dict[str, Codes],
    ) -> dict[str, Any]:
        """Train the block's scales, offsets and norm weights; updates ``program.state`` and ``out``."""
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        keys = {k for k, _, _ in items}
        groups = {k: spec.block(program.state[k].shape[1]) for k, _, spec in items}
        # relative parameters, all starting at 0 (so one learning rate suits every layer's magnitude):
        # scale = s0·(1 + a), offset = m0 + s0·b (b in steps of the grid), norm weight = n0·(1 + c)
        params: dict[str, torch.Tensor] = {}
        base: dict[str, torch.Tensor] = {}
        for k in keys:
            _, scale, offset = out[k]
            base[f"{k}#scale"] = scale.detach().to(torch.float32)
            params[f"{k}#scale"] = torch.zeros_like(base[f"{k}#scale"], requires_grad=True)
            if offset is not None:
                base[f"{k}#offset"] = offset.detach().to(torch.float32)
                params[f"{k}#offset"] = torch.zeros_like(base[f"{k}#offset"], requires_grad=True)
        norms = []
        for g in find_scale_groups(program, norms=True):
            if g.producer == "norm" and set(g.linears) <= keys:
                for nk in (g.producer_weight, g.producer_bias):
                    if nk is not None and nk not in params:
                        base[nk] = program.state[nk].detach().to(torch.float32)
                        params[nk] = torch.zeros_like(base[nk], requires_grad=True)
                        norms.append(nk)

        def grid(k: str) -> tuple[torch.Tensor, torch.Tensor | None]:
            s0 = base[f"{k}#scale"]
            s = s0 * (1 + params[f"{k}#scale"])
            m = base[f"{k}#offset"] + s0 * params[f"{k}#offset"] if f"{k}#offset" in params else None
            return s, m

        def overrides() -> dict[str, torch.Tensor]:
            o = {k: base[k] * (1 + params[k]) for k in norms}
            for k in keys:
                o[k] = dequantize_weight_groups(out[k][0], *grid(k), groups[k])
            return o

        def loss(w: BlockWindow) -> torch.Tensor:
            outs = run_block(program, block, w, overrides())
            terms = [
                torch.nn.functional.mse_loss(o, w.outputs[n])
                for o, n in zip(outs, block.outputs)
                if isinstance(o, torch.Tensor) and o.is_floating_point()
            ]
            return torch.stack(terms).mean()

        def mean_loss() -> float:
            with torch.no_grad():
                return float(sum(float(loss(w)) for w in windows) / len(windows))

        before = mean_loss()
        opt = torch.optim.Adam(list(params.values()), lr=self.lr)
        steps = [(e, w) for e in range(self.epochs) for w in windows]
        bar = tqdm(steps, desc=f"block-wise {block.prefix}", disable=not self.progress, unit="step", leave=False)
        with torch.enable_grad():
            for _, w in bar:
                opt.zero_grad()
                value = loss(w)
                value.backward()
                opt.step()
        after = mean_loss()
        kept = after < before and all(is_finite(p.detach()) for p in params.values())
        if kept:
            with torch.no_grad():
                for k in keys:
                    codes = out[k][0]
                    s, m = grid(k)
                    out[k] = (codes, s.detach().clone(), None if m is None else m.detach().clone())
                    dtype = program.state[k].dtype
                    program.state[k] = dequantize_weight_groups(codes, s, m, groups[k]).to(dtype)
                for nk in norms:
                    program.state[nk] = (base[nk] * (1 + params[nk])).detach().to(program.state[nk].dtype)
        return {
            "mse_before": float(f"{before:.6g}"),
            "mse_after": float(f"{after:.6g}"),
            "kept": kept,
            "norms": norms,
            "steps": len(steps),
            "seconds": round(time.perf_counter() - t0, 3),
        }


__all__ = ["BlockTrainer"]
