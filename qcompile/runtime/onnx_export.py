"""ONNX export of a compiled module: ``CompiledModule.export_onnx(path, format=...)``.

Built on torch's own exporter: each entry's ATen graph is wrapped in a module that binds its state
tensors as buffers, re-captured with ``torch.export`` and handed to ``torch.onnx.export(...,
dynamo=True)`` with a ``custom_translation_table`` that maps every ``qcompile::`` op to an
onnxscript function (opset 21). Those functions read the weight tensors they were given (by the name
of the initializer the exporter bound them to) and emit ONNX constants in the layout each form needs.

**Formats** (:class:`OnnxFormat`):

* ``qdq``: standard ONNX only, for any runtime. Weights are ``DequantizeLinear`` of their integer
  codes (int8 per output channel; int4/uint4 codes blocked along K with opset 21 ``block_size``; 5-8
  bit codes as int8/uint8, so W6 codes are held one per byte); a float offset (asymmetric groups) is
  added to the dequantized weight; dynamic activations are a ``QuantizeLinear``/``DequantizeLinear``
  pair per token (``axis=0``) or per token group (``block_size``) whose scale is computed in the graph.
* ``ort``: onnxruntime's contrib ops where they compute the same numbers. Weight-only linears become
  ``com.microsoft.MatMulNBits`` (2-, 4- or 8-bit containers: 3-bit codes ride in 4 bits; symmetric
  codes are shifted by the default zero point ``2^(bits-1)``, asymmetric offsets become float zero
  points ``-offset/scale``; per-channel scales are repeated over blocks of 32). Linears with dynamic
  integer activations are ``MatMulInteger`` on int8 codes (exact int32, batched over K groups for
  grouped scales) followed by the same fp32 rescale the reference does. The activation quantization
  is spelled out (``ReduceMax(|x|)/qmax``, ``Div``, ``Round``, ``Clip``, ``Cast``): qcompile quantizes
  per token (or token group) symmetrically, and onnxruntime's ``DynamicQuantizeLinear`` /
  ``DynamicQuantizeMatMul`` quantize per tensor asymmetrically to uint8 (different numbers), while
  ``MatMulIntegerToFloat`` takes per-column, not per-row, activation scales. A weight-only linear
  that MatMulNBits cannot hold (a group size that is not a power of two >= 16, an asymmetric 8-bit
  grid) keeps the ``qdq`` form; :attr:`OnnxExport.notes` lists them. A plan's ``float_compute: bf16``
  (bf16-rounded activations in the TVM CPU kernels) is not exported: the graph's weight-only linears
  take fp32 activations, and a note says so.

Both formats round half to even (ONNX ``Round`` and ``QuantizeLinear``, like ``torch.round``) and
compute scales with the reference's formula (``absmax / qmax``, 1 for an all-zero row). Codes from
calibrated steps (``quantize_static``, ``linear_static``, ``quant_conv2d`` with a calibrated scale) are
clamped to ``±qmax`` as the reference does (``Clip`` after ``Round``, or after ``QuantizeLinear`` in the
``qdq`` convolution, whose int8 saturation alone would allow -128); dynamic codes need no clamp, as
``|x| / (absmax / qmax)`` rounds to at most ``qmax``. What differs from the reference kernels: fp32
summation order (float matmuls over dequantized values; ``MatMulInteger`` and ``ConvInteger`` products
are exact), and ``quant_conv2d``'s NaN propagation (the reference makes a sample holding NaN/Inf all
NaN; the export does not add that term).

**Causal LMs**: the default entry is ``prefill`` (dynamic number of new tokens, so the same model
serves decode with one token). Its static KV cache becomes explicit graph inputs and outputs,
functionalized: inputs ``input_ids int64[1, T]``, ``cache_position int64[T]`` (the cache rows the T
tokens go to, as qcompile's entries take them), ``past_key_values.{i}.key`` / ``.value`` and outputs
``logits float[1, T, vocab]``, ``present.{i}.key`` / ``.value``, every cache tensor
``float[1, kv_heads, max_cache_len, head_dim]``: onnxruntime-genai's names with its static
("past_present_share_buffer") layout. ``present`` is ``past`` with rows ``cache_position`` written;
feed it back as ``past`` for the next step, starting from zeros. Cache tensors the graph overwrites
before reading (transformers' per-layer ``cumulative_length`` counters) stay inside the graph.

Ops without an ONNX form (XQuant caches ``qcompile::cache_*``, ``qcompile::winograd_conv2d``) make
the export fail with an :class:`InexpressibleOpError` listing the nodes. The file is written
atomically (a temporary folder beside it, then renamed), checked with
``onnx.checker.check_model(full_check=True)``, and its tensors go to an external data file
``<name>.data`` beside it when ``external_data`` is True or, by default, when they pass 2 GB.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.fx as fx

from qcompile.errors import QCompileError
from qcompile.ir.program import PATH_KEY, Entry, Program, SlotKind

if TYPE_CHECKING:
    from qcompile.runtime.compiled import CompiledModule

log = logging.getLogger(__name__)

OPSET = 21
TWO_GB = 2**31
_KV_NAME = re.compile(r"^(key|value)_cache_(\d+)$")
# qcompile ops with a translation; any other qcompile op cannot be exported
EXPORTABLE_OPS = (
    "linear_w8a8",
    "quant_linear",
    "packed_linear",
    "linear_static",
    "quantize_static",
    "dequantize_static",
    "quant_conv2d",
)


class OnnxFormat(str, enum.Enum):
    QDQ = "qdq"  # standard ONNX QuantizeLinear / DequantizeLinear
    ORT = "ort"  # onnxruntime contrib ops (com.microsoft) where they compute the same numbers


class OnnxExportError(QCompileError):
    """An ONNX export cannot be done (bad path, format or entry; torch's exporter failed; the
    result failed the ONNX checker)."""


class InexpressibleOpError(OnnxExportError):
    """The entry holds qcompile ops that have no ONNX form; the message lists the nodes."""


@dataclass(frozen=True)
class CacheTensor:
    """One cache tensor that crosses the graph boundary."""

    key: str  # the Program's cache key (key_cache_0)
    input: str  # past_key_values.0.key
    output: str  # present.0.key
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote."""

    path: Path
    data_path: Path | None  # the external data file, when the tensors were written beside the model
    entry: str
    format: OnnxFormat
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    cache: tuple[CacheTensor, ...]
    notes: tuple[str, ...]  # layers that kept a standard form in the ort format, and why


# ---- entry point -----------------------------------------------------------------------------------
def parse_format(fmt: OnnxFormat | str) -> OnnxFormat:
    try:
        return OnnxFormat(fmt)
    except ValueError:
        allowed = ", ".join(f.value for f in OnnxFormat)
        raise OnnxExportError(f"unknown ONNX export format {fmt!r}; formats: {allowed}") from None


def check_output_path(path: str | Path) -> Path:
    """The absolute output path; OnnxExportError when it is a directory or its folder is missing."""
    p = Path(os.path.abspath(Path(path).expanduser()))
    if p.is_dir():
        raise OnnxExportError(f"cannot write the ONNX model to {p}: it is a directory; name a file such as {p}.onnx")
    if not p.parent.is_dir():
        raise OnnxExportError(f"cannot write the ONNX model to {p}: folder {p.parent} does not exist")
    return p


def export_onnx(
    cm: CompiledModule,
    path: str | Path,
    format: OnnxFormat | str = OnnxFormat.QDQ,
    *,
    entry: str | None = None,
    external_data: bool | None = None,
) -> OnnxExport:
    """Export entry ``entry`` of ``cm`` (default: ``prefill`` for a causal LM, else ``forward``) to
    ``path`` in ``format`` (see the module docstring); returns what was written."""
    from qcompile.fileio import output_lock

    fmt = parse_format(format)
    out = check_output_path(path)
    program = cm.program
    name = entry if entry is not None else ("prefill" if "prefill" in program.entries else "forward")
    if name not in program.entries:
        raise OnnxExportError(f"this module has no entry {name!r}; entries: {list(program.entries)}")
    ent = program.entries[name]
    check_expressible(ent)
    module, args, dynamic, inputs, outputs, cache = _wrap(program, ent)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            ep = torch.export.export(module, args, dynamic_shapes={"args": dynamic}, strict=False)
        except Exception as e:  # torch.export raises many exception types
            raise OnnxExportError(f"torch.export could not re-capture entry {name!r} for ONNX: {_first(e)}") from e
        tr = _Translator(program, _constants(ep, module.state_keys), fmt)
        try:
            onnx_program = torch.onnx.export(
                ep,
                args,
                dynamo=True,
                opset_version=OPSET,
                custom_translation_table=tr.table(),
                input_names=list(inputs),
                output_names=list(outputs),
                verbose=False,
                report=False,
            )
        except OnnxExportError:
            raise
        except Exception as e:  # the exporter wraps translation errors in its own types
            inner = _qcompile_cause(e)
            if inner is not None:
                node = re.search(r"Error when translating node %(\S+)", _messages(e))
                where = f" (node {node.group(1)} of entry {name!r})" if node else f" (entry {name!r})"
                raise type(inner)(f"{inner}{where}") from e
            raise OnnxExportError(f"torch.onnx.export failed on entry {name!r}: {_first(e)}") from e
    if onnx_program is None:  # pragma: no cover - dynamo=True always returns one
        raise OnnxExportError("torch.onnx.export returned no program")
    with output_lock(out):
        data = _write(onnx_program, out, external_data)
    log.info("wrote %s (entry %s, format %s)", out, name, fmt.value)
    notes = set(tr.notes)
    fc = cm.plan.float_compute.value
    if fc != "fp32":  # a kernel choice of the TVM CPU backend, not an op of the graph
        notes.add(f"float_compute {fc} is not in the ONNX graph: its weight-only linears take fp32 activations")
    return OnnxExport(out, data, name, fmt, tuple(inputs), tuple(outputs), tuple(cache), tuple(sorted(notes)))


def check_expressible(entry: Entry) -> None:
    """InexpressibleOpError listing the qcompile ops of ``entry`` that have no ONNX form."""
    bad = []
    for node in entry.graph.graph.nodes:
        t = node.target
        if node.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t.namespace == "qcompile":
            op = t._schema.name.split("::")[-1]
            if op not in EXPORTABLE_OPS:
                bad.append(f"{node.name} (qcompile::{op} at {node.meta.get(PATH_KEY) or '<root>'})")
    if bad:
        shown = "; ".join(bad[:12]) + (f"; and {len(bad) - 12} more" if len(bad) > 12 else "")
        raise InexpressibleOpError(
            f"entry {entry.name!r} cannot be exported to ONNX: {len(bad)} node(s) use qcompile ops without an ONNX "
            f"form: {shown}. Exportable qcompile ops: {', '.join(EXPORTABLE_OPS)}; compile with a plan without "
            "XQuant caches or Winograd convolutions to export"
        )


def _first(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:400]}"


def _messages(e: BaseException | None) -> str:
    """The messages of ``e`` and the exceptions it was raised from."""
    out = []
    while e is not None and len(out) < 20:
        out.append(str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(out)


def _qcompile_cause(e: BaseException | None) -> QCompileError | None:
    seen = 0
    while e is not None and seen < 20:
        if isinstance(e, QCompileError):
            return e
        e = e.__cause__ or e.__context__
        seen += 1
    return None


# ---- the module torch.export re-captures -------------------------------------------------------------
class _EntryModule(torch.nn.Module):
    """Runs an entry's graph with its state as buffers, its K/V caches as inputs (cloned, so the graph's
    in-place writes become functional) returned after the call, and scratch caches made inside."""

    def __init__(self, program: Program, entry: Entry, kv: dict[int, int], scratch: dict[int, tuple]) -> None:
        super().__init__()
        self.gm = entry.graph
        self.kinds: list[tuple[str, Any]] = []
        self.state_keys: dict[str, str] = {}  # buffer name -> Program state key
        self.n_user = sum(s.kind is SlotKind.USER for s in entry.slots)
        user = 0
        for i, slot in enumerate(entry.slots):
            if slot.kind is SlotKind.STATE:
                buf = f"s{i}"
                self.register_buffer(buf, program.state[slot.name], persistent=True)
                self.state_keys[buf] = slot.name
                self.kinds.append(("state", buf))
            elif slot.kind is SlotKind.USER:
                self.kinds.append(("user", user))
                user += 1
            elif i in kv:
                self.kinds.append(("kv", kv[i]))
            else:
                self.kinds.append(("scratch", scratch[i]))

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        users, past = args[: self.n_user], args[self.n_user :]
        present = [p.clone() for p in past]
        flat = []
        for kind, what in self.kinds:
            if kind == "state":
                flat.append(getattr(self, what))
            elif kind == "user":
                flat.append(users[what])
            elif kind == "kv":
                flat.append(present[what])
            else:
                shape, dtype = what
                flat.append(torch.zeros(shape, dtype=dtype))
        out = self.gm(*flat)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        return (*outs, *present)


def _wrap(program: Program, entry: Entry) -> tuple[_EntryModule, tuple, tuple, list[str], list[str], list[CacheTensor]]:
    placeholders = entry.placeholders()
    kv: dict[int, int] = {}
    scratch: dict[int, tuple] = {}
    cache: list[CacheTensor] = []
    for i, (slot, node) in enumerate(zip(entry.slots, placeholders)):
        if slot.kind is not SlotKind.CACHE:
            continue
        shape, dt = program.cache_specs[slot.name]
        m = _KV_NAME.match(slot.name)
        if m:
            kv[i] = len(cache)
            layer, which = m.group(2), m.group(1)
            cache.append(
                CacheTensor(slot.name, f"past_key_values.{layer}.{which}", f"present.{layer}.{which}", shape, dt)
            )
        elif _overwritten_first(node):
            scratch[i] = (tuple(shape), getattr(torch, dt))
        else:
            raise OnnxExportError(
                f"entry {entry.name!r}: cache tensor {slot.name!r} is neither a K/V cache (key_cache_<i> / "
                "value_cache_<i>) nor overwritten before it is read, so it has no place in the ONNX past/present layout"
            )
    module = _EntryModule(program, entry, kv, scratch)
    users = [s.name for s in entry.slots if s.kind is SlotKind.USER]
    dims = {d: torch.export.Dim(_dim_name(d), min=max(r.min, 1), max=r.max) for d, r in entry.dims.items()}
    examples = [t.clone() for t in entry.examples]
    past = [torch.zeros(c.shape, dtype=getattr(torch, c.dtype)) for c in cache]
    dynamic: list[dict[int, Any] | None] = []
    for spec in entry.user_inputs:
        axes = {a: dims[d] for a, d in enumerate(spec.shape) if isinstance(d, str)}
        dynamic.append(axes or None)
    dynamic += [None] * len(past)
    n_out = len(_graph_outputs(entry))
    if program.kind == "causal_lm" and n_out == 1:
        out_names = ["logits"]
    else:
        out_names = ["output"] if n_out == 1 else [f"output_{k}" for k in range(n_out)]
    inputs = users + [c.input for c in cache]
    outputs = out_names + [c.output for c in cache]
    return module, (*examples, *past), tuple(dynamic), inputs, outputs, cache


def _dim_name(d: str) -> str:
    return re.sub(r"\W", "_", d) if re.match(r"^[A-Za-z_]", d) else f"d_{d}"


def _graph_outputs(entry: Entry) -> list[Any]:
    out = next(n for n in entry.graph.graph.nodes if n.op == "output")
    val = out.args[0]
    return list(val) if isinstance(val, (tuple, list)) else [val]


def _overwritten_first(node: fx.Node) -> bool:
    """The first op that touches placeholder ``node`` overwrites it whole (``aten.copy_`` into it)."""
    if not node.users:
        return True
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    first = min(node.users, key=lambda u: order[u])
    return first.target is torch.ops.aten.copy_.default and first.args[0] is node


def _constants(ep: torch.export.ExportedProgram, keys: dict[str, str]) -> dict[str, tuple[torch.Tensor, str]]:
    """Placeholder name (what the ONNX initializer is called) -> (tensor, Program state key)."""
    out = {}
    for spec in ep.graph_signature.input_specs:
        if spec.target is None:
            continue
        t = ep.state_dict.get(spec.target)
        if t is None:
            t = ep.constants.get(spec.target)
        if isinstance(t, torch.Tensor) and spec.target in keys:
            out[spec.arg.name] = (t.detach(), keys[spec.target])
    return out


# ---- writing ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _temp_dir(parent: Path, name: str) -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent))
    try:
        yield tmp
    finally:
        for p in sorted(tmp.rglob("*"), reverse=True):
            p.unlink() if not p.is_dir() else p.rmdir()
        tmp.rmdir()


def _write(onnx_program: Any, out: Path, external_data: bool | None) -> Path | None:
    """Save into a folder beside ``out``, check, then rename into place (the data file first, so the
    model never names a missing file). Returns the data file's path, if any."""
    import onnx

    size = sum(v.const_value.nbytes for v in onnx_program.model.graph.initializers.values() if v.const_value)
    external = bool(external_data) if external_data is not None else size > TWO_GB
    with _temp_dir(out.parent, out.name) as tmp:
        target = tmp / out.name
        onnx_program.save(target, external_data=external)
        try:
            onnx.checker.check_model(str(target), full_check=True)
        except Exception as e:
            raise OnnxExportError(f"the exported model failed onnx.checker.check_model: {_first(e)}") from e
        extra = [p for p in tmp.iterdir() if p.name != out.name]
        data = None
        for p in extra:
            os.replace(p, out.parent / p.name)
            data = out.parent / p.name
        os.replace(target, out)
    return data


# ---- translations of qcompile ops ---------------------------------------------------------------------
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


@dataclass(frozen=True)
class _Weights:
    """A linear's weight in qcompile's form: integer codes [N, K], scale [N, G], float offset or None."""

    codes: np.ndarray  # int64 values
    scale: np.ndarray  # float32 [N, G]
    offset: np.ndarray | None
    group: int  # input channels per scale (K for per-channel)
    bits: int
    symmetric: bool

    @property
    def n(self) -> int:
        return int(self.codes.shape[0])

    @property
    def k(self) -> int:
        return int(self.codes.shape[1])

    @property
    def groups(self) -> int:
        return int(self.scale.shape[1])


class _Translator:
    """The onnxscript functions of the ``custom_translation_table``, reading weights by initializer name."""

    def __init__(self, program: Program, consts: dict[str, tuple[torch.Tensor, str]], fmt: OnnxFormat) -> None:
        self.program = program
        self.consts = consts
        self.fmt = fmt
        self.notes: set[str] = set()  # a set: the exporter may call a translation more than once per node

    def table(self) -> dict[Any, Callable[..., Any]]:
        q = torch.ops.qcompile
        return {getattr(q, name).default: _function(getattr(self, name)) for name in EXPORTABLE_OPS}

    # -- constants
    def const(self, value: Any, op: str, what: str) -> torch.Tensor:
        name = getattr(value, "name", None)
        t = self.consts.get(name) if name is not None else None
        if t is None:
            raise OnnxExportError(
                f"qcompile::{op}: its {what} ({name or type(value).__name__}) is computed in the graph, not a stored "
                "tensor; the ONNX translation needs the stored codes and scales"
            )
        return t[0]

    def bits_of(self, value: Any, op: str) -> int:
        """The bit width the Program records for the codes bound to ``value``."""
        key = self.consts[value.name][1]
        if key not in self.program.weight_bits:
            raise OnnxExportError(f"qcompile::{op}: the Program records no bit width for weight codes {key!r}")
        return int(self.program.weight_bits[key])

    # -- ops
    def linear_w8a8(self, x, qweight, w_scale, bias=None):  # type: ignore[no-untyped-def]
        codes = _np(self.const(qweight, "linear_w8a8", "weight")).astype(np.int64)
        scale = _np(self.const(w_scale, "linear_w8a8", "weight scale")).astype(np.float32).reshape(-1, 1)
        w = _Weights(codes, scale, None, codes.shape[1], 8, True)
        return self._linear(x, w, bias, act_bits=8, act_group=0, prequantized=False)

    def quant_linear(self, x, codes, scale, offset, bias, group_size, act_bits, act_group):  # type: ignore[no-untyped-def]
        c = self.const(codes, "quant_linear", "weight codes")
        bits = self.bits_of(codes, "quant_linear")
        s = _np(self.const(scale, "quant_linear", "weight scale")).astype(np.float32)
        o = None if offset is None else _np(self.const(offset, "quant_linear", "weight offset")).astype(np.float32)
        k = int(c.shape[1])
        w = _Weights(_np(c).astype(np.int64), s, o, k if s.shape[1] == 1 else int(group_size), bits, o is None)
        return self._linear(x, w, bias, act_bits=int(act_bits), act_group=int(act_group), prequantized=False)

    def packed_linear(self, x, packed, scale, bias, in_features, w_bits, group_size, act_bits, act_group, offset=None):  # type: ignore[no-untyped-def]
        from qcompile.ops.packed import unpack_codes

        p = self.const(packed, "packed_linear", "packed weight codes")
        o = None if offset is None else _np(self.const(offset, "packed_linear", "weight offset")).astype(np.float32)
        codes = _np(unpack_codes(p, int(in_features), int(w_bits), signed=o is None)).astype(np.int64)
        s = _np(self.const(scale, "packed_linear", "weight scale")).astype(np.float32)
        w = _Weights(codes, s, o, codes.shape[1] if s.shape[1] == 1 else int(group_size), int(w_bits), o is None)
        return self._linear(x, w, bias, act_bits=int(act_bits), act_group=int(act_group), prequantized=False)

    def linear_static(self, x, codes, scale, bias, group_size, act_bits):  # type: ignore[no-untyped-def]
        c = self.const(codes, "linear_static", "weight codes")
        bits = self.bits_of(codes, "linear_static")
        s = _np(self.const(scale, "linear_static", "weight scale")).astype(np.float32)
        k = int(c.shape[1])
        s = s.reshape(c.shape[0], -1)
        w = _Weights(_np(c).astype(np.int64), s, None, k if s.shape[1] == 1 else int(group_size), bits, True)
        return self._linear(x, w, bias, act_bits=int(act_bits), act_group=0, prequantized=True)

    def quantize_static(self, x, step, bits):  # type: ignore[no-untyped-def]
        from onnxscript import opset21 as op

        qmax = 2 ** (int(bits) - 1) - 1
        return _clip_codes(op.Round(op.Div(_float(x), step)), qmax)

    def dequantize_static(self, q, step):  # type: ignore[no-untyped-def]
        from onnxscript import opset21 as op

        return op.Mul(op.Cast(q, to=_FLOAT), step)

    def quant_conv2d(self, x, codes, w_scale, x_scale, bias, stride, padding, dilation, groups, act_bits):  # type: ignore[no-untyped-def]
        from onnxscript import opset21 as op

        c = self.const(codes, "quant_conv2d", "weight codes")
        bits = self.bits_of(codes, "quant_conv2d")
        ws = _np(self.const(w_scale, "quant_conv2d", "weight scale")).astype(np.float32)
        cn = _np(c).astype(np.int64)
        o = cn.shape[0]
        attrs = {
            "strides": [int(v) for v in stride],
            "pads": [int(padding[0]), int(padding[1]), int(padding[0]), int(padding[1])],
            "dilations": [int(v) for v in dilation],
            "group": int(groups),
        }
        ws4 = _const(ws.reshape(1, o, 1, 1))
        xf = _float(x)
        act = int(act_bits)
        if act and x_scale is not None:
            qmax = 2 ** (act - 1) - 1
            xs = op.Reshape(x_scale, _ints([]))
            if self.fmt is OnnxFormat.ORT:
                qx = _clip_codes(op.Round(op.Div(xf, xs)), qmax)
                acc = op.ConvInteger(qx, _const(cn.astype(np.int8)), **attrs)
                y = op.Mul(op.Mul(op.Cast(acc, to=_FLOAT), xs), ws4)
            else:
                qx = op.Clip(op.QuantizeLinear(xf, xs, output_dtype=_INT8), _i8(-qmax), _i8(qmax))
                wd = op.DequantizeLinear(_codes(cn, bits, True), _const(ws), axis=0)
                y = op.Conv(op.DequantizeLinear(qx, xs), wd, **attrs)
        else:
            if act:  # dynamic per pixel: simulated, as the reference (rounded to each pixel's grid, dequantized)
                qmax = 2 ** (act - 1) - 1
                s = _unit_scale(op.ReduceMax(op.Abs(xf), _ints([1]), keepdims=1), qmax)
                xf = op.Mul(op.Cast(_clip_codes(op.Round(op.Div(xf, s)), qmax), to=_FLOAT), s)
            wd = op.DequantizeLinear(_codes(cn, bits, True), _const(ws), axis=0)
            y = op.Conv(xf, wd, **attrs)
        if bias is not None:
            y = op.Add(y, op.Reshape(bias, _ints([1, o, 1, 1])))
        return y

    # -- the one linear
    def _linear(self, x, w: _Weights, bias, *, act_bits: int, act_group: int, prequantized: bool):  # type: ignore[no-untyped-def]
        """``y = x @ W.T (+ bias)`` for x [..., K] with activations: float (act_bits 0), dynamic symmetric
        per token / token group (act_bits > 0), or already in step units (``prequantized``: rounded and
        clamped to ±qmax with scale 1, as ``linear_static``)."""
        from onnxscript import opset21 as op

        k, n = w.k, w.n
        x2 = op.Reshape(_float(x), _ints([-1, k]))
        if act_bits == 0:
            y = self._weight_only(x2, w)
        elif self.fmt is OnnxFormat.ORT:
            y = self._integer(x2, w, act_bits, act_group, prequantized)
        else:
            y = op.MatMul(self._qdq_activation(x2, w, act_bits, act_group, prequantized), self._qdq_weight(w))
        if bias is not None:
            y = op.Add(y, bias)
        lead = op.Slice(op.Shape(x), _ints([0]), _ints([-1]))
        return op.Reshape(y, op.Concat(lead, _ints([n]), axis=0))

    def _weight_only(self, x2, w: _Weights):  # type: ignore[no-untyped-def]
        from onnxscript import opset21 as op

        if self.fmt is OnnxFormat.ORT:
            why = _nbits_obstacle(w)
            if why is None:
                return _matmul_nbits(x2, w)
            self.notes.add(f"{w.bits}-bit weight-only linears [{w.n}x{w.k}] kept the qdq form: {why}")
        return op.MatMul(x2, self._qdq_weight(w))

    def _qdq_weight(self, w: _Weights):  # type: ignore[no-untyped-def]
        """The float weight, transposed to [K, N]: DequantizeLinear of the codes (+ the float offset)."""
        from onnxscript import opset21 as op

        codes_t = np.ascontiguousarray(w.codes.T)
        if w.groups == 1:
            wd = op.DequantizeLinear(_codes(codes_t, w.bits, w.symmetric), _const(w.scale[:, 0]), axis=1)
        else:
            scale_t = np.ascontiguousarray(w.scale.T)
            wd = op.DequantizeLinear(
                _codes(codes_t, w.bits, w.symmetric), _const(scale_t), axis=0, block_size=int(w.group)
            )
        if w.offset is None:
            return wd
        # offset[n, g] repeated over the group's input channels: [G, 1, N] -> [G, group, N] -> [K, N]
        off = _const(np.ascontiguousarray(w.offset.T)[:, None, :])
        full = op.Expand(off, _ints([w.groups, w.group, w.n]))
        full = op.Slice(op.Reshape(full, _ints([w.groups * w.group, w.n])), _ints([0]), _ints([w.k]), _ints([0]))
        return op.Add(wd, full)

    def _qdq_activation(self, x2, w: _Weights, act_bits: int, act_group: int, prequantized: bool):  # type: ignore[no-untyped-def]
        from onnxscript import opset21 as op

        qmax = 2 ** (act_bits - 1) - 1
        if prequantized:
            return op.Clip(op.Round(x2), _f(-qmax), _f(qmax))
        if act_group == 0:
            s = op.Reshape(_unit_scale(op.ReduceMax(op.Abs(x2), _ints([1]), keepdims=1), qmax), _ints([-1]))
            q = op.QuantizeLinear(x2, s, axis=0, output_dtype=_INT8)
            return op.DequantizeLinear(q, s, axis=0)
        s = _unit_scale(op.ReduceMax(_blocks(x2, w.k, act_group), _ints([2]), keepdims=0), qmax)  # [M, G]
        q = op.QuantizeLinear(x2, s, axis=1, block_size=act_group, output_dtype=_INT8)
        return op.DequantizeLinear(q, s, axis=1, block_size=act_group)

    def _integer(self, x2, w: _Weights, act_bits: int, act_group: int, prequantized: bool):  # type: ignore[no-untyped-def]
        """MatMulInteger on int8 codes: per K block the exact int32 product, times the activation and weight
        scales in fp32, summed over blocks (the reference's order)."""
        from onnxscript import opset21 as op

        qmax = 2 ** (act_bits - 1) - 1
        k, n, g = w.k, w.n, w.groups
        block = act_group if act_group else (w.group if g > 1 else k)
        if act_group and g > 1 and act_group != w.group:
            raise OnnxExportError(f"activation group {act_group} differs from the weight group {w.group}")
        gb = -(-k // block)
        if g not in (1, gb):
            raise OnnxExportError(f"weight scale has {g} groups, the activation blocks {gb}")
        if prequantized:
            qx = _clip_codes(op.Round(x2), qmax)
            sx = None
        elif act_group == 0:
            sx = _unit_scale(op.ReduceMax(op.Abs(x2), _ints([1]), keepdims=1), qmax)  # [M, 1]
            qx = _clip_codes(op.Round(op.Div(x2, sx)), qmax)
        else:
            xb = _blocks(x2, k, block)  # [M, gb, block], |x|
            sx = _unit_scale(op.ReduceMax(xb, _ints([2]), keepdims=1), qmax)  # [M, gb, 1]
            xp = op.Reshape(op.Pad(x2, _ints([0, 0, 0, gb * block - k])), _ints([-1, gb, block]))
            qx = _clip_codes(op.Round(op.Div(xp, sx)), qmax)  # [M, gb, block]
        wpad = np.zeros((n, gb * block), np.int64)
        wpad[:, :k] = w.codes
        scale = w.scale if g == gb else np.repeat(w.scale, gb, axis=1)  # [N, gb]
        if gb == 1 and act_group == 0:
            acc = op.Cast(op.MatMulInteger(qx, _const(np.ascontiguousarray(w.codes.T).astype(np.int8))), to=_FLOAT)
            y = acc if sx is None else op.Mul(acc, sx)
            y = op.Mul(y, _const(scale[:, 0]))
            if w.offset is not None:
                qsum = op.ReduceSum(op.Cast(qx, to=_FLOAT), _ints([1]), keepdims=1)
                term = qsum if sx is None else op.Mul(qsum, sx)
                y = op.Add(y, op.Mul(term, _const(w.offset[:, 0])))
            return y
        if act_group == 0:  # per-token codes laid out in the weight's blocks
            qx = op.Reshape(op.Pad(qx, _ints([0, 0, 0, gb * block - k])), _ints([-1, gb, block]))
            sxb = None if sx is None else op.Unsqueeze(sx, _ints([0]))  # [1, M, 1]
        else:
            sxb = None if sx is None else op.Transpose(sx, perm=[1, 0, 2])  # [gb, M, 1]
        qt = op.Transpose(qx, perm=[1, 0, 2])  # [gb, M, block]
        wb = np.ascontiguousarray(wpad.reshape(n, gb, block).transpose(1, 2, 0)).astype(np.int8)  # [gb, block, N]
        acc = op.Cast(op.MatMulInteger(qt, _const(wb)), to=_FLOAT)  # [gb, M, N], exact
        y = acc if sxb is None else op.Mul(acc, sxb)
        y = op.ReduceSum(op.Mul(y, _const(np.ascontiguousarray(scale.T)[:, None, :])), _ints([0]), keepdims=0)
        if w.offset is not None:
            off = w.offset if w.offset.shape[1] == gb else np.repeat(w.offset, gb, axis=1)
            qsum = op.ReduceSum(op.Cast(qt, to=_FLOAT), _ints([2]), keepdims=1)  # [gb, M, 1]
            term = qsum if sxb is None else op.Mul(qsum, sxb)
            y = op.Add(y, op.ReduceSum(op.Mul(term, _const(np.ascontiguousarray(off.T)[:, None, :])), _ints([0]), 0))
        return y


def _function(method: Callable[..., Any]) -> Callable[..., Any]:
    """A plain function calling ``method`` with its signature (the exporter tags the functions it registers)."""

    @functools.wraps(method)
    def run(*args: Any, **kwargs: Any) -> Any:
        return method(*args, **kwargs)

    return run


# ---- small builders -----------------------------------------------------------------------------------
_FLOAT = 1  # onnx TensorProto.FLOAT
_INT8 = 3


def _const(a: np.ndarray):  # type: ignore[no-untyped-def]
    import onnx_ir as ir
    from onnxscript import opset21 as op

    return op.Constant(value=ir.tensor(np.ascontiguousarray(a)))


def _ints(v: list[int]):  # type: ignore[no-untyped-def]
    return _const(np.array(v, dtype=np.int64))


def _f(v: float):  # type: ignore[no-untyped-def]
    return _const(np.array(v, dtype=np.float32))


def _i8(v: int):  # type: ignore[no-untyped-def]
    return _const(np.array(v, dtype=np.int8))


def _float(x):  # type: ignore[no-untyped-def]
    from onnxscript import opset21 as op

    return op.Cast(x, to=_FLOAT)


def _unit_scale(amax, qmax: int):  # type: ignore[no-untyped-def]
    """``amax / qmax``, 1 where ``amax`` is 0 (the reference's ``_scale``)."""
    from onnxscript import opset21 as op

    return op.Where(op.Equal(amax, _f(0.0)), _f(1.0), op.Div(amax, _f(float(qmax))))


def _clip_codes(r, qmax: int):  # type: ignore[no-untyped-def]
    from onnxscript import opset21 as op

    return op.Cast(op.Clip(r, _f(-qmax), _f(qmax)), to=_INT8)


def _blocks(x2, k: int, block: int):  # type: ignore[no-untyped-def]
    """``|x2|`` [M, K] zero-padded to whole blocks, as [M, G, block]."""
    from onnxscript import opset21 as op

    g = -(-k // block)
    return op.Reshape(op.Pad(op.Abs(x2), _ints([0, 0, 0, g * block - k])), _ints([-1, g, block]))


def _codes(codes: np.ndarray, bits: int, symmetric: bool):  # type: ignore[no-untyped-def]
    """Integer codes as a constant of the narrowest ONNX integer type holding them (int4/uint4, int8/uint8)."""
    import ml_dtypes
    import onnx_ir as ir
    from onnxscript import opset21 as op

    if bits <= 4:
        arr = codes.astype(ml_dtypes.int4 if symmetric else ml_dtypes.uint4)
    else:
        arr = codes.astype(np.int8 if symmetric else np.uint8)
    return op.Constant(value=ir.tensor(np.ascontiguousarray(arr)))


def _nbits_container(bits: int) -> int | None:
    return next((b for b in (2, 4, 8) if bits <= b), None)


def _nbits_block(w: _Weights) -> int | None:
    if w.groups == 1:
        return 32
    g = w.group
    return g if g >= 16 and g & (g - 1) == 0 else None


def _nbits_obstacle(w: _Weights) -> str | None:
    """Why MatMulNBits cannot hold this weight exactly (None: it can)."""
    nb = _nbits_container(w.bits)
    if nb is None:
        return f"{w.bits}-bit codes"
    if _nbits_block(w) is None:
        return f"group size {w.group} is not a power of two >= 16"
    if not w.symmetric and nb == 8:
        return "onnxruntime's 8-bit MatMulNBits takes no float zero points"
    return None


def _matmul_nbits(x2, w: _Weights):  # type: ignore[no-untyped-def]
    import onnx_ir as ir
    from onnxscript import opset21 as op
    from onnxscript import values

    msft = values.Opset("com.microsoft", 1)
    nb = _nbits_container(w.bits)
    assert nb is not None
    block = _nbits_block(w)
    assert block is not None
    n, k = w.n, w.k
    blocks = -(-k // block)
    scale = w.scale if w.groups == blocks else np.repeat(w.scale, blocks, axis=1)
    zero = 2 ** (nb - 1)
    if w.symmetric:
        u = w.codes + zero  # the default zero point is 2^(bits-1)
        pad = zero
    else:
        u = w.codes
        pad = 0
    full = np.full((n, blocks * block), pad, np.uint8)
    full[:, :k] = u.astype(np.uint8)
    bitplanes = ((full.reshape(n, blocks, block)[..., None] >> np.arange(nb, dtype=np.uint8)) & 1).astype(np.uint8)
    packed = np.packbits(bitplanes.reshape(n, blocks, block * nb), axis=-1, bitorder="little")
    inputs = [x2, _const(packed), _const(scale.astype(np.float32))]
    if not w.symmetric:
        assert w.offset is not None
        off = w.offset if w.offset.shape[1] == blocks else np.repeat(w.offset, blocks, axis=1)
        inputs.append(op.Constant(value=ir.tensor((-off / scale).astype(np.float32))))
    return values.Op(msft, "MatMulNBits", _matmul_nbits_schema())(
        *inputs, K=k, N=n, bits=nb, block_size=block, accuracy_level=0
    )


@functools.cache
def _matmul_nbits_schema() -> Any:
    """The signature of onnxruntime's ``com.microsoft.MatMulNBits`` (the inputs and attributes used here),
    which onnxscript needs to build the node; not registered with onnx (the checker skips contrib ops)."""
    from onnx.defs import OpSchema

    opt = OpSchema.FormalParameterOption.Optional
    ints = OpSchema.AttrType.INT
    return OpSchema(
        "MatMulNBits",
        "com.microsoft",
        1,
        inputs=[
            OpSchema.FormalParameter("A", "T1"),
            OpSchema.FormalParameter("B", "T2"),
            OpSchema.FormalParameter("scales", "T1"),
            OpSchema.FormalParameter("zero_points", "T3", param_option=opt),
        ],
        outputs=[OpSchema.FormalParameter("Y", "T1")],
        type_constraints=[
            ("T1", ["tensor(float)"], "activations and scales"),
            ("T2", ["tensor(uint8)"], "packed codes"),
            ("T3", ["tensor(uint8)", "tensor(float)"], "zero points"),
        ],
        attributes=[
            OpSchema.Attribute("K", ints, "input features"),
            OpSchema.Attribute("N", ints, "output features"),
            OpSchema.Attribute("bits", ints, "bits per code"),
            OpSchema.Attribute("block_size", ints, "codes per scale"),
            OpSchema.Attribute("accuracy_level", ints, "0: float compute", required=False),
        ],
    )


__all__ = [
    "OPSET",
    "CacheTensor",
    "InexpressibleOpError",
    "OnnxExport",
    "OnnxExportError",
    "OnnxFormat",
    "check_expressible",
    "export_onnx",
    "ort_session",
]


def ort_session(path: str | Path, *, threads: int | None = None) -> Any:
    """An onnxruntime CPU session for an exported model that computes the numbers the export was made for.

    onnxruntime fuses ``DequantizeLinear`` (4-bit, blocked) + ``MatMul`` into ``MatMulNBits`` with
    accuracy level 4 (activations quantized to int8) by default, which changes a ``qdq`` model's
    results by about 1e-2 relative; this session sets ``session.qdq_matmulnbits_accuracy_level`` to 0
    (fp32 activations), as the ``ort`` format's own MatMulNBits nodes have.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads is not None:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
