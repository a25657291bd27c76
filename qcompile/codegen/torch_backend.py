"""The reference backend: runs each entry's ATen graph with torch (qcompile ops: reference kernels)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
import torch.fx as fx

from qcompile.codegen.base import Backend, BuiltEntry
from qcompile.codegen.target import Target
from qcompile.errors import QCompileError
from qcompile.ir.program import Program


class TorchBackend(Backend):
    name: ClassVar[str] = "torch"
    targets: ClassVar[tuple[str, ...]] = ("cpu",)

    def __init__(self) -> None:
        self.info: dict[str, object] = {}

    def build(
        self,
        program: Program,
        target: Target,
        *,
        allow_fallback: bool = False,
        artifact: Path | None = None,
        tuning: object = None,
        float_compute: str = "fp32",  # the reference computes every float linear in fp32
    ) -> dict[str, BuiltEntry]:
        if tuning is not None:
            raise QCompileError("the torch backend builds no kernels: a tuning database needs backend='tvm'")
        return {name: _runner(entry.graph) for name, entry in program.entries.items()}


def _runner(gm: fx.GraphModule) -> BuiltEntry:
    def run(args: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        with torch.no_grad():
            out = gm(*args)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    return run
