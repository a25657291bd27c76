"""Round-to-nearest symmetric quantizers: per output channel (weights) and per token (activations).

Symmetric grids are ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (the most negative code is unused so the grid
is symmetric around zero), with scale ``s = absmax / qmax``; rounding is ``torch.round``
(half to even). An all-zero row gets scale 1 (all codes 0), never a division by zero.
"""

from __future__ import annotations

import torch


def qrange(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of the symmetric signed grid with ``bits`` bits."""
    if bits < 2 or bits > 8:
        raise ValueError(f"bits must be in [2, 8], got {bits}")
    qmax = 2 ** (bits - 1) - 1
    return -qmax, qmax


def _scale(absmax: torch.Tensor, qmax: int) -> torch.Tensor:
    scale = absmax / qmax
    return torch.where(absmax > 0, scale, torch.ones_like(scale))


def quantize_weight_per_channel(weight: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight[N, K]`` → (int8 codes ``[N, K]``, float32 scales ``[N]``); ``w ≈ q * s[:, None]``."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    qmin, qmax = qrange(bits)
    w = weight.detach().to(torch.float32)
    scale = _scale(w.abs().amax(dim=1), qmax)
    q = torch.clamp(torch.round(w / scale[:, None]), qmin, qmax).to(torch.int8)
    return q, scale


def quantize_per_token(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``x[..., K]`` → (int8 codes ``[..., K]``, float32 scales ``[..., 1]``), one scale per row."""
    qmin, qmax = qrange(bits)
    xf = x.to(torch.float32)
    scale = _scale(xf.abs().amax(dim=-1, keepdim=True), qmax)
    q = torch.clamp(torch.round(xf / scale), qmin, qmax).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` in float32 (scale broadcast as given)."""
    return q.to(torch.float32) * scale
