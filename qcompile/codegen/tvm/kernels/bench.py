"""qcompile's linear kernels as stand-alone callables, for benchmarks/kernels.py.

``BENCH_KERNELS[name](weight_fp32[N, K], M)`` quantizes the weight as the matching preset does,
repacks it, builds (once per shape) the kernel(s) the TVM backend would call on this CPU (for
integer activations on i8/i6/i4/u4 weights, the dot-product kernel of the host's best ISA,
:mod:`.x86`; the ``_generic`` names force the lane-blocked template), and returns
``run(x[M, K]) -> y[M, N]`` (fp32 in and out; the timed call includes the activation
quantization kernel for integer formats) with ``run.weight_bytes`` = bytes the kernel reads
(codes, scales, offsets) and, for the grouped code formats, ``run.dequantized()`` = the fp32 weight
the kernel multiplies by (its own reference).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import tvm

from qcompile.codegen.tvm.kernels.linear import QuantRows, quant_rows_primfunc
from qcompile.codegen.tvm.kernels.tunable import TemplateTunable, X86Tunable
from qcompile.codegen.tvm.kernels.x86 import XFMTS, X86Linear, isa_for
from qcompile.codegen.tvm.kernels.x86 import pack as x86_pack
from qcompile.codegen.tvm.recipe import LinearRecipe
from qcompile.codegen.tvm.target import host_target
from qcompile.quant.quantizer import dequantize_weight_groups, quantize_weight_groups, quantize_weight_per_channel

if TYPE_CHECKING:
    from qcompile.tuning.space import Tunable
    from qcompile.tuning.tuner import Applied

Run = Callable[[torch.Tensor], torch.Tensor]


@functools.cache
def _lib(kind: str, spec: object) -> tvm.runtime.Module:
    """The compiled kernel (once per kind and shape: weight sets share it)."""
    from qcompile.codegen.tvm.kernels.bitserial import act_planes_primfunc, bitserial_primfunc
    from qcompile.codegen.tvm.kernels.x86_bf16 import bf16_linear_primfunc, bf16_rows_primfunc

    make = {
        "quant": quant_rows_primfunc,
        "planes": act_planes_primfunc,
        "bitserial": bitserial_primfunc,
        "bf16": bf16_linear_primfunc,
        "bf16rows": bf16_rows_primfunc,
    }[kind]
    return tvm.compile(make(spec), target=host_target().tvm)


def _tv(t: torch.Tensor) -> tvm.runtime.Tensor:
    return tvm.runtime.from_dlpack(t.contiguous().clone())


@dataclass(frozen=True)
class BenchFormat:
    """A benchmarked weight/activation format (what ``_prepare`` quantizes to)."""

    fmt: str
    bits: int
    group: int | None
    act_bits: int
    act_group: bool
    symmetric: bool
    dispatch: bool = True

    def recipe(self, n: int, k: int) -> LinearRecipe:
        if self.fmt == "f32":
            return LinearRecipe.dense(n, k)
        if self.fmt == "i8":
            return LinearRecipe.w8a8(n, k)
        g = self.group or k
        return LinearRecipe.codes(n, k, self.bits, g, self.act_bits, self.act_group, not self.symmetric)

    def tunable(self, n: int, k: int, m: int) -> Tunable:
        """The kernel the backend would build for an N×K weight at ``m`` rows on this CPU."""
        spec = self.recipe(n, k).kernel(m)
        dot = self.dispatch and self.act_bits and self.fmt in XFMTS
        isa = isa_for(host_target().features) if dot else None
        if isa is None:
            return TemplateTunable(spec)
        return X86Tunable(X86Linear(spec.n, spec.k, self.fmt, spec.group, self.act_bits, spec.act_group, False, m, isa))


_TUNING: list[Applied] = []  # a tuning database for the *_tuned kernels (use_tuning)


def use_tuning(applied: Applied) -> None:
    """Build the kernels of :func:`tuned_prepare` with the best schedules of ``applied``."""
    _TUNING[:] = [applied]


@functools.cache
def _kernel_lib(t: Tunable, tuned: bool) -> tvm.runtime.Module:
    func = _TUNING[0].build(t) if tuned else t.build({})
    return tvm.compile(func, target=host_target().tvm)


def tuned_prepare(name: str) -> Callable[[torch.Tensor, int], Run]:
    """``BENCH_KERNELS[name]`` with the schedules of the database given to :func:`use_tuning`."""
    return _prepare_format(BENCH_FORMATS[name], tuned=True)


def _prepare_format(bf: BenchFormat, tuned: bool = False) -> Callable[[torch.Tensor, int], Run]:
    def prepare(w: torch.Tensor, m: int) -> Run:
        n, k = w.shape
        g = bf.group or k
        recipe = bf.recipe(n, k)
        if bf.fmt == "f32":
            codes, scale, offset = w, None, None
        elif bf.fmt == "i8":
            codes, s = quantize_weight_per_channel(w, 8)
            scale, offset = s[:, None], None
        else:
            codes, scale, offset = quantize_weight_groups(w, bf.bits, g, bf.symmetric)
        assert recipe.wfmt == bf.fmt, f"{bf.fmt} is stored as {recipe.wfmt}"
        spec = recipe.kernel(m)
        n_p, k_p = spec.n, spec.k
        t = bf.tunable(n, k, m)  # what the backend's rules build on this CPU (X86Dot or the template)
        lib = _kernel_lib(t, tuned)
        if isinstance(t, X86Tunable):  # u4: with the offset term (cterm = offset)
            cterm = recipe.cterm(scale, offset) if t.spec.offset else None
            weights = [_tv(x) for x in x86_pack(t.spec, codes, scale, cterm)]
        else:
            weights = [_tv(x) for x in recipe.pack(spec, codes, scale, offset)]
        qspec = t.spec.quant_rows() if bf.act_bits else None  # flipped codes for an x86 kernel
        qlib = _lib("quant", qspec) if qspec else None
        y = tvm.runtime.tensor(np.zeros((m, n_p), "float32"))
        qx = tvm.runtime.tensor(np.zeros((m, k_p), "int8"))
        sx = tvm.runtime.tensor(np.zeros((m, qspec.groups if qspec else 1), "float32"))
        # asymmetric weights with integer activations: sx·Σqx per row and group, the quantizer's third output
        acts = [qx, sx]
        if qspec is not None and qspec.sums:
            acts.append(tvm.runtime.tensor(np.zeros((m, qspec.sum_blocks), "float32")))
        out = torch.from_dlpack(y)

        def run(x: torch.Tensor) -> torch.Tensor:
            xp = x if k_p == k else torch.nn.functional.pad(x, (0, k_p - k))
            xt = tvm.runtime.from_dlpack(xp.contiguous())
            if qlib is not None:
                qlib(xt, *acts)
                lib(*acts, *weights, y)
            else:
                lib(xt, *weights, y)
            return out[:, :n]

        run.weight_bytes = sum(t.numpy().nbytes for t in weights)  # type: ignore[attr-defined]
        if bf.fmt not in ("f32", "i8"):  # the weight the kernel multiplies by (its own reference), on demand
            run.dequantized = lambda: dequantize_weight_groups(codes, scale, offset, g)  # type: ignore[attr-defined]
        return run

    return prepare


def _prepare_bitserial(act_bits: int) -> Callable[[torch.Tensor, int], Run]:
    """W6 (group 128) × A``act_bits`` (group 128) through the bit-serial kernel."""

    def prepare(w: torch.Tensor, m: int) -> Run:
        n, k = w.shape
        codes, scale, _ = quantize_weight_groups(w, 6, 128, True)
        recipe = LinearRecipe.codes(n, k, 6, 128, act_bits, True, False)
        spec = recipe.bitserial(m)
        assert spec is not None
        n_p, k_p = spec.n, spec.k
        qspec = QuantRows(k_p, act_bits, 128, m)
        quant, planes_f, serial = _lib("quant", qspec), _lib("planes", spec), _lib("bitserial", spec)
        wp, sc = (_tv(t) for t in recipe.pack_bitserial(spec, codes, scale))
        qx = tvm.runtime.tensor(np.zeros((m, k_p), "int8"))
        sx = tvm.runtime.tensor(np.zeros((m, qspec.groups), "float32"))
        planes = tvm.runtime.tensor(np.zeros((act_bits, m, k_p // 32), "int32"))
        y = tvm.runtime.tensor(np.zeros((m, n_p), "float32"))
        out = torch.from_dlpack(y)

        def run(x: torch.Tensor) -> torch.Tensor:
            xp = x if k_p == k else torch.nn.functional.pad(x, (0, k_p - k))
            quant(tvm.runtime.from_dlpack(xp.contiguous()), qx, sx)
            planes_f(qx, planes)
            serial(planes, sx, wp, sc, y)
            return out[:, :n]

        run.weight_bytes = wp.numpy().nbytes + sc.numpy().nbytes  # type: ignore[attr-defined]
        return run

    return prepare


def _prepare_bf16(group: int, symmetric: bool) -> Callable[[torch.Tensor, int], Run]:
    """W4 (``u4``, groups of ``group``) × bf16-rounded activations on ``vdpbf16ps`` (:mod:`.x86_bf16`);
    the timed call includes the activation rounding kernel."""
    from qcompile.codegen.tvm.kernels import x86_bf16 as xb

    def prepare(w: torch.Tensor, m: int) -> Run:
        n, k = w.shape
        codes, scale, offset = quantize_weight_groups(w, 4, group, symmetric)
        recipe = LinearRecipe.codes(n, k, 4, group, 0, False, not symmetric)
        base = recipe.kernel(m)
        spec = xb.Bf16Linear(base.n, base.k, base.group, False, m)
        lib, rows = _lib("bf16", spec), _lib("bf16rows", spec.rows())
        u = codes.to(torch.int32) + recipe.zero
        cterm = recipe.cterm(scale, offset)
        weights = [
            _tv(xb.pack_weight(spec, u)),
            _tv(xb.pack_groups(spec, scale.float())),
            _tv(xb.pack_groups(spec, cterm)),
        ]
        xbits = tvm.runtime.tensor(np.zeros((m, spec.k), "uint16"))
        xs = tvm.runtime.tensor(np.zeros((m, spec.groups), "float32"))
        y = tvm.runtime.tensor(np.zeros((m, spec.n), "float32"))
        out = torch.from_dlpack(y)

        def run(x: torch.Tensor) -> torch.Tensor:
            xp = x if spec.k == k else torch.nn.functional.pad(x, (0, spec.k - k))
            rows(tvm.runtime.from_dlpack(xp.contiguous()), xbits, xs)
            lib(xbits, xs, *weights, y)
            return out[:, :n]

        run.weight_bytes = sum(t.numpy().nbytes for t in weights)  # type: ignore[attr-defined]
        run.dequantized = lambda: dequantize_weight_groups(codes, scale, offset, group)  # type: ignore[attr-defined]
        return run

    return prepare


# the formats of the tunable kernels (``tuned_prepare``; bit-serial has no design space)
BENCH_FORMATS: dict[str, BenchFormat] = {
    "qc_f32": BenchFormat("f32", 32, None, 0, False, True),
    "qc_w8a8": BenchFormat("i8", 8, None, 8, False, True),
    "qc_w8a8_generic": BenchFormat("i8", 8, None, 8, False, True, dispatch=False),
    "qc_w6a8_g128": BenchFormat("i6", 6, 128, 8, True, True),
    "qc_w6a8_g128_generic": BenchFormat("i6", 6, 128, 8, True, True, dispatch=False),
    "qc_w6a6_g128": BenchFormat("i6", 6, 128, 6, True, True),
    "qc_w4a8_g128": BenchFormat("i4", 4, 128, 8, True, True),
    "qc_w4a8_g128_generic": BenchFormat("i4", 4, 128, 8, True, True, dispatch=False),
    "qc_w4a8_g32": BenchFormat("i4", 4, 32, 8, True, True),
    "qc_w4a8_g32_asym": BenchFormat("u4", 4, 32, 8, True, False),  # Q4_1 x Q8_1
    "qc_w4a8_g32_asym_generic": BenchFormat("u4", 4, 32, 8, True, False, dispatch=False),
    "qc_w4a16_g32_asym": BenchFormat("u4", 4, 32, 0, False, False),
    "qc_w4a16_g128": BenchFormat("u4", 4, 128, 0, False, True),
    "qc_w4a16_g64_asym": BenchFormat("u4", 4, 64, 0, False, False),
    "qc_w3a16_g128_asym": BenchFormat("u3", 3, 128, 0, False, False),
    "qc_w2a16_g64_asym": BenchFormat("u2", 2, 64, 0, False, False),
}
BENCH_KERNELS: dict[str, Callable[[torch.Tensor, int], Run]] = {
    **{name: _prepare_format(bf) for name, bf in BENCH_FORMATS.items()},
    "qc_w6a8_bitserial": _prepare_bitserial(8),
    # bf16 activations (Plan.float_compute "bf16"): only where the CPU has AVX-512 BF16
    "qc_w4a16_g32_asym_bf16": _prepare_bf16(32, False),
    "qc_w4a16_g128_bf16": _prepare_bf16(128, True),
}
