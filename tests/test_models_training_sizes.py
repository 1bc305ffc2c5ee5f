"""The models reverse bit-exactly at training sizes with Reversible(recompute="shared")
(what the experiments use: the models' LayerNorms use bdia_jax.stable for it).

XLA:CPU compiles reductions differently inside a VJP once the arrays are training-sized
(batch >= 64; see bdia_jax/stable.py), which small test shapes never show. Each model here
runs one training step at such a size and its reversal probes must read exactly 0.0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from models_utils import probe_total, train_grads

from bdia_jax import Reversible
from bdia_jax.models import (
    GPT,
    Seq2SeqTransformer,
    ViT,
    gpt_config,
    seq2seq_config,
    vit_config,
)

BATCH = 64  # the smallest batch at which the jnp.mean LayerNorm went inexact on XLA:CPU
SHARED = Reversible(recompute="shared")
SIZE = dict(width=128, num_heads=4, mlp_dim=256, dropout=0.1, attention_dropout=0.1,
            backprop=SHARED)


def _check(model, apply, stacks):
    assert [stack.backprop for stack in stacks] == [SHARED] * len(stacks)
    _, aux, grads, probes = train_grads(model, apply)
    assert not bool(aux["overflow"]) and not bool(aux["nonfinite"])
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree_util.tree_leaves(grads))
    assert probe_total(probes) == 0.0


def test_vit_reverses_exactly_at_a_training_size():
    model = ViT(vit_config("tiny", depth=4, **SIZE), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (BATCH, 32, 32, 3))
    _check(model, lambda m: m(x, key=jax.random.key(2), train=True), [model.stack])


def test_gpt_reverses_exactly_at_a_training_size():
    model = GPT(gpt_config("tiny", depth=4, max_len=64, **SIZE), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (BATCH, 64), 0, 32, jnp.int32)
    _check(model, lambda m: m(tokens, key=jax.random.key(2), train=True), [model.stack])


def test_seq2seq_reverses_exactly_at_a_training_size():
    model = Seq2SeqTransformer(
        seq2seq_config("tiny", encoder_depth=3, decoder_depth=3, max_len=32, **SIZE),
        rngs=nnx.Rngs(0))
    k1, k2 = jax.random.split(jax.random.key(1))
    src = jax.random.randint(k1, (BATCH, 32), 4, 32, jnp.int32)
    src = jnp.where(jnp.arange(32)[None] < 20 + jnp.arange(BATCH)[:, None] % 12, src, 0)
    tgt = jax.random.randint(k2, (BATCH, 24), 4, 32, jnp.int32).at[:, 0].set(2)
    _check(model, lambda m: m(src, tgt, key=jax.random.key(2), train=True),
           [model.encoder, model.decoder])
