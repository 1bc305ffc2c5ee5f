"""Gradient comparison shared by engine and model tests."""

import jax
import numpy as np


def assert_grads_close(actual, expected, *, rtol):
    """Per leaf: |actual - expected| <= rtol * max|expected|, elementwise.

    Why the leaf scale and not each element: two equally valid float32 reduction orders
    (even JAX's own "remat" vs "autodiff") differ by a few ulps of a gradient's scale, which
    is a large *relative* error only on entries that are ~0 by cancellation. rtol has no
    default: derive it from the computation (``float_bounds.gradient_rtol``).
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
        # rtol=0: the bound is the leaf's scale alone, as derived (float_bounds.gradient_rtol).
        np.testing.assert_allclose(a, e, rtol=0, atol=rtol * scale, err_msg=path)


FLOAT32_UNIT_ROUNDOFF = 2.0**-24


def bdia_rounding_bound(weights, x, gammas, *, ulps_per_step=4, block_ulps=16):
    """A worst-case bound on how far two float32 evaluations of the unquantized BDIA
    recurrence with a ``testing.make_tanh_block`` branch (h = tanh(x W)) may drift apart when
    XLA orders, fuses or vectorizes their operations differently (another ISA, other fusion):
    the same maths, rounded elsewhere.

    Per element, step k's own rounding is at most ``ulps_per_step`` unit roundoffs of the sum of
    its terms' magnitudes (γ x_{k-1}, (1-γ) x_k, (1+γ) h_k: four float ops), plus (1+|γ|) times
    the block's: the dot product's (dim roundoffs of |x| @ |W|) and tanh's (``block_ulps``
    roundoffs of 1, its largest value, which covers polynomial approximations that differ by
    vector width). An error vector e in x_k moves h_k by at most |e| @ |W| (tanh' <= 1), so per
    element D_{k+1} = |γ| D_{k-1} + |1-γ| D_k + (1+|γ|) D_k @ |W_k| + E_k. Each evaluation is
    within D_K of exact arithmetic, so two are within 2 D_K (elementwise). Evaluated in float64.

    weights: [depth, dim, dim]; x: [batch, ..., dim]; gammas: [depth-1, batch].
    Returns the bound, float64 of x's shape.
    """
    u = FLOAT32_UNIT_ROUNDOFF
    w = np.asarray(weights, np.float64)
    x_cur = np.asarray(x, np.float64)
    g = np.asarray(gammas, np.float64)
    dim = w.shape[1]

    def block(k, v):
        return np.tanh(v @ w[k]), dim * u * (np.abs(v) @ np.abs(w[k])) + block_ulps * u

    h, block_err = block(0, x_cur)
    x_prev, x_cur = x_cur, x_cur + h
    d_prev, d_cur = np.zeros_like(x_cur), ulps_per_step * u * (np.abs(x_prev) + np.abs(h)) + block_err
    for k in range(1, w.shape[0]):
        gk = np.abs(g[k - 1]).reshape((-1,) + (1,) * (x_cur.ndim - 1))
        sk = g[k - 1].reshape(gk.shape)
        h, block_err = block(k, x_cur)
        terms = gk * np.abs(x_prev) + np.abs(1 - sk) * np.abs(x_cur) + (1 + sk) * np.abs(h)
        step_err = ulps_per_step * u * terms + (1 + gk) * block_err
        d_next = gk * d_prev + np.abs(1 - sk) * d_cur + (1 + gk) * (d_cur @ np.abs(w[k])) + step_err
        d_prev, d_cur = d_cur, d_next
        x_prev, x_cur = x_cur, sk * x_prev + (1 - sk) * x_cur + (1 + sk) * h
    return 2.0 * d_cur


def assert_bound_catches(actual, expected, *, rtol, perturbation=1e-3):
    """The comparison can fail: ``actual`` scaled by 1 + ``perturbation`` (a wrong γ, a
    missing term or a scale error of that size would do at least as much to some entry) is
    rejected by ``assert_grads_close`` at the same ``rtol``."""
    scaled = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64) * (1 + perturbation),
                                    actual)
    try:
        assert_grads_close(scaled, expected, rtol=rtol)
    except AssertionError:
        return
    raise AssertionError(f"rtol {rtol:.3g} also accepts the gradients scaled by "
                         f"1 + {perturbation:g}: the comparison cannot fail")
