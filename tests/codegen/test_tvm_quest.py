"""TVM CPU kernels for QuEST: the block Walsh–Hadamard transform and the QuEST row quantizer against
the references, and a tiny Llama under w4a4-quest on TVM against the torch backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qcompile
from qcompile.codegen.tvm.kernels.quest import Hadamard, QuestRows, hadamard_primfunc, quest_rows_primfunc
from qcompile.codegen.tvm.target import host_target
from qcompile.quant.hadamard import BlockRule, fwht, hadamard_blocks, rotate_dense
from qcompile.quant.quest import optimal_alpha, quest_codes
from tests.conftest import make_tiny_llama

pytestmark = pytest.mark.tvm


def _run(func, inputs, outputs):
    import tvm

    lib = tvm.compile(func, target=host_target().tvm)
    ins = [tvm.runtime.tensor(a.contiguous().numpy()) for a in inputs]
    outs = [tvm.runtime.tensor(np.zeros(s, d)) for s, d in outputs]
    lib(*ins, *outs)
    return [torch.from_numpy(o.numpy()) for o in outs]


@pytest.mark.parametrize(
    ("blocks", "rows", "static"),
    [
        (hadamard_blocks(576), 3, False),
        (hadamard_blocks(576, rule=BlockRule.UNIFORM), 1, True),  # one static row: a decode step
        ((16, 4, 2, 1), 5, True),
        ((8, 8, 32), 2, False),
    ],
)
def test_hadamard_kernel_equals_butterfly_and_dense_product(blocks, rows, static):
    x = torch.randn(rows, sum(blocks), generator=torch.Generator().manual_seed(rows)) * 5
    (y,) = _run(hadamard_primfunc(Hadamard(tuple(blocks), rows if static else None)), [x], [(x.shape, "float32")])
    assert torch.equal(y, fwht(x, blocks))  # the same float operations: bitwise
    torch.testing.assert_close(y.double(), rotate_dense(x, blocks), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("bits", "rows", "static"), [(2, 4, False), (4, 1, True), (4, 6, False), (6, 3, True)])
def test_quest_rows_kernel_codes_are_the_references(bits, rows, static):
    k, k_p = 570, 576
    g = torch.Generator().manual_seed(bits)
    x = torch.nn.functional.pad(torch.randn(rows, k, generator=g) * 3, (0, k_p - k))
    x[0, :k] = 0.0  # an all-zero token: σ = 1
    if rows > 2:
        x[2, 7] = float("nan")
    codes, hs = _run(
        quest_rows_primfunc(QuestRows(k, k_p, bits, rows if static else None)),
        [x],
        [((rows, k_p), "int8"), ((rows, 1), "float32")],
    )
    ref_codes, ref_hs = quest_codes(x[:, :k], bits)
    ok = [i for i in range(rows) if not (rows > 2 and i == 2)]
    torch.testing.assert_close(hs[ok], ref_hs[ok], atol=0, rtol=2e-6)  # the sum of squares' order differs: a few ulps
    # given the kernel's half step, its codes are exactly the reference's formula
    n = 2 ** (bits - 1)
    want = 2 * torch.clamp(torch.floor(x[:, :k] / (2.0 * hs)), -n, n - 1) + 1
    assert torch.equal(codes[ok, :k].to(torch.float32), want[ok])
    assert torch.equal(codes[ok, :k].short(), ref_codes[ok])
    assert not codes[:, k:].any()  # the padding contributes nothing
    assert float(hs[0, 0]) == pytest.approx(optimal_alpha(bits) / (2**bits - 1), rel=1e-6)
    if rows > 2:
        assert hs[2].isnan().all()


def _quest_pair(entries: tuple[str, ...]):
    m = make_tiny_llama(layers=1, seed=5)
    prog = qcompile.capture(m, max_cache_len=48, lm_entries=entries)
    ct = qcompile.compile(prog.copy(), plan="w4a4-quest", backend="tvm")
    cr = qcompile.compile(prog.copy(), plan="w4a4-quest", backend="torch")
    kernels = str(ct.report.backend["kernels"])
    assert "qc_hadamard" in kernels and "qc_quest_rows" in kernels and not ct.report.backend["fallbacks"]
    return ct, cr


IDS = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))


def test_w4a4_quest_on_tvm_equals_the_torch_backend():
    ct, cr = _quest_pair(("forward",))
    a, b = ct(IDS), cr(IDS)
    torch.testing.assert_close(a, b, atol=1e-4 * float(b.abs().max()), rtol=1e-4)


@pytest.mark.slow
def test_w4a4_quest_generation_on_tvm_equals_the_torch_backend():
    ct, cr = _quest_pair(("forward", "prefill", "decode"))
    assert torch.equal(ct.generate(IDS[:, :6], max_new_tokens=6), cr.generate(IDS[:, :6], max_new_tokens=6))
