"""Calibration: normalize the ``calib`` argument and run a Program's entry while observing nodes.

``compile(..., calib=...)`` takes, for a causal LM, token ids: an int64 tensor ``[B, T]`` or
``[T]``, or a list of such tensors (:func:`qcompile.eval.datasets.calibration_tokens` builds one
from the calibration split). Passes that need calibration call :func:`calib_batches`, which
checks the data and says what is missing, then :func:`run_observed` to see the concrete inputs of
the nodes they care about. For any other model with one tensor input (a CNN), ``calib`` is input
batches of the model's input shape and dtype (a tensor ``[B, ...]``, or a list of them or of
1-tuples holding one); :func:`calib_inputs` checks them (shape against the captured input spec,
dtype, NaN/Inf refused), and :func:`calibration_batches` picks the form for the program. Observers
see the calibration data only; evaluation text never reaches this module.

Non-finite values: a float ``calib`` tensor holding NaN/Inf is refused naming the item; a NaN or Inf
activation reaching an observed node is a :class:`~qcompile.errors.NonFiniteError` (a
:class:`~qcompile.errors.DataError`) naming the layer, the calibration window (item and row) and
the first node of the graph whose output was not finite (the window is re-run to find it), never
NaN statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.fx as fx

from qcompile.errors import DataError, NonFiniteError, PlanError
from qcompile.ir.program import PATH_KEY, Program, SlotKind
from qcompile.quant.finite import nonfinite_counts

Observer = Callable[[fx.Node, tuple[Any, ...]], None]


def calib_batches(calib: Any, *, who: str, program: Program, min_tokens: int = 1) -> list[torch.Tensor]:
    """``calib`` as a list of int64 ``[B, T]`` token batches with at least ``min_tokens`` tokens in all.

    ``who`` names the pass asking, for the error messages. Calibration feeds token ids, so a program
    that is not a causal LM (a CNN) is refused with a message saying so, before any data is read.
    """
    if program.kind != "causal_lm":
        specs = ", ".join(u.describe() for u in program.entries["forward"].user_inputs)
        raise PlanError(
            f"{who} calibrates on token ids, which only causal LMs take; this model's forward takes {specs}. "
            "Choose a plan whose passes do not calibrate for it (e.g. round-to-nearest weights)"
        )
    if "forward" not in program.entries:
        raise PlanError(
            f"{who} calibrates by running the 'forward' entry, which this Program lacks (entries "
            f"{list(program.entries)}); compile with lm_entries including 'forward'"
        )
    if calib is None:
        raise PlanError(
            f"{who} needs calibration data: pass compile(..., calib=token ids [B, T]) "
            "(e.g. qcompile.eval.datasets.calibration_tokens(tokenizer)), or use --calib-windows on the CLI"
        )
    items = _items(calib)
    if not items:
        raise DataError(
            f"{who}: calibration data must be a token tensor [B, T] or a non-empty list of them, got "
            f"{type(calib).__name__}"
        )
    batches = []
    for i, t in enumerate(items):
        if isinstance(t, torch.Tensor) and (c := nonfinite_counts(t)) is not None:
            raise NonFiniteError(
                f"{who}: calibration item {i} ({_describe(t)}) holds {c.describe()}; calibration data must be "
                "integer token ids [B, T] (or [T])"
            )
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32) or t.dim() not in (1, 2):
            raise DataError(
                f"{who}: calibration item {i} must be an integer token tensor [B, T] or [T], got {_describe(t)}"
            )
        batches.append((t if t.dim() == 2 else t[None]).to(torch.int64))
    total = sum(b.numel() for b in batches)
    if total < min_tokens:
        raise DataError(f"{who}: calibration data has {total} tokens; at least {min_tokens} are needed")
    return batches


def calib_inputs(calib: Any, *, who: str, program: Program, min_items: int = 1) -> list[torch.Tensor]:
    """``calib`` as a list of input batches for a one-input model that is not a causal LM (a CNN).

    Each item is a tensor ``[B, ...]`` (or a 1-tuple / 1-list holding one) with the dtype and, but
    for a dynamic batch, the shape of the forward entry's input; non-finite values are refused
    naming the item. ``min_items``: at least that many samples (rows) in all.
    """
    entry = program.entries["forward"]
    if len(entry.user_inputs) != 1:
        specs = ", ".join(u.describe() for u in entry.user_inputs)
        raise PlanError(f"{who} calibrates models with one tensor input; this model's forward takes {specs}")
    spec = entry.user_inputs[0]
    if calib is None:
        raise PlanError(
            f"{who} needs calibration data: pass compile(..., calib=input batches {spec.describe()}) "
            "(a tensor or a list of tensors of the model's input shape; never evaluation data)"
        )
    raw = _items(calib)
    if not raw:
        raise DataError(
            f"{who}: calibration data must be an input tensor {spec.describe()} or a non-empty list of them, got "
            f"{type(calib).__name__}"
        )
    batches = []
    for i, t in enumerate(raw):
        if isinstance(t, (tuple, list)) and len(t) == 1:
            t = t[0]
        if not isinstance(t, torch.Tensor) or t.dtype != spec.torch_dtype or not _fits(t, spec, entry.dims):
            raise DataError(
                f"{who}: calibration item {i} must be a tensor {spec.describe()} (the model's input; the batch may "
                f"differ where it is dynamic), got {_describe(t)}"
            )
        if (c := nonfinite_counts(t)) is not None:
            raise NonFiniteError(f"{who}: calibration item {i} ({_describe(t)}) holds {c.describe()}")
        batches.append(t)
    total = sum(b.shape[0] for b in batches)
    if total < min_items:
        raise DataError(f"{who}: calibration data has {total} samples; at least {min_items} are needed")
    return batches


def _items(calib: Any) -> list[Any] | None:
    """``calib`` as a list of items: a tensor is one item, a list or tuple its elements, anything else None."""
    if isinstance(calib, torch.Tensor):
        return [calib]
    return list(calib) if isinstance(calib, (list, tuple)) else None


def _fits(t: torch.Tensor, spec: Any, dims: Mapping[str, Any]) -> bool:
    """``t``'s shape matches ``spec``: static dimensions equal (a static batch of 1 takes any batch,
    run row by row), dynamic ones within their range."""
    if t.dim() != len(spec.shape) or t.numel() == 0:
        return False
    for i, (n, d) in enumerate(zip(t.shape, spec.shape)):
        if isinstance(d, int):
            if n != d and not (i == 0 and d == 1):
                return False
        elif d in dims and not dims[d].min <= n <= dims[d].max:
            return False
    return True


def calibration_batches(calib: Any, *, who: str, program: Program, min_tokens: int = 1) -> list[torch.Tensor]:
    """Token batches for a causal LM (:func:`calib_batches`), input batches for any other model
    (:func:`calib_inputs`)."""
    if program.kind == "causal_lm":
        return calib_batches(calib, who=who, program=program, min_tokens=min_tokens)
    return calib_inputs(calib, who=who, program=program)


def _describe(t: Any) -> str:
    return f"{t.dtype}{list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def entry_args(
    program: Program, entry_name: str, user: list[torch.Tensor], cache: Mapping[str, torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """Flat placeholder values of ``entry_name``: state tensors, cache tensors, then ``user``."""
    entry = program.entries[entry_name]
    it = iter(user)
    out: list[torch.Tensor] = []
    for slot in entry.slots:
        if slot.kind is SlotKind.STATE:
            out.append(program.state[slot.name])
        elif slot.kind is SlotKind.CACHE:
            if cache is None:
                raise ValueError(f"entry {entry_name!r} reads cache {slot.name!r}; pass cache=")
            out.append(cache[slot.name])
        else:
            out.append(next(it))
    return out


class _Observing(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, observers: Mapping[fx.Node, Observer]) -> None:
        super().__init__(gm)
        self.observers = observers

    def run_node(self, n: fx.Node) -> Any:
        obs = self.observers.get(n)
        if obs is not None:
            args, _ = self.fetch_args_kwargs_from_env(n)
            obs(n, args)
        return super().run_node(n)


def run_observed(
    program: Program,
    batches: Iterable[torch.Tensor],
    observers: Mapping[fx.Node, Observer],
    *,
    entry: str = "forward",
    progress: bool = False,
    desc: str = "calibrating",
) -> list[Any]:
    """Run ``entry`` on every batch; before each node in ``observers`` runs, call
    ``observers[node](node, concrete_args)``. Returns the entry's flat outputs per batch (None for
    a batch an observer ended early with :class:`StopRun`).

    Calibration input with NaN/Inf is rejected naming the first observed node that sees it, the
    window, and the node that first produced a non-finite value.
    """
    from tqdm.auto import tqdm

    gm = program.entries[entry].graph
    windows: list[tuple[str, torch.Tensor]] = []
    if program.entries[entry].user_inputs[0].shape[0] == 1:  # captured with a static batch of 1
        for i, b in enumerate(batches):
            windows += [(f"item {i}, row {r}", row[None]) for r, row in enumerate(b)]
    else:
        windows = [(f"item {i}, rows 0..{b.shape[0] - 1}", b) for i, b in enumerate(batches)]
    outs = []
    with torch.no_grad():
        for w, (label, b) in enumerate(tqdm(windows, desc=desc, disable=not progress, unit="batch")):
            args = entry_args(program, entry, [b])
            wrapped = {n: _finite_check(obs, program, entry, w, label, args) for n, obs in observers.items()}
            try:
                outs.append(_Observing(gm, wrapped).run(*args))
            except StopRun:
                outs.append(None)
    return outs


def _finite_check(
    obs: Observer, program: Program, entry: str, window: int, label: str, run_args: list[torch.Tensor]
) -> Observer:
    """``obs`` behind a check that every floating-point activation it is handed is finite."""

    def check(n: fx.Node, args: tuple[Any, ...]) -> None:
        for i, (x, a) in enumerate(zip(args, n.args)):
            if isinstance(a, fx.Node) and a.op == "placeholder":
                continue  # weights and inputs: checked before any pass / by calib_batches
            if isinstance(x, torch.Tensor) and (c := nonfinite_counts(x)) is not None:
                origin = first_nonfinite(program, entry, run_args)
                raise NonFiniteError(
                    f"calibration activations entering layer {n.meta.get(PATH_KEY, n.name)!r} contain NaN or Inf: "
                    f"input {i} of node %{n.name} holds {c.describe()} in calibration window {window} ({label}) of "
                    f"entry {entry!r}{origin}. Check the calibration data and the model's weights; a model whose "
                    "activations overflow float32 cannot be calibrated"
                )
        obs(n, args)

    return check


class _FirstNonFinite(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op == "call_function":
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and nonfinite_counts(t) is not None:
                    raise _Found(n)
        return out


class _Found(Exception):
    def __init__(self, node: fx.Node) -> None:
        self.node = node


def first_nonfinite(program: Program, entry: str, args: list[torch.Tensor]) -> str:
    """``"; first produced by node %x (op) in layer 'path'"``: the first node of ``entry`` whose
    output is not finite when run on ``args`` (empty when none is found)."""
    try:
        with torch.no_grad():
            _FirstNonFinite(program.entries[entry].graph).run(*args)
    except _Found as f:
        n = f.node
        return f"; first produced by node %{n.name} ({n.target}) in layer {n.meta.get(PATH_KEY, '')!r}"
    except Exception:  # the diagnosis must not hide the error it explains
        return ""
    return ""


class StopRun(Exception):
    """Raised by an observer to end the current batch early (nothing after it is needed)."""


def observe_linear_inputs(
    program: Program,
    batches: list[torch.Tensor],
    weight_keys: list[str],
    make: Callable[[str], list[Any]],
    *,
    entry: str = "forward",
    progress: bool = False,
    desc: str = "calibrating",
    stop_early: bool = False,
) -> dict[str, list[Any]]:
    """Run ``entry`` over ``batches`` feeding the input of the first linear whose weight is each of
    ``weight_keys`` to the observers ``make(key)`` returns (objects with ``update(x)``).

    ``stop_early``: end each batch right after the last observed linear (the rest of the model
    is not run). Returns ``{key: observers}``.
    """
    from qcompile.ir.patterns import find_linears

    wanted = set(weight_keys)
    nodes: dict[str, fx.Node] = {}
    for m in find_linears(program):
        if m.entry.name == entry and m.weight_key in wanted and m.weight_key not in nodes:
            nodes[m.weight_key] = m.node
    missing = sorted(wanted - set(nodes))
    if missing:
        raise ValueError(f"no linear in entry {entry!r} uses weight(s) {missing[:3]}")
    obs = {k: make(k) for k in weight_keys}
    order = {n: i for i, n in enumerate(program.entries[entry].graph.graph.nodes)}
    last = max(nodes.values(), key=lambda n: order[n])

    def observer(key: str) -> Observer:
        def fn(n: fx.Node, args: tuple[Any, ...]) -> None:
            for o in obs[key]:
                o.update(args[0])
            if stop_early and n is last:
                raise StopRun

        return fn

    run_observed(
        program, batches, {nodes[k]: observer(k) for k in weight_keys}, entry=entry, progress=progress, desc=desc
    )
    return obs
