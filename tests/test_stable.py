"""bdia_jax.stable: the statistics behind recompute="shared" keep their bits under a VJP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from float_bounds import ELEMENTWISE_ULPS, U, assert_within

from bdia_jax import stable
from bdia_jax.testing import bits


def _reference_layer_norm(x, scale, bias, eps=1e-6):
    mean = np.mean(x, -1, keepdims=True, dtype=np.float64)
    var = np.mean((x - mean) ** 2, -1, keepdims=True, dtype=np.float64)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def test_layer_norm_matches_the_float64_reference():
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (4, 7, 48))) * 3 + 1
    scale = np.linspace(0.5, 1.5, 48, dtype=np.float32)
    bias = np.linspace(-1, 1, 48, dtype=np.float32)
    got = stable.tree_layer_norm(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
    assert got.dtype == jnp.float32 and got.shape == x.shape
    # Against exact (float64) arithmetic: a pairwise sum of d terms is within ceil(log2 d) u
    # of Σ|x| (the mean, then the variance of the centred squares, 2 u more each); the
    # centring error u (|x| + |mean|) is relative to sigma in x_hat; rsqrt, the products with
    # x_hat and scale and the bias add ELEMENTWISE_ULPS + 3 u of the output's terms.
    mean = x.astype(np.float64).mean(-1, keepdims=True)
    sigma = x.astype(np.float64).std(-1, keepdims=True)
    x_hat = (x - mean) / sigma
    levels = int(np.ceil(np.log2(48)))
    rel = (levels + 2) * U * (np.abs(x) + np.abs(mean)).mean(-1, keepdims=True) / sigma \
        + 2 * (levels + 2) * U + (ELEMENTWISE_ULPS + 3) * U
    bound = rel * np.abs(x_hat * scale) + U * (np.abs(x_hat * scale) + np.abs(bias)) \
        + U * (np.abs(x) + np.abs(mean)) / sigma * np.abs(scale)
    assert_within(got, _reference_layer_norm(x, scale, bias), bound, "layer norm")
    for d in (1, 2, 5, 48, 384):  # powers of two and zero-padded widths
        v = np.asarray(jax.random.normal(jax.random.PRNGKey(d), (3, d)))
        # The pairwise sum (ceil(log2 d) u of Σ|v|) and the scaling by 1/d (2 u).
        bound = (np.ceil(np.log2(d)) + 2) * U * np.abs(v).mean(-1)
        assert_within(stable.mean_last_axis(jnp.asarray(v))[:, 0], v.astype(np.float64).mean(-1),
                      bound, f"mean of {d}")


@pytest.mark.parametrize("batch", [8, 64, 128])
def test_layer_norm_bits_do_not_change_when_its_vjp_is_taken(batch):
    """The property recompute="shared" rests on: the forward output has the same bits in a
    program that only evaluates it and in one that also runs its VJP (with gradients for
    both the input and a parameter), at training sizes."""
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, 65, 128))

    def f(scale, x):
        return stable.tree_layer_norm(x, scale)

    def with_vjp(scale, x):
        y, pullback = jax.vjp(f, scale, x)
        return y, pullback(jnp.ones_like(y))

    scale = jnp.full((128,), 1.5)
    plain = jax.jit(f)(scale, x)
    y, grads = jax.jit(with_vjp)(scale, x)
    np.testing.assert_array_equal(bits(plain), bits(y))
    assert float(jnp.max(jnp.abs(grads[0]))) > 0


def test_layer_norm_bits_do_not_depend_on_how_many_rows_are_normalised():
    """KV-cached decoding normalises one token at a time and must match the full pass: each
    row's result may not depend on the other rows (a ones-matmul mean fails this)."""
    x = jax.random.normal(jax.random.PRNGKey(3), (12, 10, 32)) * 2 + 0.5
    full = jax.jit(stable.tree_layer_norm)(x)
    for t in range(10):
        np.testing.assert_array_equal(bits(jax.jit(stable.tree_layer_norm)(x[:, t:t + 1])),
                                      bits(full[:, t:t + 1]))
