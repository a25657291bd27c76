"""The TVM backend end to end: the default for cpu, the same logits and tokens as the torch reference
backend, artifacts that load in a new process without rebuilding, clear errors and the torch
fallback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import qcompile
from qcompile.codegen.tvm.lower import LoweringError
from qcompile.errors import ArtifactError
from qcompile.plan import Plan, get_plan

pytestmark = pytest.mark.tvm
IDS = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def built(tiny_llama):
    """(reference, tvm) compiled modules per preset, built once for this module."""
    out = {}
    for plan in ("fp32", "w8a8-rtn", "w4a16-rtn-g32-asym", "w6a8", "w4a8"):
        ref = qcompile.compile(tiny_llama, plan=plan, backend="torch", max_cache_len=64)
        out[plan] = (ref, qcompile.compile(tiny_llama, plan=plan, max_cache_len=64))
    return out


@pytest.mark.parametrize("plan", ["fp32", "w8a8-rtn", "w4a16-rtn-g32-asym", "w6a8", "w4a8"])
def test_tvm_matches_the_reference_backend(built, plan):
    ref, cm = built[plan]
    assert cm.backend == "tvm"  # the default for cpu
    assert _rel(cm(IDS), ref(IDS)) < 1e-4
    assert torch.equal(cm.generate(IDS, 12, eos_token_id=[]), ref.generate(IDS, 12, eos_token_id=[]))
    info = cm.report.backend
    assert info["name"] == "tvm" and info["kernels"] and not info["fallbacks"]
    # every linear layer runs a qcompile kernel: one call site per linear per entry at least
    assert sum(info["kernels"].values()) >= 15 * 3


def test_linears_reading_one_input_share_its_activation_quantization(built):
    """q/k/v read the attention norm's output and gate/up the MLP norm's: one quantization call each,
    which computes the norm too, then one for o_proj's input and one for down_proj's (which computes
    the SwiGLU product): 4 per layer, not 7."""
    _, cm = built["w8a8-rtn"]
    layers = cm.program.meta["config"]["num_hidden_layers"]
    decode = {n: c for n, c in cm.report.backend["kernels"].items() if n.startswith("qc_quant_rows") and "_m1" in n}
    assert sum(decode.values()) == 4 * layers, decode
    # the two norms feed only quantized linears: their quantization computes them (no norm kernels left)
    assert sum(c for n, c in decode.items() if "_rms" in n) == 2 * layers, decode
    # and down_proj's quantization computes the SwiGLU product silu(gate) · up from the two linears' outputs
    assert sum(c for n, c in decode.items() if "_silu" in n) == layers, decode


@pytest.mark.parametrize("plan", ["w8a8-rtn", "w4a16-rtn-g32-asym"])
def test_residual_adds_run_in_the_linear_kernels_that_feed_them(built, plan):
    """o_proj and down_proj add their output to the residual stream in their own epilogue (the
    x86 dot-product kernel for W8A8 here, the template for W4A16): 2 per layer in every entry (the
    outputs match the reference: see the test above)."""
    _, cm = built[plan]
    layers = cm.program.meta["config"]["num_hidden_layers"]
    kernels = cm.report.backend["kernels"]
    decode = sum(c for n, c in kernels.items() if n.endswith("_r_m1"))
    assert decode == 2 * layers, kernels
    # entries with a dynamic row count (prefill, the cacheless forward): the same 2 per layer in each
    dynamic = sum(c for n, c in kernels.items() if n.endswith("_r_mdyn"))
    assert dynamic and dynamic % (2 * layers) == 0, kernels


def _decode_kernel_calls(cm) -> list[str]:
    """The kernels one decode step calls, in order (the VM's instrument hook; builtins left out)."""
    import tvm
    from tvm import relax

    ids = IDS[:, :4]
    cm.generate(ids, 2, eos_token_id=[])
    inputs = [ids[:, -1:], torch.tensor([ids.shape[1]])]
    vm = relax.VirtualMachine(cm._backend.executable, tvm.cpu())
    fn, args = cm._built["decode"].prepare(cm._build_args(cm.program.entries["decode"], inputs), vm=vm)
    calls: list[str] = []

    def instrument(func, symbol, before, ret, *a):  # noqa: ANN001, ANN202
        if before and not symbol.startswith("vm.builtin."):
            calls.append(symbol)
        return 0

    vm.set_instrument(instrument)
    fn(*args)
    return calls


def test_a_decode_step_moves_no_data_it_could_view(built):
    """One token: V's transpose before the cache write and the attention output's before o_proj keep
    the elements in memory order, so they are views, not copy kernels; so are the norms' same-dtype
    casts (qcompile/codegen/tvm/views.py). What is left per layer: 7 linears, 4 activation
    quantizations, 2 rotary embeddings, 2 cache writes, the attention, and here V's slice of the
    kernel's padded outputs (this model's 32 K/V outputs are padded to 64; SmolLM2's 192 are not)."""
    _, cm = built["w8a8-rtn"]
    layers = cm.program.meta["config"]["num_hidden_layers"]
    calls = _decode_kernel_calls(cm)
    layer_calls = calls[next(i for i, c in enumerate(calls) if c.startswith("qc_")) :]  # after the prologue
    assert not [c for c in layer_calls if "transpose" in c or "cast" in c], layer_calls
    # + the final norm (3 kernels: it feeds the float lm_head) and the lm_head
    assert len(layer_calls) == 17 * layers + 4, (len(layer_calls), layer_calls)


def test_cache_lives_in_the_runtime_tensors(built):
    _, cm = built["fp32"]
    cm.generate(IDS, 4, eos_token_id=[])
    written = [t for name, t in cm._cache.items() if t.dim() == 4]
    assert written and all(t[:, :, : IDS.shape[1] + 3].abs().sum() > 0 for t in written)
    assert all(t[:, :, IDS.shape[1] + 4 :].abs().sum() == 0 for t in written)


def test_artifact_runs_in_a_new_process_without_rebuilding(built, tmp_path):
    _, cm = built["w8a8-rtn"]
    cm.save(tmp_path / "a")
    assert (tmp_path / "a" / "backend" / "module.so").is_file()
    torch.save(IDS, tmp_path / "ids.pt")
    code = (
        "import sys, json, torch, qcompile\n"
        f"cm = qcompile.load({str(tmp_path / 'a')!r})\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        f"torch.save(cm(ids), {str(tmp_path / 'out.pt')!r})\n"
        "print(json.dumps({'backend': cm.backend, 'prebuilt': cm.report.backend.get('loaded_prebuilt', False)}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"backend": "tvm", "prebuilt": True}
    assert torch.equal(torch.load(tmp_path / "out.pt"), cm(IDS))


def test_artifact_built_for_another_cpu_refuses_to_load(built, tmp_path, monkeypatch):
    import qcompile.codegen.tvm as backend
    from qcompile.codegen.tvm import target

    _, cm = built["fp32"]
    cm.save(tmp_path / "a")
    baseline = target.CpuTarget("x86-64", 2)  # a CPU without AVX2/FMA
    monkeypatch.setattr(target, "host_target", lambda: baseline)
    monkeypatch.setattr(backend, "host_target", lambda: baseline)
    with pytest.raises(ArtifactError, match="lacks avx2"):
        qcompile.load(tmp_path / "a")
    assert qcompile.load(tmp_path / "a", backend="torch").backend == "torch"  # the reference still loads


class _Static(torch.nn.Module):
    """A graph with qcompile ops the TVM backend has no converter for (static quantize/dequantize)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(16, 8)
        self.register_buffer("step", torch.full((16,), 0.05))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.ops.qcompile.quantize_static(x, self.step, 8)
        return self.lin(torch.ops.qcompile.dequantize_static(q, self.step))


def test_unconverted_op_names_the_op_and_node_and_falls_back_when_asked():
    m, x = _Static().eval(), (torch.randn(3, 16),)
    with pytest.raises(
        LoweringError, match=r"node 'quantize_static' \(qcompile.quantize_static.default\).*fallback: torch"
    ):
        qcompile.compile(m, plan="fp32", example_inputs=x)
    plan = Plan.from_dict({**get_plan("fp32").to_dict(), "fallback": "torch"})
    cm = qcompile.compile(m, plan=plan, example_inputs=x)
    ref = qcompile.compile(m, plan="fp32", example_inputs=x, backend="torch")
    torch.testing.assert_close(cm(*x), ref(*x), rtol=1e-5, atol=1e-6)
    assert {f.split(" ")[0] for f in cm.report.backend["fallbacks"]} == {
        "forward:quantize_static",
        "forward:dequantize_static",
    }
    assert "fallback to torch" in cm.report.summary()
