"""The quantized lm_head option (issue 17): perplexity and TVM decode speed per head setting.

    .venv/bin/python benchmarks/lm_head.py run --models smollm2-135m,gemma3-270m   # appends records
    .venv/bin/python benchmarks/lm_head.py table                                    # RESULTS.md lm-head:issue-17

For each model (a zoo name; one this tree's zoo lacks is skipped with a message, so ``gemma3-270m``
can be named before its loader lands), each plan (default fp32, w8a8-rtn, w4a16-rtn-g128) and each
head setting (``Plan.lm_head``: fp32, int8, plan):

* perplexity: ``qcompile.eval.harness.evaluate`` on the evaluation split, 16 windows x 512 tokens,
  torch reference backend (the TVM backend computes the same integer parts; tests/codegen check that);
* weight bytes as stored and the head's own code bytes (the compile report's ``lm_head`` notes);
* decode tokens/s: greedy generation after a 64-token prompt, 32 new tokens, TVM backend, best of 2
  (``run --speed-only`` measures it again for the records present, keeping their perplexity).

A head setting that resolves to the same head as another setting of the same plan (fp32 plan: ``plan``
is fp32; w8a8-rtn: ``plan`` is W8 per-channel, i.e. ``int8``) is not run twice: its row says which
one it equals. JSON: benchmarks/results/lm-head.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.accuracy import write_section  # noqa: E402
from qcompile.eval.harness import TextSource, best_generation, evaluate  # noqa: E402
from qcompile.plan import LM_HEAD_GLOB, LmHead, get_plan  # noqa: E402

OUT = HERE / "results" / "lm-head.json"
SECTION = "lm-head:issue-17"
DEFAULT_MODELS = "smollm2-135m,gemma3-270m"
DEFAULT_PLANS = "fp32,w8a8-rtn,w4a16-rtn-g128"
HEADS = tuple(h.value for h in LmHead)
HEAD_PATH = "lm_head"  # a module path LM_HEAD_GLOB selects, to resolve what a setting gives the head


def _load() -> dict[str, Any]:
    return json.loads(OUT.read_text()) if OUT.exists() else {"records": {}, "skipped_models": {}, "commands": []}


def _save(data: dict[str, Any]) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(data, indent=1))


def _names(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def same_as(plan_name: str, head: str) -> str | None:
    """The earlier head setting (in HEADS order) that gives this plan's head the same quantization, if any."""
    plan = get_plan(plan_name)
    mine = plan.with_lm_head(head).resolve(HEAD_PATH)
    for other in HEADS[: HEADS.index(head)]:
        theirs = plan.with_lm_head(other).resolve(HEAD_PATH)
        if (mine.skip or mine.weight is None) and (theirs.skip or theirs.weight is None):
            return other
        if not mine.skip and not theirs.skip and (mine.weight, mine.activation) == (theirs.weight, theirs.activation):
            return other
    return None


def _head_note(report: dict[str, Any]) -> dict[str, Any]:
    for p in report.get("passes", []):
        heads = (p.get("notes") or {}).get("lm_head")
        if heads:
            return next(iter(heads.values()))
    return {}


def _speed(zm: Any, plan: Any, a: argparse.Namespace) -> dict[str, Any]:
    import qcompile
    from qcompile.eval.datasets import calibration_tokens

    prompt = calibration_tokens(zm.tokenizer, 1, a.prompt)[:, : a.prompt]
    cm = qcompile.compile(
        zm.model, plan=plan, max_cache_len=a.max_cache_len, lm_entries=("prefill", "decode"), backend="tvm"
    )
    best, _ = best_generation(cm, prompt, a.new, a.repeat)
    return {
        "decode_tokens_per_s": round(best.decode_tokens_per_s, 2),
        "backend": cm.backend,
        "fallbacks": list(cm.report.backend.get("fallbacks", [])),
    }


def cmd_run(a: argparse.Namespace) -> None:
    from qcompile.errors import QCompileError
    from qcompile.eval.zoo import load_model

    command = f"python benchmarks/lm_head.py run --models {a.models} --plans {a.plans} --heads {a.heads}"
    for model in _names(a.models):
        try:
            zm = load_model(model)
        except QCompileError as e:  # a zoo model this tree does not have (yet), or its package is missing
            print(f"{model}: skipped, cannot load it here: {e}", flush=True)
            data = _load()
            data["skipped_models"][model] = str(e)
            _save(data)
            continue
        for plan_name in _names(a.plans):
            for head in _names(a.heads):
                key = f"{model}/{plan_name}/{head}"
                if head != "fp32" and "quantize_weights" not in {pc.name for pc in get_plan(plan_name).passes}:
                    print(f"{key}: not run, {plan_name} has no quantize_weights pass (a PlanError)", flush=True)
                    continue
                if a.speed_only:  # decode speed again (e.g. on an idle machine), perplexity kept
                    data = _load()
                    if "ppl" in data["records"].get(key, {}):
                        speed = _speed(zm, get_plan(plan_name).with_lm_head(head), a)
                        data = _load()
                        data["records"][key]["speed"] = speed
                        data["commands"] = sorted(set(data["commands"]) | {f"{command} --speed-only"})
                        _save(data)
                        print(f"{key}: decode {speed['decode_tokens_per_s']} tok/s", flush=True)
                    continue
                if key in _load()["records"] and not a.force:
                    print(f"{key}: have it, skipping (--force to redo)", flush=True)
                    continue
                twin = same_as(plan_name, head)
                if twin is not None:
                    rec: dict[str, Any] = {"same_as": twin}
                else:
                    plan = get_plan(plan_name).with_lm_head(head)
                    rec = evaluate(zm, plan, text=TextSource(), windows=a.windows, seq=a.seq, backend="torch")
                    report = rec.pop("report", {}) or {}
                    rec["lm_head"] = _head_note(report)
                    rec["speed"] = _speed(zm, plan, a)
                rec["date"] = dt.datetime.now(dt.UTC).isoformat(timespec="minutes")
                data = _load()
                data["records"][key] = rec
                data["commands"] = sorted(set(data["commands"]) | {command})
                data["speed_setup"] = {"prompt": a.prompt, "new_tokens": a.new, "max_cache_len": a.max_cache_len}
                data["speed_setup"]["repeat"] = a.repeat
                _save(data)
                if twin is not None:
                    print(f"{key}: same head as {twin}", flush=True)
                else:
                    print(
                        f"{key}: ppl {rec['ppl']:.4f}, weights {rec['weight_bytes_packed']} B, decode "
                        f"{rec['speed']['decode_tokens_per_s']} tok/s, {rec['wall_seconds']:.0f} s",
                        flush=True,
                    )


def table() -> list[str]:
    data = _load()
    recs = data["records"]
    if not recs:
        return ["(no records: run `benchmarks/lm_head.py run` first)"]
    real = [r for r in recs.values() if "ppl" in r]
    sp = data.get("speed_setup", {})
    lines = [
        "### Quantized lm_head (issue 17): perplexity and TVM decode speed per head setting",
        "",
        f"- commands: {'; '.join(f'`{c}`' for c in data['commands'])}; `python benchmarks/lm_head.py table`",
        f"- date: {min(r['date'] for r in real)[:10]}; machine: {real[0]['machine']}",
        "- perplexity: evaluation split, windows x tokens as in the table's column (16 x 512 unless a model's "
        "evaluation is too slow on 2 cores: Gemma 3's 262k-vocabulary head), BOS per the tokenizer's rule, torch "
        "reference backend (SmolLM2's weights are "
        "the Q4_1 GGUF dequantized to fp32: 'fp32' is that model). Decode: tokens/s after a "
        f"{sp.get('prompt', '?')}-token prompt, {sp.get('new_tokens', '?')} new tokens, best of "
        f"{sp.get('repeat', '?')}, TVM backend (llvm, this CPU). Baseline of each Δ and ratio: the same plan with "
        "the fp32 head. Weight MB: the compiled state as stored (fp32 embedding table included; a tied head's "
        "codes are stored beside it). Head: how the head is stored; head MB: its codes and scales.",
        f"- head selection: module paths matching {LM_HEAD_GLOB!r}; every setting is weight-only (float activations).",
    ]
    for model, why in data.get("skipped_models", {}).items():
        if not any(k.startswith(f"{model}/") for k in recs):
            lines.append(f"- {model}: not measured, this tree cannot load it ({why.splitlines()[0][:160]})")
    lines += [
        "",
        "| model | plan | lm_head | head | windows | perplexity | Δ vs fp32 head | weight MB | head MB | "
        "decode tok/s | × fp32 head |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in recs.items():
        model, plan, head = key.split("/")
        if "same_as" in r:
            lines.append(f"| {model} | {plan} | {head} | same head as `{r['same_as']}` | | | | | | | |")
            continue
        base = recs.get(f"{model}/{plan}/fp32", {})
        note = r.get("lm_head") or {}
        stored = "fp32" if not note.get("quantized") else note["result"].removeprefix("quantized: ").split(",")[0]
        if note.get("tied_to"):
            stored += " (tied)"
        dppl = f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f} %" if "ppl" in base else "—"
        tps = r["speed"]["decode_tokens_per_s"]
        btps = (base.get("speed") or {}).get("decode_tokens_per_s")
        ratio = f"{tps / btps:.2f}" if btps else "—"
        head_mb = f"{note['code_bytes'] / 1e6:.1f}" if note.get("code_bytes") else "—"
        lines.append(
            f"| {model} | {plan} | {head} | {stored} | {r['windows']}x{r['seq']} | {r['ppl']:.4f} | {dppl} | "
            f"{r['weight_bytes_packed'] / 1e6:.1f} | {head_mb} | {tps} | {ratio} |"
        )
    return lines


def cmd_table(a: argparse.Namespace) -> None:
    lines = table()
    write_section(Path(a.results), SECTION, "\n".join(lines))
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--models", default=DEFAULT_MODELS, help="zoo names; ones this tree lacks are skipped")
    r.add_argument("--plans", default=DEFAULT_PLANS)
    r.add_argument("--heads", default=",".join(HEADS))
    r.add_argument("--windows", type=int, default=16)
    r.add_argument("--seq", type=int, default=512)
    r.add_argument("--prompt", type=int, default=64)
    r.add_argument("--new", type=int, default=32)
    r.add_argument("--max-cache-len", type=int, default=256)
    r.add_argument("--repeat", type=int, default=2)
    r.add_argument("--force", action="store_true")
    r.add_argument("--speed-only", action="store_true", help="re-measure decode speed of existing records only")
    t = sub.add_parser("table")
    t.add_argument("--results", default=str(HERE / "RESULTS.md"))
    a = ap.parse_args(argv)
    {"run": cmd_run, "table": cmd_table}[a.cmd](a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
