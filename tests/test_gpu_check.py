"""``benchmarks/gpu_check.py --dry-run`` (its CPU half) keeps working: kernel generation and the
nvcc build, packing, references, the table and the JSON, at one small shape and a 2-layer model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.tvm,
    pytest.mark.skipif(
        shutil.which("nvcc") is None, reason="nvcc is not on PATH: the GPU check's build needs the CUDA toolkit"
    ),
]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "dry.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "gpu_check.py"),
        "--dry-run",
        "--shapes",
        "256x512",
        "--models",
        "smollm2-135m",
        "--arch",
        "sm_86",
        "--build-dir",
        str(tmp_path / "build"),
        "--json",
        str(out),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["dry_run"] and res["arch"] == "sm_86" and not res["timings"]
    assert len(res["checks"]) >= 60 and all(c["ok"] for c in res["checks"])
    kinds = {c["kernel"].split("_")[2] for c in res["checks"]}
    assert {"s8", "u6", "b1", "f16", "quant"} <= kinds
    assert all(d["w6_kernels_agree"] for d in res["decode"] if d["variant"].startswith("w6a8"))
    manifest = json.loads((tmp_path / "build" / "manifest.json").read_text())
    assert all(k["params"][-1] == "m" for k in manifest["kernels"].values())
    assert "| variant | N×K | M |" in run.stdout


def test_gpu_check_rejects_bad_arguments():
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--shapes", "8192"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2 and "--shapes" in run.stderr
