"""ONNX export (issue 18): onnxruntime on the exported model against qcompile's torch reference.

Tolerances, measured on this machine:

* one quantized linear fed the same input (nothing upstream to differ): every plan and format agrees to
  at most 3e-7 of the largest output (fp32 summation order: ONNX MatMul over dequantized values against
  the reference's exact integer products rescaled in fp32; MatMulInteger's int32 products are exact).
  ``TOL`` = 2e-6. A wrong rounding mode, scale formula or code layout moves codes by a step, 1/127 of a
  row's range at 8 bits and 1/7 at 4 bits: orders of magnitude more.
* a whole model (tiny Llama): the same 4e-7, except where an activation lands within fp32 noise of a
  rounding boundary (x/s = 13.500009 in the reference, 13.49999 in onnxruntime, whose attention differs in
  the last bits): that one code differs by 1 and the logits by up to 1.1e-3 of the largest (w8a8-rtn, ort,
  one layer). ``TOL_MODEL`` = 5e-3 allows a few such flips; perplexity must agree to 1e-4 relative (the
  issue asks for 1e-3).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import onnx
import pytest
import torch

import qcompile
from qcompile.eval.zoo import tiny_cnn, tiny_llama
from qcompile.plan import PassConfig, Plan, get_plan
from qcompile.quant.spec import Granularity, QuantSpec
from qcompile.runtime.onnx_export import InexpressibleOpError, OnnxExportError, ort_session

TOL = 2e-6  # one linear, same input
TOL_MODEL = 5e-3  # a model: a few activation codes may round the other way (see above)
QUANT_PLANS = ("w8a8-rtn", "w4a16-rtn-g128", "w4a16-rtn-g32-asym", "w8a8-smooth", "w6a8")
GEN = torch.Generator().manual_seed(0)
CALIB = torch.randint(0, 256, (2, 64), generator=GEN)
IDS = torch.randint(0, 256, (1, 40), generator=GEN)
PROMPT = torch.randint(0, 256, (1, 6), generator=GEN)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _nll(logits: np.ndarray, ids: torch.Tensor) -> float:
    lg = torch.from_numpy(np.asarray(logits, dtype=np.float64))[0, :-1]
    return float(torch.nn.functional.cross_entropy(lg, ids[0, 1:]))


@pytest.fixture(scope="module")
def compiled():
    """Compiled tiny Llamas by (plan, layers), one capture per depth (each compile copies the tensors)."""
    programs: dict[int, qcompile.Program] = {}
    cache: dict[tuple[str, int], qcompile.CompiledModule] = {}

    def get(plan: str, layers: int = 2) -> qcompile.CompiledModule:
        if (plan, layers) not in cache:
            if layers not in programs:
                programs[layers] = qcompile.capture(tiny_llama(layers=layers), max_cache_len=64)
            prog = programs[layers].copy()
            prog.state = {k: v.clone() for k, v in prog.state.items()}
            p = _unfolded_mergequant() if plan == "mq-unfolded" else plan
            cache[plan, layers] = qcompile.compile(prog, plan=p, backend="torch", calib=CALIB)
        return cache[plan, layers]

    return get


@pytest.mark.parametrize("fmt", ["qdq", "ort"])
@pytest.mark.parametrize("plan", QUANT_PLANS)
def test_onnxruntime_logits_match_the_reference(compiled, plan, fmt, tmp_path):
    """The plans of the issue on a one-layer tiny Llama (the export time grows with the graph)."""
    cm = compiled(plan, layers=1)
    res = cm.export_onnx(tmp_path / "m.onnx", fmt, entry="forward")
    assert res.entry == "forward" and res.inputs == ("input_ids",) and res.outputs == ("logits",)
    model = onnx.load(str(res.path))
    ops = {(n.domain or "ai.onnx", n.op_type) for n in model.graph.node}
    if fmt == "qdq":
        assert all(d == "ai.onnx" for d, _ in ops) and ("ai.onnx", "DequantizeLinear") in ops
    elif plan.startswith("w4a16"):
        assert ("com.microsoft", "MatMulNBits") in ops
    else:
        assert ("ai.onnx", "MatMulInteger") in ops
    sess = ort_session(res.path)
    for ids in (IDS, IDS[:, :7], IDS[:, :1]):
        got = sess.run(None, {"input_ids": ids.numpy()})[0]
        ref = cm(ids).numpy()
        err = _rel(got, ref)
        print(f"{plan} {fmt} T={ids.shape[1]}: max relative logit error {err:.2e}")
        assert err < TOL_MODEL
    nll_onnx, nll_ref = _nll(sess.run(None, {"input_ids": IDS.numpy()})[0], IDS), _nll(cm(IDS).numpy(), IDS)
    ppl = abs(np.exp(nll_onnx) / np.exp(nll_ref) - 1)
    print(f"{plan} {fmt}: perplexity relative difference {ppl:.1e}")
    assert ppl < 1e-4


def _unfolded_mergequant():
    """w8a8-mergequant with its steps not folded: explicit quantize_static / dequantize_static ops."""
    p = get_plan("w8a8-mergequant")
    return dataclasses.replace(p, name="mq-unfolded", passes=(PassConfig("fold_quant_steps", (("fold", False),)),))


@pytest.mark.parametrize(("plan", "fmt"), [("w4a4-mergequant", "ort"), ("mq-unfolded", "qdq")])
def test_static_activation_plans(compiled, plan, fmt, tmp_path):
    """MergeQuant: linear_static (folded steps, grouped integer products) and the unfolded
    quantize_static / dequantize_static form, one format each (the translations are shared)."""
    cm = compiled(plan, layers=1)
    res = cm.export_onnx(tmp_path / "mq.onnx", fmt, entry="forward")
    got = ort_session(res.path).run(None, {"input_ids": IDS.numpy()})[0]
    err = _rel(got, cm(IDS).numpy())
    print(f"{plan} {fmt}: max relative logit error {err:.2e}")
    assert err < TOL_MODEL


def _linear_plan(name: str, group: int):
    """Preset ``name`` with weight (and grouped activation) groups of ``group``."""
    p = get_plan(name)
    act = p.activation
    if act is not None and act.group_size is not None:
        act = dataclasses.replace(act, group_size=group)
    return dataclasses.replace(
        p, name=f"{name}-g{group}", weight=dataclasses.replace(p.weight, group_size=group), activation=act
    )


LIN_X = torch.randn(3, 5, 80, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("fmt", ["qdq", "ort"])
@pytest.mark.parametrize(
    ("plan", "group"),
    [
        ("w8a8-rtn", 0),
        ("w6a8", 32),
        ("w4a16-rtn-g32-asym", 32),
        ("w4a4-rtn", 16),
        ("w4a16-rtn-g128", 24),
        ("w8a16", 0),
    ],
)
def test_one_linear_matches_the_reference_tightly(plan, group, fmt, tmp_path):
    """One linear, K = 80: per channel, or groups of 32 (two whole, one of 16) or 16, so the blocked
    scales, the grouped integer products and MatMulNBits' padded last block are used; a group of 24 (not
    a power of two) is no MatMulNBits block size, so the linear keeps the qdq form in the ort format,
    and the export says so."""
    model = torch.nn.Sequential(torch.nn.Linear(80, 48)).eval()
    if plan == "w8a16":  # int8 weight-only (the lm_head int8 setting): MatMulNBits with 8-bit codes
        p = dataclasses.replace(get_plan("w4a16-rtn-g128"), name="w8a16", weight=QuantSpec(8, Granularity.PER_CHANNEL))
    else:
        p = _linear_plan(plan, group) if group else plan
    cm = qcompile.compile(model, plan=p, example_inputs=(LIN_X,), backend="torch")
    res = cm.export_onnx(tmp_path / "lin.onnx", fmt)
    fallback = fmt == "ort" and group == 24
    assert len(res.notes) == (1 if fallback else 0)
    assert all("group size 24 is not a power of two >= 16" in n for n in res.notes)
    ops = {(n.domain or "ai.onnx", n.op_type) for n in onnx.load(str(res.path)).graph.node}
    weight_only = cm.plan.activation is None
    if fmt == "qdq" or fallback:
        assert all(d == "ai.onnx" for d, _ in ops) and ("ai.onnx", "DequantizeLinear") in ops
    else:
        assert (("com.microsoft", "MatMulNBits") if weight_only else ("ai.onnx", "MatMulInteger")) in ops
    got = ort_session(res.path).run(None, {res.inputs[0]: LIN_X.numpy()})[0]
    err = _rel(got, cm(LIN_X).numpy())
    print(f"{plan} g{group} {fmt}: max relative error {err:.2e}")
    assert err < TOL


def _onnx_generate(sess, res, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy generation in onnxruntime alone: prefill, then one token per call, present fed back as past."""
    past = {c.input: np.zeros(c.shape, dtype=np.float32) for c in res.cache}
    tokens, step, pos = prompt.clone(), prompt, torch.arange(prompt.shape[1])
    for _ in range(n):
        outs = sess.run(None, {"input_ids": step.numpy(), "cache_position": pos.numpy(), **past})
        past = {c.input: o for c, o in zip(res.cache, outs[1:])}
        nxt = torch.tensor([[int(np.argmax(outs[0][0, -1]))]])
        tokens = torch.cat([tokens, nxt], dim=1)
        step, pos = nxt, torch.tensor([tokens.shape[1] - 1])
    return tokens


def test_a_bf16_plan_exports_fp32_activations_and_says_so(tmp_path):
    """``float_compute: bf16`` is a TVM CPU kernel choice: the ONNX graph keeps fp32 activations (the
    reference's numbers) and the export's notes say so."""
    model = torch.nn.Sequential(torch.nn.Linear(80, 48)).eval()
    p = get_plan("w4a16-rtn-g32-asym").with_float_compute("bf16")
    cm = qcompile.compile(model, plan=p, example_inputs=(LIN_X,), backend="torch")
    res = cm.export_onnx(tmp_path / "lin.onnx", "qdq")
    assert res.notes == ("float_compute bf16 is not in the ONNX graph: its weight-only linears take fp32 activations",)


@pytest.mark.parametrize(("plan", "fmt"), [("fp32", "qdq"), ("w4a16-rtn-g128", "ort")])
def test_greedy_generate_in_onnxruntime_reproduces_qcompile(compiled, plan, fmt, tmp_path):
    cm = compiled(plan)
    res = cm.export_onnx(tmp_path / "lm.onnx", fmt)
    assert res.entry == "prefill"
    assert res.inputs == (
        "input_ids",
        "cache_position",
        "past_key_values.0.key",
        "past_key_values.0.value",
        "past_key_values.1.key",
        "past_key_values.1.value",
    )
    assert res.outputs == ("logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value")
    assert all(c.shape == (1, 2, 64, 16) for c in res.cache)  # [batch, kv heads, max_cache_len, head dim]
    sess = ort_session(res.path)
    # prefill over an empty cache: the logits of the whole sequence (fp32: the 1e-4 bound holds with room)
    zeros = {c.input: np.zeros(c.shape, dtype=np.float32) for c in res.cache}
    pos = torch.arange(IDS.shape[1])
    got = sess.run(None, {"input_ids": IDS.numpy(), "cache_position": pos.numpy(), **zeros})
    cm.reset_cache()
    err = _rel(got[0], cm.run_entry("prefill", IDS, pos).numpy())
    print(f"{plan} {fmt} prefill: max relative logit error {err:.2e}")
    assert err < TOL
    # present = past with the prompt's rows written, the rest untouched (zeros)
    assert all(
        np.abs(p[:, :, IDS.shape[1] :]).max() == 0 and np.abs(p[:, :, : IDS.shape[1]]).max() > 0 for p in got[1:]
    )
    want = cm.generate(PROMPT, 32, eos_token_id=[])
    assert torch.equal(_onnx_generate(sess, res, PROMPT, 32), want)


def test_the_decode_entry_exports_with_the_same_cache_layout(compiled, tmp_path):
    cm = compiled("w4a16-rtn-g128", layers=1)
    res = cm.export_onnx(tmp_path / "decode.onnx", "qdq", entry="decode")
    assert res.entry == "decode" and [c.input for c in res.cache] == [
        "past_key_values.0.key",
        "past_key_values.0.value",
    ]
    cm.reset_cache()
    cm.run_entry("prefill", PROMPT, torch.arange(PROMPT.shape[1]))
    past = {c.input: cm._cache[c.key].numpy().copy() for c in res.cache}
    step, pos = PROMPT[:, :1], torch.tensor([PROMPT.shape[1]])
    ref = cm.run_entry("decode", step, pos).numpy()  # writes row pos of qcompile's cache
    out = ort_session(res.path).run(None, {"input_ids": step.numpy(), "cache_position": pos.numpy(), **past})
    assert _rel(out[0], ref) < TOL_MODEL
    for c, present in zip(res.cache, out[1:]):
        assert _rel(present, cm._cache[c.key].numpy()) < TOL_MODEL


def test_a_translation_error_names_the_node(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(80, 48)).eval()
    cm = qcompile.compile(model, plan="w4a16-rtn-g128", example_inputs=(LIN_X,), backend="torch")
    cm.program.weight_bits.clear()  # an inconsistent Program: codes of unknown width
    with pytest.raises(OnnxExportError, match=r"records no bit width for weight codes .*\(node quant_linear of entry"):
        cm.export_onnx(tmp_path / "lin.onnx", "ort")
    assert os.listdir(tmp_path) == []


CNN_X = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
CNN_CALIB = [torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in (1, 2)]


# dynamic per-pixel int8 activations (simulated quantization in the reference, spelled out in ONNX)
CNN_PIXEL = Plan(
    name="cnn-w8a8-pixel",
    passes=(PassConfig("quantize_weights"),),
    weight=QuantSpec(8, Granularity.PER_CHANNEL),
    activation=QuantSpec(8, Granularity.PER_TOKEN),
)


@pytest.fixture(scope="module")
def cnn():
    cache: dict[str, qcompile.CompiledModule] = {}

    def get(plan: str) -> qcompile.CompiledModule:
        if plan not in cache:
            p = CNN_PIXEL if plan == CNN_PIXEL.name else plan
            cache[plan] = qcompile.compile(
                tiny_cnn(), plan=p, example_inputs=(CNN_X,), calib=CNN_CALIB, backend="torch"
            )
        return cache[plan]

    return get


@pytest.mark.parametrize("fmt", ["qdq", "ort"])
@pytest.mark.parametrize("plan", ["cnn-w8a8", "cnn-w4a16", CNN_PIXEL.name])
def test_cnn_export_matches_the_reference(cnn, plan, fmt, tmp_path):
    cm = cnn(plan)
    res = cm.export_onnx(tmp_path / "cnn.onnx", fmt)
    ops = {n.op_type for n in onnx.load(str(res.path)).graph.node}
    if plan == "cnn-w8a8":
        assert ("ConvInteger" if fmt == "ort" else "QuantizeLinear") in ops
    got = ort_session(res.path).run(None, {res.inputs[0]: CNN_X.numpy()})[0]
    err = _rel(got, cm(CNN_X).numpy())
    print(f"{plan} {fmt}: max relative error {err:.2e}")
    assert err < TOL


# ---- bad input ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cnn_fp32(cnn):
    return cnn("fp32")


def test_a_directory_as_the_output_path_is_refused(cnn_fp32, tmp_path):
    d = tmp_path / "out.onnx"
    d.mkdir()
    with pytest.raises(OnnxExportError, match="is a directory"):
        cnn_fp32.export_onnx(d)
    with pytest.raises(OnnxExportError, match="does not exist"):
        cnn_fp32.export_onnx(tmp_path / "missing" / "m.onnx")
    assert list(d.iterdir()) == []


def test_an_unknown_format_or_entry_is_refused(cnn_fp32, tmp_path):
    with pytest.raises(OnnxExportError, match=r"unknown ONNX export format 'onnx'; formats: qdq, ort"):
        cnn_fp32.export_onnx(tmp_path / "m.onnx", "onnx")
    with pytest.raises(OnnxExportError, match=r"no entry 'decode'; entries: \['forward'\]"):
        cnn_fp32.export_onnx(tmp_path / "m.onnx", entry="decode")
    assert not (tmp_path / "m.onnx").exists()


def test_winograd_convolutions_are_listed_as_inexpressible(tmp_path):
    cm = qcompile.compile(tiny_cnn(), plan="winograd-f4", example_inputs=(CNN_X,), backend="torch")
    with pytest.raises(
        InexpressibleOpError,
        match=r"node\(s\) use qcompile ops without an ONNX form: .*qcompile::winograd_conv2d at 0\)",
    ):
        cm.export_onnx(tmp_path / "w.onnx")
    assert os.listdir(tmp_path) == []


def test_xquant_caches_are_listed_as_inexpressible(tmp_path):
    cm = qcompile.compile(tiny_llama(), plan="xcache-4bit", max_cache_len=16, backend="torch", lm_entries=("prefill",))
    with pytest.raises(InexpressibleOpError, match=r"qcompile::cache_quantize at model\.layers\.0\."):
        cm.export_onnx(tmp_path / "x.onnx", "ort")
    assert os.listdir(tmp_path) == []


def test_external_data_and_overwrite(cnn_fp32, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    res = cnn_fp32.export_onnx(out, external_data=True)
    assert res.data_path is not None and res.data_path.parent == tmp_path and res.data_path.stat().st_size > 1000
    proto = onnx.load(str(out), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and {e.value for t in external for e in t.external_data if e.key == "location"} == {
        res.data_path.name
    }
    onnx.checker.check_model(str(out), full_check=True)
    got = ort_session(out).run(None, {res.inputs[0]: CNN_X.numpy()})[0]
    assert _rel(got, cnn_fp32(CNN_X).numpy()) < TOL
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, res.data_path.name])  # no temp files


def test_cli_export(cnn, tmp_path, capsys):
    from qcompile.cli import main

    cm = cnn("cnn-w8a8")
    art = cm.save(tmp_path / "art")
    out = tmp_path / "cnn.onnx"
    assert main(["export", str(art), "--onnx", str(out), "--format", "ort"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    got = ort_session(out).run(None, {"input": CNN_X.numpy()})[0]
    assert _rel(got, cm(CNN_X).numpy()) < TOL
    assert main(["export", str(art), "--onnx", str(out), "--format", "tflite"]) == 2
    assert "unknown ONNX export format 'tflite'" in capsys.readouterr().err
    assert main(["export", str(art), "--onnx", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
