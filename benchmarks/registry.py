"""What the benchmarks measure, in one place: the gradient methods, the models with their
losses and batches, the optimizer, and the train step (``bdia_jax.training``'s, the one the
experiments train with).

The method settings are the experiments' own: ``experiments/configs/common.py``'s
``methods.standard`` and ``methods.bdia`` entries (BDIA: γ = ±½, l = 9,
``recompute="fused"``), so a benchmark measures what the experiments train.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bdia_jax import training
from bdia_jax.models import (
    GPT,
    RevViT,
    Seq2SeqTransformer,
    ViT,
    gpt_config,
    revvit_config,
    seq2seq_config,
    vit_config,
)
from experiments.common.memory import compiled_memory
from experiments.configs.common import base_config


def experiment_method(name: str) -> dict:
    """The flat method keywords of ``methods.<name>`` in the experiments' shared config."""
    return dict(base_config().methods[name])


# The models' gradient methods: name -> (label, flat method keywords of the *_config helpers).
METHODS = {
    "autodiff": ("standard, autodiff", experiment_method("standard")),
    "remat": ("standard, per-block remat", {**experiment_method("standard"),
                                            "backprop": "remat"}),
    "bdia": ("BDIA, reversible", experiment_method("bdia")),
}

# The engine-level stack methods of memory_benchmark / sharding_memory: name -> (label,
# update, backprop, recompute of the reversible backward pass).
STACK_METHODS = {
    "standard": ("conventional transformer, autodiff", "standard", "autodiff", None),
    "standard_remat": ("conventional transformer, per-block remat", "standard", "remat", None),
    "bdia_autodiff": ("BDIA, autodiff (oracle)", "bdia", "autodiff", None),
    "bdia_remat": ("BDIA, per-block remat", "bdia", "remat", None),
    "bdia_reversible": ("BDIA, reversible, recompute=separate", "bdia", "reversible",
                        "separate"),
    "bdia_reversible_shared": ("BDIA, reversible, recompute=shared", "bdia", "reversible",
                               "shared"),
}


def optimizer() -> optax.GradientTransformation:
    """The benchmarks' optimizer: AdamW, lr 3e-4, weight decay 0.1 (two moments per
    parameter, like the experiments' AdamW)."""
    return optax.adamw(3e-4, weight_decay=0.1)


def method_list(text: str, choices, option: str) -> list[str]:
    """The methods named in ``text``, comma-separated ("" for none), each one of
    ``choices``; a one-line ValueError naming ``option`` otherwise. For the benchmarks'
    per-method options, e.g. ``--unchunked_mlp bdia`` (step_anatomy, max_context)."""
    names = [m for m in text.split(",") if m]
    if not set(names) <= set(choices):
        raise ValueError(f"{option} takes methods of {tuple(choices)}, got {text!r}")
    return names


def add_stack_size_args(parser) -> None:
    """--seq, --dim, --hidden, --heads of the engine-level attention+MLP stack
    (``bdia_jax.testing.make_attn_mlp_block``) on an argparse parser."""
    parser.add_argument("--seq", type=int, default=64, help="tokens per sample")
    parser.add_argument("--dim", type=int, default=128, help="model width")
    parser.add_argument("--hidden", type=int, default=256, help="MLP hidden width")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")


# ------------------------------------------------------------------------------ models


def _health(aux) -> dict:
    # The stream's health flags: the step holds an update on overflow / non-finite values.
    return {name: aux[name] for name in ("overflow", "nonfinite") if name in aux}


def vit_loss(model, batch, key):
    """batch {"images" [b, H, W, C] float32, "labels" [b] int32}: mean cross-entropy."""
    logits, aux = model(batch["images"], key=key, train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    return loss, _health(aux)


def gpt_loss(model, tokens, key, loss_chunk: int = 0):
    """Next-token cross-entropy of ``tokens`` [batch, context+1] int32; the tied head and
    the loss over chunks of ``loss_chunk`` tokens when it is > 0
    (``bdia_jax.chunked_loss``)."""
    from bdia_jax.chunked_loss import chunked_cross_entropy

    if loss_chunk:
        hidden, aux = model.hidden_states(tokens[:, :-1], key=key, train=True)
        loss = chunked_cross_entropy(hidden, model.head_embedding, tokens[:, 1:],
                                     chunk=loss_chunk)
        return loss, _health(aux)
    logits, aux = model(tokens[:, :-1], key=key, train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return loss, _health(aux)


def seq2seq_loss(model, batch, key):
    """batch {"src" [b, S] int32, "tgt" [b, T+1] int32}: teacher-forced cross-entropy."""
    logits, aux = model(batch["src"], batch["tgt"][:, :-1], key=key, train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["tgt"][:, 1:]).mean()
    return loss, _health(aux)


MODEL_KINDS = {  # kind: (model class, config factory, loss_fn(model, batch, key))
    "vit": (ViT, vit_config, vit_loss),
    "revvit": (RevViT, revvit_config, vit_loss),
    "gpt": (GPT, gpt_config, gpt_loss),
    "seq2seq": (Seq2SeqTransformer, seq2seq_config, seq2seq_loss),
}


def make_batch(kind: str, config, batch: int, lengths: tuple[int, int] = (48, 40)):
    """Random inputs of the training shape: ViT/RevViT {"images" [b, H, W, C] float32,
    "labels" [b] int32}; GPT tokens [b, max_len+1] int32; encoder-decoder {"src" [b, S]
    int32 with padded tails, "tgt" [b, T+1] int32 starting with BOS}, (S, T) = lengths."""
    k1, k2 = jax.random.split(jax.random.key(1))
    if kind in ("vit", "revvit"):
        size = (batch, config.image_size, config.image_size, config.channels)
        return {"images": jax.random.normal(k1, size, jnp.float32),
                "labels": jax.random.randint(k2, (batch,), 0, config.num_classes, jnp.int32)}
    if kind == "gpt":
        return jax.random.randint(k1, (batch, config.max_len + 1), 0, config.vocab_size,
                                  jnp.int32)
    src_len, tgt_len = lengths
    src = jax.random.randint(k1, (batch, src_len), 4, config.src_vocab_size, jnp.int32)
    real = jnp.arange(src_len)[None] < src_len - jnp.arange(batch)[:, None] % (src_len // 2)
    src = jnp.where(real, src, config.pad_id)
    tgt = jax.random.randint(k2, (batch, tgt_len + 1), 4, config.tgt_vocab_size, jnp.int32)
    return {"src": src, "tgt": tgt.at[:, 0].set(config.bos_id)}


# -------------------------------------------------------------------------- the train step


def train_step(model: nnx.Module, loss_fn, *, donate: bool = True):
    """``(jitted step, step-0 state)`` of ``model``: ``bdia_jax.training``'s step with the
    benchmarks' optimizer, the state donated when ``donate``. ``step(state, batch) ->
    (state, metrics)``; metrics["reversal_error"] is the summed probe gradient."""
    opt = optimizer()
    graphdef, state = training.init(model, opt, jax.random.PRNGKey(2))
    step = training.make_train_step(graphdef, loss_fn, opt)
    return jax.jit(step, donate_argnums=0 if donate else ()), state


def abstract_train_step(make_model, loss_fn):
    """``(jitted step, abstract step-0 state)`` for compile-only measurements: nothing is
    allocated (``make_model()`` runs under ``jax.eval_shape``)."""
    opt = optimizer()
    graphdef = training.split(nnx.eval_shape(make_model))[0]
    state = jax.eval_shape(lambda: training.init(make_model(), opt, jax.random.PRNGKey(2))[1])
    step = training.make_train_step(graphdef, loss_fn, opt)
    return jax.jit(step, donate_argnums=0), state


def compiled_token_step_memory(step, state, batch: int, context: int) -> tuple[dict, float]:
    """(``compiled_memory`` dict, compile seconds) of a token-LM train step on an abstract
    [batch, context + 1] int32 batch: nothing runs, nothing is allocated."""
    tokens = jax.ShapeDtypeStruct((batch, context + 1), jnp.int32)
    start = time.perf_counter()
    compiled = step.lower(state, tokens).compile()
    seconds = time.perf_counter() - start
    memory = compiled_memory(compiled)
    if memory is None:
        raise RuntimeError("this backend gives no compiled memory_analysis(); run on CPU, "
                           "GPU or TPU with a jaxlib that reports it.")
    return memory, seconds
