"""Bit-packing of low-bit integer codes, and bit-plane layouts for bit-serial kernels.

Dense packing (:func:`pack` / :func:`unpack`): the codes of each row (last axis) form one
little-endian bit stream — code ``j`` occupies bits ``[j·b, (j+1)·b)`` of the row, least
significant bit first — padded with zero bits to whole bytes. So 6-bit codes take exactly 3 bytes
per 4 codes, 4-bit codes 1 byte per 2, 3-bit codes 3 bytes per 8. Signed codes are stored in
``b``-bit two's complement and sign-extended on unpacking.

Bit planes (:func:`to_bitplanes` / :func:`from_bitplanes`): plane ``i`` holds bit ``i`` of every
code (two's complement for signed codes), packed 32 codes per int32 word along the last axis
(little-endian: code ``j`` is bit ``j % 32`` of word ``j // 32``). A signed code is
``Σ_{i<b-1} 2^i·plane_i − 2^(b-1)·plane_(b-1)``: the sign plane carries a negative weight, which is
what a bit-serial GEMM (popcount of plane ANDs) uses.
"""

from __future__ import annotations

import torch

from qcompile.quant.spec import BITS


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    """Inclusive range of ``bits``-bit storage (two's complement when signed: one more negative
    value than the symmetric quantization grid of :func:`qcompile.quant.spec.levels` uses)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {list(BITS)}, got {bits}")
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _check(codes: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.dim() == 0:
        raise ValueError(
            f"codes must be an integer tensor with at least one axis, got {codes.dtype}[{list(codes.shape)}]"
        )
    lo, hi = code_range(bits, signed)
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < lo or int(c.max()) > hi):
        kind = "signed" if signed else "unsigned"
        raise ValueError(
            f"codes outside the {kind} {bits}-bit range [{lo}, {hi}]: min {int(c.min())}, max {int(c.max())}"
        )
    return c & (2**bits - 1)  # two's complement bit pattern


def packed_size(k: int, bits: int) -> int:
    """Bytes per row of ``k`` codes."""
    return (k * bits + 7) // 8


def _bits_of(u: torch.Tensor, bits: int) -> torch.Tensor:
    shifts = torch.arange(bits, dtype=torch.int64)
    return (u.unsqueeze(-1) >> shifts) & 1  # [..., K, bits], LSB first


def pack(codes: torch.Tensor, bits: int, signed: bool = True) -> torch.Tensor:
    """Dense little-endian packing of ``codes[..., K]`` → ``uint8[..., ceil(K·bits/8)]``."""
    u = _check(codes, bits, signed)
    *lead, k = u.shape
    stream = _bits_of(u, bits).reshape(*lead, k * bits)
    pad = packed_size(k, bits) * 8 - k * bits
    stream = torch.nn.functional.pad(stream, (0, pad)).reshape(*lead, -1, 8)
    weights = 2 ** torch.arange(8, dtype=torch.int64)
    return (stream * weights).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, k: int, bits: int, signed: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack`: ``uint8[..., ceil(k·bits/8)]`` → ``int8``/``int16`` codes ``[..., k]``."""
    code_range(bits, signed)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed data must be uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_size(k, bits):
        raise ValueError(f"{k} codes of {bits} bits need {packed_size(k, bits)} bytes per row, got {packed.shape[-1]}")
    *lead, _ = packed.shape
    stream = _bits_of(packed.to(torch.int64), 8).reshape(*lead, -1)[..., : k * bits].reshape(*lead, k, bits)
    u = (stream << torch.arange(bits, dtype=torch.int64)).sum(-1)
    if signed:
        u = torch.where(u >= 2 ** (bits - 1), u - 2**bits, u)
    return u.to(torch.int8 if bits < 8 or signed else torch.int16)


def to_bitplanes(codes: torch.Tensor, bits: int, signed: bool = True) -> torch.Tensor:
    """``codes[..., K]`` → ``int32[bits, ..., ceil(K/32)]``: plane ``i`` = bit ``i`` of each code."""
    u = _check(codes, bits, signed)
    *lead, k = u.shape
    words = (k + 31) // 32
    planes = _bits_of(u, bits).movedim(-1, 0)  # [bits, ..., K]
    planes = torch.nn.functional.pad(planes, (0, words * 32 - k)).reshape(bits, *lead, words, 32)
    packed = (planes << torch.arange(32, dtype=torch.int64)).sum(-1)  # < 2^32
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def from_bitplanes(planes: torch.Tensor, k: int, signed: bool = True) -> torch.Tensor:
    """Inverse of :func:`to_bitplanes`, by the plane-weighted sum (sign plane weighted −2^(b−1))."""
    bits = planes.shape[0]
    code_range(bits, signed)
    if planes.dtype != torch.int32 or planes.shape[-1] != (k + 31) // 32:
        raise ValueError(
            f"expected int32 planes with {(k + 31) // 32} words per row, got {planes.dtype}{list(planes.shape)}"
        )
    words = planes.to(torch.int64) & 0xFFFFFFFF
    bitvals = ((words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int64)) & 1).flatten(-2)[..., :k]  # [bits, ..., k]
    weights = 2 ** torch.arange(bits, dtype=torch.int64)
    if signed:
        weights[-1] = -weights[-1]
    value = (bitvals * weights.view(bits, *([1] * (bitvals.dim() - 1)))).sum(0)
    return value.to(torch.int8 if bits < 8 or signed else torch.int16)
