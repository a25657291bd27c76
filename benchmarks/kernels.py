"""CPU micro-benchmark of linear-layer kernels, y = x @ W^T (x fp32 [M, K], W [N, K]); JSON + markdown table.

    .venv/bin/python benchmarks/kernels.py                      # all shapes, M in {1, 8, 64}
    .venv/bin/python benchmarks/kernels.py --quick --json /tmp/kernels.json

Measured per (N x K, M, method): the median wall time of one call (time.perf_counter), with the weights
coming from DRAM: each method gets several independent weight sets, in its own storage format, whose
total size exceeds 3x the 32 MiB L3 (unless building them would take longer than a budget: noted), and
consecutive calls rotate among them. Methods: torch_fp32 (F.linear), torch_int_mm (raw int8 x int8 ->
int32 GEMM on pre-quantized activations and [K, N] weights; no quantize/dequantize), ort_nbits_acc0/acc4
(onnxruntime com.microsoft MatMulNBits, 4-bit asymmetric, block 32 along K, fp32 scales, packed zero
points, accuracy_level 0 / 4), ort_int8_dynamic (quantize_dynamic QInt8 per-tensor, fused into
DynamicQuantizeMatMul) and, when qcompile.codegen.tvm.kernels exports BENCH_KERNELS, each qcompile kernel
(integer activations on 8/6-bit weights run the dot-product kernel of this CPU's best ISA, as the backend
dispatches: VNNI vpdpbusd or AVX2 vpmaddubsw; the *_generic rows force the lane-blocked template in the same run;
the *_bf16 rows are W4 with bf16-rounded activations on vdpbf16ps, the plan setting float_compute: bf16, which
needs AVX-512 BF16; the ISA and the LLVM features are recorded with the machine).
Every output is checked once (set 0) before timing: max_rel_err against the method's own reference
(dequantized W for MatMulNBits and the grouped qcompile code formats, the exact integer GEMM for _int_mm,
x @ W^T otherwise), max_rel_err_fp32 against x @ W^T. For qcompile kernels a second table gives the weight
bytes read per call and per output token, and the fraction of the bandwidth floor reached. The read
bandwidth (torch sum over a 1 GiB fp32 array, best of 5), measured in the same run, gives the floor:
weight bytes / bandwidth. ORT uses one global intra-op pool of --threads threads
shared by all sessions (not one spinning pool per weight set). Other processes on the cores ruin the
timings: their CPU use during each row is recorded, and flagged above 15 %.

``--tuned DB`` adds a ``<kernel>_tuned`` column per tunable qcompile kernel: the same kernel built with
its best schedule in the tuning database DB (issue 20; the default where DB has no record for this CPU).
``--tune-trials N`` first tunes every benchmarked kernel (each shape and M: static row counts) into DB,
up to N candidates each, and stores the tuning report in the JSON. A tuned and an untuned column with
the same schedule are separate builds timed separately: their difference is the run's noise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

try:
    from qcompile.codegen.tvm.kernels import BENCH_KERNELS

    QC_NOTE = ""
except ImportError as exc:
    BENCH_KERNELS = {}
    QC_NOTE = f"qcompile kernels skipped (import failed: {exc})"

MiB = 2**20
L3_BYTES = 32 * MiB
ROTATE_BYTES = 3 * L3_BYTES
MAX_SETS = 2048
SHAPES = [
    (4096, 4096),
    (11008, 4096),
    (4096, 11008),  # Llama-7B-like; then SmolLM2-135M's own
    (576, 576),
    (192, 576),
    (1536, 576),
    (576, 1536),
    (49152, 576),
]
QUICK_SHAPES = [(4096, 4096), (576, 1536)]
Run = Callable[[], Any]


@dataclass
class WeightSet:
    """One weight set in a method's storage format; ``check`` (kept for set 0 only) -> max rel error."""

    nbytes: int
    bind: Callable[[np.ndarray], Run]
    check: Callable[[np.ndarray, Any], float] | None


@dataclass
class Method:
    name: str
    prepare: Callable[[np.ndarray, int], WeightSet]  # (W fp32 [N, K], M) -> WeightSet
    tol: float  # verification bound on the max rel error (vs x @ W^T, or the dequantized W where noted)
    strict: bool = True  # exceeding tol: n/a (baselines) or only a note (qcompile kernels: lossy, recorded)
    per_m: bool = False  # prepare depends on M: rebuild the weight sets for each M


def rel_err(y: Any, ref: np.ndarray) -> float:
    """max |y - ref| / max |ref| (per-element relative errors blow up near zero)."""
    y = np.asarray(y.detach() if isinstance(y, torch.Tensor) else y, dtype=np.float64)
    return float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))


def ref_check(w_ref: np.ndarray) -> Callable[[np.ndarray, Any], float]:
    return lambda x, y: rel_err(y, x.astype(np.float64) @ w_ref.T.astype(np.float64))


def torch_bind(fn: Callable[[torch.Tensor], Any]) -> Callable[[np.ndarray], Run]:
    def bind(x: np.ndarray) -> Run:
        xt = torch.from_numpy(x).clone()  # torch-allocated, hence 64-byte aligned (TVM kernels require it)
        return lambda: fn(xt)

    return bind


def ort_session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.use_per_session_threads = False  # the global pool: intra_op_num_threads = --threads, set in main()
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def ort_bind(sess: ort.InferenceSession, n: int) -> Callable[[np.ndarray], Run]:
    def bind(x: np.ndarray) -> Run:
        y = np.empty((x.shape[0], n), np.float32)
        b = sess.io_binding()
        b.bind_cpu_input("x", x)
        b.bind_output("y", "cpu", 0, np.float32, list(y.shape), y.ctypes.data)

        def run() -> np.ndarray:
            sess.run_with_iobinding(b)
            return y

        return run

    return bind


def graph(nodes: list, k: int, n: int, inits: list[np.ndarray], names: list[str], ms_opset: bool) -> onnx.ModelProto:
    g = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
        [numpy_helper.from_array(a, nm) for a, nm in zip(inits, names)],
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.microsoft", 1)] if ms_opset else [])
    return helper.make_model(g, opset_imports=opsets)


def quant4(w: np.ndarray, bs: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric 4-bit per block of ``bs`` along K in MatMulNBits layout: B uint8 [N, K/bs, bs/2] (low nibble
    first), scales fp32 [N * K/bs], zero points uint8 [N * ceil(K/bs / 2)] (low nibble first); + dequantized W."""
    n, k = w.shape
    kb = k // bs
    b = w.reshape(n, kb, bs)
    lo, hi = np.minimum(b.min(-1), 0), np.maximum(b.max(-1), 0)
    scale = ((hi - lo) / 15).astype(np.float32)
    scale[scale == 0] = 1.0
    zp = np.clip(np.round(-lo / scale), 0, 15).astype(np.uint8)
    q = np.clip(np.round(b / scale[..., None]) + zp[..., None], 0, 15).astype(np.uint8)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)
    zpp = np.pad(zp, ((0, 0), (0, kb % 2)))
    zpk = zpp[:, 0::2] | (zpp[:, 1::2] << 4)
    deq = ((q.astype(np.float32) - zp[..., None]) * scale[..., None]).reshape(n, k)
    return packed, scale.reshape(-1), zpk.reshape(-1), deq


def qcompile_kernel(
    prepare: Callable[[torch.Tensor, int], Callable[[torch.Tensor], torch.Tensor]],
) -> Callable[[np.ndarray, int], WeightSet]:
    def prep(w: np.ndarray, m: int) -> WeightSet:
        run = prepare(torch.from_numpy(w), m)
        nbytes = int(getattr(run, "weight_bytes", w.size))
        own = getattr(run, "dequantized", None)  # checked against the weight it stores, when it says
        check = ref_check(w) if own is None else lambda x, y: ref_check(own().numpy())(x, y)
        return WeightSet(nbytes, torch_bind(run), check)

    return prep


def methods() -> list[Method]:
    def torch_fp32(w: np.ndarray, m: int) -> WeightSet:
        wt = torch.from_numpy(w)
        return WeightSet(w.nbytes, torch_bind(lambda xt: F.linear(xt, wt)), ref_check(w))

    def int8(a: np.ndarray) -> torch.Tensor:  # symmetric per-tensor int8 (outside the timed call)
        return torch.from_numpy(np.clip(np.round(a * (127 / np.abs(a).max())), -127, 127).astype(np.int8))

    def torch_int_mm(w: np.ndarray, m: int) -> WeightSet:
        wq = int8(w)
        wkn = wq.t().contiguous()  # [K, N] contiguous, as _int_mm wants

        def bind(x: np.ndarray) -> Run:
            xq, errors = int8(x), []
            m = x.shape[0]
            for rows in sorted({m, max(m, 17, -(-m // 8) * 8), max(m, 32), max(m, 64)}):
                xp = torch.zeros(rows, x.shape[1], dtype=torch.int8)
                xp[:m] = xq
                try:
                    torch._int_mm(xp, wkn)
                except RuntimeError as exc:  # some torch builds reject small M: pad to the first accepted
                    errors.append(str(exc).splitlines()[0][:100])
                    continue
                run = lambda xp=xp: torch._int_mm(xp, wkn)[:m]
                if errors:
                    run.note = f"M padded to {rows} (_int_mm: {errors[0]})"  # type: ignore[attr-defined]
                return run
            raise RuntimeError(f"_int_mm rejected M={m}: {errors[0]}")

        def check(x: np.ndarray, y: Any) -> float:  # exact integer GEMM expected
            return rel_err(y, (int8(x).numpy().astype(np.int64) @ wq.numpy().astype(np.int64).T).astype(np.float64))

        return WeightSet(wkn.numel(), bind, check)

    def ort_nbits(acc: int) -> Callable[[np.ndarray, int], WeightSet]:
        def prep(w: np.ndarray, m: int) -> WeightSet:
            n, k = w.shape
            packed, scale, zp, deq = quant4(w)
            node = helper.make_node(
                "MatMulNBits",
                ["x", "B", "S", "Z"],
                ["y"],
                domain="com.microsoft",
                K=k,
                N=n,
                bits=4,
                block_size=32,
                accuracy_level=acc,
            )
            sess = ort_session(graph([node], k, n, [packed, scale, zp], ["B", "S", "Z"], True))
            return WeightSet(packed.nbytes + scale.nbytes + zp.nbytes, ort_bind(sess, n), ref_check(deq))

        return prep

    def ort_int8_dynamic(w: np.ndarray, m: int) -> WeightSet:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        n, k = w.shape
        fp32 = graph([helper.make_node("MatMul", ["x", "W"], ["y"])], k, n, [np.ascontiguousarray(w.T)], ["W"], False)
        with tempfile.TemporaryDirectory() as d:
            logging.disable(logging.WARNING)  # silence the "consider pre-processing" warning
            try:
                quantize_dynamic(fp32, Path(d) / "q.onnx", weight_type=QuantType.QInt8, per_channel=False)
            finally:
                logging.disable(logging.NOTSET)
            qm = onnx.load(str(Path(d) / "q.onnx"))
        nbytes = sum(numpy_helper.to_array(t).nbytes for t in qm.graph.initializer)
        return WeightSet(nbytes, ort_bind(ort_session(qm), n), ref_check(w))

    return [
        Method("torch_fp32", torch_fp32, 1e-4),
        Method("torch_int_mm", torch_int_mm, 1e-6),
        Method("ort_nbits_acc0", ort_nbits(0), 1e-3),
        Method("ort_nbits_acc4", ort_nbits(4), 2e-2),
        Method("ort_int8_dynamic", ort_int8_dynamic, 5e-2),
    ] + [Method(name, qcompile_kernel(p), 0.25, strict=False, per_m=True) for name, p in BENCH_KERNELS.items()]


def tuned_methods(
    base: list[Method], shapes: list[tuple[int, int]], ms: list[int], args: argparse.Namespace
) -> list[Method]:
    """A ``*_tuned`` column for each tunable qcompile kernel, with its best record in ``args.tuned``
    (tuned there first, every shape and M, when ``--tune-trials``)."""
    from qcompile.codegen.tvm.kernels.bench import BENCH_FORMATS, tuned_prepare, use_tuning
    from qcompile.codegen.tvm.target import host_target
    from qcompile.tuning.tuner import Applied, TuneOptions, tune_tunables

    names = [m.name for m in base if m.name in BENCH_FORMATS]
    if args.kernels:
        names = [n for n in names if n in args.kernels.split(",") or f"{n}_tuned" in args.kernels.split(",")]
    if args.tune_trials:
        ts = {}
        for name in names:
            for n, k in shapes:
                for m in ms:
                    t = BENCH_FORMATS[name].tunable(n, k, m)
                    ts[t.name] = t
        report = tune_tunables(list(ts.values()), host_target(), args.tuned, TuneOptions(trials=args.tune_trials))
        print(report.summary(), file=sys.stderr)
        args.tuning_report = report.to_dict()
    use_tuning(Applied.open(args.tuned, host_target()))
    q = {m.name: m for m in base}
    return [Method(f"{n}_tuned", qcompile_kernel(tuned_prepare(n)), q[n].tol, strict=False, per_m=True) for n in names]


def read_bandwidth(repeats: int = 5) -> tuple[float, int]:
    """Best-of-``repeats`` read bandwidth (GB/s) of a torch sum over an array far larger than L3."""
    try:
        a = torch.ones(2**30 // 4, dtype=torch.float32)
    except (RuntimeError, MemoryError):
        a = torch.ones(2**29 // 4, dtype=torch.float32)
    a.sum()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    nbytes = a.nbytes
    del a
    return nbytes / best / 1e9, nbytes


def others_cpu_s() -> float:
    """CPU seconds used so far by everything but this process (incl. steal), from /proc/stat: to flag contention."""
    try:
        v = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return float("nan")
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK") - sum(os.times()[:2])


def time_rotating(runs: list[Run], args: argparse.Namespace, max_calls: int = 20000) -> tuple[float, float, int]:
    """(median ms, min ms per call, timed calls); call i uses weight set i % len(runs). Warm-up: one call, then (unless
    that was slow) a pass over all sets + 3. A slow kernel stops after ``args.max_s`` once it has
    ``args.min_slow`` timed calls."""
    t0 = time.perf_counter()
    runs[1 % len(runs)]()
    if time.perf_counter() - t0 < args.max_s / 50:
        for i in range(len(runs) + 3):
            runs[i % len(runs)]()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_calls and (len(times) < args.min_calls or time.perf_counter() - start < args.min_s):
        if len(times) >= args.min_slow and time.perf_counter() - start > args.max_s:
            break
        run = runs[(len(times) + 1) % len(runs)]
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, min(times) * 1e3, len(times)


def bench(method: Method, n: int, k: int, ms: list[int], args: argparse.Namespace, bw: float) -> list[dict]:
    rng = np.random.default_rng(zlib.crc32(f"{method.name} {n}x{k}".encode()))
    new_w = lambda: rng.standard_normal((n, k), dtype=np.float32) * 0.02
    rows: list[dict] = []
    sets: list[WeightSet] = []
    cap_note = ""
    for m in ms:
        row: dict[str, Any] = {
            "shape": f"{n}x{k}",
            "N": n,
            "K": k,
            "M": m,
            "method": method.name,
            "ms": None,
            "notes": "",
            "floor_fp32_ms": 4 * n * k / bw / 1e6,
            "floor_4bit_ms": n * k / bw / 2e6,
        }
        try:
            if not sets or method.per_m:
                sets = []  # frees the previous sets before building new ones
                w0 = new_w()  # set 0's fp32 weight, kept for the error vs fp32
                first = method.prepare(w0, m)
                t0 = time.perf_counter()  # time the 2nd set: the 1st may include a one-off compile
                second = method.prepare(new_w(), m)
                count = max(2, ROTATE_BYTES // first.nbytes + 1)  # total > ROTATE_BYTES
                limit = min(MAX_SETS, max(2, int(args.build_s / (time.perf_counter() - t0))))
                cap_note = (
                    f"rotation limited to {limit} sets ({limit * first.nbytes / MiB:.0f} MiB) by "
                    f"{'MAX_SETS' if limit == MAX_SETS else 'build time'}"
                ) * (count > limit)
                sets = [first, second] + [method.prepare(new_w(), m) for _ in range(min(count, limit) - 2)]
                for s in sets[1:]:
                    s.check = None
            x = np.random.default_rng(m).standard_normal((m, k), dtype=np.float32)
            runs = [s.bind(x) for s in sets]
            y0 = runs[0]()
            err = sets[0].check(x, y0)  # type: ignore[misc]
            if not isinstance(y0, torch.Tensor) or y0.is_floating_point():  # not for raw int32 GEMM output
                row["max_rel_err_fp32"] = rel_err(y0, x.astype(np.float64) @ w0.T.astype(np.float64))
            row.update(
                max_rel_err=err,
                weight_bytes=sets[0].nbytes,
                n_sets=len(sets),
                rotation_mib=round(len(sets) * sets[0].nbytes / MiB, 1),
                floor_ms=sets[0].nbytes / bw / 1e6,
            )
            bad = f"max rel err {err:.3g} > {method.tol:g}" if not err <= method.tol else ""
            if bad and method.strict:
                raise AssertionError(f"verification failed: {bad}")
            o0, t0 = others_cpu_s(), time.perf_counter()
            row["ms"], row["min_ms"], row["calls"] = time_rotating(runs, args)
            row["others_cpu"] = (others_cpu_s() - o0) / (time.perf_counter() - t0) / (os.cpu_count() or 1)
            busy = f"contended: other processes used {row['others_cpu']:.0%} of the CPU" * (row["others_cpu"] > 0.15)
            row["gbps"] = sets[0].nbytes / (row["ms"] * 1e-3) / 1e9
            row["notes"] = "; ".join(filter(None, [getattr(runs[0], "note", ""), cap_note, bad, busy]))
        except Exception as exc:  # noqa: BLE001 - an unsupported shape/M is a result (n/a), not a crash
            row["notes"] = f"n/a: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        rows.append(row)
    return rows


def machine_info(threads: int, bw: float, bw_bytes: int, others: float) -> dict[str, Any]:
    cpu = "unknown"
    try:
        cpu = next(
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    isa, features = "n/a", []
    try:
        from qcompile.codegen.tvm.kernels.x86 import isa_for
        from qcompile.codegen.tvm.target import host_target

        features = sorted(host_target().features)
        isa = isa_for(host_target().features) or "generic"
    except ImportError:
        pass
    return {
        "cpu": cpu,
        "llvm_features": features,
        "qcompile_isa": isa,
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "read_bandwidth_gbps": bw,
        "bandwidth_array_bytes": bw_bytes,
        "l3_bytes_assumed": L3_BYTES,
        "rotate_bytes": ROTATE_BYTES,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "others_cpu_during_run": others,
        "command": " ".join(sys.argv),
    }


def report(rows: list[dict], names: list[str], bw: float, notes: list[str]) -> str:
    by = {(r["shape"], r["M"], r["method"]): r for r in rows}
    keys = list(dict.fromkeys((r["shape"], r["N"], r["K"], r["M"]) for r in rows))
    fmt = lambda r: "n/a" if r["ms"] is None else f"{r['ms']:.3f}" + "*" * (r.get("others_cpu", 0) > 0.15)
    out = ["| N×K | M | " + " | ".join(names) + " | floor fp32 / 4-bit |", "|---|---:|" + "---:|" * (len(names) + 1)]
    for shape, n, k, m in keys:
        cells = [fmt(by[(shape, m, nm)]) if (shape, m, nm) in by else "-" for nm in names]
        floors = f"{4 * n * k / bw / 1e6:.3f} / {n * k / bw / 2e6:.3f}"
        out.append(f"| {shape} | {m} | " + " | ".join(cells) + f" | {floors} |")
    out.append(
        f"\nms per call (median, weights rotated from DRAM; * = other processes busy meanwhile); read bandwidth "
        f"{bw:.1f} GB/s; floor = N*K*4 B (fp32) or N*K/2 B (pure 4-bit, no scales) / bandwidth."
    )
    qc = [nm for nm in names if nm in BENCH_KERNELS]
    ort4 = [nm for nm in ("ort_nbits_acc0", "ort_nbits_acc4") if nm in names]
    if qc and ort4:
        out += [
            "\nbest ORT 4-bit ms / qcompile kernel ms (> 1: qcompile faster)\n",
            "| N×K | M | " + " | ".join(qc) + " |",
            "|---|---:|" + "---:|" * len(qc),
        ]
        for shape, _, _, m in keys:
            best = min((by[(shape, m, o)]["ms"] for o in ort4 if by.get((shape, m, o), {}).get("ms")), default=None)
            cells = [
                f"{best / by[(shape, m, q)]['ms']:.2f}" if best and by.get((shape, m, q), {}).get("ms") else "n/a"
                for q in qc
            ]
            out.append(f"| {shape} | {m} | " + " | ".join(cells) + " |")
    for base, label in (("torch_fp32", "torch fp32"), ("ort_int8_dynamic", "ORT int8 dynamic MatMul")):
        if qc and base in names:
            out += [
                f"\n{label} ms / qcompile kernel ms (> 1: qcompile faster)\n",
                "| N×K | M | " + " | ".join(qc) + " |",
                "|---|---:|" + "---:|" * len(qc),
            ]
            for shape, _, _, m in keys:
                b = by.get((shape, m, base), {}).get("ms")
                cells = [
                    f"{b / by[(shape, m, q)]['ms']:.2f}" if b and by.get((shape, m, q), {}).get("ms") else "n/a"
                    for q in qc
                ]
                out.append(f"| {shape} | {m} | " + " | ".join(cells) + " |")
    if qc:
        out += [
            "\nqcompile kernels: weight bytes read per call (codes + scales + offsets, as stored for the kernel), per "
            "output token (÷ M), and the fraction of the bandwidth floor reached (floor ms = weight bytes / read "
            "bandwidth; 1.00 = memory-bound at the measured bandwidth)\n",
            "| N×K | M | " + " | ".join(f"{q} KiB · B/tok · floor" for q in qc) + " |",
            "|---|---:|" + "---:|" * len(qc),
        ]
        for shape, _, _, m in keys:
            cells = []
            for q in qc:
                r = by.get((shape, m, q), {})
                if not r.get("ms") or not r.get("weight_bytes"):
                    cells.append("n/a")
                    continue
                wb = r["weight_bytes"]
                cells.append(f"{wb / 1024:.0f} · {wb / m:,.0f} · {wb / bw / 1e6 / r['ms']:.2f}")
            out.append(f"| {shape} | {m} | " + " | ".join(cells) + " |")
    row_notes = [f"{r['shape']} M={r['M']} {r['method']}: {r['notes']}" for r in rows if r["notes"]]
    out += ["\nNotes:"] + [f"- {s}" for s in notes + row_notes] if notes or row_notes else []
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", help='comma list of NxK, e.g. "4096x4096,576x576"')
    ap.add_argument("--ms", help="comma list of M (default 1,8,64; --quick: 1,64)")
    ap.add_argument("--json", type=Path, help="output path (default benchmarks/results/kernels[-quick].json)")
    ap.add_argument("--quick", action="store_true", help="4096x4096 and 576x1536, M=1,64, fewer calls")
    ap.add_argument("--kernels", help="comma list of method (column) names to run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--tuned",
        type=Path,
        default=None,
        metavar="DB",
        help="add a *_tuned column per qcompile kernel: its best schedule in this tuning database",
    )
    ap.add_argument(
        "--tune-trials",
        type=int,
        default=0,
        help="with --tuned: first tune every benchmarked kernel (shape x M) into DB, up to this many candidates each",
    )
    ap.add_argument(
        "--results", type=Path, default=None, help="also write the table into this RESULTS.md (section kernels)"
    )
    args = ap.parse_args()
    shapes = (
        [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
        if args.shapes
        else QUICK_SHAPES
        if args.quick
        else SHAPES
    )
    ms = [int(v) for v in args.ms.split(",")] if args.ms else [1, 64] if args.quick else [1, 8, 64]
    # timed calls >= min_calls and >= min_s; slow kernels stop at max_s after min_slow calls; build_s: set-building
    args.min_calls, args.min_s, args.max_s, args.min_slow, args.build_s = (
        (10, 0.1, 3.0, 2, 20.0) if args.quick else (20, 0.3, 10.0, 3, 60.0)
    )
    json_path = args.json or HERE / "results" / f"kernels{'-quick' if args.quick else ''}.json"

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))  # read by TVM's pool on its first parallel launch
    notes = [QC_NOTE] if QC_NOTE else []
    # one ORT intra-op pool of --threads threads shared by all sessions (must precede the first session)
    ort.capi._pybind_state.set_global_thread_pool_sizes(args.threads, 1)
    all_methods = methods()
    if args.tuned is not None:
        all_methods += tuned_methods(all_methods, shapes, ms, args)
    if args.kernels:
        wanted = args.kernels.split(",")
        unknown = set(wanted) - {m.name for m in all_methods}
        if unknown:
            ap.error(f"unknown kernels {sorted(unknown)}; available: {[m.name for m in all_methods]}")
        # a *_tuned column comes with its kernel (tuned_methods picks them from the same list)
        all_methods = [m for m in all_methods if m.name in wanted or m.name.removesuffix("_tuned") in wanted]

    o0, t0 = others_cpu_s(), time.perf_counter()
    bw, bw_bytes = read_bandwidth()
    if (bw_others := (others_cpu_s() - o0) / (time.perf_counter() - t0) / (os.cpu_count() or 1)) > 0.15:
        notes.append(f"other processes used {bw_others:.0%} of the CPU during the bandwidth test")
    print(
        f"read bandwidth: {bw:.1f} GB/s (torch sum over {bw_bytes / MiB:.0f} MiB, {args.threads} threads)",
        file=sys.stderr,
    )
    rows: list[dict] = []
    for n, k in (bar := tqdm([(n, k) for n, k in shapes], desc="shapes", file=sys.stderr)):
        for method in all_methods:
            bar.set_postfix_str(f"{n}x{k} {method.name}")
            rows += bench(method, n, k, ms, args, bw)
    others = (others_cpu_s() - o0) / (time.perf_counter() - t0) / (os.cpu_count() or 1)
    if others > 0.05:
        notes.append(f"other processes used {others:.0%} of the CPU during the run: timings are unreliable")
    base = {(r["shape"], r["M"]): r["ms"] for r in rows if r["method"] == "torch_fp32"}
    for r in rows:
        b = base.get((r["shape"], r["M"]))
        r["speedup_vs_torch_fp32"] = b / r["ms"] if b and r["ms"] else None
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(
        json.dumps(
            {
                "machine": machine_info(args.threads, bw, bw_bytes, others),
                "notes": notes,
                "rows": rows,
                "tuning": getattr(args, "tuning_report", None),
            },
            indent=1,
        )
    )
    table = report(rows, [m.name for m in all_methods], bw, notes)
    print(table)
    print(f"\nwrote {json_path}", file=sys.stderr)
    if args.results:
        from benchmarks.accuracy import write_section

        info = machine_info(args.threads, bw, bw_bytes, others)
        head = (
            f"Command: `python {' '.join(sys.argv)}`  \nDate: {info['date']}. Machine: {info['cpu']} "
            f"(LLVM features {', '.join(info['llvm_features'])}; qcompile dot-product ISA {info['qcompile_isa']}), "
            f"{info['cores']} cores, "
            f"{args.threads} threads; torch {info['torch']}, onnxruntime {info['onnxruntime']}. Baselines in the same "
            "run: "
            "torch fp32 F.linear, torch._int_mm, onnxruntime MatMulNBits and int8 dynamic MatMul.\n\n"
        )
        write_section(args.results, "kernels", head + table)


if __name__ == "__main__":
    main()
