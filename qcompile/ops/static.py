"""Static (calibrated) activation quantization ops, used by MergeQuant step folding.

``qcompile::quantize_static(x, step, bits)``: ``clamp(round(x / step), ±(2^(b-1)-1))`` as int8,
``step`` per input channel ``[K]`` (or a scalar ``[1]``).

``qcompile::dequantize_static(q, step)``: ``q · step`` in fp32.

``qcompile::linear_static(x, codes, scale, bias, group_size, act_bits)``: the folded form. ``x``
is already expressed in units of its quantization step (the producer absorbed ``1/step``), so
the op only rounds it to integers (``clamp(round(x))``), multiplies by the symmetric integer
weight codes with exact int32 accumulation per block of ``group_size`` along K (``group_size ==
K``: per output channel), and rescales by the weight scales alone: no activation scale exists at
run time::

    y[m, n] = Σ_g scale[n, g] · Σ_{k ∈ g} round(x[m, k]) · codes[n, k]   (+ bias)
"""

from __future__ import annotations

import torch

from qcompile.ops.linear import exact_block_products
from qcompile.quant.quantizer import num_groups
from qcompile.quant.spec import levels


def _qmax(bits: int) -> int:
    return levels(bits, True)[1]


@torch.library.custom_op("qcompile::quantize_static", mutates_args=())
def quantize_static(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    q = _qmax(bits)
    return torch.clamp(torch.round(x.to(torch.float32) / step), -q, q).to(torch.int8)


@quantize_static.register_fake
def _quantize_static_fake(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.empty_like(x, dtype=torch.int8)


@torch.library.custom_op("qcompile::dequantize_static", mutates_args=())
def dequantize_static(q: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * step


@dequantize_static.register_fake
def _dequantize_static_fake(q: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q, dtype=torch.float32)


@torch.library.custom_op("qcompile::linear_static", mutates_args=())
def linear_static(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    act_bits: int,
) -> torch.Tensor:
    n, k = codes.shape
    if x.shape[-1] != k:
        raise ValueError(f"linear_static: x has {x.shape[-1]} input features, weight expects {k}")
    q = _qmax(act_bits)
    g = num_groups(k, group_size)
    pad = g * group_size - k
    qx = torch.clamp(torch.round(x.reshape(-1, k).to(torch.float32)), -q, q).to(torch.int16)
    qx = torch.nn.functional.pad(qx, (0, pad)).view(-1, g, group_size)
    wq = torch.nn.functional.pad(codes.to(torch.int16), (0, pad)).view(n, g, group_size)
    acc = exact_block_products(qx, wq)  # [M, N, g], exact integers
    y = (acc.to(torch.float32) * scale.reshape(n, g)[None]).sum(-1)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


@linear_static.register_fake
def _linear_static_fake(x, codes, scale, bias, group_size, act_bits):  # type: ignore[no-untyped-def]
    torch._check(x.shape[-1] == codes.shape[1])
    return x.new_empty((*x.shape[:-1], codes.shape[0]))
