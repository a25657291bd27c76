"""ONNX export (issue 18): decode speed in onnxruntime against qcompile's TVM build, and perplexity of
the exported models against the torch reference backend.

    .venv/bin/python benchmarks/onnx_export.py --model tiny                  # a quick run on the tiny Llama
    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/onnx_export.py --write     # SmolLM2-135M, table into RESULTS.md

Speed rows (greedy, batch 1, a ``--prompt``-token prompt, ``--new`` new tokens, best of ``--repeat``;
decode tokens/s counts the steps after the first new token, which prefill produces):

* ``onnxruntime fp32``: the fp32 model exported (``prefill`` entry, its KV cache as past/present) and
  run by onnxruntime alone, present fed back as past;
* ``onnxruntime <W4> ort`` / ``qdq``: the ``--speed-plan`` model (default ``w4a16-rtn-g128``) exported
  in each format;
* ``qcompile tvm <W4>``: qcompile's own TVM build of the same plan (``--no-tvm`` leaves it out).

Perplexity (evaluation split, ``--windows`` x ``--seq`` tokens; the tiny model: random token ids, as
it has no tokenizer): every ``--plans`` plan through the torch backend and through onnxruntime on its
``forward`` export in each format, with the relative difference (issue 18 asks for 1e-3).
JSON: benchmarks/results/onnx-<model>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# benchmarks/ holds kernels.py: with its folder first on sys.path it would shadow the package transformers
# probes as "kernels"; import from the repo root
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import qcompile  # noqa: E402
from benchmarks.accuracy import write_section  # noqa: E402
from qcompile.eval.harness import TextSource, best_generation, machine  # noqa: E402
from qcompile.eval.perplexity import perplexity  # noqa: E402
from qcompile.runtime.onnx_export import ort_session  # noqa: E402

PLANS = "w8a8-rtn,w4a16-rtn-g128,w4a16-rtn-g32-asym,w8a8-smooth,w6a8"
FORMATS = ("qdq", "ort")
SECTION = "onnx:issue-18"


def _model(name: str) -> tuple[torch.nn.Module, Any]:
    if name == "tiny":
        from qcompile.eval.zoo import tiny_llama

        return tiny_llama(), None
    from qcompile.eval.zoo import load_model

    zm = load_model(name)
    return zm.model, zm.tokenizer


def _tokens(tokenizer: Any, vocab: int, n: int) -> torch.Tensor:
    if tokenizer is None:
        return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0))
    return TextSource().tokens(tokenizer)


def _prompt(tokenizer: Any, vocab: int, n: int) -> torch.Tensor:
    if tokenizer is None:
        return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(1))
    from qcompile.eval.datasets import calibration_tokens

    return calibration_tokens(tokenizer, 1, n)[:, -n:]


def _calib(tokenizer: Any, vocab: int) -> torch.Tensor:
    if tokenizer is None:
        return torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(2))
    from qcompile.eval.datasets import calibration_tokens

    return calibration_tokens(tokenizer, 4, 512)


def ort_generate(sess: Any, res: Any, prompt: torch.Tensor, new: int) -> tuple[float, float, torch.Tensor]:
    """(prefill seconds, decode tokens/s, tokens) of greedy generation in onnxruntime alone."""
    past = {c.input: np.zeros(c.shape, dtype=np.float32) for c in res.cache}
    tokens = prompt.numpy()
    step, pos = tokens, np.arange(tokens.shape[1], dtype=np.int64)
    t0 = time.perf_counter()
    t1 = t0
    for i in range(new):
        outs = sess.run(None, {"input_ids": step, "cache_position": pos, **past})
        past = {c.input: o for c, o in zip(res.cache, outs[1:])}
        nxt = np.array([[int(np.argmax(outs[0][0, -1]))]], dtype=np.int64)
        tokens = np.concatenate([tokens, nxt], axis=1)
        step, pos = nxt, np.array([tokens.shape[1] - 1], dtype=np.int64)
        if i == 0:
            t1 = time.perf_counter()
    t2 = time.perf_counter()
    return t1 - t0, (new - 1) / max(t2 - t1, 1e-9), torch.from_numpy(tokens)


def speed_rows(model: torch.nn.Module, prompt: torch.Tensor, a: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    cache_len = prompt.shape[1] + a.new
    rows = []
    runs = [("fp32", "qdq"), (a.speed_plan, "ort"), (a.speed_plan, "qdq")]
    reference: dict[str, torch.Tensor] = {}
    for plan, fmt in runs:
        cm = qcompile.compile(
            model, plan=plan, backend="torch", max_cache_len=cache_len, lm_entries=("prefill", "decode")
        )
        if plan not in reference:
            reference[plan] = cm.generate(prompt, a.new, eos_token_id=[])
        t0 = time.perf_counter()
        res = cm.export_onnx(tmp / f"{plan}-{fmt}.onnx", fmt)
        export_s = time.perf_counter() - t0
        sess = ort_session(res.path, threads=a.threads)
        best = max((ort_generate(sess, res, prompt, a.new) for _ in range(a.repeat)), key=lambda r: r[1])
        rows.append(
            {
                "row": f"onnxruntime {plan} {fmt}",
                "prefill_s": best[0],
                "decode_tok_s": best[1],
                "export_s": export_s,
                "onnx_mib": round(sum(p.stat().st_size for p in tmp.glob(f"{plan}-{fmt}.onnx*")) / 2**20, 1),
                "same_tokens_as_qcompile": bool(torch.equal(best[2], reference[plan])),
            }
        )
        print(rows[-1], flush=True)
    if not a.no_tvm:
        t0 = time.perf_counter()
        cm = qcompile.compile(model, plan=a.speed_plan, backend="tvm", max_cache_len=cache_len)
        compile_s = time.perf_counter() - t0
        st, out = best_generation(cm, prompt, a.new, a.repeat)
        rows.append(
            {
                "row": f"qcompile tvm {a.speed_plan}",
                "prefill_s": st.prefill_seconds,
                "decode_tok_s": st.decode_tokens_per_s,
                "export_s": compile_s,
                "onnx_mib": None,
                "same_tokens_as_qcompile": bool(torch.equal(out, reference[a.speed_plan])),
            }
        )
        print(rows[-1], flush=True)
    return rows


def ppl_rows(
    model: torch.nn.Module, tokenizer: Any, vocab: int, a: argparse.Namespace, tmp: Path
) -> list[dict[str, Any]]:
    tokens = _tokens(tokenizer, vocab, a.windows * a.seq)
    calib = _calib(tokenizer, vocab)
    rows = []
    for plan in [p for p in a.plans.split(",") if p]:
        cm = qcompile.compile(
            model, plan=plan, backend="torch", calib=calib, lm_entries=("forward",), max_cache_len=a.seq + 1
        )
        rec: dict[str, Any] = {"plan": plan, "torch": perplexity(cm, tokens, seq=a.seq, windows=a.windows).ppl}
        for fmt in FORMATS:
            res = cm.export_onnx(tmp / f"ppl-{plan}-{fmt}.onnx", fmt)
            sess = ort_session(res.path, threads=a.threads)

            def logits(ids: torch.Tensor) -> torch.Tensor:
                return torch.from_numpy(sess.run(None, {"input_ids": ids.numpy()})[0])

            ppl = perplexity(logits, tokens, seq=a.seq, windows=a.windows).ppl
            rec[fmt] = ppl
            rec[f"{fmt}_rel"] = abs(ppl - rec["torch"]) / rec["torch"]
            for p in tmp.glob(f"ppl-{plan}-{fmt}.onnx*"):
                p.unlink()
        rows.append(rec)
        print(rec, flush=True)
    return rows


def table(data: dict[str, Any]) -> str:
    lines = [
        f"### ONNX export: {data['model']} in onnxruntime (CPU) vs qcompile",
        "",
        f"Command: `{data['command']}`  ",
        f"Date: {data['date']}. Machine: {data['machine']}; onnxruntime {data['onnxruntime']}, "
        f"{data['threads'] or 'default'} threads.  ",
        f"Greedy, batch 1, {data['prompt']}-token prompt, {data['new']} new tokens, best of {data['repeat']}.",
        "",
        "| row | decode tok/s | prefill s | export (or compile) s | ONNX MiB | tokens = qcompile's |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in data["speed"]:
        mib = "" if r["onnx_mib"] is None else f"{r['onnx_mib']:.1f}"
        lines.append(
            f"| {r['row']} | {r['decode_tok_s']:.2f} | {r['prefill_s']:.4f} | {r['export_s']:.1f} | {mib} | "
            f"{'yes' if r['same_tokens_as_qcompile'] else 'no'} |"
        )
    if data["ppl"]:
        lines += [
            "",
            f"Perplexity ({data['ppl_text']}, {data['windows']} x {data['seq']} tokens): torch backend vs onnxruntime "
            "on the `forward` export.",
            "",
            "| plan | torch backend | onnxruntime qdq | rel. diff | onnxruntime ort | rel. diff |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {p['plan']} | {p['torch']:.4f} | {p['qdq']:.4f} | {p['qdq_rel']:.1e} | {p['ort']:.4f} | "
            f"{p['ort_rel']:.1e} |"
            for p in data["ppl"]
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import onnxruntime

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="zoo name, or tiny (the tiny random Llama)")
    ap.add_argument("--plans", default=PLANS, help="plans whose perplexity to compare ('' for none)")
    ap.add_argument("--speed-plan", default="w4a16-rtn-g128", help="the W4 plan of the speed rows")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128; tiny: 8)")
    ap.add_argument("--new", type=int, default=None, help="new tokens (default 128; tiny: 32)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--windows", type=int, default=None, help="perplexity windows (default 4; tiny: 2)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per window (default 512; tiny: 64)")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)")
    ap.add_argument("--no-tvm", action="store_true", help="leave out qcompile's TVM build")
    ap.add_argument("--write", action="store_true", help="write the table into RESULTS.md")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    a = ap.parse_args(argv)
    tiny = a.model == "tiny"
    a.prompt = a.prompt or (8 if tiny else 128)
    a.new = a.new or (32 if tiny else 128)
    a.windows = a.windows or (2 if tiny else 4)
    a.seq = a.seq or (64 if tiny else 512)
    torch.set_num_threads(int(os.environ.get("TVM_NUM_THREADS", "2")))
    model, tokenizer = _model(a.model)
    vocab = int(model.config.vocab_size)
    prompt = _prompt(tokenizer, vocab, a.prompt)
    with tempfile.TemporaryDirectory(prefix="qcompile-onnx-") as d:
        speed = speed_rows(model, prompt, a, Path(d))
        ppl = ppl_rows(model, tokenizer, vocab, a, Path(d))
    data = {
        "command": "python benchmarks/onnx_export.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "onnxruntime": onnxruntime.__version__,
        "threads": a.threads,
        "model": a.model,
        "prompt": a.prompt,
        "new": a.new,
        "repeat": a.repeat,
        "windows": a.windows,
        "seq": a.seq,
        "ppl_text": "random token ids" if tokenizer is None else "Shakespeare evaluation split",
        "speed": speed,
        "ppl": ppl,
    }
    out = HERE / "results" / f"onnx-{a.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1))
    text = table(data)
    print(text)
    if a.write:
        write_section(Path(a.results), SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
