"""GGUF files (llama.cpp) of architecture ``llama`` -> Hugging Face names, layouts and config.

Read with ggml-org's ``gguf`` package (``GGUFReader``, ``gguf.quants.dequantize``), imported
here only. Conventions undone on the way in:

* GGUF lists a tensor's dims fastest-first (ggml's ``ne``: [cols, rows]); numpy's shape is the
  reverse, which is HF's [out, in] for a linear weight.
* llama.cpp's converter (convert_hf_to_gguf.py, ``LlamaModel.permute``) reorders the rows of
  q_proj and k_proj within each head from HF's "rotate half" layout (first half, second half)
  to interleaved pairs; ``unpermute_rows`` is its exact inverse.
* Quantized blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) and F16/BF16 are dequantized to float32 with
  ``gguf.quants.dequantize``, ggml's own reference formulas.
"""

from __future__ import annotations

import collections
import functools
import pathlib
import re

import numpy as np

from bdia_jax.formats.checkpoint import Checkpoint

ARCHITECTURE = "llama"
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
HOLDS = ("a llama.cpp GGUF file of architecture 'llama' (convert_hf_to_gguf.py + "
         "llama-quantize write one) with tensors of types " + "/".join(SUPPORTED_TYPES))

# GGUF tensor name -> HF name ({i}: block index).
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
              "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
# Metadata keys of a llama GGUF that change the network and have no LlamaConfig counterpart
# here: refused by name rather than ignored.
_REFUSED_KEYS = ("expert_count", "attention.sliding_window", "rope.scaling.attn_factor",
                 "attention.key_length_swa")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ValueError("reading .gguf files needs the 'gguf' package: pip install "
                         "'gguf>=0.17,<0.20'.") from None
    return gguf


# ------------------------------------------------------------------- llama.cpp's q/k permute
def permute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's ``permute`` (convert_hf_to_gguf.py): HF's rotate-half row order within each
    head -> interleaved pairs. weight: [num_heads * head_dim, ...] (a weight or a bias)."""
    rows = weight.shape[0]
    return (weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """The exact inverse of ``permute_rows``: a GGUF q/k weight's rows -> HF's order."""
    rows = weight.shape[0]
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


# ------------------------------------------------------------------- reading
def open_reader(path: pathlib.Path):
    """A gguf.GGUFReader for ``path``, or a one-line ValueError naming the file. Parsing the
    metadata of a real model takes seconds (a tokenizer's arrays are read item by item), so
    the reader of an unchanged file is reused."""
    _gguf()
    if not path.is_file():
        raise ValueError(f"{path}: no such file; expected {HOLDS}.")
    stat = path.stat()
    try:
        return _cached_reader(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    except Exception as err:  # magic, version, truncation (index errors), permissions
        raise ValueError(f"{path}: cannot be read as GGUF ({_reason(err)}); expected {HOLDS} "
                         f"(truncated or damaged download?).") from None


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime_ns: int, size: int):
    return _gguf().GGUFReader(path)


def field(reader, key: str, default=None):
    """A metadata value (str, number, bool or list), or ``default`` when absent."""
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_gguf(path: pathlib.Path) -> Checkpoint:
    """A .gguf file of architecture llama -> Checkpoint (HF names, float32, LlamaConfig dict)."""
    gguf = _gguf()
    reader = open_reader(path)
    try:
        arch = field(reader, "general.architecture")
        if arch != ARCHITECTURE:
            raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; expected "
                             f"{HOLDS} (or load the model's Hugging Face safetensors folder).")
        config = llama_config(reader, path)
        heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        tensors, types = {}, collections.Counter()
        for t in reader.tensors:
            name = hf_name(t.name, path)
            qtype = gguf.GGMLQuantizationType(t.tensor_type).name
            if qtype not in SUPPORTED_TYPES:
                raise ValueError(f"{path}: tensor {t.name!r} has type {qtype}, not one of "
                                 f"{'/'.join(SUPPORTED_TYPES)}; requantize it with "
                                 f"llama-quantize or load the safetensors folder.")
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))
            if t.data.nbytes != int(t.n_bytes):
                raise ValueError(f"{path}: tensor {t.name!r} holds {t.data.nbytes} of its "
                                 f"{int(t.n_bytes)} bytes: the file is truncated; expected "
                                 f"{HOLDS}.")
            array = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
            array = np.array(array.reshape(shape), np.float32, copy=True)  # off the memmap
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                array = unpermute_rows(array, heads)
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                array = unpermute_rows(array, kv_heads)
            tensors[name] = array
            types[qtype] += 1
    except Exception as err:  # a damaged tensor table or block data (ours name the file)
        if isinstance(err, ValueError) and str(err).startswith(f"{path}: "):
            raise
        raise ValueError(f"{path}: cannot be read as GGUF ({_reason(err)}); expected "
                         f"{HOLDS} (truncated or damaged download?).") from None
    if "model.embed_tokens.weight" not in tensors:
        raise ValueError(f"{path}: has no token_embd.weight; expected {HOLDS}.")
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors
    config["attention_bias"] = any(n.endswith("q_proj.bias") for n in tensors)
    vocab_rows = tensors["model.embed_tokens.weight"].shape[0]
    if config.setdefault("vocab_size", vocab_rows) != vocab_rows:
        raise ValueError(f"{path}: vocabulary size {config['vocab_size']} (metadata) differs "
                         f"from token_embd.weight's {vocab_rows} rows; the file is "
                         f"inconsistent.")
    quant = ", ".join(f"{k} x{v}" for k, v in types.most_common())
    source = f"{path} (GGUF, {arch}, {quant})"
    return Checkpoint(config=config, tensors=tensors, source=source)


def hf_name(name: str, path) -> str:
    """GGUF tensor name -> HF LlamaForCausalLM parameter name (one-line ValueError if none)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = _BLOCK.fullmatch(name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{int(m.group(1))}.{_BLOCK_NAMES[m.group(2)]}"
    hint = (" (llama.cpp's precomputed Llama 3 rope frequencies; load the Hugging Face "
            "safetensors folder, whose config.json has the llama3 rope_scaling)"
            if name == "rope_freqs.weight" else "")
    raise ValueError(f"{path}: tensor {name!r} has no Hugging Face Llama counterpart{hint}; "
                     f"expected {HOLDS}.")


def llama_config(reader, path) -> dict:
    """GGUF ``llama.*`` metadata -> a Hugging Face LlamaConfig-style config.json dict."""

    def need(key):
        value = field(reader, f"{ARCHITECTURE}.{key}")
        if value is None:
            raise ValueError(f"{path}: metadata {ARCHITECTURE}.{key} is missing; expected "
                             f"{HOLDS}.")
        return value

    for key in _REFUSED_KEYS:
        value = field(reader, f"{ARCHITECTURE}.{key}")
        if value not in (None, 0):
            raise ValueError(f"{path}: metadata {ARCHITECTURE}.{key}={value!r} is not "
                             f"supported (no such Llama setting here).")
    width, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = int(field(reader, f"{ARCHITECTURE}.attention.head_count_kv", heads))
    head_dim = int(field(reader, f"{ARCHITECTURE}.attention.key_length", width // heads))
    value_dim = int(field(reader, f"{ARCHITECTURE}.attention.value_length", head_dim))
    rope_dims = int(field(reader, f"{ARCHITECTURE}.rope.dimension_count", head_dim))
    if value_dim != head_dim or rope_dims != head_dim:
        raise ValueError(f"{path}: key/value/rope dims {head_dim}/{value_dim}/{rope_dims} "
                         f"differ; a Llama rotates the full head dimension of equal keys and "
                         f"values.")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": width,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": _decimal(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _decimal(field(reader, f"{ARCHITECTURE}.rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling(reader, path),
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
    }
    vocab = field(reader, f"{ARCHITECTURE}.vocab_size")
    if vocab is None and "tokenizer.ggml.tokens" in reader.fields:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    if vocab is not None:
        config["vocab_size"] = int(vocab)
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("padding_token_id", "pad_token_id")):
        value = field(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            config[name] = int(value)
    return config


def rope_scaling(reader, path) -> dict | None:
    """llama.rope.scaling.* -> HF rope_scaling (None, or {"rope_type": "linear", "factor"})."""
    kind = field(reader, f"{ARCHITECTURE}.rope.scaling.type")
    factor = field(reader, f"{ARCHITECTURE}.rope.scaling.factor")
    if kind in (None, "none") and factor in (None, 0.0, 1.0):
        return None
    if kind == "linear" and factor:
        return {"rope_type": "linear", "factor": float(factor)}
    raise ValueError(f"{path}: rope scaling {kind!r} (factor {factor!r}) is not supported; "
                     f"only none and linear are read from GGUF.")


def _decimal(value) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not
    9.999999747378752e-06), as the model's config.json wrote it before conversion."""
    return float(str(np.float32(value)))


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."
