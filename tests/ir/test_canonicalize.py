"""Capture's canonical forms (qcompile.ir.canonicalize) and the family patterns built on them: each
rewrite is checked against the module it came from, and each pattern against its own oracle."""

from __future__ import annotations

import torch
from torch import nn

import qcompile
from qcompile.ir.patterns import find_linears, find_scale_groups, rmsnorm_source

aten = torch.ops.aten
X = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))


def _linears(program) -> list[str]:
    return sorted(m.path for m in find_linears(program))


class FusedSlices(nn.Module):
    """Phi-3 style: one projection cut into q, k, v by slicing its last dim; GELU gate_up by chunk."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 20)
        self.gate_up = nn.Linear(8, 12, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        q, k, v = qkv[..., :8], qkv[..., 8:14], qkv[..., 14:]
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return torch.cat([q * 2, k.sin(), v, torch.nn.functional.gelu(gate) * up], dim=-1)


class Interleaved(nn.Module):
    """GPT-NeoX style: view to [B, T, heads, 3 * head_dim], transpose, chunk per head."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 2, 12).transpose(1, 2).chunk(3, dim=-1)
        return q * k + v


def test_fused_projection_becomes_one_linear_per_piece():
    m = FusedSlices().eval()
    prog = qcompile.capture(m, (X,))
    assert _linears(prog) == ["gate_up.part0", "gate_up.part1", "qkv.part0", "qkv.part1", "qkv.part2"]
    assert torch.equal(prog.state["qkv.weight.part1"], m.qkv.weight[8:14])
    assert torch.equal(prog.state["qkv.bias.part2"], m.qkv.bias[14:])
    assert "qkv.weight" not in prog.state  # nothing else used it
    assert any("qkv: fused projection split into 3" in n for n in prog.meta["canonicalized"])
    out = qcompile.compile(prog, plan="fp32", backend="torch")(X)
    torch.testing.assert_close(out, m(X), rtol=1e-6, atol=1e-6)


def test_interleaved_heads_take_their_rows():
    m = Interleaved().eval()
    prog = qcompile.capture(m, (X,))
    assert _linears(prog) == ["qkv.part0", "qkv.part1", "qkv.part2"]
    rows = [h * 12 + j for h in range(2) for j in range(4, 8)]  # k: columns 4..8 of each head's 12
    assert torch.equal(prog.state["qkv.weight.part1"], m.qkv.weight[rows])
    out = qcompile.compile(prog, plan="fp32", backend="torch")(X)
    torch.testing.assert_close(out, m(X), rtol=1e-6, atol=1e-6)


def test_a_linear_used_whole_is_not_split():
    class Both(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.p(x)
            return y[..., :4].sum(-1, keepdim=True) + y

    prog = qcompile.capture(Both().eval(), (X,))
    assert _linears(prog) == ["p"] and "canonicalized" not in prog.meta


def test_conv1d_becomes_a_linear_with_the_transposed_weight():
    from transformers.pytorch_utils import Conv1D

    m = nn.Sequential(Conv1D(6, 8), nn.ReLU(), Conv1D(8, 6)).eval()
    prog = qcompile.capture(m, (X,))
    assert _linears(prog) == ["0", "2"]
    assert not any(n.target == aten.addmm.default for _, n in prog.nodes())
    assert torch.equal(prog.state["0.weight.t"], m[0].weight.t())
    out = qcompile.compile(prog, plan="fp32", backend="torch")(X)
    torch.testing.assert_close(out, m(X), rtol=1e-6, atol=1e-6)


class StoredMatmul(nn.Module):
    """ONNX MatMul as onnx2torch imports it: x @ W with W a stored [in, out] matrix, then a bias add;
    x @ x.T (no stored matrix) stays a matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.randn(8, 6, generator=torch.Generator().manual_seed(3)))
        self.register_buffer("b", torch.randn(6, generator=torch.Generator().manual_seed(4)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.w) + self.b
        return torch.matmul(y, y.transpose(-1, -2))


def test_matmul_by_a_stored_matrix_becomes_a_linear_and_is_quantized():
    m = StoredMatmul().eval()
    prog = qcompile.capture(m, (X,))
    assert len(_linears(prog)) == 1
    assert sum(n.target == aten.matmul.default for _, n in prog.nodes()) == 1  # the activation product stays
    assert any("matmul by a stored" in note for note in prog.meta["canonicalized"])
    torch.testing.assert_close(qcompile.compile(prog, plan="fp32", backend="torch")(X), m(X), rtol=1e-5, atol=1e-5)
    cm = qcompile.compile(qcompile.capture(m, (X,)), plan="w8a8-rtn", backend="torch")
    assert len(cm.report.passes[0].layers_changed) == 1


class OnePlusNorm(nn.Module):
    """Gemma's RMSNorm: h * (1 + w), computed in float, cast back, feeding two linears."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, generator=torch.Generator().manual_seed(2)) * 0.3)
        self.a = nn.Linear(8, 4, bias=False)
        self.b = nn.Linear(8, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        y = (h * (1.0 + self.weight.float())).type_as(x)
        return self.a(y) + self.b(y)


def test_one_plus_w_norm_is_a_scale_group_and_folds_exactly():
    m = OnePlusNorm().eval()
    prog = qcompile.capture(m, (X,))
    (g,) = find_scale_groups(prog)
    assert (g.producer, g.producer_weight, g.producer_offset, g.paths) == ("norm", "weight", 1.0, ("a", "b"))
    s = torch.rand(8, generator=torch.Generator().manual_seed(3)) + 0.5
    g.divide_producer(prog.state, s)  # oracle: the norm's output is divided by s, channel by channel
    torch.testing.assert_close(1.0 + prog.state["weight"], (1.0 + m.weight.detach()) / s)
    entry = prog.entries["forward"]
    lin = next(n for n in entry.graph.graph.nodes if n.target == aten.linear.default)
    match = rmsnorm_source(lin.args[0], entry.bindings())
    assert match is not None and match.offset == 1.0 and match.eps == 1e-6


def test_layer_norm_weight_and_bias_are_a_scale_group():
    m = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4)).eval()
    prog = qcompile.capture(m, (X,))
    (g,) = find_scale_groups(prog)
    assert (g.producer_weight, g.producer_bias, g.producer_offset) == ("0.weight", "0.bias", 0.0)
    s = torch.rand(8, generator=torch.Generator().manual_seed(4)) + 0.5
    want = m[0](X) / s
    g.divide_producer(prog.state, s)
    got = torch.nn.functional.layer_norm(X, (8,), prog.state["0.weight"], prog.state["0.bias"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
