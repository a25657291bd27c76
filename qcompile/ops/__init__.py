"""qcompile custom ops (``torch.ops.qcompile.*``): reference kernels plus fake kernels.

Importing this package registers them; ``import qcompile`` does so too, which is what lets a
saved artifact's graph (which names ``qcompile::`` ops) load and run.
"""

from qcompile.ops import (  # noqa: F401  (registers the ops)
    cache,
    conv,
    hadamard,
    linear,
    packed,
    quest,
    static,
    winograd,
)

QCOMPILE_OPS = (
    "linear_w8a8",
    "quant_linear",
    "packed_linear",
    "winograd_conv2d",
    "quant_conv2d",
    "quantize_static",
    "dequantize_static",
    "linear_static",
    "cache_quantize",
    "cache_quantize_static",
    "cache_dequantize",
    "hadamard",
    "quest_linear",
)
