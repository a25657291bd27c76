"""The llama.cpp peer row of benchmarks/e2e.py (``--llama-cpp``, issue 21): the same GGUF, threads,
prompt and number of new tokens as the qcompile rows, run through ``llama-cpp-python`` in its own
virtualenv (``bash benchmarks/llama_cpp_venv.sh`` creates ``.venv-llamacpp``; see README).

This file has two halves. :func:`llama_cpp_row` runs in qcompile's environment: it starts the peer
venv's Python on this same file with a JSON request on stdin and reads one JSON record back, so
qcompile's venv never imports llama_cpp and the peer venv never imports torch. :func:`main` runs in
the peer venv and does the timing.

Timing, the way e2e.py times the eager row: prefill = evaluating the prompt (the KV cache cleared
first) and producing the first new token; decode tokens/s = the remaining ``new - 1`` greedy steps,
one token each, divided by their wall time; best of ``repeat`` runs by decode rate. Greedy is
llama.cpp's own argmax over the last logits (temperature 0). The request's token ids come from
qcompile's tokenizer of the same GGUF, so both engines decode the same prompt.

Measure on an idle machine: llama.cpp's OpenMP threads spin while they wait, so with other processes
on the cores its 2-thread decode collapsed (0.9 tokens/s against 16 with 1 thread, load 7 on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VENV = HERE.parent / ".venv-llamacpp"


class PeerUnavailableError(RuntimeError):
    """The peer virtualenv is missing or its run failed (the message says how to fix it)."""


def llama_cpp_row(
    gguf: Path, ids: list[int], new: int, repeat: int, threads: int, venv: Path = VENV, timeout: float = 1800
) -> dict[str, Any]:
    """The ``llama.cpp`` row: {row, prefill_s, decode_tok_s, compile_s: None, version, build_flags, ...}."""
    python = venv / "bin" / "python"
    if not python.is_file():
        raise PeerUnavailableError(
            f"{python} not found: create the llama.cpp peer venv with `bash benchmarks/llama_cpp_venv.sh` (README)"
        )
    if new < 2:
        raise ValueError(f"need at least 2 new tokens to time decode, got {new}")
    request = {"gguf": str(gguf), "ids": [int(t) for t in ids], "new": new, "repeat": repeat, "threads": threads}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run(
        [str(python), str(Path(__file__).resolve())],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if proc.returncode != 0:
        raise PeerUnavailableError(f"llama.cpp peer failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    flags = venv / "ggml-flags.txt"
    rec["build_flags"] = flags.read_text().strip() if flags.is_file() else "unknown"
    return rec


def _run_once(llm: Any, ids: list[int], new: int) -> tuple[float, float, list[int]]:
    import llama_cpp
    import numpy as np

    def argmax_last() -> int:  # the logits of the batch's last token (the only one llama.cpp computed)
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),))))

    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    tok = argmax_last()
    t1 = time.perf_counter()
    out = [tok]
    for _ in range(new - 1):
        llm.eval([tok])
        tok = argmax_last()
        out.append(tok)
    t2 = time.perf_counter()
    return t1 - t0, (new - 1) / max(t2 - t1, 1e-9), out


def main() -> int:
    import llama_cpp

    req = json.loads(sys.stdin.read())
    ids, new, threads = req["ids"], int(req["new"]), int(req["threads"])
    llm = llama_cpp.Llama(
        model_path=req["gguf"],
        n_ctx=len(ids) + new,
        n_batch=max(len(ids), 1),
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=False,  # logits of the last token only, as the qcompile and eager rows compute
        verbose=False,
    )
    runs = [_run_once(llm, ids, new) for _ in range(max(1, int(req["repeat"])))]
    prefill, decode, tokens = max(runs, key=lambda r: r[1])
    rec = {
        "row": "llama.cpp",
        "prefill_s": prefill,
        "decode_tok_s": decode,
        "compile_s": None,
        "version": llama_cpp.__version__,
        "threads": threads,
        "first_tokens": tokens[:16],
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace"),
    }
    print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
