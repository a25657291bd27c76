"""``where`` with a scalar branch (Gemma 2's soft-capped attention mask) on the TVM backend."""

from __future__ import annotations

import pytest
import torch

import qcompile

pytestmark = pytest.mark.tvm


class Masked(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = (x > 0).to(torch.int64) * (x < 2).to(torch.int64)  # an integer mask, as transformers builds some
        a = torch.where(keep.bool(), x, -3.0)  # where.ScalarOther
        b = torch.where(x < 1, 0.5, x)  # where.ScalarSelf
        return a * b


def test_where_with_a_scalar_branch_matches_torch():
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0)) * 2
    cm = qcompile.compile(Masked().eval(), plan="fp32", example_inputs=(x,), backend="tvm")
    targets = {str(n.target) for _, n in cm.program.nodes()}
    assert {"aten.where.ScalarOther", "aten.where.ScalarSelf"} <= targets
    torch.testing.assert_close(cm(x), Masked()(x))
