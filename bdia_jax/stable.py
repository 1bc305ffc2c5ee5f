"""Reductions whose bits do not depend on how XLA compiles the code around them.

Why this exists: ``recompute="shared"`` (see ``bdia_stack``) rebuilds x_{k-1} from the
h_k(x_k) that the block's VJP computes in the backward pass, so that h must have the bits of
the forward pass, where no VJP was taken. XLA:CPU emits a ``jnp.mean``/``jnp.sum`` over the
last axis differently when the VJP runs in the same program (other fusion, other accumulation
order): measured for a LayerNorm on [64, 65, 128] float32, a quarter of the outputs changed in
their last bits, and the rebuilt states were off by several δ (docs/design.md §5).

Here the sum over the last axis is an explicit pairwise tree of elementwise adds: halve the
axis and add the halves until one element is left (zero-padded to a power of two; adding
+0.0 is exact). XLA does not reassociate floating-point adds, so every output element is the
same sequence of roundings whatever the fusion, the batch and sequence sizes, or the backend.
(A matmul with a column of ones survives the VJP too, but its summation order depends on the
number of rows, so KV-cached decoding of one token would no longer match the full pass.)

Use these in a residual branch of your own to make it eligible for ``recompute="shared"``;
the models in ``bdia_jax.models`` use them for every LayerNorm and RMSNorm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sum_last_axis(x: jax.Array) -> jax.Array:
    """Sum over the last axis, keepdims, as a pairwise tree: x [..., d] → [..., 1]."""
    d = x.shape[-1]
    width = 1 << max(d - 1, 0).bit_length()  # next power of two ≥ d
    if width != d:
        x = jnp.concatenate([x, jnp.zeros(x.shape[:-1] + (width - d,), x.dtype)], axis=-1)
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x


def mean_last_axis(x: jax.Array) -> jax.Array:
    """Mean over the last axis, keepdims: x [..., d] float → [..., 1] (pairwise tree sum)."""
    return sum_last_axis(x) * (1.0 / x.shape[-1])


def tree_layer_norm(x: jax.Array, scale: jax.Array | None = None, bias: jax.Array | None = None,
               eps: float = 1e-6) -> jax.Array:
    """LayerNorm over the last axis with fusion-independent statistics.

    x: [..., d] float32; scale, bias: optional [d] float32. Returns [..., d] like x.
    Computes (x - mean) * rsqrt(var + eps) * scale + bias with var = mean((x - mean)**2).
    """
    mean = mean_last_axis(x)
    centered = x - mean
    y = centered * jax.lax.rsqrt(mean_last_axis(centered * centered) + eps)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y


def tree_rms_norm(x: jax.Array, scale: jax.Array | None = None, eps: float = 1e-6) -> jax.Array:
    """RMSNorm over the last axis with fusion-independent statistics.

    x: [..., d] float32; scale: optional [d] float32. Returns [..., d] like x.
    Computes x * rsqrt(mean(x**2) + eps) * scale (Llama's RMSNorm, in float32).
    """
    y = x * jax.lax.rsqrt(mean_last_axis(x * x) + eps)
    if scale is not None:
        y = y * scale
    return y
