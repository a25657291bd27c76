"""Kernel selection by measurement: for a W6 linear with integer activations, time the unpack-to-int
kernel and the bit-serial kernel on this CPU at the layer's shape and keep the faster one. For
CUDA targets the choice comes from GPU measurements recorded in ``cuda_choices.json`` (the build
machine has no GPU to time on), else from a documented per-arch default.

Measured once per (shape, rows) and process; a dynamic number of rows is measured at
:data:`DYNAMIC_ROWS`. Both timings and the choice go into the build report.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tvm

from qcompile.codegen.target import CpuTarget
from qcompile.codegen.tvm.kernels.bitserial import act_planes_primfunc, bitserial_primfunc
from qcompile.codegen.tvm.kernels.linear import QuantRows, linear_primfunc, quant_rows_primfunc
from qcompile.codegen.tvm.recipe import LinearRecipe

DYNAMIC_ROWS = 64
REPEATS = 20


def _best_ms(fn: Any, args: list[Any]) -> float:
    fn(*args)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(REPEATS):
            fn(*args)
        best = min(best, (time.perf_counter() - t0) / REPEATS * 1e3)
    return best


def measure_w6(recipe: LinearRecipe, m: int | None, target: CpuTarget) -> dict[str, Any]:
    """Milliseconds of both W6 kernels for ``recipe`` at ``m`` rows on ``target`` (activation
    quantization included in both), and the choice. Layers whose kernels have the same padded shape
    share one measurement."""
    spec = recipe.kernel(m)
    return _measure(replace(recipe, n=spec.n, k=spec.k, group=spec.group), m, target)


@functools.cache
def _measure(recipe: LinearRecipe, m: int | None, target: CpuTarget) -> dict[str, Any]:
    if recipe.bitserial(m) is None:
        return {"chosen": "unpack", "reason": "no bit-serial form for this shape"}
    rows = m or DYNAMIC_ROWS
    tvm_target = target.tvm
    spec = recipe.kernel(rows)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-31, 32, (spec.n, spec.k), generator=g)
    x = torch.randn(rows, spec.k, generator=g)
    scales = torch.rand(spec.n, spec.groups, generator=g)
    tv = lambda t: tvm.runtime.tensor(t.contiguous().numpy())  # noqa: E731
    zeros = lambda shape, dt: tvm.runtime.tensor(np.zeros(shape, dt))  # noqa: E731
    qspec = QuantRows(spec.k, spec.act_bits, spec.act_group, rows)
    quant = tvm.compile(quant_rows_primfunc(qspec), target=tvm_target)
    qx, sx = zeros((rows, spec.k), "int8"), zeros((rows, qspec.groups), "float32")
    xt = tv(x)

    unpack = tvm.compile(linear_primfunc(spec), target=tvm_target)
    uw = [tv(t) for t in recipe.pack(spec, codes, scales)]
    y = zeros((rows, spec.n), "float32")

    def run_unpack() -> None:
        quant(xt, qx, sx)
        unpack(qx, sx, *uw, y)

    bs = recipe.bitserial(rows)
    assert bs is not None
    planes_f = tvm.compile(act_planes_primfunc(bs), target=tvm_target)
    serial = tvm.compile(bitserial_primfunc(bs), target=tvm_target)
    planes = zeros((bs.a_bits, rows, spec.k // 32), "int32")
    bw, bscale = (tv(t) for t in recipe.pack_bitserial(bs, codes, scales))
    yb = zeros((rows, bs.n), "float32")

    def run_bitserial() -> None:
        quant(xt, qx, sx)
        planes_f(qx, planes)
        serial(planes, sx, bw, bscale, yb)

    ms_unpack, ms_serial = _best_ms(run_unpack, []), _best_ms(run_bitserial, [])
    chosen = "bitserial" if ms_serial < ms_unpack else "unpack"
    return {"unpack_ms": round(ms_unpack, 4), "bitserial_ms": round(ms_serial, 4), "rows": rows, "chosen": chosen}


# ---- CUDA: unpack-to-int8 (u6) vs bit-serial (b1) for W6 ---------------------------------------

CUDA_CHOICES = Path(__file__).with_name("cuda_choices.json")
# Without a measurement: bit-serial where the arch lists binary tensor-core throughput (Ampere and
# Ada, FlexQ's setting), unpack + int8 MMA on Hopper, whose tables list no INT4/binary throughput.
CUDA_W6_DEFAULT = {"sm_80": "b1", "sm_86": "b1", "sm_89": "b1", "sm_90": "u6"}


@functools.lru_cache(maxsize=1)
def _cuda_measurements() -> dict[str, Any]:
    if not CUDA_CHOICES.is_file():
        return {}
    return json.loads(CUDA_CHOICES.read_text(encoding="utf-8"))


def cuda_w6_choice(arch: str, n: int, k: int, act_bits: int) -> dict[str, Any]:
    """The W6 kernel for (arch, N×K, activation bits): a measurement recorded by
    ``benchmarks/gpu_check.py --write-choices`` (in ``cuda_choices.json``), else the arch's default."""
    per_arch = _cuda_measurements().get(arch, {})
    hit = per_arch.get("choices", {}).get(f"{n}x{k}/a{act_bits}")
    if hit is not None:
        return {**hit, "source": f"measured on {per_arch.get('card', '?')} ({per_arch.get('date', '?')})"}
    return {"chosen": CUDA_W6_DEFAULT[arch], "source": f"default for {arch} (no measurement for {n}x{k}/a{act_bits})"}
