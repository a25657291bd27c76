"""Targets: the target string parsed once into a :class:`CpuTarget` or a :class:`CudaTarget`.

``parse_target(target, plan_arch)`` takes the forms users write (``"cpu"``, ``"cuda"``,
``"cuda:sm_86"``, ``"cuda -arch=sm_86"``) and the plan's ``arch``, reconciles them (``"cuda"`` with
a plan arch is that arch) or refuses a conflict naming both, and checks the CUDA arch. It imports
no TVM: ``compile`` calls it before capture, and the torch backend (CPU only) runs without TVM.

A target owns the TVM backend's kernel rules (:attr:`CpuTarget.rules`, :attr:`CudaTarget.rules`,
imported from ``qcompile.codegen.tvm`` when first asked): ordered per op kind, each returning None
when it does not apply, the generic rule last. The host CPU's LLVM name and features are read from
LLVM (through TVM) only when asked.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from qcompile.errors import QCompileError

if TYPE_CHECKING:
    import tvm

    from qcompile.codegen.tvm.rules import KernelRules

TARGETS = ("cpu", "cuda")
FORMS = "'cpu', 'cuda', 'cuda:sm_90' or 'cuda -arch=sm_90'"

ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
DEFAULT_ARCH = "sm_90"  # the lent H100 (see DESIGN.md); pass ``cuda:sm_XX`` or ``Plan.arch`` for others
# Why an older arch is refused: the instruction a kernel needs and the first arch that has it.
_NEEDS = (  # the most basic missing instruction is named first
    (75, "binary/int8 mma.sync (mma .b1 .xor.popc, m8n8k16 .s8) needs sm_75"),
    (80, "mma.sync m8n8k128 .b1 with .and.popc (bit-serial INT6) and m16n8k32 .s8 need sm_80"),
)

# features the CPU kernels care about, in LLVM's names
FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512vnni", "avxvnni", "avx512vpopcntdq", "avx512bf16")


class TargetError(QCompileError):
    """A target string that names no target qcompile builds for."""


class CudaTargetError(TargetError):
    """A CUDA target the kernels cannot be built for."""


class ArchConflictError(CudaTargetError):
    """The target string and the plan's ``arch`` ask for different things (names both)."""


@dataclass(frozen=True)
class CpuTarget:
    """A CPU: LLVM's name for it and the threads kernels use. ``CpuTarget()`` (what ``"cpu"`` parses
    to) is the host: its name comes from LLVM, its threads from ``TVM_NUM_THREADS`` or the CPU count,
    both when first asked."""

    mcpu: str | None = None  # LLVM CPU name, e.g. "znver3"; None: the host's
    num_cores: int | None = None  # None: the host's

    kind: ClassVar[str] = "cpu"

    @functools.cached_property
    def llvm_cpu(self) -> str:
        if self.mcpu is not None:
            return self.mcpu
        import tvm

        return str(tvm.target.codegen.llvm_get_system_cpu())

    @functools.cached_property
    def threads(self) -> int:
        return self.num_cores or int(os.environ.get("TVM_NUM_THREADS", "0")) or (os.cpu_count() or 1)

    @property
    def tvm(self) -> tvm.target.Target:
        import tvm

        return tvm.target.Target({"kind": "llvm", "mcpu": self.llvm_cpu, "num-cores": self.threads})

    @functools.cached_property
    def features(self) -> frozenset[str]:
        import tvm

        f = tvm.target.codegen.llvm_get_cpu_features(self.tvm)
        return frozenset(k for k in FEATURES if k in f)

    @property
    def vector_bits(self) -> int:
        return 512 if "avx512f" in self.features else 256

    @property
    def rules(self) -> KernelRules:
        """The TVM backend's kernel rules for CPUs (:mod:`qcompile.codegen.tvm.rules_cpu`)."""
        from qcompile.codegen.tvm.rules_cpu import CPU_RULES

        return CPU_RULES

    def describe(self) -> str:
        features = ", ".join(sorted(self.features)) or "no SIMD features"
        return f"llvm -mcpu={self.llvm_cpu} ({features}), {self.threads} threads"

    def to_dict(self) -> dict[str, object]:
        return {"kind": "llvm", "mcpu": self.llvm_cpu, "num_cores": self.threads, "features": sorted(self.features)}

    def __str__(self) -> str:
        return "cpu"


@dataclass(frozen=True)
class CudaTarget:
    """An NVIDIA GPU arch (checked by :func:`parse_target`)."""

    arch: str
    text: str = field(default="", compare=False)  # the target string as written (the plan's arch filled in)

    kind: ClassVar[str] = "cuda"

    @property
    def sm(self) -> int:
        return int(self.arch[3:])

    @property
    def tvm(self) -> tvm.target.Target:
        import tvm

        # host code for a generic x86-64 (the GPU machine's CPU is not this one)
        return tvm.target.Target({"kind": "cuda", "arch": self.arch}, host={"kind": "llvm"})

    @property
    def rules(self) -> KernelRules:
        """The TVM backend's kernel rules for CUDA (:mod:`qcompile.codegen.tvm.rules_cuda`)."""
        from qcompile.codegen.tvm.rules_cuda import CUDA_RULES

        return CUDA_RULES

    def describe(self) -> str:
        return f"cuda {self.arch}"

    def to_dict(self) -> dict[str, object]:
        return {"kind": "cuda", "arch": self.arch}

    def __str__(self) -> str:
        return self.text or f"cuda:{self.arch}"


Target = CpuTarget | CudaTarget


def target_kind(target: str | Any) -> str:
    """``"cpu"`` or ``"cuda"`` (or whatever a malformed string starts with) of a string or a Target."""
    if isinstance(target, (CpuTarget, CudaTarget)):
        return target.kind
    parts = str(target).split()
    return parts[0].split(":")[0] if parts else ""


def parse_target(target: str, plan_arch: str | None = None) -> Target:
    """The Target for ``target`` (one of :data:`FORMS`) under a plan whose ``arch`` is ``plan_arch``.

    ``"cuda"`` takes the plan's arch (else :data:`DEFAULT_ARCH`); a string that names another arch
    than the plan, or a CPU target with a plan arch, is an :class:`ArchConflictError`. Archs before
    sm_80 are refused with the instruction they lack."""
    text = target.strip()
    kind = target_kind(text)
    if kind not in TARGETS:
        raise TargetError(f"unknown target {target!r}; targets: {list(TARGETS)} (written {FORMS})")
    if kind == "cpu":
        if text != "cpu":
            raise TargetError(f"cannot parse target {target!r}: the CPU target is 'cpu' (built for this host)")
        if plan_arch is not None:
            raise ArchConflictError(
                f"the plan names CUDA arch {plan_arch} but the target is {target!r}; compile for 'cuda' "
                f"(or 'cuda:{plan_arch}'), or drop `arch` from the plan"
            )
        return CpuTarget()
    m = re.fullmatch(r"cuda(?::(\S+)|\s+-arch=(\S+))?", text)
    if m is None:
        raise CudaTargetError(f"cannot parse CUDA target {target!r}; write 'cuda', 'cuda:sm_90' or 'cuda -arch=sm_90'")
    named = m.group(1) or m.group(2)
    if named and plan_arch and named != plan_arch:
        raise ArchConflictError(
            f"the target {target!r} names {named} but the plan names {plan_arch}; "
            "write the same arch in both, or name it in one"
        )
    chosen = named or plan_arch or DEFAULT_ARCH
    mm = re.fullmatch(r"sm_(\d+)a?", chosen)
    if mm is None:
        raise CudaTargetError(f"unknown CUDA arch {chosen!r}; supported: {', '.join(ARCHS)}")
    sm = int(mm.group(1))
    for first, why in _NEEDS:
        if sm < first:
            raise CudaTargetError(f"{chosen} is not supported: {why}. Supported: {', '.join(ARCHS)}")
    if chosen not in ARCHS:
        raise CudaTargetError(
            f"{chosen} is not one of the archs qcompile's kernels are built and tested for ({', '.join(ARCHS)}); "
            "an 'a' suffix also disables TVM's tensor-core schedules"
        )
    return CudaTarget(chosen, text if named or plan_arch is None else f"cuda:{chosen}")


__all__ = [
    "ARCHS",
    "ArchConflictError",
    "CpuTarget",
    "CudaTarget",
    "CudaTargetError",
    "Target",
    "TargetError",
    "parse_target",
]
