"""Passes: Program -> Program rewrites, one per file, registered by name in :data:`PASSES`."""

from qcompile.passes import assign_precision, quantize_weights, winograd_conv  # noqa: F401  (registers the passes)
from qcompile.passes.base import PASSES, Pass, PassContext, PassResult, make_pass, register_pass
from qcompile.passes.manager import CompileReport, PassManager, PassReport

__all__ = ["PASSES", "Pass", "PassContext", "PassResult", "make_pass", "register_pass", "CompileReport", "PassManager", "PassReport"]
