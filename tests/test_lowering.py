"""The TVM lowering's contracts: the target string parsed once (the plan's arch reconciled or refused
before any work)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import qcompile
from qcompile.codegen import get_backend
from qcompile.codegen.target import ArchConflictError, CpuTarget, CudaTarget, TargetError, parse_target
from qcompile.plan import Plan
from qcompile.runtime.compiled import CompiledModule

pytestmark = pytest.mark.tvm


# ---- targets ------------------------------------------------------------------------------------


def test_target_strings_parse_once_into_targets():
    assert parse_target("cpu") == CpuTarget() and str(parse_target("cpu")) == "cpu"
    assert parse_target("cuda") == CudaTarget("sm_90") and str(parse_target("cuda")) == "cuda"
    assert parse_target("cuda", "sm_86") == CudaTarget("sm_86") and str(parse_target("cuda", "sm_86")) == "cuda:sm_86"
    assert parse_target("cuda:sm_86", "sm_86").arch == "sm_86"
    assert parse_target("cuda -arch=sm_80").arch == "sm_80"
    with pytest.raises(ArchConflictError, match=r"sm_86.*plan names sm_90"):
        parse_target("cuda:sm_86", "sm_90")
    with pytest.raises(ArchConflictError, match=r"plan names CUDA arch sm_90.*'cpu'"):
        parse_target("cpu", "sm_90")
    with pytest.raises(TargetError, match="unknown target 'tpu'"):
        parse_target("tpu")
    assert get_backend(None, parse_target("cuda")).name == "tvm"
    assert get_backend("torch", parse_target("cpu")).name == "torch"


def test_parsing_a_target_imports_no_tvm():
    code = (
        "import sys, qcompile\nfrom qcompile.codegen.target import parse_target\n"
        "parse_target('cpu'); parse_target('cuda:sm_86')\nprint('tvm' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "False"


def test_conflicting_arch_is_refused_before_capture(monkeypatch, tiny_llama):
    import qcompile.api as api

    def no_capture(*args, **kwargs):
        raise AssertionError("captured although the target conflicts with the plan")

    monkeypatch.setattr(api, "capture", no_capture)
    with pytest.raises(ArchConflictError, match=r"'cuda:sm_86' names sm_86 but the plan names sm_90"):
        qcompile.compile(tiny_llama, target="cuda:sm_86", plan=Plan(name="fp32-90", arch="sm_90"))
    with pytest.raises(ArchConflictError, match=r"plan names CUDA arch sm_90"):
        qcompile.compile(tiny_llama, target="cpu", plan=Plan(name="fp32-90", arch="sm_90"))


def test_compiled_module_refuses_a_conflict_too(tiny_llama_program):
    """CompiledModule (which qcompile.load builds from an artifact's target string) parses the same way."""
    with pytest.raises(ArchConflictError, match="sm_90"):
        CompiledModule(tiny_llama_program, Plan(name="fp32-90", arch="sm_90"), target="cuda:sm_86")
