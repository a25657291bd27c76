"""In-place cache writes: ``cache.index_copy_(dim, index, src)`` as a TIR kernel that the Relax
function calls with ``call_tir_inplace``, so a decode step writes its rows into the cache tensor the
runtime owns instead of copying the whole cache."""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm.script import tirx as T  # noqa: F401  (used by the generated TVMScript)

from qcompile.codegen.tvm.kernels.cuda import with_root


@dataclass(frozen=True)
class IndexCopy:
    shape: tuple[int, ...]  # the cache's (static) shape
    dtype: str
    dim: int
    rows: int | None  # rows written per call; None: dynamic
    cuda: bool = False  # thread-bound for GPUs

    @property
    def name(self) -> str:
        rows = "dyn" if self.rows is None else self.rows
        shape, cuda = "x".join(map(str, self.shape)), "_cuda" if self.cuda else ""
        return f"qc_index_copy_{shape}_{self.dtype}_d{self.dim}_r{rows}{cuda}"


def index_copy_primfunc(spec: IndexCopy) -> tvm.tirx.PrimFunc:
    """``cache[..., index[t], ...] = src[..., t, ...]`` along ``spec.dim`` (cache is argument 0 and
    is updated in place; indices are not checked, the caller keeps them below the cache length)."""
    rank = len(spec.shape)
    names = [f"i{a}" for a in range(rank)]
    t = "t" if spec.rows is None else str(spec.rows)
    src_shape = [str(s) if a != spec.dim else t for a, s in enumerate(spec.shape)]
    cache_idx = [n if a != spec.dim else f"index[{n}]" for a, n in enumerate(names)]
    decl = "t = T.int64()" if spec.rows is None else ""
    store = f"cache[{', '.join(cache_idx)}] = src[{', '.join(names)}]"
    if spec.cuda:  # one thread per source element: unravel a flat index (no thread-free loops on GPUs)
        total = " * ".join(f"({d})" for d in src_shape)
        unravel = [
            f"{n} = (flat // ({' * '.join(f'({d})' for d in src_shape[a + 1 :]) or '1'})) % ({src_shape[a]})"
            for a, n in enumerate(names)
        ]
        ind = "\n" + " " * 16
        body = f"""for bx in T.thread_binding(({total} + 255) // 256, thread="blockIdx.x"):
        for tx in T.thread_binding(256, thread="threadIdx.x"):
            flat = bx * 256 + tx
            if flat < {total}:
                {ind.join(unravel)}
                {store}"""
    else:
        body = f"""for {", ".join(names)} in T.grid({", ".join(src_shape)}):
        {store}"""
    src = f"""
@T.prim_func(private=True)
def main(cache: T.Buffer(({", ".join(map(str, spec.shape))},), "{spec.dtype}"), index_h: T.handle, src_h: T.handle):
    T.func_attr({{"tir.noalias": True, "op_pattern": 8, "tir.is_scheduled": True, "tirx.is_scheduled": True}})
    {decl}
    index = T.match_buffer(index_h, ({t},), "int64")
    src = T.match_buffer(src_h, ({", ".join(src_shape)},), "{spec.dtype}")
    {body}
"""
    func = tvm.script.from_source(src)
    return with_root(func) if spec.cuda else func
