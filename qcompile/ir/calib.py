"""Calibration: normalize the ``calib`` argument and run a Program's entry while observing nodes.

``compile(..., calib=...)`` takes, for a causal LM, token ids: an int64 tensor ``[B, T]`` or
``[T]``, or a list of such tensors (:func:`qcompile.eval.datasets.calibration_tokens` builds one
from the calibration split). Passes that need calibration call :func:`calib_batches`, which
checks the data and says what is missing, then :func:`run_observed` to see the concrete inputs of
the nodes they care about. Observers see the calibration data only; evaluation text never reaches
this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.fx as fx

from qcompile.errors import DataError, PlanError
from qcompile.ir.program import Program, SlotKind

Observer = Callable[[fx.Node, tuple[Any, ...]], None]


def calib_batches(calib: Any, *, who: str, min_tokens: int = 1) -> list[torch.Tensor]:
    """``calib`` as a list of int64 ``[B, T]`` token batches with at least ``min_tokens`` tokens in all.

    ``who`` names the pass asking, for the error messages.
    """
    if calib is None:
        raise PlanError(
            f"{who} needs calibration data: pass compile(..., calib=token ids [B, T]) "
            "(e.g. qcompile.eval.datasets.calibration_tokens(tokenizer)), or use --calib-windows on the CLI"
        )
    items = [calib] if isinstance(calib, torch.Tensor) else list(calib) if isinstance(calib, (list, tuple)) else None
    if not items:
        raise DataError(
            f"{who}: calibration data must be a token tensor [B, T] or a non-empty list of them, got "
            f"{type(calib).__name__}"
        )
    batches = []
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32) or t.dim() not in (1, 2):
            raise DataError(
                f"{who}: calibration item {i} must be an integer token tensor [B, T] or [T], got {_describe(t)}"
            )
        batches.append((t if t.dim() == 2 else t[None]).to(torch.int64))
    total = sum(b.numel() for b in batches)
    if total < min_tokens:
        raise DataError(f"{who}: calibration data has {total} tokens; at least {min_tokens} are needed")
    return batches


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

    Calibration input with NaN/Inf is rejected naming the first observed node that sees it.
    """
    from tqdm.auto import tqdm

    gm = program.entries[entry].graph
    wrapped = {n: _finite_check(obs) for n, obs in observers.items()}
    outs = []
    if program.entries[entry].user_inputs[0].shape[0] == 1:  # captured with a static batch of 1
        batches = [row[None] for b in batches for row in b]
    else:
        batches = list(batches)
    with torch.no_grad():
        for b in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
            try:
                outs.append(_Observing(gm, wrapped).run(*entry_args(program, entry, [b])))
            except StopRun:
                outs.append(None)
    return outs


def _finite_check(obs: Observer) -> Observer:
    def check(n: fx.Node, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not torch.isfinite(x).all():
            from qcompile.ir.program import PATH_KEY

            raise DataError(
                f"calibration activations entering layer {n.meta.get(PATH_KEY, n.name)!r} contain NaN or Inf; "
                "check the calibration data and the model's weights"
            )
        obs(n, args)

    return check


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
