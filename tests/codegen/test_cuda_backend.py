"""``compile(..., target="cuda")`` on a machine without a GPU: the whole model lowers to the
tensor-core kernels (or, reported, the generic ones), nvcc builds the fatbin ahead of time into the
artifact; running says clearly that a GPU is needed, and so does loading (which offers backend="torch")."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

import qcompile
from qcompile.errors import ArtifactError, QCompileError
from qcompile.plan import Plan, get_plan

pytestmark = [
    pytest.mark.tvm,
    pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH: CUDA builds need the CUDA toolkit"),
]


def _kinds(cm) -> set[str]:
    return {
        name.split("_")[2]
        for name in cm.report.backend["kernels"]
        if name.startswith("qc_cuda_") and "quant" not in name
    }


@pytest.mark.parametrize(
    ("plan", "target", "kind"),
    [
        ("w8a8-rtn", "cuda:sm_90", "s8"),
        ("w6a8", "cuda:sm_86", "b1"),
        ("w6a8", "cuda", "u6"),
        ("w4a16-rtn-g32-asym", "cuda:sm_80", "f16"),
    ],
)
def test_cuda_build_uses_the_tensor_core_kernels(tiny_llama, tmp_path, plan, target, kind):
    cm = qcompile.compile(tiny_llama, target=target, plan=plan, max_cache_len=64)
    info = cm.report.backend
    assert info["target"]["kind"] == "cuda" and info["generic_kernels"] == [] and not info["fallbacks"]
    assert _kinds(cm) == {kind}
    # every linear but lm_head (kept fp32, on dlight's GEMV) has a tensor-core kernel in every entry
    assert sum(n for k, n in info["kernels"].items() if k.startswith(f"qc_cuda_{kind}_")) == 14 * 3
    if kind in ("b1", "u6"):
        assert all(c["chosen"] == kind and "default" in c["source"] for c in info["kernel_choices"].values())
    if kind != "f16":  # one quantization per distinct input; the two norm-fed ones fuse the RMSNorm
        quants = {k: n for k, n in info["kernels"].items() if k.startswith("qc_cuda_quant_")}
        assert sum(quants.values()) == 4 * 2 * 3  # per layer: q/k/v, o, gate/up, down; 2 layers; 3 entries
        assert sum(n for k, n in quants.items() if "_norm1em06v64" in k) == 2 * 2 * 3
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cm.generate(cm_ids(), 2, eos_token_id=[])
    cm.save(tmp_path / "a")
    files = {p.name for p in (tmp_path / "a" / "backend").iterdir()}
    assert {"module.so", "kernels.fatbin", "params.safetensors", "tvm.json"} <= files
    saved = json.loads((tmp_path / "a" / "backend" / "tvm.json").read_text())
    assert saved["target"] == {"kind": "cuda", "arch": info["target"]["arch"]}
    arch = info["target"]["arch"]
    with pytest.raises(ArtifactError, match=rf"compiled for cuda.*{arch}.*no CUDA device.*backend='torch'"):
        qcompile.load(tmp_path / "a")  # no GPU: loading says so, naming the target and what to do
    ref = qcompile.load(tmp_path / "a", backend="torch")  # the graph still runs with torch on this CPU
    assert ref.target == "cpu" and ref(cm_ids()).shape == (1, 8, 256)


def cm_ids():
    import torch

    return torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))


def test_uncovered_linears_fall_back_to_the_generic_kernel_and_are_reported(tiny_llama):
    """W4 with groups of 8 has no fp16-MMA kernel (it needs groups of 16): dlight's generic kernel
    computes it instead, and the report says which layers and why."""
    base = get_plan("w4a16-rtn-g32-asym")
    plan = replace(base, name="w4-g8", weight=replace(base.weight, group_size=8))
    cm = qcompile.compile(tiny_llama, target="cuda:sm_90", plan=plan, max_cache_len=64)
    generic = cm.report.backend["generic_kernels"]
    assert len(generic) == 14 * 3 and all("group" in g for g in generic)
    assert not _kinds(cm)


def test_plan_arch_and_refusals(tiny_llama):
    cm = qcompile.compile(tiny_llama, target="cuda", plan=Plan(name="fp32-86", arch="sm_86"), max_cache_len=64)
    assert cm.target == "cuda:sm_86" and cm.report.backend["target"]["arch"] == "sm_86"
    with pytest.raises(QCompileError, match=r"sm_75.*and\.popc"):
        qcompile.compile(tiny_llama, target="cuda:sm_75", plan="w6a8", max_cache_len=64)
