"""Activation memory of the compiled gradient step (deterministic: read from the compiled
program, not timed). Reversible BDIA keeps ~m bits per element per block; remat keeps 32."""

import jax
import jax.numpy as jnp
import pytest

from bdia_jax.testing import init_attn_mlp, make_attn_mlp_block
from experiments.common.memory import step_memory
from experiments.memory_benchmark import make_step, mixed_slope

# Big enough per sample (8192 elements: 1 KiB of side bits per block) that the signal
# dominates the few KiB by which XLA's buffer assignment varies between programs.
SEQ, DIM, HIDDEN, HEADS = 64, 128, 256, 4
DEPTHS, BATCHES = [24, 48], [4, 8]


def _bits_per_element_per_block(kind, backprop, gamma):
    step = make_step(kind, backprop, make_attn_mlp_block(heads=HEADS), gamma, 9)
    key = jax.random.PRNGKey(0)
    totals = []
    for batch in BATCHES:
        row = []
        for depth in DEPTHS:
            # Only shapes are compiled against: no need to draw the weights.
            params = jax.eval_shape(lambda k, depth=depth: init_attn_mlp(k, depth, DIM, HIDDEN),
                                    jax.random.PRNGKey(1))
            x = jax.ShapeDtypeStruct((batch, SEQ, DIM), jnp.float32)
            row.append(step_memory(step, params, x, key)["peak_estimate_bytes"])
        totals.append(row)
    return mixed_slope(DEPTHS, BATCHES, totals) * 8 / (SEQ * DIM)


@pytest.mark.parametrize("gamma,side_bits", [(0.5, 1), (0.25, 2)])
def test_reversible_keeps_only_side_bits(gamma, side_bits):
    bits = _bits_per_element_per_block("bdia", "reversible", gamma)
    assert side_bits * 0.9 <= bits <= side_bits * 1.1, bits


def test_remat_keeps_one_float32_state_per_block():
    bits = _bits_per_element_per_block("bdia", "remat", 0.5)
    assert 31 <= bits <= 40, bits
