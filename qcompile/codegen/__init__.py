"""Backends: turn a Program into something that runs. Registry by name.

* ``torch`` — the reference: runs each entry's ATen graph as is (qcompile ops run their
  reference kernels). Targets: ``cpu``.
* ``tvm`` — arrives with the TVM backend issue.
"""

from __future__ import annotations

from qcompile.codegen.base import Backend, BuiltEntry
from qcompile.codegen.torch_backend import TorchBackend
from qcompile.errors import QCompileError

BACKENDS: dict[str, type[Backend]] = {"torch": TorchBackend}
DEFAULT_BACKEND = {"cpu": "torch"}
TARGETS = ("cpu", "cuda")


def get_backend(name: str | None, target: str) -> Backend:
    """The backend ``name`` (or the default for ``target``), checked to support ``target``."""
    kind = target.split()[0].split(":")[0]
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
    backend = BACKENDS[name]()
    if kind not in backend.targets:
        raise QCompileError(f"backend {name!r} does not support target {kind!r} (it supports {list(backend.targets)})")
    return backend


__all__ = ["BACKENDS", "Backend", "BuiltEntry", "get_backend"]
