"""ONNX import: a small graph built with onnx.helper (conv, batch norm, hard sigmoid, resize, shape
arithmetic, reshape; named dynamic dims) against onnxruntime on both backends, and every bad file."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import qcompile
from qcompile.cli import main
from qcompile.errors import CaptureError, InputError
from qcompile.ir.onnx_import import capture_onnx, read_onnx


def _graph(
    resize_attrs: dict | None = None, extra_nodes: list | None = None, outputs: list | None = None
) -> onnx.ModelProto:
    """x[N, 3, H, W] → Conv → BatchNorm → HardSigmoid → Resize ×2 → Reshape to [N, 4, -1] via Shape arithmetic."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
        numpy_helper.from_array((rng.random(4) + 0.5).astype(np.float32), "bn_scale"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "bn_bias"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "bn_mean"),
        numpy_helper.from_array((rng.random(4) + 0.5).astype(np.float32), "bn_var"),
        numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "scales"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "s0"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "s2"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "minus1"),
    ]
    attrs = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    attrs.update(resize_attrs or {})
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["n"], name="bn"),
        helper.make_node("HardSigmoid", ["n"], ["h"], name="hsig", alpha=0.2, beta=0.5),
        helper.make_node("Resize", ["h", "", "scales"], ["r"], name="resize", **attrs),
        helper.make_node("Shape", ["r"], ["shape"], name="shape"),
        helper.make_node("Slice", ["shape", "s0", "s2", "s0"], ["nc"], name="slice"),
        helper.make_node("Concat", ["nc", "minus1"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["r", "target"], ["y"], name="reshape"),
        *(extra_nodes or []),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    outs = outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, None])]
    graph = helper.make_graph(nodes, "tiny", [x], outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="qcompile-tests")


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    onnx.save(_graph(), path)
    return str(path)


def _ort(path: str, x: torch.Tensor) -> torch.Tensor:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])


def _rel(y, r) -> float:
    y = y[0] if isinstance(y, tuple | list) else y
    return float((y - r).abs().max() / r.abs().max())


@pytest.mark.parametrize("backend", ["torch", "tvm"])
def test_imported_graph_matches_onnxruntime_with_dims_dynamic(tiny_onnx, backend):
    cm = qcompile.compile(tiny_onnx, plan="fp32", backend=backend)
    spec = cm.program.entries["forward"].user_inputs[0]
    assert [isinstance(d, str) for d in spec.shape] == [True, False, True, True]  # N, H, W stayed dynamic
    assert cm.program.meta["onnx"]["inputs"][0]["shape"] == ["N", 3, "H", "W"]
    for shape in [(1, 3, 5, 7), (2, 3, 8, 6), (3, 3, 16, 16)]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
        r = _ort(tiny_onnx, x)
        y = cm(x)
        assert y.shape == r.shape
        assert _rel(y, r) < 1e-5, (shape, _rel(y, r))


def test_example_inputs_and_static_capture(tiny_onnx):
    x = torch.randn(1, 3, 6, 6)
    prog = capture_onnx(tiny_onnx, x, dynamic=False)
    assert prog.entries["forward"].user_inputs[0].shape == (1, 3, 6, 6)
    cm = qcompile.compile(prog, backend="torch")
    assert _rel(cm(x), _ort(tiny_onnx, x)) < 1e-5
    with pytest.raises(InputError):
        cm(torch.randn(1, 3, 7, 6))
    with pytest.raises(CaptureError, match=r"must have shape \['N', 3, 'H', 'W'\]"):
        capture_onnx(tiny_onnx, torch.randn(1, 4, 6, 6))
    with pytest.raises(CaptureError, match="has 1 inputs"):
        capture_onnx(tiny_onnx, (x, x))


def test_capture_and_cli_take_an_onnx_path(tiny_onnx, tmp_path, capsys):
    prog = qcompile.capture(tiny_onnx)
    assert prog.meta["kind"] == "onnx" and prog.meta["onnx"]["opsets"] == {"ai.onnx": 13}
    out = tmp_path / "art"
    assert main(["compile", "--model", tiny_onnx, "--plan", "fp32", "--backend", "torch", "-o", str(out)]) == 0
    assert "ONNX file" in capsys.readouterr().out
    cm = qcompile.load(out, backend="torch")
    x = torch.randn(2, 3, 4, 4)
    assert _rel(cm(x), _ort(tiny_onnx, x)) < 1e-5
    with pytest.raises(qcompile.QCompileError, match="dynamic dims come from the file"):
        qcompile.compile(tiny_onnx, dynamic_shapes=({0: 2},))
    assert main(["compile", "--model", str(tmp_path / "none.onnx"), "-o", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---- bad files --------------------------------------------------------------------------------


def test_missing_directory_truncated_garbage_and_checksum(tiny_onnx, tmp_path):
    with pytest.raises(CaptureError, match="does not exist"):
        read_onnx(tmp_path / "nothing.onnx")
    with pytest.raises(CaptureError, match="not a regular file"):
        read_onnx(tmp_path)
    data = open(tiny_onnx, "rb").read()
    for name, blob in [("truncated", data[: len(data) // 2]), ("garbage", os.urandom(64)), ("empty", b"")]:
        p = tmp_path / f"{name}.onnx"
        p.write_bytes(blob)
        with pytest.raises(CaptureError, match=str(p)):
            read_onnx(p)
    good = hashlib.sha256(data).hexdigest()
    assert read_onnx(tiny_onnx, sha256=good).graph.node
    with pytest.raises(CaptureError, match="sha256"):
        read_onnx(tiny_onnx, sha256="0" * 64)


def test_checker_rejects_an_inconsistent_graph(tmp_path):
    m = _graph()
    m.graph.node[0].input[1] = "no_such_tensor"
    p = tmp_path / "bad.onnx"
    onnx.save(m, p)
    with pytest.raises(CaptureError, match="onnx.checker"):
        read_onnx(p)


def _external(tmp_path, **entries) -> str:
    """The tiny model with every initializer in ``w.bin``; ``entries`` then rewrite the conv weight's
    external-data fields."""
    folder = tmp_path / "ext"
    folder.mkdir(exist_ok=True)
    path = folder / "m.onnx"
    onnx.save_model(
        _graph(), path, save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin", size_threshold=0
    )
    if entries:
        m = onnx.load(path, load_external_data=False)
        w = next(t for t in m.graph.initializer if t.name == "w")
        fields = {e.key: e.value for e in w.external_data} | entries
        del w.external_data[:]
        for k, v in fields.items():
            w.external_data.add(key=k, value=v)
        onnx.save(m, path)
    return str(path)


def test_external_data_is_read_inside_the_folder_and_checked(tmp_path, tiny_onnx):
    path = _external(tmp_path)
    x = torch.randn(1, 3, 4, 4)
    cm = qcompile.compile(path, backend="torch")
    assert _rel(cm(x), _ort(tiny_onnx, x)) < 1e-5
    m = onnx.load(path, load_external_data=False)
    w = next(t for t in m.graph.initializer if t.name == "w")
    info = {e.key: e.value for e in w.external_data}
    off, n = int(info.get("offset", 0)), int(info["length"])
    raw = (tmp_path / "ext" / "w.bin").read_bytes()[off : off + n]
    assert read_onnx(_external(tmp_path, checksum=hashlib.sha1(raw).hexdigest())).graph.node
    cases = {
        "checksum": ({"checksum": "0" * 40}, "checksum"),
        "parent": ({"location": "../w.bin"}, "not a plain path"),
        "absolute": ({"location": "/etc/passwd"}, "not a plain path"),
        "missing": ({"location": "other.bin"}, "does not exist"),
        "beyond": ({"offset": str(len(raw) * 1000)}, "outside the file"),
        "negative": ({"offset": "-4"}, "outside the file"),
    }
    for _, (entries, msg) in cases.items():
        with pytest.raises(CaptureError, match=msg):
            read_onnx(_external(tmp_path, **entries))
    outside = tmp_path / "secret.bin"
    outside.write_bytes(raw)
    (tmp_path / "ext" / "link.bin").symlink_to(outside)
    with pytest.raises(CaptureError, match="resolves outside"):
        read_onnx(_external(tmp_path, location="link.bin", offset="0"))


def test_unconvertible_ops_are_named_with_node_and_opset(tmp_path):
    m = _graph(
        extra_nodes=[helper.make_node("Hardmax", ["y"], ["hm"], name="my_hardmax", axis=-1)],
        outputs=[helper.make_tensor_value_info("hm", TensorProto.FLOAT, ["N", 4, None])],
    )
    p = tmp_path / "hardmax.onnx"
    onnx.save(m, p)
    with pytest.raises(CaptureError, match=r"Hardmax \(node 'my_hardmax', opset 13\)"):
        capture_onnx(p)


def test_shape_values_into_an_unfollowed_op_are_refused(tmp_path):
    m = _graph(
        extra_nodes=[
            helper.make_node("Shape", ["y"], ["ys"], name="shape2"),
            helper.make_node("ReduceSum", ["ys"], ["total"], name="sum_of_dims", keepdims=0),
        ],
        outputs=[helper.make_tensor_value_info("total", TensorProto.INT64, [])],
    )
    p = tmp_path / "shapesum.onnx"
    onnx.save(m, p)
    with pytest.raises(CaptureError, match=r"ReduceSum \(node 'sum_of_dims'\): consumes a shape value"):
        capture_onnx(p)


def test_resize_modes_torch_computes_differently_are_refused(tmp_path):
    p = tmp_path / "resize.onnx"
    onnx.save(_graph(resize_attrs={"nearest_mode": "round_prefer_floor"}), p)
    with pytest.raises(CaptureError, match="nearest_mode=floor"):
        capture_onnx(p)


def test_eval_compares_an_onnx_file_with_onnxruntime(tiny_onnx, capsys):
    assert main(["eval", "--model", tiny_onnx, "--plan", "fp32", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "max relative output error vs onnxruntime" in out
    err = float(out.split("onnxruntime")[1].split("(CPU)")[1].split()[0])
    assert 0 <= err < 1e-5
    assert main(["eval", "--model", tiny_onnx, "--source"]) == 2


def test_an_empty_batch_is_refused(tiny_onnx):
    cm = qcompile.compile(tiny_onnx, backend="torch")
    with pytest.raises(InputError, match="out of range"):
        cm(torch.randn(0, 3, 4, 4))
