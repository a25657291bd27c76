"""General uniform quantizers: any granularity, symmetric or asymmetric, static or dynamic, with clipping.

A tensor ``x`` is split into *blocks* that share one scale:

* ``per_tensor``: one block;
* ``per_channel``: one block per row of a weight ``[N, K]`` (output channel), or, for an
  activation ``[..., K]``, one block per input channel (column): the *static* per-channel step of
  MergeQuant/SmoothQuant calibration;
* ``per_token``: one block per row of an activation ``[..., K]`` (dynamic);
* ``per_group``: ``group_size`` consecutive elements along the last axis of each row. The group
  size must divide the axis unless ``partial_last_group`` is set.

Symmetric: ``q ∈ [-(2^(b-1)-1), 2^(b-1)-1]``, ``x ≈ q·s``, ``s = clip·absmax / qmax``.
Asymmetric (float offset, as GGUF Q4_1): ``q ∈ [0, 2^b-1]``, ``x ≈ q·s + m``,
``s = clip·(max-min) / (2^b-1)``, ``m = clip·min`` (the range shrinks toward zero).
A block of zeros gets scale 1 (codes 0). Rounding is ``torch.round`` (half to even).

*Static* quantization takes the scale from calibration (``scale=`` argument); *dynamic*
quantization computes it from ``x`` itself. :func:`search_clip` picks a clip ratio by grid search
on the output error of a linear layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from qcompile.errors import PlanError
from qcompile.plan import Granularity

BITS = (2, 3, 4, 6, 8)


@dataclass(frozen=True)
class Quantized:
    """Integer codes (int16 so every width and sign convention fits) and the block parameters,
    broadcastable against ``x`` after :func:`blocks_view`."""

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    bits: int
    symmetric: bool
    group_size: int | None = None

    def dequantize(self) -> torch.Tensor:
        return dequantize(self)


def levels(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of the grid."""
    if bits not in BITS:
        raise PlanError(f"bits={bits} is not supported; allowed: {list(BITS)}")
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def _grouped(x: torch.Tensor, group_size: int, partial_last_group: bool) -> torch.Tensor:
    """``x[..., K]`` → ``[..., G, group_size]`` (zero-padded tail when allowed)."""
    k = x.shape[-1]
    if group_size <= 0:
        raise PlanError(f"group_size must be positive, got {group_size}")
    if k % group_size:
        if not partial_last_group:
            divisors = [d for d in range(1, k + 1) if k % d == 0][-4:]
            raise PlanError(f"group_size {group_size} does not divide the {k} channels; divisors include {divisors}")
        x = torch.nn.functional.pad(x, (0, group_size - k % group_size))
    return x.reshape(*x.shape[:-1], -1, group_size)


def blocks_view(x: torch.Tensor, granularity: Granularity, group_size: int | None = None, partial_last_group: bool = False) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``x`` reshaped so that reducing over the returned dims gives one value per block."""
    if granularity is Granularity.PER_TENSOR:
        return x, tuple(range(x.dim()))
    if granularity is Granularity.PER_TOKEN:
        return x, (x.dim() - 1,)
    if granularity is Granularity.PER_CHANNEL:
        # weights [N, K]: one block per row; activations [..., K] use per_channel_activation()
        return x, tuple(range(1, x.dim()))
    if group_size is None:
        raise PlanError("per_group quantization needs a group_size")
    g = _grouped(x, group_size, partial_last_group)
    return g, (g.dim() - 1,)


def params_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, clip: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and offset) of the grid covering ``[lo, hi]`` shrunk by ``clip``."""
    qmin, qmax = levels(bits, symmetric)
    if symmetric:
        absmax = torch.maximum(lo.abs(), hi.abs()) * clip
        scale = absmax / qmax
        return torch.where(absmax > 0, scale, torch.ones_like(scale)), None
    lo_c, hi_c = lo * clip, hi * clip
    scale = (hi_c - lo_c) / (qmax - qmin)
    return torch.where(scale > 0, scale, torch.ones_like(scale)), lo_c


def quantize(
    x: torch.Tensor,
    bits: int,
    granularity: Granularity,
    *,
    symmetric: bool = True,
    group_size: int | None = None,
    partial_last_group: bool = False,
    clip: float | torch.Tensor = 1.0,
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
) -> Quantized:
    """Quantize ``x``; dynamic (range from ``x``) unless a static ``scale`` (and ``offset``) is given.

    Codes have the blocked shape (``[..., G, group_size]`` for per_group), scales keep the reduced
    dims (size 1) so ``codes * scale (+ offset)`` broadcasts.
    """
    xb, dims = blocks_view(x.to(torch.float32), granularity, group_size, partial_last_group)
    if scale is None:
        lo, hi = xb.amin(dim=dims, keepdim=True), xb.amax(dim=dims, keepdim=True)
        scale, offset = params_from_range(lo, hi, bits, symmetric, clip)
    elif not symmetric and offset is None:
        raise ValueError("static asymmetric quantization needs an offset")
    qmin, qmax = levels(bits, symmetric)
    shifted = xb if offset is None else xb - offset
    codes = torch.clamp(torch.round(shifted / scale), qmin, qmax).to(torch.int16)
    return Quantized(codes, scale, offset, bits, symmetric, group_size if granularity is Granularity.PER_GROUP else None)


def dequantize(q: Quantized) -> torch.Tensor:
    x = q.codes.to(torch.float32) * q.scale
    return x if q.offset is None else x + q.offset


def fake_quantize(x: torch.Tensor, bits: int, granularity: Granularity, **kw: object) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s shape and dtype."""
    q = quantize(x, bits, granularity, **kw)  # type: ignore[arg-type]
    y = dequantize(q)
    if granularity is Granularity.PER_GROUP:
        y = y.reshape(*x.shape[:-1], -1)[..., : x.shape[-1]]
    return y.to(x.dtype)


def per_channel_activation(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Static symmetric per-input-channel codes ``clamp(round(x / step))`` of ``x[..., K]`` (``step[K]``)."""
    qmin, qmax = levels(bits, True)
    return torch.clamp(torch.round(x.to(torch.float32) / step), qmin, qmax)


def steps_from_absmax(absmax: torch.Tensor, bits: int, clip: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Symmetric steps ``clip·absmax / qmax`` (1 where the channel was always zero)."""
    scale, _ = params_from_range(-absmax, absmax, bits, True, clip)
    return scale


DEFAULT_CLIP_GRID: tuple[float, ...] = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.00 ... 0.50


def search_clip(
    weight: torch.Tensor,
    x: torch.Tensor,
    bits: int,
    group_size: int | None,
    *,
    symmetric: bool = True,
    partial_last_group: bool = True,
    grid: Sequence[float] = DEFAULT_CLIP_GRID,
) -> torch.Tensor:
    """Per (row, group) clip ratio minimizing ``‖x_g (w_g − ŵ_g)ᵀ‖²`` over ``grid``.

    ``weight[N, K]``, ``x[T, K]`` calibration inputs. Returns ratios ``[N, G, 1]`` to pass as
    ``clip=`` to :func:`quantize` with ``per_group`` (``group_size=None``: one group = the row).
    The error is measured group by group (the cross-group terms are ignored), as AWQ does.
    """
    gs = group_size or weight.shape[1]
    w = _grouped(weight.to(torch.float32), gs, partial_last_group)  # [N, G, gs]
    xg = _grouped(x.to(torch.float32), gs, partial_last_group).permute(1, 0, 2)  # [G, T, gs]
    best_err = torch.full(w.shape[:2], float("inf"))
    best = torch.ones(w.shape[:2])
    lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    for r in grid:
        scale, offset = params_from_range(lo, hi, bits, symmetric, r)
        qmin, qmax = levels(bits, symmetric)
        shifted = w if offset is None else w - offset
        deq = torch.clamp(torch.round(shifted / scale), qmin, qmax) * scale
        if offset is not None:
            deq = deq + offset
        diff = (w - deq).permute(1, 2, 0)  # [G, gs, N]
        err = torch.bmm(xg, diff).pow(2).sum(dim=1).t()  # [N, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best[..., None]
