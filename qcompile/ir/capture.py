"""Capture: ``nn.Module`` / ``fx.GraphModule`` / Hugging Face causal LM → :class:`Program`.

Capture is ``torch.export`` (non-strict) and nothing model-specific:

* any module: one ``forward`` entry from ``example_inputs`` (optionally with dynamic shapes);
* a decoder-only LM (anything with a ``config`` and a causal-LM head; recognised by the
  ``GenerationMixin`` interface, not by name): three entries —
  ``forward(input_ids[1, S]) -> logits`` without cache (for evaluation), and
  ``prefill(input_ids[1, T], cache_position[T]) -> logits`` / ``decode(input_ids[1, 1],
  cache_position[1]) -> logits`` over a static KV cache (``compile`` later cuts prefill's output to
  the last position: :mod:`qcompile.ir.last_position`). The cache steps come from
  transformers' own ExecuTorch recipe (``TorchExportableModuleWithStaticCache``), whose cache
  tensors are buffers the graph updates in place; qcompile lifts them into the Program's
  ``cache`` so the runtime owns them.

When ``torch.export`` fails, a :class:`CaptureError` names the innermost module that was running
and the line of user code that failed.

Values: capture keeps the model's weights as they are, NaN and Inf included (the same tensor seen
by two entries is the same even when it holds NaN); ``compile`` checks them before any pass
(:mod:`qcompile.ir.finite`). Floating-point example inputs holding NaN/±Inf are refused here
(:class:`~qcompile.errors.NonFiniteError` naming the input), as they would be stored with the Program
as its valid example values.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind

from qcompile.errors import CaptureError, NonFiniteError
from qcompile.ir.canonicalize import canonicalize
from qcompile.ir.program import PATH_KEY, DimRange, Entry, Program, Slot, SlotKind, TensorSpec, dtype_name

log = logging.getLogger(__name__)

DEFAULT_MAX_CACHE_LEN = 1024
LM_ENTRIES = ("forward", "prefill", "decode")


def is_causal_lm(model: Any) -> bool:
    """A Hugging Face decoder-only LM: has a config, ``generate`` and is not encoder-decoder."""
    cfg = getattr(model, "config", None)
    return (
        isinstance(model, torch.nn.Module)
        and cfg is not None
        and callable(getattr(model, "generate", None))
        and callable(getattr(model, "get_output_embeddings", None))
        and model.get_output_embeddings() is not None
        and not getattr(cfg, "is_encoder_decoder", False)
    )


def capture(
    model: torch.nn.Module | str | os.PathLike[str],
    example_inputs: Any = None,
    *,
    dynamic_shapes: Any = None,
    max_cache_len: int = DEFAULT_MAX_CACHE_LEN,
    lm_entries: tuple[str, ...] = LM_ENTRIES,
    progress: bool = False,
) -> Program:
    """Capture ``model`` into a Program.

    A causal LM needs no example inputs (entries ``forward``, ``prefill``, ``decode``); any other
    module needs ``example_inputs`` (a tensor or a tuple of tensors) and gets one ``forward``
    entry, static unless ``dynamic_shapes`` (as for ``torch.export.export``) says otherwise. The path
    of an ``.onnx`` file is imported (:func:`qcompile.ir.onnx_import.capture_onnx`).
    """
    from qcompile.ir.onnx_import import capture_onnx, is_onnx_path

    if is_onnx_path(model):
        if dynamic_shapes is not None:
            raise CaptureError("an ONNX model's dynamic dims come from the file; dynamic_shapes applies to nn.Modules")
        return capture_onnx(model, example_inputs)  # type: ignore[arg-type]
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"capture needs an nn.Module or fx.GraphModule, got {type(model).__name__}")
    if is_causal_lm(model) and example_inputs is None:
        return capture_causal_lm(model, max_cache_len=max_cache_len, entries=lm_entries, progress=progress)
    if example_inputs is None:
        raise CaptureError(
            f"{type(model).__name__} is not a causal LM, so capture needs example_inputs "
            "(a tensor or a tuple of tensors of the shapes it will run on)"
        )
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    _check_examples(args)
    prog = Program(entries={}, state={}, meta={"kind": "module", "model_class": type(model).__name__})
    with _inference(model):
        ep = _export(model, args, {}, dynamic_shapes)
    prog.entries["forward"] = _entry_from_export(prog, "forward", ep, strip="", examples=list(args))
    return _canonical(prog)


def capture_causal_lm(
    model: torch.nn.Module,
    *,
    max_cache_len: int = DEFAULT_MAX_CACHE_LEN,
    entries: tuple[str, ...] = LM_ENTRIES,
    progress: bool = False,
) -> Program:
    """Capture a decoder-only LM: ``forward`` (no cache), ``prefill`` and ``decode`` (static cache);
    ``entries`` selects a subset (evaluation needs only ``forward``, plus ``decode`` for cache sizes)."""
    unknown = sorted(set(entries) - set(LM_ENTRIES))
    if unknown or not entries:
        raise CaptureError(f"unknown LM entries {unknown or list(entries)}; entries: {list(LM_ENTRIES)}")
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    cfg = model.config
    max_pos = int(getattr(cfg, "max_position_embeddings", max_cache_len) or max_cache_len)
    if max_cache_len < 2 or max_cache_len > max_pos:
        raise CaptureError(f"max_cache_len must be in [2, {max_pos}] for this model, got {max_cache_len}")
    meta: dict[str, Any] = {
        "kind": "causal_lm",
        "model_class": type(model).__name__,
        "model_type": getattr(cfg, "model_type", ""),
        "vocab_size": int(cfg.vocab_size),
        "max_cache_len": max_cache_len,
        "max_positions": max_pos,
        "eos_token_id": _token_ids(getattr(model.generation_config, "eos_token_id", None)),
        "bos_token_id": getattr(model.generation_config, "bos_token_id", None),
        "config": json.loads(cfg.to_json_string()),
    }
    prog = Program(entries={}, state={}, meta=meta)
    ex_len = min(8, max_cache_len - 1)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(cfg.vocab_size), (1, ex_len), generator=gen)

    from tqdm import tqdm

    bar = tqdm(total=len(entries), desc="capturing (torch.export)", unit="entry", disable=not progress)
    gc = model.generation_config
    saved_impl = getattr(gc, "cache_implementation", None)
    with _inference(model), bar:
        if "forward" in entries:  # whole sequence, no cache, dynamic length
            seq = Dim("seq", min=1, max=max_pos)
            ep = _export(_LogitsOnly(model), (ids,), {}, ({1: seq},))
            prog.entries["forward"] = _entry_from_export(prog, "forward", ep, strip="model.", examples=[ids])
            bar.update(1)
        if not {"prefill", "decode"} & set(entries):
            return _canonical(prog)
        try:
            gc.cache_implementation = "static"
            step = TorchExportableModuleWithStaticCache(model, batch_size=1, max_cache_len=max_cache_len)
        finally:
            gc.cache_implementation = saved_impl
        if "prefill" in entries:  # T new tokens at positions cache_position (T dynamic)
            t = Dim("tokens", min=1, max=max_cache_len)
            pos = torch.arange(ex_len)
            kwargs = {"input_ids": ids, "cache_position": pos}
            ep = _export(step, (), kwargs, {"input_ids": {1: t}, "cache_position": {0: t}})
            prog.entries["prefill"] = _entry_from_export(prog, "prefill", ep, strip="model.", examples=[ids, pos])
            bar.update(1)
        if "decode" in entries:  # one token
            one, pos1 = ids[:, :1].clone(), torch.tensor([ex_len])
            ep = _export(step, (), {"input_ids": one, "cache_position": pos1}, None)
            prog.entries["decode"] = _entry_from_export(prog, "decode", ep, strip="model.", examples=[one, pos1])
            bar.update(1)
    return _canonical(prog)


def _canonical(prog: Program) -> Program:
    """``prog`` with fused projections and Conv1D spelled as plain linears (:mod:`qcompile.ir.canonicalize`);
    what was rewritten is listed in ``prog.meta["canonicalized"]``."""
    notes = canonicalize(prog)
    if notes:
        prog.meta["canonicalized"] = notes
    return prog


class _LogitsOnly(torch.nn.Module):
    """Full-sequence LM forward returning logits only (no cache objects cross the boundary)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


@contextlib.contextmanager
def _inference(model: torch.nn.Module) -> Iterator[None]:
    """eval mode, no grad, parameters not requiring grad; restored afterwards."""
    was_training = model.training
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)


class _ModuleTracker:
    """Hooks that remember which module was running when an exception escaped."""

    def __init__(self, root: torch.nn.Module) -> None:
        self.stack: list[tuple[str, str]] = []
        self.failed_at: list[tuple[str, str]] = []
        self.handles: list[Any] = []
        for path, mod in root.named_modules():
            self.handles.append(mod.register_forward_pre_hook(self._pre(path, type(mod).__name__)))
            self.handles.append(mod.register_forward_hook(self._post))

    def _pre(self, path: str, cls: str) -> Any:
        def hook(_mod: Any, _args: Any) -> None:
            self.stack.append((path, cls))

        return hook

    def _post(self, _mod: Any, _args: Any, _out: Any) -> None:
        if self.stack:
            self.stack.pop()

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _user_frame(exc: BaseException) -> str:
    """``file:line: code`` of the innermost frame outside torch (where the model failed)."""
    skip = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))
    best = None
    for fs in traceback.extract_tb(exc.__traceback__):
        if not fs.filename.startswith(skip):
            best = fs
    if best is None:
        return "unknown location"
    return f"{best.filename}:{best.lineno}: {(best.line or '').strip()}"


def _export(module: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any) -> ExportedProgram:
    tracker = _ModuleTracker(module)
    try:
        return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:  # torch.export raises many exception types
        where = tracker.stack[-1] if tracker.stack else ("", type(module).__name__)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:400]
        raise CaptureError(
            f"torch.export could not capture module {where[0] or '<root>'!r} ({where[1]}): "
            f"{type(e).__name__}: {first}\n  failing code: {_user_frame(e)}\n"
            "  Fix: make that module traceable (no data-dependent Python control flow, no "
            "non-tensor side effects), or exclude it from the captured model."
        ) from e
    finally:
        tracker.close()


def _strip(name: str, prefix: str) -> str:
    if prefix and name.startswith(prefix):
        return name[len(prefix) :]
    if prefix and name == prefix.rstrip("."):
        return ""
    return name


def _mutated_placeholders(gm: fx.GraphModule) -> set[str]:
    """Names of placeholders that some op writes to (per the op schema's alias info)."""
    out: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        for arg_schema, arg in zip(node.target._schema.arguments, node.args):
            info = arg_schema.alias_info
            if info is not None and info.is_write and isinstance(arg, fx.Node) and arg.op == "placeholder":
                out.add(arg.name)
    return out


def _lookup(ep: ExportedProgram, target: str) -> torch.Tensor:
    if target in ep.state_dict:
        return ep.state_dict[target]
    return ep.constants[target]


def _canonical_names(ep: ExportedProgram, strip: str, entry: str) -> dict[int, str]:
    """data_ptr -> name: a lifted constant aliasing a named buffer/parameter takes that name."""
    names: dict[int, str] = {}
    specs = ep.graph_signature.input_specs
    for kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
        for spec in specs:
            if spec.kind is kind:
                ptr = _lookup(ep, spec.target).data_ptr()
                name = _strip(spec.target, strip)
                names.setdefault(ptr, f"const.{entry}.{name}" if kind is InputKind.CONSTANT_TENSOR else name)
    # named buffers that are not graph inputs (e.g. registered aliases of lifted constants)
    for target, tensor in list(ep.state_dict.items()) + list(ep.constants.items()):
        if isinstance(tensor, torch.Tensor) and not target.split(".")[-1].startswith("lifted_tensor"):
            names.setdefault(tensor.data_ptr(), _strip(target, strip))
    return names


def _entry_from_export(
    prog: Program, name: str, ep: ExportedProgram, strip: str, examples: list[torch.Tensor]
) -> Entry:
    gm = ep.graph_module
    mutated = _mutated_placeholders(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    specs = ep.graph_signature.input_specs
    if len(placeholders) != len(specs):  # pragma: no cover - torch invariant
        raise CaptureError(f"{name}: graph has {len(placeholders)} placeholders but {len(specs)} input specs")
    canonical = _canonical_names(ep, strip, name)
    slots: list[Slot] = []
    user_specs: list[TensorSpec] = []
    dims: dict[str, DimRange] = {}
    for node, spec in zip(placeholders, specs):
        if spec.kind is InputKind.USER_INPUT:
            slots.append(Slot(SlotKind.USER, node.name))
            user_specs.append(_tensor_spec(node, ep, dims))
            continue
        if spec.kind not in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            raise CaptureError(f"{name}: unsupported graph input kind {spec.kind.name} for {spec.target}")
        if not node.users:  # unused (e.g. a buffer only reached through an alias): drop it
            gm.graph.erase_node(node)
            continue
        tensor = _lookup(ep, spec.target).detach()
        key = canonical[tensor.data_ptr()]
        if node.name in mutated:
            if spec.kind is InputKind.PARAMETER:
                raise CaptureError(f"{name}: the graph writes to parameter {spec.target!r}")
            prog.cache_specs[key] = (tuple(tensor.shape), dtype_name(tensor.dtype))
            slots.append(Slot(SlotKind.CACHE, key))
            continue
        old = prog.state.get(key)
        if old is not None and old is not tensor and not _same_values(old, tensor):
            raise CaptureError(f"{name}: state {key!r} differs from the tensor of the same name in another entry")
        prog.state[key] = tensor
        slots.append(Slot(SlotKind.STATE, key))
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""
        node.meta[PATH_KEY] = "" if path.startswith("_empty") else _strip(path, strip)
    gm.recompile()
    try:
        out_spec = pytree.treespec_dumps(ep.call_spec.out_spec)
    except Exception as e:
        raise CaptureError(f"{name}: the model's outputs must be tensors or tuples/lists/dicts of tensors ({e})") from e
    return Entry(name, gm, slots, user_specs, [t.detach().clone() for t in _flat(examples)], dims, out_spec)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape, dtype and values, a NaN equal to a NaN in the same place (``torch.equal`` says
    a tensor holding NaN differs from itself)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    return torch.equal(a, b)


def _check_examples(args: tuple) -> None:
    """Floating-point example inputs must be finite (NonFiniteError naming the input)."""
    from qcompile.quant.finite import nonfinite_counts

    for i, leaf in enumerate(pytree.tree_leaves(list(args))):
        if isinstance(leaf, torch.Tensor) and (c := nonfinite_counts(leaf)) is not None:
            raise NonFiniteError(
                f"example input {i} ({dtype_name(leaf.dtype)}{list(leaf.shape)}) holds {c.describe()}; "
                "capture needs example inputs with valid (finite) values"
            )


def _flat(xs: Sequence[Any]) -> list[torch.Tensor]:
    leaves = pytree.tree_leaves(list(xs))
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise CaptureError(f"example inputs must be tensors, got {type(leaf).__name__}")
    return leaves


def _tensor_spec(node: fx.Node, ep: ExportedProgram, dims: dict[str, DimRange]) -> TensorSpec:
    val = node.meta["val"]
    shape: list[int | str] = []
    for d in val.shape:
        if isinstance(d, torch.SymInt):
            expr = d.node.expr
            name = str(expr)
            vr = ep.range_constraints.get(expr)
            lo = _finite_int(vr.lower, 0) if vr is not None else 0
            hi = _finite_int(vr.upper, 2**31 - 1) if vr is not None else 2**31 - 1
            dims[name] = DimRange(lo, hi)
            shape.append(name)
        else:
            shape.append(int(d))
    return TensorSpec(tuple(shape), dtype_name(val.dtype))


def _finite_int(v: Any, default: int) -> int:
    """A sympy range bound as an int; ``default`` for torch's and sympy's infinities."""
    import sympy

    return int(v) if isinstance(v, sympy.Integer) else default
