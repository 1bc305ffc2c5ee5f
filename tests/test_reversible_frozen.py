"""The reversible backward pass differentiates only what the loss differentiates: with a
frozen base (LoRA, ``trainable=nnx.LoRAParam``) it carries no gradient buffer for the base
weights, and the adapters' gradients keep the bits of differentiating every parameter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from compile_only import compile_for_memory
from flax import nnx

from bdia_jax.methods import BDIA, Reversible
from bdia_jax.models import DecoderLM, LoRA, ReversalProbe, decoder_config, with_lora
from bdia_jax.testing import assert_bits_equal
from experiments.common.memory import compiled_memory

BATCH = 2


def _model(**overrides):
    m = DecoderLM(decoder_config("llama-tiny", update=BDIA(gamma=0.5),
                                 backprop=Reversible(recompute="shared"), dropout=0.125,
                                 **overrides), rngs=nnx.Rngs(0))
    m = with_lora(m, LoRA(rank=2, targets=("q", "v", "down")), rngs=nnx.Rngs(1))
    graphdef, lora, rest = nnx.split(m, nnx.LoRAParam, ...)  # nonzero B, as after training
    keys = iter(jax.random.split(jax.random.key(7), 64))
    lora = jax.tree_util.tree_map(lambda v: 0.1 * jax.random.normal(next(keys), v.shape), lora)
    return nnx.merge(graphdef, lora, rest)


def _grad_fn(m, differentiate_base: bool = False):
    """(jitted gradient of the LM loss w.r.t. the adapters and the reversal probes, its
    arguments but the tokens). ``differentiate_base``: the base weights are differentiated
    too (the stack then accumulates their gradients) and their gradients dropped."""
    graphdef, lora, probes, base, other = nnx.split(m, nnx.LoRAParam, ReversalProbe,
                                                    nnx.Param, ...)

    def loss(lora, probes, base, other, tokens):
        model = nnx.merge(graphdef, lora, probes, base, other)
        logits, _ = model(tokens[:, :-1], key=jax.random.key(3), train=True)
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

    argnums = (0, 1, 2) if differentiate_base else (0, 1)
    grad = jax.jit(lambda *args: jax.grad(loss, argnums)(*args)[:2])
    return grad, (lora, probes, base, other)


def test_adapter_gradients_keep_their_bits_when_the_base_is_frozen():
    """The adapters' gradients (and the exact reversal) are those of the same program that
    also accumulates the base weights' gradients in the backward loop."""
    m = _model()
    tokens = jax.random.randint(jax.random.key(1), (BATCH, 9), 0, 32, jnp.int32)
    (frozen, args), (accumulated, _) = _grad_fn(m), _grad_fn(m, differentiate_base=True)
    (g_lora, probe), (want, want_probe) = frozen(*args, tokens), accumulated(*args, tokens)
    assert_bits_equal((g_lora, probe), (want, want_probe))
    assert all(float(p) == 0.0 for p in jax.tree_util.tree_leaves(probe))
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree_util.tree_leaves(g_lora))


def test_frozen_base_has_no_gradient_buffer_in_the_reversible_backward():
    """Compiled temporaries of the adapters' gradient: less than half the stacked block
    weights (a zero-filled [depth, ...] gradient buffer of the base would be all of them;
    at depth 6 XLA keeps one)."""
    m = _model(width=256, mlp_dim=1024, num_heads=4, num_kv_heads=2, depth=6)
    grad_lora, args = _grad_fn(m)
    tokens = jax.ShapeDtypeStruct((BATCH, 9), jnp.int32)
    temp = compiled_memory(compile_for_memory(grad_lora.lower(*args, tokens)))["temp_bytes"]
    base = nnx.state(m.stack.blocks, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    base_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(base))
    assert temp < base_bytes // 2, (temp, base_bytes)
