"""Row tiles of the lane-blocked template at a dynamic row count (issue 20): ms per call of the
same kernel with 1, 2, 4 and 8 rows per register tile, at prefill-like row counts.

    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/row_tiles.py

A dynamic row count is what prefill and evaluation run; a tile that does not divide it computes whole
tiles (``linear_primfunc`` pads), so the ratio to the 1-row column is the tile's gain. Weights stay in
cache (a kernel this size fits L2/L3): this isolates compute, not memory. Inputs are random.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import tvm

from qcompile.codegen.target import CpuTarget
from qcompile.codegen.tvm.kernels.linear import LinearKernel, TemplateKnobs, linear_primfunc
from qcompile.eval.harness import machine

SPECS = (  # SmolLM2-135M shapes (padded): w4a16 g64 up-projection, w4a16-asym g32 down, w8a8 in the template
    LinearKernel(1536, 576, "u4", 64, 0, 0, False, False, None),
    LinearKernel(576, 1536, "u4", 32, 0, 0, True, False, None),
    LinearKernel(1536, 576, "i8", 576, 8, 0, False, False, None),
)


def _time(lib: tvm.runtime.Module, args: list[tvm.runtime.Tensor], reps: int = 5, rounds: int = 7) -> float:
    lib(*args)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            lib(*args)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="64,128", help="row counts to run the dynamic kernels at")
    a = ap.parse_args()
    target = CpuTarget()
    rng = np.random.default_rng(0)
    print(f"Machine: {machine()}; TVM target: {target.describe()}\n")
    print("| kernel | M | tile 1 | tile 2 | tile 4 | tile 8 | best gain |\n|---|---:|---:|---:|---:|---:|---:|")
    for spec in SPECS:
        d = TemplateKnobs.default(spec)
        libs = {}
        for tile in (1, 2, 4, 8):
            func = linear_primfunc(spec, knobs=TemplateKnobs(tile, d.k_unroll, d.vec))
            func = func.with_attr("global_symbol", "main")
            libs[tile] = (func, tvm.compile(func, target=target.tvm))
        for m in (int(x) for x in a.rows.split(",")):
            ms = {}
            for tile, (func, lib) in libs.items():
                args = []
                for p in func.params:
                    shape = [m if isinstance(s, tvm.tirx.Var) else int(s) for s in p.ty.shape]
                    dt = str(p.ty.dtype)
                    x = rng.standard_normal(shape) if dt.startswith("float") else rng.integers(0, 100, shape)
                    args.append(tvm.runtime.tensor(x.astype(dt)))
                ms[tile] = _time(lib, args) * 1e3
            cells = " | ".join(f"{ms[t]:.3f}" for t in (1, 2, 4, 8))
            print(f"| {spec.name} | {m} | {cells} | {ms[1] / min(ms.values()):.2f}x |")


if __name__ == "__main__":
    main()
