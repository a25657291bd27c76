"""The decoder-family matrix (issue 17): every family x preset family x backend, and its RESULTS table.

    .venv/bin/python benchmarks/families.py run [--families a,b] [--plans p,q] [--backends torch,tvm]
    .venv/bin/python benchmarks/families.py table     # RESULTS.md section families:issue-17

``run`` builds each family's tiny random model from transformers' own config class
(:mod:`qcompile.eval.families`), captures it once, compiles every plan on every backend and classifies
the cell (ok / reported with the pass's reason / failed). Cells are appended to
benchmarks/results/families.json as they finish, so an interrupted run resumes where it stopped
(``--redo`` runs cells again).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.accuracy import write_section  # noqa: E402
from qcompile.eval.families import BACKENDS, FAMILIES, PLANS, family_subject, run_family_cell  # noqa: E402
from qcompile.eval.harness import machine  # noqa: E402

OUT = HERE / "results" / "families.json"


def _load() -> dict[str, Any]:
    return json.loads(OUT.read_text()) if OUT.exists() else {"cells": {}, "runs": []}


def _save(data: dict[str, Any]) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(OUT)


def run(families: list[str], plans: list[str], backends: list[str], redo: bool) -> None:
    data = _load()
    data["runs"].append({"date": dt.date.today().isoformat(), "machine": machine(), "argv": sys.argv[1:]})
    for fam in families:
        need = {(b, p) for b in backends for p in plans if redo or f"{fam}|{p}|{b}" not in data["cells"]}
        if not need:
            continue
        refs = {("torch", p) for b, p in need if b != "torch"}  # the other backend's reference, in this process
        todo = sorted(need | refs, key=lambda bp: (bp[0] != "torch", plans.index(bp[1])))
        s = family_subject(fam)
        for b, p in todo:  # torch first: it is the reference of the other backend
            t0 = time.perf_counter()
            c = run_family_cell(s, p, b)
            row = {**c.row(), "seconds": round(time.perf_counter() - t0, 1), "date": dt.date.today().isoformat()}
            data["cells"][f"{fam}|{p}|{b}"] = row
            _save(data)
            print(f"{fam:8s} {p:16s} {b:5s} {c.outcome:8s} {row['seconds']:6.1f}s {c.detail[:160]}", flush=True)


def table() -> str:
    data = _load()
    cells = data["cells"]
    run = data["runs"][-1] if data["runs"] else {"date": "?", "machine": "?"}
    lines = [
        "## Decoder families (issue 17)",
        "",
        f"Command: `python benchmarks/families.py run` then `table`. Date: {run['date']}. Machine: {run['machine']}.",
        "",
        "Tiny random-weight models (hidden 64, 2 layers, seeded) built from transformers 5.24's own config "
        "classes; 20 tokens, prefill 12 (past the 8-token sliding windows) + 8 decode steps. "
        "`ok`: fp32 equals transformers within 1e-4 (TVM: the torch reference backend within 1e-3), quantized "
        "plans run with every pass doing its work and TVM equal to the reference backend of the same plan "
        "position by position within 1e-3 (at most one position in ten may differ by up to 5e-2: an "
        "activation code rounded the other way), and prefill + decode equals forward in the same sense. "
        "`reported (n)`: n layers the pass listed as not handled, with the reason, while the rest of the plan "
        "ran; `reported: ...`: the pass refused the model, naming what it needed. `failed`: anything else. "
        "Relative max error vs transformers' fp32 in parentheses.",
        "",
        "| family | " + " | ".join(f"{p} torch / tvm" for p in PLANS) + " |",
        "|---|" + "---|" * len(PLANS),
    ]

    def show(c: dict[str, Any] | None) -> str:
        if c is None:
            return "not run"
        if c["outcome"] == "ok":
            return f"ok ({c['error']:.3g})" if c.get("error") is not None else "ok"
        if c["outcome"] == "reported":
            n = c["detail"].split(" layers:")[0] if " layers:" in c["detail"] else None
            return f"reported ({n})" if n and n.isdigit() else "reported: " + _short(c["detail"])
        return "**failed**: " + c["detail"][:80]

    for fam in FAMILIES:
        row = [f"{show(cells.get(f'{fam}|{p}|torch'))} / {show(cells.get(f'{fam}|{p}|tvm'))}" for p in PLANS]
        lines.append(f"| {fam} | " + " | ".join(row) + " |")
    lines += ["", "Families:", ""]
    lines += [f"- `{k}`: {v[0]}" for k, v in FAMILIES.items()]
    lines += ["", "Reasons given by the passes (first three layers of each reported cell):", ""]
    for key, c in cells.items():
        if c["outcome"] == "reported":
            lines.append(f"- {key.replace('|', ' / ')}: {c['detail'][:300]}")
    failed = [k for k, c in cells.items() if c["outcome"] == "failed"]
    lines += ["", f"Failed cells: {len(failed)}" + (f" ({', '.join(failed)})" if failed else "") + "."]
    return "\n".join(lines)


def _short(detail: str) -> str:
    for needle in ("found no attention block", "found no group", "found no linear group"):
        if needle in detail:
            return detail[detail.index(needle) : detail.index(needle) + 70] + "…"
    return detail[:90] + "…"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["run", "table"])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--plans", default=",".join(PLANS))
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--redo", action="store_true", help="run cells that the JSON already has again")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    a = ap.parse_args(argv)
    if a.what == "run":
        run(a.families.split(","), a.plans.split(","), a.backends.split(","), a.redo)
    else:
        write_section(Path(a.results), "families:issue-17", table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
