"""Tied-head cross-entropy over sequence chunks, never holding the full logits (pure JAX).

A language model's head and loss keep the float32 logits [batch, seq, vocab] and their
gradient; with a large vocabulary that can be most of a reversible model's memory. Here the
head (hidden @ embeddingᵀ) and the loss run in a ``jax.lax.scan`` over chunks of ``chunk``
positions, each chunk's body under ``jax.checkpoint``: the forward pass keeps only the
running sums, and the backward pass recomputes one chunk's logits at a time. Neither pass
holds more than [batch, chunk, vocab] logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chunk_problem(chunk, seq: int) -> str | None:
    """What is wrong with ``chunk`` positions per chunk of a ``seq``-long sequence, or None:
    the one statement of the rule (the experiments' config checks report it too)."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1 or seq % chunk:
        return f"must be a positive int dividing the sequence length {seq}, got {chunk!r}"
    return None


def check_chunk(chunk, seq: int) -> None:
    """Raise unless ``chunk`` is a positive int that divides ``seq``."""
    problem = chunk_problem(chunk, seq)
    if problem:
        raise ValueError(f"chunk {problem}; pick a divisor of {seq}.")


def chunked_token_losses(hidden: jax.Array, embedding: jax.Array, targets: jax.Array, *,
                         chunk: int) -> dict[str, jax.Array]:
    """Summed next-token losses of the tied head, computed ``chunk`` positions at a time.

    Equals ``experiments.data.text.losses.token_losses(hidden @ embeddingᵀ, targets, all-True
    mask)`` up to float rounding (the sums are taken chunk by chunk), and so do its
    gradients.

    Args:
      hidden: [batch, seq, width] float, the final normalized hidden states (``GPT``'s
        ``hidden_states``); the head is computed in float32.
      embedding: [vocab, width] float, the tied token embedding.
      targets: [batch, seq] int, the token each position predicts.
      chunk: positions per chunk; a positive int dividing seq.

    Returns float32 scalars:
      loss_sum:    Σ -log p(target) over all positions
      correct_sum: Σ [argmax = target] (no gradient)
      num_tokens:  batch · seq
    """
    batch, seq, width = hidden.shape
    if embedding.ndim != 2 or embedding.shape[1] != width or targets.shape != (batch, seq):
        raise ValueError(f"need hidden [batch, seq, width], embedding [vocab, width], targets "
                         f"[batch, seq]; got {list(hidden.shape)}, {list(embedding.shape)}, "
                         f"{list(targets.shape)}.")
    check_chunk(chunk, seq)
    num_chunks = seq // chunk
    # Chunk-major so scan slices one chunk per step: [num_chunks, batch, chunk, ...].
    hidden_chunks = hidden.reshape(batch, num_chunks, chunk, width).swapaxes(0, 1)
    target_chunks = targets.reshape(batch, num_chunks, chunk).swapaxes(0, 1)

    @jax.checkpoint  # the backward pass recomputes this chunk's logits instead of keeping them
    def chunk_sums(embedding, hidden_chunk, target_chunk):
        logits = jnp.dot(hidden_chunk.astype(jnp.float32),
                         embedding.astype(jnp.float32).T)  # [batch, chunk, vocab]
        # logsumexp - target logit: no [batch, chunk, vocab] log-probabilities to keep.
        target_logits = jnp.take_along_axis(logits, target_chunk[..., None], axis=-1)[..., 0]
        nll = jax.nn.logsumexp(logits, axis=-1) - target_logits
        correct = jax.lax.stop_gradient(jnp.argmax(logits, axis=-1) == target_chunk)
        return jnp.sum(nll), jnp.sum(correct.astype(jnp.float32))

    def step(sums, xs):
        loss, correct = chunk_sums(embedding, *xs)
        return (sums[0] + loss, sums[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    (loss_sum, correct_sum), _ = jax.lax.scan(step, (zero, zero),
                                              (hidden_chunks, target_chunks))
    return {"loss_sum": loss_sum, "correct_sum": correct_sum,
            "num_tokens": jnp.asarray(batch * seq, jnp.float32)}


def chunked_cross_entropy(hidden: jax.Array, embedding: jax.Array, targets: jax.Array, *,
                          chunk: int) -> jax.Array:
    """Mean next-token cross-entropy (float32 scalar, nats) of the tied head; arguments as
    ``chunked_token_losses``."""
    sums = chunked_token_losses(hidden, embedding, targets, chunk=chunk)
    return sums["loss_sum"] / sums["num_tokens"]
