"""Hostile runtime inputs: token ids, cache positions and generation parameters (issue 16, item 3).

Every case must end in the model's output or an InputError (DataError for evaluation text) that
names the input, the allowed range and the offending value; never a crash, another exception or
a write outside the cache. Both backends: torch (the reference) and tvm (where an unchecked index
reads or writes foreign memory).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import qcompile
from qcompile import InputError
from qcompile.errors import DataError
from qcompile.eval.zoo import ZooModel
from qcompile.eval.zoo import tiny_llama as make_tiny_llama

VOCAB, CACHE = 256, 64
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
BACKENDS = ["torch", "tvm"]
BAD_IDS = [VOCAB, -1, I64_MAX, I64_MIN, 10**12]
BAD_POSITIONS = [CACHE, -1, I64_MAX, I64_MIN, 1000]


@pytest.fixture(scope="module")
def cms(tiny_llama):
    """The tiny Llama under w8a8-rtn on both backends, built once for this file."""
    return {b: qcompile.compile(tiny_llama, plan="w8a8-rtn", max_cache_len=CACHE, backend=b) for b in BACKENDS}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# w8a8 quantizes activations per token at run time: when TVM's fp32 norm sums in another order than
# torch's, a value on a rounding edge takes the neighbouring int8 code, which moves the tiny model's
# logits by up to ~1 % (seen: 0.63 % for ids [2]). The kernels' exactness is tested elsewhere
# (tests/codegen); here the property is "in range runs like the reference, out of range is refused".
SAME = 2e-2


def _snapshot(cm) -> dict[str, torch.Tensor]:
    return {k: t.clone() for k, t in cm._cache.items()}


def _unchanged(cm, snap) -> bool:
    return all(torch.equal(cm._cache[k], t) for k, t in snap.items())


def _primed(cm) -> dict[str, torch.Tensor]:
    """Fill the cache with a 4-token prefill (so "unchanged" means something) and snapshot it."""
    cm.reset_cache()
    cm.run_entry("prefill", torch.tensor([[3, 14, 15, 92]]), torch.arange(4))
    return _snapshot(cm)


# ---- the bounds come from the graph -------------------------------------------------------------
def test_bounds_are_derived_for_every_entry(cms):
    for cm in cms.values():
        b = cm.index_bounds
        assert {
            e: [(x.input, x.element, x.lo, x.hi, x.extent is not None) for x in eb.bounds] for e, eb in b.items()
        } == {
            "forward": [("input_ids", (), 0, VOCAB, False)],
            "prefill": [("input_ids", (), 0, VOCAB, False), ("cache_position", ((0, 0),), 0, CACHE, True)],
            "decode": [("input_ids", (), 0, VOCAB, False), ("cache_position", ((0, 0),), 0, CACHE, False)],
        }
        assert not any(eb.unbounded for eb in b.values()) and cm.token_limit() == VOCAB


@pytest.mark.parametrize("preset", ["xcache-4bit", "xcache-cl-2bit", "w4a16-rtn-g32-asym"])
def test_bounds_cover_rewritten_caches_and_survive_save_load(tiny_llama, preset, tmp_path):
    cm = qcompile.compile(tiny_llama, plan=preset, max_cache_len=CACHE, backend="torch")
    decode = cm.index_bounds["decode"].bounds
    assert [(b.input, b.hi) for b in decode] == [("input_ids", VOCAB), ("cache_position", CACHE)]
    cm.save(tmp_path / "a")
    loaded = qcompile.load(tmp_path / "a")  # graphs without fake values: the same bounds
    assert loaded.index_bounds == cm.index_bounds
    with pytest.raises(InputError, match=r"cache positions must be in \[0, 63\]"):
        loaded.run_entry("decode", torch.tensor([[1]]), torch.tensor([CACHE]))


# ---- token ids ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", BAD_IDS)
def test_out_of_range_token_ids_are_refused_on_every_entry(cms, backend, bad):
    cm = cms[backend]
    snap = _primed(cm)
    ids = torch.tensor([[5, bad, 7]])
    msg = rf"token ids must be in \[0, 255\], because embedding indexes state .*; got {bad} at \[0, 1\]"
    with pytest.raises(InputError, match=r"forward input 'input_ids': " + msg):
        cm(ids)
    with pytest.raises(InputError, match=r"prefill input 'input_ids': " + msg):
        cm.run_entry("prefill", ids, torch.arange(4, 7))
    with pytest.raises(InputError, match=rf"decode input 'input_ids': token ids must be in \[0, 255\].*got {bad}"):
        cm.run_entry("decode", torch.tensor([[bad]]), torch.tensor([4]))
    with pytest.raises(InputError, match="token ids must be in"):
        cm.generate(ids, 4)
    assert _unchanged(cm, snap)


# ---- cache positions ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", BAD_POSITIONS)
def test_out_of_range_positions_are_refused_and_leave_the_cache_alone(cms, backend, bad):
    cm = cms[backend]
    snap = _primed(cm)
    with pytest.raises(InputError, match=r"decode input 'cache_position\[0\]': cache positions must be in \[0, 63\]"):
        cm.run_entry("decode", torch.tensor([[1]]), torch.tensor([bad]))
    with pytest.raises(InputError, match=rf"prefill input 'cache_position\[0\]'.*got {bad}"):
        cm.run_entry("prefill", torch.tensor([[1, 2]]), torch.tensor([bad, 0]))
    assert _unchanged(cm, snap)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_positions_count_the_tokens_written(cms, backend):
    cm = cms[backend]
    snap = _primed(cm)
    with pytest.raises(InputError, match=r"must be in \[0, 61\] with cache_position.shape\[0\] = 3.*got 62"):
        cm.run_entry("prefill", torch.tensor([[1, 2, 3]]), torch.tensor([62, 63, 64]))
    assert _unchanged(cm, snap)
    cm.run_entry("prefill", torch.tensor([[1, 2, 3]]), torch.tensor([61, 62, 63]))  # the last rows: allowed
    cm.run_entry("decode", torch.tensor([[1]]), torch.tensor([CACHE - 1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_dtypes_and_layouts_are_refused(cms, backend):
    cm = cms[backend]
    snap = _primed(cm)
    for ids, pos in [
        (torch.tensor([[1]], dtype=torch.int32), torch.tensor([4])),
        (torch.tensor([[1.0]]), torch.tensor([4])),
        (torch.tensor([[True]]), torch.tensor([4])),
        (torch.tensor([[1]]), torch.tensor([4], dtype=torch.int32)),
        (torch.tensor([[1]]), torch.tensor([4.0])),
        (torch.tensor([[1]], device="meta"), torch.tensor([4])),
        (torch.tensor([[1]]).to_sparse(), torch.tensor([4])),
    ]:
        with pytest.raises(InputError, match="decode input"):
            cm.run_entry("decode", ids, pos)
    assert _unchanged(cm, snap)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_ids_are_checked_and_run_like_contiguous_ones(cms, backend):
    cm = cms[backend]
    wide = torch.tensor([[5, 999, 6, -7, 7, 300]])
    assert torch.equal(cm(wide[:, ::2]), cm(torch.tensor([[5, 6, 7]])))
    with pytest.raises(InputError, match=r"got 999 at \[0, 0\], -7 at \[0, 1\], 300 at \[0, 2\]"):
        cm(wide[:, 1::2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_does_not_trust_the_manifest_cache_length(cms, backend):
    """A tampered max_cache_len in the metadata must not let decode write past the real cache."""
    cm = cms[backend]
    snap = _primed(cm)
    cm.program.meta["max_cache_len"] = 10_000
    try:
        assert cm.cache_limit() == CACHE  # from the graph and the cache tensors
        with pytest.raises(InputError, match="more than the compiled cache length 64"):
            cm.generate(torch.tensor([[1, 2]]), 100)
    finally:
        cm.program.meta["max_cache_len"] = CACHE
    assert _unchanged(cm, snap)  # refused before the cache was reset


# ---- generation parameters ---------------------------------------------------------------------
GEN_CASES = [
    (dict(do_sample=True, temperature=float("nan")), "temperature must be a finite number"),
    (dict(do_sample=True, temperature=float("inf")), "temperature must be a finite number"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(do_sample=True, temperature=0.0), "temperature must be > 0 when sampling"),
    (dict(do_sample=True, temperature=-1.0), "temperature must be > 0 when sampling"),
    (dict(do_sample=True, top_p=float("nan")), r"top_p must be a number in \(0, 1\]"),
    (dict(do_sample=True, top_p=0.0), r"top_p must be a number in \(0, 1\]"),
    (dict(do_sample=True, top_p=1.5), r"top_p must be a number in \(0, 1\]"),
    (dict(do_sample=True, top_k=-1), "top_k must be an integer >= 0"),
    (dict(do_sample=True, top_k=2.5), "top_k must be an integer >= 0"),
    (dict(seed="7"), "seed must be an integer"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("kwargs", "message"), GEN_CASES)
def test_bad_sampling_parameters_are_refused(cms, backend, kwargs, message):
    with pytest.raises(InputError, match=message):
        cms[backend].generate(torch.tensor([[1, 2]]), 4, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_lengths_and_the_empty_prompt_get_their_own_messages(cms, backend):
    cm = cms[backend]
    with pytest.raises(InputError, match="the prompt is empty: give at least one token"):
        cm.generate(torch.zeros(1, 0, dtype=torch.int64), 4)
    for n in (-1, 2.5, True):
        with pytest.raises(InputError, match="max_new_tokens must be an integer >= 0"):
            cm.generate(torch.tensor([[1, 2]]), n)
    with pytest.raises(InputError, match="more than the compiled cache length 64; .* larger max_cache_len"):
        cm.generate(torch.tensor([[1, 2]]), CACHE - 1)
    assert cm.generate(torch.tensor([[1, 2]]), CACHE - 2, eos_token_id=[]).shape == (1, CACHE)  # fills it exactly
    sampled = cm.generate(torch.tensor([[1, 2]]), 4, do_sample=True, temperature=0.7, top_k=0, top_p=1.0, seed=3)
    assert sampled.shape[1] <= 6


# ---- property: in-range ids run like the reference, anything else is an InputError ---------------
ANY_ID = st.one_of(st.integers(0, VOCAB - 1), st.integers(I64_MIN, I64_MAX), st.sampled_from([-1, VOCAB, I64_MAX]))


@settings(max_examples=50, deadline=None)
@given(ids=st.one_of(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12), st.lists(ANY_ID, min_size=1)))
def test_forward_property_any_int64_ids(cms, ids):
    ids = ids[:12]
    x = torch.tensor([ids], dtype=torch.int64)
    valid = all(0 <= v < VOCAB for v in ids)
    event("in range" if valid else "refused")
    ref = cms["torch"](x) if valid else None
    for cm in cms.values():
        if valid:
            assert _rel(cm(x), ref) < SAME
        else:
            with pytest.raises(InputError, match="token ids must be in"):
                cm(x)


ANY_POS = st.one_of(st.integers(0, CACHE - 1), st.integers(I64_MIN, I64_MAX), st.sampled_from([-1, CACHE, I64_MIN]))


@settings(max_examples=50, deadline=None)
@given(pair=st.one_of(st.tuples(st.integers(0, VOCAB - 1), st.integers(0, CACHE - 1)), st.tuples(ANY_ID, ANY_POS)))
def test_decode_property_any_int64_id_and_position(cms, pair):
    tok, pos = pair
    valid = 0 <= tok < VOCAB and 0 <= pos < CACHE
    event("in range" if valid else "refused")
    outs = []
    for cm in cms.values():
        snap = _primed(cm)
        if valid:
            outs.append(cm.run_entry("decode", torch.tensor([[tok]]), torch.tensor([pos])))
        else:
            with pytest.raises(InputError):
                cm.run_entry("decode", torch.tensor([[tok]]), torch.tensor([pos]))
            assert _unchanged(cm, snap)
    if valid:
        assert _rel(outs[1], outs[0]) < SAME


# ---- graphs other than the LM's: what the matcher bounds and what it reports ----------------------
class _Table(torch.nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.table = torch.nn.Parameter(torch.randn(10, 4))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.how == "index":
            return self.table[idx]
        if self.how == "shifted":
            return torch.index_select(self.table, 0, idx + 3)
        return torch.nn.functional.embedding(idx * 2, self.table)  # "doubled": not followed


def _module(how: str):
    return qcompile.compile(_Table(how), plan="fp32", example_inputs=(torch.tensor([1, 2]),), backend="torch")


def test_index_and_shifted_index_select_are_bounded():
    cm = _module("index")
    assert cm(torch.tensor([9, 0])).shape == (2, 4)
    with pytest.raises(InputError, match=r"input 'idx': its values must be in \[0, 9\].*got 10 at \[0\]"):
        cm(torch.tensor([10, 0]))
    cm = _module("shifted")
    assert cm(torch.tensor([-3, 6])).shape == (2, 4)
    for bad in (-4, 7):
        with pytest.raises(InputError, match=r"must be in \[-3, 6\], because index_select .* after adding 3"):
            cm(torch.tensor([0, bad]))


def test_an_index_the_matcher_cannot_bound_is_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="qcompile.runtime.compiled"):
        cm = _module("doubled")
    assert cm.index_bounds["forward"].bounds == ()
    (u,) = cm.index_bounds["forward"].unbounded
    assert u.input == "idx" and "embedding" in u.op
    assert any("unchecked index input: forward: input 'idx'" in w for w in cm.report.warnings)
    assert "unchecked index input" in caplog.text


# ---- evaluation and `qcompile run` with a tokenizer bigger than the model ----------------------
class _BigTokenizer:
    """300 ids for a 256-row model; character codes spread over the whole range."""

    def __len__(self) -> int:
        return 300

    def __call__(self, text: str, add_special_tokens: bool = False) -> SimpleNamespace:
        return SimpleNamespace(input_ids=[(ord(c) * 37) % 300 for c in text])


def test_eval_refuses_a_tokenizer_bigger_than_the_vocabulary(tiny_llama, tmp_path):
    from qcompile.eval.harness import TextSource, evaluate

    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 20)
    zm = ZooModel("tiny-llama", "causal_lm", tiny_llama, tokenizer=_BigTokenizer())
    for source in (False, True):
        with pytest.raises(
            DataError,
            match=r"ids in \[\d+, 2\d\d\] but tiny-llama's vocabulary has 256 entries.*"
            r"tokenizer \(300 tokens\) does not match",
        ):
            evaluate(zm, "fp32", text=TextSource(dataset=None, path=str(text)), windows=1, seq=16, source=source)


@pytest.fixture(scope="module")
def big_tokenizer_artifact(tmp_path_factory):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({"[UNK]": 0, **{f"w{i}": i for i in range(1, 300)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    cm = qcompile.compile(make_tiny_llama(vocab=VOCAB), plan="fp32", max_cache_len=CACHE, backend="torch", tokenizer=hf)
    return cm.save(tmp_path_factory.mktemp("art") / "big-tok")


def test_run_refuses_prompt_ids_past_the_vocabulary_and_bad_parameters(big_tokenizer_artifact, capsys):
    from qcompile.cli import main

    art = str(big_tokenizer_artifact)
    assert main(["run", art, "--prompt", "w1 w299 w2", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "ids in [1, 299] but the model" in err and "tokenizer (300 tokens) does not match" in err
    assert "Traceback" not in err
    with pytest.raises(SystemExit) as ei:  # argparse refuses it before the artifact loads
        main(["run", art, "--prompt", "w1", "--sample", "--temperature", "nan"])
    assert ei.value.code == 2
    assert "--temperature: must be a finite number > 0.0, got nan" in capsys.readouterr().err
    assert main(["run", art, "--prompt", ""]) == 2
    assert "the prompt is empty" in capsys.readouterr().err
    assert main(["run", art, "--prompt", "w1 w2", "--max-new-tokens", "3"]) == 0  # in range: runs


def test_loading_warns_about_a_tokenizer_bigger_than_the_model(big_tokenizer_artifact, caplog):
    with caplog.at_level(logging.WARNING, logger="qcompile.runtime.compiled"):
        cm = qcompile.load(big_tokenizer_artifact)
    assert cm.token_limit() == VOCAB
    assert "the tokenizer has 300 tokens but the model only 256 token ids" in caplog.text
