"""Gradient comparison shared by engine and model tests."""

import jax
import numpy as np


def assert_grads_close(actual, expected, rtol=1e-5):
    """Per leaf: |actual - expected| <= rtol * max|expected|, elementwise.

    Why the leaf scale and not each element: two equally valid float32 reduction orders
    (even JAX's own "remat" vs "autodiff") differ by ~1e-7 of a gradient's scale, which is a
    large *relative* error only on entries that are ~0 by cancellation. rtol stays 1e-5.
    """
    leaves_a, tree_a = jax.tree_util.tree_flatten(actual)
    leaves_e, tree_e = jax.tree_util.tree_flatten(expected)
    assert tree_a == tree_e, (tree_a, tree_e)
    for path, a, e in zip(
        [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(expected)[0]],
        leaves_a, leaves_e,
    ):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert np.all(np.isfinite(a)) and np.all(np.isfinite(e)), path
        scale = max(float(np.max(np.abs(e))) if e.size else 0.0, 1e-30)
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * scale, err_msg=path)
