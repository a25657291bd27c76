import json
import os
import subprocess
import sys

import pytest
import torch

import qcompile
from qcompile import ArtifactError, InputError
from qcompile.runtime.artifact import FORMAT_VERSION, MANIFEST, TENSORS, _manifest_checksum


@pytest.fixture(scope="module")
def w8a8_tiny(tiny_llama):
    return qcompile.compile(tiny_llama, plan="w8a8-rtn", max_cache_len=64, backend="torch")


@pytest.fixture(scope="module")
def saved(w8a8_tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("art") / "tiny-w8a8"
    w8a8_tiny.save(d)
    return d


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_save_load_call_is_bit_identical(w8a8_tiny, saved):
    cm2 = qcompile.load(saved)
    x = torch.randint(0, 256, (1, 17))
    assert torch.equal(cm2(x), w8a8_tiny(x))
    ids = x[:, :4]
    assert torch.equal(cm2.generate(ids, 10), w8a8_tiny.generate(ids, 10))
    assert cm2.plan == w8a8_tiny.plan and cm2.report.summary() == w8a8_tiny.report.summary()
    # no temporary directories are left beside the artifact
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


def test_load_in_a_new_process_without_the_source_model(w8a8_tiny, saved, tmp_path):
    x = torch.randint(0, 256, (1, 11), generator=torch.Generator().manual_seed(3))
    out = tmp_path / "y.pt"
    code = (
        "import sys, torch, qcompile;"
        f"cm = qcompile.load({str(saved)!r});"
        "x = torch.tensor([int(a) for a in sys.argv[1:-1]], dtype=torch.int64).view(1, -1);"
        "from safetensors.torch import save_file; save_file({'y': cm(x)}, sys.argv[-1])"
    )
    subprocess.run([sys.executable, "-c", code, *map(str, x[0].tolist()), str(out)], check=True, timeout=300)
    from safetensors.torch import load_file

    assert torch.equal(load_file(out)["y"], w8a8_tiny(x))


def test_overwrite_replaces_an_artifact_atomically(w8a8_tiny, tmp_path):
    d = tmp_path / "a"
    w8a8_tiny.save(d)
    w8a8_tiny.save(d)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    qcompile.load(d)


def test_refuses_to_overwrite_a_foreign_directory(w8a8_tiny, tmp_path):
    d = tmp_path / "precious"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="not a qcompile artifact; refusing"):
        w8a8_tiny.save(d)
    assert (d / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


def test_truncated_tensors_are_detected(saved, tmp_path):
    d = _copy(saved, tmp_path / "t")
    f = d / TENSORS
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="does not match its checksum"):
        qcompile.load(d)


def test_tampered_tensor_bytes_are_detected(saved, tmp_path):
    d = _copy(saved, tmp_path / "t")
    f = d / TENSORS
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="truncated or tampered"):
        qcompile.load(d)


def test_edited_manifest_is_detected(saved, tmp_path):
    d = _copy(saved, tmp_path / "t")
    m = json.loads((d / MANIFEST).read_text())
    m["target"] = "cuda"
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="edited or corrupted"):
        qcompile.load(d)
    (d / MANIFEST).write_text((d / MANIFEST).read_text()[:100])
    with pytest.raises(ArtifactError, match="corrupt"):
        qcompile.load(d)


def test_missing_files_and_non_artifacts(saved, tmp_path):
    d = _copy(saved, tmp_path / "t")
    os.remove(d / TENSORS)
    with pytest.raises(ArtifactError, match="incomplete"):
        qcompile.load(d)
    with pytest.raises(ArtifactError, match="not a qcompile artifact"):
        qcompile.load(tmp_path)


def test_newer_format_version_is_refused(saved, tmp_path):
    d = _copy(saved, tmp_path / "t")
    m = json.loads((d / MANIFEST).read_text())
    m["format_version"] = FORMAT_VERSION + 1
    m["checksum"] = _manifest_checksum(m)
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=f"format version {FORMAT_VERSION + 1}, newer than"):
        qcompile.load(d)


def test_wrong_inputs_are_clear_errors(w8a8_tiny):
    with pytest.raises(InputError, match=r"expected int64\[1, s\w+\] with s\w+ in \[1, 256\], got dtype float32"):
        w8a8_tiny(torch.zeros(1, 4))
    with pytest.raises(InputError, match="got rank 1"):
        w8a8_tiny(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(InputError, match=r"dim 0 must be 1"):
        w8a8_tiny(torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(InputError, match="out of range"):
        w8a8_tiny(torch.zeros(1, 300, dtype=torch.int64))
    with pytest.raises(InputError, match="takes 1 input"):
        w8a8_tiny(torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1))
    with pytest.raises(InputError, match="no input named 'ids'"):
        w8a8_tiny(ids=torch.zeros(1, 4, dtype=torch.int64))
    with pytest.raises(InputError, match="got list"):
        w8a8_tiny([1, 2, 3])


def test_generate_checks_its_inputs(w8a8_tiny):
    with pytest.raises(InputError, match="compiled cache length 64"):
        w8a8_tiny.generate(torch.zeros(1, 60, dtype=torch.int64), 10)
    with pytest.raises(InputError, match=r"shape \[1, prompt_len\]"):
        w8a8_tiny.generate(torch.zeros(2, 3, dtype=torch.int64), 4)
    with pytest.raises(InputError, match="token ids must be in"):
        w8a8_tiny.generate(torch.tensor([[5, 999]]), 4)


def test_greedy_generate_matches_transformers(tiny_llama):
    cm = qcompile.compile(tiny_llama, plan="fp32", max_cache_len=64)
    ids = torch.tensor([[1, 17, 42, 99, 3]])
    ours = cm.generate(ids, 32)
    ref = tiny_llama.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=0)
    assert ours.shape == (1, 37)
    assert ours.tolist() == ref.tolist()
    st = cm.last_generation
    assert st is not None and st.prompt_tokens == 5 and st.new_tokens == 32


def test_sampling_is_reproducible_with_a_seed_and_respects_top_k(w8a8_tiny):
    ids = torch.tensor([[1, 2, 3]])
    a = w8a8_tiny.generate(ids, 12, do_sample=True, temperature=0.8, top_k=5, seed=7)
    b = w8a8_tiny.generate(ids, 12, do_sample=True, temperature=0.8, top_k=5, seed=7)
    c = w8a8_tiny.generate(ids, 12, do_sample=True, temperature=0.8, top_p=0.9, seed=8)
    assert torch.equal(a, b) and c.shape == (1, 15)
    greedy = w8a8_tiny.generate(ids, 12)
    near_greedy = w8a8_tiny.generate(ids, 12, do_sample=True, top_k=1, seed=1)
    assert torch.equal(greedy, near_greedy)


def test_generate_stops_at_eos(w8a8_tiny):
    ids = torch.tensor([[1, 2, 3]])
    full = w8a8_tiny.generate(ids, 12, eos_token_id=[])
    stop_tok = int(full[0, 5])
    stopped = w8a8_tiny.generate(ids, 12, eos_token_id=stop_tok)
    first = full[0, 3:].tolist().index(stop_tok) + 4
    assert stopped.tolist() == full[:, :first].tolist()
