"""Per-step profile of SmolLM2-135M's decode step on the TVM CPU backend: kernels (linear, lm_head,
attention, cache writes, other), VM overhead and Python overhead (see :mod:`qcompile.codegen.tvm.profile`).

    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/decode_profile.py --plans w4a16-rtn-g128,w8a8-rtn

Each plan (with ``--compare``: twice, the pre-issue-21 decode path too, measured alternately in the same
run, and both must generate the same tokens): compiled with ``--max-cache-len`` (default 256, the static
cache the e2e rows use), a ``--prompt``-token prompt (calibration split) prefilled, then ``--steps``
decode steps at the next position timed; also greedy decode tokens/s of ``--new`` tokens (best of
``--repeat``). Prints one JSON line per plan and a markdown table; ``--json`` writes the records.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import qcompile  # noqa: E402
from qcompile.codegen.tvm.profile import CATEGORIES, profile_entry  # noqa: E402
from qcompile.eval.datasets import calibration_tokens  # noqa: E402
from qcompile.eval.harness import best_generation, machine  # noqa: E402
from qcompile.eval.zoo import load_model  # noqa: E402


def compile_plan(model: torch.nn.Module, plan: str, max_cache_len: int, before: bool) -> Any:
    """``plan`` compiled for the TVM CPU backend; ``before``: the way decode ran before issue 21 (every
    weight a VM argument, every generate() step a checked run_entry call, attention over every cache slot)."""
    import qcompile.codegen.tvm as tvm_backend
    from qcompile.codegen.tvm.kernels import attention

    tvm_backend.BIND_WEIGHTS = attention.PREFIX_KEYS = not before
    try:
        cm = qcompile.compile(model, plan=plan, backend="tvm", max_cache_len=max_cache_len)
    finally:
        tvm_backend.BIND_WEIGHTS = attention.PREFIX_KEYS = True
    cm._fast_decode = not before
    return cm


def measure(cm: Any, plan: str, ids: torch.Tensor, a: argparse.Namespace) -> dict[str, Any]:
    best, out = best_generation(cm, ids, a.new, a.repeat)
    vocab = int(cm.run_entry("prefill", ids, torch.arange(ids.shape[1])).shape[-1])
    nxt, pos = out[:, ids.shape[1] : ids.shape[1] + 1], torch.tensor([ids.shape[1]])
    prof = profile_entry(cm, "decode", [nxt, pos], steps=a.steps, vocab=vocab)
    return {
        "plan": plan,
        "decode_tok_s": round(best.decode_tokens_per_s, 2),
        "tokens": out[0].tolist(),
        **prof.to_dict(),
    }


def profile_plan(model: torch.nn.Module, plan: str, ids: torch.Tensor, a: argparse.Namespace) -> list[dict[str, Any]]:
    """The plan's records: [after], or with ``--compare`` [before, after] measured alternately (``--rounds``
    rounds; each variant's round with the fastest decode is kept)."""
    variants = ["before", "after"] if a.compare else ["after"]
    cms = {v: compile_plan(model, plan, a.max_cache_len, v == "before") for v in variants}
    best: dict[str, dict[str, Any]] = {}
    for _ in range(a.rounds):
        for v in variants:
            rec = measure(cms[v], plan, ids, a)
            rec["label"] = f"{v} {plan}" if a.compare else plan
            rec["load_1min"] = round(os.getloadavg()[0], 2)
            if v not in best or rec["decode_tok_s"] > best[v]["decode_tok_s"]:
                best[v] = rec
    if a.compare and best["before"]["tokens"] != best["after"]["tokens"]:
        raise SystemExit(f"{plan}: the bound-weight decode generated other tokens than the old path")
    return [best[v] for v in variants]


def table(recs: list[dict[str, Any]]) -> str:
    head = "| plan | decode tok/s | step ms | Python ms | VM overhead ms | " + " | ".join(f"{c} ms" for c in CATEGORIES)
    lines = [head + " | VM args | builtin calls | load |", "|---|" + "---:|" * (7 + len(CATEGORIES))]
    for r in recs:
        km = r["kernel_ms"]
        builtins = sum(r["builtin_calls"].values())
        lines.append(
            f"| {r['label']} | {r['decode_tok_s']:.2f} | {r['step_ms'] or r['call_ms']:.2f} | {r['python_ms']:.2f} | "
            f"{r['vm_overhead_ms']:.2f} | " + " | ".join(f"{km[c]:.2f}" for c in CATEGORIES) + f" | {r['vm_args']} | "
            f"{builtins} | {r['load_1min']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans", default="w4a16-rtn-g128,w8a8-rtn")
    ap.add_argument(
        "--model",
        default="smollm2-135m",
        help="a zoo language model, or tiny-llama-30 (random, hidden 64, 30 layers: a step almost all overhead)",
    )
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--max-cache-len", type=int, default=256)
    ap.add_argument("--compare", action="store_true", help="also the pre-issue-21 decode path, same run, alternated")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("TVM_NUM_THREADS", "2")))
    if a.model == "tiny-llama-30":  # SmolLM2's depth and per-layer graph, kernels too small to matter
        from qcompile.eval.zoo import tiny_llama

        model = tiny_llama(vocab=256, layers=30)
        ids = torch.randint(0, 256, (1, a.prompt), generator=torch.Generator().manual_seed(0))
    else:
        zm = load_model(a.model)
        model = zm.model
        ids = calibration_tokens(zm.tokenizer, 1, a.prompt)[:, : a.prompt]
    load = os.getloadavg()[0]
    recs = []
    for plan in a.plans.split(","):
        for rec in profile_plan(model, plan, ids, a):
            print(json.dumps({k: v for k, v in rec.items() if k != "tokens"}), flush=True)
            recs.append(rec)
    meta = {
        "model": a.model,
        "command": "python benchmarks/decode_profile.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="minutes"),
        "machine": machine(),
        "load_1min": [round(load, 2), round(os.getloadavg()[0], 2)],
    }
    print(json.dumps(meta))
    print(table(recs))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({**meta, "rows": recs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
