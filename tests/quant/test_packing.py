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


def _bitstream_reference(codes: list[list[int]], bits: int) -> list[list[int]]:
    """Plain Python dense packing: code j's two's-complement bits at stream positions j·b … j·b + b − 1."""
    out = []
    for row in codes:
        stream = [(c >> i) & 1 for c in row for i in range(bits)]  # Python ints: >> sign-extends, & masks
        stream += [0] * (-len(stream) % 8)
        out.append([sum(stream[p + i] << i for i in range(8)) for p in range(0, len(stream), 8)])
    return out


@settings(max_examples=80, deadline=None)
@given(
    bits=st.sampled_from([2, 3]),
    signed=st.booleans(),
    n=st.integers(1, 6),
    k=st.integers(1, 70).filter(lambda k: k % 8 != 0) | st.integers(1, 9).map(lambda j: 8 * j),
    seed=st.integers(0, 2**31 - 1),
)
def test_two_and_three_bit_packing_round_trips_and_matches_a_plain_bitstream(bits, signed, n, k, seed):
    """2-bit: 4 codes per byte; 3-bit: 8 codes in 3 bytes (a code straddles bytes 0/1 and 1/2); K not a
    multiple of 8 leaves zero padding bits; signed (two's complement) and unsigned (asymmetric) codes."""
    from qcompile.ops.packed import pack_codes, unpack_codes

    lo, hi = code_range(bits, signed)
    codes = torch.randint(lo, hi + 1, (n, k), generator=torch.Generator().manual_seed(seed))
    codes[0, 0], codes[-1, -1] = lo, hi
    packed = pack_codes(codes, bits, signed=signed)
    assert packed.shape == (n, -(-k * bits // 8)) and packed.dtype == torch.uint8
    assert packed.tolist() == _bitstream_reference(codes.tolist(), bits)
    assert torch.equal(unpack_codes(packed, k, bits, signed=signed).to(torch.int64), codes)
    if signed and int(codes.min()) < 0:  # the same bytes read unsigned are the two's complement patterns
        assert torch.equal(unpack_codes(packed, k, bits, signed=False).to(torch.int64), codes % 2**bits)


def test_three_bit_codes_take_three_bytes_per_eight():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]])
    packed = pack(codes, 3, signed=False)
    # stream (LSB first): 100 010 110 001 101 011 111 000 -> bytes 0b11_010_001 (code 2's low bits on top) ...
    assert packed.tolist() == [[0b11010001, 0b01011000, 0b00011111]]
    assert packed_size(8, 3) == 3 and packed_size(9, 3) == 4 and packed_size(5, 2) == 2
