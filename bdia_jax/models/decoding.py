"""Greedy and beam-search decoding over an incremental (KV-cached) step function.

The model side is two pure functions, traced inside ``lax.while_loop`` (so all of this
jits):

    step_fn(state, tokens, pos) -> (log_probs, state)
        state:     a pytree holding ``rows`` decoding rows (e.g. a KV cache)
        tokens:    int32 [rows], the token at decoder position ``pos`` (BOS at pos 0)
        log_probs: float32 [rows, vocab], log p(next token | tokens up to pos)
    reorder_fn(state, rows_index) -> state     (beam search: gather rows, int32 [rows])

``Seq2SeqTransformer.decode_step`` / ``reorder_state`` have exactly these signatures.
Outputs are int32 [batch, max_len]: the generated tokens (without BOS), EOS included when
produced, ``pad_id`` after it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

StepFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]
ReorderFn = Callable[[Any, jax.Array], Any]


def length_penalty(length, alpha: float) -> jax.Array:
    """GNMT length penalty ((5 + length) / 6) ** alpha; 1.0 for alpha = 0."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def greedy_search(step_fn: StepFn, state, *, batch_size: int, max_len: int, bos_id: int,
                  eos_id: int, pad_id: int = 0) -> jax.Array:
    """Argmax decoding; stops once every row has produced EOS. Returns int32
    [batch_size, max_len] (see the module docstring)."""

    def cond(carry):
        pos, _, _, done, _ = carry
        return (pos < max_len) & ~jnp.all(done)

    def body(carry):
        pos, last, state, done, out = carry
        log_probs, state = step_fn(state, last, pos)
        token = jnp.where(done, pad_id, jnp.argmax(log_probs, -1).astype(jnp.int32))
        out = jax.lax.dynamic_update_slice(out, token[:, None], (0, pos))
        return pos + 1, token, state, done | (token == eos_id), out

    carry = (jnp.zeros((), jnp.int32), jnp.full((batch_size,), bos_id, jnp.int32), state,
             jnp.zeros((batch_size,), bool), jnp.full((batch_size, max_len), pad_id, jnp.int32))
    return jax.lax.while_loop(cond, body, carry)[-1]


def beam_search(step_fn: StepFn, reorder_fn: ReorderFn, state, *, batch_size: int,
                beam_size: int, max_len: int, bos_id: int, eos_id: int, pad_id: int = 0,
                alpha: float = 0.6) -> tuple[jax.Array, jax.Array]:
    """Beam search with alive and finished hypotheses (the tensor2tensor scheme).

    ``state`` holds batch_size * beam_size rows; row b * beam_size + j is beam j of example
    b (repeat each example's encoder output beam_size times). Each step expands the alive
    beams, keeps the best 2·beam_size candidates (enough to hold beam_size non-EOS ones:
    each beam has one EOS extension), moves EOS candidates to the finished set with score
    log p / length_penalty(length, alpha) and keeps the best beam_size non-EOS candidates
    alive. Stops at max_len or once no alive hypothesis can beat the best finished one
    (log p only falls as a hypothesis grows; needs alpha >= 0). An example without a
    finished hypothesis returns its best alive one, scored at length max_len.

    Returns (tokens int32 [batch_size, max_len], scores float32 [batch_size]).
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0 (the early stop relies on it), got {alpha}.")
    b, k = batch_size, beam_size
    neg_inf = jnp.float32(-jnp.inf)
    best_possible_penalty = length_penalty(max_len, alpha)

    def cond(carry):
        pos, _, alive_logp, _, _, fin_score, _ = carry
        can_improve = alive_logp[:, 0] / best_possible_penalty > fin_score[:, 0]
        return (pos < max_len) & jnp.any(can_improve)

    def body(carry):
        pos, alive_seq, alive_logp, last, state, fin_score, fin_seq = carry
        log_probs, state = step_fn(state, last.reshape(b * k), pos)
        vocab = log_probs.shape[-1]
        total = alive_logp[:, :, None] + log_probs.reshape(b, k, vocab).astype(jnp.float32)
        cand_logp, flat = jax.lax.top_k(total.reshape(b, k * vocab), 2 * k)
        origin, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        cand_seq = jnp.take_along_axis(alive_seq, origin[:, :, None], axis=1)
        cand_seq = jax.lax.dynamic_update_slice(
            cand_seq, token[:, :, None], (0, 0, pos))
        is_eos = token == eos_id

        # Alive: the best k candidates that did not end.
        alive_logp, pick = jax.lax.top_k(jnp.where(is_eos, neg_inf, cand_logp), k)
        alive_seq = jnp.take_along_axis(cand_seq, pick[:, :, None], axis=1)
        last = jnp.take_along_axis(token, pick, axis=1)
        parent = jnp.take_along_axis(origin, pick, axis=1)
        state = reorder_fn(state, (jnp.arange(b)[:, None] * k + parent).reshape(b * k))

        # Finished: merge the candidates that ended here into the best k so far.
        ended = jnp.where(is_eos, cand_logp / length_penalty(pos + 1, alpha), neg_inf)
        fin_score, keep = jax.lax.top_k(jnp.concatenate([fin_score, ended], 1), k)
        fin_seq = jnp.take_along_axis(jnp.concatenate([fin_seq, cand_seq], 1),
                                      keep[:, :, None], axis=1)
        return pos + 1, alive_seq, alive_logp, last, state, fin_score, fin_seq

    carry = (
        jnp.zeros((), jnp.int32),
        jnp.full((b, k, max_len), pad_id, jnp.int32),
        jnp.full((b, k), neg_inf).at[:, 0].set(0.0),  # one live beam at the start
        jnp.full((b, k), bos_id, jnp.int32),
        state,
        jnp.full((b, k), neg_inf),
        jnp.full((b, k, max_len), pad_id, jnp.int32),
    )
    _, alive_seq, alive_logp, _, _, fin_score, fin_seq = jax.lax.while_loop(cond, body, carry)
    has_finished = fin_score[:, 0] > neg_inf
    tokens = jnp.where(has_finished[:, None], fin_seq[:, 0], alive_seq[:, 0])
    scores = jnp.where(has_finished, fin_score[:, 0], alive_logp[:, 0] / best_possible_penalty)
    return tokens, scores
