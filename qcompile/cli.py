"""The ``qcompile`` command line.

    qcompile compile --model smollm2-135m --plan w8a8-rtn --target cpu -o out/
    qcompile compile --model smollm2-135m --plan w4a16-rtn-g128 --lm-head int8 -o out/   (quantized head)
    qcompile run out/ --prompt "To be, or not to be" --max-new-tokens 32
    qcompile report out/ --plot sensitivity.png     (assign_precision's per-layer sensitivity)
    qcompile eval --model smollm2-135m --plan w8a8-rtn --windows 16 --seq 512 --json out/eval.json
    qcompile export out/ --onnx out.onnx --format ort

User errors exit with status 2 and a one-paragraph message; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from qcompile.errors import QCompileError

log = logging.getLogger("qcompile")


def _int_at_least(low: int, meaning: str = ""):  # type: ignore[no-untyped-def]
    """An argparse ``type`` for integers >= ``low``: a bad value is a usage error (exit 2), not a traceback."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}{meaning}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _finite_float(low: float, high: float | None = None):  # type: ignore[no-untyped-def]
    """An argparse ``type`` for finite numbers in (low, high] (``high`` None: no upper bound)."""
    span = f"> {low}" if high is None else f"in ({low}, {high}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value <= low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be a finite number {span}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="zoo name (smollm2-135m, ppocrv5-rec), an .onnx file or a Hugging Face folder"
    )
    p.add_argument("--gguf-file", default=None, help="GGUF file inside the --model folder")


def _add_lm_head_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--lm-head",
        default=None,
        metavar="{fp32,int8,plan}",
        help="the language-model head: fp32 (kept in float), int8 (int8 weights per output channel, weight-only) or "
        "plan (the plan's weight format, weight-only); default: the plan's own lm_head setting",
    )
    p.add_argument(
        "--float-compute",
        default=None,
        metavar="{fp32,bf16}",
        help="weight-only linears' activations: fp32, or bf16 (rounded to bfloat16, multiplied on AVX-512 BF16 where "
        "the CPU has it; reported where not); default: the plan's own float_compute setting",
    )


def _plan_of(a: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The plan named by ``--plan``, with ``--lm-head`` and ``--float-compute`` applied (a PlanError for a
    bad value)."""
    from qcompile.plan import get_plan

    plan = get_plan(a.plan)
    plan = plan if a.lm_head is None else plan.with_lm_head(a.lm_head)
    return plan if a.float_compute is None else plan.with_float_compute(a.float_compute)


def _add_calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calib-windows",
        type=_int_at_least(0),
        default=8,
        help="calibration windows for passes that calibrate (default 8; 0: none)",
    )
    p.add_argument(
        "--calib-seq", type=_int_at_least(1), default=512, help="tokens per calibration window (default 512)"
    )


def _calibration(zm, a: argparse.Namespace):  # type: ignore[no-untyped-def]
    """Calibration token windows for a causal LM (None for other models)."""
    from qcompile.errors import DataError
    from qcompile.eval.datasets import calibration_tokens, read_text_file, tokenize

    if zm.kind != "causal_lm" or zm.tokenizer is None or a.calib_windows <= 0:
        return None
    if a.calib_text is None:
        return calibration_tokens(zm.tokenizer, a.calib_windows, a.calib_seq)
    ids = tokenize(zm.tokenizer, read_text_file(a.calib_text))
    n = ids.numel() // a.calib_seq
    if n < 1:
        raise DataError(
            f"{a.calib_text} has {ids.numel()} tokens; one calibration window needs {a.calib_seq} (--calib-seq)"
        )
    return ids[: min(n, a.calib_windows) * a.calib_seq].view(-1, a.calib_seq)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qcompile", description="compile models into quantized, runnable modules")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = ap.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compile", help="capture, run the plan's passes, build, save an artifact")
    _add_model_args(c)
    c.add_argument("--plan", default="fp32", help="preset name or a .yaml/.json plan file")
    _add_lm_head_arg(c)
    c.add_argument("--target", default="cpu")
    c.add_argument("--backend", default=None, help="tvm (default for cpu) or torch (the reference)")
    c.add_argument(
        "--max-cache-len", type=_int_at_least(2, " (cache positions)"), default=1024, help="cache length (default 1024)"
    )
    c.add_argument("--dump-dir", default=None, help="write the graph after each pass here")
    c.add_argument("-o", "--output", required=True, help="artifact directory to write")
    c.add_argument(
        "--tuning-db",
        default=None,
        help="a directory `qcompile tune` wrote: each kernel gets its best measured schedule",
    )
    _add_calib_args(c)
    c.add_argument(
        "--calib-text",
        default=None,
        help="calibrate on this UTF-8 text file instead of the Shakespeare calibration split",
    )

    t = sub.add_parser("tune", help="measure schedules of the kernels a compile would build, into a tuning database")
    _add_model_args(t)
    t.add_argument("--plan", default="fp32", help="preset name or a .yaml/.json plan file")
    _add_lm_head_arg(t)
    t.add_argument("--target", default="cpu")
    t.add_argument(
        "--max-cache-len", type=_int_at_least(2, " (cache positions)"), default=1024, help="cache length (default 1024)"
    )
    t.add_argument("--db", required=True, help="tuning database directory (created; records are only ever appended)")
    t.add_argument(
        "--trials", type=_int_at_least(1), default=16, help="candidates per kernel, the default included (default 16)"
    )
    t.add_argument("--rpc-tracker", default=None, metavar="HOST:PORT", help="measure on this TVM RPC tracker's servers")
    t.add_argument("--rpc-key", default=None, help="the key the tracker's servers registered with")
    t.add_argument("--json", default=None, help="also write the tuning report here")
    _add_calib_args(t)
    t.add_argument("--calib-text", default=None, help="calibrate on this UTF-8 text file (as for compile)")

    r = sub.add_parser("run", help="generate a continuation with a saved artifact")
    r.add_argument("artifact")
    r.add_argument("--prompt", required=True)
    r.add_argument("--max-new-tokens", type=_int_at_least(0), default=32)
    r.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    r.add_argument("--temperature", type=_finite_float(0.0), default=1.0)
    r.add_argument("--top-k", type=_int_at_least(0, " (0: no limit)"), default=None)
    r.add_argument("--top-p", type=_finite_float(0.0, 1.0), default=None)
    r.add_argument("--seed", type=int, default=None)
    trust = r.add_mutually_exclusive_group()
    trust.add_argument(
        "--trust-library",
        dest="trust_library",
        action="store_const",
        const=True,
        default=None,
        help="load the artifact's compiled library even if another user's key signed it (you trust its author)",
    )
    trust.add_argument(
        "--rebuild-library",
        dest="trust_library",
        action="store_const",
        const=False,
        help="never load the shipped library: rebuild it from the graph and refuse a mismatch",
    )

    e = sub.add_parser("eval", help="perplexity / top-1 of a model under a plan")
    _add_model_args(e)
    e.add_argument("--plan", default="fp32", help="preset name or a .yaml/.json plan file")
    _add_lm_head_arg(e)
    e.add_argument("--source", action="store_true", help="evaluate the unmodified model instead of a compiled one")
    e.add_argument("--target", default="cpu")
    e.add_argument("--backend", default=None, help="tvm (default for cpu) or torch (the reference)")
    src = e.add_mutually_exclusive_group()
    src.add_argument("--text", default=None, help="plain text file to evaluate on")
    src.add_argument("--dataset", default="shakespeare", help="dataset (default: shakespeare)")
    e.add_argument("--split", default="evaluation", choices=["evaluation", "calibration"])
    e.add_argument("--encoding", default="utf-8", help="encoding of --text (default utf-8)")
    e.add_argument("--windows", type=_int_at_least(1), default=16, help="number of windows (default 16)")
    e.add_argument(
        "--seq", type=_int_at_least(2, " (a window predicts tokens 2..seq)"), default=512, help="tokens per window"
    )
    e.add_argument(
        "--bos",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="prefix every window with the BOS token (--bos) or not (--no-bos); default: what the model's "
        "tokenizer does (its add_bos_token rule). The scored tokens are the same either way",
    )
    e.add_argument("--json", default=None, help="write the record to this JSON file")
    _add_calib_args(e)

    rep = sub.add_parser("report", help="print an artifact's compile report")
    rep.add_argument("artifact")
    rep.add_argument("--json", action="store_true", help="print the report as JSON")
    rep.add_argument(
        "--plot",
        default=None,
        metavar="PNG",
        help="write the per-layer sensitivity plot (assign_precision) to this PNG",
    )
    x = sub.add_parser("export", help="export an artifact as an ONNX model")
    x.add_argument("artifact")
    x.add_argument("--onnx", required=True, metavar="OUT.onnx", help="the ONNX file to write")
    x.add_argument(
        "--format",
        default="qdq",
        help="qdq (standard QuantizeLinear/DequantizeLinear, any runtime; default) or ort (onnxruntime contrib "
        "ops: MatMulNBits, MatMulInteger)",
    )
    x.add_argument(
        "--entry", default=None, help="entry to export (default: prefill with the KV cache for LMs, else forward)"
    )
    x.add_argument(
        "--external-data",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write the tensors to OUT.onnx.data beside the model (default: only when they pass 2 GB)",
    )
    return ap


def _holding_output(cmd: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Take the output's lock and check ``-o`` before anything slow: held through the save, so a
    second compile to the same path fails at once; an ``-o`` that is not replaceable fails first."""

    def run(a: argparse.Namespace) -> int:
        from qcompile.fileio import output_lock
        from qcompile.runtime.artifact import check_output_dir, output_path

        out = output_path(a.output)
        with output_lock(out):
            check_output_dir(out)
            return cmd(a)

    return run


@_holding_output
def cmd_compile(a: argparse.Namespace) -> int:
    import qcompile
    from qcompile.eval.zoo import load_model

    plan = _plan_of(a)  # fail fast on a bad plan or --lm-head, before loading a model
    _check_before_loading(a, plan)  # and on its passes' options, --target, --backend, --dump-dir
    t0 = time.perf_counter()
    zm = load_model(a.model, a.gguf_file)
    what = f"ONNX file {zm.onnx}" if zm.onnx is not None else type(zm.model).__name__
    print(f"loaded {zm.name} ({what}) in {time.perf_counter() - t0:.1f}s", flush=True)
    t0 = time.perf_counter()
    cm = qcompile.compile(
        zm.source,
        target=a.target,
        plan=plan,
        backend=a.backend,
        max_cache_len=a.max_cache_len,
        dump_dir=a.dump_dir,
        tokenizer=zm.tokenizer,
        progress=True,
        calib=_calibration(zm, a),
        tuning_db=a.tuning_db,
    )
    print(f"compiled with plan {plan.name!r} for {a.target} in {time.perf_counter() - t0:.1f}s", flush=True)
    print(cm.report.summary())
    out = cm.save(a.output)
    print(f"saved artifact to {out}")
    return 0


def cmd_tune(a: argparse.Namespace) -> int:
    import json

    import qcompile
    from qcompile.eval.zoo import load_model
    from qcompile.tuning.tuner import TuneOptions

    plan = _plan_of(a)
    _check_before_loading(a, plan)
    TuneOptions(trials=a.trials, rpc_tracker=a.rpc_tracker, rpc_key=a.rpc_key).check()
    zm = load_model(a.model, a.gguf_file)
    report = qcompile.tune(
        zm.source,
        plan,
        a.target,
        db=a.db,
        trials=a.trials,
        rpc_tracker=a.rpc_tracker,
        rpc_key=a.rpc_key,
        calib=_calibration(zm, a),
        max_cache_len=a.max_cache_len,
        progress=True,
    )
    print(report.summary())
    if a.json:
        Path(a.json).write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8")
    return 0


def _check_before_loading(a: argparse.Namespace, plan: object) -> None:
    """What can be checked without the model (the plan's passes and options, --target, --backend,
    --dump-dir, --max-cache-len, input files) is checked before the model loads, which takes seconds."""
    from qcompile.api import check_compile_args

    check_compile_args(
        plan,  # type: ignore[arg-type]
        a.target,
        getattr(a, "backend", None),
        getattr(a, "dump_dir", None),
        getattr(a, "max_cache_len", 1024),
    )
    if getattr(a, "tuning_db", None) is not None:
        from qcompile.tuning.db import TuningDB

        TuningDB(a.tuning_db)  # exists and parses
    for flag, path in (("--calib-text", getattr(a, "calib_text", None)), ("--text", getattr(a, "text", None))):
        if path is not None and not Path(path).is_file():
            what = "does not exist" if not Path(path).exists() else "is not a regular file"
            raise QCompileError(f"{flag} {path} {what}; name a text file")


def cmd_run(a: argparse.Namespace) -> int:
    import torch

    import qcompile
    from qcompile.errors import InputError

    t0 = time.perf_counter()
    cm = qcompile.load(a.artifact, trust_library=a.trust_library)
    print(
        f"loaded {a.artifact} (plan {cm.plan.name!r}, backend {cm.backend}) in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )
    if cm.tokenizer is None:
        raise QCompileError(f"{a.artifact} has no tokenizer, so it cannot run text prompts")
    ids = torch.tensor([cm.tokenizer(a.prompt).input_ids], dtype=torch.int64)
    limit = cm.token_limit()
    if limit is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= limit):
        raise InputError(
            f"the prompt tokenizes to ids in [{int(ids.min())}, {int(ids.max())}] but the model in {a.artifact} has "
            f"{limit} token ids (0 to {limit - 1}): its tokenizer ({len(cm.tokenizer)} tokens) does not match the "
            "model; re-create the artifact with the model's own tokenizer"
        )
    out = cm.generate(
        ids, a.max_new_tokens, do_sample=a.sample, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed
    )
    text = cm.tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
    print(text)
    st = cm.last_generation
    if st is not None:
        print(
            f"prefill: {st.prompt_tokens} tokens, {st.prefill_tokens_per_s:.1f} tokens/s; "
            f"decode: {st.new_tokens} tokens, {st.decode_tokens_per_s:.1f} tokens/s"
        )
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from qcompile.eval.harness import TextSource, evaluate
    from qcompile.plan import get_plan

    if a.source and (a.lm_head is not None or a.float_compute is not None):
        flag = "--lm-head" if a.lm_head is not None else "--float-compute"
        raise QCompileError(f"{flag} applies to compiled models; --source evaluates the unmodified model")
    plan = get_plan("fp32") if a.source else _plan_of(a)
    _check_before_loading(a, plan)
    text = TextSource(dataset=None, path=a.text, encoding=a.encoding) if a.text else TextSource(a.dataset, a.split)
    rec = evaluate(
        a.model,
        plan,
        target=a.target,
        text=text,
        windows=a.windows,
        seq=a.seq,
        gguf_file=a.gguf_file,
        source=a.source,
        progress=True,
        calib_windows=a.calib_windows,
        calib_seq=a.calib_seq,
        backend=a.backend,
        bos=a.bos,
    )
    if "ppl" in rec:
        b = rec["bos"]
        how = f"BOS {b['token_id']}" if b["used"] else "no BOS"
        print(
            f"{rec['model']} / {rec['plan_name']}: perplexity {rec['ppl']:.4f} over {rec['windows']} x {rec['seq']} "
            f"tokens ({how}, from the {b['source']})"
        )
    elif "max_rel_error" in rec:
        same = rec.get("all_identical")
        print(
            f"{rec['model']} / {rec['plan_name']} ({rec['backend']}): max relative output error vs {rec['reference']} "
            f"{rec['max_rel_error']:.2e}" + ("" if same is None else f"; recognized strings identical: {same}")
        )
    elif "top1" in rec:
        print(f"{rec['model']} / {rec['plan_name']}: top-1 {rec['top1'] * 100:.2f} % on {rec['images']} images")
    else:
        print(
            f"{rec['model']} / {rec['plan_name']}: top-1 agreement with fp32 {rec['top1_agreement'] * 100:.1f} % on "
            f"{rec['images']} photos"
        )
    if a.json:
        _write_json(Path(a.json), rec)
        print(f"wrote {a.json}")
    return 0


def _write_json(path: Path, data: object) -> None:
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def cmd_report(a: argparse.Namespace) -> int:
    from qcompile.report import CompileReport
    from qcompile.runtime.artifact import read_manifest

    manifest = read_manifest(Path(a.artifact))
    report = CompileReport.from_dict(manifest.get("report") or {})
    if a.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print(
            f"artifact {a.artifact}: qcompile {manifest.get('qcompile_version')}, target {manifest.get('target')}, "
            f"backend {manifest.get('backend')}"
        )
        print(report.summary())
        for p in report.passes:  # the layers assign_precision gave high-bit activations
            high = next((k for k in p.notes if k.startswith("a") and k.endswith("_layers")), None)
            if p.name == "assign_precision" and high is not None:
                print(f"  {p.name}: {high.split('_')[0].upper()} layers")
                for path in p.notes[high]:
                    print(f"    {path}")
    if a.plot:
        from qcompile.eval.plots import plot_sensitivity

        notes = next(
            (p.notes for p in report.passes if p.name == "assign_precision" and "sensitivity" in p.notes), None
        )
        if notes is None:
            raise QCompileError(
                f"{a.artifact} has no sensitivity analysis to plot (its plan does not run assign_precision)"
            )
        plot_sensitivity(notes, a.plot)
        print(f"wrote {a.plot}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    import qcompile
    from qcompile.runtime.onnx_export import check_output_path, parse_format

    fmt = parse_format(a.format)  # a bad format or output path fails before the artifact loads
    check_output_path(a.onnx)
    cm = qcompile.load(a.artifact, backend="torch")
    t0 = time.perf_counter()
    res = cm.export_onnx(a.onnx, fmt.value, entry=a.entry, external_data=a.external_data)
    print(f"wrote {res.path} (entry {res.entry}, format {res.format.value}) in {time.perf_counter() - t0:.1f}s")
    if res.data_path is not None:
        print(f"tensors in {res.data_path}")
    print(f"inputs: {', '.join(res.inputs)}")
    print(f"outputs: {', '.join(res.outputs)}")
    for note in res.notes:
        print(f"note: {note}")
    return 0


# OSErrors that a user's files and disks cause (a missing, unreadable or misplaced file, a full or
# read-only disk): exit 2 with the message. Any other exception is a bug and keeps its traceback.
_USER_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.EACCES,
        errno.EPERM,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.EEXIST,
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.ENAMETOOLONG,
        errno.ELOOP,
    }
)

COMMANDS = {
    "compile": cmd_compile,
    "tune": cmd_tune,
    "run": cmd_run,
    "eval": cmd_eval,
    "report": cmd_report,
    "export": cmd_export,
}


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return COMMANDS[a.cmd](a)
    except QCompileError as e:
        if a.debug:
            raise
        print(f"qcompile {a.cmd}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if a.debug or e.errno not in _USER_ERRNOS:
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"qcompile {a.cmd}: error:{where}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
