"""The llama.cpp peer launcher (benchmarks/llama_cpp_peer.py): its failure paths are clear errors.
The peer itself runs only in the opt-in benchmark venv, never in the test suite."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from benchmarks.llama_cpp_peer import PeerUnavailableError, llama_cpp_row


def _fake_venv(root: Path, script: str) -> Path:
    py = root / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text("#!/bin/sh\n" + script)
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    return root


def test_missing_venv_names_the_setup_script(tmp_path: Path) -> None:
    with pytest.raises(PeerUnavailableError, match="llama_cpp_venv.sh"):
        llama_cpp_row(tmp_path / "x.gguf", [1, 2], 4, 1, 2, venv=tmp_path / "none")


def test_failing_peer_reports_its_exit_and_stderr(tmp_path: Path) -> None:
    venv = _fake_venv(tmp_path / "v", "cat >/dev/null; echo 'illegal instruction' >&2; exit 132\n")
    with pytest.raises(PeerUnavailableError, match=r"exit 132[\s\S]*illegal instruction"):
        llama_cpp_row(tmp_path / "x.gguf", [1, 2], 4, 1, 2, venv=venv)


def test_record_carries_the_build_flags(tmp_path: Path) -> None:
    venv = _fake_venv(tmp_path / "v", 'cat >/dev/null; echo \'{"row": "llama.cpp", "decode_tok_s": 1.5}\'\n')
    (venv / "ggml-flags.txt").write_text("-DGGML_NATIVE=OFF -DGGML_AVX2=ON\n")
    rec = llama_cpp_row(tmp_path / "x.gguf", [1, 2], 4, 1, 2, venv=venv)
    assert rec["decode_tok_s"] == 1.5 and rec["build_flags"] == "-DGGML_NATIVE=OFF -DGGML_AVX2=ON"


def test_decode_needs_two_new_tokens(tmp_path: Path) -> None:
    venv = _fake_venv(tmp_path / "v", "exit 0\n")
    with pytest.raises(ValueError, match="at least 2"):
        llama_cpp_row(tmp_path / "x.gguf", [1], 1, 1, 2, venv=venv)
