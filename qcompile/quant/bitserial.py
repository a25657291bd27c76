"""The bit-serial form of an integer GEMM (what binary tensor-core kernels compute).

With ``a`` (``a_bits``-bit) and ``w`` (``w_bits``-bit) signed codes split into bit planes
(:func:`qcompile.quant.packing.to_bitplanes`, 32 codes per word), every product of a row of ``a``
and a row of ``w`` is::

    Σ_i Σ_j c_i · c_j · popcount(A_i AND W_j),   c_i = 2^i (i < b−1),  c_(b−1) = −2^(b−1)

over the ``a_bits × w_bits`` plane pairs (36 for W6A6, 48 for W6A8): the sign plane carries the
negative two's-complement weight. This module is the reference that the bit-serial kernels
(``mma ... b1 ... and.popc``) are checked against; it must equal the integer matmul exactly.
"""

from __future__ import annotations

import torch

from qcompile.quant.packing import to_bitplanes


def popcount32(x: torch.Tensor) -> torch.Tensor:
    """Number of set bits of each 32-bit word (int32 or int64 input), as int64 (SWAR)."""
    v = x.to(torch.int64) & 0xFFFFFFFF
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return ((v * 0x01010101) & 0xFFFFFFFF) >> 24


def plane_weights(bits: int, signed: bool = True) -> list[int]:
    """Weight of each bit plane: 2^i, the top (sign) plane −2^(b−1) when signed."""
    w = [1 << i for i in range(bits)]
    if signed:
        w[-1] = -w[-1]
    return w


def bitserial_matmul(qa: torch.Tensor, qw: torch.Tensor, a_bits: int, w_bits: int, signed: bool = True) -> torch.Tensor:
    """``qa[M, K] @ qw[N, K].T`` computed plane pair by plane pair with AND + popcount (int64)."""
    if qa.dim() != 2 or qw.dim() != 2 or qa.shape[1] != qw.shape[1]:
        raise ValueError(f"expected qa[M, K] and qw[N, K], got {list(qa.shape)} and {list(qw.shape)}")
    pa = to_bitplanes(qa, a_bits, signed)  # [a_bits, M, words]
    pw = to_bitplanes(qw, w_bits, signed)  # [w_bits, N, words]
    ca, cw = plane_weights(a_bits, signed), plane_weights(w_bits, signed)
    acc = torch.zeros(qa.shape[0], qw.shape[0], dtype=torch.int64)
    for i in range(a_bits):
        for j in range(w_bits):
            both = pa[i][:, None, :].to(torch.int64) & pw[j][None, :, :].to(torch.int64)
            acc += ca[i] * cw[j] * popcount32(both).sum(-1)
    return acc
