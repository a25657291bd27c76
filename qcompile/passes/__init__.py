"""Passes: Program -> Program rewrites, one per file, registered by name in :data:`PASSES`."""

from qcompile.passes import (  # noqa: F401  (registers the passes)
    assign_precision,
    fold_quant_steps,
    hadamard,
    kv_to_xcache,
    qat,
    quantize_weights,
    smooth_migration,
    winograd_conv,
)
from qcompile.passes.base import PASSES, Pass, PassContext, PassResult, make_pass, register_pass
from qcompile.passes.manager import PassManager
from qcompile.report import CompileReport, PassReport

__all__ = [
    "PASSES",
    "Pass",
    "PassContext",
    "PassResult",
    "make_pass",
    "register_pass",
    "CompileReport",
    "PassManager",
    "PassReport",
]
