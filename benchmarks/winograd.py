"""Winograd F(m,3) point sets: conditioning, measured fp16 error, fp16 accuracy, and the point search.

    .venv/bin/python benchmarks/winograd.py            # tables into benchmarks/RESULTS.md
    .venv/bin/python benchmarks/winograd.py --search   # also re-run the point search (minutes)

Sets compared per tile size: integer, conventional fractional, NOVA (arXiv 2512.18453) and
qcompile's searched sets (qcompile.quant.winograd.POINT_SETS[(m, "searched")], found by
``--search``: an evolution strategy scored by the measured fp16 error on fmnist-vgg's conv inputs
from 64 *training* images). Evaluation: fmnist-vgg fp16 top-1 on the Fashion-MNIST test set and
EfficientNet-Lite0 fp16-vs-fp32 top-1 agreement on the photos (its eligible convs: the stride-1
3×3 depthwise ones), plus the median over layers of each layer's relative output error (fp16
Winograd vs fp32 direct convolution on that layer's real inputs).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from accuracy import write_section  # noqa: E402

import qcompile  # noqa: E402
from qcompile.eval.harness import machine  # noqa: E402
from qcompile.eval.images import fashion_mnist, imagenet_photos, top1  # noqa: E402
from qcompile.eval.zoo import load_model  # noqa: E402
from qcompile.quant import winograd  # noqa: E402
from qcompile.quant.winograd_search import ConvSample, fp16_error, search  # noqa: E402

SETS = {
    2: ["integer"],
    4: ["integer", "nova", "searched"],
    6: ["integer", "fractional", "nova", "searched"],
    8: ["integer", "fractional", "nova", "searched"],
}


def conv_samples(model: torch.nn.Module, x: torch.Tensor) -> list[ConvSample]:
    """Inputs of every eligible 3x3 stride-1 conv (dense or depthwise) of ``model`` on ``x``."""
    out: list[ConvSample] = []
    hooks = []
    for mod in model.modules():
        if (
            isinstance(mod, torch.nn.Conv2d)
            and mod.kernel_size == (3, 3)
            and mod.stride == (1, 1)
            and mod.dilation == (1, 1)
        ):
            if mod.groups in (1, mod.in_channels) and isinstance(mod.padding, tuple):

                def hook(m, args, mod=mod):
                    out.append(
                        ConvSample(args[0].detach().clone(), mod.weight.detach(), tuple(mod.padding), mod.groups)
                    )

                hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


def plan_for(m: int, name: str, fp16: bool) -> qcompile.Plan:
    return qcompile.Plan(
        name=f"F({m},3) {name}{' fp16' if fp16 else ''}",
        passes=(qcompile.PassConfig("winograd_conv", (("m", m), ("points", name), ("fp16", fp16))),),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--search", action="store_true", help="re-run the point search and print the sets")
    ap.add_argument("--images", type=int, default=10000, help="Fashion-MNIST test images (default all 10000)")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    fm = load_model("fmnist-vgg").model
    xtr, _ = fashion_mnist("train")
    xte, yte = fashion_mnist("test")
    xte, yte = xte[: a.images], yte[: a.images]
    calib = conv_samples(fm, xtr[:64])
    found: dict[int, Any] = {}
    if a.search:
        for m in (4, 6, 8):
            starts = [winograd.POINT_SETS[(m, s)] for s in ("nova", "fractional") if (m, s) in winograd.POINT_SETS]
            t0 = time.perf_counter()
            res = search(m, calib, starts=starts, seed=0)
            found[m] = {
                "points": [str(p) for p in res.points],
                "error": res.error,
                "evaluations": res.evaluations,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            print(f"F({m},3) searched: {found[m]}", flush=True)
    eval_fm = conv_samples(fm, xte[:256])
    eff = load_model("efficientnet-lite0").model
    names, photos = imagenet_photos()
    eval_eff = conv_samples(eff, photos)
    with torch.no_grad():
        eff_ref = eff(photos).argmax(-1)
    base = top1(fm, xte, yte)
    batch = torch.export.Dim("batch", min=1, max=500)
    rows = []
    for m, sets in SETS.items():
        for name in sets:
            key = (m, name)
            if key not in winograd.POINT_SETS:
                continue
            pts = winograd.POINT_SETS[key]
            row: dict[str, Any] = {"m": m, "set": name, "points": [str(p) for p in pts], "kappa": winograd.kappa(pts)}
            row["fmnist_layer_err"] = fp16_error(pts, m, eval_fm)
            row["eff_layer_err"] = fp16_error(pts, m, eval_eff)
            cm = qcompile.compile(
                fm, plan=plan_for(m, name, True), example_inputs=(xte[:2],), dynamic_shapes=({0: batch},)
            )
            row["fmnist_fp16_top1"] = top1(cm, xte, yte)
            ce = qcompile.compile(
                eff, plan=plan_for(m, name, True), example_inputs=(photos[:2],), dynamic_shapes=({0: batch},)
            )
            with torch.no_grad():
                row["eff_fp16_agreement"] = float((ce(photos).argmax(-1) == eff_ref).double().mean())
            row["eff_layers"] = len(ce.report.passes[0].layers_changed)
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = HERE / "results" / "winograd.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"fp32_top1": base, "rows": rows, "search": found}, indent=1))
    lines = [
        "### Winograd F(m,3) point sets in fp16",
        "",
        f"- command: `python benchmarks/winograd.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- date: {dt.date.today().isoformat()}; machine: {machine()}; fp16 emulated on the CPU "
        "(fp16 storage, fp32 accumulation per matrix product, rounded to fp16)",
        f"- fmnist-vgg: 4 dense 3×3 convs, fp32 top-1 {100 * base:.2f} % on {len(xte)} test images (the baseline); "
        f"EfficientNet-Lite0: its {rows[0]['eff_layers'] if rows else 0} stride-1 3×3 depthwise convs converted, "
        f"agreement with its fp32 top-1 on {len(names)} photos",
        "- layer error: median over layers of ‖fp16 Winograd − fp32 direct‖/‖fp32 direct‖ on each layer's real inputs "
        "(fmnist: 256 test images; EfficientNet: the photos)",
        "",
        "| F(m,3) | points (finite; ∞ implied) | κ₂ (Vandermonde) | fmnist layer err | fmnist fp16 top-1 % | EffNet "
        "layer err | EffNet fp16 agreement % |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| F({r['m']},3) {r['set']} | {{{', '.join(r['points'])}}} | {r['kappa']:.1f} | "
            f"{r['fmnist_layer_err']:.2e} | "
            f"{100 * r['fmnist_fp16_top1']:.2f} | {r['eff_layer_err']:.2e} | {100 * r['eff_fp16_agreement']:.1f} |"
        )
    write_section(Path(a.results), "winograd", "\n".join(lines))
    print(f"wrote {out} and the 'winograd' section of {a.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
