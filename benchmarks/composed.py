"""Composed presets next to their parts (issue 22), on SmolLM2-135M; and the composition matrix.

    .venv/bin/python benchmarks/composed.py eval     # perplexity, weight bytes, cache bytes (appends records)
    .venv/bin/python benchmarks/composed.py speed    # decode tokens/s, TVM backend, same run for every plan
    .venv/bin/python benchmarks/composed.py matrix   # the pass x pass composition matrix (tiny Llama, tiny CNN)
    .venv/bin/python benchmarks/composed.py table    # RESULTS.md sections composed:issue-22 and composition-matrix

Perplexity: ``qcompile.eval.harness.evaluate`` on the evaluation split, 16 windows x 512 tokens, the
torch reference backend (the TVM backend computes the same integer parts; tests/codegen check that);
passes that calibrate get the calibration split (8 x 512 tokens). Weight bytes: the compiled Program's
state as stored (codes at their packed width, scales, float tensors). Cache bytes per token: all
layers, scales included. Decode speed: greedy generation after a 64-token prompt, TVM backend
(torch fallback for the ops it lacks), best of 2. JSON: benchmarks/results/composed-smollm2-135m.json,
benchmarks/results/composition-matrix.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.accuracy import write_section  # noqa: E402
from qcompile.eval.harness import TextSource, best_generation, evaluate, machine  # noqa: E402

OUT = HERE / "results" / "composed-smollm2-135m.json"
MATRIX_OUT = HERE / "results" / "composition-matrix.json"
PLANS = HERE / "plans"
# composed preset -> its parts (each measured alone in the same run)
COMPOSED: dict[str, tuple[str, ...]] = {
    "w8a8-smooth-xc4": ("w8a8-smooth", "xcache-4bit"),
    "w8a8-smooth-xc4-cache-first": ("w8a8-smooth", "xcache-4bit"),
    "w6a8-flexq-smooth-xc4": ("w6a8-flexq", "xcache-4bit"),
    "w6a8-flexq-smooth-xc4-cache-first": ("w6a8-flexq", "xcache-4bit"),
}
DEFAULT_PLANS = (
    "fp32,w8a8-smooth,w6a8-flexq,w6a8-flexq-smooth,xcache-4bit,w8a8-smooth-xc4,w6a8-flexq-smooth-xc4,"
    "w6a8-flexq-smooth-xc4-cache-first,w8a8-smooth-xc4-cache-first"
)


def plan_arg(name: str) -> str:
    """A preset name, or the YAML plan of that name in benchmarks/plans/."""
    path = PLANS / f"{name}.yaml"
    return str(path) if path.exists() else name


def _load(path: Path = OUT) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {"records": {}, "speed": {}, "commands": []}


def _save(data: dict[str, Any], path: Path = OUT) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def cmd_eval(a: argparse.Namespace) -> None:
    from qcompile.eval.zoo import load_model

    zm = load_model(a.model)
    for plan in [p.strip() for p in a.plans.split(",") if p.strip()]:
        if plan in _load()["records"] and not a.force:
            print(f"{plan}: have it, skipping (--force to redo)")
            continue
        rec = evaluate(zm, plan_arg(plan), text=TextSource(), windows=a.windows, seq=a.seq, backend="torch")
        report = rec.pop("report", {}) or {}
        rec["passes"] = [
            {"name": p["name"], "modified": p["modified"], "seconds": p["seconds"], "summary": p.get("summary")}
            for p in report.get("passes", [])
        ]
        rec["date"] = dt.datetime.now(dt.UTC).isoformat(timespec="minutes")
        data = _load()
        data["records"][plan] = rec
        data["commands"] = sorted(set(data["commands"]) | {f"python benchmarks/composed.py eval --plans {a.plans}"})
        _save(data)
        print(
            f"{plan}: ppl {rec['ppl']:.4f} weights {rec['weight_bytes_packed']} B cache {rec['cache_bytes_per_token']} "
            f"B/token, {rec['wall_seconds']:.0f} s",
            flush=True,
        )


def cmd_speed(a: argparse.Namespace) -> None:
    import qcompile
    from qcompile.eval.datasets import calibration_tokens
    from qcompile.eval.zoo import load_model

    zm = load_model(a.model)
    prompt = calibration_tokens(zm.tokenizer, 1, a.prompt)[:, : a.prompt]
    ctoks = calibration_tokens(zm.tokenizer, 8, 512)
    res = {}
    for plan in [p.strip() for p in a.plans.split(",") if p.strip()]:
        cm = qcompile.compile(
            zm.model,
            plan=plan_arg(plan),
            max_cache_len=a.max_cache_len,
            lm_entries=("prefill", "decode", "forward"),  # calibrating passes run the forward entry
            calib=ctoks,
            backend=a.backend,
        )
        best, _ = best_generation(cm, prompt, a.new, a.repeat)
        res[plan] = {
            "decode_tokens_per_s": round(best.decode_tokens_per_s, 2),
            "backend": cm.backend,
            "fallback_ops": sorted(getattr(cm, "fallback_ops", []) or []),
        }
        print(plan, res[plan], flush=True)
        del cm
    data = _load()
    data["speed"] = {
        "results": res,
        "prompt": a.prompt,
        "new_tokens": a.new,
        "max_cache_len": a.max_cache_len,
        "repeat": a.repeat,
        "machine": machine(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="minutes"),
        "command": f"python benchmarks/composed.py speed --plans {a.plans} --backend {a.backend}",
    }
    _save(data)


def cmd_matrix(a: argparse.Namespace) -> None:
    from qcompile.eval.composition import run_matrix, short_reason

    cells = run_matrix()
    data = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="minutes"),
        "machine": machine(),
        "command": "python benchmarks/composed.py matrix",
        "cells": [
            {
                "model": c.model,
                "passes": list(c.passes),
                "outcome": c.outcome,
                "reason": short_reason(c),
                "detail": c.detail,
                "error": c.error,
                "bound": c.bound,
                "modified": list(c.modified),
            }
            for c in cells
        ],
    }
    _save(data, MATRIX_OUT)
    for c in cells:
        print(f"{c.model:5} {c.label:48} {c.outcome:15} {short_reason(c)[:100]}")


def _pct(r: dict[str, Any], base: dict[str, Any]) -> float:
    return 100 * (r["ppl"] / base["ppl"] - 1)


def composed_table() -> list[str]:
    data = _load()
    recs, speed = data["records"], (data.get("speed") or {}).get("results", {})
    base = recs.get("fp32")
    if base is None:
        return ["(no fp32 record: run `benchmarks/composed.py eval` first)"]
    sp = data.get("speed") or {}
    lines = [
        "### Composed presets next to their parts (SmolLM2-135M)",
        "",
        f"- commands: {'; '.join(f'`{c}`' for c in data['commands'])}; `{sp.get('command', '(speed not run)')}`; "
        "`python benchmarks/composed.py table`",
        f"- date: {min(r['date'] for r in recs.values())[:10]}; machine: {base['machine']}",
        "- perplexity: evaluation split, 16 windows x 512 tokens, torch reference backend; calibration split "
        "8 x 512. Weight bytes: the compiled state as stored (packed codes, scales, float tensors; the fp32 "
        "lm_head/embedding included). Cache: bytes per token, all layers, scales included (fp16 K+V: 23040 B). "
        f"Decode: tokens/s after a {sp.get('prompt', '?')}-token prompt, {sp.get('new_tokens', '?')} new tokens, "
        f"best of {sp.get('repeat', '?')}, backend {sp.get('results', {}).get('fp32', {}).get('backend', '?')}.",
        "",
        "| plan | perplexity | Δ vs fp32 | weight MB | cache B/token | decode tok/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in recs.items():
        s = speed.get(name, {})
        lines.append(
            f"| {name} | {r['ppl']:.4f} | {_pct(r, base):+.2f} % | {r['weight_bytes_packed'] / 1e6:.1f} | "
            f"{r['cache_bytes_per_token']} | {s.get('decode_tokens_per_s', '—')} |"
        )
    lines += [
        "",
        "| composed plan | its cost | sum of its parts' costs | parts | within the sum? |",
        "|---|---:|---:|---|---|",
    ]
    for name, parts in COMPOSED.items():
        if name not in recs or not all(p in recs for p in parts):
            continue
        cost = _pct(recs[name], base)
        total = sum(_pct(recs[p], base) for p in parts)
        lines.append(
            f"| {name} | {cost:+.2f} % | {total:+.2f} % | {' + '.join(parts)} | {'yes' if cost <= total else 'no'} |"
        )
    return lines


def matrix_table() -> list[str]:
    if not MATRIX_OUT.exists():
        return ["(run `benchmarks/composed.py matrix` first)"]
    from qcompile.eval.composition import PASS_NAMES, SHORT, Cell, short_reason

    data = json.loads(MATRIX_OUT.read_text())
    cells = data["cells"]
    for c in cells:  # the reason as short_reason words it now, from the stored message
        c["reason"] = short_reason(Cell(c["model"], tuple(c["passes"]), c["outcome"], c["detail"]))
    counts: dict[str, int] = {}
    for c in cells:
        counts[c["outcome"]] = counts.get(c["outcome"], 0) + 1
    lines = [
        "### Composition matrix (tiny Llama, tiny CNN)",
        "",
        f"- command: `{data['command']}` (the same cells are asserted by tests/passes/test_composition.py); "
        f"date {data['date'][:10]}; machine: {data['machine']}",
        "- each cell compiles the passes in order (torch reference backend) under one plan's settings (w8a8-rtn; "
        "w6a8-flexq's when assign_precision is in it; w4a4-mergequant's with fold_quant_steps). composes = every "
        "pass ran and did its work, error vs fp32 within 1.5 x the sum of the passes' own errors + 1e-4, and "
        "forward = prefill + decode when kv_to_xcache rewrote an LLM's caches; refused = PlanError when the plan "
        "is read, naming the fact; "
        "n/a = the pass found none of its structure in this model and said so; failed = anything else.",
        f"- totals: {', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))}",
        "",
    ]
    mark = {"composes": "composes", "refused": "refused", "not applicable": "n/a", "failed": "**FAILED**"}
    for model in ("llama", "cnn"):
        pairs = {tuple(c["passes"]): c for c in cells if c["model"] == model and len(c["passes"]) == 2}
        lines += [
            f"{model}: first pass (row) then second pass (column); refused cells name the fact the first pass "
            "invalidates",
            "",
            "| then → | " + " | ".join(SHORT[p] for p in PASS_NAMES) + " |",
            "|---|" + "---|" * len(PASS_NAMES),
        ]
        for a in PASS_NAMES:
            row = []
            for b in PASS_NAMES:
                c = pairs.get((a, b))
                if c is None:
                    row.append("")
                elif c["outcome"] == "refused":
                    row.append(f"refused: {c['reason'].split(' ')[0]}")
                else:
                    row.append(mark[c["outcome"]])
            lines.append(f"| **{SHORT[a]}** | " + " | ".join(row) + " |")
        lines.append("")
    lines += [
        "Every cell, with the reasons and errors:",
        "",
        "| model | passes | outcome | fact / reason | rel. error vs fp32 | bound |",
        "|---|---|---|---|---:|---:|",
    ]
    for c in cells:
        err = "—" if c["error"] is None else f"{c['error']:.4f}"
        bound = "—" if c["bound"] is None else f"{c['bound']:.4f}"
        reason = c["reason"].replace("|", "/")
        lines.append(f"| {c['model']} | {' → '.join(c['passes'])} | {c['outcome']} | {reason} | {err} | {bound} |")
    return lines


def cmd_table(a: argparse.Namespace) -> None:
    results = Path(a.results)
    for key, lines in (("composed:issue-22", composed_table()), ("composition-matrix", matrix_table())):
        write_section(results, key, "\n".join(lines))
        print("\n".join(lines), "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval")
    e.add_argument("--model", default="smollm2-135m")
    e.add_argument("--plans", default=DEFAULT_PLANS)
    e.add_argument("--windows", type=int, default=16)
    e.add_argument("--seq", type=int, default=512)
    e.add_argument("--force", action="store_true")
    s = sub.add_parser("speed")
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--plans", default=DEFAULT_PLANS)
    s.add_argument("--prompt", type=int, default=64)
    s.add_argument("--new", type=int, default=32)
    s.add_argument("--max-cache-len", type=int, default=256)
    s.add_argument("--repeat", type=int, default=2)
    s.add_argument("--backend", default="tvm")
    sub.add_parser("matrix")
    t = sub.add_parser("table")
    t.add_argument("--results", default=str(HERE / "RESULTS.md"))
    a = ap.parse_args(argv)
    {"eval": cmd_eval, "speed": cmd_speed, "matrix": cmd_matrix, "table": cmd_table}[a.cmd](a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
