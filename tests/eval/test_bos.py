"""BOS-correct evaluation: window construction with and without BOS, the tokenizer's rule, the
flag override, the JSON record and the CLI (tiny models and fake tokenizers; fast)."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from qcompile import DataError
from qcompile.cli import _parser, main
from qcompile.eval.harness import TextSource, evaluate
from qcompile.eval.perplexity import (
    BosChoice,
    hf_logits,
    model_inputs,
    perplexity,
    resolve_bos,
    tokenizer_bos,
    windows_of,
)
from qcompile.eval.zoo import ZooModel


class WordTokenizer:
    """A stand-in tokenizer: each whitespace word is one id (3 + its byte sum mod 250); with
    ``add_bos`` it puts ``bos_token_id`` first when asked for special tokens."""

    def __init__(self, bos_token_id=1, add_bos=True):
        self.bos_token_id, self.add_bos = bos_token_id, add_bos

    def __call__(self, text, add_special_tokens=True):
        ids = [3 + sum(w.encode()) % 250 for w in text.split()]
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return SimpleNamespace(input_ids=ids)

    def __len__(self):
        return 256


def test_windows_with_and_without_bos_on_a_toy_token_list():
    tokens = torch.tensor([10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20])
    wins = windows_of(tokens, 4, 2)
    assert wins.tolist() == [[10, 11, 12, 13], [14, 15, 16, 17]]
    assert model_inputs(wins, None).tolist() == wins.tolist()
    assert model_inputs(wins, 2).tolist() == [[2, 10, 11, 12, 13], [2, 14, 15, 16, 17]]
    assert model_inputs(wins, 2).dtype == torch.int64


def _oracle(logits_fn, tokens, seq, windows, bos):
    """Perplexity by hand: per window, the model input and the scored (position, target) pairs."""
    total, n = 0.0, 0
    for i in range(windows):
        w = [int(t) for t in tokens[i * seq : (i + 1) * seq]]
        x = ([bos] if bos is not None else []) + w
        logits = logits_fn(torch.tensor([x])).to(torch.float64)[0]
        off = 1 if bos is not None else 0
        for k in range(1, seq):  # targets w[1:], each predicted at the position just before it
            row = logits[k - 1 + off].tolist()
            lse = math.log(sum(math.exp(v) for v in row))
            total += lse - row[w[k]]
            n += 1
    return math.exp(total / n), n


def _random_model(vocab=7):
    def fn(ids):  # logits that depend on the whole prefix (position and every token so far)
        g = torch.Generator().manual_seed(int(ids.sum()) * 31 + ids.shape[1])
        return torch.randn(1, ids.shape[1], vocab, generator=g).cumsum(1) + ids[..., None] * 0.1

    return fn


def test_perplexity_with_bos_scores_the_same_tokens_as_the_oracle():
    tokens = torch.tensor([3, 1, 4, 1, 5, 6, 2, 6, 5, 3, 5, 0, 4])
    fn = _random_model()
    for bos in (None, 6):
        want, n = _oracle(fn, tokens, 4, 3, bos)
        got = perplexity(fn, tokens, seq=4, windows=3, bos_id=bos)
        assert got.predictions == n == 3 * 3 and got.tokens == 12 and got.bos_id == bos
        assert abs(got.ppl - want) <= 1e-12 * want


def test_a_bigram_model_scores_the_same_with_and_without_bos():
    """Logits at a position depend only on the token there: the same targets after the same tokens
    give the same perplexity, so the BOS position (and the token after it) is not scored."""
    table = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))

    def bigram(ids):
        return table[ids]

    tokens = torch.randint(0, 7, (50,), generator=torch.Generator().manual_seed(2))
    a = perplexity(bigram, tokens, seq=10, windows=5)
    b = perplexity(bigram, tokens, seq=10, windows=5, bos_id=7)
    assert a.predictions == b.predictions == 45
    assert abs(a.ppl - b.ppl) <= 1e-12 * a.ppl


def test_the_model_sees_bos_first_in_every_window():
    seen = []

    def fn(ids):
        seen.append(ids.tolist()[0])
        return torch.zeros(1, ids.shape[1], 30)

    perplexity(fn, torch.arange(10, 22), seq=4, windows=3, bos_id=2)
    assert seen == [[2, 10, 11, 12, 13], [2, 14, 15, 16, 17], [2, 18, 19, 20, 21]]


def test_the_tokenizers_rule_and_the_flag():
    assert tokenizer_bos(WordTokenizer(1, add_bos=True)) == BosChoice(True, "tokenizer", 1)
    assert tokenizer_bos(WordTokenizer(1, add_bos=False)) == BosChoice(False, "tokenizer", 1)
    assert tokenizer_bos(WordTokenizer(None)) == BosChoice(False, "tokenizer", None)
    assert resolve_bos(WordTokenizer(1, True), None) == BosChoice(True, "tokenizer", 1)
    assert resolve_bos(WordTokenizer(1, True), False) == BosChoice(False, "flag", 1)
    assert resolve_bos(WordTokenizer(1, False), True) == BosChoice(True, "flag", 1)
    assert resolve_bos(WordTokenizer(None), False) == BosChoice(False, "flag", None)
    assert BosChoice(False, "flag", 1).prefix is None and BosChoice(True, "flag", 1).prefix == 1
    with pytest.raises(DataError, match=r"--bos was asked for, but toy's tokenizer has no BOS token"):
        resolve_bos(WordTokenizer(None), True, "toy")


def test_a_real_hf_tokenizer_without_bos(hf_folder):
    from transformers import AutoTokenizer

    assert tokenizer_bos(AutoTokenizer.from_pretrained(str(hf_folder))) == BosChoice(False, "tokenizer", None)


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    text = tmp_path_factory.mktemp("bos") / "words.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(1, 256, (200,), generator=g)))
    return text


def test_the_record_follows_the_tokenizer_and_matches_a_direct_loss(tiny_llama, words):
    zm = ZooModel("toy", "causal_lm", tiny_llama, WordTokenizer(1, add_bos=True))
    text = TextSource(dataset=None, path=str(words))
    src = evaluate(zm, "fp32", text=text, windows=2, seq=16, source=True)
    assert src["bos"] == {"used": True, "source": "tokenizer", "token_id": 1}
    assert src["tokens"] == 32 and src["predictions"] == 30
    tokens = text.tokens(zm.tokenizer)
    with torch.no_grad():  # transformers' own loss on BOS + window, the first two positions ignored
        nll = 0.0
        for w in windows_of(tokens, 16, 2):
            x = torch.cat([torch.tensor([1]), w]).view(1, -1)
            labels = x.clone()
            labels[0, :2] = -100
            nll += float(tiny_llama(input_ids=x, labels=labels).loss) * 15
    assert abs(src["ppl"] - math.exp(nll / 30)) <= 1e-4 * src["ppl"]
    compiled = evaluate(zm, "fp32", text=text, windows=2, seq=16, backend="torch", calib_windows=1, calib_seq=16)
    assert compiled["bos"] == src["bos"]
    assert abs(compiled["ppl"] - src["ppl"]) <= 1e-4 * src["ppl"]
    off = evaluate(zm, "fp32", text=text, windows=2, seq=16, source=True, bos=False)
    assert off["bos"] == {"used": False, "source": "flag", "token_id": 1}
    assert off["ppl"] == pytest.approx(perplexity(hf_logits(tiny_llama), tokens, 16, 2).ppl, rel=1e-9)


def test_no_bos_id_is_recorded_and_bos_on_it_is_a_user_error(tiny_llama, words):
    zm = ZooModel("toy", "causal_lm", tiny_llama, WordTokenizer(None))
    text = TextSource(dataset=None, path=str(words))
    rec = evaluate(zm, "fp32", text=text, windows=1, seq=16, source=True)
    assert rec["bos"] == {"used": False, "source": "tokenizer", "token_id": None}
    with pytest.raises(DataError, match="has no BOS token"):
        evaluate(zm, "fp32", text=text, windows=1, seq=16, source=True, bos=True)


def test_bos_on_an_image_classifier_is_a_user_error():
    from qcompile.eval.zoo import tiny_cnn

    with pytest.raises(DataError, match="apply to language models; img is an image classifier"):
        evaluate(ZooModel("img", "image_classifier", tiny_cnn()), "fp32", bos=False)


def test_cli_parses_bos_flags():
    p = _parser()
    base = ["eval", "--model", "smollm2-135m"]
    assert p.parse_args(base).bos is None
    assert p.parse_args([*base, "--bos"]).bos is True
    assert p.parse_args([*base, "--no-bos"]).bos is False


def test_cli_no_bos_is_recorded_and_bos_without_a_bos_token_exits_2(hf_folder, words, tmp_path, capsys):
    out = tmp_path / "e.json"
    args = ["eval", "--model", str(hf_folder), "--source", "--text", str(words), "--windows", "1", "--seq", "16"]
    assert main([*args, "--no-bos", "--json", str(out)]) == 0
    assert "no BOS, from the flag" in capsys.readouterr().out
    assert json.loads(out.read_text())["bos"] == {"used": False, "source": "flag", "token_id": None}
    assert main([*args, "--bos"]) == 2
    assert "has no BOS token" in capsys.readouterr().err


def test_calibration_windows_follow_the_same_bos_rule():
    from qcompile.eval.datasets import calibration_tokens

    plain = calibration_tokens(WordTokenizer(1, add_bos=False), 2, 16)
    with_bos = calibration_tokens(WordTokenizer(1, add_bos=True), 2, 16)
    assert plain.shape == (2, 16) and with_bos.shape == (2, 17)
    assert torch.equal(with_bos[:, 0], torch.ones(2, dtype=with_bos.dtype)) and torch.equal(with_bos[:, 1:], plain)
    assert torch.equal(calibration_tokens(WordTokenizer(1, add_bos=True), 2, 16, bos=False), plain)
