"""Artifacts: a directory of safetensors + JSON, written atomically, checked on load.

Layout (format version :data:`FORMAT_VERSION`)::

    manifest.json        format, versions, plan, target, backend, program (graphs as JSON,
                         slots, input specs, cache specs, meta), report, sha256 of every file
    tensors.safetensors  Program state (weights, scales, constants) and the example inputs
    backend/             what the backend built (tvm: module.so from export_library, the repacked
                         weights, tvm.json with the target and TVM version, checked on load)
    tokenizer/           the tokenizer's own JSON files, when the model has one

Writing goes to a hidden temporary directory beside the target, which replaces the target
only once complete, so an interrupted save leaves nothing half-written. Loading verifies the
format version and every file's sha256 before using anything; a truncated or tampered file
raises :class:`ArtifactError`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qcompile.errors import ArtifactError, PlanError, VerifyError
from qcompile.fileio import atomic_directory, sha256_file
from qcompile.ir.facts import CAPTURED_FACTS, Fact, names
from qcompile.ir.program import DimRange, Entry, Program, Slot, SlotKind, TensorSpec
from qcompile.ir.serialize import graph_from_json, graph_to_json
from qcompile.ir.verify import verify
from qcompile.plan import Plan
from qcompile.report import CompileReport

if TYPE_CHECKING:
    from qcompile.runtime.compiled import CompiledModule

FORMAT = "qcompile-artifact"
FORMAT_VERSION = 2  # 2: typed Program facts (weight_bits, cache_bits, fp16_kv_bytes, facts); 1 kept them in meta
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
TOKENIZER_DIR = "tokenizer"
BACKEND_DIR = "backend"


def _version() -> str:
    from qcompile import __version__

    return __version__


def _entry_to_json(e: Entry) -> dict[str, Any]:
    return {
        "graph": graph_to_json(e.graph),
        "slots": [[s.kind.value, s.name] for s in e.slots],
        "user_inputs": [{"shape": list(t.shape), "dtype": t.dtype} for t in e.user_inputs],
        "dims": {k: [v.min, v.max] for k, v in e.dims.items()},
        "out_spec": e.out_spec,
        "examples": len(e.examples),
    }


def _unalias(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: give every tensor its own contiguous copy if needed."""
    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if (
            ptr in seen
            or not t.is_contiguous()
            or t.storage_offset() != 0
            or t.untyped_storage().nbytes() != t.numel() * t.element_size()
        ):
            t = t.clone().contiguous()
        seen.add(t.untyped_storage().data_ptr() if t.numel() else -1)
        out[k] = t
    return out


def save_artifact(cm: CompiledModule, path: Path) -> Path:
    path = path.expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not (path / MANIFEST).exists():
        raise ArtifactError(
            f"{path} is a non-empty directory that is not a qcompile artifact; refusing to overwrite it"
        )
    with atomic_directory(path) as tmp:
        prog = cm.program
        tensors = {f"state/{k}": v for k, v in prog.state.items()}
        for e in prog.entries.values():
            tensors.update({f"example/{e.name}/{i}": t for i, t in enumerate(e.examples)})
        save_file(_unalias(tensors), tmp / TENSORS, metadata={"format": FORMAT})
        files = {TENSORS: sha256_file(tmp / TENSORS)}
        for f in cm._backend.save(tmp / BACKEND_DIR):  # the compiled library, when the backend has one
            files[f.relative_to(tmp).as_posix()] = sha256_file(f)
        if cm.tokenizer is not None:
            cm.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
            for f in sorted((tmp / TOKENIZER_DIR).rglob("*")):
                if f.is_file():
                    files[f.relative_to(tmp).as_posix()] = sha256_file(f)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "qcompile_version": _version(),
            "torch_version": torch.__version__,
            "target": cm.target,
            "backend": cm.backend,
            "plan": cm.plan.to_dict(),
            "program": {
                "meta": prog.meta,
                "weight_bits": prog.weight_bits,
                "cache_bits": prog.cache_bits,
                "fp16_kv_bytes": prog.fp16_kv_bytes,
                "facts": names(prog.facts),
                "cache_specs": {k: [list(s), dt] for k, (s, dt) in prog.cache_specs.items()},
                "state_keys": list(prog.state),
                "entries": {name: _entry_to_json(e) for name, e in prog.entries.items()},
            },
            "report": cm.report.to_dict(),
            "files": files,
        }
        manifest["checksum"] = _manifest_checksum(manifest)
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    return path


def _manifest_checksum(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{path} is not a qcompile artifact (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath} is corrupt (truncated or edited): {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath} is not a qcompile artifact manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise ArtifactError(f"{mpath} has no valid format_version")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has artifact format version {version}, newer than this qcompile ({_version()}) reads "
            f"(<= {FORMAT_VERSION}); upgrade qcompile to load it"
        )
    if manifest.get("checksum") != _manifest_checksum(manifest):
        raise ArtifactError(f"{mpath} does not match its checksum (edited or corrupted); re-create the artifact")
    return manifest


def load_artifact(path: str | Path, backend: str | None = None) -> CompiledModule:
    from qcompile.runtime.compiled import CompiledModule

    path = Path(path).expanduser()
    manifest = read_manifest(path)
    files = manifest.get("files") or {}
    if TENSORS not in files:
        raise ArtifactError(f"{path}/{MANIFEST} lists no {TENSORS}")
    for rel, digest in files.items():
        f = path / rel
        if not f.is_file():
            raise ArtifactError(f"{path} is incomplete: {rel} is missing")
        if sha256_file(f) != digest:
            raise ArtifactError(
                f"{path}/{rel} does not match its checksum (truncated or tampered); re-create the artifact"
            )
    try:
        tensors = load_file(path / TENSORS)
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path}/{TENSORS} cannot be read: {e}") from None
    try:
        plan = Plan.from_dict(manifest["plan"])
        program = _program_from_json(manifest["program"], tensors)
        report = CompileReport.from_dict(manifest.get("report") or {})
        verify(program, deep=False)
    except (KeyError, TypeError, ValueError, PlanError, VerifyError) as e:
        raise ArtifactError(f"{path}/{MANIFEST} is malformed: {type(e).__name__}: {e}") from None
    tokenizer = None
    if (path / TOKENIZER_DIR).is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path / TOKENIZER_DIR))
    chosen = backend or manifest.get("backend")
    prebuilt = path / BACKEND_DIR if chosen == manifest.get("backend") and (path / BACKEND_DIR).is_dir() else None
    return CompiledModule(
        program, plan, target=manifest["target"], backend=chosen, report=report, tokenizer=tokenizer, artifact=prebuilt
    )


def _program_from_json(data: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Program:
    state = {}
    for k in data["state_keys"]:
        if f"state/{k}" not in tensors:
            raise ArtifactError(f"tensor {k!r} is missing from {TENSORS}")
        state[k] = tensors[f"state/{k}"]
    entries = {}
    for name, e in data["entries"].items():
        examples = [tensors[f"example/{name}/{i}"] for i in range(int(e["examples"]))]
        entries[name] = Entry(
            name=name,
            graph=graph_from_json(e["graph"]),
            slots=[Slot(SlotKind(kind), n) for kind, n in e["slots"]],
            user_inputs=[TensorSpec(tuple(u["shape"]), str(u["dtype"])) for u in e["user_inputs"]],
            examples=examples,
            dims={k: DimRange(int(a), int(b)) for k, (a, b) in e["dims"].items()},
            out_spec=str(e["out_spec"]),
        )
    cache_specs = {k: (tuple(int(d) for d in s), str(dt)) for k, (s, dt) in data["cache_specs"].items()}
    meta = dict(data["meta"])
    if "weight_bits" not in data:  # format 1 kept these facts in meta
        data = {
            **data,
            "weight_bits": meta.pop("weight_bits", {}),
            "cache_bits": meta.pop("cache_bits", {}),
            "fp16_kv_bytes": meta.pop("fp16_kv_bytes_per_token", None),
            "facts": names(CAPTURED_FACTS),
        }
    fp16 = data["fp16_kv_bytes"]
    return Program(
        entries,
        state,
        cache_specs,
        meta,
        weight_bits={str(k): _bits(v, k) for k, v in data["weight_bits"].items()},
        cache_bits={str(k): _bits(v, k) for k, v in data["cache_bits"].items()},
        fp16_kv_bytes=None if fp16 is None else int(fp16),
        facts=frozenset(Fact(f) for f in data["facts"]),
    )


def _bits(value: Any, key: str) -> int:
    from qcompile.quant.spec import check_bits

    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"bit width of {key!r} must be an integer, got {value!r}")
    check_bits(value, f"bit width of {key!r}")
    return value
