"""Softmax attention, three ways with the same math: the models' ``attention`` option.

* ``"xla"``     – ``dot_product_attention``: one einsum for the logits, a float32 softmax, one
  einsum for the output. It materializes the [batch, heads, q_len, k_len] probabilities
  (and keeps them for the backward pass).
* ``"chunked"`` – ``chunked_attention``: the same function applied to blocks of
  ``chunk_size`` queries (a config field of every model), with a custom VJP that keeps only q, k and v and recomputes each
  block's probabilities in the backward pass. Only one block's [batch, heads, chunk, k_len]
  logits and probabilities live at a time, in the forward pass and in the backward pass.
  The blocks' MLPs can run over blocks of positions too (``BlockConfig.chunk_mlp``), with
  the same kind of custom VJP (``bdia_jax.ops.position_blocks``), since their [len, mlp_dim]
  activations are the next largest. Exact attention, any backend. Each output row is computed by the very ops of
  ``"xla"`` on its own query row, so the two agree to float rounding
  (tests/test_attention.py).
* ``"cudnn"``   – ``fused_attention``: ``jax.nn.dot_product_attention(implementation=
  "cudnn")``, cuDNN's fused flash-attention kernel. CUDA GPUs only, float16/bfloat16
  compute, no attention dropout. The boolean mask is passed as a mask (cuDNN turns it into
  a bias), not as cuDNN's causal mode. Its BDIA reversal exactness is checked on the GPU by
  the reversal probe, not here.

Why chunking keeps BDIA exact: the reversible backward pass recomputes each block's forward
(``recompute="shared"``: inside the block's VJP) and needs the forward pass's bits. A query
row's output depends only on that row's logits, softmax and products, and every chunk runs
the same ops; tests/test_attention.py checks that the reversal probe reads 0.0 with it.

Shapes: q [batch, heads, q_len, head_dim]; k, v [batch, kv_heads, k_len, head_dim], all in
the compute dtype, with heads a multiple of kv_heads. mask: bool broadcastable to [batch, heads, q_len, k_len] (True = attend) or
None. ``causal=True`` adds the causal mask (query i, at absolute position ``offset`` + i,
sees keys j <= ``offset`` + i), built from ``iota`` where it is used: ``"chunked"`` builds
each query block's [chunk, k_len] rows inside its loop, so no [q_len, k_len] mask is an
input of the attention (or a residual that per-block remat would keep for every block). Outputs [batch, heads, q_len, head_dim] in v's dtype. Dropout on the probabilities is
drawn from ``key`` (None: none); ``"chunked"`` draws chunk i's mask from
``fold_in(key, i)``, so its masks differ from ``"xla"``'s but are replayed exactly.

Grouped-query attention (fewer key/value heads than query heads): query head j·groups + i
attends with key/value head j (Hugging Face's ``repeat_kv`` order). ``"xla"`` and
``"chunked"`` view the queries as [batch, kv_heads, groups, q_len, head_dim] and contract
them with the key/value heads directly, so no repeated copy of k or v (nor of their
gradients) is made; ``"cudnn"`` passes the key/value heads to cuDNN, which groups itself.

``dropout`` and the blockwise loop live in ``bdia_jax.ops`` (re-exported here).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from bdia_jax.ops import dropout, dropout_threshold, for_each_block, random_bytes

__all__ = ["ATTENTION_IMPLEMENTATIONS", "attend", "check_attention", "check_chunk_size",
           "chunked_attention", "dot_product_attention", "dropout", "dropout_threshold",
           "for_each_block", "fused_attention", "random_bytes", "repeat_kv"]

ATTENTION_IMPLEMENTATIONS = ("xla", "chunked", "cudnn")

# Masked attention logits get this value; exp(_MASKED - max) is exactly 0.0 in float32,
# so masked keys contribute exactly nothing (causality and padding tests check bit-equality).
_MASKED = float(jnp.finfo(jnp.float32).min)


def check_attention(attention: str, attention_dropout: float = 0.0,
                    dropout: float = 0.0) -> None:
    """Fail early, with the fix, on an unknown ``attention``, one that cannot drop out, or a
    dropout rate off the masks' uint8 grid (``dropout_threshold``)."""
    dropout_threshold(dropout, "dropout")
    dropout_threshold(attention_dropout, "attention_dropout")
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got "
                         f"{attention!r}: 'chunked' saves memory on any backend.")
    if attention == "cudnn" and attention_dropout:
        raise ValueError("attention='cudnn' has no attention dropout: set "
                         "attention_dropout=0.0 or use attention='chunked'.")


def check_chunk_size(chunk_size: int, field: str = "chunk_size") -> int:
    """A block size of ``"chunked"`` attention or of the position-blocked MLP: an int >= 1."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{field} must be an int >= 1 (queries per block of "
                         f"attention='chunked'), got {chunk_size!r}.")
    return chunk_size


def repeat_kv(kv: jax.Array, groups: int) -> jax.Array:
    """[batch, kv_heads, len, head_dim] → [batch, kv_heads * groups, len, head_dim]: key/value
    head j serves query heads j*groups … (j+1)*groups-1 (Hugging Face's ``repeat_kv``).
    The attention functions group queries themselves; this is the reference they match."""
    return kv if groups == 1 else jnp.repeat(kv, groups, axis=1)


def _group_queries(q, kv_heads: int):
    """[b, heads, q_len, d] → [b, kv_heads, groups, q_len, d] (a free reshape: query head
    j·groups + i is member i of key/value head j's group); q itself when heads == kv_heads,
    so multi-head attention runs the very ops (and bits) it ran before grouping existed.
    The kernels below take either rank (``_rows``)."""
    b, h, t, d = q.shape
    if h % kv_heads:
        raise ValueError(f"q's heads ({h}) must be a multiple of k/v's heads ({kv_heads}).")
    return q if h == kv_heads else q.reshape(b, kv_heads, h // kv_heads, t, d)


def _ungroup(out):
    """The inverse of ``_group_queries``: [b, heads, q_len, d]."""
    if out.ndim == 4:
        return out
    b, n, g, t, d = out.shape
    return out.reshape(b, n * g, t, d)


def _rows(x) -> str:
    """einsum letters of a (grouped) query-rows array's leading axes: "bnq" for [b, n, q,
    …], "bngq" for [b, n, g, q, …]. Its query axis is x.ndim - 2."""
    return "bngq" if x.ndim == 5 else "bnq"


def _group_mask(mask, heads: int, kv_heads: int):
    """A bool mask of rank <= 4 with leading unit axes up to [batch, heads, q_len, k_len],
    in the rank of ``_group_queries``' queries: [b|1, h|1, q_len|1, k_len|1], or grouped
    [b|1, kv_heads|1, groups|1, q_len|1, k_len|1]."""
    if mask is None:
        return None
    mask = jnp.reshape(mask, (1,) * (4 - mask.ndim) + mask.shape)
    if heads == kv_heads:
        return mask
    b, h, t, k = mask.shape
    if h == 1:
        return mask[:, :, None]
    return mask.reshape(b, kv_heads, h // kv_heads, t, k)


def dot_product_attention(q, k, v, mask, *, dropout_rate: float = 0.0, key=None,
                          causal: bool = False, offset=0):
    """Softmax attention in float32 (``attention="xla"``).

    q: [batch, heads, q_len, head_dim]; k, v: [batch, kv_heads, k_len, head_dim] (compute
    dtype; heads a multiple of kv_heads). mask: bool broadcastable to [batch, heads, q_len,
    k_len] (True = attend) or None. ``causal``: AND the causal mask of queries at positions
    ``offset`` … (int, may be traced). Returns [batch, heads, q_len, head_dim] in v's dtype.
    """
    mask = _group_mask(mask, q.shape[1], k.shape[1])
    q = _group_queries(_scale_queries(q), k.shape[1])
    mask = _block_mask(mask, _causal_offset(causal, offset), 0, q.shape[-2], k.shape[2],
                       q.ndim)
    probs = _softmax_probs(q, k, mask)
    probs = dropout(probs, dropout_rate, key)
    r = _rows(q)
    return _ungroup(jnp.einsum(f"{r}k,bnkd->{r}d", probs.astype(v.dtype), v))


def _scale_queries(q):
    # The queries are scaled, not the logits: XLA:CPU materializes the scale as a full
    # [batch, heads, q_len, k_len] operand of the fused dot. For a head_dim that is a power
    # of 4 the scale is a power of 2, and the logits are bitwise those of scaling after.
    return q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)




def _causal_offset(causal: bool, offset):
    """The causal mask's query offset as an int32 scalar, or None when not causal."""
    return jnp.asarray(offset, jnp.int32) if causal else None


def _block_mask(mask, offset, start, size: int, k_len: int, rank: int):
    """Bool mask of query rows start … start+size-1 against k_len keys, or None.

    mask: bool of the queries' ``rank`` (4, or 5 grouped: ``_group_mask``) with the query
    axis at rank - 2, or None (its rows sliced when it has a query axis); offset: None, or
    the int32 query offset of the causal rows, which are built here from iota (k_pos <=
    offset + start + row) and ANDed in. start may be traced.
    """
    per_query = mask is not None and mask.shape[-2] != 1
    mask_c = (jax.lax.dynamic_slice_in_dim(mask, start, size, axis=rank - 2) if per_query
              else mask)
    if offset is None:
        return mask_c
    # A column of query positions against a row of key positions: no [size, k_len] iota
    # for XLA to hoist out of the block loop and keep.
    rows = offset + start + jnp.arange(size, dtype=jnp.int32)[:, None]
    causal = (jnp.arange(k_len, dtype=jnp.int32)[None, :] <= rows)
    causal = causal.reshape((1,) * (rank - 2) + causal.shape)
    return causal if mask_c is None else jnp.logical_and(causal, mask_c)


def _softmax_probs(q_c, k, mask_c):
    """Float32 softmax probabilities [b, n, (g,) chunk, k_len] of the queries q_c [b, n,
    (g,) chunk, d] (``_group_queries``), already scaled, against k [b, n, k_len, d]."""
    r = _rows(q_c)
    logits = jnp.einsum(f"{r}d,bnkd->{r}k", q_c, k, preferred_element_type=jnp.float32)
    if mask_c is not None:
        logits = jnp.where(mask_c, logits, _MASKED)
    return jax.nn.softmax(logits, axis=-1)


def _keep_mask(key_data, impl, index, shape, threshold):
    """Block ``index``'s dropout keep-mask (bool ``shape``) from raw key data, or None.
    (``random_bytes`` draws along the flat index, so grouping the heads keeps the masks.)"""
    if key_data is None:
        return None
    key = jax.random.fold_in(jax.random.wrap_key_data(key_data, impl=impl), index)
    return random_bytes(key, shape) >= jnp.uint8(threshold)


def _as_bits(x):
    """A 16-bit float array as its uint16 bits (others unchanged). XLA:CPU upcasts bfloat16
    dot operands to float32 and moves that convert out of a loop that slices a loop-invariant
    operand, which then lives whole in float32; integer bits it cannot convert."""
    if jnp.dtype(x.dtype).itemsize != 2:
        return x
    return jax.lax.bitcast_convert_type(x, jnp.uint16)


def _from_bits(x, dtype):
    """The inverse of ``_as_bits`` for arrays of ``dtype``."""
    return x if x.dtype == dtype else jax.lax.bitcast_convert_type(x, dtype)


def _flash_forward(chunk, threshold, impl, q, k, v, mask, offset, key_data, bits=True):
    """[b, n, (g,) q_len, head_dim] output of the query blocks (q [b, n, (g,) q_len,
    head_dim] from ``_group_queries``, already scaled; k, v [b, n, k_len, head_dim]);
    offset: the causal rows' int32 query offset or None (``_block_mask``). ``bits``: slice q as its bits (``_as_bits``),
    which JAX's autodiff cannot differentiate; False where autodiff runs through this."""
    q_len, axis, r = q.shape[-2], q.ndim - 2, _rows(q)
    scale = 256.0 / (256 - threshold)
    dtype = q.dtype
    q = _as_bits(q) if bits else q

    def block(start, size, index, out):
        # The barrier ties start to the (differentiated) carry: under jax.checkpoint the
        # loop is linearized through this forward, and a mask computed from the loop index
        # alone would be a "known" value that partial evaluation stacks for every block.
        start, out = jax.lax.optimization_barrier((start, out))
        q_c = _from_bits(jax.lax.dynamic_slice_in_dim(q, start, size, axis=axis), dtype)
        mask_c = _block_mask(mask, offset, start, size, k.shape[2], q.ndim)
        probs = _softmax_probs(q_c, k, mask_c)
        keep = _keep_mask(key_data, impl, index, probs.shape, threshold)
        if keep is not None:
            probs = jnp.where(keep, probs * scale, 0.0)
        out_c = jnp.einsum(f"{r}k,bnkd->{r}d", probs.astype(v.dtype), v)
        return jax.lax.dynamic_update_slice_in_dim(out, out_c, start, axis=axis)

    return for_each_block(q_len, chunk, block, jnp.zeros(q.shape, v.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(chunk, threshold, impl, q, k, v, mask, offset, key_data):
    return _flash_forward(chunk, threshold, impl, q, k, v, mask, offset, key_data)


def _flash_fwd(chunk, threshold, impl, q, k, v, mask, offset, key_data):
    # Only the inputs are kept: the backward pass recomputes each block's probabilities
    # (and causal rows) with the forward pass's ops, so nothing of size [q_len, k_len]
    # outlives a block.
    return (_flash_forward(chunk, threshold, impl, q, k, v, mask, offset, key_data),
            (q, k, v, mask, offset, key_data))


def _flash_bwd(chunk, threshold, impl, residuals, g_out):
    q, k, v, mask, offset, key_data = residuals
    dtype = q.dtype
    q, g_out = _as_bits(q), _as_bits(g_out)
    q_len, axis, r = q.shape[-2], q.ndim - 2, _rows(q)
    scale = 256.0 / (256 - threshold)
    f32 = jnp.float32

    def block(start, size, index, carry):
        g_q, g_k, g_v = carry
        q_c = _from_bits(jax.lax.dynamic_slice_in_dim(q, start, size, axis=axis), dtype)
        g_c = _from_bits(jax.lax.dynamic_slice_in_dim(g_out, start, size, axis=axis), v.dtype)
        mask_c = _block_mask(mask, offset, start, size, k.shape[2], q.ndim)
        probs = _softmax_probs(q_c, k, mask_c)
        keep = _keep_mask(key_data, impl, index, probs.shape, threshold)
        dropped = probs if keep is None else jnp.where(keep, probs * scale, 0.0)
        # The key/value gradients sum over the group's query heads and the block's rows.
        g_v = g_v + jnp.einsum(f"{r}k,{r}d->bnkd", dropped.astype(v.dtype), g_c,
                               preferred_element_type=f32)
        g_dropped = jnp.einsum(f"{r}d,bnkd->{r}k", g_c, v, preferred_element_type=f32)
        g_probs = g_dropped if keep is None else jnp.where(keep, g_dropped * scale, 0.0)
        # Softmax VJP; masked keys have probability 0 and so no logit gradient.
        g_logits = probs * (g_probs - jnp.sum(probs * g_probs, axis=-1, keepdims=True))
        g_q_c = jnp.einsum(f"{r}k,bnkd->{r}d", g_logits.astype(k.dtype), k,
                           preferred_element_type=f32)
        g_k = g_k + jnp.einsum(f"{r}k,{r}d->bnkd", g_logits.astype(dtype), q_c,
                               preferred_element_type=f32)
        # Each block writes its own rows of dq once, so casting here gives the bits of
        # casting at the end, without a float32 buffer of q's size.
        g_q = jax.lax.dynamic_update_slice_in_dim(g_q, g_q_c.astype(dtype), start, axis=axis)
        return g_q, g_k, g_v

    # dk and dv sum over the query blocks: float32 until the end.
    carry = (jnp.zeros(q.shape, dtype), jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32))
    g_q, g_k, g_v = for_each_block(q_len, chunk, block, carry)

    def no_gradient(x):
        return None if x is None else np.zeros(x.shape, jax.dtypes.float0)

    return (g_q, g_k.astype(k.dtype), g_v.astype(v.dtype), no_gradient(mask),
            no_gradient(offset), no_gradient(key_data))


_flash.defvjp(_flash_fwd, _flash_bwd)


def chunked_attention(q, k, v, mask, *, dropout_rate: float = 0.0, key=None,
                      chunk_size: int, checkpoint: bool = True, causal: bool = False,
                      offset=0):
    """``dot_product_attention`` over blocks of ``chunk_size`` queries (``"chunked"``).

    Shapes, dtypes, ``causal`` and ``offset`` as ``dot_product_attention`` (grouped-query k
    and v included); the causal rows of a query block are built inside the block from iota. ``chunk_size``
    queries per block: the q_len // chunk_size full blocks run in a loop, a shorter last
    block after it. Block i's dropout mask is drawn from ``fold_in(key, i)``.

    ``checkpoint`` (the default): a custom VJP that keeps only q, k and v and recomputes
    each block's probabilities in the backward pass, which runs over the same blocks and
    accumulates the key and value gradients in place (the backward of FlashAttention,
    without its online softmax: a block holds its full [chunk, k_len] probabilities).
    Memory O(batch·heads·chunk·k_len) beyond q, k, v and their gradients (the key/value
    gradients have k and v's heads, not q's). ``checkpoint=
    False``: the same blocks, differentiated by JAX, which keeps every block's probabilities
    (the reference the tests compare the custom VJP with).
    """
    check_chunk_size(chunk_size)
    chunk = min(chunk_size, q.shape[2])
    threshold = dropout_threshold(dropout_rate) if key is not None else 0
    key_data, impl = None, None
    if key is not None and threshold:
        typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        key_data = jax.random.key_data(key) if typed else key
        impl = str(jax.random.key_impl(key)) if typed else None
    mask, offset = _group_mask(mask, q.shape[1], k.shape[1]), _causal_offset(causal, offset)
    q = _group_queries(_scale_queries(q), k.shape[1])
    if checkpoint:
        return _ungroup(_flash(chunk, threshold, impl, q, k, v, mask, offset, key_data))
    return _ungroup(_flash_forward(chunk, threshold, impl, q, k, v, mask, offset, key_data,
                                   bits=False))


def fused_attention(q, k, v, mask, *, implementation: str = "cudnn", causal: bool = False,
                    offset=0):
    """``jax.nn.dot_product_attention`` in this module's [batch, heads, len, head_dim] layout.

    ``implementation="cudnn"`` (``attention="cudnn"``) needs a CUDA GPU and float16/bfloat16
    q, k, v; ``"xla"`` runs anywhere (the tests check the layout and masks with it). No
    dropout. ``causal``/``offset`` as ``dot_product_attention`` (the whole [q_len, k_len]
    mask is built and passed as a mask); k and v may have fewer heads (grouped-query
    attention, grouped by JAX/cuDNN). Returns [batch, heads, q_len, head_dim] in q's dtype.
    """
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"attention='cudnn' needs a CUDA GPU (this backend is "
                         f"{jax.default_backend()!r}); use attention='chunked' or 'xla'.")
    mask = _block_mask(_group_mask(mask, 1, 1), _causal_offset(causal, offset), 0,
                       q.shape[2], k.shape[2], 4)
    out = jax.nn.dot_product_attention(
        q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
        mask=mask, implementation=implementation)
    return out.transpose(0, 2, 1, 3)


def attend(q, k, v, mask, *, attention: str, chunk_size: int, dropout_rate: float = 0.0,
           key=None, causal: bool = False, offset=0):
    """Softmax attention by the ``attention`` option (see the module docstring);
    ``chunk_size``: queries per block of ``"chunked"`` (read only there).

    Shapes, dtypes, ``causal`` and ``offset`` as ``dot_product_attention`` (k, v: q's heads
    or fewer, for grouped-query attention).
    """
    check_attention(attention, dropout_rate)
    if attention == "chunked":
        return chunked_attention(q, k, v, mask, dropout_rate=dropout_rate, key=key,
                                 chunk_size=chunk_size, causal=causal, offset=offset)
    if attention == "cudnn":
        return fused_attention(q, k, v, mask, implementation="cudnn", causal=causal,
                               offset=offset).astype(v.dtype)
    return dot_product_attention(q, k, v, mask, dropout_rate=dropout_rate, key=key,
                                 causal=causal, offset=offset)
