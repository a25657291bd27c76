"""Quantized linear ops.

``qcompile::linear_w8a8(x, qweight, w_scale, bias)``: W8A8 linear with dynamic per-token
symmetric int8 activations and per-output-channel symmetric int8 weights::

    qx, sx = quantize_per_token(x, 8)            # int8 [..., K], fp32 [..., 1]
    acc    = qx @ qweight.T                      # exact int32 accumulation
    y      = acc * sx * w_scale (+ bias)         # fp32 rescale, cast to x.dtype

The reference kernel does the integer arithmetic exactly (int32 matmul); a compiled backend
must match it bit for bit in ``acc``.
"""

from __future__ import annotations

from typing import Optional

import torch

from qcompile.quant.rtn import quantize_per_token

# int32 accumulation of int8 x int8 products is exact while K * 127 * 127 < 2**31.
MAX_K_INT32 = (2**31 - 1) // (127 * 127)


def int8_matmul_int32(qx: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """Exact ``qx[M, K] @ qweight[N, K].T`` in int32 (the oracle integer GEMM)."""
    if qx.dtype != torch.int8 or qweight.dtype != torch.int8:
        raise TypeError(f"int8 operands expected, got {qx.dtype} and {qweight.dtype}")
    if qx.shape[-1] > MAX_K_INT32:
        raise ValueError(f"K={qx.shape[-1]} could overflow int32 accumulation (max {MAX_K_INT32})")
    return torch.matmul(qx.to(torch.int32), qweight.to(torch.int32).t())


@torch.library.custom_op("qcompile::linear_w8a8", mutates_args=())
def linear_w8a8(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if x.shape[-1] != qweight.shape[1]:
        raise ValueError(f"linear_w8a8: x has {x.shape[-1]} input features, weight expects {qweight.shape[1]}")
    qx, sx = quantize_per_token(x, 8)
    acc = int8_matmul_int32(qx.reshape(-1, qx.shape[-1]), qweight)
    y = acc.to(torch.float32) * sx.reshape(-1, 1) * w_scale.to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.reshape(*x.shape[:-1], qweight.shape[0]).to(x.dtype)


@linear_w8a8.register_fake
def _linear_w8a8_fake(x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    torch._check(x.shape[-1] == qweight.shape[1])
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))
