"""Bit-exact round trips of the fixed-point forward/inverse pairs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdia_jax import fixed_point
from bdia_jax.testing import assert_bits_equal


def _grid(key, shape, frac_bits, scale):
    return fixed_point.quantize(jax.random.normal(key, shape) * scale, frac_bits)


def test_quantize_is_round_half_even_on_grid():
    delta = 2.0**-9
    v = jnp.array([0.5, 1.5, 2.5, -0.5, -1.5, 0.49, 3.0]) * delta
    want = jnp.array([0.0, 2.0, 2.0, 0.0, -2.0, 0.0, 3.0]) * delta  # zero is always +0.0
    assert_bits_equal(fixed_point.quantize(v, 9), want)


def test_quantize_ste_same_bits_identity_gradient():
    v = jax.random.normal(jax.random.PRNGKey(0), (64,)) * 10
    chex.assert_trees_all_equal(fixed_point.quantize_ste(v, 9), fixed_point.quantize(v, 9))
    g = jax.grad(lambda v: jnp.sum(fixed_point.quantize_ste(v, 9) * 3.0))(v)
    chex.assert_trees_all_equal(g, jnp.full_like(v, 3.0))


@pytest.mark.parametrize("side_bits", [1, 2, 3])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_split_join_side_bits_round_trip(side_bits, scale):
    x = _grid(jax.random.PRNGKey(1), (4, 7, 5), 9, scale)
    coarse, s = fixed_point.split_side_bits(x, 9, side_bits)
    # coarse is a multiple of 2**side_bits grid steps; s in [0, 2**side_bits).
    n = np.asarray(coarse) * 2.0**9
    np.testing.assert_array_equal(np.mod(n, 2**side_bits), 0)
    assert np.all((np.asarray(s) >= 0) & (np.asarray(s) < 2**side_bits))
    assert_bits_equal(fixed_point.join_side_bits(coarse, s, 9), x)


@pytest.mark.parametrize("side_bits", [1, 2, 4])
@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 6), (1, 1), (5, 17, 3)])
def test_pack_unpack_side_bits_round_trip(side_bits, shape):
    s = jax.random.randint(jax.random.PRNGKey(2), shape, 0, 2**side_bits).astype(jnp.float32)
    packed = fixed_point.pack_side_bits(s, side_bits)
    n = int(np.prod(shape[1:]))
    assert packed.dtype == jnp.uint8
    assert packed.shape == (shape[0], side_bits, -(-n // 8))  # exactly side_bits bits/element
    chex.assert_trees_all_equal(fixed_point.unpack_side_bits(packed, shape, jnp.float32), s)


def test_exact_range_and_dtype_errors():
    assert fixed_point.exact_range(jnp.float32, 9) == 2.0**15
    with pytest.raises(ValueError, match="float32 or float64"):
        fixed_point.exact_range(jnp.bfloat16, 9)


def test_frac_bits_limit_per_stream_dtype():
    fixed_point.check_frac_bits(20, jnp.float32)
    fixed_point.check_frac_bits(48, jnp.float64)
    with pytest.raises(ValueError, match=r"out of range for a float32 stream: use 0\.\.20"):
        fixed_point.check_frac_bits(21, jnp.float32)
    with pytest.raises(ValueError, match=r"use 0\.\.48"):
        fixed_point.check_frac_bits(49, jnp.float64)
    with pytest.raises(ValueError, match="out of range"):
        fixed_point.check_frac_bits(-1, jnp.float32)
    with pytest.raises(ValueError, match="float32 or float64"):
        fixed_point.check_frac_bits(9, jnp.bfloat16)
