"""BatchNorm in eval mode on TVM: TVM 0.27's importer read ``aten.batch_norm`` with the argument order
of ``_native_batch_norm_legit`` and normalized with the batch's statistics (20 % off); qcompile's
converter computes inference batch norm."""

from __future__ import annotations

import torch

import qcompile


def test_conv_batchnorm_eval_on_tvm_equals_torch():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(8)
    with torch.no_grad():  # running statistics far from the batch's, so batch statistics would show
        bn.running_mean.uniform_(-2, 2)
        bn.running_var.uniform_(0.5, 3)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), bn, torch.nn.ReLU()).eval()
    x = torch.randn(2, 3, 12, 12)
    cm = qcompile.compile(model, backend="tvm", example_inputs=(x,))
    with torch.no_grad():
        ref = model(x)
    assert float((cm(x) - ref).abs().max() / ref.abs().max()) < 1e-5
