"""Quantization numerics: the grid and specs (``spec``), quantizers (``quantizer``), GPTQ, packing,
observers and bit-serial products, each checked against an oracle."""

from qcompile.quant.quantizer import quantize_per_token, quantize_weight_groups, quantize_weight_per_channel
from qcompile.quant.spec import BITS, Granularity, QuantSpec, levels

__all__ = [
    "BITS",
    "Granularity",
    "QuantSpec",
    "levels",
    "quantize_per_token",
    "quantize_weight_groups",
    "quantize_weight_per_channel",
]
