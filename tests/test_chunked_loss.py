"""bdia_jax.chunked_loss: the tied head and loss over sequence chunks, and where it is used."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_only import compile_for_memory
from flax import nnx
from float_bounds import assert_within, cross_entropy_bound, matmul_bound, sum_bound
from grad_utils import assert_grads_close

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


def mean_loss_bound(logits, logit_err) -> float:
    """Bound on one float32 evaluation's error of the mean token cross-entropy of
    ``logits`` ([..., vocab], each logit within ``logit_err``): the tokens' own errors
    (float_bounds.cross_entropy_bound), their sum, and the division by the count."""
    z = np.asarray(logits, np.float64)
    per_token = cross_entropy_bound(z, logit_err)
    losses = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    n = per_token.size
    return sum_bound(losses, per_token) / n + 2**-24 * float(np.abs(losses).mean())


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
    assert_within(loss, want_loss, 2 * mean_loss_bound(hidden @ embedding.T,
                                                        matmul_bound(hidden, embedding.T)))
    # Gradients: (softmax - one-hot) @ embedding and its transpose against the hidden
    # states; each element ends a chain of the forward's contractions (width 32, vocab 64
    # sums) and the backward's (vocab 64, tokens 32), with exp/log roundings: within that
    # many u of its leaf's scale (grad_utils.assert_grads_close), twice for two evaluations.
    assert_grads_close(grads, want_grads, rtol=2 * (32 + 64 + 64 + 32 + 2 * 16) * 2.0**-24)
    # The correct-prediction counts agree but for tokens whose target logit is within the two
    # evaluations' rounding (2 matmul_bound) of the best other logit (none, typically).
    z, b = hidden @ embedding.T, 2 * matmul_bound(hidden, embedding.T).max(-1)
    target_z = np.take_along_axis(z, targets[..., None], -1)[..., 0]
    others = np.where(np.arange(z.shape[-1]) == targets[..., None], -np.inf, z).max(-1)
    near_ties = int(np.sum(np.abs(target_z - others) <= 2 * b))
    assert abs(float(sums["correct_sum"]) - float(want["correct_sum"])) <= near_ties
    assert float(sums["num_tokens"]) == 32.0


@pytest.mark.parametrize("chunk", [0, 5, 2.0, True])
def test_chunk_that_does_not_divide_the_sequence_fails_in_one_line(chunk):
    hidden, embedding, targets = head_inputs(1, 16, 8, 16)
    with pytest.raises(ValueError, match="^chunk must be a positive int dividing the sequence "
                                         "length 16, got .*; pick a divisor of 16.$"):
        chunked_cross_entropy(hidden, embedding, targets, chunk=chunk)


def temp_bytes(loss, *args):
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return compile_for_memory(grad.lower(*args)).memory_analysis().temp_size_in_bytes


def test_chunked_loss_never_holds_the_full_logits():
    # A size where the logits [batch, seq, vocab] dwarf the hidden states [batch, seq, width].
    hidden, embedding, targets = head_inputs(2, 256, 32, 4096)
    logits_bytes = 2 * 256 * 4096 * 4
    full = temp_bytes(lambda h, e: full_cross_entropy(h, e, targets), hidden, embedding)
    chunked = temp_bytes(lambda h, e: chunked_cross_entropy(h, e, targets, chunk=16),
                         hidden, embedding)
    assert full >= logits_bytes  # the reference does hold them: the check can fail
    assert chunked < logits_bytes / 2 and chunked < full / 2, (chunked, full)


def test_chunked_loss_logits_do_not_grow_with_the_batch():
    # Chunks are of tokens of the batch laid end to end: one chunk's logits [chunk, vocab],
    # not [batch, chunk, vocab] (which, at a large batch and vocabulary, set the peak of
    # the Llama-1B train step, docs/max_context.md). Batch 16 may add the larger hidden
    # states and their gradient, not one more chunk's logits.
    chunk, vocab = 16, 4096
    temps = {}
    for batch in (1, 16):
        hidden, embedding, targets = head_inputs(batch, 64, 32, vocab)
        temps[batch] = temp_bytes(lambda h, e, t=targets: chunked_cross_entropy(
            h, e, t, chunk=chunk), hidden, embedding)
    batch_logits = 16 * chunk * vocab * 4
    assert temps[16] < batch_logits / 2, temps  # positions-only chunks hold two of them
    assert temps[16] - temps[1] < chunk * vocab * 4, temps


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
    # The same hidden states (one program) through two head matmuls: each within
    # matmul_bound of exact; the losses add the cross-entropy's own rounding.
    head_err = matmul_bound(hidden, embedding.T)
    assert_within(hidden @ embedding.T, logits, 2 * head_err, "logits")
    loss_tol = 2 * mean_loss_bound(logits, head_err)
    assert_within(chunked[0], full[0], loss_tol, "loss")
    metrics, want_metrics = dict(chunked[1]), dict(full[1])
    # Accuracy: only a token whose top two logits lie within the head's rounding may flip.
    top2 = np.sort(np.asarray(logits, np.float64), -1)[..., -2:]
    close = np.sum(top2[..., 1] - top2[..., 0] <= 2 * head_err.max(-1))
    assert abs(float(metrics.pop("accuracy")) - float(want_metrics.pop("accuracy"))) <= \
        close / top2[..., 0].size
    chex.assert_trees_all_equal(metrics, want_metrics)  # the stack's aux: the same program
    assert_within(max_batch_chunked, max_batch_full, loss_tol, "max_batch chunked")
    assert_within(max_batch_full, full[0], loss_tol, "max_batch")


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
