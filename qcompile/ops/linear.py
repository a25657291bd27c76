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

import torch

from qcompile.quant.quantizer import quantize_per_token

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
def linear_w8a8(
    x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    if x.shape[-1] != qweight.shape[1]:
        raise ValueError(f"linear_w8a8: x has {x.shape[-1]} input features, weight expects {qweight.shape[1]}")
    qx, sx = quantize_per_token(x, 8)
    acc = int8_matmul_int32(qx.reshape(-1, qx.shape[-1]), qweight)
    y = acc.to(torch.float32) * sx.reshape(-1, 1) * w_scale.to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.reshape(*x.shape[:-1], qweight.shape[0]).to(x.dtype)


@linear_w8a8.register_fake
def _linear_w8a8_fake(
    x: torch.Tensor, qweight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    torch._check(x.shape[-1] == qweight.shape[1])
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def exact_block_products(qx: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """``acc[m, n, g] = Σ_b qx[m, g, b]·qw[n, g, b]`` exactly, for integer codes.

    Computed as a batched float GEMM, which is exact whatever the summation order as long as every
    partial sum is an integer below the float's 2^mantissa: float32 when
    ``max|qx|·max|qw|·block < 2^24`` (e.g. 6-bit codes in groups of 128), float64 otherwise
    (exact below 2^53). This is the int32 accumulation a kernel does, at BLAS speed. Returned as int32.
    """
    bound = int(qx.abs().max()) * int(qw.abs().max()) * qx.shape[-1] if qx.numel() and qw.numel() else 0
    if bound >= 2**53:
        raise ValueError(f"integer products could reach {bound}, beyond exact float64 accumulation")
    dt = torch.float32 if bound < 2**24 else torch.float64
    a = qx.to(dt).permute(1, 0, 2)  # [g, M, b]
    b = qw.to(dt).permute(1, 2, 0)  # [g, b, N]
    return torch.bmm(a, b).permute(1, 2, 0).round().to(torch.int32)


@torch.library.custom_op("qcompile::quant_linear", mutates_args=())
def quant_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
    act_bits: int,
    act_group: int,
) -> torch.Tensor:
    """Grouped-weight linear; optional dynamic symmetric activation quantization.

    Weights: ``w[n, k] = codes[n, k]·scale[n, g(k)] (+ offset[n, g(k)])``, g(k) = k // group_size.
    ``act_bits == 0``: weight-only — ``y = x @ w.T`` in fp32 (W4A16-style).
    ``act_bits > 0``: x is quantized per token (``act_group == 0``) or per token-group of
    ``act_group`` (which must then equal ``group_size``); for every block of K the int32 product
    ``Σ qx·codes`` is exact, rescaled by ``sx·scale`` and summed in fp32; an asymmetric offset adds
    ``sx·offset·Σ qx`` (also exact in int32) per block.
    """
    from qcompile.quant.quantizer import activation_blocks, dequantize_weight_groups

    n, k = codes.shape
    if x.shape[-1] != k:
        raise ValueError(f"quant_linear: x has {x.shape[-1]} input features, weight expects {k}")
    x2 = x.reshape(-1, k).to(torch.float32)
    if act_bits == 0:
        y = x2 @ dequantize_weight_groups(codes, scale, offset, group_size).t()
    else:
        if act_group not in (0, group_size) and group_size != k:
            raise ValueError(
                f"quant_linear: activation group {act_group} must be 0 (per token) or equal the weight group "
                f"{group_size}"
            )
        block = act_group if act_group else group_size
        qx, sx = activation_blocks(x2, act_bits, act_group, block)  # [M, g, block], [M, g]
        g = qx.shape[1]
        wq = torch.nn.functional.pad(codes.to(torch.int16), (0, g * block - k)).view(n, g, block)
        ws = scale if scale.shape[1] == g else scale.expand(n, g)  # per-channel weight scale
        acc = exact_block_products(qx, wq)  # [M, N, g] integer-valued, exact
        y = (acc.to(torch.float32) * sx[:, None, :] * ws[None, :, :]).sum(-1)
        if offset is not None:
            wo = offset if offset.shape[1] == g else offset.expand(n, g)
            qsum = qx.to(torch.int32).sum(-1)  # [M, g]
            y = y + (qsum.to(torch.float32) * sx)[:, None, :].mul(wo[None, :, :]).sum(-1)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


@quant_linear.register_fake
def _quant_linear_fake(x, codes, scale, offset, bias, group_size, act_bits, act_group):  # type: ignore[no-untyped-def]
    torch._check(x.shape[-1] == codes.shape[1])
    return x.new_empty((*x.shape[:-1], codes.shape[0]))
