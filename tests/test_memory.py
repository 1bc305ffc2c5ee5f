"""Activation memory of the compiled gradient step (deterministic: read from the compiled
program, not timed). Reversible BDIA keeps ~m bits per element per block; remat keeps 32."""

import jax
import jax.numpy as jnp
import pytest
from compile_only import compile_for_memory

from bdia_jax.testing import init_attn_mlp, make_attn_mlp_block
from benchmarks.memory_benchmark import make_step, mixed_slope
from experiments.common.memory import compiled_memory

# Big enough per sample (8192 elements: 1 KiB of side bits per block) that the signal
# dominates the few KiB by which XLA's buffer assignment varies between programs.
SEQ, DIM, HIDDEN, HEADS = 64, 128, 256, 4
DEPTHS, BATCHES = [24, 48], [4, 8]


def _peak(jitted, *args):
    """Compiled peak bytes of ``jitted`` on (abstract) ``args``; never run."""
    return compiled_memory(compile_for_memory(jitted.lower(*args)))["peak_estimate_bytes"]


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
            row.append(_peak(step, params, x, key))
        totals.append(row)
    return mixed_slope(DEPTHS, BATCHES, totals) * 8 / (SEQ * DIM)


@pytest.mark.parametrize("gamma,side_bits", [(0.5, 1), (0.25, 2)])
def test_reversible_keeps_only_side_bits(gamma, side_bits):
    bits = _bits_per_element_per_block("bdia", "reversible", gamma)
    assert side_bits * 0.9 <= bits <= side_bits * 1.1, bits


def test_remat_keeps_one_float32_state_per_block():
    bits = _bits_per_element_per_block("bdia", "remat", 0.5)
    assert 31 <= bits <= 40, bits


def test_reversible_backward_costs_few_streams_beyond_one_block():
    """Per sample, the reversible step's compiled peak exceeds that of one block's forward +
    VJP compiled alone by a few stream-sized buffers: the input x, its quantized x_0 (the
    probe's reference), the backward loop's four stream buffers (of which the block alone
    has two, its input and cotangent) and the side bits. Measured: 6.2 streams at 71089d8,
    8.2 before it, where XLA copied the stream that a lax.cond branch passed through and
    γ_{k+1} dL/dx_{k+2} lived beside dL/dx_{k+2}. One more copy fails the bound."""
    batches = (8, 16)
    block = make_attn_mlp_block(heads=HEADS)
    params = jax.eval_shape(lambda k: init_attn_mlp(k, 6, DIM, HIDDEN), jax.random.PRNGKey(1))
    block_params = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype),
                                          params)
    key = jax.random.PRNGKey(0)
    step = make_step("bdia", "reversible", block, 0.5, 9, recompute="shared", probe=True)
    block_vjp = jax.jit(lambda p, x, g, key: jax.vjp(
        lambda p, x: block(p, x, None, key), p, x)[1](g))

    def streams_per_sample(jitted, args_of_x):
        peaks = [_peak(jitted, *args_of_x(jax.ShapeDtypeStruct((batch, SEQ, DIM), jnp.float32)))
                 for batch in batches]
        return (peaks[1] - peaks[0]) / (batches[1] - batches[0]) / (SEQ * DIM * 4)

    stack = streams_per_sample(
        step, lambda x: (params, x, key, jax.ShapeDtypeStruct((), jnp.float32)))
    one_block = streams_per_sample(block_vjp, lambda x: (block_params, x, x, key))
    assert stack - one_block <= 6.5, (stack, one_block)
