"""QuEST / Hadamard checks on SmolLM2 that need the real model (the accuracy rows come from accuracy.py).

    .venv/bin/python benchmarks/quest.py [--windows 2 --seq 512] [--json benchmarks/results/quest-smollm2-135m.json]

1. **Rotation without quantization**: the max |logit| difference between the fp32 plan and the
   ``hadamard``-only plan (benchmarks/plans/hadamard-only.yaml) on evaluation windows, and how many
   linears were folded / rotated online.
2. **Block rule** (576 = 4·128 + 64 vs 9·64): the relative mean squared error of 4-bit QuEST
   per-token quantization of the real inputs of every rotated linear, greedy vs uniform blocks (and
   unrotated), over the same windows: the input error that the QuEST grid sees.
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

import qcompile  # noqa: E402
from qcompile.eval.datasets import shakespeare_tokens  # noqa: E402
from qcompile.eval.harness import machine  # noqa: E402
from qcompile.eval.zoo import load_model  # noqa: E402
from qcompile.plan import get_plan  # noqa: E402
from qcompile.quant.hadamard import BlockRule, fwht, hadamard_blocks  # noqa: E402
from qcompile.quant.quest import quest_quantize  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--json", default=str(HERE / "results" / "quest-smollm2-135m.json"))
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    zm = load_model("smollm2-135m")
    ids = shakespeare_tokens(zm.tokenizer, "evaluation")[: a.windows * a.seq].reshape(a.windows, a.seq)
    t0 = time.time()
    base = qcompile.compile(zm.model, plan="fp32", backend="torch", lm_entries=("forward",))
    rot = qcompile.compile(
        zm.model, plan=get_plan(HERE / "plans" / "hadamard-only.yaml"), backend="torch", lm_entries=("forward",)
    )
    notes = next(p for p in rot.report.passes if p.name == "hadamard").notes
    diffs, scale = [], []
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, mod in zm.model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:

            def hook(_m, args, _out, name=name):
                inputs.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1])[::16])

            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for w in ids:
            ref = base(w[None])
            diffs.append(float((rot(w[None]) - ref).abs().max()))
            scale.append(float(ref.abs().max()))
            zm.model(w[None])
    for h in hooks:
        h.remove()
    err: dict[str, float] = {"none": 0.0, "greedy": 0.0, "uniform": 0.0}
    for name, xs in inputs.items():
        x = torch.cat(xs).to(torch.float32)
        k = x.shape[-1]
        if "o_proj" in name:  # folded: rotated per head (64) whatever the rule
            variants = {"none": x, "greedy": fwht(x, (64,) * (k // 64)), "uniform": fwht(x, (64,) * (k // 64))}
        else:
            variants = {"none": x, **{r.value: fwht(x, hadamard_blocks(k, 128, r)) for r in BlockRule}}
        for key, v in variants.items():
            err[key] += float((quest_quantize(v, a.bits) - v).pow(2).sum() / v.pow(2).sum()) / len(inputs)
    rec = {
        "model": zm.name,
        "windows": a.windows,
        "seq": a.seq,
        "max_abs_logit_diff": max(diffs),
        "max_abs_logit": max(scale),
        "linears_folded": sum(v["input"] == "folded" for v in notes["layers"].values()),
        "linears_online": sum(v["input"] == "online" for v in notes["layers"].values()),
        "online_ops": notes["online_ops"],
        f"quest_a{a.bits}_input_rel_mse": err,
        "seconds": round(time.time() - t0, 1),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps(rec, indent=1))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
