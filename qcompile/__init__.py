"""qcompile: a compiler for quantized inference.

import qcompile
cm = qcompile.compile(model, target="cpu", plan="w8a8-rtn")
cm(input_ids); cm.generate(input_ids, max_new_tokens=32); cm.save("out/")
cm = qcompile.load("out/")
"""

__version__ = "0.1.0"

from qcompile import ops as _ops  # noqa: E402,F401  (registers torch.ops.qcompile.*)
from qcompile import passes as _passes  # noqa: E402,F401  (registers the passes)
from qcompile.api import compile, load, tune  # noqa: E402
from qcompile.errors import (  # noqa: E402
    ArtifactError,
    CaptureError,
    DataError,
    InputError,
    ModelNotFoundError,
    NonFiniteError,
    PassError,
    PlanError,
    QCompileError,
    TuneError,
    VerifyError,
)
from qcompile.ir.capture import capture  # noqa: E402
from qcompile.ir.program import Program  # noqa: E402
from qcompile.plan import PRESETS, Granularity, LayerRule, PassConfig, Plan, QuantSpec  # noqa: E402
from qcompile.runtime.compiled import CompiledModule  # noqa: E402

__all__ = [
    "__version__",
    "compile",
    "load",
    "tune",
    "capture",
    "Program",
    "CompiledModule",
    "Plan",
    "LayerRule",
    "QuantSpec",
    "PassConfig",
    "Granularity",
    "PRESETS",
    "QCompileError",
    "TuneError",
    "CaptureError",
    "PlanError",
    "PassError",
    "VerifyError",
    "ArtifactError",
    "InputError",
    "ModelNotFoundError",
    "NonFiniteError",
    "DataError",
]
