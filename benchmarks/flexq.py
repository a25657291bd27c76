"""FlexQ benchmark on a causal LM: W6A8, W6A6, the fixed down_proj rule, sensitivity-assigned A8
at several budgets; one JSON file, one table in RESULTS.md, one sensitivity plot.

    .venv/bin/python benchmarks/flexq.py --model smollm2-135m --windows 16 --seq 512

Every plan is compiled with the calibration split (8 x 512 tokens) and scored by perplexity on the
evaluation split; ``assign_precision`` sees the calibration tokens only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import shlex
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from accuracy import write_section  # noqa: E402

from qcompile.eval.harness import TextSource, evaluate, machine  # noqa: E402
from qcompile.eval.zoo import load_model  # noqa: E402
from qcompile.plan import PRESETS, PassConfig  # noqa: E402

BUDGETS = (("0", 0.0), ("1/7", 1 / 7), ("2/7", 2 / 7), ("1", 1.0))


def flexq_plan(label: str, budget: float):
    base = PRESETS["w6a8-flexq"]
    return dataclasses.replace(
        base,
        name=f"w6a8-flexq budget {label}",
        passes=(PassConfig("assign_precision", (("budget", budget),)), PassConfig("quantize_weights")),
    )


def a8_info(rec: dict[str, Any]) -> tuple[str, str, str]:
    """(A8 linears, A8 share of FLOPs, analysis seconds) from the compile report / plan."""
    for p in rec.get("report", {}).get("passes", []):
        if p["name"] == "assign_precision" and "sensitivity" in p["notes"]:
            n = p["notes"]
            return (
                f"{len(n['a8_layers'])}/{n['candidates']}",
                f"{100 * n['a8_fraction_flops']:.1f} %",
                f"{n['analysis_seconds']:.0f}",
            )
    return ("", "", "—")


def weight_sizes(model: Any) -> dict[str, Any]:
    """Bytes of the quantized linears' weights: fp16, and W6 packed codes + fp32 group scales."""
    import qcompile

    cm = qcompile.compile(model, plan="w6a8", max_cache_len=64, lm_entries=("forward",))
    packed = sum(t.numel() for k, t in cm.program.state.items() if k.endswith(".qweight_packed"))
    scales = sum(t.numel() * t.element_size() for k, t in cm.program.state.items() if k.endswith(".w_scale"))
    n_weights = sum(
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, __import__("torch").nn.Linear) and "lm_head" not in name
    )
    return {
        "linear_weights": n_weights,
        "fp16_bytes": 2 * n_weights,
        "w6_code_bytes": packed,
        "w6_scale_bytes": scales,
        "w6_bits_per_weight": 8 * (packed + scales) / n_weights,
        "model_bytes_stored_w6": sum(cm.report.weight_bytes.values()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--json", default=None)
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    ap.add_argument(
        "--sweep-ends",
        action="store_true",
        help="also evaluate budgets 0 and 1 (identical to w6a6 / w6a8 by construction)",
    )
    ap.add_argument(
        "--table-only", action="store_true", help="evaluate nothing: write the table from the records of --partial"
    )
    ap.add_argument("--partial", default=None, help="per-plan records of an interrupted run to resume from")
    a = ap.parse_args(argv)
    zm = load_model(a.model)
    budgets = [(lbl, b) for lbl, b in BUDGETS if a.sweep_ends or lbl not in ("0", "1")]
    flex = [flexq_plan(lbl, b) for lbl, b in budgets]
    plans: list[Any] = [
        "fp32",
        "w6a8",
        "w6a6",
        *[p for p in flex if p.name.endswith(" 1/7")],
        "w6a8-flexq-fixed",
        *[p for p in flex if not p.name.endswith(" 1/7")],
    ]
    partial = Path(a.partial or HERE / "results" / f".flexq-{zm.name}.partial.json")
    done = {r["plan_name"]: r for r in json.loads(partial.read_text())} if partial.exists() else {}
    records = []
    for plan in plans:
        name = plan if isinstance(plan, str) else plan.name
        if name in done and done[name]["windows"] == a.windows and done[name]["seq"] == a.seq:
            rec = done[name]  # measured by an interrupted earlier run with the same settings
        elif a.table_only:
            print(f"{name}: not measured (skipped: --table-only)", flush=True)
            continue
        else:
            rec = evaluate(zm, plan, text=TextSource(), windows=a.windows, seq=a.seq, progress=True)
            done[name] = rec
            partial.write_text(json.dumps(list(done.values()), indent=1))
        print(f"{rec['plan_name']}: {rec['ppl']:.4f} ({rec['wall_seconds']:.0f} s)", flush=True)
        records.append(rec)
    sizes = weight_sizes(zm.model)
    out = Path(a.json or HERE / "results" / f"flexq-{zm.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"records": records, "weight_sizes": sizes}, indent=1))
    png = out.with_name(f"flexq-sensitivity-{zm.name}.png")
    notes = next(
        p["notes"]
        for r in records
        if r["plan_name"] == "w6a8-flexq budget 1/7"
        for p in r["report"]["passes"]
        if p["name"] == "assign_precision"
    )
    from qcompile.eval.plots import plot_sensitivity

    plot_sensitivity(notes, str(png), title=f"{zm.name}: sensitivity of each linear to A8→A6 (red: A8 at budget 1/7)")

    by = {r["plan_name"]: r for r in records}
    fp32, w6a8 = by["fp32"]["ppl"], by["w6a8"]["ppl"]
    w6a6 = by["w6a6"]["ppl"] if "w6a6" in by else float("nan")
    rows = []
    for r in records:
        n8, f8, secs = a8_info(r)
        if r["plan_name"] == "w6a8-flexq-fixed":
            n8 = "30/210 (down_proj)" if zm.name == "smollm2-135m" else "down_proj"
        gap = "" if r["plan_name"] == "fp32" or w6a6 != w6a6 else f"{100 * (w6a6 - r['ppl']) / (w6a6 - w6a8):.1f} %"
        rows.append(
            f"| {r['plan_name']} | {n8} | {f8} | {r['ppl']:.4f} | {100 * (r['ppl'] / fp32 - 1):+.2f} % | {gap} | "
            f"{secs} | {r['eval_seconds']:.0f} |"
        )
    missing = [p if isinstance(p, str) else p.name for p in plans if (p if isinstance(p, str) else p.name) not in by]
    chosen = notes["a8_layers"]
    kinds: dict[str, int] = {}
    for p in chosen:
        kinds[p.rsplit(".", 1)[-1]] = kinds.get(p.rsplit(".", 1)[-1], 0) + 1
    cmd = "python benchmarks/flexq.py " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    first = records[0]
    body = "\n".join(
        [
            f"### FlexQ (W6A6 / W6A8, sensitivity-assigned A8): {zm.name}",
            "",
            f"- command: `{cmd}`",
            f"- date: {dt.date.today().isoformat()}; machine: {machine()}; target cpu (torch reference backend: exact "
            "integer ops)",
            f"- data: {first['dataset']}, {first['windows']} windows × {first['seq']} tokens = {first['tokens']} "
            "tokens; "
            "calibration (assign_precision): shakespeare calibration split, 8 × 512 tokens",
            f"- JSON: `{out.relative_to(HERE.parent)}`; sensitivity plot: `{png.relative_to(HERE.parent)}`",
            "- W6: symmetric RTN, group 128 along K (last group of 64 where K = 576), packed 4 codes / 3 bytes; "
            'activations dynamic symmetric per token and group of 128. "gap recovered" = (ppl(W6A6) − ppl) / '
            "(ppl(W6A6) − ppl(W6A8)).",
            "",
            "| plan | A8 linears | A8 share of linear FLOPs | perplexity | Δ vs fp32 | W6A6→W6A8 gap recovered | "
            "analysis s | eval s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            *(
                [f"Not measured in this run (out of time on the shared machine): {', '.join(missing)}.", ""]
                if missing
                else []
            ),
            "Budget sweep: budget 0 and budget 1 give exactly the w6a6 and w6a8 modules (the same ops and "
            "arguments; tests/passes/test_flexq.py checks the outputs are bit-identical), so their rows are the "
            "w6a6 and w6a8 rows" + (" (also measured here)." if a.sweep_ends else "."),
            "",
            f"Layers given A8 at budget 1/7 by kind: {', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}.",
            "",
            f"Weight bytes of the {sizes['linear_weights']:,} quantized linear weights (lm_head excluded, it stays "
            "fp32): "
            f"fp16 {sizes['fp16_bytes'] / 2**20:.1f} MiB; W6 "
            f"{(sizes['w6_code_bytes'] + sizes['w6_scale_bytes']) / 2**20:.1f} MiB "
            f"(codes {sizes['w6_code_bytes'] / 2**20:.1f} MiB + fp32 group scales "
            f"{sizes['w6_scale_bytes'] / 2**20:.1f} MiB = "
            f"{sizes['w6_bits_per_weight']:.3f} bits per weight, "
            f"{sizes['fp16_bytes'] / (sizes['w6_code_bytes'] + sizes['w6_scale_bytes']):.2f}x smaller than fp16).",
        ]
    )
    write_section(Path(a.results), f"flexq-{zm.name}", body)
    print(f"wrote {out}, {png} and the 'flexq-{zm.name}' section of {a.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
