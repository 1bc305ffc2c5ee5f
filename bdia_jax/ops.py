"""Blockwise and random-mask primitives that the models and the engine's test blocks share.

Pure JAX, no model knowledge: ``bdia_jax.models`` (attention, MLPs, embeddings) and
``bdia_jax.testing`` (the engine's pure-jnp test blocks) both import this module, so neither
layer imports the other for them.

* ``dropout`` / ``dropout_threshold`` / ``random_bytes``: inverted dropout whose masks come
  only from a key (one random byte per element), so a replayed key redraws the same mask.
* ``for_each_block``: a loop over blocks of positions (full blocks, then a shorter tail).
* ``position_blocks``: a position-wise function computed a block of positions at a time,
  with a custom VJP that recomputes each block (the chunked MLP); given its output's
  cotangent in advance, one loop computes the output and the VJP.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def dropout_threshold(rate: float, field: str = "dropout rate") -> int:
    """The uint8 threshold t = round(rate * 256) of ``dropout``: it drops an element whose
    random byte is < t, so the rate it applies is t / 256. ``field`` names it in errors."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"{field} must be in [0, 1), got {rate!r}.")
    threshold = round(rate * 256)
    if rate and not 0 < threshold < 256:
        raise ValueError(f"{field} {rate} rounds to {threshold}/256 on the uint8 grid of "
                         "dropout masks; use 0.0 or a rate in [1/256, 255/256].")
    return threshold


def random_bytes(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """[*shape] uint8 random bytes from ``key``, four per uint32 word drawn.

    Partitionable threefry draws one counter and one word per element whatever the width
    asked for, so ``jax.random.bits(key, shape, jnp.uint8)`` costs as much as uint32 bits:
    this draws a quarter of the words (along the last axis, so leading axes keep their
    sharding) and splits each into its bytes.
    """
    shape = tuple(shape)
    last = shape[-1] if shape else 1
    num_words = -(-last // 4)
    words = jax.random.bits(key, shape[:-1] + (num_words,), jnp.uint32)
    data = jax.lax.bitcast_convert_type(words, jnp.uint8)  # [..., num_words, 4]
    data = data.reshape(data.shape[:-2] + (4 * num_words,))[..., :last]
    return data.reshape(shape)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout drawn from ``key``; identity when key is None or rate == 0.

    x: any shape and float dtype; returns x's shape and dtype. The mask comes from one
    random byte per element (``random_bytes``), so the rate is rounded to a multiple of
    1/256 (``dropout_threshold``) and kept elements are scaled by the inverse of the kept
    fraction actually drawn for, which keeps E[out] = x.
    """
    if key is None or rate == 0.0:
        return x
    threshold = dropout_threshold(rate)
    # Bytes, not bernoulli's uint32 uniforms: a quarter of threefry's counters and bits,
    # and the same key still replays the same mask in the backward pass. A finer grid
    # (uint16) would double them for a rate change far below dropout's own noise.
    keep = random_bytes(key, x.shape) >= jnp.uint8(threshold)
    scale = 256.0 / (256 - threshold)
    return jnp.where(keep, x * scale, jnp.zeros_like(x)).astype(x.dtype)


def for_each_block(length: int, chunk: int, fn, carry):
    """``carry = fn(start, size, index, carry)`` over blocks of ``chunk`` positions of a
    ``length`` axis: the full blocks in a ``fori_loop`` (traced start and index, size =
    chunk), then a shorter last block, if any, once more."""
    num_full = length // chunk
    carry = jax.lax.fori_loop(0, num_full, lambda i, c: fn(i * chunk, chunk, i, c), carry)
    if num_full * chunk < length:
        carry = fn(num_full * chunk, length - num_full * chunk, num_full, carry)
    return carry


def _position_blocks_forward(fn, chunk, params, y):
    def block(start, size, index, out):
        out_c = fn(params, jax.lax.dynamic_slice_in_dim(y, start, size, axis=-2))
        return jax.lax.dynamic_update_slice_in_dim(out, out_c, start, axis=-2)

    return for_each_block(y.shape[-2], chunk, block, _output_buffer(fn, chunk, params, y))


def _output_buffer(fn, chunk, params, y):
    """Zeros of fn's output for all of y's positions: [..., len, out] in fn's dtype."""
    shape = jax.eval_shape(fn, params, jax.ShapeDtypeStruct(
        y.shape[:-2] + (chunk,) + y.shape[-1:], y.dtype))
    return jnp.zeros(y.shape[:-2] + y.shape[-2:-1] + shape.shape[-1:], shape.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _position_blocks(fn, chunk, params, y):
    return _position_blocks_forward(fn, chunk, params, y)


def _position_blocks_fwd(fn, chunk, params, y):
    return _position_blocks_forward(fn, chunk, params, y), (params, y)


def _position_blocks_bwd(fn, chunk, residuals, g_out):
    params, y = residuals

    def block(start, size, index, carry):
        g_params, g_y = carry
        _, pullback = jax.vjp(fn, params, jax.lax.dynamic_slice_in_dim(y, start, size, axis=-2))
        g_params_c, g_y_c = pullback(jax.lax.dynamic_slice_in_dim(g_out, start, size, axis=-2))
        g_params = jax.tree_util.tree_map(jnp.add, g_params, g_params_c)
        return g_params, jax.lax.dynamic_update_slice_in_dim(g_y, g_y_c, start, axis=-2)

    carry = (jax.tree_util.tree_map(jnp.zeros_like, params), jnp.zeros_like(y))
    return for_each_block(y.shape[-2], chunk, block, carry)


_position_blocks.defvjp(_position_blocks_fwd, _position_blocks_bwd)


def _position_blocks_output_and_vjp(fn, chunk, params, y, g_out):
    """(fn(params, y), dL/dparams, dL/dy) at the output cotangent g_out, in one loop over
    the blocks: each block's ``fn`` runs once, under ``jax.vjp``."""
    def block(start, size, index, carry):
        out, g_params, g_y = carry
        out_c, pullback = jax.vjp(fn, params, jax.lax.dynamic_slice_in_dim(y, start, size, axis=-2))
        g_params_c, g_y_c = pullback(jax.lax.dynamic_slice_in_dim(g_out, start, size, axis=-2))
        return (jax.lax.dynamic_update_slice_in_dim(out, out_c, start, axis=-2),
                jax.tree_util.tree_map(jnp.add, g_params, g_params_c),
                jax.lax.dynamic_update_slice_in_dim(g_y, g_y_c, start, axis=-2))

    carry = (_output_buffer(fn, chunk, params, y), jax.tree_util.tree_map(jnp.zeros_like, params),
             jnp.zeros_like(y))
    return for_each_block(y.shape[-2], chunk, block, carry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _position_blocks_at(fn, chunk, params, y, g_out):
    return _position_blocks_output_and_vjp(fn, chunk, params, y, g_out)[0]


def _position_blocks_at_fwd(fn, chunk, params, y, g_out):
    out, g_params, g_y = _position_blocks_output_and_vjp(fn, chunk, params, y, g_out)
    return out, (g_params, g_y)


def _position_blocks_at_bwd(fn, chunk, residuals, g_out):
    # The caller's promise: g_out is the cotangent given in advance (see position_blocks),
    # so the gradients computed with it are the answer; the advance cotangent gets none.
    g_params, g_y = residuals
    return g_params, g_y, jnp.zeros_like(g_out)


_position_blocks_at.defvjp(_position_blocks_at_fwd, _position_blocks_at_bwd)


def position_blocks(fn, params, y: jax.Array, chunk: int, *,
                    cotangent: jax.Array | None = None) -> jax.Array:
    """``fn(params, y)`` of a position-wise ``fn``, computed ``chunk`` positions at a time.

    y: [..., len, width]; returns fn's [..., len, out] in its dtype. The forward pass writes
    each block's output in place; a custom VJP keeps only (params, y) and its backward pass
    loops over the same blocks, recomputing each block's ``fn`` under ``jax.vjp``,
    accumulating the parameter gradients and writing dL/dy in place. So one block's
    activations of ``fn`` live at a time, and no block axis is transposed to the front.
    The same ops run on each block in both passes, which the BDIA reversal needs.

    cotangent: the output's cotangent dL/dout ([..., len, out], fn's dtype), when the
    caller knows it before it needs the output (BDIA's rebuild, ``recompute="fused"``).
    Then one loop runs each block's ``fn`` once, under ``jax.vjp``, writing the output and
    the gradients together, and the VJP returns those gradients *whatever cotangent it is
    given*: the caller must pull back with exactly this one.
    """
    if cotangent is None:
        return _position_blocks(fn, chunk, params, y)
    return _position_blocks_at(fn, chunk, params, y, cotangent)
