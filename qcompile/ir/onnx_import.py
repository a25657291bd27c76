"""ONNX in: an ``.onnx`` file → ``nn.Module`` (onnx2torch) → :class:`Program` (torch.export).

The translation from ONNX operators to torch is onnx2torch's (a maintained converter with a
registry of per-op converters), not qcompile's: this module checks the file, asks onnx2torch for
a module, and captures it with ``torch.export`` like any other model, so every pass and both
backends see the same ATen graph they see for a PyTorch model.

What the file may be (it comes from people we do not know):

* a protobuf that does not parse (truncated, not ONNX) is a :class:`CaptureError` naming the file;
  so is one that ``onnx.checker`` rejects;
* external data is read only from files inside the model's folder (no absolute path, no ``..``,
  no link out of it), only within the file's size, and a ``checksum`` (SHA-1, as ONNX specifies)
  recorded for a tensor must match its bytes; ``sha256=`` checks the whole ``.onnx`` file;
* an operator onnx2torch has no converter for is a :class:`CaptureError` naming the op type, the
  node and the opset, listed for the whole graph before anything is converted; so are converter
  settings that torch cannot compute the same way (a Resize ``nearest_mode`` other than floor, ...).

Dynamic dimensions named in the graph's inputs (``dim_param``) stay dynamic: they are captured
with ``Dim.AUTO`` (torch.export derives the constraints the graph implies and names the symbols
itself; ``Program.meta["onnx"]["inputs"]`` keeps the ONNX names and shapes, ``["specialized"]``
lists any dim the graph fixed) and size-obliviously (an example size of 1 does not by itself fix a
dim to 1), with the minimum raised to 1. Example inputs may be given; otherwise a dynamic
dimension takes the value :data:`DEFAULT_DYNAMIC_SIZE` (a multiple of 32, so strided CNNs such as
detectors accept it), the first dimension 2 (a batch of 1 can still be specialized by an op that
guards on it, as the matmul decomposition in PP-OCRv5's recognizer does).

onnx2torch declares torchvision but needs it only for ``NonMaxSuppression`` and ``RoiAlign``;
PyPI's torchvision is a CUDA build that fails to import beside the CPU torch this project pins,
so it is not installed: those two ops are refused by name when torchvision cannot be imported.

The converters qcompile replaces in onnx2torch's registry, and why, are in
:mod:`qcompile.ir.onnx_converters` (shape arithmetic kept symbolic, constant operands baked in).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import logging
import os
import sys
import types
from pathlib import Path
from typing import Any

import torch

from qcompile.errors import CaptureError

log = logging.getLogger(__name__)

DEFAULT_DYNAMIC_SIZE = 64
DEFAULT_BATCH = 2
NEEDS_TORCHVISION = ("NonMaxSuppression", "RoiAlign")


# ---------------------------------------------------------------------------------------------
# reading the file


def read_onnx(path: str | os.PathLike[str], *, sha256: str | None = None) -> Any:
    """The ``onnx.ModelProto`` in ``path`` with its external data loaded, after the checks above."""
    import onnx
    from google.protobuf.message import DecodeError

    p = Path(path)
    if not p.exists():
        raise CaptureError(f"ONNX file {p} does not exist")
    if not p.is_file():
        raise CaptureError(f"ONNX file {p} is not a regular file")
    if sha256 is not None:
        got = hashlib.sha256(p.read_bytes()).hexdigest()
        if got != sha256.lower():
            raise CaptureError(f"ONNX file {p} has sha256 {got}, expected {sha256}: the file is not the one named")
    try:
        model = onnx.load_model(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise CaptureError(
            f"{p} is not a readable ONNX model (truncated or not an ONNX protobuf): {type(e).__name__}: {e}"
        ) from e
    if not model.graph.node or not model.graph.output:
        raise CaptureError(f"{p} holds no graph (no nodes or no outputs): truncated or not an ONNX model")
    _load_external_data(model, p)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0][:400]
        raise CaptureError(f"{p} fails onnx.checker: {first}") from e
    return model


def _load_external_data(model: Any, path: Path) -> None:
    """Check every external tensor's location, range and checksum, then load the bytes."""
    from onnx.external_data_helper import uses_external_data

    base = path.parent.resolve()
    for t in _all_tensors(model):
        if not uses_external_data(t):
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        where = f"{path}: tensor {t.name!r} stores its data in external file {loc!r}"
        if not loc or os.path.isabs(loc) or ".." in Path(loc).parts:
            raise CaptureError(f"{where}, which is not a plain path inside the model's folder")
        file = (base / loc).resolve()
        if not file.is_relative_to(base):
            raise CaptureError(f"{where}, which resolves outside the model's folder ({file})")
        if not file.is_file():
            raise CaptureError(f"{where}, which does not exist beside the model (looked for {file})")
        size = file.stat().st_size
        try:
            offset = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else size - offset
        except ValueError as e:
            raise CaptureError(f"{where}: offset/length are not integers ({e})") from e
        if offset < 0 or length < 0 or offset + length > size:
            raise CaptureError(f"{where}: bytes [{offset}, {offset + length}) lie outside the file ({size} bytes)")
        with open(file, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        if "checksum" in info and hashlib.sha1(data).hexdigest() != info["checksum"].lower():
            raise CaptureError(f"{where}: its bytes do not match the recorded checksum {info['checksum']}")
        t.raw_data = data
        del t.external_data[:]
        t.data_location = t.DEFAULT


def _all_tensors(model: Any) -> list[Any]:
    from onnx.external_data_helper import _get_all_tensors

    return list(_get_all_tensors(model))


# ---------------------------------------------------------------------------------------------
# onnx2torch, with its converter registry extended


def _onnx2torch() -> types.ModuleType:
    """onnx2torch, imported once, with qcompile's converters registered."""
    if "onnx2torch" in sys.modules and getattr(sys.modules["onnx2torch"], "_qcompile_ready", False):
        return sys.modules["onnx2torch"]
    try:
        importlib.import_module("torchvision.ops")
        placeholders: list[str] = []
    except Exception:  # no usable torchvision (see the module docstring)
        placeholders = _torchvision_placeholders()
    try:
        o2t = importlib.import_module("onnx2torch")
    except ImportError as e:
        raise CaptureError(f"ONNX import needs onnx2torch: pip install --no-deps onnx2torch==1.5.15 ({e})") from e
    finally:
        for name in placeholders:  # onnx2torch's nms/roialign modules keep theirs; nothing else sees them
            sys.modules.pop(name, None)
    from qcompile.ir.onnx_converters import register

    register()
    o2t._qcompile_ready = True  # type: ignore[attr-defined]
    o2t._qcompile_has_torchvision = not placeholders  # type: ignore[attr-defined]
    return o2t


def _torchvision_placeholders() -> list[str]:
    def refuse(*_a: Any, **_k: Any) -> Any:
        raise CaptureError(f"{'/'.join(NEEDS_TORCHVISION)} need torchvision, which is not installed")

    tv, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
    for fn in ("nms", "roi_align", "box_convert"):
        setattr(ops, fn, refuse)
    tv.ops = ops  # type: ignore[attr-defined]
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, ops
    return ["torchvision", "torchvision.ops"]


def unsupported_nodes(model: Any) -> list[str]:
    """``op_type (node 'name', opset N)`` for every node onnx2torch cannot convert here."""
    o2t = _onnx2torch()
    from onnx2torch.node_converters.registry import get_converter

    opsets = {o.domain or "": o.version for o in model.opset_import}
    bad = []
    for node in model.graph.node:
        domain = node.domain or ""
        version = opsets.get("ai.onnx" if domain == "ai.onnx" else domain, opsets.get("", 0))
        label = f"{(domain + '::') if domain else ''}{node.op_type} (node {node.name!r}, opset {version})"
        if node.op_type in NEEDS_TORCHVISION and not domain and not o2t._qcompile_has_torchvision:
            bad.append(label + ": needs torchvision")
            continue
        try:
            get_converter(node.op_type, version, domain)
        except NotImplementedError:
            bad.append(label)
    return bad


def constants_as_initializers(model: Any) -> Any:
    """A copy of ``model`` whose ``Constant`` nodes (tensor, float(s) or int(s) values) are initializers:
    onnx2torch's converters look weights up among the initializers only (PP-OCRv5's cls model feeds
    its convolutions from Constant nodes)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = []
    for node in out.graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(attrs) != 1:
            keep.append(node)
            continue
        ((key, attr),) = attrs.items()
        value = onnx.helper.get_attribute_value(attr)
        if key == "value":
            tensor = value
        elif key in ("value_float", "value_floats"):
            tensor = numpy_helper.from_array(np.asarray(value, dtype=np.float32))
        elif key in ("value_int", "value_ints"):
            tensor = numpy_helper.from_array(np.asarray(value, dtype=np.int64))
        else:  # sparse or string constants stay nodes
            keep.append(node)
            continue
        tensor.name = node.output[0]
        out.graph.initializer.append(tensor)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    return out


def onnx_to_module(model: Any, where: str = "<model>") -> torch.fx.GraphModule:
    """The model as an ``fx.GraphModule`` (onnx2torch), in eval mode; CaptureError on what it cannot convert."""
    o2t = _onnx2torch()
    model = constants_as_initializers(model)
    from qcompile.ir.onnx_converters import SHAPE_OPS, shape_value_users

    bad = unsupported_nodes(model)
    bad += [
        f"{u}: consumes a shape value (shape arithmetic is followed through {', '.join(SHAPE_OPS)})"
        for u in shape_value_users(model)
    ]
    if bad:
        raise CaptureError(
            f"{where}: {len(bad)} ONNX node(s) have no converter to torch: "
            + "; ".join(bad[:20])
            + (" ..." if len(bad) > 20 else "")
        )
    try:
        gm = o2t.convert(model)
    except (NotImplementedError, KeyError, ValueError, RuntimeError) as e:
        raise CaptureError(f"{where}: onnx2torch could not convert the graph: {type(e).__name__}: {e}") from e
    return gm.eval()


# ---------------------------------------------------------------------------------------------
# inputs and capture


def input_signature(model: Any) -> list[dict[str, Any]]:
    """The graph inputs (initializers excluded): name, element type, shape (ints and dim names)."""
    import onnx

    inits = {i.name for i in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
            raise CaptureError(f"ONNX input {vi.name!r} is not a tensor of known rank")
        shape: list[int | str] = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(int(d.dim_value))
            else:
                shape.append(d.dim_param if d.dim_param else f"{vi.name}_dim{i}")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        out.append({"name": vi.name, "dtype": str(dtype), "shape": shape})
    return out


def default_examples(signature: list[dict[str, Any]]) -> tuple[torch.Tensor, ...]:
    """Example inputs: static dims as given, a dynamic dim :data:`DEFAULT_DYNAMIC_SIZE` (the first
    dim :data:`DEFAULT_BATCH`); floats uniform in [0, 1), integers zero."""
    import numpy as np

    gen = torch.Generator().manual_seed(0)
    xs = []
    for s in signature:
        shape = [
            d if isinstance(d, int) else (DEFAULT_BATCH if i == 0 else DEFAULT_DYNAMIC_SIZE)
            for i, d in enumerate(s["shape"])
        ]
        dtype = torch.from_numpy(np.zeros(0, dtype=s["dtype"])).dtype
        x = torch.rand(shape, generator=gen).to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
        xs.append(x)
    return tuple(xs)


def dynamic_shapes_of(signature: list[dict[str, Any]]) -> tuple[dict[int, Any], ...]:
    """torch.export dynamic shapes: ``Dim.AUTO`` at every dim the ONNX graph leaves open, so torch.export
    derives the constraints the graph implies (a detector's height a multiple of 32, two inputs' equal
    dims) instead of refusing a free ``Dim``; :func:`capture_onnx` then checks that each stayed dynamic."""
    from torch.export import Dim

    return tuple({i: Dim.AUTO for i, d in enumerate(s["shape"]) if isinstance(d, str)} for s in signature)


def capture_onnx(
    path: str | os.PathLike[str],
    example_inputs: Any = None,
    *,
    sha256: str | None = None,
    dynamic: bool = True,
) -> Any:
    """Capture the ONNX model in ``path`` into a Program (one ``forward`` entry).

    ``example_inputs`` (a tensor or tuple of tensors, one per graph input) fix the example values;
    the dims the graph names stay dynamic unless ``dynamic=False``.
    """
    from qcompile.ir.capture import capture

    model = read_onnx(path, sha256=sha256)
    sig = input_signature(model)
    module = onnx_to_module(model, str(path))
    if example_inputs is None:
        examples = default_examples(sig)
    else:
        examples = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        if len(examples) != len(sig):
            raise CaptureError(
                f"{path} has {len(sig)} inputs ({[s['name'] for s in sig]}), got {len(examples)} examples"
            )
        for x, s in zip(examples, sig):
            want = s["shape"]
            if (
                not isinstance(x, torch.Tensor)
                or x.dim() != len(want)
                or any(isinstance(d, int) and d != n for d, n in zip(want, x.shape))
            ):
                got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise CaptureError(f"example for ONNX input {s['name']!r} must have shape {want}, got {got}")
    shapes = dynamic_shapes_of(sig) if dynamic and any(isinstance(d, str) for s in sig for d in s["shape"]) else None
    import torch.fx.experimental._config as fx_config

    # size-oblivious: an example dim of 1 (one image, one crop) does not fix that dim to 1
    with fx_config.patch(backed_size_oblivious=True):
        program = capture(module, examples, dynamic_shapes=shapes)
    entry = program.entries["forward"]
    for name, rng in list(entry.dims.items()):  # size-oblivious capture allows 0; an empty batch or image is refused
        if rng.min < 1:
            entry.dims[name] = dataclasses.replace(rng, min=1)
    specialized = [
        f"{s['name']}[{i}] ({d!r}) = {spec.shape[i]}"
        for s, spec in zip(sig, entry.user_inputs)
        for i, d in enumerate(s["shape"])
        if isinstance(d, str) and not isinstance(spec.shape[i], str)
    ]
    if specialized and shapes is not None:
        log.warning("%s: the graph fixes these dims the ONNX file names as dynamic: %s", path, specialized)
    opsets = {o.domain or "ai.onnx": int(o.version) for o in model.opset_import}
    program.meta.update(
        kind="onnx",
        model_class=Path(path).name,
        onnx={
            "file": Path(path).name,
            "inputs": sig,
            "outputs": [o.name for o in model.graph.output],
            "opsets": opsets,
            "producer": model.producer_name,
            "nodes": len(model.graph.node),
            "specialized": specialized,
        },
    )
    return program


def is_onnx_path(model: Any) -> bool:
    """A str/Path naming an ``.onnx`` file (what ``compile`` and the CLI treat as an ONNX model)."""
    return isinstance(model, str | os.PathLike) and str(model).lower().endswith(".onnx")


__all__ = [
    "capture_onnx",
    "read_onnx",
    "onnx_to_module",
    "unsupported_nodes",
    "input_signature",
    "default_examples",
    "dynamic_shapes_of",
    "is_onnx_path",
]
