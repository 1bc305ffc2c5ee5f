"""Masked, label-smoothed token cross-entropy."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.data.text.losses import lm_nll_sums, token_losses


def test_token_losses_match_optax_and_respect_the_mask():
    logits = jax.random.normal(jax.random.key(0), (3, 5, 7)) * 3.0
    targets = jax.random.randint(jax.random.key(1), (3, 5), 0, 7)
    mask = jnp.asarray(np.arange(5)[None, :] < np.asarray([5, 2, 0])[:, None])
    out = token_losses(logits, targets, mask, label_smoothing=0.1)
    labels = optax.smooth_labels(jax.nn.one_hot(targets, 7), 0.1)
    want = optax.softmax_cross_entropy(logits, labels)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    m = np.asarray(mask, np.float32)
    np.testing.assert_allclose(out["loss_sum"], np.sum(want * m), rtol=1e-6)
    np.testing.assert_allclose(out["nll_sum"], np.sum(nll * m), rtol=1e-6)
    assert float(out["num_tokens"]) == 7.0
    correct = (np.argmax(logits, -1) == np.asarray(targets)) * m
    assert float(out["correct_sum"]) == correct.sum()
    # Masked positions do not matter at all.
    garbage = logits.at[1, 2:].set(1e4).at[2].set(-1e4)
    assert token_losses(garbage, targets, mask, label_smoothing=0.1)["loss_sum"] == out["loss_sum"]


def test_no_smoothing_loss_is_the_nll():
    logits = jax.random.normal(jax.random.key(2), (2, 4, 9))
    targets = jnp.zeros((2, 4), jnp.int32)
    out = token_losses(logits, targets, jnp.ones((2, 4), bool))
    assert out["loss_sum"] == out["nll_sum"]


def test_lm_nll_sums_reads_a_row_mask_as_its_rows_tokens():
    logits = jax.random.normal(jax.random.key(0), (3, 4, 6))
    targets = jax.random.randint(jax.random.key(1), (3, 4), 0, 6)

    def model(inputs, *, train):
        assert not train  # evaluation: E[γ] = 0
        return logits, {}

    rows = jnp.asarray([True, False, True])
    by_rows = lm_nll_sums(model, {"inputs": targets, "targets": targets, "mask": rows})
    tokens = jnp.broadcast_to(rows[:, None], targets.shape)
    by_tokens = lm_nll_sums(model, {"inputs": targets, "targets": targets, "mask": tokens})
    chex.assert_trees_all_equal(by_rows, by_tokens)
    assert float(by_rows["count"]) == 8.0
    want = token_losses(logits, targets, tokens)["nll_sum"]
    chex.assert_trees_all_equal(by_rows["nll_sum"], want)
