"""Transformer building blocks (Flax NNX) shaped for the BDIA block contract.

A pre-LN block x + h(x) is written as its residual *branch* h, which is what
``bdia_jax.apply_stack`` wants:

    encoder block:  h(x) = a(x) + m(x + a(x)),                a(x) = Attn(LN1(x)),  m(y) = MLP(LN2(y))
    decoder block:  h(x) = a(x) + c(y) + m(y + c(y)),  y = x + a(x),  c(y) = CrossAttn(LN2(y), enc)

so that x + h(x) is the usual pre-LN block. Every block call has the signature
``block(x, context, key) -> h`` with ``h`` of x's shape and dtype (float32); ``key`` is None
at inference and dropout is applied only when a key is given. Dropout masks come only from
that key (``jax.random``): blocks hold parameters and nothing else, so the reversible backward
pass, which replays the same per-block key, redraws exactly the same masks.

Attention is plain jnp (einsum + float32 softmax); the ``attention`` option of the attention
modules and blocks picks "xla" | "chunked" | "cudnn" (``bdia_jax.models.attention``).
``compute_dtype`` (e.g. bfloat16) is the matmul dtype; LayerNorm, softmax and the residual
branch output stay float32.

Masks are boolean, True = may attend, broadcastable to [batch, heads, q_len, k_len]. A
padding mask travels through a stack's ``context`` as bool [batch, k_len] (True = real
token); the engine gives such a non-float context leaf a float0 (no) cotangent.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from bdia_jax import stable
from bdia_jax.models import attention as attention_module
from bdia_jax.models.attention import attend, check_attention, dropout, for_each_block
from bdia_jax.models.attention import dot_product_attention as dot_product_attention  # re-export


class ReversalProbe(nnx.Variable):
    """A float32 scalar (always 0.0) whose *gradient* is a stack's reversal error.

    Each ``ResidualStack`` holds one. A training loop differentiates w.r.t. ``nnx.Param``
    and ``ReversalProbe`` and reads the probe gradients (summed) as the largest
    |rebuilt - forward| state difference of the reversible backward pass (0.0 = bit-exact).
    It never applies optimizer updates to probes.
    """


class KVCache(NamedTuple):
    """Cached attention keys and values of one layer (stacked by the stack: leading [depth]).

    key, value: [batch, heads, max_len, head_dim] in the attention's compute dtype.
    """

    key: jax.Array
    value: jax.Array


def canonical_dtype(dtype) -> jnp.dtype:
    """'float32' / 'bfloat16' / a dtype → jnp.dtype, with an error that names the choices."""
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(
            f"compute_dtype must be 'float32' or 'bfloat16' (or a jnp dtype), got {dtype!r}."
        ) from None
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"compute_dtype must be float32, bfloat16 or float16, got {dtype}.")
    return dtype


def split_key(key: jax.Array | None, num: int) -> tuple:
    """``num`` independent keys from ``key``, or ``num`` Nones when key is None."""
    if key is None:
        return (None,) * num
    return tuple(jax.random.split(key, num))


def causal_mask(q_len: int, k_len: int, offset=0) -> jax.Array:
    """[1, 1, q_len, k_len] bool: query i (at absolute position offset + i) sees keys j <= offset + i.

    ``offset`` may be traced (KV-cache decoding writes a chunk at position ``offset``).
    """
    q_pos = offset + jnp.arange(q_len)[:, None]
    k_pos = jnp.arange(k_len)[None, :]
    return (k_pos <= q_pos)[None, None]


def padding_mask(tokens: jax.Array, pad_id: int) -> jax.Array:
    """tokens: [batch, len] int → [batch, len] bool, True for real (non-pad) tokens."""
    return tokens != pad_id


def key_mask(mask: jax.Array | None) -> jax.Array | None:
    """bool [batch, k_len] (True = real token) → bool [batch, 1, 1, k_len], or None."""
    if mask is None:
        return None
    if mask.dtype != jnp.bool_:
        raise ValueError(
            f"padding masks must be bool [batch, len] (True = real token), got {mask.dtype}; "
            f"build one with padding_mask(tokens, pad_id)."
        )
    return mask[:, None, None, :]


def combine_masks(*masks):
    """Logical AND of the non-None boolean masks (broadcasting), or None."""
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    out = masks[0]
    for m in masks[1:]:
        out = jnp.logical_and(out, m)
    return out


class MultiHeadAttention(nnx.Module):
    """Multi-head attention: self-attention (``kv`` = None) or cross-attention.

    Projections q, k, v, o are Linear(width → width) with bias (4·(width² + width) params).
    ``attention``: "xla" | "chunked" | "cudnn", how softmax attention is computed.
    """

    def __init__(self, width: int, num_heads: int, *, kv_width: int | None = None,
                 attention_dropout: float = 0.0, compute_dtype="float32",
                 attention: str = "xla", rngs: nnx.Rngs):
        if width % num_heads:
            raise ValueError(
                f"width ({width}) must be divisible by num_heads ({num_heads}); "
                f"change one of them."
            )
        kv_width = width if kv_width is None else kv_width
        dtype = canonical_dtype(compute_dtype)
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.attention_dropout = attention_dropout
        self.compute_dtype = dtype
        check_attention(attention, attention_dropout)
        self.attention = attention  # "xla" | "chunked" | "cudnn" (bdia_jax.models.attention)

        def linear(n_in):
            return nnx.Linear(n_in, width, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

        self.query = linear(width)
        self.key = linear(kv_width)
        self.value = linear(kv_width)
        self.out = linear(width)

    def _heads(self, y: jax.Array) -> jax.Array:
        """[batch, len, width] → [batch, heads, len, head_dim]."""
        b, t, _ = y.shape
        return y.reshape(b, t, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

    def project_kv(self, y: jax.Array) -> KVCache:
        """y: [batch, k_len, kv_width] → KVCache of [batch, heads, k_len, head_dim]."""
        return KVCache(self._heads(self.key(y)), self._heads(self.value(y)))

    def attend(self, x: jax.Array, kv: KVCache, mask, key=None) -> jax.Array:
        """Queries from x: [batch, q_len, width] against kv → [batch, q_len, width] float32."""
        q = self._heads(self.query(x))
        o = attend(q, kv.key, kv.value, mask, attention=self.attention,
                   dropout_rate=self.attention_dropout, key=key)
        b, _, t, _ = o.shape
        o = o.transpose(0, 2, 1, 3).reshape(b, t, self.num_heads * self.head_dim)
        return self.out(o).astype(jnp.float32)

    def __call__(self, x: jax.Array, kv_input: jax.Array | None = None, mask=None,
                 key=None) -> jax.Array:
        """x: [batch, q_len, width]; kv_input: [batch, k_len, kv_width] or None (self-attn).

        Returns [batch, q_len, width] float32.
        """
        return self.attend(x, self.project_kv(x if kv_input is None else kv_input), mask, key)

    def attend_cached(self, x: jax.Array, cache: KVCache, pos, mask=None):
        """Causal self-attention of a chunk x: [batch, t, width] at positions pos … pos+t-1.

        Writes the chunk's keys/values into ``cache`` ([batch, heads, max_len, head_dim]) and
        attends over cache positions <= each query's position (plus ``mask``). Returns
        (out [batch, t, width] float32, updated cache). No dropout: inference only.
        """
        new = self.project_kv(x)
        index = (0, 0, pos, 0)
        cache = KVCache(
            jax.lax.dynamic_update_slice(cache.key, new.key.astype(cache.key.dtype), index),
            jax.lax.dynamic_update_slice(cache.value, new.value.astype(cache.value.dtype), index),
        )
        causal = causal_mask(x.shape[1], cache.key.shape[2], pos)
        return self.attend(x, cache, combine_masks(causal, mask)), cache

    def empty_cache(self, batch: int, max_len: int) -> KVCache:
        """Zero KVCache [batch, heads, max_len, head_dim] in the compute dtype."""
        shape = (batch, self.num_heads, max_len, self.head_dim)
        return KVCache(jnp.zeros(shape, self.compute_dtype), jnp.zeros(shape, self.compute_dtype))


class MLP(nnx.Module):
    """Linear(width → mlp_dim) → GELU → Linear(mlp_dim → width); returns float32.

    ``approximate_gelu``: True = the tanh approximation (GPT-2's ``gelu_new``), False = the
    exact erf GELU. ``chunked`` (the blocks' ``attention="chunked"``): positions run in
    blocks of ``attention.QUERY_CHUNK`` (``position_blocks``), so that one block's
    [batch, chunk, mlp_dim] hidden activations live at a time, in the forward and in the
    backward pass, instead of the whole sequence's. Each row goes through the same ops
    either way; the backward pass runs each block's forward once more.
    """

    def __init__(self, width: int, mlp_dim: int, *, compute_dtype="float32",
                 approximate_gelu: bool = True, chunked: bool = False, rngs: nnx.Rngs):
        dtype = canonical_dtype(compute_dtype)
        self.approximate_gelu = approximate_gelu
        self.chunked = chunked
        self.fc1 = nnx.Linear(width, mlp_dim, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.fc2 = nnx.Linear(mlp_dim, width, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

    def _dense(self, y: jax.Array) -> jax.Array:
        hidden = jax.nn.gelu(self.fc1(y), approximate=self.approximate_gelu)
        return self.fc2(hidden).astype(jnp.float32)

    def __call__(self, y: jax.Array) -> jax.Array:
        """y: [..., len, width] → [..., len, width] float32."""
        chunk = attention_module.QUERY_CHUNK
        if not self.chunked or y.ndim < 2 or y.shape[-2] <= chunk:
            return self._dense(y)
        graphdef, state = nnx.split(self)

        def dense(state, y_c):
            return nnx.merge(graphdef, state)._dense(y_c)

        return position_blocks(dense, state, y, chunk)


def _position_blocks_forward(fn, chunk, params, y):
    def block(start, size, index, out):
        out_c = fn(params, jax.lax.dynamic_slice_in_dim(y, start, size, axis=-2))
        return jax.lax.dynamic_update_slice_in_dim(out, out_c, start, axis=-2)

    shape = jax.eval_shape(fn, params, jax.ShapeDtypeStruct(
        y.shape[:-2] + (chunk,) + y.shape[-1:], y.dtype))
    out = jnp.zeros(y.shape[:-2] + y.shape[-2:-1] + shape.shape[-1:], shape.dtype)
    return for_each_block(y.shape[-2], chunk, block, out)


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


def position_blocks(fn, params, y: jax.Array, chunk: int) -> jax.Array:
    """``fn(params, y)`` of a position-wise ``fn``, computed ``chunk`` positions at a time.

    y: [..., len, width]; returns fn's [..., len, out] in its dtype. The forward pass writes
    each block's output in place; a custom VJP keeps only (params, y) and its backward pass
    loops over the same blocks, recomputing each block's ``fn`` under ``jax.vjp``,
    accumulating the parameter gradients and writing dL/dy in place. So one block's
    activations of ``fn`` live at a time, and no block axis is transposed to the front.
    The same ops run on each block in both passes, which the BDIA reversal needs.
    """
    return _position_blocks(fn, chunk, params, y)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis in float32, with ``scale`` and ``bias`` Params (the
    parameter names of ``nnx.LayerNorm``). Its mean and variance are pairwise tree
    sums (``bdia_jax.stable``), so its bits do not change when XLA also compiles its VJP: this
    is what lets the models' reversible stacks use ``recompute="shared"``."""

    def __init__(self, width: int, *, epsilon: float = 1e-6, rngs: nnx.Rngs):
        del rngs  # deterministic initialisation; kept for the nnx constructor convention
        self.scale = nnx.Param(jnp.ones((width,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((width,), jnp.float32))
        self.epsilon = epsilon

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., width] → [..., width] float32."""
        return stable.tree_layer_norm(x.astype(jnp.float32), self.scale[...], self.bias[...],
                                 self.epsilon)


class EncoderBlock(nnx.Module):
    """Residual branch of a pre-LN self-attention block: h(x) = a(x) + m(x + a(x)).

    ``context``: None, or a bool [batch, len] key-padding mask (True = real token). ``causal=True`` adds the causal mask (decoder-only LM).
    Dropout: ``attention_dropout`` on attention probabilities, ``dropout`` on a(x) and on
    m(·) (residual dropout), all drawn from the block key. ``layer_norm_eps`` and
    ``approximate_gelu`` (see ``MLP``) let the block be GPT-2's exactly (1e-5, True).
    """

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, causal: bool = False,
                 dropout: float = 0.0, attention_dropout: float = 0.0,
                 compute_dtype="float32", layer_norm_eps: float = 1e-6,
                 approximate_gelu: bool = True, attention: str = "xla",
                 rngs: nnx.Rngs):
        self.causal = causal
        self.dropout = dropout
        self.ln1 = LayerNorm(width, epsilon=layer_norm_eps, rngs=rngs)
        self.attn = MultiHeadAttention(width, num_heads, attention_dropout=attention_dropout,
                                       compute_dtype=compute_dtype, attention=attention,
                                       rngs=rngs)
        self.ln2 = LayerNorm(width, epsilon=layer_norm_eps, rngs=rngs)
        self.mlp = MLP(width, mlp_dim, compute_dtype=compute_dtype,
                       approximate_gelu=approximate_gelu, chunked=attention == "chunked",
                       rngs=rngs)

    def _mask(self, x, context):
        causal = causal_mask(x.shape[1], x.shape[1]) if self.causal else None
        return combine_masks(causal, key_mask(context))

    def __call__(self, x: jax.Array, context=None, key=None) -> jax.Array:
        """x: [batch, len, width] float32 → h: [batch, len, width] float32."""
        k_attn, k_a, k_m = split_key(key, 3)
        a = dropout(self.attn(self.ln1(x), mask=self._mask(x, context), key=k_attn),
                    self.dropout, k_a)
        m = dropout(self.mlp(self.ln2(x + a)), self.dropout, k_m)
        return (a + m).astype(x.dtype)

    # ---- KV-cache decoding (inference, causal blocks only)
    def init_cache(self, batch: int, max_len: int) -> KVCache:
        return self.attn.empty_cache(batch, max_len)

    def decode(self, x: jax.Array, context, cache: KVCache, pos):
        """Branch for a chunk x: [batch, t, width] at positions pos…pos+t-1, with the cache.

        Same math as ``__call__`` (no dropout). Returns (h [batch, t, width], cache).
        """
        if not self.causal:
            raise ValueError("KV-cache decoding needs a causal block (causal=True).")
        a, cache = self.attn.attend_cached(self.ln1(x), cache, pos, key_mask(context))
        m = self.mlp(self.ln2(x + a))
        return (a + m).astype(x.dtype), cache


class DecoderCache(NamedTuple):
    """KV cache of one decoder layer: causal self-attention and the fixed cross-attention.

    self_kv:  KVCache [batch, heads, max_len, head_dim].
    cross_kv: KVCache [batch, heads, src_len, head_dim] (keys/values of the encoder output).
    """

    self_kv: KVCache
    cross_kv: KVCache


class DecoderBlock(nnx.Module):
    """Residual branch of a pre-LN decoder block (causal self-attn, cross-attn, MLP):

        y = x + a(x),  a(x) = SelfAttn(LN1(x))         (causal)
        z = y + c(y),  c(y) = CrossAttn(LN2(y), enc)
        h(x) = a(x) + c(y) + m(z),  m(z) = MLP(LN3(z))

    ``context`` = (enc_out [batch, src_len, enc_width] float32, src_mask bool
    [batch, src_len] or None). Gradients reach the encoder through enc_out.
    """

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *,
                 enc_width: int | None = None, dropout: float = 0.0,
                 attention_dropout: float = 0.0, compute_dtype="float32",
                 attention: str = "xla", rngs: nnx.Rngs):
        self.dropout = dropout
        self.ln1 = LayerNorm(width, rngs=rngs)
        self.self_attn = MultiHeadAttention(width, num_heads,
                                            attention_dropout=attention_dropout,
                                            compute_dtype=compute_dtype, attention=attention,
                                            rngs=rngs)
        self.ln2 = LayerNorm(width, rngs=rngs)
        self.cross_attn = MultiHeadAttention(width, num_heads, kv_width=enc_width,
                                             attention_dropout=attention_dropout,
                                             compute_dtype=compute_dtype, attention=attention,
                                             rngs=rngs)
        self.ln3 = LayerNorm(width, rngs=rngs)
        self.mlp = MLP(width, mlp_dim, compute_dtype=compute_dtype,
                       chunked=attention == "chunked", rngs=rngs)

    @staticmethod
    def _unpack(context):
        if not (isinstance(context, tuple) and len(context) == 2):
            raise ValueError(
                "DecoderBlock needs context=(encoder_out, source_mask_or_None); "
                f"got {type(context).__name__}."
            )
        return context

    def __call__(self, x: jax.Array, context, key=None) -> jax.Array:
        """x: [batch, tgt_len, width] float32 → h: [batch, tgt_len, width] float32."""
        enc_out, src_mask = self._unpack(context)
        k_sa, k_a, k_ca, k_c, k_m = split_key(key, 5)
        t = x.shape[1]
        a = dropout(self.self_attn(self.ln1(x), mask=causal_mask(t, t), key=k_sa),
                    self.dropout, k_a)
        y = x + a
        c = dropout(self.cross_attn(self.ln2(y), enc_out, mask=key_mask(src_mask), key=k_ca),
                    self.dropout, k_c)
        m = dropout(self.mlp(self.ln3(y + c)), self.dropout, k_m)
        return (a + c + m).astype(x.dtype)

    # ---- KV-cache decoding
    def init_cache(self, batch: int, max_len: int, enc_out: jax.Array) -> DecoderCache:
        """Empty self-attention cache and the cross-attention keys/values of enc_out."""
        return DecoderCache(self.self_attn.empty_cache(batch, max_len),
                            self.cross_attn.project_kv(enc_out))

    def decode(self, x: jax.Array, context, cache: DecoderCache, pos):
        """Branch for a chunk x: [batch, t, width] at positions pos…; context = src_mask
        bool [batch, src_len] or None. Returns (h, cache)."""
        a, self_kv = self.self_attn.attend_cached(self.ln1(x), cache.self_kv, pos)
        y = x + a
        c = self.cross_attn.attend(self.ln2(y), cache.cross_kv, key_mask(context))
        m = self.mlp(self.ln3(y + c))
        return (a + c + m).astype(x.dtype), DecoderCache(self_kv, cache.cross_kv)
