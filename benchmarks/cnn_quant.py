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
EFFNET_PLANS = ("cnn-w8a8", "cnn-w4a16", "winograd-f4", "cnn-w8a8-winograd-f4")
QCONV = torch.ops.qcompile.quant_conv2d.default


def layer_errors(zm: Any, plan: str, x: torch.Tensor, channels: int, size: int, top: int) -> list[dict[str, Any]]:
    """The ``top`` convolutions with the largest relative output error under ``plan`` on images ``x``:
    each conv's input is taken from the fp32 captured graph (so explicit padding layers are included)."""
    import torch.nn.functional as F

    from qcompile.eval.harness import _image_module
    from qcompile.ir.calib import run_observed

    cm = _image_module(zm, plan, "cpu", channels, size, backend="torch")
    fp = _image_module(zm, "fp32", "cpu", channels, size, backend="torch").program
    entry = cm.program.entries["forward"]
    slots = entry.bindings()
    convs = {str(n.meta[PATH_KEY]): n for n in entry.graph.graph.nodes if n.op == "call_function" and n.target == QCONV}
    seen: dict[str, tuple[Any, ...]] = {}
    observers = {}
    for n in fp.entries["forward"].graph.graph.nodes:
        path = str(n.meta.get(PATH_KEY, ""))
        if n.op == "call_function" and n.target == torch.ops.aten.conv2d.default and path in convs:
            observers[n] = lambda _n, args, p=path: seen.setdefault(p, tuple(args))
    run_observed(fp, [x], observers)
    out = []
    st = cm.program.state
    for path, n in convs.items():
        args = seen[path]
        with torch.no_grad():
            y = F.conv2d(*args)
            keys = [slots[a].name if a is not None else None for a in n.args[1:5]]
            codes, ws, xs, bias = (st[k] if k else None for k in keys)
            yq = QCONV(args[0], codes, ws, xs, bias, *n.args[5:])
        out.append(
            {
                "layer": path,
                "weight": list(codes.shape),
                "groups": n.args[8],
                "stride": n.args[5],
                "rel_max_error": round(float((yq - y).abs().max() / y.abs().max()), 5),
                "rel_rms_error": round(float((yq - y).pow(2).mean().sqrt() / y.pow(2).mean().sqrt()), 5),
            }
        )
    return sorted(out, key=lambda r: -r["rel_rms_error"])[:top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/cnn_quant.json")
    ap.add_argument("--skip-efficientnet", action="store_true")
    ap.add_argument("--skip-fmnist", action="store_true", help="keep the fmnist-vgg results already in --out")
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

    if a.skip_fmnist:
        res["fmnist_vgg"] = json.loads(Path(a.out).read_text())["fmnist_vgg"]
    else:
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
        res["efficientnet_lite0"]["layer_errors"] = {
            p: layer_errors(en, p, photos, 3, 224, 6) for p in ("cnn-w8a8", "cnn-w4a16", "cnn-w8a8-winograd-f4")
        }
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
