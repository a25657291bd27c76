"""Image data and accuracy: Fashion-MNIST (labelled) and real photos (unlabelled).

* Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``,
  idx.gz files): 60k train / 10k test, normalized with the training set's mean/std.
* Photos: the natural images shipped inside the scikit-image wheel (``skimage/data``), resized
  (shorter side 256, bicubic) and centre-cropped to 224; grey images are repeated to RGB.
  There is no labelled ImageNet here, so a quantized classifier is scored by top-1 *agreement*
  with the fp32 model on these photos.
* Calibration (static activation steps): Fashion-MNIST's first :data:`FMNIST_CALIB` training
  images; for the photo classifier the other images of ``skimage/data`` (:data:`CALIB_PHOTOS`, never
  one of the evaluation photos). :func:`calibration_images` gives them per model.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from qcompile.errors import DataError, ModelNotFoundError

FMNIST_DIR = Path(os.environ.get("QCOMPILE_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FMNIST_INSTALL = "apt-get install dataset-fashion-mnist"
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
FMNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

PHOTOS = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "chelsea.png",
    "clock_motion.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "microaneurysms.png",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "page.png",
    "retina.jpg",
    "rocket.jpg",
    "text.png",
)

CALIB_PHOTOS = ("cell.png", "color.png", "horse.png", "logo.png", "phantom.png", "chessboard_RGB.png")
FMNIST_CALIB = 256


def _read_idx(path: Path) -> np.ndarray:
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing: install Fashion-MNIST with `{FMNIST_INSTALL}`")
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:
        raise DataError(f"{path} is not an unsigned-byte idx file (magic {magic:#x})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: {arr.size} values for shape {shape}")
    return arr.reshape(shape)


def fashion_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 [N, 1, 28, 28] normalized, labels int64 [N]) of ``train`` or ``test``."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DataError(f"unknown Fashion-MNIST split {split!r}; splits: ['train', 'test']")
    x = _read_idx(FMNIST_DIR / f"{prefix}-images-idx3-ubyte.gz")
    y = _read_idx(FMNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz")
    images = (torch.from_numpy(x.astype(np.float32)) / 255.0 - FMNIST_MEAN) / FMNIST_STD
    return images.unsqueeze(1), torch.from_numpy(y.astype(np.int64))


def top1(
    predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor, batch: int = 500
) -> float:
    """Top-1 accuracy of ``predict`` (logits) on ``images``."""
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            correct += int((predict(images[i : i + batch]).argmax(-1) == labels[i : i + batch]).sum())
    return correct / len(images)


def photo_dir() -> Path:
    from importlib.util import find_spec

    spec = find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("scikit-image is not installed; install it with: pip install scikit-image")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def load_photo(path: Path, size: int = 224) -> np.ndarray:
    """uint8 RGB [size, size, 3]: shorter side to 256/224*size (bicubic), centre crop."""
    from PIL import Image

    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = 256 / 224 * size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


def calibration_images(model: str) -> torch.Tensor:
    """Calibration input batch for zoo image model ``model`` (never evaluation images)."""
    if model == "fmnist-vgg":
        return fashion_mnist("train")[0][:FMNIST_CALIB]
    if model == "efficientnet-lite0":
        return imagenet_photos(names=CALIB_PHOTOS)[1]
    raise DataError(f"no calibration images for {model!r}")


def imagenet_photos(size: int = 224, names: tuple[str, ...] = PHOTOS) -> tuple[list[str], torch.Tensor]:
    """(names, float32 [N, 3, size, size]) of the photos, normalized as EfficientNet-Lite expects
    ((pixel - 127) / 128, RGB)."""
    folder = photo_dir()
    wanted, names, arrays = names, [], []
    for name in wanted:
        p = folder / name
        if p.is_file():
            names.append(name)
            arrays.append(load_photo(p, size))
    if not names:
        raise DataError(f"no photos found in {folder}")
    x = torch.from_numpy(np.stack(arrays).astype(np.float32)).permute(0, 3, 1, 2)
    return names, (x - 127.0) / 128.0
