"""bdia_jax.chunked_loss: the tied head and loss over sequence chunks, and where it is used."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bdia_jax.chunked_loss import chunked_cross_entropy, chunked_token_losses
from bdia_jax.models import GPT, gpt_config
from benchmarks import max_batch, registry
from experiments import lm
from experiments.common.config import ConfigError
from experiments.configs.lm import get_config
from experiments.data.text.losses import token_losses


def full_cross_entropy(hidden, embedding, targets):
    """The reference: the whole [batch, seq, vocab] logits, then the mean loss."""
    sums = token_losses(hidden @ embedding.T, targets, jnp.ones(targets.shape, bool))
    return sums["loss_sum"] / sums["num_tokens"]


def head_inputs(batch, seq, width, vocab):
    """Random hidden states, embedding and targets (NumPy: no eager JAX ops to compile)."""
    rng = np.random.default_rng(0)
    return (rng.standard_normal((batch, seq, width), np.float32),
            (0.3 * rng.standard_normal((vocab, width))).astype(np.float32),
            rng.integers(0, vocab, (batch, seq), np.int32))


def test_chunked_loss_and_gradients_match_the_full_logits():
    hidden, embedding, targets = head_inputs(2, 16, 32, 64)

    @jax.jit  # one compile for both losses, their gradients and the sums
    def both(hidden, embedding, targets):
        chunked = jax.value_and_grad(lambda h, e: chunked_cross_entropy(h, e, targets, chunk=4),
                                     argnums=(0, 1))(hidden, embedding)
        full = jax.value_and_grad(lambda h, e: full_cross_entropy(h, e, targets),
                                  argnums=(0, 1))(hidden, embedding)
        sums = (chunked_token_losses(hidden, embedding, targets, chunk=4),
                token_losses(hidden @ embedding.T, targets, jnp.ones(targets.shape, bool)))
        return chunked, full, sums

    (loss, grads), (want_loss, want_grads), (sums, want) = both(hidden, embedding, targets)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    chex.assert_trees_all_close(grads, want_grads, rtol=1e-5, atol=1e-7)
    assert float(sums["correct_sum"]) == float(want["correct_sum"])
    assert float(sums["num_tokens"]) == 32.0


@pytest.mark.parametrize("chunk", [0, 5, 2.0, True])
def test_chunk_that_does_not_divide_the_sequence_fails_in_one_line(chunk):
    hidden, embedding, targets = head_inputs(1, 16, 8, 16)
    with pytest.raises(ValueError, match="^chunk must be a positive int dividing the sequence "
                                         "length 16, got .*; pick a divisor of 16.$"):
        chunked_cross_entropy(hidden, embedding, targets, chunk=chunk)


def temp_bytes(loss, *args):
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunked_loss_never_holds_the_full_logits():
    # A size where the logits [batch, seq, vocab] dwarf the hidden states [batch, seq, width].
    hidden, embedding, targets = head_inputs(2, 256, 32, 4096)
    logits_bytes = 2 * 256 * 4096 * 4
    full = temp_bytes(lambda h, e: full_cross_entropy(h, e, targets), hidden, embedding)
    chunked = temp_bytes(lambda h, e: chunked_cross_entropy(h, e, targets, chunk=16),
                         hidden, embedding)
    assert full >= logits_bytes  # the reference does hold them: the check can fail
    assert chunked < logits_bytes / 2 and chunked < full / 2, (chunked, full)


def tiny_gpt_state():
    """(graphdef, random float32 parameters) of a tiny standard GPT. NumPy fills the
    parameters: compiling the random initialisation would cost more than the test."""
    config = gpt_config("tiny", depth=1, update="standard")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(2)
    return graphdef, jax.tree.map(
        lambda s: (0.3 * rng.standard_normal(s.shape)).astype(s.dtype), state)


def test_gpt_hidden_states_and_the_chunked_lm_and_max_batch_losses():
    graphdef, state = tiny_gpt_state()
    tokens = np.random.default_rng(1).integers(0, 32, (2, 17), np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    config = get_config("tiny")
    full_loss_fn = lm.TASK.loss_fn(config)
    config.train.loss_chunk = 4
    chunked_loss_fn = lm.TASK.loss_fn(config)

    @jax.jit  # one compile: op-by-op dispatch of the model is the slow part on CPU
    def outputs(state):
        model = nnx.merge(graphdef, state)
        return (model(batch["inputs"])[0], model.hidden_states(batch["inputs"])[0],
                model.head_embedding, full_loss_fn(model, batch, None),
                chunked_loss_fn(model, batch, None), registry.gpt_loss(model, tokens, None)[0],
                registry.gpt_loss(model, tokens, None, loss_chunk=8)[0])

    logits, hidden, embedding, full, chunked, max_batch_full, max_batch_chunked = outputs(state)
    assert hidden.shape == (2, 16, 32) and hidden.dtype == jnp.float32
    np.testing.assert_allclose(hidden @ embedding.T, logits, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(chunked, full, rtol=1e-6)  # (loss, metrics)
    np.testing.assert_allclose(max_batch_chunked, max_batch_full, rtol=1e-6)
    np.testing.assert_allclose(max_batch_full, full[0], rtol=1e-6)


class _FakeMesh:
    """Stands in for a one-device mesh (validation reads only its sizes)."""
    shape, size = {"data": 1, "fsdp": 1}, 1


@pytest.mark.parametrize("value,fragment", [
    (-1, "must be an int >= 0, got -1"),
    (5, "must be a positive int dividing the sequence length 16, got 5 "
        "(model.max_len; 0: full logits)"),
])
def test_lm_loss_chunk_field_is_validated(value, fragment):
    config = get_config("tiny")
    lm.validate_config(config, _FakeMesh())  # the default (0) is valid
    config.train.loss_chunk = value
    with pytest.raises(ConfigError) as info:
        lm.validate_config(config, _FakeMesh())
    lines = str(info.value).splitlines()
    assert len(lines) == 2 and lines[1] == f"  --config.train.loss_chunk: {fragment}", lines


def test_max_batch_loss_chunk_must_divide_the_context(capsys):
    assert max_batch.parse_args(["--small", "--loss_chunk", "16"]).loss_chunk == 16
    with pytest.raises(SystemExit):
        max_batch.parse_args(["--small", "--loss_chunk", "48"])
    assert ("--loss_chunk must be a positive int dividing the sequence length 64, got 48 "
            "(--context; 0: full logits).") in (
        capsys.readouterr().err)
