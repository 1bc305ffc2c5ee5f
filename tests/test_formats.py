"""bdia_jax.formats on Hugging Face folders: tiny checkpoints written by transformers
(scripts/make_hf_tiny_fixtures.py) read bit for bit, write_hf_folder round trips, and every
damaged file ends in one ValueError line that names the file."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from bdia_jax.formats import (
    Checkpoint,
    load_tokenizer,
    read_checkpoint,
    tokenizer_info,
    write_hf_folder,
    write_tokenizer,
)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
HF_FIXTURES = ("llama_tiny", "qwen2_tiny", "qwen3_tiny", "mistral_tiny", "gpt2_tiny")


def assert_same_tensors(actual: dict, expected: dict):
    """Same names, and per tensor the same dtype, shape and bytes."""
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        got = actual[name]
        assert (got.dtype, got.shape) == (want.dtype, want.shape), name
        assert got.tobytes() == want.tobytes(), name


def safetensors_of(folder: pathlib.Path) -> dict:
    """Every tensor of every safetensors file in the folder, read by safetensors itself."""
    return {k: v for f in sorted(folder.glob("*.safetensors"))
            for k, v in safetensors.numpy.load_file(f).items()}


def one_line_error(excinfo, file) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    assert str(file) in message, message
    return message


# ---------------------------------------------------------------------------------- reading
@pytest.mark.parametrize("name", HF_FIXTURES)
def test_reads_transformers_folder_bit_for_bit(name):
    folder = FIXTURES / name
    ckpt = read_checkpoint(folder)
    assert isinstance(ckpt, Checkpoint)
    assert ckpt.config == json.loads((folder / "config.json").read_text())
    assert_same_tensors(ckpt.tensors, safetensors_of(folder))
    assert str(folder) in ckpt.source


def test_fixtures_cover_bfloat16_and_shards():
    assert {t.dtype for t in read_checkpoint(FIXTURES / "qwen2_tiny").tensors.values()} == \
        {np.dtype(ml_dtypes.bfloat16)}
    sharded = read_checkpoint(FIXTURES / "qwen3_tiny")
    assert len(list((FIXTURES / "qwen3_tiny").glob("model-*-of-*.safetensors"))) > 1
    assert "4 shards" in sharded.source
    index = json.loads((FIXTURES / "qwen3_tiny" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sharded.tensors)


def test_library_imports_and_reads_folders_without_gguf():
    code = ("import sys; sys.modules['gguf'] = None; import bdia_jax, bdia_jax.formats as f; "
            f"c = f.read_checkpoint({str(FIXTURES / 'llama_tiny')!r}); print(len(c.tensors))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "21"


# ---------------------------------------------------------------------------------- writing
def random_tensors(seed=0):
    rng = np.random.default_rng(seed)
    return {"model.embed_tokens.weight": rng.standard_normal((8, 4), np.float32),
            "model.layers.0.mlp.up_proj.weight": rng.standard_normal((6, 4)).astype(
                ml_dtypes.bfloat16),
            "model.layers.0.input_layernorm.weight": rng.standard_normal(4).astype(np.float16),
            "model.norm.weight": rng.standard_normal(4, np.float32)}


@pytest.mark.parametrize("name", ["qwen2_tiny", "qwen3_tiny", "llama_tiny"])
@pytest.mark.parametrize("max_shard_bytes", [2**30, 10_000, 1])
def test_write_read_round_trip(tmp_path, name, max_shard_bytes):
    ckpt = read_checkpoint(FIXTURES / name)
    write_hf_folder(tmp_path / "out", ckpt.config, ckpt.tensors,
                    max_shard_bytes=max_shard_bytes)
    again = read_checkpoint(tmp_path / "out")
    assert again.config == ckpt.config
    assert_same_tensors(again.tensors, ckpt.tensors)
    shards = sorted((tmp_path / "out").glob("model-*-of-*.safetensors"))
    total = sum(t.nbytes for t in ckpt.tensors.values())
    if total <= max_shard_bytes:
        assert not shards and (tmp_path / "out" / "model.safetensors").is_file()
    else:
        assert len(shards) > 1 and not (tmp_path / "out" / "model.safetensors").exists()
        assert all(os.path.getsize(s) - 8 <= max_shard_bytes + 4096 or max_shard_bytes == 1
                   for s in shards)  # tensor bytes within the limit, plus a small header
        if max_shard_bytes == 1:
            assert len(shards) == len(ckpt.tensors)  # one tensor per shard
        index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == total
    for file in (tmp_path / "out").glob("*.safetensors"):
        with safetensors.safe_open(str(file), "numpy") as f:
            assert f.metadata() == {"format": "pt"}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_write_modes_follow_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_hf_folder(tmp_path / "out", {"model_type": "llama"}, random_tensors(),
                        max_shard_bytes=64)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~umask
    files = list((tmp_path / "out").iterdir())
    assert len(files) > 3
    for file in files:
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file.name
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # no temporary folder left


def test_rewrite_replaces_old_weights_and_keeps_other_files(tmp_path):
    out = tmp_path / "out"
    tensors = random_tensors()
    write_hf_folder(out, {"model_type": "llama"}, tensors)  # one file
    (out / "tokenizer.json").write_text("{}")
    write_hf_folder(out, {"model_type": "llama", "x": 1}, tensors, max_shard_bytes=64)
    assert not (out / "model.safetensors").exists()  # would make the folder ambiguous
    assert read_checkpoint(out).config["x"] == 1
    write_hf_folder(out, {"model_type": "llama"}, random_tensors(1))  # one file again
    assert not list(out.glob("model-*")) and not (out / "model.safetensors.index.json").exists()
    assert_same_tensors(read_checkpoint(out).tensors, random_tensors(1))
    assert (out / "tokenizer.json").read_text() == "{}"


def test_write_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        write_hf_folder(tmp_path / "a", {}, random_tensors())
    with pytest.raises(ValueError, match="float64.*float32, float16 or bfloat16"):
        write_hf_folder(tmp_path / "a", {"model_type": "llama"}, {"w": np.zeros(2)})
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------------------------- damage
def _copy(tmp_path, name="llama_tiny") -> pathlib.Path:
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    return folder


def _cut(file: pathlib.Path, keep: int):
    data = file.read_bytes()
    file.write_bytes(data[:keep])


def _damage_single(kind, folder):
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    if kind == "truncated":
        _cut(weights, size // 2)
    elif kind == "truncated_header":
        _cut(weights, 100)
    elif kind == "tiny":
        _cut(weights, 5)
    elif kind == "empty":
        _cut(weights, 0)
    elif kind == "garbage":
        weights.write_bytes(np.random.default_rng(0).bytes(size))
    elif kind == "garbage_json":
        weights.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!!" + b"\0" * 64)
    elif kind == "trailing":
        weights.write_bytes(weights.read_bytes() + b"\0" * 16)
    elif kind == "wrong_shape":  # a header whose shape does not fit its byte span
        data = bytearray(weights.read_bytes())
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        name = next(k for k in header if k != "__metadata__")
        header[name]["shape"] = [header[name]["shape"][0] + 1, *header[name]["shape"][1:]]
        text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
        assert len(text) == n
        weights.write_bytes(bytes(data[:8]) + text + bytes(data[8 + n:]))
    elif kind == "unreadable":  # a folder where the file should be (root reads any mode)
        weights.unlink()
        weights.mkdir()
    return weights


@pytest.mark.parametrize("kind", ["truncated", "truncated_header", "tiny", "empty", "garbage",
                                  "garbage_json", "trailing", "wrong_shape", "unreadable"])
def test_damaged_safetensors_named_in_one_line(tmp_path, kind):
    folder = _copy(tmp_path)
    weights = _damage_single(kind, folder)
    with pytest.raises(ValueError) as excinfo:
        read_checkpoint(folder)
    message = one_line_error(excinfo, weights)
    assert "config.json and model.safetensors" in message  # what the folder should hold


def test_damaged_shard_named_in_one_line(tmp_path):
    folder = _copy(tmp_path, "qwen3_tiny")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    _cut(shard, shard.stat().st_size - 10)
    with pytest.raises(ValueError) as excinfo:
        read_checkpoint(folder)
    assert "truncated" in one_line_error(excinfo, shard)


def test_missing_shard_named_in_one_line(tmp_path):
    folder = _copy(tmp_path, "qwen3_tiny")
    shard = sorted(folder.glob("model-*.safetensors"))[2]
    shard.unlink()
    with pytest.raises(ValueError) as excinfo:
        read_checkpoint(folder)
    message = one_line_error(excinfo, folder)
    assert shard.name in message and "all 4 shards" in message


def test_shard_lacking_a_listed_tensor(tmp_path):
    folder = _copy(tmp_path, "qwen3_tiny")
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    name = next(k for k, v in index["weight_map"].items() if v == first)
    index["weight_map"][name] = second
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError) as excinfo:
        read_checkpoint(folder)
    assert name in one_line_error(excinfo, folder / second)


def test_garbage_index_named_in_one_line(tmp_path):
    folder = _copy(tmp_path, "qwen3_tiny")
    (folder / "model.safetensors.index.json").write_text('{"weight_map": [1, 2]')
    with pytest.raises(ValueError) as excinfo:
        read_checkpoint(folder)
    assert "weight_map" in one_line_error(excinfo, folder / "model.safetensors.index.json")


@pytest.mark.parametrize("kind", ["no_config", "config_garbage", "config_no_model_type",
                                  "no_weights", "bin_only", "both", "no_folder", "a_file"])
def test_folder_problems_named_in_one_line(tmp_path, kind):
    folder = _copy(tmp_path)
    named = folder
    if kind == "no_config":
        (folder / "config.json").unlink()
        named = folder / "config.json"
    elif kind == "config_garbage":
        (folder / "config.json").write_text("{model_type: llama")
        named = folder / "config.json"
    elif kind == "config_no_model_type":
        (folder / "config.json").write_text('{"hidden_size": 32}')
        named = folder / "config.json"
    elif kind in ("no_weights", "bin_only"):
        (folder / "model.safetensors").unlink()
        if kind == "bin_only":
            (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04 a torch pickle")
    elif kind == "both":
        (folder / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    elif kind == "no_folder":
        named = folder = tmp_path / "nowhere"
    elif kind == "a_file":
        named = folder = folder / "model.safetensors"
    with pytest.raises(ValueError) as excinfo:
        read_checkpoint(folder)
    message = one_line_error(excinfo, named)
    if kind == "bin_only":
        assert "pytorch_model.bin" in message and "safe_serialization=True" in message
    elif kind == "both":
        assert "ambiguous" in message
    else:
        assert "config.json" in message


# ---------------------------------------------------------------------------------- tokenizers
@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    """A tiny byte-level BPE saved both as tokenizer.json and as vocab.json + merges.txt."""
    import tokenizers

    folder = tmp_path_factory.mktemp("bpe")
    bpe = tokenizers.ByteLevelBPETokenizer()
    text = ["the cat sat on the mat", "the dog ate the cat's food", "a mat, a hat, a cat"] * 5
    bpe.train_from_iterator(text, vocab_size=300, min_frequency=2, show_progress=False,
                            special_tokens=["<|endoftext|>"])
    bpe.save_model(str(folder))
    bpe.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "bos_token": {"content": "<|endoftext|>"},
         "chat_template": "{{ messages }}"}))
    return folder


def test_tokenizer_json_and_vocab_merges_agree(bpe_folder, tmp_path):
    from_json = load_tokenizer(bpe_folder)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(bpe_folder / name, tmp_path / name)
    shutil.copy(bpe_folder / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    from_files = load_tokenizer(tmp_path)
    for text in ("the cat sat", "a hat!<|endoftext|>the dog", "  spaces\tand 123"):
        ids = from_json.encode(text, add_special_tokens=False).ids
        assert from_files.encode(text, add_special_tokens=False).ids == ids
    eot = from_files.token_to_id("<|endoftext|>")
    assert from_files.encode("cat<|endoftext|>", add_special_tokens=False).ids[-1] == eot


def test_tokenizer_info_and_write_tokenizer(bpe_folder, tmp_path):
    info = tokenizer_info(bpe_folder)
    eot = load_tokenizer(bpe_folder).token_to_id("<|endoftext|>")
    assert info == {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": None,
                    "chat_template": "{{ messages }}", "special_tokens": ["<|endoftext|>"]}
    write_tokenizer(tmp_path / "copy", bpe_folder)
    assert tokenizer_info(tmp_path / "copy") == info
    assert (tmp_path / "copy" / "tokenizer.json").read_bytes() == \
        (bpe_folder / "tokenizer.json").read_bytes()


def test_tokenizer_problems_named_in_one_line(tmp_path):
    with pytest.raises(ValueError) as excinfo:
        load_tokenizer(tmp_path)
    assert "tokenizer.json" in one_line_error(excinfo, tmp_path)
    (tmp_path / "tokenizer.json").write_text("{garbage")
    with pytest.raises(ValueError) as excinfo:
        load_tokenizer(tmp_path)
    one_line_error(excinfo, tmp_path / "tokenizer.json")
