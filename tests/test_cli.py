import subprocess
import sys

import torch

from qcompile.cli import main


def test_compile_run_report(hf_folder, tmp_path, capsys):
    out = tmp_path / "art"
    assert (
        main(["compile", "--model", str(hf_folder), "--plan", "w8a8-rtn", "--max-cache-len", "64", "-o", str(out)]) == 0
    )
    text = capsys.readouterr().out
    assert "compiled with plan 'w8a8-rtn'" in text and "quantize_weights" in text and f"saved artifact to {out}" in text
    assert main(["run", str(out), "--prompt", "w1 w2 w3", "--max-new-tokens", "6"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines[0].split()) == 6  # six generated words
    assert lines[-1].startswith("prefill: 3 tokens") and "decode: 6 tokens" in lines[-1]
    assert main(["report", str(out)]) == 0
    assert "layers changed 14" in capsys.readouterr().out


def test_user_errors_exit_2_with_a_message_not_a_traceback(tmp_path, capsys, hf_folder):
    assert main(["compile", "--model", str(hf_folder), "--plan", "w9a9", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'w9a9'" in err and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes: [unclosed\n")
    assert main(["compile", "--model", str(hf_folder), "--plan", str(bad), "-o", str(tmp_path / "x")]) == 2
    assert "malformed plan YAML" in capsys.readouterr().err
    assert main(["compile", "--model", "no-such-model", "-o", str(tmp_path / "x")]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert main(["run", str(tmp_path), "--prompt", "w1"]) == 2
    assert "not a qcompile artifact" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_console_script_exit_codes_and_debug(tmp_path):
    exe = [sys.executable, "-m", "qcompile.cli"]
    r = subprocess.run([*exe, "run", str(tmp_path), "--prompt", "x"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(
        [*exe, "--debug", "run", str(tmp_path), "--prompt", "x"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode != 0 and "Traceback" in r.stderr and "ArtifactError" in r.stderr


def test_hf_folder_loads_like_transformers(hf_folder):
    from transformers import AutoModelForCausalLM

    from qcompile.eval.zoo import load_model

    zm = load_model(str(hf_folder))
    ref = AutoModelForCausalLM.from_pretrained(hf_folder).eval()
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(zm.model(x).logits, ref(x).logits)


def test_compile_calibrates_on_a_text_file(hf_folder, tmp_path, capsys):
    from qcompile.cli import main

    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{(i * 7) % 255 + 1}" for i in range(300)))
    out = tmp_path / "smooth"
    args = ["compile", "--model", str(hf_folder), "--plan", "w8a8-smooth", "--max-cache-len", "64", "--calib-seq", "64"]
    assert main([*args, "--calib-text", str(text), "-o", str(out)]) == 0
    assert "smooth_migration" in capsys.readouterr().out
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3")
    assert main([*args, "--calib-text", str(short), "-o", str(tmp_path / "y")]) == 2
    assert "has 3 tokens; one calibration window needs 64 (--calib-seq)" in capsys.readouterr().err


def test_lm_head_flag_on_compile_and_eval(hf_folder, tmp_path, capsys):
    from qcompile.cli import _parser

    for cmd in ("compile", "eval"):
        extra = ["-o", "x"] if cmd == "compile" else []
        a = _parser().parse_args([cmd, "--model", "m", "--lm-head", "int8", *extra])
        assert a.lm_head == "int8"
        assert _parser().parse_args([cmd, "--model", "m", *extra]).lm_head is None  # the plan's own setting
    out = tmp_path / "art"
    args = ["compile", "--model", str(hf_folder), "--plan", "w4a16-rtn-g128", "--max-cache-len", "64"]
    assert main([*args, "--lm-head", "int8", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "compiled with plan 'w4a16-rtn-g128+lm_head-int8'" in text
    assert "lm_head 'lm_head' (plan lm_head: int8): quantized: 8-bit symmetric per output channel" in text
    assert main(["report", str(out)]) == 0
    assert "layers changed 15" in capsys.readouterr().out  # the head too
    # a bad value is a PlanError naming the settings, exit 2, before the model loads
    assert main([*args, "--lm-head", "int4", "-o", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "lm_head must be one of ['fp32', 'int8', 'plan'], got 'int4'" in err and "Traceback" not in err
    assert main(["eval", "--model", "no-such-model", "--lm-head", "int4"]) == 2
    assert "lm_head must be one of" in capsys.readouterr().err
    assert main(["eval", "--model", str(hf_folder), "--source", "--lm-head", "int8"]) == 2
    assert "--lm-head applies to compiled models" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_float_compute_flag_on_compile(hf_folder, tmp_path, capsys):
    """``--float-compute bf16`` renames the plan and reaches the build; a bad value is a PlanError (exit 2)
    before the model loads; ``eval --source`` refuses it like ``--lm-head``."""
    args = ["compile", "--model", str(hf_folder), "--plan", "w4a16-rtn-g32-asym", "--max-cache-len", "64"]
    assert main([*args, "--float-compute", "bf16", "-o", str(tmp_path / "art")]) == 0
    assert "compiled with plan 'w4a16-rtn-g32-asym+bf16'" in capsys.readouterr().out
    assert main([*args, "--float-compute", "fp16", "-o", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "float_compute must be one of ['fp32', 'bf16'], got 'fp16'" in err and "Traceback" not in err
    assert not (tmp_path / "y").exists()
    assert main(["eval", "--model", str(hf_folder), "--source", "--float-compute", "bf16"]) == 2
    assert "--float-compute applies to compiled models" in capsys.readouterr().err


def test_tune_writes_a_database_that_compile_then_requires_to_exist(hf_folder, tmp_path, capsys):
    import json

    db, rep = tmp_path / "db", tmp_path / "tune.json"
    args = ["tune", "--model", str(hf_folder), "--plan", "w4a16-rtn-g32-asym", "--max-cache-len", "64"]
    assert main([*args, "--db", str(db), "--trials", "1", "--json", str(rep)]) == 0
    report = json.loads(rep.read_text())
    assert report["trials"] == len(report["kernels"]) > 0  # one candidate (the default) per kernel
    assert "candidates measured" in capsys.readouterr().out
    assert (db / "database_tuning_record.json").read_text().count("\n") == report["trials"]
    # bad input: a usage error or a clear error, exit 2, before any model loads
    assert main([*args, "--db", str(db), "--rpc-tracker", "localhost:notaport", "--rpc-key", "k"]) == 2
    assert "port" in capsys.readouterr().err
    out = tmp_path / "o"
    missing = ["compile", "--model", "no-such-model", "--plan", "w8a8-rtn", "-o", str(out)]
    assert main([*missing, "--tuning-db", str(tmp_path / "nodb")]) == 2
    assert "does not exist" in capsys.readouterr().err
