"""2- and 3-bit weights stored densely packed: ``qcompile::packed_linear`` with a float offset
(unsigned asymmetric codes) equals ``quant_linear`` on the unpacked codes; ``quantize_weights``
writes packed storage for 2/3-bit plans (symmetric and asymmetric) and the report's stored bytes are
the packed size; the Program re-exports, saves and loads, and exports to ONNX."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcompile
from qcompile.ops.packed import pack_codes, unpack_codes
from qcompile.plan import get_plan
from qcompile.quant.quantizer import quantize_weight_groups
from qcompile.quant.spec import Granularity, QuantSpec

IDS = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    bits=st.sampled_from([2, 3]),
    symmetric=st.booleans(),
    n=st.integers(1, 40),
    k=st.integers(2, 150),
    group=st.sampled_from([0, 16, 32, 64]),
    act_bits=st.sampled_from([0, 8]),
    seed=st.integers(0, 2**16),
)
def test_packed_linear_equals_quant_linear_on_the_codes(bits, symmetric, n, k, group, act_bits, seed):
    g = torch.Generator().manual_seed(seed)
    gs = group or k
    w, x, b = torch.randn(n, k, generator=g), torch.randn(3, k, generator=g), torch.randn(n, generator=g)
    codes, scale, offset = quantize_weight_groups(w, bits, gs, symmetric)
    packed = pack_codes(codes, bits, signed=symmetric)
    assert torch.equal(unpack_codes(packed, k, bits, signed=symmetric), codes.to(torch.int8))
    ab = 0 if offset is not None else act_bits  # integer activations take symmetric weights here
    y = torch.ops.qcompile.packed_linear(x, packed, scale, b, k, bits, gs, ab, 0, offset)
    assert torch.equal(y, torch.ops.qcompile.quant_linear(x, codes, scale, offset, b, gs, ab, 0))


def _plan(bits: int, symmetric: bool, group: int | None):
    gran = Granularity.PER_GROUP if group else Granularity.PER_CHANNEL
    spec = QuantSpec(bits, gran, symmetric, group, partial_last_group=bool(group))
    return dataclasses.replace(get_plan("w4a16-rtn-g128"), name=f"w{bits}", weight=spec)


@pytest.mark.parametrize(("bits", "symmetric", "group"), [(2, False, 64), (3, True, 32), (3, False, None)])
def test_quantize_weights_stores_lowbit_codes_packed(tiny_llama_program, bits, symmetric, group, tmp_path, monkeypatch):
    cm = qcompile.compile(tiny_llama_program.copy(), plan=_plan(bits, symmetric, group), backend="torch")
    st_ = cm.program.state
    packed = {k: t for k, t in st_.items() if k.endswith(".qweight_packed")}
    assert len(packed) == 14 and not any(k.endswith(".qweight") for k in st_)  # 7 linears x 2 layers
    ops = [n for _, n in cm.program.nodes() if n.target == torch.ops.qcompile.packed_linear.default]
    assert ops and all(int(n.args[5]) == bits for n in ops)
    assert all((len(n.args) > 9 and n.args[9] is not None) == (not symmetric) for n in ops)
    # ceil(K·bits/8) bytes per output channel (the tiny Llama's K: 64, or 128 for the MLP's down_proj)
    assert all(t.shape[1] in ((64 * bits + 7) // 8, (128 * bits + 7) // 8) for t in packed.values())
    code_bytes = sum(t.numel() for t in packed.values())
    assert cm.report.weight_bytes["uint8"] == code_bytes  # what the report says is stored
    # the same codes stored one per int8 (quant_linear) give the same logits, bit for bit
    monkeypatch.setattr("qcompile.passes.quantize_weights.PACKED_BITS", (6,))
    bytewise = qcompile.compile(tiny_llama_program.copy(), plan=_plan(bits, symmetric, group), backend="torch")
    assert any(k.endswith(".qweight") for k in bytewise.program.state)
    assert torch.equal(cm(IDS), bytewise(IDS))
    # the artifact keeps the packed bytes and the op (with its offset) as they are
    cm.save(tmp_path / "a")
    back = qcompile.load(tmp_path / "a", backend="torch")
    assert torch.equal(back(IDS), cm(IDS))
    assert all(torch.equal(back.program.state[k], t) for k, t in packed.items())


def test_lowbit_packed_bytes_are_smaller_than_four_bit_storage(tiny_llama_program):
    def code_bytes(bits: int) -> int:
        cm = qcompile.compile(tiny_llama_program.copy(), plan=_plan(bits, False, 64), backend="torch")
        return sum(t.numel() * t.element_size() for k, t in cm.program.state.items() if ".qweight" in k)

    b2, b3, b4 = code_bytes(2), code_bytes(3), code_bytes(4)
    assert b4 == 4 * b2 and 3 * b4 == 8 * b3  # int8 one-per-byte (4-bit) vs 4 per byte and 8 in 3 bytes


@pytest.mark.parametrize("fmt", ["qdq", "ort"])
@pytest.mark.parametrize(("bits", "symmetric"), [(2, False), (3, True)])
def test_packed_lowbit_linear_exports_to_onnx(bits, symmetric, fmt, tmp_path):
    from qcompile.runtime.onnx_export import ort_session

    x = torch.randn(3, 5, 80, generator=torch.Generator().manual_seed(3))
    model = torch.nn.Sequential(torch.nn.Linear(80, 48)).eval()
    cm = qcompile.compile(model, plan=_plan(bits, symmetric, 32), example_inputs=(x,), backend="torch")
    assert any(n.target == torch.ops.qcompile.packed_linear.default for _, n in cm.program.nodes())
    res = cm.export_onnx(tmp_path / "lin.onnx", fmt)
    got = ort_session(res.path).run(None, {res.inputs[0]: x.numpy()})[0]
    want = cm(x).numpy()
    assert float(np.abs(got - want).max() / np.abs(want).max()) < 2e-6
