"""Quantized-cache ops (XQuant X / latent caches and the KIVI-style KV baseline).

``qcompile::cache_quantize(x, bits, group_size, symmetric) -> (codes, scale, offset)``: dynamic
per-token quantization of ``x[..., C]`` in groups of ``group_size`` consecutive channels of a
token (``group_size`` must divide C). Scales and offsets are stored in float16 (what a cache
would keep); the codes are computed against the float16-rounded scale, so dequantization is exact
with respect to what is stored.

* symmetric: ``q = clamp(round(x / s), -(2^(b-1)-1), 2^(b-1)-1)`` int8, ``s = absmax / qmax``,
  offset all zeros (not cached);
* asymmetric: ``q = clamp(round((x - m) / s), 0, 2^b - 1)`` uint8, ``s = (max - min) / (2^b - 1)``,
  ``m = min``.

``qcompile::cache_quantize_static(x, scale, offset, bits, symmetric) -> codes``: quantization
with calibrated per-channel scale (and offset) tensors that broadcast against ``x`` (one per
channel, constant over tokens), so every token is quantized on its own.

``qcompile::cache_dequantize(codes, scale, offset, group_size) -> float32``: ``q·s (+ m)``;
``group_size > 0``: ``scale[..., C / group_size]`` per token group; ``group_size == 0``: ``scale``
(and ``offset``) broadcast against the codes (the static per-channel case).
"""

from __future__ import annotations

import torch

from qcompile.quant.spec import levels


def _fp16_scale(s: torch.Tensor) -> torch.Tensor:
    """An all-zero group gets scale 1; a NaN (from a NaN in K/V) stays NaN so that it shows in the
    output instead of silently zeroing the group."""
    s16 = s.to(torch.float16)
    return torch.where(s16 == 0, torch.ones_like(s16), s16)


@torch.library.custom_op("qcompile::cache_quantize", mutates_args=())
def cache_quantize(
    x: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c = x.shape[-1]
    if group_size <= 0 or c % group_size:
        raise ValueError(f"cache_quantize: group_size {group_size} must divide the {c} channels")
    qmin, qmax = levels(bits, symmetric)
    g = c // group_size
    xg = x.to(torch.float32).reshape(*x.shape[:-1], g, group_size)
    if symmetric:
        scale = _fp16_scale(xg.abs().amax(dim=-1) / qmax)
        offset = torch.zeros_like(scale)
        q = torch.clamp(torch.round(xg / scale.to(torch.float32)[..., None]), qmin, qmax).to(torch.int8)
    else:
        lo, hi = xg.amin(dim=-1), xg.amax(dim=-1)
        scale = _fp16_scale((hi - lo) / qmax)
        offset = lo.to(torch.float16)
        q = torch.round((xg - offset.to(torch.float32)[..., None]) / scale.to(torch.float32)[..., None])
        q = torch.clamp(q, qmin, qmax).to(torch.uint8)
    return q.reshape(x.shape), scale, offset


@cache_quantize.register_fake
def _cache_quantize_fake(x: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    g = x.shape[-1] // group_size
    codes = x.new_empty(x.shape, dtype=torch.int8 if symmetric else torch.uint8)
    scale = x.new_empty((*x.shape[:-1], g), dtype=torch.float16)
    return codes, scale, torch.empty_like(scale)


@torch.library.custom_op("qcompile::cache_quantize_static", mutates_args=())
def cache_quantize_static(
    x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int, symmetric: bool
) -> torch.Tensor:
    qmin, qmax = levels(bits, symmetric)
    xf = x.to(torch.float32)
    if offset is not None:
        xf = xf - offset
    q = torch.clamp(torch.round(xf / scale), qmin, qmax)
    return q.to(torch.int8 if symmetric else torch.uint8)


@cache_quantize_static.register_fake
def _cache_quantize_static_fake(x, scale, offset, bits: int, symmetric: bool):
    return x.new_empty(x.shape, dtype=torch.int8 if symmetric else torch.uint8)


@torch.library.custom_op("qcompile::cache_dequantize", mutates_args=())
def cache_dequantize(
    codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    q = codes.to(torch.float32)
    if group_size == 0:
        y = q * scale.to(torch.float32)
        return y + offset.to(torch.float32) if offset is not None else y
    c = codes.shape[-1]
    g = c // group_size
    qg = q.reshape(*codes.shape[:-1], g, group_size)
    y = qg * scale.to(torch.float32)[..., None]
    if offset is not None:
        y = y + offset.to(torch.float32)[..., None]
    return y.reshape(codes.shape)


@cache_dequantize.register_fake
def _cache_dequantize_fake(codes, scale, offset, group_size: int):
    return codes.new_empty(codes.shape, dtype=torch.float32)
