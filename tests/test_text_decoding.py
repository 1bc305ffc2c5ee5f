"""Greedy and beam search against brute force on a toy stateful 'model'."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.text import decoding

BOS, EOS, VOCAB = 2, 3, 5
MAX_LEN = 4
STATES = 4  # tokens 1 and 4 differ mod 4, so hypotheses carry different states


def toy_table(seed: int) -> np.ndarray:
    """log p(next | last token, running state) for a toy model: [VOCAB, STATES, VOCAB]."""
    logits = np.random.default_rng(seed).normal(size=(VOCAB, STATES, VOCAB)) * 2.0
    logits[..., [0, 2]] = -1e9  # never PAD or BOS
    return np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1))


def make_step(table):
    """step_fn whose state (a per-row counter, the sum of fed tokens mod STATES) must be
    reordered correctly for the scores to come out right."""
    table = jnp.asarray(table)

    def step_fn(state, tokens, pos):
        del pos
        state = (state + tokens) % STATES
        return table[tokens, state], state

    def reorder_fn(state, rows):
        return state[rows]

    return step_fn, reorder_fn


def brute_force_best(table, alpha):
    """Best EOS-terminated sequence of length <= MAX_LEN by normalized score."""
    best, best_score = None, -np.inf
    for n in range(1, MAX_LEN + 1):
        for body in itertools.product([1, 4], repeat=n - 1):  # non-special tokens
            seq = (*body, EOS)
            last, state, logp = BOS, 0, 0.0
            for t in seq:
                state = (state + last) % STATES
                logp += float(table[last, state, t])
                last = t
            score = logp / float(decoding.length_penalty(n, alpha))
            if score > best_score:
                best, best_score = seq, score
    return best, best_score


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_wide_beam_search_is_exact(seed, alpha):
    table = toy_table(seed)
    step_fn, reorder_fn = make_step(table)
    beam = 2 ** (MAX_LEN - 1)  # wide enough to keep every hypothesis alive (tokens 1 and 4)
    batch = 2
    tokens, scores = jax.jit(
        lambda s: decoding.beam_search(
            step_fn,
            reorder_fn,
            s,
            batch_size=batch,
            beam_size=beam,
            max_len=MAX_LEN,
            bos_id=BOS,
            eos_id=EOS,
            alpha=alpha,
        )
    )(jnp.zeros((batch * beam,), jnp.int32))
    want, want_score = brute_force_best(table, alpha)
    for row in range(batch):
        got = decoding.strip_after_eos(tokens[row : row + 1], EOS)[0]
        assert tuple(got) + (EOS,) == want
        np.testing.assert_allclose(float(scores[row]), want_score, rtol=1e-5)


def test_greedy_matches_a_host_loop_and_pads_after_eos():
    for seed in range(6):
        table = toy_table(seed)
        step_fn, _ = make_step(table)
        out = jax.jit(
            lambda s, step_fn=step_fn: decoding.greedy_search(
                step_fn, s, batch_size=1, max_len=6, bos_id=BOS, eos_id=EOS
            )
        )(jnp.zeros((1,), jnp.int32))
        last, state, want = BOS, 0, []
        for _ in range(6):
            state = (state + last) % STATES
            last = int(np.argmax(table[last, state]))
            want.append(last)
            if last == EOS:
                break
        want += [0] * (6 - len(want))
        assert out[0].tolist() == want


def test_beam_of_one_example_rows_are_independent():
    """Rows of different examples must not mix: different start states per example."""
    table = toy_table(3)
    step_fn, reorder_fn = make_step(table)
    beam = 3
    start = jnp.repeat(jnp.asarray([0, 1, 2], jnp.int32), beam)
    tokens, scores = decoding.beam_search(
        step_fn,
        reorder_fn,
        start,
        batch_size=3,
        beam_size=beam,
        max_len=5,
        bos_id=BOS,
        eos_id=EOS,
    )
    for example in range(3):
        alone, alone_score = decoding.beam_search(
            step_fn,
            reorder_fn,
            jnp.full((beam,), example, jnp.int32),
            batch_size=1,
            beam_size=beam,
            max_len=5,
            bos_id=BOS,
            eos_id=EOS,
        )
        assert tokens[example].tolist() == alone[0].tolist()
        assert float(scores[example]) == float(alone_score[0])


def test_strip_after_eos():
    assert decoding.strip_after_eos(
        np.asarray([[5, 6, 3, 0], [7, 0, 0, 0], [8, 9, 10, 11]]), 3
    ) == [
        [5, 6],
        [7],
        [8, 9, 10, 11],
    ]
