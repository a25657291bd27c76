import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.quant.bitserial import bitserial_matmul, plane_weights, popcount32
from qcompile.quant.packing import code_range


def test_popcount32_against_python():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-(2**31), 2**31 - 1, (500,), generator=g, dtype=torch.int64).to(torch.int32)
    want = [bin(int(v) & 0xFFFFFFFF).count("1") for v in x]
    assert popcount32(x).tolist() == want
    assert popcount32(torch.tensor([-1, 0, 1, -(2**31)], dtype=torch.int32)).tolist() == [32, 0, 1, 1]


def test_plane_pair_counts():
    assert len(plane_weights(6)) * len(plane_weights(6)) == 36  # W6A6
    assert len(plane_weights(8)) * len(plane_weights(6)) == 48  # W6A8
    assert plane_weights(6) == [1, 2, 4, 8, 16, -32]


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 5),
    n=st.integers(1, 6),
    k=st.integers(1, 150),
    bits=st.sampled_from([(6, 6), (8, 6), (4, 4), (2, 8)]),
    signed=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_bitserial_equals_integer_matmul_exactly(m, n, k, bits, signed, seed):
    a_bits, w_bits = bits
    g = torch.Generator().manual_seed(seed)
    lo_a, hi_a = code_range(a_bits, signed)
    lo_w, hi_w = code_range(w_bits, signed)
    qa = torch.randint(lo_a, hi_a + 1, (m, k), generator=g)
    qw = torch.randint(lo_w, hi_w + 1, (n, k), generator=g)
    qa[0, 0], qw[0, 0] = lo_a, lo_w  # extremes, including the most negative code
    assert torch.equal(bitserial_matmul(qa, qw, a_bits, w_bits, signed), qa @ qw.T)
