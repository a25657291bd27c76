"""Shared fixtures: a tiny random Llama (fast), the real SmolLM2-135M (slow, session-scoped)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def make_tiny_llama(vocab: int = 256, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=None,
        bos_token_id=1,
    )
    return LlamaForCausalLM(cfg).eval()


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
