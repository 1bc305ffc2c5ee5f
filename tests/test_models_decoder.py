"""The decoder-only LM's Llama-family configurations: GQA, rotary positions (with scaling),
SwiGLU, RMSNorm, q/k norm, bias variants, untied heads, bfloat16 parameters. Exact BDIA
reversal in both recompute modes, unquantized BDIA inference = the standard model bit for
bit, KV-cached decoding = the full pass, and one-line config errors.

GPT-2's configuration of the same model is tested in tests/test_models_gpt.py."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from float_bounds import ELEMENTWISE_ULPS, model_grad_rtol, network_bound, transformer_chain
from grad_utils import assert_grads_close
from models_utils import (
    assert_all_params_get_gradients,
    jitted,
    probe_total,
    train_grads_by_key,
)

from bdia_jax import stable
from bdia_jax.models import DecoderLM, Rope, decoder_config
from bdia_jax.testing import assert_bits_equal

# Llama-family variants of the tiny test model ("llama-tiny": 4 query heads on 2 key/value
# heads, rope, SwiGLU, RMSNorm, no biases, untied head).
VARIANTS = {
    "llama": dict(),
    "qwen2": dict(bias="qkv", tie_embeddings=True),  # q/k/v biases, tied head
    "qwen3": dict(qk_norm=True, head_dim=16),  # q/k RMSNorm; heads·head_dim = 64 != width
    "mha-llama3": dict(num_kv_heads=4, rope_scaling="llama3", rope_factor=8.0,
                       rope_original_max_len=8, rope_theta=500000.0),
    "bf16-params": dict(param_dtype="bfloat16", bias="qkv", tie_embeddings=True),
}
DROPOUT = dict(dropout=0.1, attention_dropout=0.1)


def tokens(batch=2, length=8, vocab=32, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab, jnp.int32)


def model(variant, seed=0, **overrides):
    return DecoderLM(decoder_config("llama-tiny", **{**VARIANTS[variant], **overrides}),
                     rngs=nnx.Rngs(seed))


def abstract(variant):
    """The model's shapes and dtypes only (no initialisation compute)."""
    return nnx.eval_shape(lambda: model(variant))


def test_llama_tiny_has_the_llama_structure():
    m = abstract("llama")
    c = m.config
    assert (c.kv_heads, c.head_size) == (2, 8)
    blocks = m.stack.blocks
    assert blocks.attn.key.kernel.get_value().shape == (2, 32, 2 * 8)  # [depth, width, kv·head_dim]
    assert blocks.attn.query.bias is None and blocks.mlp.down.bias is None
    assert not hasattr(blocks.ln1, "bias") and not hasattr(m, "pos_embed")
    assert m.head.kernel.get_value().shape == (32, 32)
    q2 = abstract("qwen2")
    assert q2.stack.blocks.attn.value.bias.get_value().shape == (2, 16)
    assert q2.stack.blocks.attn.out.bias is None and not hasattr(q2, "head")
    q3 = abstract("qwen3")
    assert q3.stack.blocks.attn.query.kernel.get_value().shape == (2, 32, 64)
    assert q3.stack.blocks.attn.key_norm.scale.get_value().shape == (2, 16)
    bf = abstract("bf16-params")
    for leaf in jax.tree_util.tree_leaves(nnx.state(bf, nnx.Param)):
        assert leaf.dtype == jnp.bfloat16
    hidden, _ = nnx.eval_shape(lambda m: m.hidden_states(tokens()), bf)
    assert hidden.dtype == jnp.float32


def reversible_grads(variant, recompute, x, key, **overrides):
    m = model(variant, update="bdia", backprop="reversible", recompute=recompute, **DROPOUT,
              **overrides)
    return train_grads_by_key(m, lambda m, k: m(x, key=k, train=True))(key)


def test_reversal_is_exact_in_both_recompute_modes():
    """BDIA with Reversible(): the reversal probe reads exactly 0 with dropout on, in both
    recompute modes (RMSNorm statistics are tree sums; the rope tables are constants), and
    both modes compute the same bits. One model holds both variants' features (MHA, llama3
    rope scaling, bfloat16 parameters, q/k/v biases, a tied head): two compiled programs,
    not four (GQA and q/k norm reverse in test_reversible_gradients_equal_autodiff)."""
    x, key = tokens(), jax.random.key(5)
    both = {**VARIANTS["mha-llama3"], **VARIANTS["bf16-params"]}
    separate = reversible_grads("llama", "separate", x, key, **both)
    shared = reversible_grads("llama", "shared", x, key, **both)
    for _, aux, _, probes in (separate, shared):
        assert probe_total(probes) == 0.0
        assert not bool(aux["overflow"]) and not bool(aux["nonfinite"])
    assert_bits_equal(shared[:3], separate[:3])
    assert_all_params_get_gradients(shared[2])
    assert {g.dtype for g in jax.tree_util.tree_leaves(shared[2])} == {jnp.dtype(jnp.bfloat16)}


def test_reversible_gradients_equal_autodiff():
    """GQA, q/k norm, an untied head and rope: Reversible() (shared) has autodiff's forward
    bits and its gradients to float32 rounding; with rope the key biases have true
    gradients, so every leaf is compared."""
    x, key = tokens(), jax.random.key(5)
    logits, aux, grads, probes = reversible_grads("qwen3", "shared", x, key)
    assert probe_total(probes) == 0.0
    m = model("qwen3", update="bdia", backprop="autodiff", **DROPOUT)
    logits_a, aux_a, grads_a, _ = train_grads_by_key(
        m, lambda m, k: m(x, key=k, train=True))(key)
    assert_bits_equal((logits, aux), (logits_a, aux_a))
    # llama-tiny's qwen3 variant on 2 x 8 tokens: 2 blocks, q/k/v 4·16 = 64 wide (counted as
    # the width), MLP 64; per block the q/k RMSNorms (16 sums and an rsqrt each), rope (3
    # float ops) and SwiGLU's product add to transformer_chain's pre-LN block.
    chain = transformer_chain(width=64, mlp_dim=64, seq=8, depth=2, heads=4) + \
        2 * (2 * (16 + ELEMENTWISE_ULPS) + 3 + 1)
    assert_grads_close(grads, grads_a, rtol=model_grad_rtol(chain, positions=2 * 8))


# "llama" is left out: "qwen3" is llama-tiny plus q/k norms and a wider head_dim, so it runs
# every op of it.
@pytest.mark.parametrize("variant", ["qwen3", "bf16-params"])
def test_unquantized_bdia_inference_is_the_standard_model(variant):
    std = model(variant, update="standard")
    bdia = model(variant, seed=1, update="bdia", quantize_at_inference=False)
    nnx.update(bdia, nnx.state(std, nnx.Param))
    x = tokens(length=16)
    assert_bits_equal(jitted(bdia)(x), jitted(std)(x))
    quantized = model(variant, seed=1, update="bdia")
    nnx.update(quantized, nnx.state(std, nnx.Param))
    assert not np.array_equal(jitted(quantized)(x), jitted(std)(x))


def decode_tolerance(logits, config) -> float:
    """Cached and full passes run the same ops on different shapes (keys padded to max_len,
    one query row at a time), so XLA may order each sum differently: two float32 evaluations
    of the network (``float_bounds.network_bound``), its chain that of a pre-LN transformer
    of the config's sizes over max_len keys."""
    chain = transformer_chain(width=config.width, mlp_dim=config.mlp_dim, seq=config.max_len,
                              depth=config.depth, heads=config.num_heads,
                              head_dim=config.head_size)
    return network_bound(logits, chain=chain)


# GQA with BDIA; and one standard model with the features of "qwen3" (q/k norms, a head_dim
# wider than width / heads) and "mha-llama3" (MHA, llama3 rope scaling) together.
@pytest.mark.parametrize("variant, update, overrides", [
    ("llama", "bdia", {}), ("qwen3", "standard", VARIANTS["mha-llama3"])])
def test_kv_cache_decoding_equals_the_full_pass(variant, update, overrides):
    m = model(variant, seed=3, update=update, **overrides)
    prompt = tokens(batch=3, length=4, seed=1)
    cached = m.generate(prompt, 12, temperature=0.0)
    apply = jitted(m)
    full = apply(cached)
    # Greedy tokens: each new token is the argmax of the full pass at its position.
    np.testing.assert_array_equal(cached[:, 4:], np.argmax(full[:, 3:-1], -1))
    cache = m.init_cache(3)
    assert cache.key.shape == (2, 3, m.config.kv_heads, 16, m.config.head_size)
    first, cache = m.decode_step(cache, cached[:, :5], 0)
    second, cache = m.decode_step(cache, cached[:, 5:6], 5)
    third, _ = m.decode_step(cache, cached[:, 6:], 6)
    np.testing.assert_allclose(jnp.concatenate([first, second, third], 1), full, rtol=0,
                               atol=decode_tolerance(full, m.config))


def test_rope_is_a_rotation_of_each_frequency_pair():
    """Independent check: pairs (x_i, x_{i+d/2}) as complex numbers times exp(i·p·θ_i),
    in float64; the float32 rotation is within a few ulps of it."""
    rope = Rope(head_dim=8, max_len=40, theta=10000.0)
    x = np.asarray(jax.random.normal(jax.random.key(0), (1, 2, 40, 8)), np.float32)
    got = np.asarray(rope(jnp.asarray(x)))
    theta = 10000.0 ** (-np.arange(4) * 2 / 8)
    z = (x[..., :4] + 1j * x[..., 4:]).astype(np.complex128)
    z = z * np.exp(1j * np.arange(40)[:, None] * theta)
    want = np.concatenate([z.real, z.imag], -1)
    # Two products and a sum of O(|x|) terms, plus cos/sin rounded to float32.
    np.testing.assert_allclose(got, want, rtol=0, atol=8 * 2.0**-24 * np.max(np.abs(x)) * 2)
    # Decoding at an offset slices the same table bits as the full pass.
    at_7 = rope(jnp.asarray(x[:, :, 7:9]), jnp.int32(7))
    assert_bits_equal(at_7, got[:, :, 7:9])


def test_rope_scalings():
    base = Rope(head_dim=64, max_len=4, theta=500000.0).inv_freq()
    linear = Rope(head_dim=64, max_len=4, theta=500000.0, scaling="linear",
                  factor=4.0).inv_freq()
    np.testing.assert_array_equal(linear, base / 4.0)
    llama3 = Rope(head_dim=64, max_len=4, theta=500000.0, scaling="llama3", factor=8.0,
                  low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_len=8192).inv_freq()
    wavelen = 2 * math.pi / base
    high, low = wavelen < 8192 / 4.0, wavelen > 8192 / 1.0
    assert high.any() and low.any() and (~high & ~low).any()
    np.testing.assert_array_equal(llama3[high], base[high])  # short wavelengths kept
    np.testing.assert_array_equal(llama3[low], base[low] / 8.0)  # long ones scaled
    mid = ~high & ~low  # in between: strictly between the two
    assert np.all(llama3[mid] < base[mid]) and np.all(llama3[mid] > base[mid] / 8.0)


def test_stable_rms_norm_is_the_rms_norm():
    x = jax.random.normal(jax.random.key(0), (3, 5, 48))
    scale = jax.random.normal(jax.random.key(1), (48,))
    want = np.asarray(x, np.float64) / np.sqrt(np.mean(np.asarray(x, np.float64) ** 2, -1,
                                                       keepdims=True) + 1e-5)
    got = stable.tree_rms_norm(x, scale, 1e-5)
    np.testing.assert_allclose(got, want * np.asarray(scale), rtol=8 * 2.0**-24 * 48, atol=0)
    # Its bits do not depend on the batch around a row (a tree sum, not a fused reduction).
    assert_bits_equal(jax.jit(lambda x: stable.tree_rms_norm(x, scale, 1e-5))(x)[1:2],
                      jax.jit(lambda x: stable.tree_rms_norm(x, scale, 1e-5))(x[1:2]))


@pytest.mark.parametrize("overrides, match", [
    (dict(num_kv_heads=3), r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"),
    (dict(norm="batchnorm"), "norm must be one of"),
    (dict(mlp="relu"), "mlp must be one of"),
    (dict(position="alibi"), "position must be one of"),
    (dict(bias="qk"), "bias must be one of"),
    (dict(rope_scaling="yarn"), "rope_scaling must be one of"),
    (dict(head_dim=7), "position='rope' needs an even head_dim"),
    (dict(param_dtype="float16"), "param_dtype must be 'float32' or 'bfloat16'"),
    (dict(rope_scaling="llama3", rope_low_freq_factor=4.0, rope_high_freq_factor=1.0),
     "rope_high_freq_factor > rope_low_freq_factor"),
    (dict(width=30, num_heads=4), r"width \(30\) must be divisible by num_heads \(4\)"),
    (dict(qk_norm=1), "qk_norm must be True or False"),
])
def test_config_errors_are_one_line(overrides, match):
    with pytest.raises(ValueError, match=match) as info:
        decoder_config("llama-tiny", **overrides)
    assert "\n" not in str(info.value)


def test_chunked_attention_with_gqa_reverses_exactly():
    """attention="chunked" (query blocks of 4, MLP in position blocks) on GQA + rope + q/k
    norm (its outputs equal "xla"'s: tests/test_attention.py)."""
    x, key = tokens(length=14), jax.random.key(2)
    m = model("qwen3", update="bdia", backprop="reversible", recompute="shared",
              attention="chunked", chunk_size=4, **DROPOUT)
    _, aux, grads, probes = train_grads_by_key(m, lambda m, k: m(x, key=k, train=True))(key)
    assert probe_total(probes) == 0.0 and not bool(aux["overflow"])
    assert_all_params_get_gradients(grads)
