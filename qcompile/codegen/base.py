"""Backend interface: build each entry of a Program into a callable over flat tensors."""

from __future__ import annotations

import abc
from typing import Callable, ClassVar, Sequence

import torch

from qcompile.ir.program import Program

# A built entry takes the placeholders' tensors in slot order and returns the flat outputs.
BuiltEntry = Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]]


class Backend(abc.ABC):
    name: ClassVar[str]
    targets: ClassVar[tuple[str, ...]]

    @abc.abstractmethod
    def build(self, program: Program, target: str) -> dict[str, BuiltEntry]:
        """One callable per entry of ``program``."""
