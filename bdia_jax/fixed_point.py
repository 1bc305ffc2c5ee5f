"""Fixed-point grid arithmetic and side-bit packing for exact BDIA reversal.

All hidden states of a BDIA stack live on the grid δ·ℤ with δ = 2**-frac_bits. A float
value that is an integer multiple of δ, with |x|/δ below the dtype's integer range
(2**24 for float32, 2**53 for float64), is represented exactly, and so are sums,
differences and power-of-two scalings of such values. That is what makes the inverse
recurrence bit-exact.

Forward/inverse pairs in this file (each has a bit-exact round-trip test):
  * ``pack_side_bits`` / ``unpack_side_bits``
  * ``split_side_bits`` / ``join_side_bits``  (x = join(split(x)) on the grid)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Largest |x|/δ for which a grid value and the sum of two grid values stay exact.
_EXACT_INTEGER_RANGE = {
    jnp.dtype(jnp.float32): 2.0**24,
    jnp.dtype(jnp.float64): 2.0**53,
}

# Upper bound on frac_bits per dtype: leave at least 2**4 of integer range (|x| < 16).
MAX_FRAC_BITS = {jnp.dtype(jnp.float32): 20, jnp.dtype(jnp.float64): 48}


def exact_range(dtype, frac_bits: int) -> float:
    """Largest |x| (exclusive) for which grid arithmetic in ``dtype`` is exact.

    float32 with frac_bits=9 gives 2**24 * 2**-9 = 32768.
    """
    dtype = jnp.dtype(dtype)
    if dtype not in _EXACT_INTEGER_RANGE:
        raise ValueError(
            f"the BDIA residual stream must be float32 or float64 for exact fixed point, "
            f"got {dtype}; cast the stack input with x.astype(jnp.float32) (the block may "
            f"still compute internally in bfloat16)."
        )
    return _EXACT_INTEGER_RANGE[dtype] * 2.0**-frac_bits


def check_frac_bits(frac_bits: int, dtype) -> None:
    """Raise a one-line ValueError unless 0 <= frac_bits <= MAX_FRAC_BITS[dtype]."""
    dtype = jnp.dtype(dtype)
    exact_range(dtype, 0)  # raises for streams other than float32/float64
    limit = MAX_FRAC_BITS[dtype]
    if not 0 <= frac_bits <= limit:
        integer_bits = int(np.log2(_EXACT_INTEGER_RANGE[dtype]))
        raise ValueError(
            f"frac_bits={frac_bits} is out of range for a {dtype} stream: use 0..{limit} "
            f"(exact range |x| < 2**{integer_bits} * 2**-frac_bits)."
        )


def quantize(v: jax.Array, frac_bits: int) -> jax.Array:
    """Q(v) = δ · round(v / δ), round half to even, δ = 2**-frac_bits; zero is +0.0.

    v: any shape, float. Returns the same shape and dtype. Both scalings are by powers of
    two, hence exact; only ``round`` changes the value.
    """
    scale = np.asarray(2.0**frac_bits, v.dtype)
    q = jnp.round(v * scale) * (1 / scale)
    # Canonical +0.0: round(-0.3) is -0.0, which the inverse would rebuild as +0.0 — equal
    # values, different bits. With no -0.0 on the grid the rebuild is exact bit for bit.
    return jnp.where(q == 0, jnp.zeros_like(q), q)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def quantize_ste(v: jax.Array, frac_bits: int) -> jax.Array:
    """Q(v) with a straight-through (identity) derivative. Same bits as ``quantize``."""
    return quantize(v, frac_bits)


@quantize_ste.defjvp
def _quantize_ste_jvp(frac_bits, primals, tangents):
    (v,), (dv,) = primals, tangents
    return quantize(v, frac_bits), dv


def split_side_bits(x: jax.Array, frac_bits: int, side_bits: int) -> tuple[jax.Array, jax.Array]:
    """Split a grid value into a part divisible by 2**side_bits·δ and its low bits.

    x: grid values (multiples of δ), float. Returns ``(coarse, s)`` where
    s = (x/δ) mod 2**side_bits as a float array of small integers (floor mod, so s ≥ 0
    also for negative x) and coarse = x - s·δ, a multiple of 2**side_bits·δ. Every
    operation is exact on the grid: scalings by powers of two, floor, subtraction.
    """
    scale = np.asarray(2.0**frac_bits, x.dtype)
    period = np.asarray(2.0**side_bits, x.dtype)
    n = jax.lax.stop_gradient(x) * scale
    # stop_gradient: s is piecewise constant; straight-through makes d(coarse)/dx = 1.
    s = n - period * jnp.floor(n * (1 / period))
    return x - s * (1 / scale), s


def join_side_bits(coarse: jax.Array, s: jax.Array, frac_bits: int) -> jax.Array:
    """Inverse of ``split_side_bits``: coarse + s·δ (exact)."""
    scale = np.asarray(2.0**frac_bits, coarse.dtype)
    return coarse + s.astype(coarse.dtype) * (1 / scale)


def packed_size(num_elements: int) -> int:
    """Bytes per bit plane for ``num_elements`` bits packed 8 per byte."""
    return -(-num_elements // 8)


def pack_side_bits(s: jax.Array, side_bits: int) -> jax.Array:
    """Pack small integers into bit planes, 8 bits per uint8.

    s: [batch, ...] values in [0, 2**side_bits), any real or integer dtype.
    Returns [batch, side_bits, ceil(n/8)] uint8 with n = prod(s.shape[1:]): exactly
    ``side_bits`` bits per element (plus padding to a whole byte per sample). The batch
    axis stays leading so the packed bits shard along the batch like the activations.
    """
    batch = s.shape[0]
    flat = s.reshape(batch, -1).astype(jnp.uint8)
    n = flat.shape[1]
    pad = packed_size(n) * 8 - n
    flat = jnp.pad(flat, ((0, 0), (0, pad)))
    planes = jnp.stack([(flat >> j) & 1 for j in range(side_bits)], axis=1)
    planes = planes.reshape(batch, side_bits, -1, 8)
    weights = (jnp.uint8(1) << jnp.arange(8, dtype=jnp.uint8)).astype(jnp.uint8)
    return jnp.sum(planes * weights, axis=-1, dtype=jnp.uint8)


def unpack_side_bits(packed: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """Inverse of ``pack_side_bits``.

    packed: [batch, side_bits, ceil(n/8)] uint8. Returns values of ``shape`` (shape[0] is
    the batch) and ``dtype``.
    """
    batch, side_bits, nbytes = packed.shape
    shifts = jnp.arange(8, dtype=jnp.uint8)
    bits = (packed[..., None] >> shifts) & 1  # [batch, side_bits, nbytes, 8]
    bits = bits.reshape(batch, side_bits, nbytes * 8)
    n = int(np.prod(shape[1:], dtype=np.int64))
    bits = bits[:, :, :n].astype(jnp.uint32)
    value = jnp.zeros((batch, n), jnp.uint32)
    for j in range(side_bits):
        value = value | (bits[:, j] << j)
    return value.reshape(shape).astype(dtype)
