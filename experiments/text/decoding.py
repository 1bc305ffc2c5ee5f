"""Greedy and beam-search decoding over an incremental (KV-cached) step function (pure JAX).

The model side is abstracted as

    step_fn(state, tokens, pos) -> (log_probs, state)
      state:     any pytree (e.g. a KV cache) holding ``rows`` decoding rows
      tokens:    int32 [rows], the token at position ``pos`` of every row (BOS at pos 0)
      pos:       int32 scalar, the decoder position being fed
      log_probs: float32 [rows, vocab], log p(next token | tokens up to pos)

and, for beam search, ``reorder_fn(state, rows_index) -> state`` which gathers decoding rows
(int32 [rows] indices into the current rows). Both functions are traced inside a
``lax.while_loop``, so everything here can be jitted.

Outputs are int32 [batch, max_len] token arrays: the generated tokens (not BOS), EOS
included when produced, PAD_ID after it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from experiments.text.tokenizer import PAD_ID

StepFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]
ReorderFn = Callable[[Any, jax.Array], Any]

_NEG_INF = -jnp.inf


def greedy_search(
    step_fn: StepFn, state, *, batch_size: int, max_len: int, bos_id: int, eos_id: int
) -> jax.Array:
    """Argmax decoding. Returns int32 [batch_size, max_len] (see module docstring).

    Stops early once every row has produced EOS.
    """

    def cond(carry):
        pos, _, _, done, _ = carry
        return (pos < max_len) & ~jnp.all(done)

    def body(carry):
        pos, last, state, done, out = carry
        log_probs, state = step_fn(state, last, pos)
        token = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
        token = jnp.where(done, PAD_ID, token)
        out = out.at[:, pos].set(token)
        return pos + 1, token, state, done | (token == eos_id), out

    carry = (
        jnp.zeros((), jnp.int32),
        jnp.full((batch_size,), bos_id, jnp.int32),
        state,
        jnp.zeros((batch_size,), bool),
        jnp.full((batch_size, max_len), PAD_ID, jnp.int32),
    )
    return jax.lax.while_loop(cond, body, carry)[-1]


def length_penalty(length: jax.Array, alpha: float) -> jax.Array:
    """GNMT length penalty ((5 + length) / 6) ** alpha (1.0 for alpha = 0)."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def beam_search(
    step_fn: StepFn,
    reorder_fn: ReorderFn,
    state,
    *,
    batch_size: int,
    beam_size: int,
    max_len: int,
    bos_id: int,
    eos_id: int,
    alpha: float = 0.6,
) -> tuple[jax.Array, jax.Array]:
    """Beam search with separate alive and finished hypotheses (as in tensor2tensor).

    ``state`` holds batch_size * beam_size rows, row b * beam_size + k being beam k of
    example b (repeat every example's encoder output beam_size times). A hypothesis that
    emits EOS leaves the beam and is scored log p / length_penalty(its length, alpha); the
    alive beam always keeps beam_size non-finished hypotheses. The search stops when no
    alive hypothesis can still beat an example's best finished one, or at max_len; an
    example with no finished hypothesis then returns its best alive one.

    Returns (tokens int32 [batch_size, max_len], scores float32 [batch_size]).
    """
    b, k = batch_size, beam_size
    rows = b * k
    max_penalty = length_penalty(max_len, alpha)

    def cond(carry):
        pos, alive_logp, fin_score = carry[0], carry[2], carry[5]
        # log p only falls as a hypothesis grows, so alive/penalty(max_len) bounds its score.
        bound = alive_logp[:, 0] / max_penalty
        return (pos < max_len) & ~jnp.all(fin_score[:, 0] >= bound)

    def body(carry):
        pos, alive_seq, alive_logp, last, state, fin_score, fin_seq = carry
        log_probs, state = step_fn(state, last.reshape(rows), pos)
        vocab = log_probs.shape[-1]
        candidates = (alive_logp[:, :, None] + log_probs.reshape(b, k, vocab)).reshape(b, -1)
        # 2k candidates always hold >= k non-EOS ones (each beam has one EOS extension).
        scores, flat = jax.lax.top_k(candidates, 2 * k)
        origin, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        seqs = jnp.take_along_axis(alive_seq, origin[:, :, None], axis=1)
        seqs = seqs.at[:, :, pos].set(token)
        is_eos = token == eos_id

        alive_scores, pick = jax.lax.top_k(jnp.where(is_eos, _NEG_INF, scores), k)
        take = lambda x: jnp.take_along_axis(x, pick, axis=1)  # noqa: E731
        new_alive_seq = jnp.take_along_axis(seqs, pick[:, :, None], axis=1)
        new_last = take(token)
        rows_index = (jnp.arange(b)[:, None] * k + take(origin)).reshape(rows)
        state = reorder_fn(state, rows_index.astype(jnp.int32))

        finished_now = jnp.where(is_eos, scores / length_penalty(pos + 1, alpha), _NEG_INF)
        all_scores = jnp.concatenate([fin_score, finished_now], axis=1)
        all_seqs = jnp.concatenate([fin_seq, seqs], axis=1)
        fin_score, keep = jax.lax.top_k(all_scores, k)
        fin_seq = jnp.take_along_axis(all_seqs, keep[:, :, None], axis=1)
        return pos + 1, new_alive_seq, alive_scores, new_last, state, fin_score, fin_seq

    alive_logp = jnp.full((b, k), _NEG_INF, jnp.float32).at[:, 0].set(0.0)
    carry = (
        jnp.zeros((), jnp.int32),
        jnp.full((b, k, max_len), PAD_ID, jnp.int32),
        alive_logp,
        jnp.full((b, k), bos_id, jnp.int32),
        state,
        jnp.full((b, k), _NEG_INF, jnp.float32),
        jnp.full((b, k, max_len), PAD_ID, jnp.int32),
    )
    _, alive_seq, alive_logp, _, _, fin_score, fin_seq = jax.lax.while_loop(cond, body, carry)
    has_finished = fin_score[:, 0] > _NEG_INF
    tokens = jnp.where(has_finished[:, None], fin_seq[:, 0], alive_seq[:, 0])
    scores = jnp.where(has_finished, fin_score[:, 0], alive_logp[:, 0] / max_penalty)
    return tokens, scores


def strip_after_eos(tokens, eos_id: int) -> list[list[int]]:
    """Host side: int [batch, len] decoder output -> per-row id lists without EOS/padding."""
    out = []
    for row in jax.device_get(tokens).tolist():
        ids = []
        for t in row:
            if t == eos_id or t == PAD_ID:
                break
            ids.append(int(t))
        out.append(ids)
    return out
