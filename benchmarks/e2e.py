"""End-to-end decode speed on SmolLM2-135M: transformers eager fp32, qcompile's torch reference
backend, and qcompile's TVM backend under several plans, in one run on one machine.

    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/e2e.py                # all rows, table into RESULTS.md
    .venv/bin/python benchmarks/e2e.py --rows eager,tvm:fp32 --no-write

Each row: greedy decoding, batch 1, a ``--prompt``-token prompt from the calibration split (so
no evaluation text is used), ``--new`` new tokens, best of ``--repeat`` runs; decode tokens/s
counts the steps after the first new token (which prefill produces). ``eager`` is
transformers' ``model.generate`` with its static cache (decode = a full generate minus a one-token one); compile time is
``qcompile.compile`` wall time (capture + passes + TVM build). Ratios are against the eager row
of the same run. Perplexity is checked separately (``--ppl``: tvm vs torch backend on the
evaluation split, the 1e-3 relative bar of issue 7). JSON: benchmarks/results/e2e-smollm2-135m.json
(``--json``). ``--llama-cpp`` (or the row ``llama.cpp``) adds the llama.cpp peer on the same GGUF
(benchmarks/llama_cpp_peer.py; its venv comes from ``make llama-cpp-venv``). A row's plan may be a
preset name or a plan file (``tvm:benchmarks/plans/w2a16-rtn-g64.yaml``).

Bytes per token (TVM rows): the bytes the linear layers read once per decode step, as the kernels store
them (the backend's repacked codes, scales, zero/offset terms and biases; the float head: SmolLM2's head
is tied to the embedding, so the whole table); the KV cache and the one embedding row are left out.
With ``--profile`` each TVM row also records one decode step split into kernel time (linear, lm_head,
attention, cache writes, other), VM overhead and Python overhead (benchmarks/decode_profile.py prints
the same split as a table, with the pre-issue-21 path beside it).
With ``--tuned DB`` every ``tvm:PLAN`` row is followed by a ``tvm-tuned:PLAN`` row compiled with
``tuning_db=DB`` (issue 20); ``--tune-trials N`` first runs ``qcompile.tune`` on each plan into DB (N
candidates per kernel) and stores each tuning report (trials, seconds per kernel) in the JSON.
With ``--floor`` the read bandwidth is measured in the same run (benchmarks/kernels.py's torch sum over
1 GiB) and each row gets the decode tokens/s the bandwidth would allow (bandwidth / bytes per token)
and the fraction of it reached.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import qcompile  # noqa: E402
from benchmarks.accuracy import write_section  # noqa: E402
from qcompile.eval.datasets import calibration_tokens  # noqa: E402
from qcompile.eval.harness import best_generation, machine  # noqa: E402
from qcompile.eval.zoo import load_model  # noqa: E402

OUT = HERE / "results" / "e2e-smollm2-135m.json"
ROWS = "eager,torch:fp32,tvm:fp32,tvm:w8a8-rtn,tvm:w6a8,tvm:w4a16-rtn-g128,tvm:w4a16-rtn-g32-asym"


def _eager(model: torch.nn.Module, ids: torch.Tensor, new: int, cache_len: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of transformers' own ``generate`` (greedy, static cache):
    prefill = a one-token generate; decode = the rest of a ``new``-token generate."""
    kw = dict(do_sample=False, cache_implementation="static", pad_token_id=0)
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
        t2 = time.perf_counter()
    assert out.shape[1] == ids.shape[1] + new
    prefill = t1 - t0
    return prefill, (new - 1) / max(t2 - t1 - prefill, 1e-9)


def run_row(row: str, model: torch.nn.Module, ids: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    cache_len = ids.shape[1] + args.new
    if row == "llama.cpp":  # the peer, in its own venv (benchmarks/llama_cpp_peer.py)
        from benchmarks.llama_cpp_peer import llama_cpp_row
        from qcompile.eval.zoo import smollm2_gguf

        threads = int(os.environ.get("TVM_NUM_THREADS", "2"))
        return llama_cpp_row(smollm2_gguf(), ids[0].tolist(), args.new, args.repeat, threads)
    if row == "eager":
        best = max((_eager(model, ids, args.new, cache_len) for _ in range(args.repeat)), key=lambda r: r[1])
        return {"row": row, "prefill_s": best[0], "decode_tok_s": best[1], "compile_s": None}
    backend, plan = row.split(":", 1)
    tuning_db = None
    if backend == "tvm-tuned":  # the same build with the tuning database's best schedules (--tuned)
        backend, tuning_db = "tvm", args.tuned
    t0 = time.perf_counter()
    cm = qcompile.compile(model, plan=plan, backend=backend, max_cache_len=cache_len, tuning_db=tuning_db)
    compile_s = time.perf_counter() - t0
    best, _ = best_generation(cm, ids, args.new, args.repeat)
    rec = {
        "row": row,
        "prefill_s": best.prefill_seconds,
        "decode_tok_s": best.decode_tokens_per_s,
        "compile_s": compile_s,
    }
    if backend == "tvm":
        rec["build_s"] = cm.report.backend.get("build_seconds")
        rec["weights_mib"] = round(cm.report.packed_weight_bytes / 2**20, 1)
        rec["bytes_per_token"] = linear_bytes(cm.program, getattr(cm._backend, "params", {}))
        if tuning_db is not None:
            t = cm.report.backend["tuning"]
            rec["tuning"] = {k: t[k] for k in ("applied", "untuned", "ignored")}
        if args.profile:  # one decode step split into kernels, VM and Python (qcompile.codegen.tvm.profile)
            from qcompile.codegen.tvm.profile import profile_entry

            vocab = int(cm.run_entry("prefill", ids, torch.arange(ids.shape[1])).shape[-1])
            prof = profile_entry(cm, "decode", [ids[:, -1:], torch.tensor([ids.shape[1]])], vocab=vocab)
            rec["profile"] = prof.to_dict()
    return rec


def linear_bytes(program: Any, params: dict[str, torch.Tensor]) -> int:
    """Bytes the linear layers (float or quantized) read in one decode step, besides the KV cache and one
    embedding row: for a layer whose weight the TVM backend repacked, its repacked tensors (named
    ``<state key>@...``: codes, scales, zero/offset term, padded bias), as the kernel reads them; for
    any other, the Program's state tensors it takes (SmolLM2's tied fp32 head: the whole table)."""
    from qcompile.ir.patterns import linear_form

    repacked = {k.split("@")[0] for k in params}
    bases: set[str] = set()
    raw: set[str] = set()
    for entry in program.entries.values():
        bound = {p: s.name for p, s in zip(entry.placeholders(), entry.slots) if s.name in program.state}
        for node in entry.graph.graph.nodes:
            if linear_form(node) is None:
                continue
            keys = {bound[a] for a in node.args if a in bound}
            if bound.get(node.args[1]) in repacked:
                bases.update(keys)
            else:
                raw.update(keys)
    nbytes = sum(t.numel() * t.element_size() for k, t in params.items() if k.split("@")[0] in bases)
    return nbytes + sum(program.state[k].numel() * program.state[k].element_size() for k in raw)


def table(data: dict[str, Any]) -> str:
    recs = data["rows"]
    eager = next((r["decode_tok_s"] for r in recs if r["row"] == "eager"), None)
    lines = [
        "### End to end: SmolLM2-135M greedy decode, TVM backend vs eager and the torch reference",
        "",
        f"Command: `{data['command']}`  ",
        f"Date: {data['date']}. Machine: {data['machine']}; TVM target: {data.get('tvm_target', '?')}.  ",
        f"SmolLM2-135M, batch 1, {data['prompt']}-token prompt (calibration split), {data['new']} new tokens, greedy, "
        f"best of {data['repeat']}. Baseline: transformers eager fp32 in the same run.",
        "",
    ]
    bw = data.get("read_bandwidth_gbps")
    floor = " MiB read/token | floor tok/s | of floor |" if bw else ""
    lines += [
        "| row | decode tok/s | × eager | prefill s | compile s (TVM build s) |" + floor,
        "|---|---:|---:|---:|---:|" + "---:|---:|---:|" * bool(bw),
    ]
    for r in recs:
        ratio = f"{r['decode_tok_s'] / eager:.2f}" if eager else "n/a"
        comp = (
            ""
            if r["compile_s"] is None
            else f"{r['compile_s']:.1f}" + (f" ({r['build_s']:.1f})" if r.get("build_s") else "")
        )
        extra = ""
        if bw:
            b = r.get("bytes_per_token")
            extra = (
                f" {b / 2**20:.1f} | {bw * 1e9 / b:.1f} | {r['decode_tok_s'] * b / (bw * 1e9):.2f} |" if b else " | | |"
            )
        lines.append(f"| {r['row']} | {r['decode_tok_s']:.2f} | {ratio} | {r['prefill_s']:.3f} | {comp} |" + extra)
    if bw:
        lines += ["", f"Read bandwidth measured in the same run: {bw:.1f} GB/s (torch sum over 1 GiB)."]
    if data.get("ppl"):
        lines += [
            "",
            f"Perplexity through both backends (evaluation split, {data.get('ppl_windows', '?')} × 512 tokens):",
            "",
            "| plan | torch backend | tvm backend | relative difference |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| {p['plan']} | {p['torch']:.4f} | {p['tvm']:.4f} | {p['rel']:.1e} |" for p in data["ppl"]]
    if data.get("sensitivity"):
        lines += [
            "",
            "The torch reference against itself with the embedding table perturbed by 1e-7 (relative, seeded): "
            f"`python benchmarks/e2e.py --sensitivity {','.join(p['plan'] for p in data['sensitivity'])} "
            f"--ppl-windows {data.get('ppl_windows', 4)}`",
            "",
            "| plan | torch backend | same, embeddings × (1 + 1e-7·N(0,1)) | relative difference |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| {p['plan']} | {p['torch']:.4f} | {p['torch_perturbed']:.4f} | {p['rel']:.1e} |"
            for p in data["sensitivity"]
        ]
    if data.get("notes"):
        lines += ["", *data["notes"]]
    return "\n".join(lines)


def ppl_check(plans: list[str], windows: int) -> list[dict[str, Any]]:
    """Perplexity through the tvm and the torch backend (evaluation split, ``windows`` × 512)."""
    from qcompile.eval.harness import TextSource, evaluate

    out = []
    for plan in plans:
        res = {
            b: evaluate("smollm2-135m", plan, text=TextSource(), windows=windows, seq=512, backend=b)["ppl"]
            for b in ("torch", "tvm")
        }
        out.append({"plan": plan, **res, "rel": abs(res["tvm"] - res["torch"]) / res["torch"]})
        print(out[-1], flush=True)
    return out


def ppl_sensitivity(plans: list[str], windows: int, rel: float = 1e-7) -> list[dict[str, Any]]:
    """How far the torch reference's own perplexity moves when the embedding table is perturbed by
    ``rel`` relative noise (seeded): the size of a difference that fp32 rounding alone can cause."""
    from qcompile.eval.harness import TextSource
    from qcompile.eval.perplexity import perplexity

    zm = load_model("smollm2-135m")
    tokens = TextSource().tokens(zm.tokenizer)
    out = []
    for plan in plans:
        cm = qcompile.compile(zm.model, plan=plan, backend="torch", lm_entries=("forward",))
        base = perplexity(cm, tokens, seq=512, windows=windows).ppl
        key = next(k for k in cm.program.state if "embed_tokens" in k)
        w = cm.program.state[key].clone()
        cm.program.state[key] = w * (1 + rel * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
        cm = qcompile.compile(cm.program, plan="fp32", backend="torch")  # same graph, perturbed state
        moved = perplexity(cm, tokens, seq=512, windows=windows).ppl
        out.append({"plan": plan, "torch": base, "torch_perturbed": moved, "rel": abs(moved - base) / base})
        print(out[-1], flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=ROWS)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--ppl", default="", help="plans whose perplexity to compare between the tvm and torch backends")
    ap.add_argument("--ppl-windows", type=int, default=4)
    ap.add_argument(
        "--sensitivity",
        default="",
        help="plans whose torch-backend perplexity to re-measure with the "
        "embeddings perturbed by 1e-7 (relative): the spread fp32 rounding alone causes",
    )
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--json", type=Path, default=OUT, help=f"JSON output (default {OUT.relative_to(HERE.parent)})")
    ap.add_argument(
        "--floor", action="store_true", help="measure the read bandwidth: bytes per token, the floor, its fraction"
    )
    ap.add_argument(
        "--llama-cpp",
        action="store_true",
        help="add the llama.cpp row (same GGUF, threads, prompt, new tokens; needs `make llama-cpp-venv`)",
    )
    ap.add_argument(
        "--profile", action="store_true", help="TVM rows: split one decode step into kernels, VM and Python overhead"
    )
    ap.add_argument("--from-json", action="store_true", help="only rewrite the RESULTS.md section from the JSON")
    ap.add_argument(
        "--tuned",
        type=Path,
        default=None,
        metavar="DB",
        help="after each tvm:PLAN row, a tvm-tuned:PLAN row built with this tuning database",
    )
    ap.add_argument(
        "--tune-trials",
        type=int,
        default=0,
        help="with --tuned: first tune each tvm plan into DB (candidates per kernel)",
    )
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    a = ap.parse_args(argv)
    out = a.json
    if a.from_json or a.sensitivity:
        data = json.loads(out.read_text())
        if a.sensitivity:
            data["sensitivity"] = ppl_sensitivity(a.sensitivity.split(","), a.ppl_windows)
            out.write_text(json.dumps(data, indent=1))
        write_section(Path(a.results), "e2e", table(data))
        return 0
    torch.set_num_threads(int(os.environ.get("TVM_NUM_THREADS", "2")))
    from qcompile.codegen.tvm.target import host_target

    zm = load_model("smollm2-135m")
    ids = calibration_tokens(zm.tokenizer, 1, a.prompt)  # [1, prompt]
    data: dict[str, Any] = {
        "command": "python benchmarks/e2e.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "tvm_target": host_target().describe(),
        "prompt": a.prompt,
        "new": a.new,
        "repeat": a.repeat,
        "rows": [],
    }
    if a.floor:
        from benchmarks.kernels import read_bandwidth

        data["read_bandwidth_gbps"] = read_bandwidth()[0]
    rows = a.rows.split(",") + (["llama.cpp"] if a.llama_cpp and "llama.cpp" not in a.rows.split(",") else [])
    if a.tuned is not None:
        rows = [r for row in rows for r in ([row, "tvm-tuned:" + row[4:]] if row.startswith("tvm:") else [row])]
        data["tuning"] = []
        for row in rows:
            if a.tune_trials and row.startswith("tvm-tuned:"):
                rep = qcompile.tune(
                    zm.model, row.split(":", 1)[1], db=a.tuned, trials=a.tune_trials, max_cache_len=a.prompt + a.new
                )
                print(rep.summary(), flush=True)
                data["tuning"].append({"plan": row.split(":", 1)[1], **rep.to_dict()})
    for row in rows:
        rec = run_row(row, zm.model, ids, a)
        print(json.dumps(rec), flush=True)
        data["rows"].append(rec)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))  # the speed rows survive a failure in the perplexity check
    if a.ppl:
        data["ppl"] = ppl_check(a.ppl.split(","), a.ppl_windows)
        data["ppl_windows"] = a.ppl_windows
    print(table(data))
    out.write_text(json.dumps(data, indent=1))
    if not a.no_write:
        write_section(Path(a.results), "e2e", table(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
