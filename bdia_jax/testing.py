"""Small pure-jnp residual branches for tests, benchmarks and examples.

They follow the ``block_fn(params_k, x, context, key_k) -> h`` contract of ``bdia_stack`` and
are independent of the Flax models, so the engine can be tested and benchmarked on its own;
their dropout is the models' (``bdia_jax.ops.dropout``), so both draw masks alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bdia_jax import stable
from bdia_jax.ops import dropout as attention_dropout


def mean_layer_norm(x, eps=1e-6):
    """LayerNorm without scale and bias, statistics by ``jnp.mean`` (fusion-sensitive on
    XLA:CPU, see ``bdia_jax.stable``): x [..., d] → [..., d]."""
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def init_attn_mlp(key, depth: int, dim: int, hidden: int, scale: float = 1.0):
    """Depth-stacked params of a pre-LN attention+MLP branch."""
    ks = jax.random.split(key, 4)

    def w(k, shape):
        return jax.random.normal(k, (depth,) + shape) * scale / jnp.sqrt(shape[0])

    return {
        "qkv": w(ks[0], (dim, 3 * dim)),
        "out": w(ks[1], (dim, dim)),
        "fc1": w(ks[2], (dim, hidden)),
        "fc2": w(ks[3], (hidden, dim)),
        "b1": jnp.zeros((depth, hidden)),
    }


def _attention(p, y, heads, context=None, compute_dtype=jnp.float32):
    b, t, d = y.shape
    qkv = (y.astype(compute_dtype) @ p["qkv"].astype(compute_dtype)).astype(jnp.float32)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    if context is not None:  # cross-attention-like: keys/values from the context
        _, k, v = jnp.split(context @ p["qkv"], 3, axis=-1)

    def split_heads(a):
        return a.reshape(a.shape[0], a.shape[1], heads, -1).transpose(0, 2, 1, 3)

    q, k, v = map(split_heads, (q, k, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
    out = jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(logits, -1), v)
    out = out.transpose(0, 2, 1, 3).reshape(b, t, d)
    return (out.astype(compute_dtype) @ p["out"].astype(compute_dtype)).astype(jnp.float32)


def make_attn_mlp_block(heads: int = 2, dropout: float = 0.0, compute_dtype=jnp.float32,
                        use_context: bool = False, stable_stats: bool = False):
    """h(x) = a(x) + m(x + a(x)), a = Attn(LN(x)), m = MLP(LN(.)): the pre-LN branch.

    stable_stats: LayerNorm statistics from ``bdia_jax.stable`` (pairwise tree sums) instead of
    ``jnp.mean``, which makes the block eligible for ``recompute="shared"``.
    """

    def block(p, x, context, key):
        norm = stable.tree_layer_norm if stable_stats else mean_layer_norm
        a = _attention(p, norm(x), heads, context if use_context else None, compute_dtype)
        y = norm(x + a)
        hidden = jax.nn.gelu(
            (y.astype(compute_dtype) @ p["fc1"].astype(compute_dtype)).astype(jnp.float32)
            + p["b1"]
        )
        hidden = attention_dropout(hidden, dropout, key)
        m = (hidden.astype(compute_dtype) @ p["fc2"].astype(compute_dtype)).astype(jnp.float32)
        return (a + m).astype(x.dtype)

    return block


def init_mlp(key, depth: int, dim: int, scale: float = 1.0):
    return {"w": jax.random.normal(key, (depth, dim, dim)) * scale / jnp.sqrt(dim)}


def make_tanh_block(amplitude: float = 1.0):
    """A cheap bounded branch h(x) = amplitude * tanh(x W / amplitude)."""

    def block(p, x, context, key):
        return amplitude * jnp.tanh((x / amplitude) @ p["w"])

    return block


def bits(tree):
    """Bit patterns of a pytree's float leaves (uint of the same width), for exactness checks
    that also tell -0.0 from +0.0 and compare NaN payloads."""
    def view(a):
        a = jnp.asarray(a)
        if not jnp.issubdtype(a.dtype, jnp.floating):
            return a
        return jax.lax.bitcast_convert_type(a, jnp.dtype(f"uint{a.dtype.itemsize * 8}"))

    return jax.tree_util.tree_map(view, tree)


def assert_bits_equal(actual, expected):
    """chex.assert_trees_all_equal on the bit patterns (see ``bits``)."""
    import chex

    chex.assert_trees_all_equal(bits(actual), bits(expected))
