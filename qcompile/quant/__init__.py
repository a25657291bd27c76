"""Quantization numerics: quantizers, packing, observers (each checked against an oracle)."""

from qcompile.quant.rtn import dequantize, quantize_per_token, quantize_weight_per_channel, qrange

__all__ = ["dequantize", "quantize_per_token", "quantize_weight_per_channel", "qrange"]
