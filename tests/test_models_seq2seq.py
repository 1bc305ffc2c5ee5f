"""Encoder-decoder Transformer: shapes, parameter counts, gradient methods (incl. through the
cross-attention context), inference modes, causality, padding, KV cache, greedy and beam
search."""

from __future__ import annotations

import dataclasses
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from float_bounds import (
    ELEMENTWISE_ULPS,
    U,
    assert_within,
    model_grad_rtol,
    network_bound,
    transformer_chain,
)
from models_utils import (
    assert_all_params_get_gradients,
    assert_model_grads_close,
    count_params,
    jitted,
    lower_train_grads,
    probe_total,
    train_grads,
)

from bdia_jax import Autodiff, Standard
from bdia_jax.models import (
    SEQ2SEQ_VARIANTS,
    Seq2SeqConfig,
    Seq2SeqTransformer,
    seq2seq_config,
)
from bdia_jax.models.decoding import length_penalty


def ordinary_transformer_param_count(c: Seq2SeqConfig) -> int:
    """A pre-LN encoder-decoder Transformer with learned positions, by formula."""
    d, m = c.width, c.mlp_dim
    attn, mlp, ln = 4 * (d * d + d), (d * m + m) + (m * d + d), 2 * d
    embeddings = c.tgt_vocab_size * d + (0 if c.share_embeddings else c.src_vocab_size * d)
    head = 0 if c.tie_output else d * c.tgt_vocab_size + c.tgt_vocab_size
    encoder = c.encoder_depth * (2 * ln + attn + mlp) + ln
    decoder = c.decoder_depth * (3 * ln + 2 * attn + mlp) + ln
    return embeddings + 2 * c.max_len * d + encoder + decoder + head


def batch(b=3, src_len=7, tgt_len=6, vocab=32, seed=0):
    """Source with trailing padding (pad_id 0) and a BOS-started decoder input."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    src = jax.random.randint(k1, (b, src_len), 4, vocab, jnp.int32)
    lengths = jnp.array([src_len, src_len - 2, 3][:b])
    src = jnp.where(jnp.arange(src_len)[None] < lengths[:, None], src, 0)
    tgt = jax.random.randint(k2, (b, tgt_len), 4, vocab, jnp.int32).at[:, 0].set(2)
    return src, tgt


def tiny(**overrides):
    return Seq2SeqTransformer(seq2seq_config("tiny", **overrides), rngs=nnx.Rngs(0))


def pair(quantize_at_inference=True, **overrides):
    """A standard and a BDIA model with the same parameters."""
    std = tiny(update="standard", **overrides)
    bdia = Seq2SeqTransformer(seq2seq_config("tiny", update="bdia",
                                             quantize_at_inference=quantize_at_inference,
                                             **overrides), rngs=nnx.Rngs(1))
    nnx.update(bdia, nnx.state(std, nnx.Param))
    return std, bdia


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("name", sorted(SEQ2SEQ_VARIANTS))
@pytest.mark.parametrize("share,tie", [(True, True), (False, False), (False, True)])
def test_seq2seq_shapes_and_param_count(name, share, tie):
    overrides = dict(share_embeddings=share, tie_output=tie)
    if not share:  # separate vocabularies may differ in size
        overrides["src_vocab_size"] = seq2seq_config(name).src_vocab_size + 3
    config = seq2seq_config(name, **overrides)
    model = nnx.eval_shape(lambda: Seq2SeqTransformer(config, rngs=nnx.Rngs(0)))
    assert count_params(model) == ordinary_transformer_param_count(config)
    std_config = dataclasses.replace(config, update=Standard(), backprop=Autodiff())
    std = nnx.eval_shape(lambda: Seq2SeqTransformer(std_config, rngs=nnx.Rngs(0)))
    assert count_params(std) == count_params(model)
    src, tgt = jnp.zeros((2, 9), jnp.int32), jnp.zeros((2, 5), jnp.int32)
    logits, aux = nnx.eval_shape(lambda m: m(src, tgt), model)
    assert logits.shape == (2, 5, config.tgt_vocab_size) and logits.dtype == jnp.float32
    assert set(aux) == {"max_abs", "overflow", "nonfinite"}


def test_seq2seq_config_errors():
    with pytest.raises(ValueError, match="joint vocabulary"):
        seq2seq_config("tiny", src_vocab_size=10)
    with pytest.raises(ValueError, match="unknown Seq2SeqConfig fields"):
        seq2seq_config("tiny", depth=3)
    with pytest.raises(ValueError, match="recompute must be one of"):
        seq2seq_config("tiny", recompute="twice")
    model = tiny()
    src, tgt = batch()
    with pytest.raises(ValueError, match="max_len"):
        model(jnp.zeros((1, 17), jnp.int32), tgt)
    with pytest.raises(ValueError, match="src_mask must be bool"):
        model(src, tgt, src_mask=(src != 0).astype(jnp.float32))
    with pytest.raises(ValueError, match="needs a PRNG `key`"):
        model(src, tgt, train=True)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.slow
def test_seq2seq_reversible_gradients_equal_autodiff_through_context():
    # The decoder context (enc_out, bool src_mask) holds a bool leaf: all three gradient
    # methods must accept it.
    src, tgt = batch()
    # An "rbg" key: its RngBitGenerator compiles in half the time of threefry's dropout
    # bits (the ViT and GPT tests use the default threefry); replay must hold for both.
    key = jax.random.key(11, impl="rbg")
    out = {}
    for backprop in ("reversible", "autodiff"):
        model = tiny(decoder_depth=3, dropout=0.1, attention_dropout=0.1, backprop=backprop)
        out[backprop] = train_grads(model, lambda m: m(src, tgt, key=key, train=True))
    # Remat (jax.checkpoint around each block call) takes the bool leaf at trace time; its
    # gradients through a context equal autodiff's in tests/test_stack_grads.py, so
    # lowering it here spares a compile of seconds.
    lower_train_grads(tiny(decoder_depth=3, dropout=0.1, attention_dropout=0.1,
                           backprop="remat"),
                      lambda m: m(src, tgt, key=key, train=True))
    logits_r, aux_r, g_r, probes_r = out["reversible"]
    logits_a, aux_a, g_a, _ = out["autodiff"]
    chex.assert_trees_all_equal(logits_r, logits_a)
    chex.assert_trees_all_equal(aux_r, aux_a)
    # "tiny": 2 encoder blocks over 7 source tokens, then 3 decoder blocks over 6 target
    # tokens with cross-attention to them; 3 rows.
    chain = transformer_chain(width=32, mlp_dim=64, seq=7, depth=2, heads=2) + \
        transformer_chain(width=32, mlp_dim=64, seq=6, depth=3, heads=2, cross_seq=7)
    assert_model_grads_close(g_r, g_a, rtol=model_grad_rtol(chain, positions=3 * 7))
    assert probe_total(probes_r) == 0.0  # both stacks reversed bit-exactly
    # The encoder's only path to the loss is the decoder stack's context (enc_out): its
    # gradients (equal to autodiff's, above) come from the reversible cotangent of context.
    encoder_grads = {"encoder": g_r["encoder"], "encoder_norm": g_r["encoder_norm"],
                     "src_pos": g_r["src_pos"]}
    assert_all_params_get_gradients(encoder_grads)
    assert_all_params_get_gradients(g_r)


# ----------------------------------------------------------------------------- inference


def test_bdia_inference_without_quantization_is_the_standard_model():
    std, bdia = pair(quantize_at_inference=False, dropout=0.1)
    src, tgt = batch()
    chex.assert_trees_all_equal(bdia(src, tgt)[0], std(src, tgt)[0])


def test_bdia_inference_with_quantization_is_within_a_few_delta():
    std, bdia = pair()
    src, tgt = batch()
    delta = 2.0**-9
    enc_std, mask, _ = std.encode(src)
    enc_bdia, _, _ = bdia.encode(src)
    # Each of the 2+2 stacks rounds its input and each block output to δ (≤ δ/2 each);
    # enc_out passes LN, the logits LN and the tied head / sqrt(width).
    enc_err = float(jnp.max(jnp.abs(enc_bdia - enc_std)))
    logits_err = float(jnp.max(jnp.abs(bdia(src, tgt)[0] - std(src, tgt)[0])))
    assert 0 < enc_err <= 4 * delta, enc_err / delta
    assert 0 < logits_err <= 4 * delta, logits_err / delta


@pytest.mark.parametrize("update", ["standard", "bdia"])
@pytest.mark.parametrize("train", [False, True])
def test_decoder_is_causal_and_source_padding_is_ignored(update, train):
    model = tiny(update=update, dropout=0.1, attention_dropout=0.1)
    src, tgt = batch()
    mask = src != 0
    apply = jitted(model, key=jax.random.key(4) if train else None, train=train)
    base = apply(src, tgt, src_mask=mask)
    # Future target tokens never change earlier logits.
    for cut in (1, 4):
        changed = tgt.at[:, cut:].set((tgt[:, cut:] + 5) % 32)
        logits = apply(src, changed, src_mask=mask)
        chex.assert_trees_all_equal(logits[:, :cut], base[:, :cut])
        assert not np.allclose(logits[:, cut:], base[:, cut:])
    # Padded source positions: any token there gives the same output.
    garbage = jnp.where(mask, src, (src * 7 + 5) % 32)
    assert not np.array_equal(garbage, src)
    chex.assert_trees_all_equal(apply(garbage, tgt, src_mask=mask), base)
    # ... while a real source token does change it.
    assert not np.allclose(apply(src.at[:, 0].add(1), tgt, src_mask=mask), base)


# ----------------------------------------------------------------------------- decoding


def greedy_by_recomputation(model, apply, src, max_len):
    """Full teacher-forced recomputation per step (no cache), stopping rows at EOS.
    apply: ``jitted(model)``, one compiled call for every step."""
    c = model.config
    tgt_in = jnp.full((src.shape[0], max_len), c.pad_id, jnp.int32).at[:, 0].set(c.bos_id)
    out = np.full((src.shape[0], max_len), c.pad_id, np.int32)
    done = np.zeros(src.shape[0], bool)
    for pos in range(max_len):
        token = np.asarray(jnp.argmax(apply(src, tgt_in)[:, pos], -1))
        token = np.where(done, c.pad_id, token)
        out[:, pos] = token
        done |= token == c.eos_id
        if pos + 1 < max_len:
            tgt_in = tgt_in.at[:, pos + 1].set(token)
    return out


# BDIA off the grid, as in the beam-score test below (a grid step is far above any
# rounding bound of the logits).
@pytest.mark.parametrize("overrides", [dict(update="standard"),
                                       dict(update="bdia", quantize_at_inference=False)])
def test_kv_cache_greedy_equals_full_recomputation(overrides):
    # An untied head: at init a tied head mostly predicts the input token again (the stream
    # is dominated by its own std-1 embedding), which would make greedy output constant.
    model = tiny(tie_output=False, **overrides)
    src, _ = batch(seed=3)
    cached = model.greedy_decode(src, 8)
    assert len(np.unique(np.asarray(cached))) > 3  # a varied output, not one repeated token
    apply = jitted(model)  # [3, 8] targets here and in the recomputation: one compile
    np.testing.assert_array_equal(cached, greedy_by_recomputation(model, apply, src, 8))
    # Logits of a cached pass over a prefix, in two chunks, vs the full decoder pass.
    tgt = jnp.concatenate([jnp.full((3, 1), 2, jnp.int32), cached[:, :7]], 1)
    state = model.init_decode_state(src, 8)
    first, state = model.decode_chunk(state, tgt[:, :3], 0)
    second, _ = model.decode_chunk(state, tgt[:, 3:], 3)
    full = apply(src, tgt)
    # "tiny": 2 encoder blocks (7 source positions), then 2 decoder blocks with
    # cross-attention; the decoder's chain starts at the encoder's output.
    chain = transformer_chain(width=32, mlp_dim=64, seq=7, depth=2, heads=2) + \
        transformer_chain(width=32, mlp_dim=64, seq=8, depth=2, heads=2, cross_seq=7)
    assert_within(jnp.concatenate([first, second], 1), full,
                  network_bound(full, chain=chain), "cached logits")


def sequence_log_prob(model, src, seqs):
    """Teacher-forced log p of each sequence (up to and including its first EOS), its
    length, and the logits, by the full model (one jitted pass). src, seqs: one row per
    sequence."""
    c = model.config
    tgt_in = jnp.concatenate([jnp.full((len(seqs), 1), c.bos_id, jnp.int32), seqs[:, :-1]], 1)
    logits = jitted(model)(src, tgt_in)
    log_probs = jax.nn.log_softmax(logits, -1)
    picked = jnp.take_along_axis(log_probs, seqs[:, :, None], -1)[..., 0]
    length = 1 + jnp.argmax(seqs == c.eos_id, axis=1)
    return (jnp.sum(jnp.where(jnp.arange(seqs.shape[1]) < length[:, None], picked, 0), 1),
            length, logits)


def score_bound(model, src_len, logits, length, penalty):
    """How far two float32 evaluations of a sequence's score (log p / ``penalty``) may
    differ: per token twice the logits' bound (log_softmax is 1-Lipschitz in the max norm,
    plus the picked logit) and the log-softmax's own rounding, summed over the tokens.
    logits, length: ``sequence_log_prob``'s for these sequences. The chain: 2 encoder blocks
    over the source, 2 decoder blocks with cross-attention."""
    c = model.config
    chain = transformer_chain(width=c.width, mlp_dim=c.mlp_dim, seq=src_len,
                              depth=c.encoder_depth, heads=c.num_heads) + \
        transformer_chain(width=c.width, mlp_dim=c.mlp_dim, seq=logits.shape[1],
                          depth=c.decoder_depth, heads=c.num_heads, cross_seq=src_len)
    magnitude = max(float(jnp.max(jnp.abs(logits))), 1.0)
    per_token = 2 * network_bound(logits, chain=chain) + \
        2 * (logits.shape[-1] + 2 * ELEMENTWISE_ULPS) * U * 2 * magnitude
    return np.asarray(length, np.float64) * per_token / np.asarray(penalty, np.float64)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_search_with_a_wide_beam_is_exhaustive_search(alpha):
    # Vocabulary {0: pad, 1: unk, 2: bos, 3: eos}; hypotheses end with EOS within 3 tokens.
    vocab, max_len = 4, 3
    # Off the grid: a score is compared with a rounding bound (see the test below).
    model = Seq2SeqTransformer(seq2seq_config("tiny", src_vocab_size=vocab,
                                              tgt_vocab_size=vocab, quantize_at_inference=False),
                               rngs=nnx.Rngs(5))
    src = jnp.array([[1, 2, 1, 3, 0]], jnp.int32)
    hyps = []
    for n in range(1, max_len + 1):
        for prefix in itertools.product([0, 1, 2], repeat=n - 1):
            hyps.append(list(prefix) + [3] + [0] * (max_len - n))
    hyps = jnp.array(hyps, jnp.int32)  # 1 + 3 + 9 = 13 complete hypotheses
    log_p, length, logits = sequence_log_prob(model, jnp.repeat(src, len(hyps), 0), hyps)
    scores = log_p / length_penalty(length, alpha)
    best = int(jnp.argmax(scores))
    # 18 beams keep every prefix alive (at most 9) and 2*18 candidates hold all extensions.
    tokens, score = model.beam_search(src, max_len, beam_size=18, alpha=alpha)
    np.testing.assert_array_equal(tokens[0], hyps[best])
    bound = score_bound(model, src.shape[1], logits[best:best + 1], length[best],
                        length_penalty(length[best], alpha))
    assert_within(score[0], scores[best], bound, "best score")
    assert sorted(np.asarray(scores))[-2] < float(scores[best])  # a unique optimum


# The standard model, and BDIA off the grid. A grid-quantized BDIA model is left out on
# purpose: its cached pass (attention over a cache) and the full pass round differently in
# the last float bit, and on the grid such a bit occasionally moves a state by δ = 2**-9,
# which is far above rtol 1e-5 of a log-probability (greedy equality covers that model).
@pytest.mark.parametrize("overrides", [dict(update="standard"),
                                       dict(update="bdia", quantize_at_inference=False)])
def test_beam_search_scores_are_the_models_scores(overrides):
    model = tiny(tie_output=False, **overrides)  # see test_kv_cache_greedy_equals_full_...
    src, _ = batch(seed=8)
    tokens, scores = model.beam_search(src, 10, beam_size=4, alpha=0.6)
    finished = np.asarray(jnp.any(tokens == 3, axis=1))
    assert finished.any()
    # The reported score is the full model's log p / length penalty of the returned tokens.
    log_p, length, logits = sequence_log_prob(model, src, tokens)
    want = log_p / length_penalty(length, 0.6)
    bound = score_bound(model, src.shape[1], logits, length, length_penalty(length, 0.6))
    assert_within(np.asarray(scores)[finished], np.asarray(want)[finished], bound[finished],
                  "scores")
