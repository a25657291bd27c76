"""Time of the assign_precision sensitivity analysis vs the number of decoder layers.

    .venv/bin/python benchmarks/flexq_scaling.py --model smollm2-135m --layers 10,20,30 --windows 8

The model is truncated to its first L decoder layers (same weights), captured, and the pass is run
alone on the calibration split (``windows`` x 512 tokens); the table goes to RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from accuracy import write_section  # noqa: E402

from qcompile.eval.datasets import calibration_tokens  # noqa: E402
from qcompile.eval.harness import machine  # noqa: E402
from qcompile.eval.zoo import load_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    import torch

    from qcompile import capture
    from qcompile.passes.assign_precision import AssignPrecision
    from qcompile.passes.base import PassContext
    from qcompile.plan import PRESETS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", default="10,20,30")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    a = ap.parse_args(argv)
    zm = load_model(a.model)
    calib = calibration_tokens(zm.tokenizer, a.windows, 512)
    layers_all = zm.model.model.layers
    rows, recs = [], []
    for n in [int(x) for x in a.layers.split(",")]:
        zm.model.model.layers = torch.nn.ModuleList(list(layers_all)[:n])
        zm.model.config.num_hidden_layers = n
        prog = capture(zm.model, max_cache_len=512, lm_entries=("forward",))
        ctx = PassContext(plan=PRESETS["w6a8-flexq"], calib=calib)
        t0 = time.perf_counter()
        res = AssignPrecision().run(prog, ctx)
        secs = time.perf_counter() - t0
        recs.append(
            {"layers": n, "linears": res.notes["candidates"], "tokens": res.notes["tokens"], "seconds": round(secs, 1)}
        )
        print(recs[-1], flush=True)
    zm.model.model.layers = layers_all
    base = recs[0]["seconds"] / recs[0]["layers"]
    for r in recs:
        rows.append(
            f"| {r['layers']} | {r['linears']} | {r['tokens']} | {r['seconds']:.1f} | "
            f"{r['seconds'] / r['layers']:.2f} | {r['seconds'] / r['layers'] / base:.2f} |"
        )
    out = HERE / "results" / f"flexq-analysis-time-{zm.name}.json"
    out.write_text(json.dumps(recs, indent=1))
    cmd = "python benchmarks/flexq_scaling.py " + " ".join(
        shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])
    )
    body = "\n".join(
        [
            f"### FlexQ sensitivity analysis time vs depth: {zm.name}",
            "",
            f"- command: `{cmd}`",
            f"- date: {dt.date.today().isoformat()}; machine: {machine()}; shared with other jobs, so seconds are "
            "noisy",
            f"- JSON: `{out.relative_to(HERE.parent)}`",
            "",
            "| decoder layers | linears | calibration tokens | analysis s | s per layer | per-layer cost vs first row "
            "|",
            "|---:|---:|---:|---:|---:|---:|",
            *rows,
        ]
    )
    write_section(Path(a.results), f"flexq-analysis-time-{zm.name}", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
