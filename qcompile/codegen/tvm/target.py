"""CPU targets: the host's LLVM CPU name and the vector features the kernels choose by.

The machine a module is built on decides its instructions (``-mcpu`` of the host), so an artifact
records the target it was built for and refuses to run where that CPU's features are missing.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import tvm

# features the kernels care about, in LLVM's names
FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512vnni", "avxvnni", "avx512vpopcntdq")


@dataclass(frozen=True)
class CpuTarget:
    mcpu: str  # LLVM CPU name, e.g. "znver3"
    num_cores: int

    @property
    def tvm(self) -> tvm.target.Target:
        return tvm.target.Target({"kind": "llvm", "mcpu": self.mcpu, "num-cores": self.num_cores})

    @functools.cached_property
    def features(self) -> frozenset[str]:
        f = tvm.target.codegen.llvm_get_cpu_features(self.tvm)
        return frozenset(k for k in FEATURES if k in f)

    @property
    def vector_bits(self) -> int:
        return 512 if "avx512f" in self.features else 256

    def describe(self) -> str:
        return f"llvm -mcpu={self.mcpu} ({', '.join(sorted(self.features)) or 'no SIMD features'}), {self.num_cores} threads"

    def to_dict(self) -> dict[str, object]:
        return {"kind": "llvm", "mcpu": self.mcpu, "num_cores": self.num_cores, "features": sorted(self.features)}


def host_target() -> CpuTarget:
    """The CPU this process runs on, with as many threads as TVM will use."""
    threads = int(os.environ.get("TVM_NUM_THREADS", "0")) or (os.cpu_count() or 1)
    return CpuTarget(tvm.target.codegen.llvm_get_system_cpu(), threads)


def missing_features(recorded: dict[str, object]) -> list[str]:
    """Features a module built for ``recorded`` needs that this host lacks."""
    host = host_target()
    return sorted(set(map(str, recorded.get("features", []))) - host.features)  # type: ignore[arg-type]
