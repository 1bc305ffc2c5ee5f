"""Masked token cross-entropy with optional label smoothing (pure JAX)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_losses(
    logits: jax.Array, targets: jax.Array, mask: jax.Array, *, label_smoothing: float = 0.0
) -> dict[str, jax.Array]:
    """Summed token losses over the real (mask=True) positions.

    logits:  [batch, len, vocab] float32 (any float dtype; computed in float32).
    targets: [batch, len] int32.
    mask:    [batch, len] bool, True at positions that count.
    label_smoothing: ε; the training target is (1 - ε) one-hot + ε uniform over the vocab.

    Returns float32 scalars:
      loss_sum:    Σ smoothed cross-entropy (what training minimises, divided by num_tokens)
      nll_sum:     Σ -log p(target) (perplexity = exp(nll_sum / num_tokens))
      correct_sum: Σ [argmax = target]
      num_tokens:  Σ mask
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    mask = mask.astype(bool)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    smooth = -jnp.mean(log_probs, axis=-1)
    loss = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    correct = (jnp.argmax(log_probs, axis=-1) == targets).astype(jnp.float32)
    # where, not multiply: a non-finite value at a padding position must not leak (0 * inf).
    masked_sum = lambda x: jnp.sum(jnp.where(mask, x, 0.0))  # noqa: E731
    return {
        "loss_sum": masked_sum(loss),
        "nll_sum": masked_sum(nll),
        "correct_sum": masked_sum(correct),
        "num_tokens": jnp.sum(mask.astype(jnp.float32)),
    }


def lm_nll_sums(model, batch: dict) -> dict[str, jax.Array]:
    """{"nll_sum", "count"} of a decoder-only ``model`` at E[γ] = 0 (its evaluation step).

    batch: {"inputs", "targets": int32 [b, L], "mask": bool [b] (real rows) or [b, L]
    (real tokens)}.
    """
    logits, _ = model(batch["inputs"], train=False)
    mask = batch["mask"] if batch["mask"].ndim == 2 else batch["mask"][:, None]
    sums = token_losses(logits, batch["targets"], jnp.broadcast_to(mask, batch["targets"].shape))
    return {"nll_sum": sums["nll_sum"], "count": sums["num_tokens"]}
