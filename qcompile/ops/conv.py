"""``qcompile::quant_conv2d``: a 2-D convolution (dense, grouped or depthwise) with quantized weights.

``quant_conv2d(x, codes, w_scale, x_scale, bias, stride, padding, dilation, groups, act_bits)``

Weights: symmetric integer codes ``codes[O, C/groups, kh, kw]`` (stored one per int8, any width of
:data:`qcompile.quant.spec.BITS`; the Program records it) with one fp32 scale per output channel,
``w[o] = codes[o] · w_scale[o]``. ``bias`` (fp32 ``[O]``) is optional. Activations, by the arguments:

* ``act_bits == 0`` (``x_scale`` None): weight only (W8A16 / W4A16 style): ``conv(x, w)`` in fp32.
* ``act_bits > 0`` with ``x_scale`` (fp32 ``[1]``, calibrated): **static per-tensor symmetric**
  activations, ``q_x = clamp(round_half_even(x / x_scale), ±(2^(b-1)-1))``. The convolution of the
  integer codes is done exactly (what an int8 kernel with int32 accumulation computes)::

      acc[n, o, i, j] = Σ q_x · codes                   (zero padding is code 0: x = 0 is exact)
      y = acc · x_scale · w_scale[o]  (+ bias[o])       (fp32, in that order)

  Symmetric on purpose: post-ReLU inputs use half of the grid (7 bits of magnitude), but the
  zero padding stays code 0, the integer convolution needs no zero-point correction term and the
  first layer (signed, normalized pixels) uses the same scheme. A non-finite value in a sample of
  ``x`` makes that sample's whole output NaN (codes cannot hold NaN; the conv never turns it into a
  number).
* ``act_bits > 0`` without ``x_scale``: **dynamic per token-pixel**: one symmetric scale per input
  pixel ``(n, :, h, w)`` over all its channels, computed at run time. A convolution sums over a
  window of pixels that have different scales, so the scales do not factor out of the sum: this is
  simulated quantization (``x`` rounded to its per-pixel grid and dequantized, then ``conv`` with the
  dequantized weights in fp32), not an integer kernel. It measures what per-pixel activation
  quantization costs in accuracy; an integer kernel would need one rescale per pixel in the window.
  As with static activations, a non-finite value makes its sample's whole output NaN.

The exact integer convolution is a float convolution of integer values: float32 while every partial
sum is below 2^24 (``max|q_x| · max|codes| · C/groups · kh · kw``), float64 otherwise (exact below
2^53). Either way the result is returned as the int32 accumulator (:func:`conv_int_accumulate`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qcompile.quant.quantizer import quantize_per_token
from qcompile.quant.spec import levels


def conv_int_accumulate(
    qx: torch.Tensor, codes: torch.Tensor, stride: list[int], padding: list[int], dilation: list[int], groups: int
) -> torch.Tensor:
    """The exact int32 accumulator ``conv2d(qx, codes)`` of integer-valued tensors (any integer or
    float dtype holding integers)."""
    fan_in = codes.shape[1] * codes.shape[2] * codes.shape[3]
    amax_x = int(qx.abs().max()) if qx.numel() else 0
    amax_w = int(codes.abs().max()) if codes.numel() else 0
    bound = amax_x * amax_w * fan_in
    if bound >= 2**53:
        raise ValueError(f"integer products could reach {bound}, beyond exact float64 accumulation")
    if bound >= 2**31:
        raise ValueError(f"the int32 accumulator could overflow: |sum| up to {bound}")
    dt = torch.float32 if bound < 2**24 else torch.float64
    acc = F.conv2d(qx.to(dt), codes.to(dt), None, stride, padding, dilation, groups)
    return acc.round().to(torch.int32)


def quantize_static_tensor(x: torch.Tensor, x_scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``clamp(round_half_even(x / x_scale), ±qmax)`` as int8 (NaN maps to code 0: callers make
    the output of a non-finite input NaN themselves)."""
    _, qmax = levels(bits, True)
    xf = x.to(torch.float32) / x_scale.to(torch.float32).reshape(())
    return torch.clamp(torch.nan_to_num(torch.round(xf), nan=0.0), -qmax, qmax).to(torch.int8)


def fake_quant_per_pixel(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x[N, C, H, W]`` rounded to a symmetric grid with one scale per pixel (over C), dequantized.
    An all-zero pixel keeps scale 1; a non-finite pixel gives NaN."""
    codes, scale = quantize_per_token(x.movedim(1, -1), bits)  # a pixel's channels are its "token"
    return (codes.to(torch.float32) * scale).movedim(-1, 1)


def _nonfinite_samples(x: torch.Tensor) -> torch.Tensor:
    """[N, 1, 1, 1]: NaN for a sample holding a NaN or ±Inf, else 0 (``Σ x·0`` over the sample)."""
    return (x.to(torch.float32) * 0).sum(dim=(1, 2, 3), keepdim=True)


@torch.library.custom_op("qcompile::quant_conv2d", mutates_args=())
def quant_conv2d(
    x: torch.Tensor,
    codes: torch.Tensor,
    w_scale: torch.Tensor,
    x_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    act_bits: int,
) -> torch.Tensor:
    o, cg = codes.shape[0], codes.shape[1]
    if x.dim() != 4 or codes.dim() != 4 or x.shape[1] != cg * groups or o % groups:
        raise ValueError(
            f"quant_conv2d: x{list(x.shape)} and codes{list(codes.shape)} do not make a conv with groups={groups}"
        )
    if w_scale.shape != (o,) or (bias is not None and bias.shape != (o,)):
        raise ValueError(f"quant_conv2d: w_scale {list(w_scale.shape)} / bias must be [{o}]")
    if act_bits == 0 and x_scale is not None:
        raise ValueError("quant_conv2d: x_scale given without act_bits")
    ws = w_scale.to(torch.float32)
    if act_bits and x_scale is not None:
        if x_scale.numel() != 1:
            raise ValueError(f"quant_conv2d: x_scale must hold one value, got {list(x_scale.shape)}")
        qx = quantize_static_tensor(x, x_scale, act_bits)
        acc = conv_int_accumulate(qx, codes, stride, padding, dilation, groups)
        y = acc.to(torch.float32) * x_scale.to(torch.float32).reshape(()) * ws.view(1, o, 1, 1)
        y = y + _nonfinite_samples(x)
    else:
        xin = fake_quant_per_pixel(x, act_bits) + _nonfinite_samples(x) if act_bits else x.to(torch.float32)
        w = codes.to(torch.float32) * ws.view(o, 1, 1, 1)
        y = F.conv2d(xin, w, None, stride, padding, dilation, groups)
    if bias is not None:
        y = y + bias.to(torch.float32).view(1, o, 1, 1)
    return y.to(x.dtype)


@quant_conv2d.register_fake
def _quant_conv2d_fake(x, codes, w_scale, x_scale, bias, stride, padding, dilation, groups, act_bits):  # type: ignore[no-untyped-def]
    n, _, h, w = x.shape
    kh, kw = codes.shape[2], codes.shape[3]
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return x.new_empty((n, codes.shape[0], ho, wo))
