import pytest
import torch
import torch.nn as nn

import qcompile
from qcompile import CaptureError, capture
from qcompile.ir.patterns import find_linears
from qcompile.ir.program import PATH_KEY, SlotKind
from qcompile.ir.verify import verify


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 32), nn.Linear(32, 5)

    def forward(self, x):
        return {"logits": self.fc2(torch.relu(self.fc1(x))), "hidden": self.fc1(x)}


def _cnn():
    torch.manual_seed(0)
    m = SmallCNN()
    with torch.no_grad():  # non-trivial running statistics so eval-mode BatchNorm matters
        for bn in (m.features[1], m.features[5]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def test_capture_cnn_with_batchnorm_and_pooling_runs_like_the_model():
    m = _cnn()
    x = torch.randn(2, 1, 28, 28)
    prog = capture(m, (x,))
    assert list(prog.entries) == ["forward"]
    verify(prog)
    paths = prog.module_paths()
    assert {"features.0", "features.1", "features.3", "head"} <= paths
    cm = qcompile.compile(prog, plan="fp32")
    y = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(cm(y), m(y), rtol=0, atol=1e-5)


def test_capture_mlp_with_dict_outputs_and_dynamic_batch():
    torch.manual_seed(0)
    m = MLP().eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    prog = capture(m, (torch.randn(4, 12),), dynamic_shapes=({0: batch},))
    entry = prog.entries["forward"]
    assert isinstance(entry.user_inputs[0].shape[0], str)
    assert [lm.path for lm in find_linears(prog)] == ["fc1", "fc2", "fc1"]
    cm = qcompile.compile(prog, plan="fp32")
    x = torch.randn(7, 12)
    out = cm(x)
    assert set(out) == {"logits", "hidden"}
    torch.testing.assert_close(out["logits"], m(x)["logits"])


def test_capture_user_traced_graph_module():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(6, 6), nn.GELU(), nn.Linear(6, 2)).eval()
    gm = torch.fx.symbolic_trace(seq)
    prog = capture(gm, (torch.randn(3, 6),))
    assert {"0", "2"} <= prog.module_paths()
    x = torch.randn(3, 6)
    torch.testing.assert_close(qcompile.compile(prog)(x), seq(x))


def test_capture_causal_lm_entries_cache_and_paths(tiny_llama_program, tiny_llama):
    prog = tiny_llama_program
    assert list(prog.entries) == ["forward", "prefill", "decode"]
    assert prog.kind == "causal_lm" and prog.meta["max_cache_len"] == 64
    # every layer's K and V cache is shared by prefill and decode, lifted out of the graph
    assert {f"key_cache_{i}" for i in range(2)} | {f"value_cache_{i}" for i in range(2)} <= set(prog.cache_specs)
    for name in ("prefill", "decode"):
        cache_slots = {s.name for s in prog.entries[name].slots if s.kind is SlotKind.CACHE}
        assert cache_slots == set(prog.cache_specs)
    assert "forward" in prog.entries and not any(s.kind is SlotKind.CACHE for s in prog.entries["forward"].slots)
    # module paths are the user's model's own, on every linear
    linear_paths = {lm.path for lm in find_linears(prog)}
    assert "model.layers.1.mlp.down_proj" in linear_paths and "lm_head" in linear_paths
    names = {n for n, _ in tiny_llama.named_modules()}
    assert linear_paths <= names
    assert all(n.meta.get(PATH_KEY) is not None for _, n in prog.nodes())
    # weights are shared with the model (one storage each), not copied per entry
    param = dict(tiny_llama.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    assert prog.state["model.layers.0.self_attn.q_proj.weight"].data_ptr() == param.data_ptr()


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), DataDependent())

    def forward(self, x):
        return self.inner(x)


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: not capturable
            return x * 2
        return x


def test_capture_error_names_failing_module_and_code():
    with pytest.raises(CaptureError) as ei:
        capture(Branchy().eval(), (torch.randn(2, 4),))
    msg = str(ei.value)
    assert "'inner.1' (DataDependent)" in msg
    assert "if x.sum() > 0" in msg and "test_capture.py" in msg


def test_capture_needs_example_inputs_for_non_lm():
    with pytest.raises(CaptureError, match="needs example_inputs"):
        capture(MLP())
    with pytest.raises(CaptureError, match="nn.Module"):
        capture("not a model")  # type: ignore[arg-type]
