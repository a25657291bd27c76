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


# ---- grouped weights (any bit-width, symmetric or asymmetric) -------------------------------


def num_groups(k: int, group_size: int) -> int:
    """Groups along K of ``group_size`` (the last one shorter when it does not divide K)."""
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    return -(-k // group_size)


def _pad_k(t: torch.Tensor, group_size: int) -> torch.Tensor:
    k = t.shape[-1]
    pad = num_groups(k, group_size) * group_size - k
    return torch.nn.functional.pad(t, (0, pad)) if pad else t


def quantize_weight_groups(
    weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``weight[N, K]`` → (codes int8 ``[N, K]``, scale f32 ``[N, G]``, offset f32 ``[N, G]`` or None).

    Groups are ``group_size`` consecutive input channels of a row (a shorter last group when
    ``group_size`` does not divide K). Symmetric: ``w ≈ q·s`` with q in ``[-(2^(b-1)-1), 2^(b-1)-1]``.
    Asymmetric (min/max, float offset, as GGUF Q4_1): ``w ≈ q·s + m`` with q in ``[0, 2^b - 1]``,
    ``s = (max - min) / (2^b - 1)``, ``m = min``.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    g = num_groups(k, group_size)
    w = weight.detach().to(torch.float32)
    wp = _pad_k(w, group_size).view(n, g, group_size)
    valid = _pad_k(torch.ones(1, k), group_size).view(1, g, group_size).bool()
    if symmetric:
        _, qmax = qrange(bits)
        absmax = wp.abs().amax(dim=-1)
        scale = _scale(absmax, qmax)
        q = torch.clamp(torch.round(wp / scale[..., None]), -qmax, qmax)
        offset = None
    else:
        if bits < 2 or bits > 8:
            raise ValueError(f"bits must be in [2, 8], got {bits}")
        levels = 2**bits - 1
        lo = torch.where(valid, wp, torch.full_like(wp, float("inf"))).amin(dim=-1)
        hi = torch.where(valid, wp, torch.full_like(wp, float("-inf"))).amax(dim=-1)
        scale = _scale(hi - lo, levels)
        q = torch.clamp(torch.round((wp - lo[..., None]) / scale[..., None]), 0, levels)
        offset = lo
    codes = q.reshape(n, g * group_size)[:, :k].to(torch.int8 if symmetric or bits < 8 else torch.uint8)
    return codes, scale, offset


def dequantize_weight_groups(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """The float32 weight ``q·s (+ m)`` that :func:`quantize_weight_groups` encodes."""
    n, k = codes.shape
    s = scale.repeat_interleave(group_size, dim=1)[:, :k]
    w = codes.to(torch.float32) * s
    if offset is not None:
        w = w + offset.repeat_interleave(group_size, dim=1)[:, :k]
    return w


def quantize_activation_groups(x: torch.Tensor, bits: int, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric quantization of ``x[M, K]`` per token (``group_size=None``) or per
    token-group → (codes int8 ``[M, G, gs]`` zero-padded, scales f32 ``[M, G]``)."""
    m, k = x.shape
    gs = k if group_size is None else group_size
    g = num_groups(k, gs)
    _, qmax = qrange(bits)
    xp = _pad_k(x.to(torch.float32), gs).view(m, g, gs)
    scale = _scale(xp.abs().amax(dim=-1), qmax)
    q = torch.clamp(torch.round(xp / scale[..., None]), -qmax, qmax).to(torch.int8)
    return q, scale
