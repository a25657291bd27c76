"""The real Gemma 3 270M (sliding-window + global attention, one KV head, 262k vocabulary tied to
the head): assembled from its chunk packages, sane in transformers, fp32-compiled equal to it."""

import pytest
import torch

import qcompile

pytestmark = pytest.mark.slow

TEXT = (
    "HAMLET. To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
    "The slings and arrows of outrageous fortune"
)


@pytest.fixture(scope="module")
def gemma3():
    from qcompile.eval.zoo import load_gemma3

    return load_gemma3()


def test_gemma3_loads_sane_with_a_tied_head_and_bos(gemma3):
    from qcompile.eval.perplexity import tokenizer_bos

    m, tok = gemma3.model, gemma3.tokenizer
    assert m.config.vocab_size == 262144 and len(tok) == 262144
    assert m.lm_head.weight.data_ptr() == m.get_input_embeddings().weight.data_ptr()
    assert tokenizer_bos(tok).to_dict() == {"used": True, "source": "tokenizer", "token_id": 2}
    assert tok.decode(tok(TEXT, add_special_tokens=False).input_ids) == TEXT
    ids = torch.tensor([tok("The capital of France is").input_ids])
    with torch.no_grad():
        out = m.generate(ids, max_new_tokens=8, do_sample=False)
    assert "France" in tok.decode(out[0, ids.shape[1] :]) or "Paris" in tok.decode(out[0, ids.shape[1] :])
    assert "Q4_K_M" in gemma3.info["caveat"]


def test_gemma3_fp32_compile_matches_transformers(gemma3):
    tok = gemma3.tokenizer
    cm = qcompile.compile(gemma3.model, plan="fp32", max_cache_len=64, tokenizer=tok, backend="torch")
    ids = torch.tensor([tok(TEXT).input_ids])
    assert ids.shape[1] > 20 and ids[0, 0] == 2
    with torch.no_grad():
        ref = gemma3.model(ids).logits
    got = cm(ids)
    assert float((got - ref).abs().max()) <= 1e-3 * float(ref.abs().max())
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
