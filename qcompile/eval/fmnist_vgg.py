"""``fmnist-vgg``: a small VGG-style CNN of 3×3 convs trained on Fashion-MNIST, deterministically.

Recipe (fixed): seed 0; 4 conv3×3+BN+ReLU layers (32, 32, 64, 64 channels) with a 2×2 max-pool
after each pair, then Linear(3136→128)+ReLU and Linear(128→10); Adam (lr 2e-3, OneCycle),
batch 128, 3 epochs over the 60k training images in a seeded order, with 2 threads. The result
is cached under ``<cache>/models/fmnist-vgg-v1/`` as safetensors plus a JSON record (sha256,
test top-1); later loads verify the checksum. Identical weights need the same torch build and
thread count; the accuracy does not depend on that.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.nn as nn

from qcompile.eval.images import fashion_mnist, top1
from qcompile.fileio import atomic_directory, sha256_file

log = logging.getLogger(__name__)

RECIPE_VERSION = 1
EPOCHS = 3
BATCH = 128
SEED = 0


class FmnistVGG(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(1, 32),
            *block(32, 32),
            nn.MaxPool2d(2),
            *block(32, 64),
            *block(64, 64),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def train(progress: bool = True) -> tuple[FmnistVGG, float]:
    """Train the fixed recipe; returns (model in eval mode, test top-1)."""
    from tqdm import tqdm

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(SEED)
        model = FmnistVGG()
        x, y = fashion_mnist("train")
        steps = EPOCHS * ((len(x) + BATCH - 1) // BATCH)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
        gen = torch.Generator().manual_seed(SEED)
        model.train()
        bar = tqdm(total=steps, desc="training fmnist-vgg (first use; cached afterwards)", disable=not progress)
        for _ in range(EPOCHS):
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), BATCH):
                idx = order[i : i + BATCH]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.close()
        model.eval()
        xt, yt = fashion_mnist("test")
        return model, top1(model, xt, yt)
    finally:
        torch.set_num_threads(threads)


def load(cache: Path, progress: bool = True) -> tuple[FmnistVGG, dict]:
    """The cached model (trained on first use); returns (model, record with test top-1)."""
    from safetensors.torch import load_file, save_file

    folder = cache / "models" / f"fmnist-vgg-v{RECIPE_VERSION}"
    record_path = folder / "record.json"
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
            if sha256_file(folder / "model.safetensors") == record["sha256"]:
                model = FmnistVGG()
                model.load_state_dict(load_file(folder / "model.safetensors"))
                return model.eval(), record
            log.warning("cached fmnist-vgg failed its checksum; retraining")
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            log.warning("cached fmnist-vgg is unusable (%s); retraining", e)
    t0 = time.perf_counter()
    model, acc = train(progress)
    with atomic_directory(folder) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        record = {
            "recipe_version": RECIPE_VERSION,
            "sha256": sha256_file(tmp / "model.safetensors"),
            "test_top1": acc,
            "train_seconds": round(time.perf_counter() - t0, 1),
            "torch": torch.__version__,
        }
        (tmp / "record.json").write_text(json.dumps(record, indent=1))
    return model, record
