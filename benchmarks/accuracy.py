"""Accuracy benchmark: a list of plans over one model, one JSON file and one table in RESULTS.md.

    .venv/bin/python benchmarks/accuracy.py --model smollm2-135m \\
        --plans source,fp32,w8a8-rtn,w6a6-rtn,w4a16-rtn-g128,w4a16-rtn-g32-asym --windows 16 --seq 512

The plan name ``source`` evaluates the unmodified model (not captured, not compiled). The table
goes between ``<!-- accuracy:<section> -->`` markers in benchmarks/RESULTS.md (replaced when the
section exists, appended otherwise), with the command, date, machine and token counts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from qcompile.eval.harness import TextSource, evaluate, machine  # noqa: E402
from qcompile.eval.zoo import load_model  # noqa: E402

CAVEATS = {
    "smollm2-135m": (
        "Caveat: the released SmolLM2-135M weights are Q4_1 (4-bit, group 32, scale + min) and are "
        'dequantized to fp32 on load, so "fp32" is that dequantized model, and a 4-bit asymmetric '
        "group-32 weight quantizer (`w4a16-rtn-g32-asym`) lands on (nearly) the same grid: that row is "
        "trivially (near-)lossless and says nothing about 4-bit quality. Activation and cache quantization "
        "are unaffected by this."
    ),
    "fmnist-vgg": (
        "Note: `quantize_weights` rewrites linear layers only; the convolutions stay fp32 (conv "
        "quantization is not implemented yet), so the quantized rows here quantize the two classifier "
        "linears only."
    ),
    "efficientnet-lite0": (
        "Note: `quantize_weights` rewrites linear layers only; all convolutions stay fp32 (conv "
        "quantization is not implemented yet), so the quantized rows quantize only the final classifier. "
        "There is no labelled ImageNet here: the metric is top-1 agreement with the fp32 model on the "
        "scikit-image photos listed below."
    ),
}


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.1f}"


def table(records: list[dict[str, Any]]) -> str:
    base = next((r for r in records if r["plan_name"] == "fp32"), records[0])
    if "ppl" in base:
        head = (
            "| plan | perplexity | Δ vs fp32 | weights MiB (stored) | weights MiB (bit-packed) | cache B/token "
            "| eval s |\n|---|---:|---:|---:|---:|---:|---:|"
        )
        rows = [
            f"| {r['plan_name']} | {r['ppl']:.4f} | {100 * (r['ppl'] / base['ppl'] - 1):+.2f} % | "
            f"{_mib(sum(r['weight_bytes'].values()))} | {_mib(r['weight_bytes_packed'])} | "
            f"{r['cache_bytes_per_token'] if r.get('cache_bytes_per_token') is not None else '—'} | "
            f"{r['eval_seconds']:.0f} |"
            for r in records
        ]
    else:
        key = "top1" if "top1" in base else "top1_agreement"
        label = "top-1 %" if key == "top1" else "top-1 agreement with fp32 %"
        head = (
            f"| plan | {label} | weights MiB (stored) | weights MiB (bit-packed) | eval s |\n|---|---:|---:|---:|---:|"
        )
        rows = [
            f"| {r['plan_name']} | {100 * r[key]:.2f} | {_mib(sum(r['weight_bytes'].values()))} | "
            f"{_mib(r['weight_bytes_packed'])} | {r['eval_seconds']:.0f} |"
            for r in records
        ]
    return "\n".join([head, *rows])


def _predictions(rec: dict[str, Any]) -> list[str]:
    if not isinstance(rec.get("predictions"), dict):  # image models: class per photo; LMs: a count
        return []
    lines = ["", f"Top-1 ImageNet class per photo ({rec['plan_name']}):", ""]
    lines += [f"- {name}: {label}" for name, label in rec["predictions"].items()]
    return lines


def _backend(records: list[dict[str, Any]]) -> str:
    """The backend the records ran on (records written before the backend was recorded ran on torch,
    the default then)."""
    names = {r.get("backend", "torch") for r in records if r.get("plan") is not None} or {"torch"}
    return ", ".join("torch reference backend" if b == "torch" else f"{b} backend" for b in sorted(names))


def write_section(results_md: Path, section: str, body: str) -> None:
    start, end = f"<!-- accuracy:{section} -->", f"<!-- /accuracy:{section} -->"
    text = results_md.read_text() if results_md.exists() else "# Benchmark results\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    results_md.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--plans", default="source,fp32,w8a8-rtn,w6a6-rtn,w4a16-rtn-g128,w4a16-rtn-g32-asym")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument(
        "--backend",
        default="torch",
        choices=["torch", "tvm"],
        help="backend the plans run on (default torch: the exact reference the tables were measured with)",
    )
    ap.add_argument("--section", default=None, help="RESULTS.md section name (default: the model name)")
    ap.add_argument("--json", default=None, help="JSON output (default benchmarks/results/accuracy-<model>.json)")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    ap.add_argument(
        "--from-json", action="store_true", help="do not evaluate: rewrite the section from the records in --json"
    )
    ap.add_argument(
        "--notes", default=None, help="markdown file whose text is appended to the section (the reading of the table)"
    )
    a = ap.parse_args(argv)
    out = Path(a.json or HERE / "results" / f"accuracy-{a.model}.json")
    if a.from_json:
        records = json.loads(out.read_text())
        _write(a, argv, out, records, records[0]["model"])
        return 0
    zm = load_model(a.model)
    records = []
    for plan in [p.strip() for p in a.plans.split(",") if p.strip()]:
        source = plan == "source"
        rec = evaluate(
            zm,
            "fp32" if source else plan,
            text=TextSource(),
            windows=a.windows,
            seq=a.seq,
            source=source,
            progress=True,
            backend=a.backend,
        )
        metric = rec.get("ppl", rec.get("top1", rec.get("top1_agreement")))
        print(f"{plan}: {metric:.4f} ({rec['wall_seconds']:.0f} s)", flush=True)
        records.append(rec)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(records, indent=1))  # after every plan: a stopped run keeps what finished
    _write(a, argv, out, records, zm.name)
    return 0


def _write(a: argparse.Namespace, argv: list[str] | None, out: Path, records: list[dict[str, Any]], model: str) -> None:
    first = records[0]
    scope = (
        f"{first['dataset'] if 'dataset' in first else first.get('text_file')}, {first['windows']} windows × "
        f"{first['seq']} tokens "
        f"= {first['tokens']} tokens ({first['predictions']} predictions per plan)"
        if "ppl" in first
        else f"{first['dataset']}, {first['images']} images"
    )
    args = [x for x in (argv if argv is not None else sys.argv[1:]) if x not in ("--from-json",)]
    if a.from_json:  # the command that measured the records
        args = [
            "--model",
            model,
            "--plans",
            ",".join(r["plan_name"].split(" ")[0] for r in records),
            "--windows",
            str(first["windows"]),
            "--seq",
            str(first["seq"]),
        ]
        args += ["--json", str(out.relative_to(HERE.parent) if out.is_relative_to(HERE.parent) else out)] + (
            ["--section", a.section] if a.section else []
        )
    cmd = "python benchmarks/accuracy.py " + " ".join(shlex.quote(x) for x in args)
    body = "\n".join(
        [
            f"### Accuracy: {model}" + (f" ({a.section})" if a.section and a.section != model else ""),
            "",
            f"- command: `{cmd}`",
            f"- date: {dt.date.today().isoformat()}; machine: {first.get('machine') or machine()}; target cpu "
            f"({_backend(records)})",
            f"- data: {scope}; baseline: the fp32 row (the unmodified model is the `source` row)",
            f"- JSON: `{out.relative_to(HERE.parent) if out.is_relative_to(HERE.parent) else out}`",
            "",
            table(records),
            "",
            CAVEATS.get(model, ""),
            *_predictions(records[0]),
            *([Path(a.notes).read_text()] if a.notes else []),
        ]
    )
    write_section(Path(a.results), a.section or model, body)
    print(f"wrote {out} and the '{a.section or model}' section of {a.results}")


if __name__ == "__main__":
    sys.exit(main())
