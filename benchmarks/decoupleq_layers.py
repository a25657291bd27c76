"""decoupleQ layer by layer on a real model: the Hessian-weighted objective of RTN, GPTQ and decoupleQ, and
the solve time per layer.

    .venv/bin/python benchmarks/decoupleq_layers.py --model smollm2-135m --blocks 0,1 \\
        --configs 3:128,2:64 --json benchmarks/results/decoupleq-layers.json

The Hessians are those of the float model (the inputs of every ``nn.Linear`` of the chosen decoder blocks,
calibration split, 8 windows x 512 tokens as ``quantize_weights`` uses; the forward stops after the last
chosen block). Per layer and config: ``Σ_rows (w − ŵ)ᵀH(w − ŵ)`` (H damped as GPTQ, damp 0.01) of min-max
RTN, one GPTQ pass and decoupleQ (the pass's defaults: 8 iterations, GPTQ-style rounding), decoupleQ's
iterations and its wall time (on this machine, shared cores: compare within a run only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from qcompile.eval.datasets import calibration_tokens  # noqa: E402
from qcompile.eval.harness import machine  # noqa: E402
from qcompile.eval.zoo import load_model  # noqa: E402
from qcompile.quant.decoupleq import decoupleq_quantize  # noqa: E402
from qcompile.quant.gptq import Hessian  # noqa: E402


class _Stop(Exception):
    pass


def hessians(model: torch.nn.Module, tokens: torch.Tensor, blocks: list[int]) -> dict[str, Hessian]:
    """Hessians of the inputs of the linears under ``*.layers.<b>.`` for ``b`` in ``blocks``."""
    hs: dict[str, Hessian] = {}
    hooks = []
    last = None
    for name, mod in model.named_modules():
        parts = name.split(".")
        i = parts.index("layers") if "layers" in parts else -1
        if isinstance(mod, torch.nn.Linear) and 0 <= i < len(parts) - 1 and parts[i + 1].isdigit():
            if int(parts[i + 1]) in blocks:
                hs[name] = Hessian(mod.in_features)
                hooks.append(mod.register_forward_pre_hook(lambda m, a, n=name: hs[n].add(a[0].detach())))
        if name.endswith(f"layers.{max(blocks)}"):
            last = mod
    assert last is not None, "no decoder block found"

    def stop(*_a: object) -> None:
        raise _Stop

    hooks.append(last.register_forward_hook(stop))
    with torch.no_grad():
        for row in tokens:
            try:
                model(row[None])
            except _Stop:
                pass
    for h in hooks:
        h.remove()
    return hs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", default="0,1")
    ap.add_argument("--configs", default="3:128,2:64", help="bits:group_size (0: per channel), comma-separated")
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--json", default=str(HERE / "results" / "decoupleq-layers.json"))
    a = ap.parse_args(argv)
    zm = load_model(a.model)
    blocks = [int(b) for b in a.blocks.split(",")]
    tokens = calibration_tokens(zm.tokenizer, 8, 512)
    t0 = time.perf_counter()
    hs = hessians(zm.model, tokens, blocks)
    print(f"Hessians of {len(hs)} linears in {time.perf_counter() - t0:.0f} s", flush=True)
    weights = dict(zm.model.named_modules())
    rows = []
    for cfg in a.configs.split(","):
        bits, group = (int(x) for x in cfg.split(":"))
        for name, h in hs.items():
            w = weights[name].weight.detach().to(torch.float32)
            gs = group or w.shape[1]
            t = time.perf_counter()
            r = decoupleq_quantize(w, h.value(), bits, gs, iterations=a.iterations)
            sec = time.perf_counter() - t
            rows.append(
                {
                    "layer": name,
                    "shape": list(w.shape),
                    "bits": bits,
                    "group": group,
                    "rtn": r.rtn_objective,
                    "gptq": r.gptq_objective,
                    "decoupleq": list(r.objective),
                    "improved_rows": list(r.improved),
                    "seconds": round(sec, 3),
                }
            )
            print(
                f"W{bits} g{group or 'ch'} {name} {list(w.shape)}: RTN {r.rtn_objective:.4g} "
                f"GPTQ {r.gptq_objective:.4g} decoupleQ {r.objective[-1]:.4g} "
                f"({r.objective[-1] / r.gptq_objective:.3f}x GPTQ, "
                f"{len(r.objective)} it) {sec:.2f} s",
                flush=True,
            )
    out = {"model": a.model, "machine": machine(), "blocks": blocks, "calibration": "8 x 512", "rows": rows}
    Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
