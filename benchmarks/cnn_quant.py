"""Quantized convolutions (issue 22): fmnist-vgg top-1 and EfficientNet-Lite0 top-1 agreement under
the CNN presets, with and without Winograd, and per-layer errors of the most sensitive convolutions.

    python benchmarks/cnn_quant.py [--out benchmarks/results/cnn_quant.json] [--skip-efficientnet]

Accuracy runs on the torch reference backend (the exact integer reference ops): the TVM backend
matches it (tests/codegen/test_tvm_conv_quant.py) but builds per batch shape and runs the classifier's
linear_static with torch. Per-layer error: for each quantized convolution, its input captured from
the fp32 model on calibration-free evaluation images is run through ``qcompile::quant_conv2d`` with the
compiled codes and steps, and compared with the fp32 conv output: ``max|y_q - y| / max|y|`` (the
layer's own error, upstream layers in fp32).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

import qcompile
from qcompile.eval.harness import IMAGE_BATCH, evaluate, machine
from qcompile.eval.zoo import load_model
from qcompile.ir.program import PATH_KEY

FMNIST_PLANS = ("fp32", "cnn-w8a8", "cnn-w4a16", "winograd-f4", "cnn-w8a8-winograd-f4")
EFFNET_PLANS = ("cnn-w8a8", "cnn-w4a16")
QCONV = torch.ops.qcompile.quant_conv2d.default


def layer_errors(zm: Any, plan: str, x: torch.Tensor, channels: int, size: int, top: int) -> list[dict[str, Any]]:
    """The ``top`` convolutions with the largest relative output error under ``plan`` on images ``x``."""
    from qcompile.eval.harness import _image_module

    cm = _image_module(zm, plan, "cpu", channels, size, backend="torch")
    entry = cm.program.entries["forward"]
    slots = entry.bindings()
    convs = [n for n in entry.graph.graph.nodes if n.op == "call_function" and n.target == QCONV]
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for n in convs:
        path = str(n.meta[PATH_KEY])
        mod = zm.model.get_submodule(path)

        def hook(_m: Any, i: tuple[torch.Tensor, ...], o: torch.Tensor, p: str = path) -> None:
            seen.setdefault(p, (i[0].detach(), o.detach()))

        hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        zm.model(x)
    for h in hooks:
        h.remove()
    out = []
    st = cm.program.state
    for n in convs:
        path = str(n.meta[PATH_KEY])
        xin, y = seen[path]
        keys = [slots[a].name if a is not None else None for a in n.args[1:5]]
        codes, ws, xs, bias = (st[k] if k else None for k in keys)
        with torch.no_grad():
            yq = QCONV(xin, codes, ws, xs, bias, *n.args[5:])
        mod = zm.model.get_submodule(path)
        out.append(
            {
                "layer": path,
                "shape": f"{mod.in_channels}->{mod.out_channels} k{mod.kernel_size[0]} s{mod.stride[0]} g{mod.groups}",
                "rel_max_error": float((yq - y).abs().max() / y.abs().max()),
                "rel_rms_error": float((yq - y).pow(2).mean().sqrt() / y.pow(2).mean().sqrt()),
            }
        )
    return sorted(out, key=lambda r: -r["rel_rms_error"])[:top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/cnn_quant.json")
    ap.add_argument("--skip-efficientnet", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    res: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "cpu_flags": subprocess.run(["grep", "-m1", "flags", "/proc/cpuinfo"], capture_output=True, text=True).stdout,
        "backend": "torch (reference ops; exact integer convolutions)",
        "qcompile_version": qcompile.__version__,
        "fmnist_vgg": {},
        "efficientnet_lite0": {},
    }
    from qcompile.eval.images import fashion_mnist, imagenet_photos

    fm = load_model("fmnist-vgg")
    for plan in FMNIST_PLANS:
        r = evaluate(fm, plan, backend="torch")
        res["fmnist_vgg"][plan] = {"top1": r["top1"], "weight_bytes": r["weight_bytes"]}
        print(f"fmnist-vgg {plan:<22} top-1 {r['top1']:.4f}", flush=True)
    x_test = fashion_mnist("test")[0][:IMAGE_BATCH]
    res["fmnist_vgg"]["layer_errors"] = {
        p: layer_errors(fm, p, x_test, 1, 28, 4) for p in ("cnn-w8a8", "cnn-w4a16", "cnn-w8a8-winograd-f4")
    }
    if not a.skip_efficientnet:
        en = load_model("efficientnet-lite0")
        for plan in EFFNET_PLANS:
            r = evaluate(en, plan, backend="torch")
            res["efficientnet_lite0"][plan] = {
                "top1_agreement": r["top1_agreement"],
                "images": r["images"],
                "weight_bytes": r["weight_bytes"],
            }
            print(f"efficientnet-lite0 {plan:<12} agreement {r['top1_agreement']:.4f}", flush=True)
        _, photos = imagenet_photos()
        res["efficientnet_lite0"]["layer_errors"] = {p: layer_errors(en, p, photos, 3, 224, 6) for p in EFFNET_PLANS}
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
