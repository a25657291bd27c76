"""Backends: turn a Program into something that runs. Registry by name.

* ``torch`` — the reference: runs each entry's ATen graph as is (qcompile ops run their
  reference kernels). Targets: ``cpu``.
* ``tvm`` — Relax + qcompile's TIR kernels, built with ``tvm.compile`` for the host CPU or an
  NVIDIA GPU (``cuda``, ``cuda:sm_86``: tensor-core kernels compiled ahead of time with nvcc) and
  run on the Relax VM (the default for both). Imported lazily: TVM loads only when it is used.
"""

from __future__ import annotations

from collections.abc import Callable

from qcompile.codegen.base import Backend, BuiltEntry
from qcompile.codegen.target import TARGETS, Target, parse_target, target_kind
from qcompile.codegen.torch_backend import TorchBackend
from qcompile.errors import QCompileError


def _tvm_backend() -> Backend:
    from qcompile.codegen.tvm import TVMBackend

    return TVMBackend()


BACKENDS: dict[str, Callable[[], Backend]] = {"torch": TorchBackend, "tvm": _tvm_backend}
BACKEND_TARGETS = {"torch": ("cpu",), "tvm": ("cpu", "cuda")}
DEFAULT_BACKEND = {"cpu": "tvm", "cuda": "tvm"}


def get_backend(name: str | None, target: str | Target) -> Backend:
    """The backend ``name`` (or the default for ``target``, a string or a parsed Target), checked to
    support ``target``."""
    kind = target_kind(target)
    if kind not in TARGETS:
        raise QCompileError(f"unknown target {target!r}; targets: {list(TARGETS)}")
    if name is None:
        if kind not in DEFAULT_BACKEND:
            raise QCompileError(
                f"target {kind!r} needs a backend that is not available in this version "
                f"(backends: {sorted(BACKENDS)}, which support {sorted(DEFAULT_BACKEND)})"
            )
        name = DEFAULT_BACKEND[kind]
    if name not in BACKENDS:
        raise QCompileError(f"unknown backend {name!r}; backends: {sorted(BACKENDS)}")
    if kind not in BACKEND_TARGETS[name]:
        raise QCompileError(
            f"backend {name!r} does not support target {kind!r} (it supports {list(BACKEND_TARGETS[name])})"
        )
    return BACKENDS[name]()


__all__ = ["BACKENDS", "TARGETS", "Backend", "BuiltEntry", "Target", "get_backend", "parse_target"]
