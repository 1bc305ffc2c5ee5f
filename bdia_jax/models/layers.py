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
modules and blocks picks "xla" | "chunked" | "cudnn" (``bdia_jax.models.attention``), with
``chunk_size`` queries per block of "chunked". ``compute_dtype`` (e.g. bfloat16) is the
matmul dtype and ``param_dtype`` the stored parameters' dtype; norms, softmax, rotary
positions and the residual branch output stay float32.

``BlockConfig`` declares and validates, once, the block settings that every model config
shares (width, heads, MLP width, dropouts, dtype, attention implementation, chunk sizes).

Masks are boolean, True = may attend, broadcastable to [batch, heads, q_len, k_len]. A
padding mask travels through a stack's ``context`` as bool [batch, k_len] (True = real
token); the engine gives such a non-float context leaf a float0 (no) cotangent.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bdia_jax import stable
from bdia_jax.methods import StackMethod
from bdia_jax.models.attention import attend, check_attention, check_chunk_size
from bdia_jax.models.attention import dot_product_attention as dot_product_attention  # re-export
from bdia_jax.models.lora import LORA_TARGETS, LoRA, lora_key
from bdia_jax.models.lora import apply as lora_apply
from bdia_jax.models.lora import linear as lora_linear
from bdia_jax.ops import dropout as dropout  # re-export
from bdia_jax.ops import position_blocks


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


def param_dtype_of(dtype) -> jnp.dtype:
    """'float32' / 'bfloat16' → the stored parameters' jnp.dtype, with an error naming both."""
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        dtype = None
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"param_dtype must be 'float32' or 'bfloat16', got {dtype!r}.")
    return dtype


class FieldError(ValueError):
    """A bad value of one config field: ``field`` names it and ``reason`` says what is wrong
    (the message is ``"<field> <reason>."``), so a command line names its own flag."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field} {reason}.")
        self.field, self.reason = field, reason


def check_ints(config, names, low: int = 1) -> None:
    """Raise ``FieldError`` for the first of ``config``'s fields ``names`` that is not an int
    >= ``low``. Configs check these before their cross-field rules divide by them."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise FieldError(name, f"must be an int >= {low}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class BlockSettings:
    """The block settings every transformer config shares (``ViTConfig``,
    ``Seq2SeqConfig``, ``DecoderConfig`` through ``BlockConfig``; ``RevViTConfig``, which
    has its own update), declared and validated here once; each config re-declares the
    fields whose defaults differ."""

    width: int = 512  # residual stream (embedding) dimension
    num_heads: int = 8  # attention (query) heads; width must be divisible by it
    mlp_dim: int = 2048  # hidden size of each block's MLP
    dropout: float = 0.1  # embedding dropout and residual dropout on every branch
    attention_dropout: float = 0.0  # dropout on attention probabilities
    compute_dtype: str = "float32"  # matmul dtype ("bfloat16" on accelerators)
    # Softmax attention: "xla" (einsum, materializes the probabilities), "chunked" (query
    # blocks of chunk_size, O(seq·chunk) memory, any backend), "cudnn" (fused, GPU only).
    attention: str = "xla"
    chunk_size: int = 128  # queries per block of attention="chunked"
    # MLP over blocks of chunk_size positions (a recomputing custom VJP: one block's
    # [chunk, mlp_dim] activations at a time); None: chunked iff attention == "chunked".
    # Chunked, Reversible(recompute="shared") runs the MLP's forward once more per block
    # than remat (its rebuild needs the MLP's output, then the VJP recomputes the
    # activations; benchmarks.step_anatomy); False saves that for one block's
    # [len, mlp_dim] activations.
    chunk_mlp: bool | None = None
    # Low-rank adapters on the chosen projections of every block (bdia_jax.models.LoRA), or
    # None: none. Train only them with bdia_jax.training's trainable=nnx.LoRAParam.
    lora: LoRA | None = None

    def __post_init__(self):
        check_ints(self, ("width", "num_heads", "mlp_dim"))
        self._check_heads()
        canonical_dtype(self.compute_dtype)
        check_attention(self.attention, self.attention_dropout, self.dropout)
        check_chunk_size(self.chunk_size)
        if self.chunk_mlp not in (None, True, False):
            raise ValueError(f"chunk_mlp must be True, False or None (chunked iff "
                             f"attention='chunked'), got {self.chunk_mlp!r}.")
        if self.lora is not None and not isinstance(self.lora, LoRA):
            raise ValueError(f"lora must be a bdia_jax.models.LoRA or None, got "
                             f"{type(self.lora).__name__}.")
        check_lora_chunks(self.lora, self.mlp_chunk_size)
        if hasattr(super(), "__post_init__"):  # BlockConfig: StackMethod's pair check
            super().__post_init__()

    def _check_heads(self):
        if self.width % self.num_heads:
            raise ValueError(
                f"width ({self.width}) must be divisible by num_heads ({self.num_heads})."
            )

    @property
    def mlp_chunk_size(self) -> int | None:
        """Positions per block of the MLP, or None for the whole sequence at once."""
        chunked = self.attention == "chunked" if self.chunk_mlp is None else self.chunk_mlp
        return self.chunk_size if chunked else None


@dataclasses.dataclass(frozen=True)
class BlockConfig(BlockSettings, StackMethod):
    """``BlockSettings`` with the training method: the keyword-only ``update`` /
    ``backprop`` pair of ``StackMethod`` (``ViTConfig``, ``Seq2SeqConfig``,
    ``DecoderConfig``)."""


def check_lora_chunks(lora: LoRA | None, mlp_chunk_size: int | None) -> None:
    """LoRA dropout on an MLP projection needs the whole-sequence MLP (its masks are drawn
    per call, which the position-blocked MLP would repeat on every block)."""
    if lora is not None and lora.dropout and mlp_chunk_size is not None \
            and set(lora.targets) & {"gate", "up", "down"}:
        raise ValueError("LoRA dropout on MLP targets needs chunk_mlp=False (the MLP over "
                         "position blocks would repeat its masks); or set LoRA dropout=0.0.")


ROPE_SCALINGS = ("default", "llama3", "linear")


@dataclasses.dataclass(frozen=True)
class Rope:
    """Rotary position embedding (Hugging Face's rotate-half layout) of one head size.

    The cos/sin tables are numpy constants, computed once in float64 and rounded to float32,
    for positions 0 … max_len-1: every program (the forward pass, the VJP that recomputes a
    block, KV-cached decoding) slices the same bits, whatever XLA would make of cos/sin.
    scaling: "default" (none), "linear" (positions / factor) or "llama3" (Llama 3.1's
    frequency-dependent scaling with factor, low/high_freq_factor, original_max_len).
    """

    head_dim: int
    max_len: int
    theta: float = 10000.0
    scaling: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def inv_freq(self) -> np.ndarray:
        """[head_dim // 2] float64 angular frequencies, after the scaling."""
        inv = 1.0 / self.theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64)
                                   / self.head_dim)
        if self.scaling == "linear":
            return inv / self.factor
        if self.scaling == "llama3":
            low_wavelen = self.original_max_len / self.low_freq_factor
            high_wavelen = self.original_max_len / self.high_freq_factor
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / self.factor, inv)
            smooth = ((self.original_max_len / wavelen - self.low_freq_factor)
                      / (self.high_freq_factor - self.low_freq_factor))
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            return np.where(medium, smoothed, scaled)
        return inv

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(cos, sin): [max_len, head_dim // 2] float32 numpy."""
        return _rope_tables(self)

    def __call__(self, x: jax.Array, start=0) -> jax.Array:
        """Rotate x: [batch, heads, t, head_dim] at positions start … start+t-1 (start may
        be traced); computed in float32, returned in x's dtype."""
        cos, sin = self.tables()
        t = x.shape[2]
        if isinstance(start, int):
            cos, sin = jnp.asarray(cos[start:start + t]), jnp.asarray(sin[start:start + t])
        else:
            cos = jax.lax.dynamic_slice_in_dim(jnp.asarray(cos), start, t)
            sin = jax.lax.dynamic_slice_in_dim(jnp.asarray(sin), start, t)
        y = x.astype(jnp.float32)
        half = self.head_dim // 2
        y1, y2 = y[..., :half], y[..., half:]
        out = jnp.concatenate([y1 * cos - y2 * sin, y2 * cos + y1 * sin], axis=-1)
        return out.astype(x.dtype)


@functools.lru_cache(maxsize=16)
def _rope_tables(rope: Rope) -> tuple[np.ndarray, np.ndarray]:
    angles = np.arange(rope.max_len, dtype=np.float64)[:, None] * rope.inv_freq()[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class MultiHeadAttention(nnx.Module):
    """Multi-head attention: self-attention (``kv`` = None) or cross-attention.

    Projections q: width → num_heads·head_dim, k, v: kv_width → num_kv_heads·head_dim,
    o: num_heads·head_dim → width (by default 4·(width² + width) params). Options:
    ``num_kv_heads`` (grouped-query attention, num_heads a multiple of it; None = num_heads),
    ``head_dim`` (None = width // num_heads), ``qkv_bias`` / ``out_bias``, ``qk_norm_eps``
    (per-head RMSNorm of queries and keys before the rotation, Qwen3; None = none),
    ``rope`` (a ``Rope`` applied to queries and keys; None = no rotation),
    ``attention``: "xla" | "chunked" | "cudnn" with ``chunk_size`` queries per block.
    """

    def __init__(self, width: int, num_heads: int, *, kv_width: int | None = None,
                 num_kv_heads: int | None = None, head_dim: int | None = None,
                 qkv_bias: bool = True, out_bias: bool = True, qk_norm_eps: float | None = None,
                 rope: Rope | None = None, attention_dropout: float = 0.0,
                 compute_dtype="float32", param_dtype="float32", attention: str = "xla",
                 chunk_size: int = 128, lora: LoRA | None = None, rngs: nnx.Rngs):
        if head_dim is None and width % num_heads:
            raise ValueError(
                f"width ({width}) must be divisible by num_heads ({num_heads}); "
                f"change one of them."
            )
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads}).")
        kv_width = width if kv_width is None else kv_width
        dtype = canonical_dtype(compute_dtype)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = width // num_heads if head_dim is None else head_dim
        self.attention_dropout = attention_dropout
        self.compute_dtype = dtype
        check_attention(attention, attention_dropout)
        self.attention = attention  # "xla" | "chunked" | "cudnn" (bdia_jax.models.attention)
        self.chunk_size = check_chunk_size(chunk_size)
        self.rope = rope
        p_dtype = param_dtype_of(param_dtype)

        def linear(n_in, n_out, bias, target):
            return lora_linear(n_in, n_out, target=target, lora=lora, use_bias=bias,
                               dtype=dtype, param_dtype=p_dtype, rngs=rngs)

        q_width, kv_out = num_heads * self.head_dim, num_kv_heads * self.head_dim
        self.query = linear(width, q_width, qkv_bias, "q")
        self.key = linear(kv_width, kv_out, qkv_bias, "k")
        self.value = linear(kv_width, kv_out, qkv_bias, "v")
        self.out = linear(q_width, width, out_bias, "o")
        if qk_norm_eps is not None:
            self.query_norm = RMSNorm(self.head_dim, epsilon=qk_norm_eps,
                                      param_dtype=p_dtype, rngs=rngs)
            self.key_norm = RMSNorm(self.head_dim, epsilon=qk_norm_eps,
                                    param_dtype=p_dtype, rngs=rngs)
        self.qk_norm = qk_norm_eps is not None

    def _heads(self, y: jax.Array, num: int) -> jax.Array:
        """[batch, len, num·head_dim] → [batch, num, len, head_dim]."""
        b, t, _ = y.shape
        return y.reshape(b, t, num, self.head_dim).transpose(0, 2, 1, 3)

    def _position(self, y: jax.Array, norm, start) -> jax.Array:
        """q/k norm (float32) then the rotation, back in the compute dtype."""
        if self.qk_norm:
            y = norm(y).astype(y.dtype)
        if self.rope is not None:
            y = self.rope(y, start)
        return y

    def project_kv(self, y: jax.Array, start=0, lora_key=None) -> KVCache:
        """y: [batch, k_len, kv_width] at positions start … → KVCache of
        [batch, num_kv_heads, k_len, head_dim] (keys normed and rotated). ``lora_key``: the
        block's LoRA dropout key or None."""
        k = self._heads(lora_apply(self.key, y, lora_key), self.num_kv_heads)
        k = self._position(k, self.key_norm if self.qk_norm else None, start)
        return KVCache(k, self._heads(lora_apply(self.value, y, lora_key), self.num_kv_heads))

    def attend(self, x: jax.Array, kv: KVCache, mask, key=None, start=0,
               lora_key=None, causal: bool = False) -> jax.Array:
        """Queries from x: [batch, q_len, width] at positions start … against kv →
        [batch, q_len, width] float32. ``causal``: the attention adds the causal mask of
        queries at positions start … (built per query block, never as [q_len, k_len])."""
        q = self._heads(lora_apply(self.query, x, lora_key), self.num_heads)
        q = self._position(q, self.query_norm if self.qk_norm else None, start)
        # Grouped-query attention: attend groups the query heads itself (no repeated k/v).
        o = attend(q, kv.key, kv.value, mask, attention=self.attention,
                   chunk_size=self.chunk_size, dropout_rate=self.attention_dropout, key=key,
                   causal=causal, offset=start)
        b, _, t, _ = o.shape
        o = o.transpose(0, 2, 1, 3).reshape(b, t, self.num_heads * self.head_dim)
        return lora_apply(self.out, o, lora_key).astype(jnp.float32)

    def __call__(self, x: jax.Array, kv_input: jax.Array | None = None, mask=None,
                 key=None, lora_key=None, causal: bool = False) -> jax.Array:
        """x: [batch, q_len, width]; kv_input: [batch, k_len, kv_width] or None (self-attn);
        ``causal``: causal self-attention (see ``attend``).

        Returns [batch, q_len, width] float32.
        """
        kv = self.project_kv(x if kv_input is None else kv_input, lora_key=lora_key)
        return self.attend(x, kv, mask, key, lora_key=lora_key, causal=causal)

    def attend_cached(self, x: jax.Array, cache: KVCache, pos, mask=None):
        """Causal self-attention of a chunk x: [batch, t, width] at positions pos … pos+t-1.

        Writes the chunk's keys/values into ``cache`` ([batch, num_kv_heads, max_len,
        head_dim]) and attends over cache positions <= each query's position (plus
        ``mask``). Returns (out [batch, t, width] float32, updated cache). No dropout:
        inference only.
        """
        new = self.project_kv(x, pos)
        index = (0, 0, pos, 0)
        cache = KVCache(
            jax.lax.dynamic_update_slice(cache.key, new.key.astype(cache.key.dtype), index),
            jax.lax.dynamic_update_slice(cache.value, new.value.astype(cache.value.dtype), index),
        )
        return self.attend(x, cache, mask, start=pos, causal=True), cache

    def empty_cache(self, batch: int, max_len: int) -> KVCache:
        """Zero KVCache [batch, num_kv_heads, max_len, head_dim] in the compute dtype."""
        shape = (batch, self.num_kv_heads, max_len, self.head_dim)
        return KVCache(jnp.zeros(shape, self.compute_dtype), jnp.zeros(shape, self.compute_dtype))


def mlp_cotangent(cotangent, rate: float, key) -> jax.Array | None:
    """dL/d(MLP output) of a block h = … + dropout(mlp(·), rate, key), from dL/dh
    [batch, len, width] (None passes through): the residual dropout's transpose, the same
    mask and scale (``dropout`` is linear and elementwise)."""
    if cotangent is None:
        return None
    return dropout(cotangent.astype(jnp.float32), rate, key)


class _PositionwiseMLP(nnx.Module):
    """The position-blocked call shared by the MLPs: ``chunk_size`` None runs ``_dense`` on
    the whole sequence; an int runs it over blocks of that many positions
    (``bdia_jax.ops.position_blocks``), so that one block's [batch, chunk, mlp_dim] hidden
    activations live at a time, in the forward and in the backward pass. Each row goes
    through the same ops either way; the backward pass runs each block's forward once more,
    unless the output's cotangent is given in advance (``cotangent``)."""

    def __call__(self, y: jax.Array, lora_key=None, cotangent=None) -> jax.Array:
        """y: [..., len, width] → [..., len, width] float32; ``lora_key``: the block's LoRA
        dropout key or None (whole-sequence MLP only, see ``check_lora_chunks``).

        cotangent: None, or dL/d(output) [..., len, width] float32 known in advance
        (``recompute="fused"``): the blocked MLP then computes its output and VJP in one
        loop, and its VJP must be pulled back with exactly this cotangent
        (``bdia_jax.ops.position_blocks``). The whole-sequence MLP ignores it: its VJP
        already reuses the one forward evaluation."""
        chunk = self.chunk_size
        if chunk is None or y.ndim < 2 or y.shape[-2] <= chunk:
            return self._dense(y, lora_key)
        graphdef, state = nnx.split(self)

        def dense(state, y_c):
            return nnx.merge(graphdef, state)._dense(y_c)

        return position_blocks(dense, state, y, chunk, cotangent=cotangent)


class MLP(_PositionwiseMLP):
    """Linear(width → mlp_dim) → GELU → Linear(mlp_dim → width); returns float32.

    ``approximate_gelu``: True = the tanh approximation (GPT-2's ``gelu_new``), False = the
    exact erf GELU. ``use_bias``: biases on both Linears. ``chunk_size``: see
    ``_PositionwiseMLP`` (None: whole sequence).
    """

    def __init__(self, width: int, mlp_dim: int, *, compute_dtype="float32",
                 param_dtype="float32", approximate_gelu: bool = True, use_bias: bool = True,
                 chunk_size: int | None = None, lora: LoRA | None = None, rngs: nnx.Rngs):
        dtype, p_dtype = canonical_dtype(compute_dtype), param_dtype_of(param_dtype)
        self.approximate_gelu = approximate_gelu
        self.chunk_size = None if chunk_size is None else check_chunk_size(chunk_size)
        if lora is not None and "gate" in lora.targets:
            raise ValueError("LoRA target 'gate' needs a gated MLP (mlp='swiglu'); a GELU MLP "
                             "has 'up' (fc1) and 'down' (fc2).")
        check_lora_chunks(lora, self.chunk_size)
        options = dict(use_bias=use_bias, dtype=dtype, param_dtype=p_dtype, lora=lora, rngs=rngs)
        self.fc1 = lora_linear(width, mlp_dim, target="up", **options)
        self.fc2 = lora_linear(mlp_dim, width, target="down", **options)

    def _dense(self, y: jax.Array, lora_key=None) -> jax.Array:
        hidden = jax.nn.gelu(lora_apply(self.fc1, y, lora_key), approximate=self.approximate_gelu)
        return lora_apply(self.fc2, hidden, lora_key).astype(jnp.float32)


class GatedMLP(_PositionwiseMLP):
    """SwiGLU: down(silu(gate(y)) · up(y)) with Linears gate, up: width → mlp_dim and down:
    mlp_dim → width (Llama's MLP); returns float32. ``use_bias`` and ``chunk_size`` as
    ``MLP``."""

    def __init__(self, width: int, mlp_dim: int, *, compute_dtype="float32",
                 param_dtype="float32", use_bias: bool = False,
                 chunk_size: int | None = None, lora: LoRA | None = None, rngs: nnx.Rngs):
        dtype, p_dtype = canonical_dtype(compute_dtype), param_dtype_of(param_dtype)
        self.chunk_size = None if chunk_size is None else check_chunk_size(chunk_size)
        check_lora_chunks(lora, self.chunk_size)

        def linear(n_in, n_out, target):
            return lora_linear(n_in, n_out, target=target, lora=lora, use_bias=use_bias,
                               dtype=dtype, param_dtype=p_dtype, rngs=rngs)

        self.gate = linear(width, mlp_dim, "gate")
        self.up = linear(width, mlp_dim, "up")
        self.down = linear(mlp_dim, width, "down")

    def _dense(self, y: jax.Array, lora_key=None) -> jax.Array:
        gated = jax.nn.silu(lora_apply(self.gate, y, lora_key)) * lora_apply(self.up, y, lora_key)
        return lora_apply(self.down, gated, lora_key).astype(jnp.float32)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis in float32, with ``scale`` and ``bias`` Params (the
    parameter names of ``nnx.LayerNorm``; stored in ``param_dtype``). Its mean and variance
    are pairwise tree sums (``bdia_jax.stable``), so its bits do not change when XLA also
    compiles its VJP: this is what lets the models' reversible stacks use
    ``recompute="shared"``."""

    def __init__(self, width: int, *, epsilon: float = 1e-6, param_dtype="float32",
                 rngs: nnx.Rngs):
        del rngs  # deterministic initialisation; kept for the nnx constructor convention
        dtype = param_dtype_of(param_dtype)
        self.scale = nnx.Param(jnp.ones((width,), dtype))
        self.bias = nnx.Param(jnp.zeros((width,), dtype))
        self.epsilon = epsilon

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., width] → [..., width] float32."""
        return stable.tree_layer_norm(x.astype(jnp.float32), self.scale[...].astype(jnp.float32),
                                      self.bias[...].astype(jnp.float32), self.epsilon)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis in float32 with a ``scale`` Param (Llama's; stored in
    ``param_dtype``); its mean square is a pairwise tree sum (``bdia_jax.stable``), exact
    under ``recompute="shared"`` like ``LayerNorm``."""

    def __init__(self, width: int, *, epsilon: float = 1e-6, param_dtype="float32",
                 rngs: nnx.Rngs):
        del rngs  # deterministic initialisation
        self.scale = nnx.Param(jnp.ones((width,), param_dtype_of(param_dtype)))
        self.epsilon = epsilon

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., width] → [..., width] float32."""
        return stable.tree_rms_norm(x.astype(jnp.float32), self.scale[...].astype(jnp.float32),
                                    self.epsilon)


NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
BIASES = ("all", "none", "qkv")


class EncoderBlock(nnx.Module):
    """Residual branch of a pre-norm self-attention block: h(x) = a(x) + m(x + a(x)).

    ``context``: None, or a bool [batch, len] key-padding mask (True = real token).
    ``causal=True`` adds the causal mask (decoder-only LM).
    Dropout: ``attention_dropout`` on attention probabilities, ``dropout`` on a(x) and on
    m(·) (residual dropout), all drawn from the block key. The defaults are the pre-LN
    ViT/GPT block; the options make it GPT-2's (``layer_norm_eps=1e-5``,
    ``approximate_gelu=True``) or a Llama-family block: ``norm`` ("layernorm" |
    "rmsnorm"), ``mlp`` ("gelu" | "swiglu"), ``bias`` ("all": every Linear; "none"; "qkv":
    the query/key/value projections only), ``num_kv_heads``, ``head_dim``, ``qk_norm``,
    ``rope`` (see ``MultiHeadAttention``), ``param_dtype``; ``chunk_size`` (queries per
    block of attention="chunked") and ``mlp_chunk_size`` (``MLP``). ``from_config`` builds
    it from a ``BlockConfig``.
    """

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, causal: bool = False,
                 dropout: float = 0.0, attention_dropout: float = 0.0,
                 compute_dtype="float32", layer_norm_eps: float = 1e-6,
                 approximate_gelu: bool = True, attention: str = "xla",
                 chunk_size: int = 128, mlp_chunk_size: int | None = None,
                 norm: str = "layernorm", mlp: str = "gelu", bias: str = "all",
                 num_kv_heads: int | None = None, head_dim: int | None = None,
                 qk_norm: bool = False, rope: Rope | None = None, param_dtype="float32",
                 lora: LoRA | None = None, rngs: nnx.Rngs):
        if norm not in NORMS or mlp not in MLPS or bias not in BIASES:
            raise ValueError(f"norm must be one of {NORMS}, mlp one of {MLPS}, bias one of "
                             f"{BIASES}; got {norm!r}, {mlp!r}, {bias!r}.")
        self.causal = causal
        self.dropout = dropout
        self.lora = lora
        norm_cls = LayerNorm if norm == "layernorm" else RMSNorm
        self.ln1 = norm_cls(width, epsilon=layer_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.attn = MultiHeadAttention(
            width, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            qkv_bias=bias != "none", out_bias=bias == "all",
            qk_norm_eps=layer_norm_eps if qk_norm else None, rope=rope,
            attention_dropout=attention_dropout, compute_dtype=compute_dtype,
            param_dtype=param_dtype, attention=attention, chunk_size=chunk_size, lora=lora,
            rngs=rngs)
        self.ln2 = norm_cls(width, epsilon=layer_norm_eps, param_dtype=param_dtype, rngs=rngs)
        if mlp == "gelu":
            self.mlp = MLP(width, mlp_dim, compute_dtype=compute_dtype, param_dtype=param_dtype,
                           approximate_gelu=approximate_gelu, use_bias=bias == "all",
                           chunk_size=mlp_chunk_size, lora=lora, rngs=rngs)
        else:
            self.mlp = GatedMLP(width, mlp_dim, compute_dtype=compute_dtype,
                                param_dtype=param_dtype, use_bias=bias == "all",
                                chunk_size=mlp_chunk_size, lora=lora, rngs=rngs)

    @classmethod
    def from_config(cls, config: BlockConfig, *, causal: bool = False, rngs: nnx.Rngs,
                    **options) -> EncoderBlock:
        """The block of a ``BlockConfig``'s shared settings, plus model-specific options."""
        c = config
        return cls(c.width, c.num_heads, c.mlp_dim, causal=causal, dropout=c.dropout,
                   attention_dropout=c.attention_dropout, compute_dtype=c.compute_dtype,
                   attention=c.attention, chunk_size=c.chunk_size,
                   mlp_chunk_size=c.mlp_chunk_size, lora=c.lora, rngs=rngs, **options)

    def __call__(self, x: jax.Array, context=None, key=None, cotangent=None) -> jax.Array:
        """x: [batch, len, width] float32 → h: [batch, len, width] float32. ``cotangent``:
        None, or dL/dh known in advance (``recompute="fused"``, see ``mlp_cotangent``)."""
        k_attn, k_a, k_m = split_key(key, 3)
        k_lora = lora_key(key, self.lora)
        a = dropout(self.attn(self.ln1(x), mask=key_mask(context), key=k_attn,
                              lora_key=k_lora, causal=self.causal), self.dropout, k_a)
        m = dropout(self.mlp(self.ln2(x + a), k_lora,
                             mlp_cotangent(cotangent, self.dropout, k_m)), self.dropout, k_m)
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
                 attention: str = "xla", chunk_size: int = 128,
                 mlp_chunk_size: int | None = None, lora: LoRA | None = None,
                 rngs: nnx.Rngs):
        self.dropout = dropout
        self.lora = lora
        self.ln1 = LayerNorm(width, rngs=rngs)
        self.self_attn = MultiHeadAttention(width, num_heads,
                                            attention_dropout=attention_dropout,
                                            compute_dtype=compute_dtype, attention=attention,
                                            chunk_size=chunk_size, lora=lora, rngs=rngs)
        self.ln2 = LayerNorm(width, rngs=rngs)
        self.cross_attn = MultiHeadAttention(width, num_heads, kv_width=enc_width,
                                             attention_dropout=attention_dropout,
                                             compute_dtype=compute_dtype, attention=attention,
                                             chunk_size=chunk_size, lora=lora, rngs=rngs)
        self.ln3 = LayerNorm(width, rngs=rngs)
        self.mlp = MLP(width, mlp_dim, compute_dtype=compute_dtype,
                       chunk_size=mlp_chunk_size, lora=lora, rngs=rngs)

    @staticmethod
    def _unpack(context):
        if not (isinstance(context, tuple) and len(context) == 2):
            raise ValueError(
                "DecoderBlock needs context=(encoder_out, source_mask_or_None); "
                f"got {type(context).__name__}."
            )
        return context

    def __call__(self, x: jax.Array, context, key=None, cotangent=None) -> jax.Array:
        """x: [batch, tgt_len, width] float32 → h: [batch, tgt_len, width] float32.
        ``cotangent``: None, or dL/dh known in advance (see ``EncoderBlock``)."""
        enc_out, src_mask = self._unpack(context)
        k_sa, k_a, k_ca, k_c, k_m = split_key(key, 5)
        k_self = lora_key(key, self.lora)  # the cross-attention's masks fold in once more
        k_cross = None if k_self is None else jax.random.fold_in(k_self, len(LORA_TARGETS))
        a = dropout(self.self_attn(self.ln1(x), key=k_sa, lora_key=k_self, causal=True),
                    self.dropout, k_a)
        y = x + a
        c = dropout(self.cross_attn(self.ln2(y), enc_out, mask=key_mask(src_mask), key=k_ca,
                                    lora_key=k_cross), self.dropout, k_c)
        m = dropout(self.mlp(self.ln3(y + c), k_self,
                             mlp_cotangent(cotangent, self.dropout, k_m)), self.dropout, k_m)
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
