"""The CUDA target: device checks, ahead-of-time nvcc builds, and the Relax pipeline for GPUs (the arch
itself is parsed and checked by :func:`qcompile.codegen.target.parse_target`).

TVM 0.27's CUDA codegen keeps the generated CUDA source in the module and compiles it when the
module is loaded, through the ``tvm_callback_cuda_compile`` hook. qcompile compiles that source
with nvcc at build time instead (one fatbin per artifact, for the chosen arch) and stores it next
to the library; at load time :func:`install_fatbins` answers the hook with the stored fatbin, keyed
by the source's sha256, so the machine that runs the module needs no compiler. A source the
artifact has no fatbin for is an error, never a silent JIT compile.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi

from qcompile.codegen.target import ARCHS, DEFAULT_ARCH, CudaTarget, CudaTargetError, parse_target  # noqa: F401  (re-exported)


def cuda_target(target: str, arch: str | None = None) -> CudaTarget:
    """``"cuda"``, ``"cuda:sm_86"`` or ``"cuda -arch=sm_86"`` (+ an arch from the plan) → a checked
    target (:func:`qcompile.codegen.target.parse_target`, for CUDA strings only)."""
    parsed = parse_target(target, arch)
    if not isinstance(parsed, CudaTarget):
        raise CudaTargetError(f"{target!r} is not a CUDA target; write 'cuda', 'cuda:sm_90' or 'cuda -arch=sm_90'")
    return parsed


def check_device(arch: str) -> None:
    """Refuse a GPU older than the arch the fatbin was built for (newer ones JIT its PTX)."""
    version = tvm.cuda().compute_version  # e.g. "9.0"
    have = int(version.replace(".", ""))
    if have < int(arch[3:]):
        raise CudaTargetError(
            f"this module was built for {arch}; this GPU is sm_{have}. Recompile with target 'cuda:sm_{have}'"
        )


def nvcc_path() -> str | None:
    return shutil.which("nvcc")


def _nvcc(source: str, arch: str, fmt: str) -> bytes:
    """nvcc without ``--use_fast_math`` (TVM's helper adds it): activation codes divide by the scale
    exactly as the reference does."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise CudaTargetError(
            "nvcc is not on PATH: CUDA kernels are compiled ahead of time and need the CUDA toolkit at build time"
        )
    sm = arch[3:]
    with tempfile.TemporaryDirectory(prefix="qcompile-nvcc-") as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / f"kernels.{fmt}"
        src.write_text(source, encoding="utf-8")
        cmd = [
            nvcc,
            f"--{fmt}",
            "-O3",
            "-gencode",
            f"arch=compute_{sm},code=[sm_{sm},compute_{sm}]"
            if fmt == "fatbin"
            else f"arch=compute_{sm},code=compute_{sm}"
            if fmt == "ptx"
            else f"arch=compute_{sm},code=sm_{sm}",
            "-U__CUDA_NO_HALF_OPERATORS__",
            "-U__CUDA_NO_HALF_CONVERSIONS__",
            "--expt-relaxed-constexpr",
            "-diag-suppress=177,550",
            "-o",
            str(out),
            str(src),
        ]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            raise CudaTargetError(f"nvcc failed for {arch}:\n{run.stderr[-4000:]}")
        return out.read_bytes()


def compile_fatbin(source: str, arch: str) -> bytes:
    """nvcc ``-fatbin`` for ``arch`` (SASS plus PTX)."""
    return _nvcc(source, arch, "fatbin")


def compile_ptx(source: str, arch: str) -> str:
    return _nvcc(source, arch, "ptx").decode()


def device_source(executable: tvm.runtime.Executable | tvm.runtime.Module) -> str:
    """The CUDA source of a module built by ``tvm.compile`` for a CUDA target."""
    mod = getattr(executable, "mod", executable)
    found, todo = [], list(mod.imports)
    while todo:  # the device module hangs under the host (llvm) module
        m = todo.pop()
        if m.kind == "cuda":
            found.append(m)
        else:
            todo.extend(m.imports)
    cuda = found
    if len(cuda) != 1:
        raise CudaTargetError(f"expected one CUDA module in the build, found {len(cuda)}")
    return cuda[0].inspect_source()


def source_key(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


_FATBINS: dict[str, bytes] = {}


def install_fatbins(fatbins: dict[str, bytes]) -> None:
    """Answer TVM's load-time CUDA compile hook with prebuilt fatbins (keyed by :func:`source_key`)."""
    _FATBINS.update(fatbins)

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _prebuilt(code: str, *_target: object) -> bytes:
        key = source_key(code)
        if key not in _FATBINS:
            raise CudaTargetError(
                f"no ahead-of-time fatbin for CUDA source {key[:12]}: the artifact was built by another "
                "qcompile/TVM version or is damaged; recompile it"
            )
        return _FATBINS[key]


def relax_pipeline(target: tvm.target.Target) -> tvm.transform.Pass:
    """TVM's CUDA pipeline: qcompile's kernels come scheduled; every other TIR function (norms,
    rotary embeddings, attention, fp32 linears) gets dlight's default GPU schedules."""
    from tvm.relax.backend.cuda import pipeline as cuda_passes

    return backend_pipeline(target, cuda_passes)


def front_passes(target: tvm.target.Target, passes: Any) -> list[tvm.transform.Pass]:
    """Data moves as views (:mod:`.views`), dead-code elimination, common subexpressions, library
    dispatch and legalization (Relax ops to fused TIR functions) of a TVM backend module's pass lists:
    what runs before the TIR functions are scheduled."""
    from tvm import relax

    from qcompile.codegen.tvm.views import MovesAsViews

    return (
        [
            # one-token transposes, same-dtype casts and reshape chains: views (or nothing) instead of copy
            # kernels; what they read through is left dead for the next pass
            MovesAsViews(),
            relax.transform.DeadCodeElimination(),  # e.g. the KV repeats the attention kernel reads around
            # one value per repeated expression: the captured graph reads e.g. ``cache_position[0]`` once
            # per layer, which would otherwise cost two kernel calls per layer and step
            relax.transform.EliminateCommonSubexpr(),
        ]
        + passes.library_dispatch_passes(target)
        + passes.legalize_passes(target)
    )


def backend_pipeline(
    target: tvm.target.Target, passes: Any, after_legalize: tuple[tvm.transform.Pass, ...] = ()
) -> tvm.transform.Pass:
    """:func:`front_passes`, then ``after_legalize`` (e.g. tuned schedules), then the backend
    module's dataflow-lowering and finalization pass lists, under ``target``."""

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                front_passes(target, passes)
                + list(after_legalize)
                + passes.dataflow_lower_passes(target)
                + passes.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline
