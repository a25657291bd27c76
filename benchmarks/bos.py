"""BOS benchmark: fp32 perplexity of every causal LM in the zoo with and without a BOS token per window.

    .venv/bin/python benchmarks/bos.py --windows 16 --seq 512
    .venv/bin/python benchmarks/bos.py --from-json          # rewrite the RESULTS.md section only

Each model is evaluated on the Shakespeare evaluation split (the harness's windows: ``seq`` text
tokens each, the first ``windows`` of the split) twice, with ``bos=False`` and ``bos=True``; the
scored tokens are the same both times (:mod:`qcompile.eval.perplexity`), so the two perplexities
compare directly. The table also says which the tokenizer's own rule (the harness's default) picks.
Writes ``benchmarks/results/bos.json`` and the ``bos`` section of RESULTS.md.
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

from accuracy import write_section  # noqa: E402

from qcompile.eval.harness import TextSource, evaluate, machine  # noqa: E402
from qcompile.eval.perplexity import tokenizer_bos  # noqa: E402
from qcompile.eval.zoo import ZOO, load_model  # noqa: E402

CAUSAL_LMS = ("smollm2-135m", "gemma3-270m")  # the zoo's causal LMs (the others are image classifiers)
CAVEATS = (
    "Caveat: both models' released weights are quantized GGUF (SmolLM2: Q4_1; Gemma 3: llama.cpp's Q4_K_M mix of "
    'Q4_K, Q5_0, Q6_K and Q8_0 tensors) dequantized to fp32 on load, so "fp32" is that dequantized model.'
)


def run(model: str, windows: int, seq: int, plan: str, backend: str) -> list[dict[str, Any]]:
    zm = load_model(model)
    rule = tokenizer_bos(zm.tokenizer)
    out = []
    for bos in (False, True):
        rec = evaluate(
            zm,
            "fp32",
            text=TextSource(),
            windows=windows,
            seq=seq,
            source=plan == "source",
            progress=True,
            backend=backend,
            bos=bos,
        )
        rec["tokenizer_rule"] = rule.to_dict()
        print(f"{model} bos={bos}: ppl {rec['ppl']:.4f} ({rec['eval_seconds']:.0f} s)", flush=True)
        out.append(rec)
    return out


def table(records: list[dict[str, Any]]) -> str:
    head = (
        "| model | BOS id | tokenizer's rule | perplexity, no BOS | perplexity, BOS | no-BOS / BOS "
        "| eval s (no BOS, BOS) |\n|---|---:|---|---:|---:|---:|---|"
    )
    rows = []
    for model in dict.fromkeys(r["model"] for r in records):
        off = next(r for r in records if r["model"] == model and not r["bos"]["used"])
        on = next(r for r in records if r["model"] == model and r["bos"]["used"])
        rule = "BOS" if off["tokenizer_rule"]["used"] else "no BOS"
        rows.append(
            f"| {model} | {on['bos']['token_id']} | {rule} | {off['ppl']:.4f} | {on['ppl']:.4f} | "
            f"{off['ppl'] / on['ppl']:.3f} | {off['eval_seconds']:.0f}, {on['eval_seconds']:.0f} |"
        )
    return "\n".join([head, *rows])


def write(records: list[dict[str, Any]], out: Path, results: Path, cmd: str, notes: str | None) -> None:
    first = records[0]
    how = "the unmodified model (`source`)" if first["plan"] is None else f"plan fp32, {first['backend']} backend"
    body = "\n".join(
        [
            "### BOS per window: fp32 perplexity with and without it (every causal LM in the zoo)",
            "",
            f"- command: `{cmd}`",
            f"- date: {dt.date.today().isoformat()}; machine: {first.get('machine') or machine()}; target cpu; {how}",
            f"- data: {first['dataset']}, {first['windows']} windows × {first['seq']} text tokens = {first['tokens']} "
            f"tokens, {first['predictions']} scored predictions per row; with BOS the model sees BOS + the window "
            f"({first['seq'] + 1} positions) and the scored tokens are the same (tokens 2..{first['seq']} of each "
            "window)",
            '- compared: `evaluate(..., bos=False)` against `bos=True` on the same windows; "tokenizer\'s rule" is '
            "what `qcompile eval` does by default (the tokenizer's `add_bos_token`)",
            f"- JSON: `{out.relative_to(HERE.parent) if out.is_relative_to(HERE.parent) else out}`",
            "",
            table(records),
            "",
            CAVEATS,
            *([notes] if notes else []),
        ]
    )
    write_section(results, "bos", body)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(CAUSAL_LMS))
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--plan", default="fp32", choices=["fp32", "source"], help="compiled fp32 or the source model")
    ap.add_argument("--backend", default="torch", choices=["torch", "tvm"])
    ap.add_argument("--json", default=str(HERE / "results" / "bos.json"))
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--from-json", action="store_true", help="do not evaluate: rewrite the section from --json")
    ap.add_argument("--notes", default=None, help="markdown file appended to the section (the reading)")
    a = ap.parse_args(argv)
    out = Path(a.json)
    if a.from_json:
        records = json.loads(out.read_text())
    else:
        models = [m.strip() for m in a.models.split(",") if m.strip()]
        unknown = [m for m in models if m not in ZOO]
        if unknown:
            ap.error(f"unknown zoo models {unknown}")
        records = []
        for m in models:
            records += run(m, a.windows, a.seq, a.plan, a.backend)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(records, indent=1))  # after each model: a late failure keeps the rest
    first = records[0]
    args = ["--models", ",".join(dict.fromkeys(r["model"] for r in records)), "--windows", str(first["windows"])]
    args += ["--seq", str(first["seq"])] + (["--plan", "source"] if first["plan"] is None else [])
    cmd = "python benchmarks/bos.py " + " ".join(shlex.quote(x) for x in args)
    write(records, out, Path(a.results), cmd, Path(a.notes).read_text() if a.notes else None)
    print(f"wrote {out} and the 'bos' section of {a.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
