"""Shared fixtures: a tiny random Llama (fast), the real SmolLM2-135M (slow, session-scoped)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from qcompile.eval.zoo import tiny_llama as make_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# artifacts are signed with a per-user key (qcompile/runtime/signing.py): tests, and the processes
# they start, use a throwaway one instead of creating one in the real ~/.config
os.environ.setdefault(
    "QCOMPILE_SIGNING_KEY_FILE", os.path.join(tempfile.mkdtemp(prefix="qcompile-test-"), "signing.key")
)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# The wall-clock bounds of the hostile tests catch work that explodes (an alias bomb, a huge GGUF header:
# minutes, not seconds). They are set for a machine running one test; under pytest-xdist (make test) the
# other worker shares the cores, so they stretch by this factor.
TIME_SLACK = 4.0 if os.environ.get("PYTEST_XDIST_WORKER") else 1.0


@pytest.fixture(autouse=True)
def _reference_backend_unless_marked_tvm(request, monkeypatch):
    """Tests of passes and numerics check against the reference, so they compile for the torch
    backend; tests marked ``tvm`` (tests/codegen/) use the product default for cpu, tvm."""
    if request.node.get_closest_marker("tvm") is None:
        from qcompile.codegen import DEFAULT_BACKEND

        monkeypatch.setitem(DEFAULT_BACKEND, "cpu", "torch")


@pytest.fixture(scope="session")
def tiny_llama() -> torch.nn.Module:
    return make_tiny_llama()


@pytest.fixture(scope="session")
def tiny_llama_program(tiny_llama):
    from qcompile import capture

    return capture(tiny_llama, max_cache_len=64)


@pytest.fixture(scope="session")
def smollm2():
    from qcompile.eval.zoo import load_smollm2

    return load_smollm2()


def make_hf_folder(d):
    """A real Hugging Face model folder: a tiny Llama plus a word-level tokenizer ("w1 w2 ...")."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    model = make_tiny_llama(vocab=256)
    model.generation_config.eos_token_id = None
    model.save_pretrained(d)
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 256)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    return make_hf_folder(tmp_path_factory.mktemp("hf") / "tiny-llama")
