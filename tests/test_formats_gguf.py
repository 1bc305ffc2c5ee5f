"""bdia_jax.formats on GGUF: llama.cpp's q/k permutation undone exactly, every supported
quantization read as ggml dequantizes it, metadata mapped to a LlamaConfig dict, tokenizers
rebuilt from metadata, damaged files named in one line; and the real SmolLM2 GGUF (skipped,
with its reason, when ../shared is absent) against transformers' reference fixture."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="bdia_jax.formats reads GGUF with the gguf package")

from bdia_jax.formats import load_tokenizer, read_checkpoint, tokenizer_info, write_tokenizer  # noqa: E402
from bdia_jax.formats.gguf_file import open_reader, permute_rows, unpermute_rows  # noqa: E402

Q = gguf.GGMLQuantizationType
REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
REAL_GGUF = REPO.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_real_gguf = pytest.mark.skipif(
    not REAL_GGUF.is_file(), reason=f"{REAL_GGUF} absent (../shared holds the real model)")


def llama_cpp_permute(weights, n_head: int, n_head_kv: int | None):
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


# ---------------------------------------------------------------------------------- permute
@pytest.mark.parametrize("heads,head_dim,cols", [(4, 16, 8), (3, 64, 5), (1, 2, 3), (9, 64, 0)])
def test_unpermute_is_the_exact_inverse_of_llama_cpp_permute(heads, head_dim, cols):
    rng = np.random.default_rng(heads)
    shape = (heads * head_dim, cols) if cols else (heads * head_dim,)  # weight or bias
    w = rng.standard_normal(shape).astype(np.float32)
    permuted = llama_cpp_permute(w, heads, heads)
    np.testing.assert_array_equal(permute_rows(w, heads), permuted)
    assert unpermute_rows(permuted, heads).tobytes() == w.tobytes()
    assert permute_rows(unpermute_rows(w, heads), heads).tobytes() == w.tobytes()
    if head_dim > 2:
        assert not np.array_equal(permuted, w)  # the test would notice a no-op


def test_unpermute_turns_ggml_rope_into_hf_rope():
    """ggml rotates adjacent pairs (2i, 2i+1), HF's Llama rotates (i, i + d/2): rotating a
    GGUF head and unpermuting gives HF's rotation of the unpermuted head, bit for bit."""
    heads, d, positions = 3, 16, 7
    rng = np.random.default_rng(0)
    gguf_q = rng.standard_normal((heads * d, 5)).astype(np.float32)
    inv = (1e4 ** (-np.arange(0, d, 2) / d)).astype(np.float32)
    for pos in range(positions):
        cos, sin = np.cos(pos * inv), np.sin(pos * inv)  # [d/2]
        g = gguf_q.reshape(heads, d // 2, 2, 5)
        x, y = g[:, :, 0], g[:, :, 1]
        c, s = cos[None, :, None], sin[None, :, None]
        ggml = np.stack([x * c - y * s, x * s + y * c], axis=2).reshape(heads * d, 5)
        h = unpermute_rows(gguf_q, heads).reshape(heads, d, 5)
        c2 = np.concatenate([cos, cos])[None, :, None]
        s2 = np.concatenate([sin, sin])[None, :, None]
        rotate_half = np.concatenate([-h[:, d // 2:], h[:, :d // 2]], axis=1)
        hf = (h * c2 + rotate_half * s2).reshape(heads * d, 5)
        assert unpermute_rows(ggml, heads).tobytes() == hf.tobytes()


# ---------------------------------------------------------------------------------- synthetic
W, FF, HEADS, KV, HD = 64, 256, 4, 2, 16
# blk.i tensor -> GGUF type; the K-quants get random blocks (gguf cannot quantize to them).
TYPES = {
    0: dict(attn_q=Q.Q4_1, attn_k=Q.Q8_0, attn_v=Q.F16, attn_output=Q.BF16, ffn_gate=Q.Q4_0,
            ffn_up=Q.Q4_1, ffn_down=Q.Q4_K),
    1: dict(attn_q=Q.F32, attn_k=Q.Q4_1, attn_v=Q.Q8_0, attn_output=Q.F16, ffn_gate=Q.F32,
            ffn_up=Q.BF16, ffn_down=Q.Q6_K),
}
HF_BLOCK = dict(attn_q="self_attn.q_proj", attn_k="self_attn.k_proj", attn_v="self_attn.v_proj",
                attn_output="self_attn.o_proj", ffn_gate="mlp.gate_proj", ffn_up="mlp.up_proj",
                ffn_down="mlp.down_proj")
SHAPES = dict(attn_q=(HEADS * HD, W), attn_k=(KV * HD, W), attn_v=(KV * HD, W),
              attn_output=(W, HEADS * HD), ffn_gate=(FF, W), ffn_up=(FF, W), ffn_down=(W, FF))
# One quantization step of the tensor's largest magnitude |x|max (Q4_1: of its range): the
# most a value may move when quantized (rounding is half a step; Q4_0 clips one step).
STEP = {Q.F32: lambda x: 0.0, Q.F16: lambda x: np.abs(x) * 2.0**-10,
        Q.BF16: lambda x: np.abs(x) * 2.0**-7, Q.Q8_0: lambda x: np.abs(x).max() / 127,
        Q.Q4_0: lambda x: np.abs(x).max() / 8, Q.Q4_1: lambda x: np.ptp(x) / 15}


def tiny_bpe():
    """A tiny byte-level BPE (tokenizers' own trainer): its vocab in id order and merges."""
    import tokenizers

    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the cat sat on the mat", "a hat, a cat; the mat"] * 4,
                            vocab_size=280, min_frequency=2, show_progress=False,
                            special_tokens=["<|endoftext|>"])
    model = json.loads(bpe._tokenizer.to_str())["model"]
    vocab = sorted(model["vocab"], key=model["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return bpe, vocab, merges


def _encode(array: np.ndarray, qtype):
    """array [rows, cols] float32 -> what add_tensor takes for this GGUF type."""
    if qtype == Q.F32:
        return array
    if qtype == Q.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)


def _random_k_blocks(rng, rows, cols, qtype):
    """Random blocks of a K-quant with sane float16 scales (ggml's layouts: Q4_K starts with
    d, dmin; Q6_K ends with d)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows, cols // block, size), np.uint8)
    scale = np.full((rows, cols // block), 0.01, np.float16).view(np.uint8).reshape(
        rows, cols // block, 2)
    if qtype == Q.Q4_K:
        data[..., 0:2], data[..., 2:4] = scale, scale
    else:
        data[..., size - 2:] = scale
    return data.reshape(rows, -1)


def write_tiny_gguf(path, *, arch="llama", tied=False, extra_kv=None, types=TYPES,
                    pre="gpt2", extra_tensor=None):
    """A 2-block llama GGUF written with gguf.GGUFWriter as llama.cpp lays one out (q/k rows
    permuted, dims reversed). Returns {HF name: (float32 source [out, in] or None for random
    K-quant blocks, expected float32 as read)}."""
    rng = np.random.default_rng(0)
    _, vocab, merges = tiny_bpe()
    V = len(vocab)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_embedding_length(W)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_dimension_count(HD)
    w.add_rope_freq_base(5e5)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(vocab)
    w.add_token_merges(merges)
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in vocab])
    w.add_bos_token_id(vocab.index("<|endoftext|>"))
    w.add_eos_token_id(vocab.index("<|endoftext|>"))
    w.add_chat_template("{{ messages }}")
    for key, value in (extra_kv or {}).items():
        getattr(w, key)(value)
    expected = {}

    def add(gguf_name, hf_name, shape, qtype, heads=None):
        if qtype in (Q.Q4_K, Q.Q6_K):
            data, source = _random_k_blocks(rng, *shape, qtype), None
            read = gguf.quants.dequantize(data, qtype)
        else:
            source = rng.standard_normal(shape).astype(np.float32)
            stored = llama_cpp_permute(source, HEADS, heads) if heads else source
            data = _encode(stored, qtype)
            read = np.asarray(gguf.quants.dequantize(data, qtype), np.float32)
            if heads:  # rows back in HF order: the inverse of llama.cpp's row permutation
                order = llama_cpp_permute(np.arange(shape[0]), HEADS, heads)
                read = read[np.argsort(order)]
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(gguf_name, data)
        else:
            w.add_tensor(gguf_name, data, raw_dtype=qtype)
        expected[hf_name] = (source, qtype, read.reshape(shape))

    add("token_embd.weight", "model.embed_tokens.weight", (V, W), Q.Q8_0)
    for i, kinds in types.items():
        for short, qtype in kinds.items():
            heads = HEADS if short == "attn_q" else KV if short == "attn_k" else None
            add(f"blk.{i}.{short}.weight", f"model.layers.{i}.{HF_BLOCK[short]}.weight",
                SHAPES[short], qtype, heads)
        add(f"blk.{i}.attn_norm.weight", f"model.layers.{i}.input_layernorm.weight", (W,), Q.F32)
        add(f"blk.{i}.ffn_norm.weight", f"model.layers.{i}.post_attention_layernorm.weight",
            (W,), Q.F32)
    add("output_norm.weight", "model.norm.weight", (W,), Q.F32)
    if not tied:
        add("output.weight", "lm_head.weight", (V, W), Q.Q4_0)
    if extra_tensor:
        add(*extra_tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


def test_synthetic_gguf_reads_as_ggml_dequantizes(tiny_gguf):
    path, expected = tiny_gguf
    ckpt = read_checkpoint(path)
    assert sorted(ckpt.tensors) == sorted(expected)
    covered = set()
    for name, (source, qtype, read) in expected.items():
        got = ckpt.tensors[name]
        assert got.dtype == np.float32 and got.shape == read.shape, name
        assert got.tobytes() == read.tobytes(), (name, qtype.name)
        if source is not None:  # an independent check of orientation and row order
            assert np.all(np.abs(got - source) <= STEP[qtype](source)), (name, qtype.name)
        covered.add(qtype.name)
    assert covered == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"}
    assert "Q4_K x1" in ckpt.source and "GGUF" in ckpt.source


def test_synthetic_gguf_config(tiny_gguf, tmp_path):
    path, expected = tiny_gguf
    config = read_checkpoint(path).config
    V = expected["model.embed_tokens.weight"][2].shape[0]
    assert config == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": W,
        "intermediate_size": FF, "num_hidden_layers": 2, "num_attention_heads": HEADS,
        "num_key_value_heads": KV, "head_dim": HD, "hidden_act": "silu",
        "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 5e5,
        "rope_scaling": None, "mlp_bias": False, "attention_dropout": 0.0,
        "torch_dtype": "float32", "vocab_size": V, "bos_token_id": 0, "eos_token_id": 0,
        "tie_word_embeddings": False, "attention_bias": False}
    tied = tmp_path / "tied.gguf"
    linear = dict(add_rope_scaling_type=gguf.RopeScalingType.LINEAR, add_rope_scaling_factor=4.0)
    write_tiny_gguf(tied, tied=True, extra_kv=linear)
    ckpt = read_checkpoint(tied)
    assert ckpt.config["tie_word_embeddings"] is True and "lm_head.weight" not in ckpt.tensors
    assert ckpt.config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_synthetic_gguf_tokenizer_equals_tokenizers_bpe(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    bpe, vocab, _ = tiny_bpe()
    ours = load_tokenizer(path)
    for text in ("the cat sat on a mat", "hat; the<|endoftext|>cat", "  odd   spacing\n"):
        assert ours.encode(text, add_special_tokens=False).ids == \
            bpe.encode(text, add_special_tokens=False).ids, text
    eot = vocab.index("<|endoftext|>")
    assert tokenizer_info(path) == {"bos_token_id": eot, "eos_token_id": eot,
                                    "pad_token_id": None, "chat_template": "{{ messages }}",
                                    "special_tokens": ["<|endoftext|>"]}
    write_tokenizer(tmp_path / "hf", path)
    again = load_tokenizer(tmp_path / "hf")
    assert again.encode("the cat<|endoftext|>").ids == ours.encode("the cat<|endoftext|>").ids
    info = tokenizer_info(tmp_path / "hf")
    assert info["chat_template"] == "{{ messages }}" and info["eos_token_id"] == eot


# ---------------------------------------------------------------------------------- refusals
def _refused(path, *words):
    with pytest.raises(ValueError) as excinfo:
        read_checkpoint(path)
    message = str(excinfo.value)
    assert "\n" not in message and str(path) in message, message
    for word in words:
        assert word in message, message
    return message


def test_refuses_other_architectures_and_types(tmp_path):
    write_tiny_gguf(tmp_path / "qwen2.gguf", arch="qwen2")
    _refused(tmp_path / "qwen2.gguf", "architecture 'qwen2'")
    types = {0: {**TYPES[0], "ffn_gate": Q.Q5_0}}
    write_tiny_gguf(tmp_path / "q5.gguf", types=types)
    _refused(tmp_path / "q5.gguf", "blk.0.ffn_gate.weight", "Q5_0")
    yarn = dict(add_rope_scaling_type=gguf.RopeScalingType.YARN, add_rope_scaling_factor=4.0)
    write_tiny_gguf(tmp_path / "yarn.gguf", extra_kv=yarn)
    _refused(tmp_path / "yarn.gguf", "yarn")
    write_tiny_gguf(tmp_path / "freqs.gguf",
                    extra_tensor=("rope_freqs.weight", "x", (HD // 2,), Q.F32))
    _refused(tmp_path / "freqs.gguf", "rope_freqs.weight")
    write_tiny_gguf(tmp_path / "pre.gguf", pre="made-up")
    with pytest.raises(ValueError, match="tokenizer.ggml.pre 'made-up'"):
        load_tokenizer(tmp_path / "pre.gguf")


@pytest.mark.parametrize("kind", ["truncated", "header_only", "garbage", "missing", "empty"])
def test_damaged_gguf_named_in_one_line(tiny_gguf, tmp_path, kind):
    source, _ = tiny_gguf
    data = source.read_bytes()
    path = tmp_path / "damaged.gguf"
    if kind == "truncated":
        path.write_bytes(data[:len(data) - 1000])
    elif kind == "header_only":
        path.write_bytes(data[:200])
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif kind == "empty":
        path.write_bytes(b"")
    _refused(path, "GGUF")


# ---------------------------------------------------------------------------------- real file
@pytest.fixture(scope="module")
def real():
    if not REAL_GGUF.is_file():
        pytest.skip(f"{REAL_GGUF} absent (../shared holds the real model)")
    return read_checkpoint(REAL_GGUF)


@needs_real_gguf
def test_real_gguf_names_shapes_config(real):
    c = real.config
    assert (c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"],
            c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"],
            c["vocab_size"], c["max_position_embeddings"]) == (30, 576, 1536, 9, 3, 64, 49152,
                                                               8192)
    assert (c["rope_theta"], c["rms_norm_eps"], c["tie_word_embeddings"]) == (1e5, 1e-5, True)
    want = {"model.embed_tokens.weight": (49152, 576), "model.norm.weight": (576,)}
    for i in range(30):
        p = f"model.layers.{i}."
        want.update({p + "input_layernorm.weight": (576,),
                     p + "post_attention_layernorm.weight": (576,),
                     p + "self_attn.q_proj.weight": (576, 576),
                     p + "self_attn.k_proj.weight": (192, 576),
                     p + "self_attn.v_proj.weight": (192, 576),
                     p + "self_attn.o_proj.weight": (576, 576),
                     p + "mlp.gate_proj.weight": (1536, 576),
                     p + "mlp.up_proj.weight": (1536, 576),
                     p + "mlp.down_proj.weight": (576, 1536)})
    assert {k: v.shape for k, v in real.tensors.items()} == want
    assert all(v.dtype == np.float32 for v in real.tensors.values())
    assert "Q4_1 x210" in real.source and "Q8_0 x1" in real.source


def _decode_q4_1(raw: np.ndarray, rows: int) -> np.ndarray:
    """ggml's Q4_1 by hand: 20-byte blocks (f16 d, f16 m, 16 bytes of nibbles; low nibbles are
    elements 0..15, high ones 16..31), x = d * q + m in float32."""
    blocks = raw.reshape(-1, 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    return (d * q + m).reshape(rows, -1)


def _decode_q8_0(raw: np.ndarray, rows: int) -> np.ndarray:
    """ggml's Q8_0 by hand: 34-byte blocks (f16 d, 32 int8), x = d * q in float32."""
    blocks = raw.reshape(-1, 34)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    return (d * blocks[:, 2:].copy().view(np.int8).astype(np.float32)).reshape(rows, -1)


@needs_real_gguf
def test_real_gguf_against_hand_decoded_blocks(real):
    raw = {t.name: np.asarray(t.data) for t in open_reader(REAL_GGUF).tensors
           if t.name in ("token_embd.weight", "blk.7.ffn_down.weight", "blk.7.attn_q.weight",
                         "blk.7.attn_k.weight")}
    rows = slice(0, 49152, 97)  # a spread of the vocabulary's rows
    assert real.tensors["model.embed_tokens.weight"][rows].tobytes() == \
        _decode_q8_0(raw["token_embd.weight"][rows], 507).tobytes()
    assert real.tensors["model.layers.7.mlp.down_proj.weight"].tobytes() == \
        _decode_q4_1(raw["blk.7.ffn_down.weight"], 576).tobytes()
    for short, rows, heads in (("q", 576, None), ("k", 192, 3)):
        order = llama_cpp_permute(np.arange(rows), 9, heads)
        hf = _decode_q4_1(raw[f"blk.7.attn_{short}.weight"], rows)[np.argsort(order)]
        assert real.tensors[f"model.layers.7.self_attn.{short}_proj.weight"].tobytes() == \
            hf.tobytes()


@needs_real_gguf
def test_real_gguf_tokenizer_matches_reference(tmp_path):
    ref = json.loads((FIXTURES / "smollm2_gguf_reference.json").read_text())
    tok = load_tokenizer(REAL_GGUF)
    assert tok.encode(ref["text"], add_special_tokens=False).ids == ref["token_ids"]
    assert tok.decode(ref["greedy_ids"]) == ref["greedy_text"]
    chat = "<|im_start|>user\nHi<|im_end|>\n"
    ids = tok.encode(chat, add_special_tokens=False).ids
    assert ids[0] == 1 and 2 in ids  # <|im_start|>, <|im_end|> kept whole
    info = tokenizer_info(REAL_GGUF)
    assert (info["bos_token_id"], info["eos_token_id"], info["pad_token_id"]) == (1, 2, 2)
    assert info["chat_template"].startswith("{% for message in messages %}")
    assert info["special_tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    write_tokenizer(tmp_path, REAL_GGUF)
    assert load_tokenizer(tmp_path).encode(ref["text"]).ids == ref["token_ids"]
    assert tokenizer_info(tmp_path) == info
