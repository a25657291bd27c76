"""qcompile's own TIR kernels for the TVM backend (CPU): linear layers in every weight format,
activation quantization, attention and in-place cache writes. ``BENCH_KERNELS`` (stand-alone
callables for benchmarks/kernels.py) is imported on first use."""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "BENCH_KERNELS":
        from qcompile.codegen.tvm.kernels.bench import BENCH_KERNELS

        return BENCH_KERNELS
    raise AttributeError(name)
