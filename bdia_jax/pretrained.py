"""Pretrained checkpoints in, and out: GPT-2 and the Llama family (Llama 3.x, Qwen2, Qwen3,
Mistral, SmolLM2) as ``bdia_jax.models.DecoderLM``, in the Hugging Face layout.

    model = load(path)                      # the checkpoint's own network: Standard(),
                                            # inference, off the grid
    model = load(path, update="bdia", backprop="reversible", recompute="shared")
    save(model, out_dir, dtype="bfloat16")  # config.json + safetensors that transformers reads

``load`` reads the checkpoint with ``bdia_jax.formats.read_checkpoint`` (a Hugging Face
folder: config.json + model.safetensors or sharded safetensors; or a GGUF file), maps its
config.json to a ``DecoderConfig`` (``config_from_hf``) and its tensors to the model's
parameters (``params_from_hf``); ``save`` maps back (``config_to_hf``, ``params_to_hf``)
and writes with ``formats.write_hf_folder``. Anything the model cannot compute exactly as
the checkpoint's own architecture does is refused in one line that names the config key
and value: a silent wrong model is the one outcome never acceptable.

Tensor correspondence (our block parameters are stacked on a leading [depth] axis; HF's
Linear weights are [out, in], nnx kernels [in, out]; GPT-2's Conv1D weights are [in, out]):

  GPT-2 (prefix "transformer.", optional)     Llama family (prefix "model.", optional)
  wte.weight        token_embed.embedding     embed_tokens.weight     token_embed.embedding
  wpe.weight        pos_embed                 layers.{i}.input_layernorm.weight  ln1.scale
  h.{i}.ln_1.*      ln1.{scale,bias}          layers.{i}.self_attn.{q,k,v,o}_proj.{weight,bias}
  h.{i}.attn.c_attn.* (q|k|v)  attn.{query,key,value}.*     attn.{query,key,value,out}.*
  h.{i}.attn.c_proj.*  attn.out.*             layers.{i}.self_attn.{q,k}_norm.weight
  h.{i}.ln_2.*      ln2.*                                   attn.{query,key}_norm.scale
  h.{i}.mlp.c_fc.*  mlp.fc1.*                 layers.{i}.post_attention_layernorm.weight ln2
  h.{i}.mlp.c_proj.*  mlp.fc2.*               layers.{i}.mlp.{gate,up,down}_proj.weight
  ln_f.*            norm.*                                  mlp.{gate,up,down}.kernel
                                              norm.weight  norm.scale
                                              lm_head.weight (untied)  head.kernel

Buffers (GPT-2's ``attn.bias`` / ``attn.masked_bias``, ``rotary_emb.inv_freq``) are
ignored; a tied checkpoint's ``lm_head.weight`` must equal the embedding.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bdia_jax.formats import load_tokenizer as load_tokenizer  # re-export
from bdia_jax.formats import read_checkpoint, write_hf_folder
from bdia_jax.methods import BACKPROP_FIELDS, METHOD_KEYWORDS, UPDATE_FIELDS, Standard, parse_method
from bdia_jax.models import DecoderConfig, DecoderLM, ReversalProbe, with_lora
from bdia_jax.models.lora import PEFT_NAMES

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_TYPES = ("gpt2", "llama", "qwen2", "qwen3", "mistral")
LLAMA_FAMILY = ("llama", "qwen2", "qwen3", "mistral")
# DecoderConfig fields that a checkpoint fixes (an override must equal them). max_len is
# fixed by GPT-2's learned positions only; a rope model may run any context.
ARCHITECTURE_FIELDS = ("vocab_size", "max_len", "width", "depth", "num_heads", "mlp_dim",
                       "layer_norm_eps", "approximate_gelu", "norm", "position", "mlp", "bias",
                       "num_kv_heads", "head_dim", "qk_norm", "tie_embeddings", "rope_theta",
                       "rope_scaling", "rope_factor", "rope_low_freq_factor",
                       "rope_high_freq_factor", "rope_original_max_len")

# ---- GPT-2
# HF activation_function → DecoderConfig.approximate_gelu.
_ACTIVATIONS = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True, "gelu": False}
# config.json keys GPT2Config defaults when absent (transformers' GPT2Config.__init__).
_GPT2_DEFAULTS = dict(n_inner=None, activation_function="gelu_new", resid_pdrop=0.1,
                      embd_pdrop=0.1, attn_pdrop=0.1, layer_norm_epsilon=1e-5)
# config.json switches whose other values are a different model than ours.
_GPT2_REQUIRED = dict(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                      add_cross_attention=False, tie_word_embeddings=True)
_GPT2_SIZES = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")

# ---- Llama family
_LLAMA_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings")
_MOE_KEYS = ("num_experts", "num_local_experts", "moe_intermediate_size",
             "num_experts_per_tok", "n_routed_experts", "decoder_sparse_step")
_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "mistral": "MistralForCausalLM"}


def _refuse(source: str, key: str, value, why: str):
    raise ValueError(f"{source}: {key}={value!r} is not supported: {why}.")


# ---------------------------------------------------------------------------------- config
def config_from_hf(hf: dict, *, source: str = "config.json", **overrides) -> DecoderConfig:
    """A Hugging Face config.json dict (+ overrides) → the ``DecoderConfig`` of the same
    network, or a one-line ValueError naming the key and value it cannot compute exactly.

    overrides: DecoderConfig fields the checkpoint does not fix (dropout, attention_dropout,
    compute_dtype, param_dtype, attention, chunk_size, chunk_mlp, embed_std, and max_len for
    rope models) and the method (objects, or the flat keywords ``update``, ``backprop``,
    ``gamma``, ``frac_bits``, ``quantize_at_inference``, ``recompute``, ``reversal_probe``). No
    ``update``: the checkpoint's own network, ``Standard()`` with ``Autodiff()``.
    """
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        fields = _gpt2_fields(hf, source)
    elif model_type in LLAMA_FAMILY:
        fields = _llama_fields(hf, source)
    else:
        _refuse(source, "model_type", model_type, f"bdia_jax.pretrained reads {MODEL_TYPES}")
    valid = {f.name for f in dataclasses.fields(DecoderConfig)} | set(METHOD_KEYWORDS)
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown load overrides {unknown}; valid: {sorted(valid)}.")
    fixed = [n for n in ARCHITECTURE_FIELDS if n != "max_len" or fields["position"] == "learned"]
    for name in fixed:
        if name in overrides and overrides[name] != fields[name]:
            raise ValueError(f"{name}={overrides[name]!r} conflicts with the checkpoint's "
                             f"{fields[name]!r} ({source}); drop the override.")
    if model_type == "gpt2" and "dropout" not in overrides and \
            hf.get("embd_pdrop", 0.1) != hf.get("resid_pdrop", 0.1):
        raise ValueError(f"{source}: embd_pdrop={hf['embd_pdrop']} differs from resid_pdrop="
                         f"{hf.get('resid_pdrop', 0.1)}, and DecoderConfig has one dropout for "
                         f"both; pass dropout=... to load.")
    if "update" not in overrides:
        flat = sorted(set(overrides) & set(UPDATE_FIELDS + BACKPROP_FIELDS))
        if flat:
            raise ValueError(f"{flat[0]}={overrides[flat[0]]!r} needs a training method: pass "
                             f"update='bdia' (load without update= is the standard network).")
        overrides = {**overrides, "update": Standard()}
    fields = {**fields, **overrides}
    if fields["position"] == "rope":
        _check_window(hf, source, fields["max_len"])
    method = {k: fields.pop(k) for k in METHOD_KEYWORDS if k in fields}
    return DecoderConfig(**fields, **parse_method(**method))


def _gpt2_fields(hf: dict, source: str) -> dict:
    missing = [k for k in _GPT2_SIZES if k not in hf]
    if missing:
        raise ValueError(f"{source}: config.json lacks {missing}; a GPT-2 config.json names "
                         f"{list(_GPT2_SIZES)}.")
    hf = {**_GPT2_DEFAULTS, **hf}
    for key, want in _GPT2_REQUIRED.items():
        if hf.get(key, want) != want:
            _refuse(source, key, hf[key], f"GPT-2 has {key}={want!r}")
    approximate = _ACTIVATIONS.get(hf["activation_function"])
    if approximate is None:
        _refuse(source, "activation_function", hf["activation_function"],
                f"use one of {sorted(_ACTIVATIONS)}")
    width = hf["n_embd"]
    return dict(
        vocab_size=hf["vocab_size"], max_len=hf["n_positions"], width=width,
        depth=hf["n_layer"], num_heads=hf["n_head"], mlp_dim=hf["n_inner"] or 4 * width,
        layer_norm_eps=float(hf["layer_norm_epsilon"]), approximate_gelu=approximate,
        dropout=float(hf["resid_pdrop"]), attention_dropout=float(hf["attn_pdrop"]),
        norm="layernorm", position="learned", mlp="gelu", bias="all", num_kv_heads=None,
        head_dim=None, qk_norm=False, tie_embeddings=True,
        **_rope_fields({}, source, "default", 10000.0),
    )


def _rope_fields(scaling: dict, source: str, rope_type: str, theta: float) -> dict:
    if rope_type not in ("default", "llama3", "linear"):
        _refuse(source, "rope_type", rope_type, "rope types default, llama3 and linear are "
                "computed exactly here")
    fields = dict(rope_theta=float(theta), rope_scaling=rope_type, rope_factor=1.0,
                  rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                  rope_original_max_len=8192)
    if rope_type != "default":
        fields["rope_factor"] = float(scaling["factor"])
    if rope_type == "llama3":
        fields.update(rope_low_freq_factor=float(scaling["low_freq_factor"]),
                      rope_high_freq_factor=float(scaling["high_freq_factor"]),
                      rope_original_max_len=int(scaling["original_max_position_embeddings"]))
    return fields


def _llama_fields(hf: dict, source: str) -> dict:
    model_type = hf["model_type"]
    missing = [k for k in _LLAMA_SIZES if k not in hf]
    if missing:
        raise ValueError(f"{source}: config.json lacks {missing}; a {model_type} config.json "
                         f"names {list(_LLAMA_SIZES)}.")
    for key in _MOE_KEYS:
        if hf.get(key):
            _refuse(source, key, hf[key], "mixture-of-experts models are not supported")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        _refuse(source, "hidden_act", act, "the Llama family's SwiGLU MLP uses silu")
    for key in ("mlp_bias",) + (("attention_bias",) if model_type != "qwen2" else ()):
        if hf.get(key):
            _refuse(source, key, hf[key], f"{model_type} biases on every projection are not "
                    "computed here (Qwen2's q/k/v biases are)")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse(source, "partial_rotary_factor", hf["partial_rotary_factor"],
                "rotary positions on every head dimension only")
    # Rope: transformers 5's rope_parameters, or the older rope_theta + rope_scaling.
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}

    def scaling_of(d):  # the older files name the type "type"
        d = {("rope_type" if k == "type" else k): v for k, v in d.items() if k != "rope_theta"}
        return {k: v for k, v in d.items() if not (k == "rope_type" and v == "default")}

    if params and scaling and scaling_of(params) != scaling_of(scaling):
        _refuse(source, "rope_scaling", scaling, f"it disagrees with rope_parameters={params}")
    scaling = params or scaling
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    theta = scaling.get("rope_theta", hf.get("rope_theta", 10000.0))
    heads = hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or heads
    width = hf["hidden_size"]
    head_dim = hf.get("head_dim") or width // heads
    if hf.get("head_dim") is None and width % heads:
        _refuse(source, "hidden_size", width, f"not a multiple of num_attention_heads={heads} "
                "and no head_dim given")
    return dict(
        vocab_size=hf["vocab_size"], max_len=hf["max_position_embeddings"], width=width,
        depth=hf["num_hidden_layers"], num_heads=heads, mlp_dim=hf["intermediate_size"],
        layer_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), approximate_gelu=True,
        dropout=0.0, attention_dropout=float(hf.get("attention_dropout", 0.0)),
        norm="rmsnorm", position="rope", mlp="swiglu",
        bias="qkv" if model_type == "qwen2" else "none",
        num_kv_heads=None if kv == heads else kv,
        head_dim=None if head_dim * heads == width else head_dim,
        qk_norm=model_type == "qwen3",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **_rope_fields(scaling, source, rope_type, theta),
    )


def _check_window(hf: dict, source: str, max_len: int) -> None:
    """Sliding-window attention differs from full attention only beyond the window."""
    window = hf.get("sliding_window")
    active = bool(window) and (hf["model_type"] == "mistral" or hf.get("use_sliding_window")
                               or "sliding_attention" in (hf.get("layer_types") or ()))
    if active and window < max_len:
        _refuse(source, "sliding_window", window, f"shorter than the context max_len="
                f"{max_len}, and only full attention is computed here; pass max_len="
                f"{window} (or less) to load, where the window covers the whole context")


def config_to_hf(config: DecoderConfig, *, dtype: str = "float32") -> dict:
    """A ``DecoderConfig`` → the config.json of the same network: ``gpt2`` for GPT-2's
    architecture, ``qwen3`` with q/k norm, ``qwen2`` with q/k/v biases, else ``llama``
    (Mistral checkpoints are saved as Llama: the same network without a sliding window).
    Only the architecture and dropout rates, not the training method."""
    c = config
    gpt2 = dict(norm="layernorm", position="learned", mlp="gelu", bias="all",
                tie_embeddings=True, num_kv_heads=None, head_dim=None, qk_norm=False)
    llama = dict(norm="rmsnorm", position="rope", mlp="swiglu")
    if all(getattr(c, k) == v for k, v in gpt2.items()):
        return {
            "architectures": [_ARCHITECTURES["gpt2"]], "model_type": "gpt2",
            "vocab_size": c.vocab_size, "n_positions": c.max_len, "n_ctx": c.max_len,
            "n_embd": c.width, "n_layer": c.depth, "n_head": c.num_heads,
            "n_inner": c.mlp_dim,
            "activation_function": "gelu_new" if c.approximate_gelu else "gelu",
            "layer_norm_epsilon": c.layer_norm_eps, "resid_pdrop": c.dropout,
            "embd_pdrop": c.dropout, "attn_pdrop": c.attention_dropout, **_GPT2_REQUIRED,
            "torch_dtype": dtype,
        }
    odd = [k for k, v in llama.items() if getattr(c, k) != v]
    if odd or (c.bias == "qkv" and c.qk_norm) or c.bias == "all":
        raise ValueError(f"save writes GPT-2 or Llama-family configs; this one mixes them "
                         f"(norm={c.norm!r}, position={c.position!r}, mlp={c.mlp!r}, "
                         f"bias={c.bias!r}, qk_norm={c.qk_norm}).")
    model_type = "qwen3" if c.qk_norm else "qwen2" if c.bias == "qkv" else "llama"
    rope = {"rope_type": c.rope_scaling, "rope_theta": c.rope_theta}
    if c.rope_scaling != "default":
        rope["factor"] = c.rope_factor
    if c.rope_scaling == "llama3":
        rope.update(low_freq_factor=c.rope_low_freq_factor,
                    high_freq_factor=c.rope_high_freq_factor,
                    original_max_position_embeddings=c.rope_original_max_len)
    hf = {
        "architectures": [_ARCHITECTURES[model_type]], "model_type": model_type,
        "vocab_size": c.vocab_size, "hidden_size": c.width,
        "intermediate_size": c.mlp_dim, "num_hidden_layers": c.depth,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_size, "hidden_act": "silu",
        "max_position_embeddings": c.max_len, "rms_norm_eps": c.layer_norm_eps,
        "rope_theta": c.rope_theta, "rope_scaling": None if c.rope_scaling == "default"
        else {k: v for k, v in rope.items() if k != "rope_theta"},
        "rope_parameters": rope, "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": False, "mlp_bias": False,
        "attention_dropout": c.attention_dropout, "torch_dtype": dtype,
    }
    if model_type in ("qwen2", "qwen3"):
        hf.update(use_sliding_window=False, sliding_window=None)
    return hf


# ---------------------------------------------------------------------------------- tensors
class _Entry(NamedTuple):
    ours: tuple  # Param path
    hf: str  # HF name without prefix; "{i}" for the layer index of stacked block params
    kind: str  # "copy" | "T" (transpose) | "q" / "k" / "v" (a third of GPT-2's c_attn)


def _entries(config: DecoderConfig, ours: set) -> list[_Entry]:
    """The correspondence of every parameter of a model of ``config`` (paths ``ours``)."""
    block = ("stack", "blocks")
    if config.position == "learned":  # GPT-2
        out = [_Entry(("token_embed", "embedding"), "wte.weight", "copy"),
               _Entry(("pos_embed",), "wpe.weight", "copy"),
               _Entry(("norm", "scale"), "ln_f.weight", "copy"),
               _Entry(("norm", "bias"), "ln_f.bias", "copy")]
        names = {"ln1": "ln_1", "ln2": "ln_2", ("attn", "out"): "attn.c_proj",
                 ("mlp", "fc1"): "mlp.c_fc", ("mlp", "fc2"): "mlp.c_proj"}
        for path in sorted(p for p in ours if p[:2] == block):
            sub, leaf = path[2:-1], path[-1]
            if sub[:1] == ("attn",) and sub[1] in ("query", "key", "value"):
                hf = f"h.{{i}}.attn.c_attn.{'weight' if leaf == 'kernel' else 'bias'}"
                out.append(_Entry(path, hf, sub[1][0]))
                continue
            name = names[sub[0] if len(sub) == 1 else sub]
            hf_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
            out.append(_Entry(path, f"h.{{i}}.{name}.{hf_leaf}", "copy"))
        return out
    out = [_Entry(("token_embed", "embedding"), "embed_tokens.weight", "copy"),
           _Entry(("norm", "scale"), "norm.weight", "copy")]
    if not config.tie_embeddings:
        out.append(_Entry(("head", "kernel"), "lm_head.weight", "T"))
    names = {("ln1",): "input_layernorm", ("ln2",): "post_attention_layernorm",
             ("attn", "query"): "self_attn.q_proj", ("attn", "key"): "self_attn.k_proj",
             ("attn", "value"): "self_attn.v_proj", ("attn", "out"): "self_attn.o_proj",
             ("attn", "query_norm"): "self_attn.q_norm",
             ("attn", "key_norm"): "self_attn.k_norm", ("mlp", "gate"): "mlp.gate_proj",
             ("mlp", "up"): "mlp.up_proj", ("mlp", "down"): "mlp.down_proj"}
    for path in sorted(p for p in ours if p[:2] == block):
        sub, leaf = path[2:-1], path[-1]
        hf_leaf = "bias" if leaf == "bias" else "weight"
        out.append(_Entry(path, f"layers.{{i}}.{names[sub]}.{hf_leaf}",
                          "T" if leaf == "kernel" else "copy"))
    return out


def _prefix(config: DecoderConfig, name: str) -> str:
    if name == "lm_head.weight":
        return name
    return ("transformer." if config.position == "learned" else "model.") + name


def _hf_shape(shape: tuple, kind: str) -> tuple:
    if kind == "T":
        return tuple(reversed(shape))
    if kind in "qkv":
        return (*shape[:-1], 3 * shape[-1])
    return tuple(shape)


def _describe(shape) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


_BUFFER = re.compile(r"(h\.\d+\.attn\.(bias|masked_bias)|layers\.\d+\.self_attn\.rotary_emb"
                     r"\.inv_freq|rotary_emb\.inv_freq)")


def params_from_hf(tensors: dict, config: DecoderConfig, *, source: str = "checkpoint",
                   shapes: dict | None = None) -> dict[tuple, np.ndarray]:
    """{HF tensor name: array} → {our Param path: array [depth, ...] for block params},
    after checking every name, shape and dtype (one-line ValueError naming the first misfit
    tensor and its expected shape). ``shapes``: {our path: shape} of the model (default: from
    ``config``). Arrays keep the checkpoint's dtype."""
    if shapes is None:
        shapes = _param_shapes(config)
    entries = _entries(config, set(shapes))
    prefix = "transformer." if config.position == "learned" else "model."
    by_short, problems = {}, []
    for name in sorted(tensors):
        short = name[len(prefix):] if name.startswith(prefix) else name
        if _BUFFER.fullmatch(short):
            continue
        if short in by_short:
            problems.append(f"tensor {short!r} appears twice ({by_short[short]!r} and "
                            f"{name!r})")
        by_short[short] = name
    expected = {}
    for e in entries:
        shape = _hf_shape(shapes[e.ours][1:] if "{i}" in e.hf else shapes[e.ours], e.kind)
        for i in range(config.depth) if "{i}" in e.hf else (None,):
            expected[e.hf.format(i=i)] = shape
    head = "lm_head.weight"
    if config.tie_embeddings and head in by_short:
        expected[head] = expected["wte.weight" if config.position == "learned"
                                  else "embed_tokens.weight"]
    for short, name in by_short.items():
        t = tensors[name]
        want = expected.get(short)
        if want is None:
            problems.append(f"unexpected tensor {name!r} {_describe(t.shape)}; the checkpoint "
                            f"holds parameters this model does not have")
        elif tuple(t.shape) != want:
            embedding = short in ("wte.weight", "embed_tokens.weight", head)
            hint = (f" (vocab_size mismatch: config.json says {config.vocab_size})"
                    if embedding and t.shape[:1] != want[:1] else "")
            problems.append(f"tensor {name!r} has shape {_describe(t.shape)}, expected "
                            f"{_describe(want)}{hint}")
        elif not np.issubdtype(np.asarray(t).dtype, np.floating) and \
                str(np.asarray(t).dtype) != "bfloat16":
            problems.append(f"tensor {name!r} has dtype {np.asarray(t).dtype}, expected a "
                            f"float dtype")
    for short in expected:
        if short not in by_short:
            problems.append(f"missing tensor {_prefix(config, short)!r} (expected shape "
                            f"{_describe(expected[short])})")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"{source}: {problems[0]}{more}; the checkpoint does not fit its "
                         f"config.json.")
    get = {short: tensors[name] for short, name in by_short.items()}
    if config.tie_embeddings and head in get:
        embed = get["wte.weight" if config.position == "learned" else "embed_tokens.weight"]
        if not np.array_equal(np.asarray(get[head], np.float32), np.asarray(embed, np.float32)):
            which = "wte.weight" if config.position == "learned" else "embed_tokens.weight"
            raise ValueError(f"{source}: lm_head.weight differs from {which} while the config "
                             f"ties them (tie_word_embeddings); GPT-2 always ties them.")
    params = {}
    for e in entries:
        layers = [get[e.hf.format(i=i)] for i in range(config.depth)] \
            if "{i}" in e.hf else [get[e.hf]]
        layers = [_from_hf(np.asarray(t), e.kind) for t in layers]
        params[e.ours] = np.stack(layers) if "{i}" in e.hf else layers[0]
    return params


def _from_hf(t: np.ndarray, kind: str) -> np.ndarray:
    if kind == "T":
        return t.T
    if kind in "qkv":
        return np.split(t, 3, axis=-1)["qkv".index(kind)]
    return t


def params_to_hf(params: dict[tuple, np.ndarray], config: DecoderConfig) -> dict:
    """The inverse of ``params_from_hf``: {our Param path: array} → {HF name (with the
    ``transformer.`` / ``model.`` prefix): contiguous array}."""
    tensors, thirds = {}, {}
    for e in _entries(config, set(params)):
        value = np.asarray(params[e.ours])
        for i in range(config.depth) if "{i}" in e.hf else (None,):
            t = value[i] if i is not None else value
            name = _prefix(config, e.hf.format(i=i))
            if e.kind in "qkv" and e.kind != "copy":
                thirds.setdefault(name, [None] * 3)["qkv".index(e.kind)] = t
            else:
                tensors[name] = t.T if e.kind == "T" else t
    for name, parts in thirds.items():
        tensors[name] = np.concatenate(parts, axis=-1)
    return {name: np.ascontiguousarray(t) for name, t in tensors.items()}


def _param_shapes(config: DecoderConfig) -> dict[tuple, tuple]:
    abstract = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
    return {p: tuple(v.get_value().shape)
            for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


# ---------------------------------------------------------------------------------- public
def read_config(path, **overrides) -> DecoderConfig:
    """The ``DecoderConfig`` of a checkpoint (with ``overrides``, as ``load``); reads the
    config only where the format allows (a folder's config.json)."""
    folder = pathlib.Path(path)
    if folder.is_dir() and (folder / CONFIG_FILE).is_file():
        hf, source = json.loads((folder / CONFIG_FILE).read_text()), str(folder / CONFIG_FILE)
    else:
        checkpoint = read_checkpoint(path)
        hf, source = checkpoint.config, checkpoint.source
    return config_from_hf(hf, source=source, **overrides)


def load(path, **overrides) -> DecoderLM:
    """A ``bdia_jax.models.DecoderLM`` with the weights of a checkpoint.

    Args:
      path: a Hugging Face folder (config.json + model.safetensors or sharded safetensors;
        float32/float16/bfloat16; model_type gpt2, llama, qwen2, qwen3 or mistral) or a
        .gguf file of architecture llama (with ``bdia_jax.formats``).
      **overrides: see ``config_from_hf``: the method (no ``update``: Standard(), the
        checkpoint's own network at inference, off the grid) and the config fields the
        checkpoint does not fix, e.g. ``param_dtype="bfloat16"`` (default float32: the
        checkpoint's values exactly, whatever its dtype), ``attention="chunked"``,
        ``lora=LoRA(...)`` (fresh adapters drawn from seed 0; ``models.with_lora`` on a
        loaded model picks the seed).

    Returns:
      the model; ``model(tokens, train=False)`` computes the checkpoint's logits.

    Raises:
      ValueError (one line, naming the file, key or tensor): a checkpoint that does not fit
        or that this model cannot compute exactly; nothing is built then.
    """
    checkpoint = read_checkpoint(path)
    config = config_from_hf(checkpoint.config, source=checkpoint.source, **overrides)
    if config.lora is not None:  # the checkpoint's weights, plus fresh adapters (seed 0)
        base = load(path, **{**overrides, "lora": None})
        return with_lora(base, config.lora, rngs=nnx.Rngs(0))
    abstract = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    params_flat = dict(nnx.to_flat_state(params))
    shapes = {p: tuple(v.get_value().shape) for p, v in params_flat.items()}
    arrays = params_from_hf(checkpoint.tensors, config, source=checkpoint.source,
                            shapes=shapes)
    params = nnx.from_flat_state(
        [(p, var.replace(jnp.asarray(arrays[p], var.get_value().dtype)))
         for p, var in params_flat.items()])
    others = []
    for p, var in nnx.to_flat_state(rest):
        if not isinstance(var, ReversalProbe):
            raise TypeError(f"load does not know how to initialise {type(var).__name__} at "
                            f"{p}; extend bdia_jax.pretrained.load.")
        value = var.get_value()
        others.append((p, var.replace(jnp.zeros(value.shape, value.dtype))))  # as __init__
    return nnx.merge(graphdef, params, nnx.from_flat_state(others))


_SAVE_DTYPES = ("float32", "bfloat16", "float16")


def save(model: DecoderLM, path, *, dtype: str | None = None, bos_token_id: int | None = None,
         eos_token_id: int | None = None) -> None:
    """Write ``model`` as a Hugging Face folder (config.json + safetensors) that
    ``transformers`` and ``load`` read; ``load`` gives back the same parameter bits when
    ``dtype`` is the parameters' own.

    dtype: "float32" | "bfloat16" | "float16", or None for the parameters' dtype.
    bos_token_id, eos_token_id: the tokenizer's ids, written to config.json when given.
    Only the architecture and dropout rates go into config.json, not the training method.
    """
    if not isinstance(model, DecoderLM):
        raise TypeError(f"save writes a bdia_jax.models.DecoderLM, got "
                        f"{type(model).__name__}.")
    config = model.config
    if config.lora is not None:
        raise ValueError("save writes a model without adapters: save(merge_lora(model), ...) "
                         "(or save_peft_adapter for the adapters alone).")
    dtype = config.param_dtype if dtype is None else dtype
    if dtype not in _SAVE_DTYPES:
        raise ValueError(f"dtype must be one of {_SAVE_DTYPES} or None, got {dtype!r}.")
    hf = config_to_hf(config, dtype=dtype)
    for name, token in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)):
        if token is not None:
            if not (isinstance(token, int) and 0 <= token < config.vocab_size):
                raise ValueError(f"{name} must be an int in [0, {config.vocab_size}), got "
                                 f"{token!r}.")
            hf[name] = token
    params = {p: np.asarray(jnp.asarray(v.get_value(), dtype))
              for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    tensors = params_to_hf(params, config)
    write_hf_folder(path, hf, tensors)


PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_MODULES = {("attn", "query"): "self_attn.q_proj", ("attn", "key"): "self_attn.k_proj",
                 ("attn", "value"): "self_attn.v_proj", ("attn", "out"): "self_attn.o_proj",
                 ("mlp", "gate"): "mlp.gate_proj", ("mlp", "up"): "mlp.up_proj",
                 ("mlp", "down"): "mlp.down_proj"}


def save_peft_adapter(model: DecoderLM, path, *, base_model_name_or_path: str | None = None
                      ) -> None:
    """Write a LoRA model's adapters in PEFT's layout: ``adapter_config.json`` and
    ``adapter_model.safetensors`` (float32) with PEFT's names
    ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` ([rank, in]) and
    ``...lora_B.weight`` ([out, rank]), which ``peft.PeftModel.from_pretrained`` puts on the
    base model (``save(merge_lora(model)...)`` before training, or the checkpoint it was
    loaded from). Llama family only: GPT-2 fuses q, k, v in one ``c_attn``."""
    import safetensors.numpy

    if not isinstance(model, DecoderLM) or model.config.lora is None:
        raise ValueError("save_peft_adapter needs a DecoderLM with adapters (config.lora set).")
    config, lora = model.config, model.config.lora
    if config.position == "learned":
        raise ValueError("save_peft_adapter writes Llama-family adapters; GPT-2 fuses q, k, v "
                         "in c_attn: save(merge_lora(model), ...) instead.")
    tensors = {}
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        assert p[:2] == ("stack", "blocks"), p  # adapters live in the blocks only
        module, leaf = _PEFT_MODULES[p[2:-1]], {"lora_a": "lora_A", "lora_b": "lora_B"}[p[-1]]
        value = np.asarray(v.get_value(), np.float32)
        for i in range(config.depth):
            name = f"base_model.model.model.layers.{i}.{module}.{leaf}.weight"
            tensors[name] = np.ascontiguousarray(value[i].T)
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank,
        "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": sorted(PEFT_NAMES[t] for t in lora.targets), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False,
        "modules_to_save": None, "init_lora_weights": True,
        "base_model_name_or_path": base_model_name_or_path,
    }
    folder = pathlib.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PEFT_CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n")
    safetensors.numpy.save_file(tensors, str(folder / PEFT_WEIGHTS_FILE),
                                metadata={"format": "pt"})


# ---- the GPT-2 names (thin aliases)
def load_gpt2(path, **overrides) -> DecoderLM:
    """``load`` (any supported checkpoint; the name is kept from the GPT-2-only API)."""
    return load(path, **overrides)


def read_gpt2_config(path, **overrides) -> DecoderConfig:
    """``read_config`` (the name is kept from the GPT-2-only API)."""
    return read_config(path, **overrides)


def save_gpt2(model: DecoderLM, path, *, bos_token_id: int | None = None,
              eos_token_id: int | None = None) -> None:
    """``save`` in the parameters' dtype (the name is kept from the GPT-2-only API)."""
    save(model, path, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
