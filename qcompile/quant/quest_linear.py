"""QuEST codes as a linear layer stores and multiplies them (on top of :mod:`qcompile.quant.quest`).

A ``b``-bit QuEST value is ``x̂ = c·Δ/2`` with the odd code ``c = 2i + 1``, ``i ∈ [−2^(b−1), 2^(b−1) − 1]``.
Weights are **stored** as the unsigned index ``u = i + 2^(b−1) ∈ [0, 2^b − 1]`` (``b`` bits, one per
byte, like qcompile's asymmetric codes) with the half step ``Δ/2`` per output channel or per group:

* :func:`quest_weight_codes` — ``(u, Δ/2)`` of a weight ``[N, K]``: σ is the RMS of each row (or of
  each group of ``group`` consecutive input channels; a shorter last group has its own RMS);
* :func:`odd_from_unsigned` — ``c = 2u − (2^b − 1)``, the odd code the integer GEMM multiplies;
* :func:`as_asymmetric` — the same weights as an asymmetric uniform grid, ``w = u·Δ + (Δ/2 − 2^(b−1)·Δ)``
  (scale ``Δ``, float offset), so weight-only QuEST runs through ``qcompile::quant_linear`` and every
  kernel that stores asymmetric codes.

The product of two odd codes is an exact integer, so ``Σ_k c_x·c_w`` is exact in int32 (4-bit codes
are at most 15 in magnitude) and a QuEST W·A linear is an integer GEMM rescaled by one activation
half step per token and one weight half step per (row, group).
"""

from __future__ import annotations

import torch

from qcompile.quant.quantizer import code_dtype
from qcompile.quant.quest import quest_codes


def quest_weight_codes(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned codes ``u`` (``[N, K]``, int8 below 8 bits, uint8 at 8: as qcompile stores asymmetric
    codes) and half steps ``Δ/2`` (fp32 ``[N, G]``, G = ceil(K / group))
    of weight ``w`` quantized row by row (``group == K``) or per group of input channels."""
    n, k = w.shape
    if group <= 0 or group > k:
        raise ValueError(f"group must be in [1, {k}], got {group}")
    codes, scales = [], []
    for s in range(0, k, group):
        c, hs = quest_codes(w[:, s : s + group].to(torch.float32), bits, dim=-1)
        codes.append(c)
        scales.append(hs)
    odd = torch.cat(codes, dim=1).to(torch.int32)
    u = (odd + (2**bits - 1)) // 2
    return u.to(code_dtype(bits, symmetric=False)), torch.cat(scales, dim=1).to(torch.float32)


def odd_from_unsigned(u: torch.Tensor, bits: int) -> torch.Tensor:
    """The odd codes ``2u − (2^b − 1)`` (int16) of stored unsigned codes."""
    return (2 * u.to(torch.int16) - (2**bits - 1)).to(torch.int16)


def as_asymmetric(half_step: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) of the asymmetric uniform grid equal to the QuEST grid: ``w = u·Δ + offset``."""
    delta = 2.0 * half_step.to(torch.float32)
    return delta, half_step.to(torch.float32) - 2 ** (bits - 1) * delta


def quest_dequantize_weight(u: torch.Tensor, half_step: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """``ŵ = c·Δ/2`` (fp32 ``[N, K]``) of stored codes and their half steps per (row, group of ``group``)."""
    k = u.shape[1]
    hs = half_step.repeat_interleave(group, dim=1)[:, :k]
    return odd_from_unsigned(u, bits).to(torch.float32) * hs


__all__ = ["as_asymmetric", "odd_from_unsigned", "quest_dequantize_weight", "quest_weight_codes"]
