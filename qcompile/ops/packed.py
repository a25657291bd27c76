"""Linear ops over densely packed low-bit weights (FlexQ's W6A6 / W6A8, 2- and 3-bit weights).

``qcompile::packed_linear(x, packed, scale, bias, in_features, w_bits, group_size, act_bits, act_group,
offset=None)``:

* weights: ``w_bits``-bit codes densely packed along K by :func:`qcompile.quant.packing.pack` —
  6-bit codes take 3 bytes per 4 codes, 3-bit codes 3 bytes per 8, 2-bit codes 1 byte per 4 — with
  one fp32 scale per (output channel, group of ``group_size`` input channels); the last group may be
  shorter when ``group_size`` does not divide K (SmolLM2's K = 576 = 4·128 + 64);
* signedness follows ``offset``: without one the codes are symmetric, stored in two's complement
  and ``w = code·scale``; with a float ``offset[N, G]`` they are unsigned ``[0, 2^b − 1]`` and
  ``w = code·scale + offset`` (asymmetric RTN, GPTQ and decoupleQ codes);
* activations: dynamic symmetric ``act_bits``-bit codes (6 or 8) per token (``act_group == 0``)
  or per token-group of ``act_group`` input channels (FlexQ: 128, equal to the weight group);
  ``act_bits == 0`` is weight-only (fp32 activations);
* arithmetic: for every group of K the product ``Σ qx·qw`` is an exact integer (int32 in a
  kernel), rescaled by ``sx·sw`` in fp32 and summed over groups in fp32.

The reference kernel has two forms that must agree bit for bit:

* the direct integer GEMM (:func:`packed_linear`, the op itself: unpack, then the same exact
  per-group integer products as ``qcompile::quant_linear``);
* the bit-serial form (:func:`packed_linear_bitserial`): each group's integer product is
  ``Σ_i Σ_j 2^(i+j)·popcount(a_i AND w_j)`` over the activation and weight bit planes, the sign
  plane weighted negatively (36 plane pairs for W6A6, 48 for W6A8) — what binary tensor-core
  kernels (``mma ... b1 ... and.popc``) compute.
"""

from __future__ import annotations

import torch

from qcompile.quant.packing import pack, packed_size, unpack


def unpack_codes(packed: torch.Tensor, k: int, bits: int, signed: bool = True) -> torch.Tensor:
    """``bits``-bit codes ``int8[N, k]`` from :func:`pack`'s bytes (signed: two's complement;
    unsigned: ``[0, 2^b − 1]``); signed 6-bit rows take a fast path."""
    if bits != 6 or not signed:
        return unpack(packed, k, bits, signed=signed)
    if packed.dtype != torch.uint8 or packed.shape[-1] != packed_size(k, 6):
        raise ValueError(
            f"{k} codes of 6 bits need uint8 rows of {packed_size(k, 6)} bytes, got {packed.dtype}{list(packed.shape)}"
        )
    n = packed.shape[0]
    words = -(-packed.shape[-1] // 3)  # 3 bytes = 4 codes; pad the row to whole words
    b = torch.nn.functional.pad(packed, (0, words * 3 - packed.shape[-1])).to(torch.int32).view(n, words, 3)
    w = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)  # little-endian 24-bit word
    shifts = torch.tensor([0, 6, 12, 18], dtype=torch.int32)
    u = (w.unsqueeze(-1) >> shifts) & 63  # [n, words, 4]
    codes = torch.where(u >= 32, u - 64, u).reshape(n, words * 4)[:, :k]
    return codes.to(torch.int8)


def pack_codes(codes: torch.Tensor, bits: int, signed: bool = True) -> torch.Tensor:
    """Dense packing of codes ``[N, K]`` (the storage :func:`packed_linear` reads: signed without an
    offset, unsigned with one)."""
    return pack(codes, bits, signed=signed)


@torch.library.custom_op("qcompile::packed_linear", mutates_args=())
def packed_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    w_bits: int,
    group_size: int,
    act_bits: int,
    act_group: int,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    codes = unpack_codes(packed, in_features, w_bits, signed=offset is None)
    return torch.ops.qcompile.quant_linear.default(x, codes, scale, offset, bias, group_size, act_bits, act_group)


@packed_linear.register_fake
def _packed_linear_fake(x, packed, scale, bias, in_features, w_bits, group_size, act_bits, act_group, offset=None):  # type: ignore[no-untyped-def]
    torch._check(x.shape[-1] == in_features)
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def packed_linear_bitserial(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    w_bits: int,
    group_size: int,
    act_bits: int,
    act_group: int,
) -> torch.Tensor:
    """:func:`packed_linear` with each group's integer product computed bit-serially.

    Same activation quantization and fp32 rescale as the op, so the result must be identical.
    """
    from qcompile.quant.bitserial import bitserial_matmul
    from qcompile.quant.quantizer import activation_blocks

    if act_bits == 0:
        raise ValueError("the bit-serial form needs quantized activations (act_bits > 0)")
    k = in_features
    codes = unpack_codes(packed, k, w_bits)
    n = codes.shape[0]
    x2 = x.reshape(-1, k).to(torch.float32)
    block = act_group if act_group else group_size
    qx, sx = activation_blocks(x2, act_bits, act_group, block)
    g = qx.shape[1]
    wq = torch.nn.functional.pad(codes, (0, g * block - k)).view(n, g, block)
    # [g, M, N] viewed as [M, N, g]: the layout of the direct form's batched product, so that the
    # fp32 rescale-and-sum below reduces in the same order and the results are bit-identical
    acc = torch.stack([bitserial_matmul(qx[:, i], wq[:, i], act_bits, w_bits) for i in range(g)], dim=0).permute(
        1, 2, 0
    )
    ws = scale if scale.shape[1] == g else scale.expand(n, g)
    y = (acc.to(torch.int32).to(torch.float32) * sx[:, None, :] * ws[None, :, :]).sum(-1)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.reshape(*x.shape[:-1], n).to(x.dtype)
