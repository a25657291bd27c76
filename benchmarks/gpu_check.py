#!/usr/bin/env python
"""Check and time every qcompile CUDA kernel: one command for a GPU machine.

Two halves:

* **build** (needs TVM and nvcc, i.e. this repo's venv): generate every kernel for the shapes below
  with qcompile's CUDA code generator, compile one fatbin with nvcc for ``--arch``, and write it,
  the CUDA source and a manifest (kernel specs, parameter order) to ``--build-dir``
  (``benchmarks/gpu_build``, git-ignored: carry it to the GPU machine).
* **run** (needs only torch and numpy): load the fatbin through the CUDA driver API, check every
  kernel against a CPU reference (integer accumulations exact: unit scales, so outputs are the int
  sums), time the linears at LLaMA-2-70B shapes against torch fp16 ``matmul`` (cuBLAS) and
  ``torch._int_mm`` with the weights rotated through more than the L2, report bandwidth against a
  device-to-device copy of the same run, decode with random-weight (never zero) models of
  SmolLM2-135M's and LLaMA-2-7B's architecture (our kernels for every linear, CUDA graphs, against
  the same model in fp16), print one table and write JSON.

``--dry-run`` runs everything but the GPU: the build, packing, the references, the table and JSON,
with a CPU stand-in computing each kernel's output from its packed operands (nothing is timed;
weights above 2^24 entries are checked once per variant, at the first shape, to keep it to minutes
on 2 cores).

On a GPU machine (its image has torch and nvcc but no TVM, which is larger than the 64 MiB a
device call carries)::

    python benchmarks/gpu_check.py --dry-run            # here: builds benchmarks/gpu_build
    python3 benchmarks/gpu_check.py --json $OUT/gpu.json # there, with benchmarks/gpu_build carried

``--wheels DIR`` installs TVM from a wheel folder there first (``pip --no-index``) and then also
decodes SmolLM2's architecture through ``qcompile.compile(target="cuda")`` and the Relax VM.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import hashlib
import importlib.util
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
LLAMA70B = [(8192, 8192), (28672, 8192), (8192, 28672), (10240, 8192)]
MS = [1, 4, 8, 16, 64, 128]
# variant -> (kernel kind, activation bits, scale group: 0 = per output channel / per token)
VARIANTS = {
    "w8a8": ("s8", 8, 0),
    "w6a8-unpack": ("u6", 8, 128),
    "w6a8-bitserial": ("b1", 8, 128),
    "w6a6-unpack": ("u6", 6, 128),
    "w6a6-bitserial": ("b1", 6, 128),
    "w4a16": ("f16", 0, 128),
}
VARIANTS_BY_KIND = {(kind, bits): v for v, (kind, bits, _) in VARIANTS.items()}
MODELS = {  # architecture only: weights are random
    "smollm2-135m": dict(hidden=576, inter=1536, layers=30, heads=9, kv_heads=3, vocab=49152),
    "llama2-7b": dict(hidden=4096, inter=11008, layers=32, heads=32, kv_heads=32, vocab=32000),
}
DECODE_VARIANTS = ("w6a8-unpack", "w6a8-bitserial", "w4a16")


def _layout() -> Any:
    """qcompile's CUDA layout module, loaded by path: it needs only torch (no TVM, no qcompile)."""
    path = ROOT / "qcompile" / "codegen" / "tvm" / "kernels" / "cuda_layout.py"
    spec = importlib.util.spec_from_file_location("qc_cuda_layout", path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["qc_cuda_layout"] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


L = _layout()


def _pad(x: int, to: int) -> int:
    return -(-x // to) * to


def linear_spec(variant: str, n: int, k: int, tokens: int) -> Any:
    kind, bits, group = VARIANTS[variant]
    k_p = _pad(k, group or (16 if kind == "f16" else 128))  # zero columns, as qcompile's lowering pads
    grp = group or k_p
    return L.CudaLinear(
        kind,
        _pad(n, 16),
        k_p,
        grp,
        bits,
        0 if not group or not bits else grp,
        False,
        zero_term=kind == "f16",
        tokens=tokens,
    )


def quant_spec(lin: Any, norm: bool = False) -> Any:
    return L.CudaQuant(lin.k, lin.act_bits, lin.act_group, planes=lin.kind == "b1", norm=norm)


def model_shapes(cfg: dict[str, int]) -> list[tuple[int, int]]:
    h, i, hd = cfg["hidden"], cfg["inter"], cfg["hidden"] // cfg["heads"]
    return sorted({(h, h), (cfg["kv_heads"] * hd, h), (i, h), (h, i)})


def kernel_set(shapes: list[tuple[int, int]], models: list[str]) -> dict[str, dict[str, Any]]:
    """name -> {"role", "spec"} for every kernel the run needs."""
    out: dict[str, dict[str, Any]] = {}

    def add(spec: Any, role: str) -> None:
        out[spec.name] = {"role": role, "spec": spec}

    for n, k in shapes:
        for variant in VARIANTS:
            for tokens in (8, 32):
                lin = linear_spec(variant, n, k, tokens)
                add(lin, "linear")
                if lin.act_bits:
                    add(quant_spec(lin), "quant")
    for model in models:
        for n, k in model_shapes(MODELS[model]):
            for variant in DECODE_VARIANTS:
                lin = linear_spec(variant, n, k, 8)
                add(lin, "linear")
                if lin.act_bits:
                    add(quant_spec(lin), "quant")
                    add(quant_spec(lin, norm=True), "quant")
    return out


# ---- build (TVM + nvcc) -----------------------------------------------------------------------------


def generator_hash() -> str:
    """sha256 of the kernel generator's sources: a build made from other sources is rebuilt."""
    kdir = ROOT / "qcompile" / "codegen" / "tvm" / "kernels"
    return hashlib.sha256(b"".join((kdir / f).read_bytes() for f in ("cuda.py", "cuda_layout.py"))).hexdigest()


def build(build_dir: Path, arch: str, kernels: dict[str, dict[str, Any]]) -> dict[str, Any]:
    try:
        import tvm
    except ImportError:
        sys.exit(
            f"{build_dir} holds no build of these kernels for {arch} from the current sources, and this machine has no "
            "TVM to make one: run `python benchmarks/gpu_check.py --dry-run` (same --arch/--shapes/--models) in the "
            "repo's venv and carry the folder"
        )

    sys.path.insert(0, str(ROOT))
    from qcompile.codegen.tvm import cuda
    from qcompile.codegen.tvm.kernels.cuda import linear_cuda_primfunc, quant_cuda_primfunc

    t0 = time.perf_counter()
    funcs = {}
    for name, k in kernels.items():
        f = linear_cuda_primfunc(k["spec"]) if k["role"] == "linear" else quant_cuda_primfunc(k["spec"])
        funcs[name] = f.with_attr("global_symbol", name)
    ex = tvm.compile(tvm.IRModule(funcs), target=cuda.cuda_target(f"cuda:{arch}").tvm)
    source = cuda.device_source(ex)
    t1 = time.perf_counter()
    fatbin = cuda.compile_fatbin(source, arch)
    t2 = time.perf_counter()
    params = {
        m.group(1): [p.split()[-1].removesuffix("_ptr") for p in m.group(2).split(",")]
        for m in re.finditer(r'extern "C" __global__ void __launch_bounds__\(\d+\) (\w+)_kernel\(([^)]*)\) \{', source)
    }
    missing = set(kernels) - set(params)
    if missing:
        raise RuntimeError(f"kernels missing from the CUDA source: {sorted(missing)[:5]}")
    build_dir.mkdir(parents=True, exist_ok=True)
    (build_dir / "kernels.cu").write_text(source, encoding="utf-8")
    (build_dir / "kernels.fatbin").write_bytes(fatbin)
    manifest = {
        "arch": arch,
        "generator": generator_hash(),
        "tvm": tvm.__version__,
        "date": datetime.date.today().isoformat(),
        "kernels": {
            name: {
                "role": k["role"],
                "type": type(k["spec"]).__name__,
                "spec": asdict(k["spec"]),
                "params": params[name],
            }
            for name, k in kernels.items()
        },
    }
    (build_dir / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    print(
        f"built {len(kernels)} kernels for {arch}: TVM {t1 - t0:.0f} s, nvcc {t2 - t1:.0f} s, fatbin "
        f"{len(fatbin) / 1e6:.1f} MB -> {build_dir}"
    )
    return manifest


# ---- launching: the CUDA driver API, or the CPU stand-in ---------------------------------------------


class Driver:
    """Launch kernels from the fatbin with ``cuLaunchKernel`` on torch's current stream."""

    def __init__(self, fatbin: bytes) -> None:
        torch.empty(1, device="cuda")  # torch makes the primary context current
        self.lib = ctypes.CDLL("libcuda.so.1")
        self._fatbin = ctypes.c_char_p(fatbin)
        self.mod = ctypes.c_void_p()
        self._check(self.lib.cuModuleLoadData(ctypes.byref(self.mod), self._fatbin), "cuModuleLoadData")
        self.funcs: dict[str, ctypes.c_void_p] = {}

    def _check(self, rc: int, what: str) -> None:
        if rc:
            msg = ctypes.c_char_p()
            self.lib.cuGetErrorString(rc, ctypes.byref(msg))
            raise RuntimeError(f"{what} failed: {rc} {msg.value.decode() if msg.value else ''}")

    def __call__(self, name: str, grid: tuple[int, ...], block: tuple[int, ...], args: list[Any]) -> None:
        fn = self.funcs.get(name)
        if fn is None:
            fn = self.funcs[name] = ctypes.c_void_p()
            self._check(
                self.lib.cuModuleGetFunction(ctypes.byref(fn), self.mod, f"{name}_kernel".encode()),
                f"cuModuleGetFunction({name})",
            )
        vals = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else ctypes.c_int(int(a)) for a in args]
        ptrs = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in vals])
        g, b = (*grid, 1, 1)[:3], (*block, 1, 1)[:3]
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        self._check(self.lib.cuLaunchKernel(fn, *g, *b, 0, stream, ptrs, None), f"cuLaunchKernel({name})")


def stand_in(name: str, spec: Any, role: str, named: dict[str, torch.Tensor], m: int) -> None:
    """What the kernel computes, from its packed operands, on the CPU (``--dry-run``)."""
    if role == "quant":
        x = named["X"][:m].double()
        if spec.norm:
            x = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + spec.eps) * named["NW"]).double()
        q, s = reference_quant(x.float(), spec.bits, spec.group)
        named["Q"][:m] = q.to(torch.int8)
        named["S"][:m] = s
        if spec.planes:
            named["P"][:m] = L.act_planes_reference(q).to(named["P"].dtype)
        return
    key = (name, named["W"].data_ptr())
    if key not in _UNPACKED:  # the decode stand-in calls the same weights every step
        _UNPACKED[key] = L.unpack_cuda_weight(spec, named["W"]).double()
    w = _UNPACKED[key]
    if spec.kind == "f16":
        w = w * _expand(named["SW"].double(), spec.group) + _expand(named["C"].double(), spec.group)
        y = named["X"][:m].double() @ w.T
    else:
        x = L.planes_to_codes(named["X"][:m]) if spec.kind == "b1" else named["X"][:m].to(torch.int64)
        gx = spec.act_group or spec.k
        y = (x.double() * _expand(named["SX"][:m].double(), gx)) @ (w * _expand(named["SW"].double(), spec.group)).T
    named["Y"][:m] = (y + named["B"].double()).float()


_UNPACKED: dict[tuple[str, int], torch.Tensor] = {}


def _expand(per_group: torch.Tensor, group: int) -> torch.Tensor:
    return per_group.repeat_interleave(group, dim=-1)


class Kernels:
    """Calls kernels by name with operands by parameter name (the manifest's order)."""

    def __init__(self, manifest: dict[str, Any], launch: Callable[..., None] | None) -> None:
        self.manifest = manifest["kernels"]
        self.launch = launch  # None: the CPU stand-in
        self.specs = {
            n: (L.CudaLinear if k["type"] == "CudaLinear" else L.CudaQuant)(**k["spec"])
            for n, k in self.manifest.items()
        }

    def __call__(self, name: str, m: int, **named: torch.Tensor) -> None:
        entry, spec = self.manifest[name], self.specs[name]
        if self.launch is None:
            stand_in(name, spec, entry["role"], named, m)
            return
        assert entry["params"][-1] == "m", entry["params"]
        args = [named[p] for p in entry["params"][:-1]] + [m]  # the dynamic row count comes last
        if entry["role"] == "quant":
            self.launch(name, (m,), (32, L.KS), args)
        else:
            rows = L.MMA[spec.kind][0]
            self.launch(name, (spec.n // rows, -(-m // spec.tokens)), (32, L.KS), args)


# ---- references --------------------------------------------------------------------------------------


def reference_quant(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """qcompile.quant.quantizer's dynamic activation codes: scale = absmax/qmax (1 if 0), round half even."""
    m, k = x.shape
    gs = group or k
    qmax = float(2 ** (bits - 1) - 1)
    amax = x.float().view(m, k // gs, gs).abs().amax(-1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = torch.clamp(torch.round(x.float() / _expand(scale, gs)), -qmax, qmax)
    return q.to(torch.int64), scale


def operands(spec: Any, m: int, dev: str, seed: int, unit: bool, reference: bool = True) -> dict[str, Any]:
    """Random operands of a linear kernel, made on ``dev`` (codes uniform over their range; ``unit``:
    scales of 1, so the output is the exact integer sum), and the float64 reference output ``ref``
    (computed on the CPU up to 2^24 weights, above that with float64 on ``dev``: exact either way,
    the products being integers below 2^53)."""
    n, k = spec.n, spec.k
    gen = torch.Generator(device=dev).manual_seed(seed)
    lo, hi = {"s8": (-127, 127), "f16": (0, 15)}.get(spec.kind, (-32, 31))
    codes = torch.randint(lo, hi + 1, (n, k), generator=gen, device=dev)
    gw = spec.groups
    sw = torch.ones(n, gw, device=dev) if unit else torch.rand(n, gw, generator=gen, device=dev) * 0.02 + 0.001
    out: dict[str, Any] = {
        "W": L.pack_cuda_weight(spec, codes),
        "SW": sw,
        "B": torch.zeros(n, device=dev),
        "Y": torch.full((m, n), float("nan"), device=dev),
    }
    if spec.kind == "f16":
        x = torch.randn(m, k, generator=gen, device=dev)
        out.update(X=x, C=-8 * sw)
        lhs = x.half().double()
        rhs = (
            (codes.double() * _expand(sw.double(), spec.group) + _expand(out["C"].double(), spec.group)).half().double()
        )
    else:
        amax = 2 ** (spec.act_bits - 1) - 1
        xc = torch.randint(-amax, amax + 1, (m, k), generator=gen, device=dev)
        gx = spec.groups if spec.act_group else 1
        sx = torch.ones(m, gx, device=dev) if unit else torch.rand(m, gx, generator=gen, device=dev) * 0.02 + 0.001
        out.update(X=L.act_planes_reference(xc) if spec.kind == "b1" else xc.to(torch.int8), SX=sx)
        lhs = xc.double() * _expand(sx.double(), spec.act_group or k)
        rhs = codes.double() * _expand(sw.double(), spec.group)
    if reference:
        on_cpu = n * k <= 1 << 24
        out["ref"] = (lhs.cpu() @ rhs.cpu().T) if on_cpu else (lhs @ rhs.T).cpu()
    return out


def check_linear(run: Kernels, name: str, m: int, dev: str) -> dict[str, Any]:
    spec = run.specs[name]
    ops = operands(spec, m, dev, seed=sum(map(ord, name)) + m, unit=spec.kind != "f16")
    ref = ops.pop("ref")
    run(name, m, **ops)
    sync(dev)
    y = ops["Y"].cpu().double()
    if spec.kind == "f16":  # fp16 dequantization and products: rounding, not exactness
        err = float((y - ref).abs().max() / ref.abs().max())
        return {"kernel": name, "m": m, "ok": err < 5e-3, "max_rel_err": err}
    bad = int((y != ref).sum())
    return {"kernel": name, "m": m, "ok": bad == 0, "mismatches": bad, "max_abs_err": float((y - ref).abs().max())}


def check_quant(run: Kernels, name: str, m: int, dev: str) -> dict[str, Any]:
    spec = run.specs[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)) + m)
    x = torch.randn(m, spec.k, generator=gen) * torch.rand(spec.k, generator=gen) * 4  # outlier channels
    nw = torch.rand(spec.k, generator=gen) + 0.5
    xin = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + spec.eps) * nw) if spec.norm else x
    q_ref, s_ref = reference_quant(xin, spec.bits, spec.group)
    pm = m if spec.planes else 1
    ops = {
        "X": x,
        "NW": nw if spec.norm else torch.ones(1),
        "Q": torch.zeros(m, spec.k, dtype=torch.int8),
        "S": torch.zeros(m, spec.groups),
        "P": torch.zeros(pm, spec.k // 128 if spec.planes else 1, 8, 4, dtype=torch.int32),
    }
    ops = {key: v.to(dev) for key, v in ops.items()}
    run(name, m, **ops)
    sync(dev)
    q, s = ops["Q"].cpu().to(torch.int64), ops["S"].cpu()
    bad = int((q != q_ref).sum())
    res: dict[str, Any] = {
        "kernel": name,
        "m": m,
        "code_mismatches": bad,
        "scale_max_rel_err": float(((s - s_ref) / s_ref).abs().max()),
    }
    if spec.planes:
        res["plane_mismatches"] = int((L.planes_to_codes(ops["P"].cpu()) != q).sum())
    # the fused RMSNorm uses the GPU's rsqrt: a code may land on the other side of a rounding tie
    allowed = q.numel() // 1000 if spec.norm else 0
    res["ok"] = (
        bad <= allowed
        and res.get("plane_mismatches", 0) == 0
        and res["scale_max_rel_err"] < (1e-5 if spec.norm else 1e-7)
    )
    return res


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


# ---- timing (GPU) --------------------------------------------------------------------------------------


def time_ms(fn: Callable[[], None], reps: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def copy_bandwidth() -> float:
    """GB/s of a device-to-device copy (bytes read + written), 1 GiB."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (time_ms(lambda: dst.copy_(src), 20) * 1e-3) / 1e9


def copies_for(nbytes: int) -> int:
    """Weight copies to rotate through so every call reads DRAM (more than 3× the L2)."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    return max(1, min(16, math.ceil(3 * l2 / nbytes)))


def time_linear(run: Kernels, variant: str, n: int, k: int, ms: list[int]) -> list[dict[str, Any]]:
    """Quantize-activations + GEMM per call (what a layer costs), weights rotated through copies."""
    out = []
    base = operands(linear_spec(variant, n, k, 8), max(ms), "cuda", seed=1, unit=False, reference=False)
    wbytes = base["W"].numel() * 4
    ws = [base["W"]] + [base["W"].clone() for _ in range(copies_for(wbytes) - 1)]
    for m in ms:
        lin = linear_spec(variant, n, k, 8 if m <= 8 else 32)
        x = torch.randn(m, lin.k, device="cuda")
        y = torch.empty(m, lin.n, device="cuda")
        state = {"i": 0}
        q = quant_spec(lin) if lin.act_bits else None
        if q is not None:
            qops = {
                "X": x,
                "NW": torch.ones(1, device="cuda"),
                "Q": torch.zeros(m, lin.k, dtype=torch.int8, device="cuda"),
                "S": torch.zeros(m, q.groups, device="cuda"),
                "P": torch.zeros(
                    m if q.planes else 1, lin.k // 128 if q.planes else 1, 8, 4, dtype=torch.int32, device="cuda"
                ),
            }

        def call() -> None:
            state["i"] = (state["i"] + 1) % len(ws)
            w = ws[state["i"]]
            if q is not None:
                run(q.name, m, **qops)
                run(
                    lin.name,
                    m,
                    X=qops["P"] if q.planes else qops["Q"],
                    W=w,
                    SW=base["SW"],
                    SX=qops["S"],
                    B=base["B"],
                    Y=y,
                )
            else:
                run(lin.name, m, X=x, W=w, SW=base["SW"], C=base["C"], B=base["B"], Y=y)

        t = time_ms(call)
        out.append(
            {
                "variant": variant,
                "n": n,
                "k": k,
                "m": m,
                "ms": t,
                "weight_bytes": wbytes,
                "GBps": wbytes / (t * 1e-3) / 1e9,
            }
        )
    return out


def time_baselines(n: int, k: int, m: int) -> dict[str, float]:
    w16 = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(copies_for(n * k * 2))]
    x16 = torch.randn(m, k, device="cuda", dtype=torch.float16)
    i = {"w": 0}

    def fp16() -> None:
        i["w"] = (i["w"] + 1) % len(w16)
        torch.matmul(x16, w16[i["w"]].T)

    out = {"cublas_fp16_ms": time_ms(fp16)}
    w16.clear()
    m8 = max(m, 17)  # torch._int_mm needs more than 16 rows
    w8 = [torch.randint(-127, 128, (k, n), device="cuda", dtype=torch.int8) for _ in range(copies_for(n * k))]
    x8 = torch.randint(-127, 128, (m8, k), device="cuda", dtype=torch.int8)

    def int8() -> None:
        i["w"] = (i["w"] + 1) % len(w8)
        torch._int_mm(x8, w8[i["w"]])

    out["int_mm_ms"] = time_ms(int8)
    out["int_mm_rows"] = m8
    return out


# ---- decode: random-weight models, every linear on our kernels --------------------------------------


class Decoder:
    """A Llama-architecture decoder with random weights; ``variant=None``: fp16 torch linears."""

    def __init__(
        self,
        cfg: dict[str, int],
        run: Kernels | None,
        variant: str | None,
        dev: str,
        layers: int | None = None,
        ctx: int = 256,
    ) -> None:
        g = torch.Generator(device=dev).manual_seed(0)
        self.cfg, self.run, self.variant, self.dev, self.ctx = cfg, run, variant, dev, ctx
        self.half = torch.float16 if dev == "cuda" else torch.float32  # CPUs (dry run) have no fast fp16 matmul
        h, hd = cfg["hidden"], cfg["hidden"] // cfg["heads"]
        self.hd = hd
        self.nl = layers or cfg["layers"]

        def rnd(*shape: int) -> torch.Tensor:  # never zero: |w| >= 1e-4
            w = (torch.randn(*shape, generator=g, device=dev) * 0.02).clamp_(min=-0.1, max=0.1)
            return torch.where(w >= 0, w + 1e-4, w - 1e-4)

        self.emb = rnd(cfg["vocab"], h)
        self.head = rnd(cfg["vocab"], h).to(self.half)
        self.norms = [torch.rand(h, generator=g, device=dev) + 0.5 for _ in range(2 * self.nl + 1)]
        kvd = cfg["kv_heads"] * hd
        names = [
            ("q", h, h),
            ("k", kvd, h),
            ("v", kvd, h),
            ("o", h, h),
            ("gate", cfg["inter"], h),
            ("up", cfg["inter"], h),
            ("down", h, cfg["inter"]),
        ]
        self.lin = [{nm: self._linear(rnd(n, k)) for nm, n, k in names} for _ in range(self.nl)]
        self.kc = torch.zeros(self.nl, cfg["kv_heads"], ctx, hd, device=dev)
        self.vc = torch.zeros_like(self.kc)
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.arange(ctx).float()[:, None] * inv[None]
        self.cos, self.sin = ang.cos().to(dev), ang.sin().to(dev)

    def _linear(self, w: torch.Tensor) -> dict[str, Any]:
        n, k = w.shape
        if self.variant is None:
            return {"w": w.to(self.half), "n": n}
        spec = linear_spec(self.variant, n, k, 8)
        wp = torch.nn.functional.pad(w, (0, spec.k - k, 0, spec.n - n))
        if spec.kind == "f16":  # symmetric 4-bit per group, stored u = code + 8
            s = wp.view(spec.n, -1, spec.group).abs().amax(-1) / 7
            codes = torch.clamp(torch.round(wp / _expand(s, spec.group)), -7, 7).to(torch.int64) + 8
            extra = {"C": -8 * s}
        else:
            qmax = 2**5 - 1
            s = wp.view(spec.n, -1, spec.group).abs().amax(-1).clamp(min=1e-8) / qmax
            codes = torch.clamp(torch.round(wp / _expand(s, spec.group)), -qmax, qmax).to(torch.int64)
            extra = {}
        return {
            "spec": spec,
            "n": n,
            "W": L.pack_cuda_weight(spec, codes),
            "SW": s,
            "B": torch.zeros(spec.n, device=self.dev),
            **extra,
        }

    def linear(self, p: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
        if self.variant is None:
            return (x.to(self.half) @ p["w"].T).float()
        spec, m = p["spec"], x.shape[0]
        x = torch.nn.functional.pad(x, (0, spec.k - x.shape[1]))
        y = torch.empty(m, spec.n, device=self.dev)
        assert self.run is not None
        if spec.act_bits:
            q = quant_spec(spec)
            qo = {
                "Q": torch.empty(m, spec.k, dtype=torch.int8, device=self.dev),
                "S": torch.empty(m, q.groups, device=self.dev),
                "P": torch.empty(
                    m if q.planes else 1, spec.k // 128 if q.planes else 1, 8, 4, dtype=torch.int32, device=self.dev
                ),
            }
            self.run(q.name, m, X=x.contiguous(), NW=torch.ones(1, device=self.dev), **qo)
            self.run(spec.name, m, X=qo["P"] if q.planes else qo["Q"], W=p["W"], SW=p["SW"], SX=qo["S"], B=p["B"], Y=y)
        else:
            self.run(spec.name, m, X=x.contiguous(), W=p["W"], SW=p["SW"], C=p["C"], B=p["B"], Y=y)
        return y[:, : p["n"]]

    def step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One decode step for one token (tensors only: capturable in a CUDA graph)."""
        cfg, hd = self.cfg, self.hd
        x = self.emb[tok].view(1, -1)
        mask = torch.where(torch.arange(self.ctx, device=self.dev) <= pos, 0.0, float("-inf"))
        cos, sin = self.cos[pos].view(1, 1, -1), self.sin[pos].view(1, 1, -1)

        def rope(t: torch.Tensor) -> torch.Tensor:
            a, b = t[..., : hd // 2], t[..., hd // 2 :]
            return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

        def norm(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * w

        for i, p in enumerate(self.lin):
            h = norm(x, self.norms[2 * i])
            q = rope(self.linear(p["q"], h).view(cfg["heads"], 1, hd))
            k = rope(self.linear(p["k"], h).view(cfg["kv_heads"], 1, hd))
            v = self.linear(p["v"], h).view(cfg["kv_heads"], 1, hd)
            self.kc[i].index_copy_(1, pos.view(1), k)
            self.vc[i].index_copy_(1, pos.view(1), v)
            rep = cfg["heads"] // cfg["kv_heads"]
            kk, vv = self.kc[i].repeat_interleave(rep, 0), self.vc[i].repeat_interleave(rep, 0)
            att = torch.softmax(q @ kk.transpose(1, 2) / math.sqrt(hd) + mask, -1) @ vv
            x = x + self.linear(p["o"], att.reshape(1, -1))
            h = norm(x, self.norms[2 * i + 1])
            x = x + self.linear(
                p["down"], torch.nn.functional.silu(self.linear(p["gate"], h)) * self.linear(p["up"], h)
            )
        logits = norm(x, self.norms[-1]).to(self.half) @ self.head.T
        return logits.argmax(-1)


def decode_tokens_per_s(dec: Decoder, steps: int) -> tuple[float, list[int]]:
    tok = torch.zeros(1, dtype=torch.long, device=dec.dev)
    pos = torch.zeros(1, dtype=torch.long, device=dec.dev)
    if dec.dev != "cuda":  # dry-run: a few eager steps, untimed
        out = []
        for i in range(steps):
            pos.fill_(i)
            tok = dec.step(tok, pos)
            out.append(int(tok))
        return float("nan"), out
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (allocations) outside the graph
        for _ in range(2):
            dec.step(tok, pos)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        nxt = dec.step(tok, pos)
    out = []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        pos.fill_(i)
        graph.replay()
        tok.copy_(nxt)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    for i in range(8):  # the first tokens again, read back (not timed)
        pos.fill_(i)
        graph.replay()
        tok.copy_(nxt)
        out.append(int(nxt))
    return steps / dt, out


# ---- the run -----------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="no GPU: build, pack, references, table; kernels replaced by a CPU stand-in",
    )
    ap.add_argument("--arch", default="sm_90", help="CUDA arch to build for (default sm_90, the H100)")
    ap.add_argument("--build-dir", type=Path, default=ROOT / "benchmarks" / "gpu_build")
    ap.add_argument("--rebuild", action="store_true", help="build even if --build-dir has a build for --arch")
    ap.add_argument(
        "--shapes", default=",".join(f"{n}x{k}" for n, k in LLAMA70B), help="N×K list (default: LLaMA-2-70B's linears)"
    )
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="token counts to time")
    ap.add_argument("--models", default=",".join(MODELS), help="decode models (architectures, random weights)")
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument(
        "--write-choices",
        action="store_true",
        help="record the faster W6 kernel per shape in qcompile's cuda_choices.json",
    )
    ap.add_argument(
        "--wheels",
        type=Path,
        default=None,
        help="install TVM from this wheel folder (pip --no-index) for the Relax VM decode",
    )
    args = ap.parse_args()
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
        ms = [int(v) for v in args.ms.split(",") if v]
        models = [m for m in args.models.split(",") if m]
    except ValueError:
        ap.error("--shapes takes N×K pairs like 8192x8192, --ms integers")
    unknown = [m for m in models if m not in MODELS]
    if unknown or any(len(s) != 2 for s in shapes) or not ms or min(ms) < 1:
        ap.error(f"bad --models/--shapes/--ms (models: {list(MODELS)})")
    t_start = time.perf_counter()
    dev = "cpu" if args.dry_run else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device: use --dry-run here")

    kernels = kernel_set(shapes, models)  # type: ignore[arg-type]
    manifest_path = args.build_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    stale = manifest is None or manifest["arch"] != args.arch or manifest.get("generator") != generator_hash()
    if args.rebuild or stale or set(kernels) - set(manifest["kernels"]):  # type: ignore[index]
        manifest = build(args.build_dir, args.arch, kernels)
    run = Kernels(manifest, None if args.dry_run else Driver((args.build_dir / "kernels.fatbin").read_bytes()))

    # 1. correctness: every kernel at two row counts, against the CPU reference
    log(f"checking {len(kernels)} kernels")
    checks = []
    for name, entry in sorted(manifest["kernels"].items()):
        if name not in kernels:
            continue
        spec = run.specs[name]
        check_ms = [1, 19]
        if args.dry_run:  # CPU stand-in: the large weights only once per variant, at the first shape
            big = entry["role"] == "linear" and spec.n * spec.k > 1 << 24
            first = big and linear_spec(VARIANTS_BY_KIND[(spec.kind, spec.act_bits)], *shapes[0], 8).name == name
            check_ms = [] if big and not first else [1] if big else [1, 3]
        for m in check_ms:
            checks.append((check_linear if entry["role"] == "linear" else check_quant)(run, name, m, dev))
            _UNPACKED.clear()  # each check packs new weights (which may reuse the freed memory)

    # 2. speed at the requested shapes (GPU only)
    timings, copy_gbps = [], None
    if not args.dry_run:
        copy_gbps = copy_bandwidth()
        for n, k in shapes:
            log(f"timing {n}x{k}")
            bases = {m: time_baselines(n, k, m) for m in ms}
            for variant in VARIANTS:
                for t in time_linear(run, variant, n, k, ms):
                    b = bases[t["m"]]
                    t.update(
                        b,
                        x_cublas=b["cublas_fp16_ms"] / t["ms"],
                        x_int_mm=b["int_mm_ms"] / t["ms"],
                        of_copy=t["GBps"] / copy_gbps,
                    )
                    timings.append(t)

    # 3. decode
    decode = []
    for model in models:
        log(f"decoding {model}")
        cfg = MODELS[model]
        layers = None if not args.dry_run else 1  # dry run: one layer, two steps (plumbing only)
        steps = args.decode_steps if not args.dry_run else 2
        base = Decoder(cfg, None, None, dev, layers)
        tps_base, _ = decode_tokens_per_s(base, steps)
        del base
        for variant in DECODE_VARIANTS:
            dec = Decoder(cfg, run, variant, dev, layers)
            tps, toks = decode_tokens_per_s(dec, steps)
            decode.append(
                {
                    "model": model,
                    "variant": variant,
                    "tokens_per_s": tps,
                    "fp16_tokens_per_s": tps_base,
                    "x_fp16": tps / tps_base if tps_base == tps_base else None,
                    "tokens": toks,
                    "layers": dec.nl,
                }
            )
            del dec
            if dev == "cuda":
                torch.cuda.empty_cache()
        # the two W6A8 kernels compute the same integer sums and the same fp32 rescale order
        w6 = [d for d in decode if d["model"] == model and d["variant"].startswith("w6a8")]
        same = len({tuple(d["tokens"]) for d in w6}) == 1
        for d in w6:
            d["w6_kernels_agree"] = same
    vm = relax_vm_decode(args) if args.wheels else {"skipped": "no --wheels"}

    card = torch.cuda.get_device_name(0) if dev == "cuda" else "none (dry run: CPU stand-in, nothing timed)"
    report(card, args, manifest, checks, timings, copy_gbps, decode, vm)
    result = {
        "card": card,
        "arch": manifest["arch"],
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "dry_run": args.dry_run,
        "copy_GBps": copy_gbps,
        "checks": checks,
        "timings": timings,
        "decode": decode,
        "relax_vm": vm,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")
    if args.write_choices and timings:
        write_choices(result)
    failed = [c for c in checks if not c["ok"]] + [d for d in decode if d.get("w6_kernels_agree") is False]
    print(f"\n{len(checks) - len(failed)}/{len(checks)} checks passed; {time.perf_counter() - t_start:.0f} s")
    return 1 if failed else 0


def report(
    card: str,
    args: Any,
    manifest: dict[str, Any],
    checks: list[dict[str, Any]],
    timings: list[dict[str, Any]],
    copy_gbps: float | None,
    decode: list[dict[str, Any]],
    vm: dict[str, Any],
) -> None:
    print(
        f"\ncard: {card}; arch {manifest['arch']}; {len(manifest['kernels'])} kernels built {manifest['date']} with "
        f"TVM {manifest['tvm']}"
    )
    bad = [c for c in checks if not c["ok"]]
    print(f"checks: {len(checks) - len(bad)}/{len(checks)} passed" + "".join(f"\n  FAILED {c}" for c in bad))
    if copy_gbps:
        print(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)")
    print("\n| variant | N×K | M | ms | GB/s | % copy | × cuBLAS fp16 | × _int_mm (rows) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    if not timings:
        print("| (no GPU: nothing timed) | | | | | | | |")
    for t in timings:
        print(
            f"| {t['variant']} | {t['n']}×{t['k']} | {t['m']} | {t['ms']:.4f} | {t['GBps']:.0f} | "
            f"{100 * t['of_copy']:.0f} | "
            f"{t['x_cublas']:.2f} | {t['x_int_mm']:.2f} ({t['int_mm_rows']}) |"
        )
    print("\n| model | variant | layers | tokens/s | fp16 tokens/s | × fp16 | W6 kernels agree |")
    print("|---|---|---:|---:|---:|---:|---|")
    for d in decode:
        x = f"{d['x_fp16']:.2f}" if d["x_fp16"] else "-"
        agree = d.get("w6_kernels_agree", "")
        tps = "-" if math.isnan(d["tokens_per_s"]) else f"{d['tokens_per_s']:.1f}"
        base = "-" if math.isnan(d["fp16_tokens_per_s"]) else f"{d['fp16_tokens_per_s']:.1f}"
        print(f"| {d['model']} | {d['variant']} | {d['layers']} | {tps} | {base} | {x} | {agree} |")
    print(f"\nRelax VM decode: {vm}")


def write_choices(result: dict[str, Any]) -> None:
    """Per (N×K, activation bits) the faster W6 kernel at M = 1, for qcompile's lowering."""
    path = ROOT / "qcompile" / "codegen" / "tvm" / "cuda_choices.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    choices: dict[str, Any] = {}
    for bits in (6, 8):
        for t in result["timings"]:
            if t["m"] != 1 or t["variant"] != f"w6a{bits}-unpack":
                continue
            other = next(
                o
                for o in result["timings"]
                if o["m"] == 1 and o["n"] == t["n"] and o["k"] == t["k"] and o["variant"] == f"w6a{bits}-bitserial"
            )
            ms = {"u6": t["ms"], "b1": other["ms"]}
            choices[f"{t['n']}x{t['k']}/a{bits}"] = {"chosen": min(ms, key=ms.get), "ms_at_m1": ms}
    data[result["arch"]] = {
        "card": result["card"],
        "date": result["date"],
        "command": result["command"],
        "choices": choices,
    }
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    print(f"wrote {len(choices)} choices to {path}")


def relax_vm_decode(args: Any) -> dict[str, Any]:
    """qcompile.compile(target="cuda") of a random-weight SmolLM2-architecture model, decoded
    through the Relax VM; needs TVM (installed from --wheels) and transformers."""
    target = Path(tempfile.mkdtemp(prefix="qc-tvm-"))
    pip = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-index",
            "--find-links",
            str(args.wheels),
            "--target",
            str(target),
            "apache-tvm",
            "apache-tvm-ffi",
        ],
        capture_output=True,
        text=True,
    )
    if pip.returncode:
        return {"skipped": f"pip could not install TVM from {args.wheels}: {pip.stderr.strip().splitlines()[-1:]}"}
    sys.path[:0] = [str(target), str(ROOT)]
    try:
        from transformers import LlamaConfig, LlamaForCausalLM

        import qcompile
    except ImportError as e:
        return {"skipped": f"import failed: {e}"}
    cfg = MODELS["smollm2-135m"]
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cfg["vocab"],
            hidden_size=cfg["hidden"],
            intermediate_size=cfg["inter"],
            num_hidden_layers=cfg["layers"],
            num_attention_heads=cfg["heads"],
            num_key_value_heads=cfg["kv_heads"],
            tie_word_embeddings=True,
        )
    ).eval()
    out = {}
    for plan in ("w6a8", "w4a16-rtn-g128"):
        cm = qcompile.compile(model, target=f"cuda:{args.arch}", plan=plan, max_cache_len=256)
        ids = torch.randint(0, cfg["vocab"], (1, 16))
        cm.generate(ids, 4, eos_token_id=[])
        t0 = time.perf_counter()
        cm.generate(ids, args.decode_steps, eos_token_id=[])
        out[plan] = args.decode_steps / (time.perf_counter() - t0)
    return {"tokens_per_s_incl_prefill": out}


if __name__ == "__main__":
    sys.exit(main())
