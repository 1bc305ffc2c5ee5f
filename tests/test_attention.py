"""The ``attention`` options: "chunked" and the fused wrapper compute the einsum's attention,
the BDIA reversal stays bit-exact with "chunked", and bad options fail in one line."""

from __future__ import annotations

import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_only import compile_for_memory
from flax import nnx
from float_bounds import (
    ELEMENTWISE_ULPS,
    U,
    assert_within,
    attention_bound,
    network_bound,
    transformer_chain,
)
from grad_utils import assert_grads_close
from models_utils import jitted, probe_total, train_grads

from bdia_jax.models import (
    GPT,
    DecoderLM,
    MultiHeadAttention,
    ViT,
    attention,
    decoder_config,
    gpt_config,
    seq2seq_config,
    vit_config,
)
from bdia_jax.models.gpt import GPTConfig
from bdia_jax.models.layers import MLP, causal_mask, combine_masks, key_mask
from bdia_jax.models.seq2seq import Seq2SeqTransformer
from bdia_jax.models.vit import ViTConfig
from experiments.common.memory import compiled_memory

BATCH, HEADS, Q_LEN, K_LEN, HEAD_DIM = 3, 2, 37, 37, 8
# Gradients of sum(sin(attention)) against the einsum's, per leaf scale
# (grad_utils.assert_grads_close): each element ends the forward's chain (HEAD_DIM for the
# scores, K_LEN for the softmax and probabilities @ v, an exp, a rescale per chunk of 8) and
# the backward's (the same contractions transposed, Q_LEN for dk and dv); two evaluations.
_CHAIN = 2 * (HEAD_DIM + 2 * K_LEN + 16 + 2 * -(-K_LEN // 8)) + Q_LEN
GRAD_RTOL = 2 * _CHAIN * 2.0**-24
# bfloat16 q, k, v (u = 2**-8), float32 inside: the two evaluations round to bfloat16 at
# different places. The custom VJP: the probabilities before p @ v, dlogits before dq and dk,
# and dq, dk, dv once at the end (3 on any path); autodiff of the blocks: dprobs and each
# block's dq, dk, dv in bfloat16, and dk, dv summed over the query blocks in bfloat16 (2,
# and 2 per block). Their float32 chains add GRAD_RTOL.
_BF16_CHAIN = 3 + 2 + 2 * -(-Q_LEN // 8)
BF16_GRAD_RTOL = 2 * _BF16_CHAIN * 2.0**-8 + GRAD_RTOL


def _qkv(q_len=Q_LEN, k_len=K_LEN, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (BATCH, HEADS, q_len, HEAD_DIM), dtype)
    k = jax.random.normal(kk, (BATCH, HEADS, k_len, HEAD_DIM), dtype)
    v = jax.random.normal(kv, (BATCH, HEADS, k_len, HEAD_DIM), dtype)
    return q, k, v


def _masks(q_len=Q_LEN, k_len=K_LEN, offset=0):
    lengths = jnp.array([k_len, k_len - 5, 9])  # rows 1 and 2 padded
    padding = key_mask(jnp.arange(k_len)[None] < lengths[:, None])  # [batch, 1, 1, k_len]
    causal = causal_mask(q_len, k_len, offset)  # [1, 1, q_len, k_len]
    return {"none": None, "causal": causal, "padding": padding,
            "causal+padding": combine_masks(causal, padding)}


@pytest.mark.parametrize("mask_name", ["none", "causal", "padding", "causal+padding"])
@pytest.mark.parametrize("chunk_size, checkpoint", [(8, True), (8, False), (37, True),
                                                    (64, True), (1, True)])
def test_chunked_matches_the_einsum(mask_name, chunk_size, checkpoint):
    q, k, v = _qkv()
    mask = _masks()[mask_name]
    want = attention.dot_product_attention(q, k, v, mask)
    run = jax.jit(lambda q, k, v: attention.chunked_attention(
        q, k, v, mask, chunk_size=chunk_size, checkpoint=checkpoint))
    got = run(q, k, v)
    # Two evaluations of the same attention, each within attention_bound of exact; the
    # online softmax rescales once per key chunk.
    chunks = -(-K_LEN // chunk_size)
    assert_within(got, want, 2 * attention_bound(q, k, v, mask, num_chunks=chunks),
                  f"chunk {chunk_size}")
    if mask_name == "causal":  # masked keys contribute exactly nothing, chunked or not
        cut = run(q, k, v.at[:, :, 20:].set(0.0))
        chex.assert_trees_all_equal(cut[:, :, :20], got[:, :, :20])


@pytest.mark.parametrize("checkpoint", [True, False])
def test_chunked_gradients_match_the_einsum(checkpoint):
    q, k, v = _qkv()
    mask = _masks()["causal+padding"]

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

    want = jax.grad(loss(lambda q, k, v: attention.dot_product_attention(q, k, v, mask)),
                    argnums=(0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(loss(lambda q, k, v: attention.chunked_attention(
        q, k, v, mask, chunk_size=8, checkpoint=checkpoint)), argnums=(0, 1, 2)))(q, k, v)
    assert_grads_close(got, want, rtol=GRAD_RTOL)


@pytest.mark.parametrize("mask_name, dtype", [("causal+padding", jnp.float32),
                                              ("none", jnp.float32),
                                              ("causal", jnp.bfloat16)])
def test_chunked_custom_vjp_matches_autodiff_of_the_same_blocks(mask_name, dtype):
    """With dropout on the probabilities: the custom VJP (checkpoint=True) redraws each
    block's mask and gives the gradients JAX's autodiff of the same blocks gives."""
    q, k, v = _qkv(dtype=dtype)
    mask = _masks()[mask_name]

    def grads(checkpoint):
        def loss(q, k, v):
            out = attention.chunked_attention(q, k, v, mask, dropout_rate=0.25,
                                              key=jax.random.key(3), chunk_size=8,
                                              checkpoint=checkpoint)
            return jnp.sum(jnp.sin(out.astype(jnp.float32)))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    assert_grads_close(grads(True), grads(False),
                       rtol=GRAD_RTOL if dtype == jnp.float32 else BF16_GRAD_RTOL)


_CAUSAL_PATHS = {
    "xla": lambda q, k, v, mask, **kw: attention.dot_product_attention(q, k, v, mask, **kw),
    "chunked": lambda q, k, v, mask, **kw: attention.chunked_attention(
        q, k, v, mask, chunk_size=8, **kw),
    "chunked-unchecked": lambda q, k, v, mask, **kw: attention.chunked_attention(
        q, k, v, mask, chunk_size=8, checkpoint=False, **kw),
    "fused-xla": lambda q, k, v, mask, **kw: attention.fused_attention(
        q, k, v, mask, implementation="xla", **kw),
}


@pytest.mark.parametrize("path", sorted(_CAUSAL_PATHS))
@pytest.mark.parametrize("q_len, offset, padded", [(Q_LEN, 0, True), (11, 20, False)])
def test_causal_from_iota_is_bitwise_the_explicit_mask(path, q_len, offset, padded):
    """causal=True (the rows built per query block from iota) gives the bits of passing
    causal_mask(q_len, k_len, offset) (ANDed with the padding mask), outputs and gradients,
    with dropout, and with a traced offset (KV-cache decoding)."""
    fn = _CAUSAL_PATHS[path]
    q, k, v = _qkv(q_len=q_len)
    padding = _masks(q_len)["padding"] if padded else None
    explicit = combine_masks(causal_mask(q_len, K_LEN, offset), padding)
    drop = {} if path == "fused-xla" else dict(dropout_rate=0.25, key=jax.random.key(3))

    def run(use_iota, q, k, v, offset):
        def loss(q, k, v):
            out = (fn(q, k, v, padding, causal=True, offset=offset, **drop) if use_iota
                   else fn(q, k, v, explicit, **drop))
            return jnp.sum(jnp.sin(out)), out
        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    both = jax.jit(lambda *a: (run(True, *a), run(False, *a)))  # one compile
    iota, want = both(q, k, v, jnp.int32(offset))
    chex.assert_trees_all_equal(iota, want)


def test_causal_attention_holds_no_whole_mask():
    """Per-block jax.checkpoint over a few blocks: with an explicit [t, t] causal mask the
    compiled step holds it (t*t bytes); causal=True builds each query block's rows inside
    the attention from a column and a row of positions, and holds what no mask holds (within
one block's rows)."""
    t = 1024
    x = jax.ShapeDtypeStruct((1, 1, t, 8), jnp.float32)

    def temp_bytes(explicit, causal):
        def block(x):  # the mask is built inside the block, as the models did
            mask = causal_mask(t, t) if explicit else None
            return jnp.tanh(attention.chunked_attention(x, x, x, mask, chunk_size=128,
                                                        causal=causal))

        def loss(x):
            for _ in range(4):
                x = jax.checkpoint(block)(x)
            return jnp.sum(x)
        return compiled_memory(compile_for_memory(jax.jit(jax.grad(loss)).lower(x)))["temp_bytes"]

    explicit, iota, none = (temp_bytes(True, False), temp_bytes(False, True),
                            temp_bytes(False, False))
    assert iota - none < t * t // 8 < t * t // 2 < explicit - iota


@pytest.mark.parametrize("length", [48, 37])  # three blocks of 16; two and a tail of 5
def test_chunked_mlp_matches_the_dense_mlp(length):
    """attention="chunked" runs the MLP over position blocks (a custom VJP): the same
    outputs and gradients as the whole sequence at once."""
    dense = MLP(8, 32, rngs=nnx.Rngs(0))
    chunked = MLP(8, 32, chunk_size=16, rngs=nnx.Rngs(0))
    y = jax.random.normal(jax.random.key(1), (3, length, 8))

    def value_and_grads(mlp):
        def loss(mlp, y):
            return jnp.sum(jnp.sin(mlp(y)))
        return nnx.value_and_grad(loss, argnums=(0, 1))(mlp, y)

    (want, want_grads), (got, got_grads) = value_and_grads(dense), value_and_grads(chunked)
    # The MLP's chain: fc1 (8), the gelu, fc2 (32); the loss adds the sum of its
    # n = 3 * length * 8 sines (each |sin| <= 1, so the sum's magnitude is at most n); the
    # gradients add the transposed contractions and, for the weights, the sum over the
    # 3 * length positions.
    chain, n = 8 + 32 + 16, 3 * length * 8
    assert_within(got, want, 2 * (chain + ELEMENTWISE_ULPS + n) * U * n, "mlp loss")
    rtol = 2 * (2 * chain + 3 * length) * 2.0**-24
    assert_grads_close(nnx.state(got_grads[0]), nnx.state(want_grads[0]), rtol=rtol)
    assert_grads_close(got_grads[1], want_grads[1], rtol=rtol)


def test_chunked_dropout_is_replayed_from_the_key():
    q, k, v = _qkv()
    run = jax.jit(lambda key: attention.chunked_attention(q, k, v, None, dropout_rate=0.5,
                                                          key=key, chunk_size=8))
    first, again, other = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
    chex.assert_trees_all_equal(first, again)
    assert not np.array_equal(first, other)
    plain = attention.chunked_attention(q, k, v, None, chunk_size=8)
    assert not np.array_equal(first, plain)


@pytest.mark.parametrize("mask_name", ["none", "causal", "padding", "causal+padding"])
def test_fused_wrapper_matches_the_einsum(mask_name):
    """The cuDNN path's layout and mask handling, checked with jax's XLA implementation."""
    q, k, v = _qkv()
    mask = _masks()[mask_name]
    got = attention.fused_attention(q, k, v, mask, implementation="xla")
    assert_within(got, attention.dot_product_attention(q, k, v, mask),
                  2 * attention_bound(q, k, v, mask), "fused")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN exists on a GPU")
def test_cudnn_fails_in_one_line_off_gpu():
    mha = MultiHeadAttention(16, 2, attention="cudnn", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attention='cudnn' needs a CUDA GPU.*'chunked'"):
        mha(jnp.zeros((1, 4, 16), jnp.bfloat16))


@pytest.mark.parametrize("make", [
    lambda **kw: GPTConfig(**kw), lambda **kw: ViTConfig(**kw),
    lambda **kw: seq2seq_config("tiny", **kw)])
def test_config_validates_attention(make):
    with pytest.raises(ValueError, match="attention must be one of"):
        make(attention="flash")
    with pytest.raises(ValueError, match="attention_dropout=0.0 or use attention='chunked'"):
        make(attention="cudnn", attention_dropout=0.1)
    assert make(attention="chunked").attention == "chunked"
    assert make().attention == "xla"  # the default keeps today's einsum


@pytest.mark.parametrize("make", [
    lambda **kw: GPTConfig(**kw), lambda **kw: ViTConfig(**kw),
    lambda **kw: seq2seq_config("tiny", **kw)])
def test_config_validates_chunking(make):
    """The block size of "chunked" is a field of every model's config; the MLP follows it
    when attention is chunked, or as chunk_mlp says."""
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        make(chunk_size=0)
    with pytest.raises(ValueError, match="chunk_mlp must be True, False or None"):
        make(chunk_mlp="yes")
    assert make(attention="chunked", chunk_size=32).mlp_chunk_size == 32
    assert make(attention="chunked", chunk_mlp=False).mlp_chunk_size is None
    assert make(chunk_mlp=True, chunk_size=8).mlp_chunk_size == 8
    assert make().mlp_chunk_size is None


def test_module_validates_attention():
    with pytest.raises(ValueError, match="attention must be one of"):
        MultiHeadAttention(16, 2, attention="Chunked", rngs=nnx.Rngs(0))


def _pair(make_model, config_fn, **overrides):
    """The same parameters with attention "xla" and "chunked"."""
    xla = make_model(config_fn(attention="xla", **overrides), rngs=nnx.Rngs(0))
    chunked = make_model(config_fn(attention="chunked", **overrides), rngs=nnx.Rngs(0))
    nnx.update(chunked, nnx.state(xla, nnx.Param))
    return xla, chunked


def _gpt_inputs():
    return (jax.random.randint(jax.random.key(1), (2, 14), 0, 32, jnp.int32),)


def _vit_inputs():
    return (jax.random.normal(jax.random.key(2), (2, 32, 32, 3)),)  # 17 tokens


# The "tiny" models' rounding chain (float_bounds.transformer_chain), taken at the largest of
# them: ViT 17 tokens, GPT 16, seq2seq 2 + 2 blocks over 11 source and 9 target tokens.
MODEL_CHAIN = transformer_chain(width=32, mlp_dim=64, seq=17, depth=4, heads=2, cross_seq=11)


def _seq2seq_inputs():  # source padding (row 1), causal self-attention, cross-attention
    src = jnp.where(jnp.arange(11)[None] < jnp.array([[11], [6]]), 5, 0).astype(jnp.int32)
    return src, jnp.full((2, 9), 7, jnp.int32)


@pytest.mark.parametrize("make_model, config_fn, inputs", [
    (GPT, lambda **kw: gpt_config("tiny", **kw), _gpt_inputs),
    (ViT, lambda **kw: vit_config("tiny", **kw), _vit_inputs),
    (Seq2SeqTransformer, lambda **kw: seq2seq_config("tiny", **kw), _seq2seq_inputs),
], ids=["gpt", "vit", "seq2seq"])
def test_models_match_with_chunked_attention(make_model, config_fn, inputs):
    # BDIA off the grid: on it a last-bit difference occasionally moves a state by a grid
    # step, far above the rounding bound (the bits of the grid path: test_stack_*).
    xla, chunked = _pair(make_model, config_fn, chunk_size=4,  # several blocks and a tail
                         quantize_at_inference=False)
    assert chunked.config.mlp_chunk_size == 4 and xla.config.mlp_chunk_size is None
    want = jitted(xla)(*inputs())
    assert_within(jitted(chunked)(*inputs()), want, network_bound(want, chain=MODEL_CHAIN),
                  "logits")


@pytest.mark.parametrize("name", ["tiny", "llama-tiny"])
def test_kv_cache_decoding_with_chunked_attention(name):
    """A prompt chunk (causal mask at an offset, per-query rows) and single tokens; GPT-2
    and a Llama-family (GQA, rope) model."""
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 32, jnp.int32)
    xla, chunked = _pair(DecoderLM, lambda **kw: decoder_config(name, **kw), chunk_size=4,
                         quantize_at_inference=False)
    want = jitted(xla)(tokens)
    cache = chunked.init_cache(2)
    prompt_logits, cache = chunked.decode_step(cache, tokens[:, :11], 0)
    step_logits, _ = chunked.decode_step(cache, tokens[:, 11:12], 11)
    bound = network_bound(want, chain=MODEL_CHAIN)
    assert_within(prompt_logits, want[:, :11], bound, "prompt")
    assert_within(step_logits, want[:, 11:12], bound, "step")


# Training-like sizes (tests/test_models_training_sizes.py): batch 64, dropout on.
BATCH_TRAIN = 64
SIZE = dict(width=128, num_heads=4, mlp_dim=256, dropout=0.1, attention_dropout=0.1,
            attention="chunked", recompute="fused")


def _check_probe(model, apply):
    # The experiments' mode: the chunked MLP's output comes from its one-loop forward and
    # VJP (tests/test_recompute_fused.py: the same bits as "shared").
    assert model.stack.backprop.recompute == "fused"
    _, aux, grads, probes = train_grads(model, apply)
    assert not bool(aux["overflow"]) and not bool(aux["nonfinite"])
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree_util.tree_leaves(grads))
    assert probe_total(probes) == 0.0


def test_vit_reverses_exactly_with_chunked_attention():
    # 65 tokens: 4 blocks of 16 and a tail
    model = ViT(vit_config("tiny", depth=4, patch_size=4, chunk_size=16, **SIZE),
                rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (BATCH_TRAIN, 32, 32, 3))
    _check_probe(model, lambda m: m(x, key=jax.random.key(2), train=True))


def test_gpt_reverses_exactly_with_chunked_attention():
    # 64 tokens: 4 blocks of 16
    model = GPT(gpt_config("tiny", depth=4, max_len=64, chunk_size=16, **SIZE),
                rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (BATCH_TRAIN, 64), 0, 32, jnp.int32)
    _check_probe(model, lambda m: m(tokens, key=jax.random.key(2), train=True))


def test_chunked_backward_keeps_one_block_of_probabilities():
    """Compiled memory of attention's value-and-grad: the einsum keeps [q_len, k_len]
    probabilities per head, "chunked" one [chunk, k_len] block at a time."""
    q = jax.ShapeDtypeStruct((1, 2, 1024, 16), jnp.float32)

    def temp_bytes(fn):
        step = jax.jit(jax.grad(lambda q: jnp.sum(fn(q, q, q, causal_mask(1024, 1024)))))
        return compiled_memory(compile_for_memory(step.lower(q)))["temp_bytes"]

    probs_bytes = 2 * 1024 * 1024 * 4  # float32 probabilities of the two heads
    einsum = temp_bytes(attention.dot_product_attention)
    chunked = temp_bytes(lambda *a: attention.chunked_attention(*a, chunk_size=128))
    unchecked = temp_bytes(lambda *a: attention.chunked_attention(*a, chunk_size=128,
                                                                  checkpoint=False))
    assert einsum >= probs_bytes and unchecked >= probs_bytes  # all blocks' probabilities
    assert chunked < probs_bytes and 4 * chunked < einsum


@pytest.mark.parametrize("factory", ["vit", "gpt", "seq2seq", "revvit"])
@pytest.mark.parametrize("field,rate,fragment", [
    ("dropout", 0.001, "dropout 0.001 rounds to 0/256 on the uint8 grid of dropout masks"),
    ("attention_dropout", 0.999, "attention_dropout 0.999 rounds to 256/256"),
    ("dropout", 1.0, "dropout must be in [0, 1), got 1.0"),
])
def test_a_dropout_rate_off_the_mask_grid_fails_at_construction(factory, field, rate, fragment):
    """Masks compare random bytes with round(rate * 256): a rate that rounds to 0 or 256
    is refused when the config is built, naming the field, not when the model is traced."""
    from bdia_jax.models import gpt_config, revvit_config, seq2seq_config, vit_config

    make = {"vit": vit_config, "gpt": gpt_config, "seq2seq": seq2seq_config,
            "revvit": revvit_config}[factory]
    with pytest.raises(ValueError, match=re.escape(fragment)):
        make("tiny", **{field: rate})
    assert attention.dropout_threshold(0.1) == 26  # the rate applied: 26/256


def test_seq2seq_reverses_exactly_with_chunked_attention():
    """Both stacks (encoder and decoder blocks, cross-attention, MLPs in position blocks)."""
    # 16 positions: two blocks of 8. A tail block is the same chunked code in every attention
    # (the mask only differs): its exact reversal is shown by the ViT test above (65 tokens)
    # and tests/test_models_decoder.py's chunked GQA test (causal, 14 tokens in blocks of 4);
    # here it would add a third of this test's compile time.
    model = Seq2SeqTransformer(seq2seq_config("tiny", chunk_size=8, **SIZE), rngs=nnx.Rngs(0))
    src = jax.random.randint(jax.random.key(1), (32, 16), 1, 32, jnp.int32)
    tgt = jax.random.randint(jax.random.key(2), (32, 16), 1, 32, jnp.int32)
    for stack in (model.encoder, model.decoder):
        assert stack.backprop.recompute == "fused"
    _, aux, grads, probes = train_grads(model, lambda m: m(src, tgt, key=jax.random.key(3),
                                                           train=True))
    assert not bool(aux["overflow"]) and not bool(aux["nonfinite"])
    assert probe_total(probes) == 0.0


def test_testing_blocks_do_not_import_the_models_layer():
    """``bdia_jax.testing`` (the engine's pure-jnp blocks) takes dropout from
    ``bdia_jax.ops``, which the models import too: the engine's tests need no model."""
    import subprocess
    import sys

    code = ("import sys, bdia_jax.testing; "
            "print(sorted(m for m in sys.modules if m.startswith('bdia_jax.models')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=pathlib.Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
    assert not hasattr(attention, "QUERY_CHUNK")  # the block size is a config field


# Grouped-query attention: 4 query heads on 2 key/value heads (groups of 2), and on 1 (MQA).
_GQA_HEADS = 4


def _gqa_inputs(kv_heads, k_len=K_LEN):
    kq, kk, kv, km = jax.random.split(jax.random.key(5), 4)
    q = jax.random.normal(kq, (BATCH, _GQA_HEADS, Q_LEN, HEAD_DIM))
    k = jax.random.normal(kk, (BATCH, kv_heads, k_len, HEAD_DIM))
    v = jax.random.normal(kv, (BATCH, kv_heads, k_len, HEAD_DIM))
    # A mask with a heads axis, so the grouping of masks is checked too (key 0 always kept).
    per_head = jax.random.bernoulli(km, 0.7, (BATCH, _GQA_HEADS, Q_LEN, k_len))
    return q, k, v, per_head.at[..., 0].set(True)


_GQA_PATHS = dict(_CAUSAL_PATHS)


@pytest.mark.parametrize("path", sorted(_GQA_PATHS))
@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.parametrize("masking", ["causal", "per-head"])
def test_grouped_query_attention_matches_repeated_key_value_heads(path, kv_heads, masking):
    """Every path given kv_heads key/value heads computes the attention of the key/value
    heads repeated for their query groups (Hugging Face's ``repeat_kv`` order), outputs and
    gradients, without making those copies (``test_grouped_keys_are_not_repeated``)."""
    q, k, v, per_head = _gqa_inputs(kv_heads)
    mask, causal = (None, True) if masking == "causal" else (per_head, False)
    groups = _GQA_HEADS // kv_heads
    run = _GQA_PATHS[path]

    def loss(grouped):
        def fn(q, k, v):
            if not grouped:
                k, v = attention.repeat_kv(k, groups), attention.repeat_kv(v, groups)
            return jnp.sum(jnp.sin(run(q, k, v, mask, causal=causal)))
        return fn

    got = jax.jit(lambda q, k, v: run(q, k, v, mask, causal=causal))(q, k, v)
    repeated = (attention.repeat_kv(k, groups), attention.repeat_kv(v, groups))
    want = run(q, *repeated, mask, causal=causal)
    bound_mask = causal_mask(Q_LEN, K_LEN) if causal else per_head
    assert_within(got, want, 2 * attention_bound(q, *repeated, bound_mask), path)
    grads = jax.jit(jax.grad(loss(True), argnums=(0, 1, 2)))(q, k, v)
    want_grads = jax.grad(loss(False), argnums=(0, 1, 2))(q, k, v)
    chex.assert_trees_all_equal_shapes_and_dtypes(grads, (q, k, v))
    # The key/value gradients also sum over the group's heads: groups more roundings.
    assert_grads_close(grads, want_grads, rtol=GRAD_RTOL + 2 * groups * 2.0**-24)


def test_grouped_dropout_masks_are_those_of_the_repeated_heads():
    """Dropout on grouped probabilities draws the very masks of the repeated-heads layout
    (``random_bytes`` draws along the flat index), so grouping changes no experiment's
    randomness; chunked (custom VJP) and xla both."""
    q, k, v, _ = _gqa_inputs(2)
    repeated = (attention.repeat_kv(k, 2), attention.repeat_kv(v, 2))
    for path in ("xla", "chunked"):
        def run(k, v, path=path):
            return _GQA_PATHS[path](q, k, v, None, dropout_rate=0.25, key=jax.random.key(7))
        got, want = jax.jit(run)(k, v), jax.jit(run)(*repeated)
        # Kept probabilities are scaled by 4/3, and so is the bound on their sum.
        assert_within(got, want, 2 * 4 / 3 * attention_bound(q, *repeated), path)
        # A different mask would differ by O(1), far outside the bound: check it can.
        other = jax.jit(lambda k, v, path=path: _GQA_PATHS[path](
            q, k, v, None, dropout_rate=0.25, key=jax.random.key(8)))(k, v)
        assert np.max(np.abs(np.asarray(other) - np.asarray(want))) > 0.1


def test_grouped_keys_are_not_repeated():
    """Compiled memory of chunked attention's value-and-grad with 8 query heads on one
    key/value head: the grouped call holds no repeated float32 copy of k and v (nor of
    their gradients); feeding it ``repeat_kv``'s copies does."""
    q = jax.ShapeDtypeStruct((1, 8, 64, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, 1, 4096, 16), jnp.float32)

    def temp_bytes(groups):
        def loss(q, k, v):
            k, v = attention.repeat_kv(k, groups), attention.repeat_kv(v, groups)
            return jnp.sum(attention.chunked_attention(q, k, v, None, chunk_size=1))
        step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return compiled_memory(compile_for_memory(step.lower(q, kv, kv)))["temp_bytes"]

    repeated_copy = 8 * 4096 * 16 * 4  # one of k, v, dk, dv repeated to 8 heads
    grouped, repeated = temp_bytes(1), temp_bytes(8)
    assert repeated >= 2 * repeated_copy
    assert grouped < repeated_copy, (grouped, repeated)


def test_bfloat16_loops_carry_no_float32_queries():
    """XLA:CPU upcasts bfloat16 dot operands to float32; the chunked attention's loops slice
    q (and the output's cotangent) as integer bits, so the upcast stays on one block and no
    loop carries a whole float32 copy of the queries (a q-sized buffer per attention call)."""
    q = jax.ShapeDtypeStruct((1, 4, 256, 16), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, 2, 256, 16), jnp.bfloat16)

    def loss(q, k, v):
        out = attention.chunked_attention(q, k, v, None, chunk_size=32, causal=True)
        return jnp.sum(jnp.sin(out.astype(jnp.float32)))

    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile().as_text()
    loops = [line for line in hlo.splitlines() if re.search(r"= \(.*\) while\(", line)]
    assert len(loops) == 2  # the forward and the backward loop over query blocks
    for line in loops:
        assert "bf16[1,2,2,256,16]" in line or "u16[1,2,2,256,16]" in line, line[:300]
        assert "f32[1,2,2,256,16]" not in line, line[:300]
