"""The single BDIA update and its inverse are an exact pair (bit for bit)."""

import chex
import jax
import jax.numpy as jnp
import pytest

from bdia_jax import fixed_point
from bdia_jax.step import bdia_combine, bdia_uncombine, broadcast_gamma, noninvertible_step
from bdia_jax.testing import assert_bits_equal


@pytest.mark.parametrize("gamma", [0.5, 0.25])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_step_round_trip_bit_exact(gamma, scale):
    side_bits = {0.5: 1, 0.25: 2}[gamma]
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    shape = (6, 9, 8)
    x_prev = fixed_point.quantize(jax.random.normal(k1, shape) * scale, 9)
    x_cur = fixed_point.quantize(jax.random.normal(k2, shape) * scale, 9)
    h = jax.random.normal(k3, shape) * scale  # arbitrary float, off the grid
    signs = jax.random.bernoulli(k4, 0.5, (shape[0],))
    gamma_b = broadcast_gamma(jnp.where(signs, gamma, -gamma), x_cur)

    x_next, s, _ = bdia_combine(x_prev, x_cur, h, gamma_b, 9, side_bits)
    # x_next stays on the grid, and the inverse gives x_prev back bit for bit.
    chex.assert_trees_all_equal(fixed_point.quantize(x_next, 9), x_next)
    rebuilt = bdia_uncombine(x_cur, x_next, h, s, gamma_b, 9)
    assert_bits_equal(rebuilt, x_prev)


def test_step_loses_information_without_side_bits():
    """The side bits are necessary: dropping them breaks the inverse (so the test above
    checks something real)."""
    x_prev = jnp.array([[3.0, 5.0, -7.0]]) * 2.0**-9  # odd grid multiples
    x_cur = jnp.zeros((1, 3))
    h = jnp.ones((1, 3))
    g = broadcast_gamma(jnp.array([0.5]), x_cur)
    x_next, s, _ = bdia_combine(x_prev, x_cur, h, g, 9, 1)
    rebuilt = bdia_uncombine(x_cur, x_next, h, jnp.zeros_like(s), g, 9)
    assert not bool(jnp.all(rebuilt == x_prev))


@pytest.mark.parametrize("frac_bits", [None, 9])
def test_noninvertible_step_is_the_written_update(frac_bits):
    """x_{k+1} = Q(γ x_{k-1} + (1-γ) x_k + (1+γ) h) for any γ (here 0.6 and 0)."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(5), 3)
    x_prev, x_cur, h = (jax.random.normal(k, (4, 3, 8)) for k in (k1, k2, k3))
    gamma_b = broadcast_gamma(jnp.array([0.6, -0.6, 0.0, 0.6]), x_cur)
    v = gamma_b * x_prev + ((x_cur - gamma_b * x_cur) + (h + gamma_b * h))
    want = v if frac_bits is None else fixed_point.quantize(v, frac_bits)
    assert_bits_equal(noninvertible_step(x_prev, x_cur, h, gamma_b, frac_bits), want)
    # γ = 0 (row 2) on the grid is the Euler step x_k + Q(h) for a grid x_k.
    if frac_bits is not None:
        x_grid = fixed_point.quantize(x_cur, 9)
        got = noninvertible_step(x_prev, x_grid, h, gamma_b, 9)[2]
        assert_bits_equal(got, x_grid[2] + fixed_point.quantize(h[2], 9))
