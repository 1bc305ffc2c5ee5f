"""One BDIA update and its exact inverse (a forward/inverse pair), and the update without
an inverse (any γ).

For block k ≥ 1, with δ = 2**-frac_bits, |γ| = 2**-m and h = h_k(x_k):

    s      = (x_{k-1}/δ) mod 2**m                                  (m side bits)
    b      = Q((1 - γ) x_k + (1 + γ) h)
    x_{k+1} = γ (x_{k-1} - s δ) + b                                 (``bdia_combine``)
    x_{k-1} = (x_{k+1} - b) / γ + s δ                               (``bdia_uncombine``)

Every operation after ``b`` is exact on the grid, and ``b`` is recomputed from the same
bits in both directions, so ``bdia_uncombine`` returns x_{k-1} bit for bit.

``b`` is written as (x - γx) + (h + γh): γ is a power of two, so γx and γh are exact and a
compiler that fuses a multiply-add (FMA) cannot change the rounding between the forward
pass and the backward recomputation.

``noninvertible_step`` is the update for any γ (not a power of two, or 0; and at inference):
x_{k+1} = Q(γ x_{k-1} + (1-γ) x_k + (1+γ) h), one rounding, no side bits, no inverse.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bdia_jax.fixed_point import join_side_bits, quantize_ste, split_side_bits


def broadcast_gamma(gamma: jax.Array, x: jax.Array) -> jax.Array:
    """gamma: [batch] (or scalar) → [batch, 1, ..., 1] matching x.ndim, in x.dtype."""
    gamma = jnp.asarray(gamma, x.dtype)
    if gamma.ndim == 0:
        return gamma
    return gamma.reshape(gamma.shape + (1,) * (x.ndim - gamma.ndim))


def residual_term(x_cur: jax.Array, h: jax.Array, gamma_b: jax.Array, frac_bits: int):
    """b = Q((1 - γ) x_k + (1 + γ) h), FMA-safe.

    x_cur, h: [batch, ...] float; gamma_b: broadcastable to x_cur. Straight-through for Q.
    """
    return quantize_ste((x_cur - gamma_b * x_cur) + (h + gamma_b * h), frac_bits)


def bdia_combine(x_prev, x_cur, h, gamma_b, frac_bits: int, side_bits: int):
    """Forward BDIA update on the grid. Returns (x_next, s, b).

    x_prev, x_cur, h: [batch, ...] float32/64; x_prev, x_cur on the grid.
    gamma_b: [batch, 1, ...] of ±2**-side_bits. s: [batch, ...] side bits as small
    floats in [0, 2**side_bits).
    Gradients: straight-through, dx_next = γ dx_prev + (1-γ) dx_cur + (1+γ) dh.
    """
    b = residual_term(x_cur, h, gamma_b, frac_bits)
    coarse, s = split_side_bits(x_prev, frac_bits, side_bits)
    return gamma_b * coarse + b, s, b


def bdia_uncombine(x_cur, x_next, h, s, gamma_b, frac_bits: int):
    """Exact inverse of ``bdia_combine``: rebuild x_prev from (x_cur, x_next, h, s).

    s: the side bits ``bdia_combine`` returned. Division by γ is a multiplication by
    ±2**side_bits: exact.
    """
    b = residual_term(x_cur, h, gamma_b, frac_bits)
    coarse = (x_next - b) * (1 / gamma_b)
    return join_side_bits(coarse, s, frac_bits)


def noninvertible_step(x_prev, x_cur, h, gamma_b, frac_bits: int | None):
    """x_{k+1} = Q(γ x_{k-1} + (1-γ) x_k + (1+γ) h) for any γ; unquantized when frac_bits
    is None. Shapes as ``bdia_combine``; straight-through Q. Not invertible."""
    v = gamma_b * x_prev + ((x_cur - gamma_b * x_cur) + (h + gamma_b * h))
    return v if frac_bits is None else quantize_ste(v, frac_bits)


def euler_step(x_cur, h, frac_bits: int | None):
    """The first block (and inference): x_{k+1} = x_k + Q(h)."""
    return x_cur + (h if frac_bits is None else quantize_ste(h, frac_bits))

