"""The online Walsh–Hadamard rotation op.

``qcompile::hadamard(x, blocks)``: ``x @ diag(H_b for b in blocks)`` along the last axis, with
``H_b`` the normalized Sylvester Hadamard matrix of order ``b`` (powers of two summing to the last
dimension; :mod:`qcompile.quant.hadamard`). The reference kernel is the fast Walsh–Hadamard
butterfly (``O(K·log b)``) in float32, cast back to ``x``'s dtype; the ``hadamard`` pass inserts it
where a rotation cannot be folded into a producer's weights (norm outputs, the gated MLP product).
"""

from __future__ import annotations

import torch

from qcompile.quant.hadamard import fwht


@torch.library.custom_op("qcompile::hadamard", mutates_args=())
def hadamard(x: torch.Tensor, blocks: list[int]) -> torch.Tensor:
    return fwht(x, list(blocks))


@hadamard.register_fake
def _hadamard_fake(x: torch.Tensor, blocks: list[int]) -> torch.Tensor:
    torch._check(sum(blocks) == x.shape[-1])
    return x.new_empty(x.shape)
