"""Tied-head cross-entropy over sequence chunks, never holding the full logits (pure JAX).

A language model's head and loss keep the float32 logits [batch, seq, vocab] and their
gradient; with a large vocabulary that can be most of a reversible model's memory. Here the
head (hidden @ embeddingᵀ) and the loss run in a ``jax.lax.scan`` over chunks of ``chunk``
tokens of the batch's sequences laid end to end ([batch · seq], sample-major; ``chunk``
divides seq, so a chunk never spans two samples), each chunk's body under
``jax.checkpoint``: the forward pass keeps only the running sums, and the backward pass
recomputes one chunk's logits at a time. Neither pass holds more than [chunk, vocab]
logits, whatever the batch (chunks of ``chunk`` positions across the whole batch would hold
[batch, chunk, vocab]: at a large batch and vocabulary those set the train step's peak).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chunk_problem(chunk, seq: int) -> str | None:
    """What is wrong with ``chunk`` positions per chunk of a ``seq``-long sequence, or None:
    the one statement of the rule, for callers that report problems instead of raising."""
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
    """Summed next-token losses of the tied head, computed ``chunk`` tokens at a time.

    Equals the unchunked sums over logits = hidden @ embeddingᵀ (float32),
    Σ -log_softmax(logits)[target] and Σ [argmax(logits) = target], up to float rounding
    (the sums are taken chunk by chunk), and so do its gradients.

    Args:
      hidden: [batch, seq, width] float, the final normalized hidden states (``GPT``'s
        ``hidden_states``); the head is computed in float32.
      embedding: [vocab, width] float, the tied token embedding.
      targets: [batch, seq] int, the token each position predicts.
      chunk: tokens per chunk (of the [batch · seq] tokens, sample-major); a positive int
        dividing seq.

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
    num_chunks = batch * seq // chunk
    # [num_chunks, chunk, ...]: chunk i holds tokens i·chunk ... of the flattened batch, a
    # reshape (no copy), and scan slices one chunk per step.
    hidden_chunks = hidden.reshape(num_chunks, chunk, width)
    target_chunks = targets.reshape(num_chunks, chunk)

    @jax.checkpoint  # the backward pass recomputes this chunk's logits instead of keeping them
    def chunk_sums(embedding, hidden_chunk, target_chunk):
        logits = jnp.dot(hidden_chunk.astype(jnp.float32),
                         embedding.astype(jnp.float32).T)  # [chunk, vocab]
        # logsumexp - target logit: no [chunk, vocab] log-probabilities to keep.
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
