"""QuEST linear op: QuEST weights times QuEST-quantized activations, as an exact integer GEMM.

``qcompile::quest_linear(x, codes, scale, bias, group_size, w_bits, act_bits)``:

* weights: unsigned ``w_bits``-bit codes ``u[N, K]`` (uint8) with one half step ``Δ/2`` per output
  channel (``group_size == K``) or per group of ``group_size`` input channels (``scale[N, G]``); the
  weight is ``c_w·Δ/2`` with the odd code ``c_w = 2u − (2^b − 1)`` (:mod:`qcompile.quant.quest_linear`);
* activations: ``act_bits == 0`` keeps them in float (``y = x @ ŵᵀ``); otherwise every token is
  quantized at run time with :func:`qcompile.quant.quest.quest_codes` (σ = the token's RMS, clip at
  ``α_b·σ``, odd codes ``c_x``, half step ``h_x``), and for every weight group the product
  ``Σ c_x·c_w`` is an exact integer (int32 in a kernel), rescaled by ``h_x·Δ/2`` in fp32 and summed
  over groups in fp32; ``+ bias``; cast back to ``x``'s dtype.
"""

from __future__ import annotations

import torch

from qcompile.ops.linear import exact_block_products
from qcompile.quant.quest import quest_codes
from qcompile.quant.quest_linear import odd_from_unsigned, quest_dequantize_weight


@torch.library.custom_op("qcompile::quest_linear", mutates_args=())
def quest_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    w_bits: int,
    act_bits: int,
) -> torch.Tensor:
    n, k = codes.shape
    if x.shape[-1] != k:
        raise ValueError(f"quest_linear: x has {x.shape[-1]} input features, weight expects {k}")
    x2 = x.reshape(-1, k).to(torch.float32)
    if act_bits == 0:
        y = x2 @ quest_dequantize_weight(codes, scale, w_bits, group_size).t()
    else:
        g = scale.shape[1]
        if -(-k // group_size) != g:
            raise ValueError(f"quest_linear: {g} weight scales per row do not match K={k} in groups of {group_size}")
        cx, hx = quest_codes(x2, act_bits, dim=-1)  # [M, K] odd int16, [M, 1]
        pad = g * group_size - k
        qx = torch.nn.functional.pad(cx, (0, pad)).view(-1, g, group_size)
        qw = torch.nn.functional.pad(odd_from_unsigned(codes, w_bits), (0, pad)).view(n, g, group_size)
        acc = exact_block_products(qx, qw)  # [M, N, g], exact
        y = (acc.to(torch.float32) * hx[:, :, None] * scale.to(torch.float32)[None, :, :]).sum(-1)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


@quest_linear.register_fake
def _quest_linear_fake(x, codes, scale, bias, group_size, w_bits, act_bits):  # type: ignore[no-untyped-def]
    torch._check(x.shape[-1] == codes.shape[1])
    return x.new_empty((*x.shape[:-1], codes.shape[0]))
