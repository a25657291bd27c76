"""The TVM lowering's contracts: the target string parsed once (the plan's arch reconciled or refused
before any work), kernels from the target's ordered rules, converter bugs raised (never run by the
torch fallback), weight bits from the Program only."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import qcompile
from qcompile.codegen import get_backend
from qcompile.codegen.target import ArchConflictError, CpuTarget, CudaTarget, TargetError, parse_target
from qcompile.errors import VerifyError
from qcompile.plan import Plan, get_plan
from qcompile.runtime.compiled import CompiledModule

pytestmark = pytest.mark.tvm


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).eval()


X = (torch.randn(3, 128, generator=torch.Generator().manual_seed(1)),)


def _with_fallback(name: str) -> Plan:
    return Plan.from_dict({**get_plan(name).to_dict(), "fallback": "torch"})


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


# ---- rules and failures -------------------------------------------------------------------------


def test_rules_come_from_the_target_in_order(monkeypatch):
    """A rule put in front of the CPU's linear rules sees every linear layer first; returning None
    passes it on to the next rule."""
    from qcompile.codegen.tvm import rules_cpu

    seen = []

    class Spy:
        name = "spy"

        def apply(self, lw, call):
            seen.append((call.node.name, call.recipe.wfmt, call.recipe.n, call.recipe.k))
            return None

    rules = rules_cpu.CPU_RULES
    monkeypatch.setattr(rules_cpu, "CPU_RULES", replace(rules, linear=(Spy(), *rules.linear)))
    cm = qcompile.compile(_mlp(), plan="w8a8-rtn", example_inputs=X)
    assert sorted(seen) == [("linear_w8a8_default", "i8", 64, 128), ("linear_w8a8_default_1", "i8", 32, 64)]
    assert not cm.report.backend["fallbacks"]


def test_converter_bug_raises_instead_of_falling_back(monkeypatch):
    from qcompile.codegen.tvm import rules_cpu
    from qcompile.codegen.tvm.lower import LoweringError

    def broken(self, lw, call):
        raise KeyError("a converter bug")

    monkeypatch.setattr(rules_cpu.LaneBlocked, "apply", broken)
    monkeypatch.setattr(rules_cpu.X86Dot, "apply", broken)  # the rule W8A8 takes on AVX2/VNNI CPUs
    where = r"node 'linear_w8a8_default' \(qcompile.linear_w8a8.default\) of entry 'forward'"
    with pytest.raises(LoweringError, match=where + ".*KeyError") as info:
        qcompile.compile(_mlp(), plan=_with_fallback("w8a8-rtn"), example_inputs=X)
    assert isinstance(info.value.__cause__, KeyError)


def test_tvm_converter_bug_raises_instead_of_falling_back(monkeypatch):
    """TVM's own converters are guarded the same way."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    from qcompile.codegen.tvm.lower import LoweringError

    def broken(node):
        raise ValueError("TVM converter failure")

    orig = ExportedProgramImporter.create_convert_map

    def convert_map(self):
        return {**orig(self), "relu.default": broken}

    monkeypatch.setattr(ExportedProgramImporter, "create_convert_map", convert_map)
    with pytest.raises(LoweringError, match=r"node 'relu' .*ValueError: TVM converter failure") as info:
        qcompile.compile(_mlp(), plan=_with_fallback("fp32"), example_inputs=X)
    assert isinstance(info.value.__cause__, ValueError)


def test_declined_nodes_fall_back_when_the_plan_allows():
    """Causal attention has no rule: an error naming why, or with ``fallback: torch`` a reported
    torch node whose result matches the reference."""
    from qcompile.codegen.tvm.lower import LoweringError

    class Causal(torch.nn.Module):
        def forward(self, q: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, q * 2, q, is_causal=True)

    q = (torch.randn(1, 2, 5, 16, generator=torch.Generator().manual_seed(2)),)
    with pytest.raises(LoweringError, match="causal"):
        qcompile.compile(Causal(), plan="fp32", example_inputs=q)
    cm = qcompile.compile(Causal(), plan=_with_fallback("fp32"), example_inputs=q)
    ref = qcompile.compile(Causal(), plan="fp32", example_inputs=q, backend="torch")
    assert [f.split(" ")[0] for f in cm.report.backend["fallbacks"]] == ["forward:scaled_dot_product_attention"]
    torch.testing.assert_close(cm(*q), ref(*q))


def test_weight_bits_come_from_the_program_only():
    """Codes whose width the Program does not record are an error when lowered (never assumed 8)."""
    from qcompile.codegen.tvm.lower import LoweringError, lower_program

    ref = qcompile.compile(_mlp(), plan="w4a16-rtn-g128", example_inputs=X, backend="torch")
    program = ref.program
    codes = [k for k in program.weight_bits]
    assert codes, "the plan should store one-per-byte codes (quant_linear)"
    del program.weight_bits[codes[0]]
    for fallback in (False, True):
        with pytest.raises(LoweringError, match=r"quant_linear") as info:
            lower_program(program, CpuTarget(), allow_fallback=fallback)
        assert isinstance(info.value.__cause__, VerifyError) and codes[0] in str(info.value.__cause__)


def test_attention_shapes_the_kernel_does_not_cover_take_the_next_rule():
    """Head dim 8 (one vector) is outside the attention kernel's schedule: the rule declines and the
    composed attention computes it, with no fallback and no error."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=None,
        bos_token_id=1,
    )
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))
    cm = qcompile.compile(model, plan="fp32", max_cache_len=16)
    ref = qcompile.compile(model, plan="fp32", max_cache_len=16, backend="torch")
    assert not cm.report.backend["fallbacks"] and not any(
        k.startswith("qc_attention") for k in cm.report.backend["kernels"]
    )
    torch.testing.assert_close(cm(ids), ref(ids), rtol=1e-4, atol=1e-5)
    assert torch.equal(cm.generate(ids, 4, eos_token_id=[]), ref.generate(ids, 4, eos_token_id=[]))
