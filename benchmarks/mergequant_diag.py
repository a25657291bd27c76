"""Per-layer error decomposition behind the MergeQuant reading in RESULTS.md (issue 4).

For the first two and the last decoder layers of SmolLM2, on 2x512 calibration tokens, the relative
output error of each linear group under: dynamic per-token A4 alone, static per-channel A4 alone, W4
per-channel alone, W4 per-channel of the step-scaled weight W*diag(step) alone, the same with group 128,
and the combinations (RTN W4A4 and MergeQuant without clipping/reconstruction).

    .venv/bin/python benchmarks/mergequant_diag.py
"""

import torch

import qcompile
from qcompile.eval.datasets import calibration_tokens
from qcompile.eval.zoo import load_model
from qcompile.ir.calib import calib_batches, observe_linear_inputs
from qcompile.ir.patterns import find_scale_groups
from qcompile.plan import Granularity as G
from qcompile.quant.observers import AbsMaxObserver, SampleObserver
from qcompile.quant.quantizer import fake_quantize

zm = load_model("smollm2-135m")
p = qcompile.capture(zm.model, max_cache_len=64, lm_entries=("forward",))
groups = find_scale_groups(p, value_out=True, up_down=True)
groups = [g for g in groups if "lm_head" not in g.paths[0]]
calib = calibration_tokens(zm.tokenizer, 2, 512)
st = observe_linear_inputs(
    p,
    calib_batches(calib, who="d"),
    [g.linears[0] for g in groups],
    lambda k: [AbsMaxObserver(), SampleObserver(cap=512, stride=3)],
)


def wq(w, gs=None):
    if gs:
        return fake_quantize(w, 4, G.PER_GROUP, group_size=gs, partial_last_group=True)
    return fake_quantize(w, 4, G.PER_CHANNEL)


for g in groups[:8] + groups[-4:]:
    am, x = st[g.linears[0]][0].value(), st[g.linears[0]][1].value()
    W = [p.state[k].float() for k in g.linears]
    ref = [x @ w.t() for w in W]

    def err(ys):
        return sum(float((y - r).pow(2).sum()) for y, r in zip(ys, ref)) / sum(float(r.pow(2).sum()) for r in ref)

    xd = fake_quantize(x, 4, G.PER_TOKEN)
    step = am.clamp(min=1e-8) / 7
    xs = torch.clamp(torch.round(x / step), -7, 7) * step
    out = {
        "dyn_act_only": err([xd @ w.t() for w in W]),
        "static_act_only": err([xs @ w.t() for w in W]),
        "w_only": err([x @ wq(w).t() for w in W]),
        "wDelta_only": err([x @ (wq(w * step) / step).t() for w in W]),
        "wDelta_g128_only": err([x @ (wq(w * step, 128) / step).t() for w in W]),
        "rtn_w4a4": err([xd @ wq(w).t() for w in W]),
        "mq": err([xs @ (wq(w * step) / step).t() for w in W]),
    }
    print(
        g.paths[0],
        f"absmax ratio max/median {float(am.max() / am.median()):.1f}",
        {k: round(v, 4) for k, v in out.items()},
    )
