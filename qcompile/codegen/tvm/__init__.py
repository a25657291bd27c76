"""The TVM backend: Program → Relax (TVM's PyTorch importer + the target's kernel rules) →
``tvm.compile`` for the host CPU or a CUDA arch → Relax VM.

One executable holds every entry (``forward``, ``prefill``, ``decode``) as a Relax function. The
runtime's cache tensors are shared with the VM without copies (DLPack), so a decode step writes its
rows into the same cache tensors that ``CompiledModule`` owns. Weights are repacked once into the
kernels' layouts. On the CPU every weight (the Program's state and the repacked tensors) is bound as
a constant of the executable (:func:`bind_weights`): a call passes only the user inputs and the
caches, so the VM checks no weight per call (SmolLM2's decode: 92 arguments instead of ~1200), and
:meth:`_Runner.call_user` repeats a call with new user inputs without per-slot work (``generate()``'s
decode loop). On a GPU the weights stay arguments (device copies made once). ``save`` writes the
compiled library (``export_library``; on the CPU it holds the weights) and, on a GPU, the repacked
tensors; loading an artifact runs that library without rebuilding, after checking the TVM version
and that this CPU has the instructions it was built for.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import tvm
from safetensors.torch import load_file, save_file
from tvm import relax

from qcompile.codegen.base import Backend, BuiltEntry
from qcompile.codegen.target import CudaTarget, Target
from qcompile.codegen.tvm import cuda
from qcompile.codegen.tvm.fallback import fallback_name, register_fallback
from qcompile.codegen.tvm.lower import Lowered, LoweringError, lower_program
from qcompile.codegen.tvm.target import host_target, missing_features
from qcompile.errors import ArtifactError
from qcompile.fileio import sha256_file
from qcompile.ir.program import Program, SlotKind

log = logging.getLogger(__name__)

LIBRARY = "module.so"
PARAMS = "params.safetensors"
INFO = "tvm.json"
FATBIN = "kernels.fatbin"  # CUDA: the nvcc build of the library's device code


# Private switch for benchmarks (benchmarks/decode_profile.py --compare): False builds CPU modules the way
# they were built before issue 21, with every weight passed as an argument on every call.
BIND_WEIGHTS = True


def relax_pipeline(target: tvm.target.Target, tuned: tvm.transform.Pass | None = None) -> tvm.transform.Pass:
    """TVM's CPU pipeline (dead code elimination first). The heavy ops (linear layers, attention,
    cache writes) are qcompile's scheduled kernels; the ordinary fused elementwise/norm kernels are
    left as TVM lowers them (serial loops, vectorized by LLVM). dlight's CPU ``Reduction`` rule is
    deliberately not applied: on a one-row RMSNorm (decode) it parallelizes over the output
    elements while every iteration re-runs the row's reduction into one shared buffer (576× the
    work, and a data race), measured at 0.15 ms per norm on SmolLM2. ``tuned``: a pass that gives
    the ordinary kernels the schedules of a tuning database, right after legalization
    (:func:`qcompile.tuning.ordinary.apply_pass`)."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    return cuda.backend_pipeline(target, cpu_generic, () if tuned is None else (tuned,))


def _to_tvm(t: torch.Tensor) -> tvm.runtime.Tensor:
    """Share ``t`` with TVM (which needs 64-byte aligned data: tensors read from a memory-mapped
    file may not be, and are copied once)."""
    if not t.is_contiguous() or t.data_ptr() % 64:
        t = t.contiguous().clone()  # torch's CPU allocator aligns to 64 bytes
    return tvm.runtime.from_dlpack(t)


def _share(t: torch.Tensor, device: str) -> tvm.runtime.Tensor:
    """``t`` for the VM: shared in place on the CPU, a device copy on a GPU."""
    return _to_tvm(t) if device == "cpu" else tvm.runtime.from_dlpack(t.to(device).contiguous())


class _Runner:
    """Calls one Relax function with the entry's slot tensors plus the repacked weights.

    On a GPU (``device="cuda"``) state and cache tensors get device copies made once and kept: the
    caches' rows are written in place on the device (the host cache tensors are not updated), user
    inputs are copied per call and outputs come back to the host."""

    def __init__(
        self,
        fn: Any,
        kinds: list[SlotKind],
        extras: list[tvm.runtime.Tensor],
        device: str = "cpu",
        name: str = "",
        bound: bool = False,
    ) -> None:
        self.fn = fn
        self.name = name
        self.weights_bound = bound  # the weights are constants of the executable: state slots are not passed
        self.kinds = kinds
        self.extras = extras
        self.device = device
        self.bound: dict[int, tuple[torch.Tensor, tvm.runtime.Tensor]] = {}
        self._last: list[Any] | None = None  # the arguments of the last full call
        passed = [k for k in kinds if not (k is SlotKind.STATE and bound)]
        self._user_at = [i for i, k in enumerate(passed) if k is SlotKind.USER]

    def __call__(self, args: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        self._last = self._tvm_args(args)
        return self._run(self._last)

    def call_user(self, user: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        """Call again with new user inputs (in order) and the state and cache tensors of the last
        :meth:`__call__` (the caller guarantees they are the same tensors): no per-slot work."""
        if self._last is None:
            raise RuntimeError("call_user() needs a full call first")
        tv = list(self._last)
        for i, a in zip(self._user_at, user, strict=True):
            tv[i] = _share(a, self.device)
        return self._run(tv)

    def _run(self, tv: list[Any]) -> Sequence[torch.Tensor]:
        out = self.fn(*tv, *self.extras)
        return [torch.from_dlpack(o).to("cpu") for o in out]

    def prepare(self, args: Sequence[torch.Tensor], vm: Any = None) -> tuple[Any, list[Any]]:
        """The VM function (of ``vm`` when given: another VM on the same executable) and the arguments
        one call passes it: what :mod:`.profile` times without the runner around it."""
        fn = self.fn if vm is None else vm[self.name]
        return fn, [*self._tvm_args(args), *self.extras]

    def _tvm_args(self, args: Sequence[torch.Tensor]) -> list[Any]:
        tv = []
        for i, (kind, a) in enumerate(zip(self.kinds, args)):
            if kind is SlotKind.USER:
                tv.append(_share(a, self.device))
                continue
            if kind is SlotKind.STATE and self.weights_bound:
                continue
            hit = self.bound.get(i)
            if hit is None or hit[0] is not a:  # state and cache tensors are stable: convert once
                if kind is SlotKind.CACHE and self.device == "cpu" and (not a.is_contiguous() or a.data_ptr() % 64):
                    raise ValueError(
                        f"cache slot {i} is not contiguous and 64-byte aligned; the VM could not update it in place"
                    )
                hit = self.bound[i] = (a, _share(a, self.device))
            tv.append(hit[1])
        return tv


def bind_weights(
    mod: tvm.IRModule, program: Program, extra_params: dict[str, list[str]], params: dict[str, torch.Tensor]
) -> tvm.IRModule:
    """``mod`` with every entry's weights (its state slots and repacked tensors) bound as constants
    (shared with the torch tensors, not copied), so a call passes only the user inputs and the caches:
    the VM checks no weight's shape per call and reads weights from its constant pool."""
    shared: dict[str, tvm.runtime.Tensor] = {}

    def tensor(key: str, t: torch.Tensor) -> tvm.runtime.Tensor:
        if key not in shared:  # one tvm.runtime.Tensor per weight, whichever entries use it
            shared[key] = _to_tvm(t)
        return shared[key]

    for name, entry in program.entries.items():
        binding = {
            node.name: tensor("state:" + slot.name, program.state[slot.name])
            for node, slot in entry.bindings().items()
            if slot.kind is SlotKind.STATE
        }
        binding.update({k: tensor("param:" + k, params[k]) for k in extra_params[name]})
        mod = relax.transform.BindParams(name, binding)(mod)
    return mod


class _NoDevice:
    """An entry of a CUDA module built where no GPU is: calling it explains instead of crashing."""

    def __init__(self, arch: str) -> None:
        self.arch = arch

    def __call__(self, args: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        raise RuntimeError(
            f"this module was compiled for CUDA {self.arch} but this machine has no CUDA device visible to TVM; "
            "save it (cm.save) and load it on a machine with the GPU: the kernels are already compiled"
        )


class TVMBackend(Backend):
    name: ClassVar[str] = "tvm"
    targets: ClassVar[tuple[str, ...]] = ("cpu", "cuda")

    def __init__(self) -> None:
        self.executable: Any = None
        self.params: dict[str, torch.Tensor] = {}
        self.info: dict[str, Any] = {}
        self.fatbin: bytes | None = None

    # ---- build ------------------------------------------------------------------------------
    def build(
        self,
        program: Program,
        target: Target,
        *,
        allow_fallback: bool = False,
        artifact: Path | None = None,
        tuning: Any = None,
        float_compute: str = "fp32",
    ) -> dict[str, BuiltEntry]:
        if artifact is None:
            self._compile(program, allow_fallback, target, tuning, float_compute)
            return self._entries(program)
        self._load(program, artifact)
        try:
            return self._entries(program)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a tvm.json that does not fit the library
            raise ArtifactError(
                f"the compiled library in {artifact} does not fit the artifact's graph ({type(e).__name__}: "
                f"{str(e).strip()[:300]}); re-create the artifact, or load it with backend='torch'"
            ) from None

    def _entries(self, program: Program) -> dict[str, BuiltEntry]:
        built: dict[str, BuiltEntry] = {}
        arch = self.info["target"].get("arch")
        if arch is not None:
            if not tvm.cuda().exist:
                return {name: _NoDevice(arch) for name in program.entries}
            cuda.check_device(arch)
            vm = relax.VirtualMachine(self.executable, tvm.cuda())
        else:
            vm = relax.VirtualMachine(self.executable, tvm.cpu())
        device = "cpu" if arch is None else "cuda"
        bound = bool(self.info.get("bound_weights"))
        for name, entry in program.entries.items():
            extras = [] if bound else [_share(self.params[k], device) for k in self.info["extra_params"][name]]
            built[name] = _Runner(vm[name], [s.kind for s in entry.slots], extras, device, name, bound)
        return built

    def _compile(
        self, program: Program, allow_fallback: bool, target: Target, tuning: Any = None, float_compute: str = "fp32"
    ) -> None:
        t0 = time.perf_counter()
        lowered: Lowered = lower_program(program, target, allow_fallback, tuning=tuning, float_compute=float_compute)
        t1 = time.perf_counter()
        gpu = target if isinstance(target, CudaTarget) else None
        with torch.no_grad():
            self.params = {k: f(program.state).contiguous() for k, f in lowered.repacks.items()}
        bind = gpu is None and BIND_WEIGHTS
        mod = bind_weights(lowered.mod, program, lowered.extra_params, self.params) if bind else lowered.mod
        if gpu is None:
            pipeline = relax_pipeline(target.tvm, None if tuning is None else tuning.ordinary_pass())
        else:
            pipeline = cuda.relax_pipeline(target.tvm)
        self.executable = tvm.compile(mod, target=target.tvm, relax_pipeline=pipeline)
        t2 = time.perf_counter()
        extra: dict[str, Any] = {}
        if gpu is not None:  # ahead of time: nvcc now, the fatbin answers the load-time hook
            source = cuda.device_source(self.executable)
            self.fatbin = cuda.compile_fatbin(source, gpu.arch)
            cuda.install_fatbins({cuda.source_key(source): self.fatbin})
            extra = {
                "cuda_source_sha256": cuda.source_key(source),
                "generic_kernels": lowered.generic,
                "nvcc_seconds": round(time.perf_counter() - t2, 3),
            }
        self.info = {
            "target": target.to_dict(),
            "target_description": target.describe(),
            "tvm_version": tvm.__version__,
            "extra_params": lowered.extra_params,
            # CPU: weights (state slots and repacked tensors) are constants of the executable, not arguments
            "bound_weights": bind,
            "fallbacks": lowered.fallbacks,
            "kernels": lowered.kernels,
            "kernel_choices": lowered.choices,
            **({"float_compute": lowered.float_compute} if lowered.float_compute else {}),
            **({"tuning": {**tuning.summary(), "kernels": tuning.used}} if tuning is not None else {}),
            "lower_seconds": round(t1 - t0, 3),
            "build_seconds": round(t2 - t1, 3),
            **extra,
        }
        log.info("tvm backend: %s, lowered in %.1fs, built in %.1fs", target.describe(), t1 - t0, t2 - t1)

    # ---- artifacts --------------------------------------------------------------------------
    def save(self, directory: Path) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        info = {k: v for k, v in self.info.items() if k != "loaded_prebuilt"}
        self.executable.export_library(str(directory / LIBRARY))
        # bound weights are inside the library already; the file stays (empty) so that every artifact has it
        save_file({} if info.get("bound_weights") else self.params, str(directory / PARAMS))
        (directory / INFO).write_text(json.dumps(info, indent=1), encoding="utf-8")
        written = [directory / LIBRARY, directory / PARAMS, directory / INFO]
        if self.fatbin is not None:
            (directory / FATBIN).write_bytes(self.fatbin)
            written.append(directory / FATBIN)
        return written

    def library_digests(self) -> dict[str, str]:
        with tempfile.TemporaryDirectory(prefix="qcompile-rebuilt-") as tmp:
            self.executable.export_library(str(Path(tmp) / LIBRARY))
            digests = {LIBRARY: sha256_file(Path(tmp) / LIBRARY)}
        if self.fatbin is not None:
            digests[FATBIN] = hashlib.sha256(self.fatbin).hexdigest()
        return digests

    def _load(self, program: Program, directory: Path) -> None:
        """Load what :meth:`save` wrote (the artifact layer has checked every file's sha256 and
        decided the library may be loaded); anything missing or unloadable is an ArtifactError."""
        try:
            self._load_files(program, directory)
        except ArtifactError:
            raise
        # TVM's own errors are RuntimeError kinds
        except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration, RuntimeError) as e:
            raise ArtifactError(
                f"the compiled library in {directory} cannot be loaded ({type(e).__name__}: {str(e).strip()[:300]}); "
                "re-create the artifact, or load it with backend='torch'"
            ) from None

    def _load_files(self, program: Program, directory: Path) -> None:
        missing = [n for n in (INFO, PARAMS, LIBRARY) if not (directory / n).is_file()]
        if missing:
            raise ArtifactError(
                f"{directory} is incomplete: {', '.join(missing)} missing; re-create the artifact, or load it "
                "with backend='torch'"
            )
        info = json.loads((directory / INFO).read_text(encoding="utf-8"))
        if info.get("tvm_version") != tvm.__version__:
            raise ArtifactError(
                f"{directory} was built with TVM {info.get('tvm_version')}, this is TVM {tvm.__version__}; "
                "recompile the model (or load it with backend='torch')"
            )
        lacking = missing_features(info["target"]) if info["target"].get("kind", "llvm") != "cuda" else []
        if lacking:
            raise ArtifactError(
                f"{directory} was built for {info.get('target_description')}; this CPU "
                f"({host_target().describe()}) lacks {', '.join(lacking)}. Recompile on this machine "
                "or load it with backend='torch'"
            )
        for item in info.get("fallbacks", []):
            ename, rest = item.split(":", 1)
            nname = rest.split(" ", 1)[0]
            node = next(n for n in program.entries[ename].graph.graph.nodes if n.name == nname)
            register_fallback(fallback_name(ename, nname), node)
        self.params = load_file(str(directory / PARAMS))
        self.info = {**info, "loaded_prebuilt": True}
        if info["target"].get("kind") == "cuda":
            self.fatbin = (directory / FATBIN).read_bytes()
            if not tvm.cuda().exist:  # TVM cannot even deserialize CUDA modules without the driver
                return
            cuda.install_fatbins({info["cuda_source_sha256"]: self.fatbin})
        self.executable = tvm.runtime.load_module(str(directory / LIBRARY))


__all__ = ["LoweringError", "TVMBackend", "relax_pipeline"]
