"""PP-OCRv5 imported from ONNX: qcompile against onnxruntime on the original files, per plan and backend.

    .venv/bin/python benchmarks/ocr.py            # every cell, table into benchmarks/RESULTS.md
    .venv/bin/python benchmarks/ocr.py --cells det:fp32:torch,rec:w8a8-rtn:tvm

A cell compiles one model (``det`` or ``rec``) under one plan for one backend; the other model of the
pipeline is onnxruntime's, so every difference in the strings comes from the compiled model (``cls``,
the orientation classifier, is compared on its own: output error and the predicted class). Images:
scikit-image's ``text`` and ``page`` and a rendered page (qcompile.eval.ocr.ocr_images), plus three
rendered lines recognized alone. Errors are max |y − ref| / max |ref| of the model's output (det:
probability map; rec: per-step class probabilities on the reference's crops).

Every model is captured once with the dims its file names dynamic (det: batch, height, width; rec:
batch, width; cls: batch) and runs each image at its own size (det: longer side at most 960, both
sides multiples of 32) on both backends.
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

from accuracy import write_section  # noqa: E402

import qcompile  # noqa: E402
from qcompile.eval import ocr  # noqa: E402
from qcompile.eval.harness import machine  # noqa: E402

CELLS = [
    "cls:fp32:torch",
    "cls:fp32:tvm",
    "det:fp32:torch",
    "det:fp32:tvm",
    "det:winograd-f4:torch",
    "det:winograd-f4:tvm",
    "det:winograd-f6:torch",
    "det:winograd-f6:tvm",
    "rec:fp32:torch",
    "rec:fp32:tvm",
    "rec:w8a8-rtn:torch",
    "rec:w8a8-rtn:tvm",
]


# Winograd on TVM: the pass's new nodes carry static fake shapes, so TVM would build det for the example
# size only; these cells capture det static for one canvas instead (RESULTS.md says so)
CANVAS_CELLS = {"det:winograd-f4:tvm": 512, "det:winograd-f6:tvm": 512}


def run_cell(cell: str) -> dict[str, Any]:
    role, plan, backend = cell.split(":")
    canvas = CANVAS_CELLS.get(cell)
    t0 = time.perf_counter()
    cm = qcompile.compile(ocr.capture_model(role, canvas), plan=plan, backend=backend)
    seconds = time.perf_counter() - t0
    return {
        "cell": cell,
        "compile_seconds": round(seconds, 1),
        "layers_changed": [layer for p in cm.report.passes for layer in p.layers_changed],
        "skipped": [list(s) for p in cm.report.passes for s in p.skipped],
        "dims": {k: [v.min, v.max] for k, v in cm.program.entries["forward"].dims.items()},
        "canvas": canvas,
        **ocr.agreement(role, cm, canvas),
    }


def table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| model | plan | backend | output rel. error vs onnxruntime | vs float64: qcompile | vs float64: onnxruntime "
        "| strings identical | char. error rate vs onnxruntime (page) | layers changed | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        role, plan, backend = r["cell"].split(":")
        im = r["images"]
        keys = ("page", "rendered") if role == "rec" else ("text", "page", "rendered")

        def cells(field: str) -> str:
            return " / ".join("–" if im[k][field] is None else f"{im[k][field]:.1e}" for k in keys)

        err = cells(f"{role}_rel_error")
        mine, theirs = cells(f"{role}_rel_error_vs_float64"), cells(f"reference_{role}_rel_error_vs_float64")
        ident = sum(v["identical"] for v in im.values())
        page = im["page"]
        cer = (
            f"{ocr.char_error_rate(chr(10).join(page['strings']), chr(10).join(page['reference_strings'])) * 100:.1f} %"
            if "strings" in page
            else "–"
        )
        lines = r["rendered_lines"]
        same = "–" if lines is None else sum(a == b for a, b in zip(lines["expected"], lines["recognized"]))
        if r.get("canvas"):
            backend += f" ({r['canvas']}² canvas)"
        out.append(
            f"| {role} | {plan} | {backend} | {err} | {mine} | {theirs} "
            f"| {ident}/{len(im)} images, rendered lines {same}/3 | {cer} | {len(r['layers_changed'])} "
            f"| {r['compile_seconds']} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default=",".join(CELLS))
    ap.add_argument("--json", default=str(HERE / "results" / "ocr.json"))
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    ap.add_argument("--append", action="store_true", help="keep the other cells of the JSON file (same machine)")
    ap.add_argument("--table-only", action="store_true", help="rewrite the table from the JSON file, measure nothing")
    a = ap.parse_args(argv)
    rows = []
    if a.append and Path(a.json).exists():
        old = json.loads(Path(a.json).read_text())
        if old["machine"] != machine():
            raise SystemExit(f"--append: {a.json} was measured on another machine ({old['machine']})")
        rows = [r for r in old["rows"] if r["cell"] not in a.cells.split(",")]
    for cell in [] if a.table_only else a.cells.split(","):
        print(f"== {cell}", flush=True)
        r = run_cell(cell)
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "images"}, ensure_ascii=False)[:600], flush=True)
    if a.table_only:
        rows = json.loads(Path(a.json).read_text())["rows"]
    rows.sort(key=lambda r: CELLS.index(r["cell"]) if r["cell"] in CELLS else len(CELLS))
    body = table(rows)
    print(body)
    if a.no_write:
        return 0
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1, ensure_ascii=False))
    head = (
        "## PP-OCRv5 imported from ONNX (issue 18)\n\n"
        f"`python benchmarks/ocr.py` — {dt.date.today()}, {machine()}. Baseline: onnxruntime "
        f"{__import__('onnxruntime').__version__} (CPU) on the original files, same inputs, same run; float64: the "
        "same imported graph evaluated in float64 by torch. Errors are max |y − ref| / max |ref| of the model's "
        "output, per image: det and cls text / page / rendered, rec page / rendered (its inputs: the crops "
        "onnxruntime's pipeline cut from those images; the text image has none). Every model is captured once with "
        "the dims its file names dynamic and each image runs at its own size, except the two Winograd rows on TVM "
        "(one 512×512 canvas, see the reading). Compile times overlap another benchmark (two processes on 2 cores).\n\n"
    )
    write_section(Path(a.results), "ocr:issue-18", head + body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
