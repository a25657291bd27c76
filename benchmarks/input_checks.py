"""What the index checks cost: decode speed with the token-id / cache-position checks on and off.

    .venv/bin/python benchmarks/input_checks.py                      # tiny Llama and SmolLM2-135M
    .venv/bin/python benchmarks/input_checks.py --models tiny --steps 200

For each model (TVM backend, plan ``--plan``, batch 1): the check alone (``check_index_values`` on
a decode call's inputs, microseconds per call), then decode steps at consecutive positions with
the check on and off, interleaved in blocks so that drift of a shared machine hits both alike;
tokens/s is the median block's. Prints a table with the CPU and date; ``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import qcompile  # noqa: E402
from qcompile.runtime.compiled import CompiledModule, check_index_values  # noqa: E402


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = fields.get("Model name", "unknown CPU").strip()
    return f"{name}, {fields.get('CPU(s)', '?').strip()} CPUs"


def load(name: str, plan: str, cache: int) -> CompiledModule:
    if name == "tiny":
        from qcompile.eval.zoo import tiny_llama

        model: Any = tiny_llama()
    else:
        from qcompile.eval.zoo import load_model

        model = load_model(name).model
    return qcompile.compile(model, plan=plan, max_cache_len=cache, backend="tvm")


def check_cost_us(cm: CompiledModule, calls: int) -> float:
    bounds = cm.index_bounds["decode"].bounds
    inputs = [torch.tensor([[1]]), torch.tensor([5])]
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            check_index_values("decode", bounds, inputs)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def decode_block(cm: CompiledModule, start: int, steps: int, checks: bool) -> float:
    """Seconds per decode step over ``steps`` steps from position ``start``."""
    cm._check_indices = checks
    tok = torch.tensor([[1]])
    t0 = time.perf_counter()
    for p in range(start, start + steps):
        cm.run_entry("decode", tok, torch.tensor([p]))
    cm._check_indices = True
    return (time.perf_counter() - t0) / steps


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    cm = load(name, args.plan, args.cache)
    build = time.perf_counter() - t0
    assert cm.backend == "tvm", cm.backend
    check_us = check_cost_us(cm, 2000)
    prompt = torch.arange(1, 9).view(1, -1)
    cm.run_entry("prefill", prompt, torch.arange(8))
    decode_block(cm, 8, 5, True)  # warm up
    on: list[float] = []
    off: list[float] = []
    for i in range(args.blocks):
        order = (True, False) if i % 2 == 0 else (False, True)
        for checks in order:
            (on if checks else off).append(decode_block(cm, 8, args.steps, checks))
    step_on, step_off = statistics.median(on), statistics.median(off)
    return {
        "model": name,
        "plan": args.plan,
        "build_s": round(build, 1),
        "check_us": round(check_us, 2),
        "decode_tok_s_checks_on": round(1 / step_on, 1),
        "decode_tok_s_checks_off": round(1 / step_off, 1),
        "step_ms_on": round(step_on * 1e3, 4),
        "step_ms_off": round(step_off * 1e3, 4),
        "check_share_of_step": round(check_us * 1e-6 / step_off, 5),
    }


def table(rows: list[dict[str, Any]], header: str) -> str:
    lines = [
        header,
        "",
        "| model | plan | check alone (µs) | decode tok/s, checks on | checks off | check / step |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['plan']} | {r['check_us']:.1f} | {r['decode_tok_s_checks_on']:.1f} | "
            f"{r['decode_tok_s_checks_off']:.1f} | {r['check_share_of_step'] * 100:.2f} % |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,smollm2-135m")
    ap.add_argument("--plan", default="w8a8-rtn")
    ap.add_argument("--cache", type=int, default=256)
    ap.add_argument("--steps", type=int, default=100, help="decode steps per block")
    ap.add_argument("--blocks", type=int, default=6, help="blocks per setting (interleaved on/off)")
    ap.add_argument("--json", default=None, help="write the rows and the machine here")
    args = ap.parse_args()
    if 8 + args.steps > args.cache:
        ap.error("--steps + 8 must fit in --cache")
    rows = [measure(m, args) for m in args.models.split(",")]
    when = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    header = f"{cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} torch threads; {when}"
    print(table(rows, header))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": header, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
