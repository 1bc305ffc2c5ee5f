"""Pretrained GPT-2 checkpoints in, and out, in the Hugging Face layout.

A checkpoint is a folder with ``config.json`` and ``model.safetensors``, as
``transformers``' ``GPT2LMHeadModel.save_pretrained`` writes it (tensor names with or without
the ``transformer.`` prefix). ``load_gpt2`` builds a ``bdia_jax.models.GPT`` that is GPT-2
exactly (LayerNorm ε from the config, tanh GELU, biases, tied embeddings, learned positions)
with any update/backprop method, so a model pretrained the standard way can be fine-tuned
with BDIA and exact reversible backpropagation. ``save_gpt2`` writes the same layout back.

Tensor correspondence (HF GPT-2 uses Conv1D, whose weight is [in, out] like nnx.Linear's
kernel; our block parameters are stacked on a leading [depth] axis):

  wte.weight [vocab, width]                 token_embed.embedding (also the tied head)
  wpe.weight [n_positions, width]           pos_embed
  h.{i}.ln_1.{weight,bias}                  stack.blocks.ln1.{scale,bias}[i]
  h.{i}.attn.c_attn.{weight,bias} [.., 3w]  stack.blocks.attn.{query,key,value}.{kernel,bias}[i]
  h.{i}.attn.c_proj.{weight,bias}           stack.blocks.attn.out.{kernel,bias}[i]
  h.{i}.ln_2.{weight,bias}                  stack.blocks.ln2.{scale,bias}[i]
  h.{i}.mlp.c_fc.{weight,bias}              stack.blocks.mlp.fc1.{kernel,bias}[i]
  h.{i}.mlp.c_proj.{weight,bias}            stack.blocks.mlp.fc2.{kernel,bias}[i]
  ln_f.{weight,bias}                        norm.{scale,bias}

The buffers ``h.{i}.attn.bias`` / ``h.{i}.attn.masked_bias`` of older checkpoints are
ignored; an ``lm_head.weight`` must equal ``wte.weight`` (GPT-2 ties them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import tempfile

import jax.numpy as jnp
import numpy as np
from flax import nnx

try:
    import safetensors
    import safetensors.numpy
except ImportError as error:  # the optional extra
    raise ImportError("bdia_jax.pretrained reads safetensors checkpoints: "
                      "pip install 'bdia_jax[checkpoints]'.") from error

from bdia_jax.methods import method_overrides
from bdia_jax.models import GPT, GPTConfig, ReversalProbe

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREFIX = "transformer."

# HF activation_function → GPTConfig.approximate_gelu.
_ACTIVATIONS = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True, "gelu": False}
# config.json keys GPT2Config defaults when absent (transformers' GPT2Config.__init__).
_HF_DEFAULTS = dict(n_inner=None, activation_function="gelu_new", resid_pdrop=0.1,
                    embd_pdrop=0.1, attn_pdrop=0.1, layer_norm_epsilon=1e-5)
# config.json switches whose other values are a different model than ours.
_HF_REQUIRED = dict(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                    add_cross_attention=False, tie_word_embeddings=True)
_HF_SIZES = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
# GPTConfig fields that the checkpoint fixes.
ARCHITECTURE_FIELDS = ("vocab_size", "max_len", "width", "depth", "num_heads", "mlp_dim",
                        "layer_norm_eps", "approximate_gelu")
# Method settings load_gpt2 accepts besides GPTConfig's fields (objects, or the flat
# keywords of bdia_jax.method_from_flat).
_METHOD_KEYWORDS = ("update", "backprop", "gamma", "frac_bits", "quantize_at_inference",
                    "recompute", "probe")

_TOP = ((("token_embed", "embedding"), "wte.weight"), (("pos_embed",), "wpe.weight"),
        (("norm", "scale"), "ln_f.weight"), (("norm", "bias"), "ln_f.bias"))
# (path under stack.blocks, name under h.{i}., which third of c_attn's last axis or None)
_BLOCK = (
    (("ln1", "scale"), "ln_1.weight", None),
    (("ln1", "bias"), "ln_1.bias", None),
    (("attn", "query", "kernel"), "attn.c_attn.weight", 0),
    (("attn", "key", "kernel"), "attn.c_attn.weight", 1),
    (("attn", "value", "kernel"), "attn.c_attn.weight", 2),
    (("attn", "query", "bias"), "attn.c_attn.bias", 0),
    (("attn", "key", "bias"), "attn.c_attn.bias", 1),
    (("attn", "value", "bias"), "attn.c_attn.bias", 2),
    (("attn", "out", "kernel"), "attn.c_proj.weight", None),
    (("attn", "out", "bias"), "attn.c_proj.bias", None),
    (("ln2", "scale"), "ln_2.weight", None),
    (("ln2", "bias"), "ln_2.bias", None),
    (("mlp", "fc1", "kernel"), "mlp.c_fc.weight", None),
    (("mlp", "fc1", "bias"), "mlp.c_fc.bias", None),
    (("mlp", "fc2", "kernel"), "mlp.c_proj.weight", None),
    (("mlp", "fc2", "bias"), "mlp.c_proj.bias", None),
)
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
_FLOAT_DTYPES = ("F16", "BF16", "F32")


# ---------------------------------------------------------------------------------- config
def _gpt_config(hf: dict, source: str, overrides: dict) -> GPTConfig:
    """config.json (dict) + overrides → GPTConfig, or a one-line ValueError."""
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{source}: model_type {hf.get('model_type')!r} is not supported; "
                         f"load_gpt2 reads GPT-2 checkpoints (model_type 'gpt2').")
    missing = [k for k in _HF_SIZES if k not in hf]
    if missing:
        raise ValueError(f"{source}: config.json lacks {missing}; a GPT-2 config.json names "
                         f"{list(_HF_SIZES)}.")
    hf = {**_HF_DEFAULTS, **hf}
    for key, want in _HF_REQUIRED.items():
        if hf.get(key, want) != want:
            raise ValueError(f"{source}: {key}={hf[key]!r} is not supported (GPT-2 has "
                             f"{key}={want!r}).")
    approximate = _ACTIVATIONS.get(hf["activation_function"])
    if approximate is None:
        raise ValueError(f"{source}: activation_function {hf['activation_function']!r} is not "
                         f"supported; use one of {sorted(_ACTIVATIONS)}.")
    width = hf["n_embd"]
    fields = dict(
        vocab_size=hf["vocab_size"], max_len=hf["n_positions"], width=width,
        depth=hf["n_layer"], num_heads=hf["n_head"], mlp_dim=hf["n_inner"] or 4 * width,
        layer_norm_eps=float(hf["layer_norm_epsilon"]), approximate_gelu=approximate,
        dropout=float(hf["resid_pdrop"]), attention_dropout=float(hf["attn_pdrop"]),
    )
    valid = {f.name for f in dataclasses.fields(GPTConfig)} | set(_METHOD_KEYWORDS)
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown load_gpt2 overrides {unknown}; valid: {sorted(valid)}.")
    for name in ARCHITECTURE_FIELDS:
        if name in overrides and overrides[name] != fields[name]:
            raise ValueError(f"{name}={overrides[name]!r} conflicts with the checkpoint's "
                             f"{fields[name]!r} ({source}); drop the override.")
    if hf["embd_pdrop"] != hf["resid_pdrop"] and "dropout" not in overrides:
        raise ValueError(f"{source}: embd_pdrop={hf['embd_pdrop']} differs from resid_pdrop="
                         f"{hf['resid_pdrop']}, and GPTConfig has one dropout for both; pass "
                         f"dropout=... to load_gpt2.")
    return GPTConfig(**method_overrides({**fields, **overrides}))


def _hf_config(config: GPTConfig) -> dict:
    """GPTConfig → the config.json of the same GPT-2 (GPT2LMHeadModel)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.max_len,
        "n_ctx": config.max_len,
        "n_embd": config.width,
        "n_layer": config.depth,
        "n_head": config.num_heads,
        "n_inner": config.mlp_dim,
        "activation_function": "gelu_new" if config.approximate_gelu else "gelu",
        "layer_norm_epsilon": config.layer_norm_eps,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.attention_dropout,
        **_HF_REQUIRED,
        "torch_dtype": "float32",
    }


# ---------------------------------------------------------------------------------- tensors
def _expected_shapes(params_flat: dict, depth: int) -> dict[str, tuple]:
    """HF tensor name (unprefixed) → shape, from our (abstract) parameter shapes."""
    shapes = {hf: tuple(params_flat[ours].shape) for ours, hf in _TOP}
    for ours, hf, third in _BLOCK:
        shape = params_flat[("stack", "blocks", *ours)].shape[1:]
        if third is not None:
            shape = (*shape[:-1], 3 * shape[-1])
        for i in range(depth):
            shapes[f"h.{i}.{hf}"] = tuple(shape)
    return shapes


def _describe(shape) -> str:
    return "[" + ", ".join(str(n) for n in shape) + "]"


def _read_tensors(file: pathlib.Path, expected: dict[str, tuple], vocab_size: int) -> dict:
    """Check every tensor's name, shape and dtype from the file header, then read them all.

    Returns {unprefixed HF name: float32 np.ndarray}; raises a one-line ValueError naming the
    first misfit tensor and its expected shape before any tensor data is read.
    """
    with safetensors.safe_open(str(file), framework="numpy") as f:
        names = list(f.keys())
        header = {n: (tuple(f.get_slice(n).get_shape()), f.get_slice(n).get_dtype())
                  for n in names}
    by_short: dict[str, str] = {}
    problems = []
    for name in sorted(names):
        short = name[len(PREFIX):] if name.startswith(PREFIX) else name
        if _BUFFER.fullmatch(short):
            continue
        if short in by_short:
            problems.append(f"tensor {short!r} appears twice ({by_short[short]!r} and "
                            f"{name!r})")
        by_short[short] = name
    prefix = PREFIX if any(n.startswith(PREFIX) for n in by_short.values()) else ""
    for short, name in by_short.items():
        shape, dtype = header[name]
        want = (vocab_size, expected["wte.weight"][1]) if short == "lm_head.weight" else \
            expected.get(short)
        if want is None:
            problems.append(f"unexpected tensor {name!r} {_describe(shape)}; a GPT-2 "
                            f"checkpoint holds only the GPT2LMHeadModel parameters")
        elif shape != want:
            vocab_rows = short in ("wte.weight", "lm_head.weight") and shape[:1] != want[:1]
            hint = f" (vocab_size mismatch: config.json says {vocab_size})" if vocab_rows else ""
            problems.append(f"tensor {name!r} has shape {_describe(shape)}, expected "
                            f"{_describe(want)}{hint}")
        elif dtype not in _FLOAT_DTYPES:
            problems.append(f"tensor {name!r} has dtype {dtype}, expected one of "
                            f"{_FLOAT_DTYPES}")
    for short in expected:
        if short not in by_short:
            problems.append(f"missing tensor {prefix + short!r} (expected shape "
                            f"{_describe(expected[short])})")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"{file}: {problems[0]}{more}; the checkpoint does not fit its "
                         f"config.json as a GPT-2.")
    # framework="flax" reads every float dtype (numpy has no bfloat16); the cast to float32
    # is exact for F16/BF16.
    with safetensors.safe_open(str(file), framework="flax") as f:
        tensors = {short: np.asarray(f.get_tensor(name), np.float32)
                   for short, name in by_short.items()}
    lm_head = tensors.pop("lm_head.weight", None)
    if lm_head is not None and not np.array_equal(lm_head, tensors["wte.weight"]):
        raise ValueError(f"{file}: lm_head.weight differs from wte.weight; bdia_jax's GPT "
                         f"ties the output head to the token embedding as GPT-2 does.")
    return tensors


def _to_params(tensors: dict, depth: int) -> dict[tuple, np.ndarray]:
    """{HF name: array} → {our Param path: array} (layers stacked, c_attn split in thirds)."""
    params = {ours: tensors[hf] for ours, hf in _TOP}
    for ours, hf, third in _BLOCK:
        layers = [tensors[f"h.{i}.{hf}"] for i in range(depth)]
        if third is not None:
            layers = [np.split(t, 3, axis=-1)[third] for t in layers]
        params[("stack", "blocks", *ours)] = np.stack(layers)
    return params


def _to_tensors(params: dict[tuple, np.ndarray], depth: int) -> dict[str, np.ndarray]:
    """The inverse of ``_to_params``: {our Param path: array} → {HF name: array}."""
    tensors = {hf: params[ours] for ours, hf in _TOP}
    for ours, hf, third in _BLOCK:
        stacked = params[("stack", "blocks", *ours)]
        for i in range(depth):
            name = f"h.{i}.{hf}"
            if third is None:
                tensors[name] = stacked[i]
            else:
                tensors.setdefault(name, [None] * 3)[third] = stacked[i]
    return {name: np.ascontiguousarray(np.concatenate(t, axis=-1) if isinstance(t, list) else t)
            for name, t in tensors.items()}


# ---------------------------------------------------------------------------------- public
def load_gpt2(path, **overrides) -> GPT:
    """A ``bdia_jax.models.GPT`` with the weights of a GPT-2 checkpoint.

    Args:
      path: a folder with ``config.json`` and ``model.safetensors`` in the Hugging Face
        layout (``save_pretrained`` of GPT2LMHeadModel or GPT2Model, or ``save_gpt2``).
      **overrides: GPTConfig fields that the checkpoint does not fix, such as ``dropout``,
        ``attention_dropout`` (default: the config's resid_pdrop / attn_pdrop) and
        ``compute_dtype``, and the training method: objects
        (``update=bdia_jax.BDIA(...)``, ``backprop=bdia_jax.Reversible(...)``) or the flat
        keywords ``update``, ``backprop``, ``gamma``, ``frac_bits``,
        ``quantize_at_inference``, ``recompute``, ``probe``. Unset: GPTConfig's defaults.

    Returns:
      the GPT, float32 parameters; ``model(tokens, train=False)`` with ``update="standard"``
      (or BDIA with ``quantize_at_inference=False``) computes GPT-2's logits.

    Raises:
      FileNotFoundError: the folder or one of its two files is missing.
      ValueError (one line, naming the tensor and its expected shape): a checkpoint that does
        not fit; nothing is built then.
    """
    folder = pathlib.Path(path)
    config = read_gpt2_config(folder, **overrides)
    weights_file = folder / WEIGHTS_FILE
    abstract = nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    params_flat = dict(nnx.to_flat_state(params))
    tensors = _read_tensors(weights_file, _expected_shapes(params_flat, config.depth),
                            config.vocab_size)
    arrays = _to_params(tensors, config.depth)
    params = nnx.from_flat_state(
        [(p, var.replace(jnp.asarray(arrays[p]))) for p, var in params_flat.items()])
    others = []
    for p, var in nnx.to_flat_state(rest):
        if not isinstance(var, ReversalProbe):
            raise TypeError(f"load_gpt2 does not know how to initialise {type(var).__name__} "
                            f"at {p}; extend bdia_jax.pretrained.load_gpt2.")
        value = var.get_value()
        others.append((p, var.replace(jnp.zeros(value.shape, value.dtype))))  # as GPT.__init__
    return nnx.merge(graphdef, params, nnx.from_flat_state(others))


def read_gpt2_config(path, **overrides) -> GPTConfig:
    """The ``GPTConfig`` of a GPT-2 checkpoint folder's config.json, with ``overrides`` (as
    ``load_gpt2``); reads no weights. Raises FileNotFoundError when the folder lacks
    config.json or model.safetensors, ValueError (one line) for a config it cannot load."""
    folder = pathlib.Path(path)
    config_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for file in (config_file, weights_file):
        if not file.is_file():
            hint = " (only safetensors checkpoints are read: save_pretrained(..., " \
                "safe_serialization=True) writes one)" if file is weights_file else ""
            raise FileNotFoundError(f"no {file.name} in {folder}: a GPT-2 checkpoint folder "
                                    f"holds {CONFIG_FILE} and {WEIGHTS_FILE}{hint}.")
    return _gpt_config(json.loads(config_file.read_text()), str(config_file), overrides)


def save_gpt2(model: GPT, path, *, bos_token_id: int | None = None,
              eos_token_id: int | None = None) -> None:
    """Write ``model`` as a GPT-2 checkpoint folder (config.json + model.safetensors).

    Tensor names carry the ``transformer.`` prefix and the file the ``{"format": "pt"}``
    metadata, as ``GPT2LMHeadModel.save_pretrained`` writes them, so ``transformers`` and
    ``load_gpt2`` read it back; ``load_gpt2`` gives the same parameter bits. Only the
    architecture and dropout rates go into config.json, not the training method.
    bos_token_id, eos_token_id: the tokenizer's ids, written to config.json when given
    (GPT-2's own: 50256, its <|endoftext|>); the model does not know them.
    Existing files of that name in the folder are replaced (each written atomically).
    """
    if not isinstance(model, GPT):
        raise TypeError(f"save_gpt2 writes a bdia_jax.models.GPT, got {type(model).__name__}.")
    config = model.config
    folder = pathlib.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    params = {p: np.asarray(v.get_value(), np.float32)
              for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    tensors = {PREFIX + name: t for name, t in _to_tensors(params, config.depth).items()}
    _write_atomically(folder / WEIGHTS_FILE, lambda tmp: safetensors.numpy.save_file(
        tensors, tmp, metadata={"format": "pt"}))
    hf = _hf_config(config)
    for name, token in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)):
        if token is not None:
            if not (isinstance(token, int) and 0 <= token < config.vocab_size):
                raise ValueError(f"{name} must be an int in [0, {config.vocab_size}), got "
                                 f"{token!r}.")
            hf[name] = token
    text = json.dumps(hf, indent=2) + "\n"
    _write_atomically(folder / CONFIG_FILE, lambda tmp: pathlib.Path(tmp).write_text(text))


def _write_atomically(target: pathlib.Path, write) -> None:
    """``write(tmp_path)`` next to target, then rename over it (no half-written file)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
