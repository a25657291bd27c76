"""Artifacts: a directory of safetensors + JSON, written atomically, checked on load.

Layout (format version :data:`FORMAT_VERSION`)::

    manifest.json        format, versions, plan, target, backend, program (graphs as JSON,
                         slots, input specs, cache specs, meta), report, sha256 of every file,
                         an HMAC signature with the saving user's key (qcompile/runtime/signing.py)
    tensors.safetensors  Program state (weights, scales, constants) and the example inputs
    backend/             what the backend built (tvm: module.so from export_library, the repacked
                         weights, tvm.json with the target and TVM version, checked on load)
    tokenizer/           the tokenizer's own JSON files, when the model has one

**Writing** goes to a hidden temporary directory beside the target that replaces it only once
complete (:func:`qcompile.fileio.atomic_directory`), under a lock that keeps a second writer out.
An existing directory is replaced only if it is a qcompile artifact holding nothing but the files
its manifest lists (:func:`check_output_dir`): nothing else is ever deleted.

**Loading** reads nothing the manifest does not vouch for. The manifest itself is bounded
(:data:`MAX_MANIFEST_BYTES`, nesting :data:`MAX_JSON_DEPTH`) and checked (format, version >= 1,
checksum, types). Its file keys are relative paths under the known areas only (``tensors.safetensors``,
``backend/``, ``tokenizer/``, plain names, no ``..``); every file is opened without following
symlinks, only if it is a regular file, and its sha256 checked; files under ``backend/`` or
``tokenizer/`` that the manifest does not list are refused. Graphs call only allow-listed
operators (:mod:`qcompile.ir.serialize`).

**Backend libraries are code** (``backend/module.so`` is loaded with dlopen). ``trust_library``:

* ``None`` (default): load the shipped library only if the manifest's signature verifies with this
  user's key (an artifact this user saved); otherwise refuse, explaining the two choices below;
* ``True``: load it (the caller vouches for whoever built it);
* ``False``: never load it: rebuild the library from the graph and refuse unless the rebuilt one
  is byte-identical to the shipped one (builds are deterministic for one machine and toolchain).

Artifacts without a library (the torch backend), or loaded with another backend, need no trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.utils._pytree as pytree
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qcompile.errors import ArtifactError, PlanError, QCompileError, VerifyError
from qcompile.fileio import atomic_directory, output_lock, sha256_fd, sha256_file
from qcompile.ir.facts import CAPTURED_FACTS, Fact, names
from qcompile.ir.program import DimRange, Entry, Program, Slot, SlotKind, TensorSpec
from qcompile.ir.serialize import graph_from_json, graph_to_json
from qcompile.ir.verify import verify
from qcompile.plan import Plan
from qcompile.report import CompileReport
from qcompile.runtime import signing

if TYPE_CHECKING:
    from qcompile.runtime.compiled import CompiledModule

FORMAT = "qcompile-artifact"
FORMAT_VERSION = 2  # 2: typed Program facts (weight_bits, cache_bits, fp16_kv_bytes, facts); 1 kept them in meta
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
TOKENIZER_DIR = "tokenizer"
BACKEND_DIR = "backend"
AREAS = (BACKEND_DIR, TOKENIZER_DIR)  # the folders whose files the manifest lists

MAX_MANIFEST_BYTES = 64 << 20
# builds of an untrusted artifact's graph before its shipped library is refused: TVM orders a few memory
# operations by object addresses, so one honest rebuild in several differs (tests/hostile/test_artifacts.py)
REBUILD_TRIES = 3
MAX_JSON_DEPTH = 64
MAX_FILES = 4096
MAX_CACHE_ELEMENTS = 1 << 31  # all caches together: 8 GiB of fp32
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_DTYPES = frozenset(str(v).removeprefix("torch.") for v in vars(torch).values() if isinstance(v, torch.dtype))
_TREE_TYPES = frozenset({"builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict"})
# what can go wrong turning well-formed JSON of the wrong shape into objects
_SHAPE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, PlanError, VerifyError)


def _version() -> str:
    from qcompile import __version__

    return __version__


# ---- saving ------------------------------------------------------------------------------------
def output_path(path: str | Path) -> Path:
    """The directory a save to ``path`` writes (absolute, symlinks resolved)."""
    return Path(path).expanduser().resolve()


def _entry_to_json(e: Entry) -> dict[str, Any]:
    check_out_spec(e.out_spec, f"entry {e.name!r}")
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


def _listed(tmp: Path, files: dict[str, str], written: list[Path]) -> None:
    for f in written:
        rel = f.relative_to(tmp).as_posix()
        check_file_key(rel)  # what saves must load: plain names under the known areas
        files[rel] = sha256_file(f)


def save_artifact(cm: CompiledModule, path: Path) -> Path:
    path = output_path(path)
    with output_lock(path):
        check_output_dir(path)
        with atomic_directory(path) as tmp:
            prog = cm.program
            entries = {name: _entry_to_json(e) for name, e in prog.entries.items()}  # refuses unlisted ops early
            tensors = {f"state/{k}": v for k, v in prog.state.items()}
            for e in prog.entries.values():
                tensors.update({f"example/{e.name}/{i}": t for i, t in enumerate(e.examples)})
            save_file(_unalias(tensors), tmp / TENSORS, metadata={"format": FORMAT})
            files = {TENSORS: sha256_file(tmp / TENSORS)}
            _listed(tmp, files, cm._backend.save(tmp / BACKEND_DIR))  # the compiled library, when there is one
            if cm.tokenizer is not None:
                cm.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
                _listed(tmp, files, sorted(f for f in (tmp / TOKENIZER_DIR).rglob("*") if f.is_file()))
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
                    "entries": entries,
                },
                "report": cm.report.to_dict(),
                "files": files,
            }
            manifest["signature"] = signing.sign(manifest)
            manifest["checksum"] = _manifest_checksum(manifest)
            with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
    return path


def check_output_dir(path: Path) -> None:
    """Refuse to replace ``path`` unless it is absent, an empty directory, or a qcompile artifact
    that holds nothing but the files its manifest lists (so replacing it deletes no one's data)."""
    path = output_path(path)
    if not os.path.lexists(path):
        return
    if not path.is_dir():
        raise ArtifactError(f"{path} exists and is not a directory; choose another output path")
    try:
        if not any(path.iterdir()):
            return
        listed = _replaceable_listing(path)
        if listed is None:
            raise ArtifactError(
                f"{path} is a non-empty directory that is not a qcompile artifact; refusing to replace it "
                "(that would delete its contents). Choose another output path, or empty or remove it yourself"
            )
        unlisted = _unlisted(path, "", listed | {MANIFEST})
    except OSError as e:
        raise ArtifactError(f"cannot inspect the output directory {path}: {e}") from None
    if unlisted:
        shown = ", ".join(unlisted[:5]) + (f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else "")
        raise ArtifactError(
            f"{path} is a qcompile artifact but also holds files its manifest does not list ({shown}); refusing "
            "to replace it, which would delete them. Move them away or choose another output path"
        )


def _replaceable_listing(path: Path) -> set[str] | None:
    """The file keys of ``path``'s manifest if it is a qcompile manifest (any version), else None."""
    try:
        manifest = _parse_json(_read_file(path, MANIFEST, MAX_MANIFEST_BYTES), path / MANIFEST)
    except ArtifactError:
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    files = manifest.get("files")
    return {k for k in files if isinstance(k, str)} if isinstance(files, dict) else None


def _unlisted(root: Path, prefix: str, listed: set[str], limit: int = 100) -> list[str]:
    """Everything under ``root/prefix`` that is not a directory and not in ``listed`` (symlinks are
    never followed; they count as unlisted entries)."""
    found: list[str] = []
    with os.scandir(root / prefix if prefix else root) as it:
        for entry in sorted(it, key=lambda e: e.name):
            rel = f"{prefix}/{entry.name}" if prefix else entry.name
            if entry.is_dir(follow_symlinks=False):
                found.extend(_unlisted(root, rel, listed, limit - len(found)))
            elif rel not in listed:
                found.append(rel)
            if len(found) >= limit:
                break
    return found


# ---- reading files confined to the artifact -----------------------------------------------------
def check_file_key(key: Any) -> str:
    """``key`` if it names a file the artifact may hold: ``tensors.safetensors``, or a relative
    path of plain names (letters, digits, ``._-``, not starting with a dot) under ``backend/`` or
    ``tokenizer/``. Anything else (absolute paths, ``..``, other folders) is an ArtifactError."""
    if isinstance(key, str) and len(key) <= 512:
        parts = key.split("/")
        if key == TENSORS or (
            2 <= len(parts) <= 4 and parts[0] in AREAS and all(_NAME.fullmatch(p) for p in parts[1:])
        ):
            return key
    raise ArtifactError(
        f"the manifest lists the file {str(key)[:200]!r}, which is outside what an artifact may hold "
        f"({TENSORS}, and plain relative names under {BACKEND_DIR}/ and {TOKENIZER_DIR}/); nothing outside the "
        "artifact is read"
    )


def _open_in(root: Path, rel: str) -> int:
    """An fd of the regular file ``root/rel``: no symlink below ``root`` is followed, and nothing that
    is not a regular file (a fifo, a device) is opened."""
    parts = rel.split("/")
    where = f"{root}/{rel}"
    try:
        dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ArtifactError(f"cannot open the artifact directory {root}: {e.strerror}") from None
    try:
        for i, part in enumerate(parts):
            st = os.stat(part, dir_fd=dfd, follow_symlinks=False)
            last = i == len(parts) - 1
            if stat.S_ISLNK(st.st_mode):
                raise ArtifactError(f"{where} is or passes through a symlink; an artifact holds only regular files")
            if not last:
                if not stat.S_ISDIR(st.st_mode):
                    raise ArtifactError(f"{where}: {part} is not a directory")
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                os.close(dfd)
                dfd = nfd
                continue
            if not stat.S_ISREG(st.st_mode):
                kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a fifo, socket or device)"
                raise ArtifactError(f"{where} is {kind}; an artifact holds only regular files")
            fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
            now = os.fstat(fd)
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                os.close(fd)
                raise ArtifactError(f"{where} changed while it was being opened; try again")
            return fd
        raise AssertionError("unreachable")
    except FileNotFoundError:
        raise ArtifactError(f"{root} is incomplete: {rel} is missing") from None
    except OSError as e:
        raise ArtifactError(f"cannot read {where}: {e.strerror or e}") from None
    finally:
        os.close(dfd)


def _read_file(root: Path, rel: str, limit: int) -> bytes:
    fd = _open_in(root, rel)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise ArtifactError(f"{root}/{rel} is {size} bytes, more than the {limit} an artifact's {rel} may have")
        data = b""
        while len(data) <= limit:
            block = os.read(fd, 1 << 20)
            if not block:
                break
            data += block
        if len(data) > limit:
            raise ArtifactError(f"{root}/{rel} is more than the {limit} bytes an artifact's {rel} may have")
        return data
    except OSError as e:
        raise ArtifactError(f"cannot read {root}/{rel}: {e.strerror or e}") from None
    finally:
        os.close(fd)


def _hash_file(root: Path, rel: str) -> str:
    fd = _open_in(root, rel)
    try:
        return sha256_fd(fd)
    except OSError as e:
        raise ArtifactError(f"cannot read {root}/{rel} to check it: {e.strerror or e}") from None
    finally:
        os.close(fd)


def _depth(obj: Any, limit: int) -> bool:
    """True when ``obj`` (parsed JSON) nests deeper than ``limit`` (checked without recursion)."""
    stack = [(obj, 1)]
    while stack:
        x, d = stack.pop()
        if d > limit:
            return True
        if isinstance(x, dict):
            stack.extend((v, d + 1) for v in x.values())
        elif isinstance(x, list):
            stack.extend((v, d + 1) for v in x)
    return False


def _parse_json(data: bytes, where: Path) -> Any:
    try:
        obj = json.loads(data.decode("utf-8"))
    except RecursionError:
        obj = None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, and integers of over 4300 digits
        raise ArtifactError(f"{where} is corrupt (truncated or edited): {e}") from None
    if obj is None or _depth(obj, MAX_JSON_DEPTH):
        raise ArtifactError(f"{where} nests deeper than {MAX_JSON_DEPTH} levels; it was not written by qcompile")
    return obj


# ---- the manifest -------------------------------------------------------------------------------
def _manifest_checksum(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def read_manifest(path: Path) -> dict[str, Any]:
    """The checked manifest of the artifact at ``path`` (its files are not read)."""
    path = Path(path).expanduser()
    mpath = path / MANIFEST
    if not os.path.lexists(mpath):
        raise ArtifactError(f"{path} is not a qcompile artifact (no {MANIFEST})")
    manifest = _parse_json(_read_file(path, MANIFEST, MAX_MANIFEST_BYTES), mpath)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath} is not a qcompile artifact manifest")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ArtifactError(f"{mpath} has no valid format_version (an integer >= 1): {str(version)[:50]!r}")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has artifact format version {version}, newer than this qcompile ({_version()}) reads "
            f"(<= {FORMAT_VERSION}); upgrade qcompile to load it"
        )
    if manifest.get("checksum") != _manifest_checksum(manifest):
        raise ArtifactError(f"{mpath} does not match its checksum (edited or corrupted); re-create the artifact")
    files = manifest.get("files")
    if not isinstance(files, dict) or TENSORS not in files or len(files) > MAX_FILES:
        raise ArtifactError(f"{mpath} lists no {TENSORS} (or its file list is malformed)")
    for key, digest in files.items():
        check_file_key(key)
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise ArtifactError(f"{mpath} gives {key} a malformed sha256 {str(digest)[:80]!r}")
    for key in ("target", "backend"):
        if not isinstance(manifest.get(key), str) or len(manifest[key]) > 100:
            raise ArtifactError(f"{mpath} has no valid {key!r}")
    return manifest


def _verify_files(path: Path, files: dict[str, str]) -> None:
    for rel, digest in files.items():
        if _hash_file(path, rel) != digest:
            raise ArtifactError(
                f"{path}/{rel} does not match its checksum (truncated or tampered); re-create the artifact"
            )
    for area in AREAS:
        folder = path / area
        if not os.path.lexists(folder):
            continue
        if folder.is_symlink() or not folder.is_dir():
            raise ArtifactError(f"{folder} is not a directory (symlinks are refused)")
        try:
            unlisted = _unlisted(path, area, set(files))
        except OSError as e:
            raise ArtifactError(f"cannot list {folder}: {e.strerror or e}") from None
        if unlisted:
            raise ArtifactError(
                f"{path} holds files its manifest does not list ({', '.join(unlisted[:5])}); they would be read "
                "unverified, so the artifact is refused. Remove them or re-create the artifact"
            )


# ---- loading ------------------------------------------------------------------------------------
def load_artifact(path: str | Path, backend: str | None = None, trust_library: bool | None = None) -> CompiledModule:
    if trust_library not in (None, True, False):
        raise QCompileError(f"trust_library is None, True or False, not {trust_library!r}")
    path = Path(path).expanduser()
    manifest = read_manifest(path)
    files: dict[str, str] = manifest["files"]
    _verify_files(path, files)
    try:
        tensors = load_file(path / TENSORS)
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{path}/{TENSORS} cannot be read: {e}") from None
    try:
        plan = Plan.from_dict(manifest["plan"])
        program = _program_from_json(manifest["program"], tensors)
        report = CompileReport.from_dict(manifest.get("report") or {})
        verify(program, deep=False)
    except ArtifactError as e:
        raise ArtifactError(f"{path}/{MANIFEST}: {e}") from None
    except _SHAPE_ERRORS as e:
        raise ArtifactError(f"{path}/{MANIFEST} is malformed: {type(e).__name__}: {e}") from None
    tokenizer = _load_tokenizer(path) if any(k.startswith(f"{TOKENIZER_DIR}/") for k in files) else None
    chosen = backend or manifest["backend"]
    shipped = chosen == manifest["backend"] and any(k.startswith(f"{BACKEND_DIR}/") for k in files)
    target = _load_target(path, manifest["target"], chosen, plan)
    rebuild = shipped and not _trusted(path, manifest, trust_library)
    if chosen != "torch" and (rebuild or not shipped):  # a backend will lower the loaded graphs
        try:
            _give_inputs_fake_values(path, program)
        except (*_SHAPE_ERRORS, RuntimeError, AssertionError) as e:
            raise ArtifactError(
                f"{path}/{MANIFEST}: its input specs are malformed: {type(e).__name__}: {e}"
            ) from e  # cause kept: --debug shows it
    cm = _module(
        path, program, plan, target, chosen, report, tokenizer, path / BACKEND_DIR if shipped else None, rebuild
    )
    for attempt in range(REBUILD_TRIES if rebuild else 0):
        wrong = _rebuilt_mismatch(path, cm, files)
        if wrong is None:
            break
        if attempt + 1 == REBUILD_TRIES:
            raise ArtifactError(wrong)
        # TVM's code generation can order a few memory operations differently from one build of a graph
        # to the next (its LLVM codegen and shape lowering key some choices on object addresses), so an
        # honest library can differ from one rebuild and match the next; only a byte-identical build loads
        cm = _module(path, program, plan, target, chosen, report, tokenizer, path / BACKEND_DIR, True)
    return cm


def _load_target(path: Path, target: str, backend: str, plan: Plan) -> Any:
    """The target to build or load for: the artifact's, or the host CPU when ``backend="torch"`` runs
    a CUDA artifact's graph. A CUDA artifact on the TVM backend needs a GPU, checked here."""
    from qcompile.codegen.target import CpuTarget, parse_target, target_kind

    kind = target_kind(target)
    if backend == "torch" and kind == "cuda":
        return CpuTarget()
    try:
        parsed = parse_target(target, plan.arch)
    except QCompileError as e:
        raise ArtifactError(f"{path}/{MANIFEST} names a target this qcompile cannot use: {e}") from None
    if kind == "cuda":
        import tvm

        if not tvm.cuda().exist:
            raise ArtifactError(
                f"{path} was compiled for {parsed} (CUDA {getattr(parsed, 'arch', '')}), and this machine has no "
                "CUDA device visible to TVM. Run it on a machine with that GPU, or load it with backend='torch' "
                "to run its graph with torch on this CPU"
            )
    return parsed


def _trusted(path: Path, manifest: dict[str, Any], trust_library: bool | None) -> bool:
    """Whether to load the shipped library (True) or rebuild it (False); see the module docstring."""
    if trust_library is not None:
        return trust_library
    why = signing.check(manifest)
    if why is None:
        return True
    raise ArtifactError(
        f"{path} ships a compiled library ({BACKEND_DIR}/: native code that loading runs), and {why}, so it was "
        "not loaded. If you trust whoever built it, load it with trust_library=True (qcompile run "
        "--trust-library); otherwise with trust_library=False (qcompile run --rebuild-library), which rebuilds "
        "the library from the artifact's graph on this machine and refuses it unless the shipped one is "
        "byte-identical. backend='torch' runs the graph without any library"
    )


def _module(
    path: Path,
    program: Program,
    plan: Plan,
    target: Any,
    backend: str,
    report: CompileReport,
    tokenizer: Any,
    built: Path | None,
    rebuild: bool,
) -> CompiledModule:
    from qcompile.runtime.compiled import CompiledModule

    try:
        return CompiledModule(
            program,
            plan,
            target=target,
            backend=backend,
            report=report,
            tokenizer=tokenizer,
            artifact=None if rebuild else built,
        )
    except ArtifactError:
        raise
    except (QCompileError, *_SHAPE_ERRORS, RuntimeError, AssertionError) as e:  # a graph that does not build
        doing = "rebuild the library of" if rebuild else "build"
        raise ArtifactError(
            f"cannot {doing} {path} with backend {backend!r}: {type(e).__name__}: {e}"
        ) from e  # cause kept: --debug shows it


def _rebuilt_mismatch(path: Path, cm: CompiledModule, files: dict[str, str]) -> str | None:
    """Why the library ``cm`` rebuilt differs from the one shipped (None: byte-identical)."""
    rebuilt = {f"{BACKEND_DIR}/{name}": digest for name, digest in cm._backend.library_digests().items()}
    shipped_code = {k for k in files if k in rebuilt or k.endswith((".so", ".dll", ".dylib", ".fatbin"))}
    for rel in sorted(shipped_code | set(rebuilt)):
        if files.get(rel) != rebuilt.get(rel):
            shipped, built = (str(d)[:12] + "..." if d else "none" for d in (files.get(rel), rebuilt.get(rel)))
            return (
                f"{path}/{rel} differs from the library this machine builds from the artifact's graph (sha256 "
                f"{shipped} shipped, {built} rebuilt, {REBUILD_TRIES} builds): it was built with "
                "another compiler, TVM, CPU or kernel choice, or altered. It was not loaded. If you trust whoever "
                "built it, load it with trust_library=True; backend='torch' runs the graph without a library"
            )
    return None


def _load_tokenizer(path: Path) -> Any:
    """The tokenizer in ``tokenizer/`` (every file listed and checked), without remote code, and only
    if its config names no files of its own (transformers would open those wherever they point)."""
    from transformers import AutoTokenizer

    config_key = f"{TOKENIZER_DIR}/tokenizer_config.json"
    if os.path.lexists(path / config_key):
        config = _parse_json(_read_file(path, config_key, MAX_MANIFEST_BYTES), path / config_key)
        named = (
            [k for k in config if k.endswith(("_file", "_files")) or k == "auto_map"]
            if isinstance(config, dict)
            else []
        )
        if named:
            raise ArtifactError(
                f"{path}/{config_key} names files or code to load ({', '.join(named[:5])}); an artifact's tokenizer "
                "is read from its own listed files only"
            )
    try:
        return AutoTokenizer.from_pretrained(str(path / TOKENIZER_DIR), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds on a bad tokenizer folder
        raise ArtifactError(
            f"{path}/{TOKENIZER_DIR} cannot be loaded as a tokenizer: {type(e).__name__}: {e}"
        ) from e  # cause kept: --debug shows it


# ---- the Program ---------------------------------------------------------------------------------
def check_out_spec(spec: Any, where: str) -> None:
    """An entry's output structure (torch's pytree JSON) may hold only tuples, lists and dicts with
    plain keys: deserializing other registered types can import modules named in the data."""
    try:
        protocol, tree = json.loads(spec)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{where}: malformed output spec: {e}") from None
    if protocol != 1:
        raise ArtifactError(f"{where}: output spec protocol {str(protocol)[:20]!r} is not 1")
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH or not isinstance(node, dict) or set(node) != {"type", "context", "children_spec"}:
            raise ArtifactError(f"{where}: malformed output spec")
        if node["type"] is not None:
            if node["type"] not in _TREE_TYPES:
                raise ArtifactError(
                    f"{where}: the output is a {str(node['type'])[:100]!r}; artifacts hold outputs made of tensors, "
                    "tuples, lists and dicts only"
                )
            try:
                context = json.loads(node["context"]) if isinstance(node["context"], str) else node["context"]
            except ValueError:
                raise ArtifactError(f"{where}: malformed output spec context") from None
            if context is not None and not (
                isinstance(context, list) and all(isinstance(k, (str, int)) for k in context)
            ):
                raise ArtifactError(f"{where}: output dict keys must be strings or integers")
        if not isinstance(node["children_spec"], list):
            raise ArtifactError(f"{where}: malformed output spec")
        stack.extend((c, depth + 1) for c in node["children_spec"])


def _give_inputs_fake_values(path: Path, program: Program) -> None:
    """Give every entry's user-input placeholders the fake value (shape, dtype) capture gave them, so
    a backend can lower a loaded graph (lowering propagates the rest). A dynamic dimension becomes a
    size symbol of the saved name and range, shared by the inputs that name it, as at capture, so a
    rebuild produces the same library as the original build.

    torch has no public call that makes a size symbol with a given name: this fills the fields of the
    ShapeEnv that ``ShapeEnv.create_symbol`` fills (torch 2.13)."""
    import sympy
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv, ValueRangesSLoc
    from torch.utils._sympy.value_ranges import ValueRanges

    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env)
    symbols: dict[str, Any] = {}
    for entry in program.entries.values():
        users = [node for node, slot in entry.bindings().items() if slot.kind is SlotKind.USER]
        for node, spec, example in zip(users, entry.user_inputs, entry.examples):
            where = f"{path}/{MANIFEST}: entry {entry.name!r} input {node.name!r}"
            if example.dim() != len(spec.shape) or str(example.dtype).removeprefix("torch.") != spec.dtype:
                raise ArtifactError(f"{where}: its example does not match its spec {spec.describe()}")
            sizes: list[Any] = []
            for dim, hint in zip(spec.shape, example.shape):
                rng = entry.dims.get(dim) if isinstance(dim, str) else None
                if isinstance(dim, int) or rng is None or not 1 <= rng.min <= int(hint) <= rng.max:
                    if dim != int(hint):
                        raise ArtifactError(f"{where}: its example does not match its spec {spec.describe()}")
                    sizes.append(int(hint))
                    continue
                if dim not in symbols:
                    sym = sympy.Symbol(dim, integer=True, positive=True)
                    env.backed_var_to_val[sym] = sympy.Integer(int(hint))
                    env.var_to_range[sym] = ValueRanges(rng.min, rng.max)
                    sloc = env._get_sloc("qcompile artifact")
                    env.var_to_range_sloc[sym] = ValueRangesSLoc(sloc, sloc)
                    env.var_to_sources[sym] = []
                    symbols[dim] = env.create_symintnode(sym, hint=int(hint))
                sizes.append(symbols[dim])
            with mode:
                node.meta["val"] = torch.empty(sizes, dtype=example.dtype)


def _dtype(value: Any, where: str) -> str:
    if not isinstance(value, str) or value not in _DTYPES:
        raise ArtifactError(f"{where}: unknown dtype {str(value)[:50]!r}")
    return value


def _cache_specs(specs: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The cache specs, bounded (loading allocates them): :data:`MAX_CACHE_ELEMENTS` in all."""
    out, total = {}, 0
    for name, (shape, dt) in specs.items():
        dims = tuple(_dim(d, int) for d in shape)
        numel = 1
        for d in dims:
            numel *= d
        total += numel
        if total > MAX_CACHE_ELEMENTS:
            raise ArtifactError(f"its caches hold more than {MAX_CACHE_ELEMENTS} elements (at cache {name!r})")
        out[str(name)] = (dims, _dtype(dt, f"cache {name!r}"))
    return out


def _program_from_json(data: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Program:
    state = {}
    for k in data["state_keys"]:
        if f"state/{k}" not in tensors:
            raise ArtifactError(f"tensor {k!r} is missing from {TENSORS}")
        state[k] = tensors[f"state/{k}"]
    entries = {}
    for name, e in data["entries"].items():
        examples = []
        for i in range(int(e["examples"])):
            if f"example/{name}/{i}" not in tensors:
                raise ArtifactError(f"example input {i} of entry {name!r} is missing from {TENSORS}")
            examples.append(tensors[f"example/{name}/{i}"])
        check_out_spec(e["out_spec"], f"entry {name!r}")
        pytree.treespec_loads(e["out_spec"])
        entries[name] = Entry(
            name=name,
            graph=graph_from_json(e["graph"]),
            slots=[Slot(SlotKind(kind), str(n)) for kind, n in e["slots"]],
            user_inputs=[
                TensorSpec(tuple(_dim(d) for d in u["shape"]), _dtype(u["dtype"], f"entry {name!r}"))
                for u in e["user_inputs"]
            ],
            examples=examples,
            dims={str(k): DimRange(int(a), int(b)) for k, (a, b) in e["dims"].items()},
            out_spec=str(e["out_spec"]),
        )
    cache_specs = _cache_specs(data["cache_specs"])
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


def _dim(d: Any, kinds: type | tuple[type, ...] = (int, str)) -> Any:
    """A dimension: an int in [0, 2**31) or (where ``kinds`` allows) the name of a dynamic one."""
    if isinstance(d, kinds) and not isinstance(d, bool) and (isinstance(d, str) or 0 <= d < 2**31):
        return d
    raise ValueError(f"bad dimension {str(d)[:50]!r}")


def _bits(value: Any, key: str) -> int:
    from qcompile.quant.spec import check_bits

    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"bit width of {key!r} must be an integer, got {value!r}")
    check_bits(value, f"bit width of {key!r}")
    return value
