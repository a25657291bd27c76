"""Backend interface: build each entry of a Program into a callable over flat tensors."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from qcompile.codegen.target import Target
from qcompile.ir.program import Program

# A built entry takes the placeholders' tensors in slot order and returns the flat outputs.
BuiltEntry = Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]]


class Backend(abc.ABC):
    name: ClassVar[str]
    targets: ClassVar[tuple[str, ...]]

    info: dict[str, object]  # what the build did (target, kernels, fallbacks, timings), for the report

    @abc.abstractmethod
    def build(
        self,
        program: Program,
        target: Target,
        *,
        allow_fallback: bool = False,
        artifact: Path | None = None,
        tuning: Any = None,
        float_compute: str = "fp32",
    ) -> dict[str, BuiltEntry]:
        """One callable per entry of ``program``, for ``target`` (parsed by
        :func:`qcompile.codegen.target.parse_target`). ``allow_fallback``: nodes the backend cannot lower
        run with torch (listed in ``info``). ``artifact``: a directory :meth:`save` wrote, to load
        instead of building. ``tuning``: a tuning database opened for this target
        (:class:`qcompile.tuning.tuner.Applied`), for backends that build kernels. ``float_compute``:
        the plan's :class:`qcompile.plan.FloatCompute` for weight-only linears (backends that have no
        choice compute fp32)."""

    def save(self, directory: Path) -> list[Path]:
        """Write what :meth:`build` needs to skip compiling (nothing for backends that build fast)."""
        return []

    def library_digests(self) -> dict[str, str]:
        """The sha256 of each file of native code :meth:`save` writes, by its name in that directory
        (empty for backends that ship none). Loading with ``trust_library=False`` compares these,
        from a build on the loading machine, with the shipped files."""
        return {}
