import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcompile.quant.packing import code_range, from_bitplanes, pack, packed_size, to_bitplanes, unpack


@st.composite
def codes_and_width(draw):
    bits = draw(st.sampled_from([2, 3, 4, 6, 8]))
    signed = draw(st.booleans())
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=2))) + (draw(st.integers(1, 97)),)
    lo, hi = code_range(bits, signed)
    seed = draw(st.integers(0, 2**31 - 1))
    codes = torch.randint(lo, hi + 1, shape, generator=torch.Generator().manual_seed(seed))
    if draw(st.booleans()):  # include the extremes of the range
        flat = codes.view(-1)
        flat[0] = lo
        flat[-1] = hi
    return codes, bits, signed


@settings(max_examples=150, deadline=None)
@given(codes_and_width())
def test_pack_unpack_is_the_identity(case):
    codes, bits, signed = case
    packed = pack(codes, bits, signed)
    k = codes.shape[-1]
    assert packed.dtype == torch.uint8 and packed.shape == (*codes.shape[:-1], packed_size(k, bits))
    assert torch.equal(unpack(packed, k, bits, signed).to(torch.int64), codes)


@settings(max_examples=150, deadline=None)
@given(codes_and_width())
def test_bitplanes_round_trip_and_plane_weights(case):
    codes, bits, signed = case
    planes = to_bitplanes(codes, bits, signed)
    k = codes.shape[-1]
    assert planes.shape == (bits, *codes.shape[:-1], (k + 31) // 32) and planes.dtype == torch.int32
    assert torch.equal(from_bitplanes(planes, k, signed).to(torch.int64), codes)


def test_six_bit_codes_take_three_bytes_per_four():
    codes = torch.tensor([[-32, 31, 0, -1, 5, -6, 7, -8]])
    packed = pack(codes, 6, signed=True)
    assert packed.shape == (1, 6)
    # little-endian bit stream: -32 -> 100000b, 31 -> 011111b: first byte = 0b11_100000
    assert int(packed[0, 0]) == 0b11100000
    assert torch.equal(unpack(packed, 8, 6).long(), codes)
    assert packed_size(4, 6) == 3 and packed_size(8, 3) == 3 and packed_size(2, 4) == 1


def test_bitplane_layout_is_little_endian_per_word():
    codes = torch.zeros(40, dtype=torch.int64)
    codes[0] = 1  # bit 0 of code 0
    codes[33] = 2  # bit 1 of code 33 -> plane 1, word 1, bit 1
    planes = to_bitplanes(codes, 2, signed=False)
    assert planes.tolist() == [[1, 0], [0, 2]]


def test_sign_plane_bit_31_and_errors():
    codes = torch.zeros(32, dtype=torch.int64)
    codes[31] = -1  # all bits set in code 31 -> bit 31 of each plane word
    planes = to_bitplanes(codes, 4)
    assert all(int(p[0]) == -(2**31) for p in planes)
    with pytest.raises(ValueError, match=r"outside the signed 4-bit range \[-8, 7\]"):
        pack(torch.tensor([8]), 4)
    with pytest.raises(ValueError, match="bits must be one of"):
        pack(torch.tensor([1]), 5)
    with pytest.raises(ValueError, match="integer tensor"):
        pack(torch.tensor([1.0]), 4)
    with pytest.raises(ValueError, match="need 3 bytes"):
        unpack(torch.zeros(1, 2, dtype=torch.uint8), 4, 6)
