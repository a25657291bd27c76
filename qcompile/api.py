"""``qcompile.compile``: capture → passes → backend → CompiledModule."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qcompile.codegen.target import Target, parse_target
from qcompile.errors import QCompileError, TuneError
from qcompile.ir.capture import DEFAULT_MAX_CACHE_LEN, LM_ENTRIES, capture
from qcompile.ir.last_position import trim_prefill_logits
from qcompile.ir.onnx_import import is_onnx_path
from qcompile.ir.program import Program
from qcompile.ir.verify import verify
from qcompile.passes.base import PassContext
from qcompile.passes.manager import PassManager
from qcompile.plan import Plan, get_plan
from qcompile.report import CompileReport
from qcompile.runtime.compiled import CompiledModule

if TYPE_CHECKING:
    from qcompile.tuning.tuner import TuneReport

log = logging.getLogger(__name__)


def compile(
    model: torch.nn.Module | Program | str | Path,
    target: str = "cpu",
    plan: Plan | str | Path = "fp32",
    *,
    example_inputs: Any = None,
    dynamic_shapes: Any = None,
    calib: Any = None,
    backend: str | None = None,
    max_cache_len: int = DEFAULT_MAX_CACHE_LEN,
    lm_entries: tuple[str, ...] = LM_ENTRIES,
    dump_dir: str | Path | None = None,
    tokenizer: Any = None,
    progress: bool = False,
    tuning_db: str | Path | None = None,
) -> CompiledModule:
    """Compile ``model`` for ``target`` under ``plan`` (a Plan, a preset name, or a YAML/JSON path).

    ``model`` is an ``nn.Module`` (a causal LM needs no ``example_inputs``), an ``fx.GraphModule``,
    the path of an ``.onnx`` file (:func:`qcompile.ir.onnx_import.capture_onnx`: its named dims stay
    dynamic; ``example_inputs`` optional) or an already captured :class:`Program` (which is rewritten
    in place). ``lm_entries`` picks
    which of a causal LM's entries to capture (``forward``, ``prefill``, ``decode``).
    ``tuning_db``: a directory ``qcompile tune`` wrote; each kernel gets its best schedule measured on
    this target (records of other CPUs are reported and ignored; nothing is measured here).
    """
    # the plan, its passes' options, the target, the backend and dump_dir are checked before capture
    the_plan, manager, the_target = check_compile_args(plan, target, backend, dump_dir, max_cache_len)
    tuning = None
    if tuning_db is not None:
        from qcompile.tuning.tuner import Applied

        if check_backend(backend, the_target) != "tvm":
            raise QCompileError("a tuning database applies to the tvm backend's kernels, not the torch backend")
        tuning = Applied.open(tuning_db, the_target)
    report = CompileReport(the_plan.name)
    t0 = time.perf_counter()
    if isinstance(model, Program):
        program = model
    elif isinstance(model, torch.nn.Module) or is_onnx_path(model):  # capture imports an .onnx path
        log.info("capturing %s", model if is_onnx_path(model) else type(model).__name__)
        program = capture(
            model,
            example_inputs,
            dynamic_shapes=dynamic_shapes,
            max_cache_len=max_cache_len,
            lm_entries=lm_entries,
            progress=progress,
        )
    else:
        raise QCompileError(
            f"compile() takes an nn.Module, a Program or the path of an .onnx file, not {type(model).__name__}"
            + (f" ({model!r})" if isinstance(model, str | Path) else "")
        )
    verify(program)
    report.capture_seconds = round(time.perf_counter() - t0, 3)
    ctx = PassContext(plan=the_plan, calib=calib, progress=progress)
    program, refined = manager.run(program, ctx, report)
    trimmed, note = trim_prefill_logits(program)
    if note and not trimmed:
        report.warnings.append(note)
    elif note:
        log.info("%s", note)
    report.weight_bytes = program.weight_bytes_by_dtype()
    report.packed_weight_bytes = program.packed_weight_bytes()
    # passes may refine the plan (assign_precision writes per-layer rules): the refined plan is the
    # one the module carries, saves and reports
    return CompiledModule(
        program, refined, target=the_target, backend=backend, report=report, tokenizer=tokenizer, tuning=tuning
    )


def tune(
    model: torch.nn.Module | Program | str | Path,
    plan: Plan | str | Path = "fp32",
    target: str = "cpu",
    *,
    db: str | Path,
    trials: int = 16,
    rpc_tracker: str | None = None,
    rpc_key: str | None = None,
    example_inputs: Any = None,
    dynamic_shapes: Any = None,
    calib: Any = None,
    max_cache_len: int = DEFAULT_MAX_CACHE_LEN,
    lm_entries: tuple[str, ...] = LM_ENTRIES,
    progress: bool = True,
) -> TuneReport:
    """Tune the kernels ``compile(model, target, plan)`` would build, into the database ``db``.

    The model goes through the plan's passes (as ``compile`` would run them), its distinct kernels
    are extracted, and up to ``trials`` candidate schedules of each (the default first) are built here
    and measured here, or on the servers of ``rpc_tracker`` ("HOST:PORT") under ``rpc_key``. Every
    measurement is appended to ``db`` as it is taken; a second call measures only what is missing.
    ``compile(..., tuning_db=db)`` then uses the best of each kernel.
    """
    from qcompile.tuning.tuner import TuneOptions, tune_program

    options = TuneOptions(trials=trials, rpc_tracker=rpc_tracker, rpc_key=rpc_key)
    options.check()
    the_plan, _, the_target = check_compile_args(plan, target, None, None, max_cache_len)
    if the_target.kind != "cpu":
        raise TuneError(f"tuning measures kernels where they run: target {target!r} is not a CPU target")
    cm = compile(
        model,
        target,
        the_plan,
        example_inputs=example_inputs,
        dynamic_shapes=dynamic_shapes,
        calib=calib,
        backend="torch",  # the passes only: the kernels are lowered by the tuner
        max_cache_len=max_cache_len,
        lm_entries=lm_entries,
        progress=progress,
    )
    fc = the_plan.float_compute.value
    return tune_program(cm.program, the_target, db, options, progress=progress, float_compute=fc)


def check_compile_args(
    plan: Plan | str | Path,
    target: str = "cpu",
    backend: str | None = None,
    dump_dir: str | Path | None = None,
    max_cache_len: int = DEFAULT_MAX_CACHE_LEN,
) -> tuple[Plan, PassManager, Target]:
    """Everything about a compile that can be checked without the model, checked in a fraction of
    a second: the plan (read, its passes built from their options, their order), the target (and
    its agreement with the plan's arch), the backend's existence and support for the target,
    ``dump_dir``, ``max_cache_len``. Raises the QCompileError that ``compile`` would raise later.
    The CLI calls it before it loads a model; ``compile`` before it captures."""
    the_plan = get_plan(plan)
    manager = PassManager(the_plan, dump_dir=dump_dir)  # builds every pass from its options, checks the order
    if not isinstance(target, str):
        raise QCompileError(f"target must be a string such as 'cpu' or 'cuda:sm_90', not {type(target).__name__}")
    the_target = parse_target(target, the_plan.arch)  # so do conflicts with the plan's arch
    check_backend(backend, the_target)
    if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 2:
        raise QCompileError(f"max_cache_len must be an integer >= 2 (cache positions), got {max_cache_len!r}")
    return the_plan, manager, the_target


def check_backend(name: str | None, target: Target) -> str:
    """The name of the backend ``name`` (None: the target's default) after checking it exists and
    supports ``target``, without building it (the tvm backend imports TVM, which takes seconds)."""
    from qcompile.codegen import BACKEND_TARGETS, BACKENDS, DEFAULT_BACKEND

    kind = target.kind
    if name is None:
        if kind not in DEFAULT_BACKEND:
            raise QCompileError(f"target {kind!r} has no default backend; backends: {sorted(BACKENDS)}")
        return DEFAULT_BACKEND[kind]
    if not isinstance(name, str) or name not in BACKENDS:
        raise QCompileError(f"unknown backend {name!r}; backends: {sorted(BACKENDS)}")
    if kind not in BACKEND_TARGETS[name]:
        raise QCompileError(
            f"backend {name!r} does not support target {kind!r} (it supports {list(BACKEND_TARGETS[name])})"
        )
    return name


def load(path: str | Path, backend: str | None = None, trust_library: bool | None = None) -> CompiledModule:
    """Load an artifact written by ``CompiledModule.save`` (no source model needed).

    Every file is checked against the manifest first. A compiled backend library in the artifact is
    native code, so ``trust_library`` decides whether it runs: ``None`` loads it only if this user's
    key signed the artifact (one this user saved), ``True`` loads it regardless (you vouch for its
    author), ``False`` never loads it but rebuilds it from the graph and refuses the artifact unless
    the shipped library is byte-identical. ``backend="torch"`` runs the graph without any library.
    """
    from qcompile.runtime.artifact import load_artifact

    return load_artifact(path, backend=backend, trust_library=trust_library)
