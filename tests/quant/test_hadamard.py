"""Block Hadamard numerics: Sylvester matrices, the block rule, the butterfly against the dense product."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qcompile  # noqa: F401  (registers ops)
from qcompile.quant.hadamard import (
    BlockRule,
    dense_block_hadamard,
    fwht,
    hadamard_blocks,
    rotate_columns,
    rotate_dense,
    rotate_rows,
    sylvester,
)


@pytest.mark.parametrize("b", [1, 2, 4, 64, 128])
def test_sylvester_is_symmetric_orthogonal_and_plus_minus(b):
    h = sylvester(b)
    assert torch.equal(h, h.t())
    torch.testing.assert_close(h @ h.t(), torch.eye(b, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal((h.abs() * math.sqrt(b)).round(), torch.ones(b, b, dtype=torch.float64))


def test_sylvester_refuses_other_orders():
    with pytest.raises(ValueError, match="power-of-two"):
        sylvester(12)


@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 1600), log_max=st.integers(1, 8), rule=st.sampled_from(list(BlockRule)))
def test_block_rule(width, log_max, rule):
    mb = 2**log_max
    blocks = hadamard_blocks(width, mb, rule)
    assert sum(blocks) == width and all(b & (b - 1) == 0 and b <= mb for b in blocks)
    if rule is BlockRule.UNIFORM:
        assert len(set(blocks)) == 1 and width % blocks[0] == 0
        assert blocks[0] == mb or width % (2 * blocks[0])  # the largest such power of two
    else:
        assert list(blocks) == sorted(blocks, reverse=True)
        assert blocks.count(mb) == width // mb and len(set(blocks[width // mb :])) == len(blocks) - width // mb


def test_smollm2_widths():
    assert hadamard_blocks(576) == (128, 128, 128, 128, 64)
    assert hadamard_blocks(576, rule=BlockRule.UNIFORM) == (64,) * 9
    assert hadamard_blocks(1536) == (128,) * 12


@settings(max_examples=40, deadline=None)
@given(
    width=st.integers(1, 700),
    lead=st.integers(1, 5),
    log_max=st.integers(0, 7),
    rule=st.sampled_from(list(BlockRule)),
    seed=st.integers(0, 2**31 - 1),
)
def test_butterfly_equals_dense_product(width, lead, log_max, rule, seed):
    blocks = hadamard_blocks(width, 2**log_max, rule)
    x = torch.randn(lead, 2, width, generator=torch.Generator().manual_seed(seed)) * 10
    want = rotate_dense(x, blocks)
    torch.testing.assert_close(fwht(x.double(), blocks), want, atol=1e-12, rtol=1e-12)
    got = torch.ops.qcompile.hadamard(x, list(blocks))
    assert got.dtype == x.dtype and got.shape == x.shape
    torch.testing.assert_close(got.double(), want, atol=1e-5 * float(x.abs().max()), rtol=1e-5)


def test_rotation_keeps_the_linear():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 576, generator=g, dtype=torch.float64), torch.randn(33, 576, generator=g, dtype=torch.float64)
    blocks = hadamard_blocks(576)
    torch.testing.assert_close(fwht(x, blocks) @ rotate_columns(w, blocks).t(), x @ w.t())
    # rotating a linear's output rows rotates its output
    rb = hadamard_blocks(33, 8, BlockRule.GREEDY)
    torch.testing.assert_close(x @ rotate_rows(w, rb).t(), fwht(x @ w.t(), rb))
    assert not torch.allclose(rotate_columns(w, blocks), w)


def test_nan_stays_in_its_block():
    x = torch.ones(1, 576)
    x[0, 3] = float("nan")
    y = fwht(x, hadamard_blocks(576))
    assert y[0, :128].isnan().all() and not y[0, 128:].isnan().any()


def test_bad_blocks():
    with pytest.raises(ValueError, match="summing"):
        fwht(torch.ones(2, 10), [8])
    with pytest.raises(ValueError, match="powers of two"):
        dense_block_hadamard([3])
    with pytest.raises(ValueError, match="max_block"):
        hadamard_blocks(10, 6)
