"""Behaviour before and after a refactor: compile models under every preset, record the outputs, compare.

    .venv/bin/python benchmarks/equivalence.py record --out benchmarks/results/equivalence/before
    ... change the code ...
    .venv/bin/python benchmarks/equivalence.py record --out benchmarks/results/equivalence/after
    .venv/bin/python benchmarks/equivalence.py compare benchmarks/results/equivalence/before \
        benchmarks/results/equivalence/after

A *case* is (model, preset, backend):

* ``tiny``: a random 2-layer Llama (seeded), all three entries: ``forward`` on fixed token ids,
  then ``prefill`` + 4 greedy ``decode`` steps; backends ``torch`` and ``tvm`` (CPU).
* ``cnn``: a small random CNN (3×3, depthwise 3×3, strided 3×3 convs, a linear head); ``forward``.
* ``cuda``: the tiny Llama built for ``cuda:sm_90`` (compile only: no GPU here); what is recorded
  is the sha256 of the generated CUDA source and the build report's kernel names.
* ``smollm2``: the real SmolLM2-135M, ``forward`` entry only, on 256 held-out tokens (the first
  256 of the evaluation split), calibrated on 2 × 256 tokens of the calibration split; the
  torch backend for every preset, the tvm backend for the presets with TVM kernels.

Recorded per case: sha256 of every output tensor (and the tensors themselves for the tiny models;
for SmolLM2 the mean next-token NLL and the last position's logits), sha256 of every state tensor
after the passes, the per-pass report (name, modified, layers changed, skipped, notes without
timings), the backend's kernel names and fallbacks, or the error a case raised (an error is
behaviour too). ``compare`` prints a markdown table: bit-identical, or what differs and by how much.
``record`` resumes: cases already in ``records.json`` are kept (``--redo`` to recompute).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import qcompile  # noqa: E402
from qcompile.eval.harness import machine  # noqa: E402
from qcompile.eval.zoo import tiny_cnn, tiny_llama  # noqa: E402
from qcompile.plan import PRESETS  # noqa: E402

# presets whose ops all have TVM kernels (the others set fallback: torch and run partly in torch)
SMOL_TVM = ("fp32", "w8a8-rtn", "w6a6-rtn", "w4a16-rtn-g128", "w4a16-rtn-g32-asym", "w6a8", "w6a6", "w8a8-smooth")
CUDA_PRESETS = ("fp32", "w8a8-rtn", "w6a8", "w6a6", "w4a16-rtn-g128", "w4a16-rtn-g32-asym", "w6a6-rtn")
TIMING_KEYS = ("seconds", "analysis_seconds")


def _sha(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    return (
        hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()[:16]
        + f":{t.dtype}{list(t.shape)}"
    )


def _plain(x: Any) -> Any:
    """JSON-safe copy of pass notes without timings."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items() if str(k) not in TIMING_KEYS}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float):
        return float(f"{x:.9g}")
    return x if x is None or isinstance(x, (bool, int, str)) else str(x)


def _report(cm: Any) -> dict[str, Any]:
    passes = [
        {
            "name": p.name,
            "modified": p.modified,
            "layers_changed": list(p.layers_changed),
            "skipped": [list(s) for s in p.skipped],
            "notes": _plain(p.notes),
        }
        for p in cm.report.passes
    ]
    b = cm.report.backend or {}
    backend = {
        "kernels": b.get("kernels"),
        "fallbacks": b.get("fallbacks"),
        "generic_kernels": b.get("generic_kernels"),
        "kernel_choices": {k: v.get("chosen") for k, v in (b.get("kernel_choices") or {}).items()},
        "cuda_source_sha256": b.get("cuda_source_sha256"),
    }
    return {
        "passes": passes,
        "backend": backend,
        "plan": cm.plan.to_dict(),
        "state": {k: _sha(v) for k, v in sorted(cm.program.state.items())},
    }


def _calib_tiny() -> torch.Tensor:
    return torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))


def run_tiny(preset: str, backend: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cm = qcompile.compile(tiny_llama(), plan=preset, backend=backend, calib=_calib_tiny(), max_cache_len=64)
    x = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    out = {"forward": cm(x)}
    cm.reset_cache()
    prompt = x[:, :6]
    logits = cm.run_entry("prefill", prompt, torch.arange(6))
    out["prefill"] = logits
    tok = logits[0, -1].argmax().view(1, 1)
    for i in range(4):
        logits = cm.run_entry("decode", tok, torch.tensor([6 + i]))
        out[f"decode{i}"] = logits
        tok = logits[0, -1].argmax().view(1, 1)
    return _report(cm), out


def run_cnn(preset: str, backend: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    cm = qcompile.compile(tiny_cnn(), plan=preset, backend=backend, example_inputs=(x,), calib=_calib_tiny())
    return _report(cm), {"forward": cm(x)}


def run_cuda(preset: str, _backend: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cm = qcompile.compile(tiny_llama(), target="cuda:sm_90", plan=preset, calib=_calib_tiny(), max_cache_len=64)
    return _report(cm), {}


_SMOL: dict[str, Any] = {}


def _smol() -> dict[str, Any]:
    if not _SMOL:
        from qcompile.eval.datasets import calibration_tokens, shakespeare_tokens
        from qcompile.eval.zoo import load_model

        zm = load_model("smollm2-135m")
        _SMOL.update(
            zm=zm,
            ids=shakespeare_tokens(zm.tokenizer, "evaluation")[:256].clone()[None],
            calib=calibration_tokens(zm.tokenizer, windows=2, seq=256),
        )
    return _SMOL


def run_smollm2(preset: str, backend: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    s = _smol()
    cm = qcompile.compile(s["zm"].model, plan=preset, backend=backend, calib=s["calib"], lm_entries=("forward",))
    logits = cm(s["ids"]).to(torch.float32)
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], s["ids"][0, 1:])
    rep = _report(cm)
    rep["nll"] = float(nll)
    rep["forward_sha"] = _sha(logits)
    return rep, {"last_logits": logits[0, -1].clone()}


RUNNERS = {"tiny": run_tiny, "cnn": run_cnn, "cuda": run_cuda, "smollm2": run_smollm2}


def cases(models: list[str], backends: list[str], presets: list[str]) -> list[tuple[str, str, str]]:
    out = []
    for model in models:
        for preset in presets:
            if model == "cuda":
                if preset in CUDA_PRESETS:
                    out.append((model, preset, "tvm"))
                continue
            for backend in backends:
                if model == "smollm2" and backend == "tvm" and preset not in SMOL_TVM:
                    continue
                out.append((model, preset, backend))
    return out


def record(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    out = Path(args.out)
    (out / "tensors").mkdir(parents=True, exist_ok=True)
    path = out / "records.json"
    records: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    records.setdefault("_meta", {})[dt.date.today().isoformat()] = {"machine": machine(), "argv": sys.argv[1:]}
    presets = args.presets.split(",") if args.presets else sorted(PRESETS)
    todo = cases(args.models.split(","), args.backends.split(","), presets)
    for i, (model, preset, backend) in enumerate(todo, 1):
        cid = f"{model}/{preset}/{backend}"
        if cid in records and not args.redo:
            continue
        t0 = time.perf_counter()
        try:
            rep, tensors = RUNNERS[model](preset, backend)
            rep["outputs"] = {k: _sha(v) for k, v in tensors.items()}
            if tensors:
                save_file(
                    {k: v.detach().contiguous().to(torch.float32) for k, v in tensors.items()},
                    str(out / "tensors" / f"{cid.replace('/', '__')}.safetensors"),
                )
        except Exception as e:  # an error is recorded as the case's behaviour
            rep = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            if args.debug:
                traceback.print_exc()
        rep["seconds"] = round(time.perf_counter() - t0, 1)
        records[cid] = rep
        path.write_text(json.dumps(records, indent=1, sort_keys=True))
        status = rep.get("error", "ok")
        print(f"[{i}/{len(todo)}] {cid}: {status} ({rep['seconds']} s)", flush=True)


def _diff_tensors(a_dir: Path, b_dir: Path, cid: str) -> str:
    from safetensors.torch import load_file

    name = f"{cid.replace('/', '__')}.safetensors"
    if not (a_dir / "tensors" / name).is_file() or not (b_dir / "tensors" / name).is_file():
        return ""
    a, b = load_file(str(a_dir / "tensors" / name)), load_file(str(b_dir / "tensors" / name))
    parts = []
    for k in a:
        if k in b and a[k].shape == b[k].shape and not torch.equal(a[k], b[k]):
            d = (a[k] - b[k]).abs().max()
            parts.append(f"{k} max|Δ| {float(d):.3g} (rel {float(d / a[k].abs().max().clamp(min=1e-30)):.2g})")
    return "; ".join(parts)


def _backend_diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    """What differs between two backend reports; kernel choices made by timing are named as such."""
    ca, cb = a.get("kernel_choices") or {}, b.get("kernel_choices") or {}
    choices = [f"{k}: {ca.get(k)} -> {cb.get(k)}" for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)]
    rest = [k for k in set(a) | set(b) if k not in ("kernel_choices", "kernels") and a.get(k) != b.get(k)]
    if choices and not rest:  # the kernel list differs exactly by the kernels those choices swap
        return "backend: only the kernel choice made by timing differs (" + "; ".join(choices) + ")"
    return f"backend report differs ({', '.join(sorted(rest + (['kernel_choices'] if choices else [])))})"


def compare(args: argparse.Namespace) -> int:
    a_dir, b_dir = Path(args.before), Path(args.after)
    a = json.loads((a_dir / "records.json").read_text())
    b = json.loads((b_dir / "records.json").read_text())
    rows, same = [], 0
    keys = sorted(k for k in set(a) | set(b) if not k.startswith("_"))
    for cid in keys:
        ra, rb = a.get(cid), b.get(cid)
        if ra is None or rb is None:
            rows.append((cid, "missing in " + ("before" if ra is None else "after")))
            continue
        diffs = []
        if ra.get("error") != rb.get("error"):
            diffs.append(f"error {ra.get('error')!r} -> {rb.get('error')!r}")
        for key in ("outputs", "forward_sha"):
            if ra.get(key) != rb.get(key):
                detail = _diff_tensors(a_dir, b_dir, cid)
                diffs.append(f"{key} differ" + (f": {detail}" if detail else ""))
        if "nll" in ra and ra.get("nll") != rb.get("nll"):
            diffs.append(f"nll {ra['nll']:.6f} -> {rb['nll']:.6f}")
        if ra.get("state") != rb.get("state"):
            sa, sb = ra.get("state") or {}, rb.get("state") or {}
            renamed = sorted(set(sa) ^ set(sb))
            changed = sorted(k for k in set(sa) & set(sb) if sa[k] != sb[k])
            diffs.append(
                f"state: {len(renamed)} keys only on one side {renamed[:4]}, {len(changed)} changed {changed[:4]}"
            )
        for part in ("passes", "plan"):
            if ra.get(part) != rb.get(part):
                diffs.append(f"{part} report differs")
        if ra.get("backend") != rb.get("backend"):
            diffs.append(_backend_diff(ra.get("backend") or {}, rb.get("backend") or {}))
        if diffs:
            rows.append((cid, "; ".join(diffs)))
        else:
            same += 1
    print(f"{same} of {len(keys)} cases bit-identical (outputs, state, reports).\n")
    if rows:
        print("| case | difference |\n|---|---|")
        for cid, what in rows:
            print(f"| {cid} | {what} |")
    return 0 if not rows else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--out", required=True)
    r.add_argument("--models", default="tiny,cnn,cuda,smollm2")
    r.add_argument("--backends", default="torch,tvm")
    r.add_argument("--presets", default="", help="comma-separated (default: every preset)")
    r.add_argument("--redo", action="store_true")
    r.add_argument("--debug", action="store_true")
    c = sub.add_parser("compare")
    c.add_argument("before")
    c.add_argument("after")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.cmd == "record":
        record(args)
        return 0
    return compare(args)


if __name__ == "__main__":
    raise SystemExit(main())
