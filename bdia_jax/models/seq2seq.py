"""Encoder-decoder Transformer for translation, trainable the standard way or the BDIA way.

Architecture (pre-LN): source embedding + learned positions → dropout → encoder
``ResidualStack`` of ``EncoderBlock``s (self-attention with the source padding mask) →
LayerNorm = enc_out. Target embedding + learned positions → dropout → decoder
``ResidualStack`` of ``DecoderBlock``s, each given ``context = (enc_out, src_mask)`` →
LayerNorm → logits (tied to the target embedding, or a separate Linear). Gradients reach
the encoder only through enc_out, the decoder stack's context.

Embeddings are initialised with std 1 so the residual stream is O(1) from the start (a
~0.02-scale stream would make the δ = 2**-9 rounding of x_0 a percent-level change); tied
output logits are divided by sqrt(width) to stay O(1).

Keys: the model key is split with ``jax.random.fold_in``: 0 → encoder stack, 1 → decoder
stack, 2 → source embedding dropout, 3 → target embedding dropout.

Inference: ``greedy_decode`` / ``beam_search`` run the decoder one token at a time with a
KV cache (γ = 0, as ``__call__(train=False)``; quantized for BDIA models with
``quantize_at_inference``). ``init_decode_state`` / ``decode_step`` / ``reorder_state`` are
the step interface of ``bdia_jax.models.decoding``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from bdia_jax.models import decoding
from bdia_jax.models.layers import (
    BlockConfig,
    DecoderBlock,
    EncoderBlock,
    LayerNorm,
    check_ints,
    dropout,
    padding_mask,
)
from bdia_jax.models.residual_stack import ResidualStack, named_config, stats_to_aux

KEY_ENCODER, KEY_DECODER, KEY_SRC_EMBED, KEY_TGT_EMBED = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig(BlockConfig):
    """Encoder-decoder settings. Defaults: a Transformer-base-like model. The training
    method (both stacks) is the keyword-only ``update`` / ``backprop`` pair of
    ``StackMethod``; the block settings are ``BlockConfig``'s."""

    src_vocab_size: int = 8000  # source vocabulary
    tgt_vocab_size: int = 8000  # target vocabulary
    share_embeddings: bool = True  # one table for source and target (a joint vocabulary)
    tie_output: bool = True  # output logits use the target embedding (else a Linear head)
    max_len: int = 128  # longest source and target sequence (learned positions)
    encoder_depth: int = 6  # encoder blocks
    decoder_depth: int = 6  # decoder blocks
    # Shared block settings (BlockConfig): width 512, 8 heads, MLP 2048, dropout 0.1,
    # attention_dropout 0.0, compute_dtype, attention, chunk_size, chunk_mlp.
    pad_id: int = 0  # padding token (source padding is masked out of attention)
    bos_id: int = 2  # decoder start token
    eos_id: int = 3  # end of sentence

    def __post_init__(self):
        check_ints(self, ("max_len", "encoder_depth", "decoder_depth"))
        check_ints(self, ("src_vocab_size", "tgt_vocab_size"), low=2)
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(
                f"share_embeddings=True needs one joint vocabulary, got src_vocab_size="
                f"{self.src_vocab_size} != tgt_vocab_size={self.tgt_vocab_size}; set "
                f"share_embeddings=False or use a shared tokenizer."
            )
        super().__post_init__()


SEQ2SEQ_VARIANTS: dict[str, dict] = {
    # CPU unit tests.
    "tiny": dict(src_vocab_size=32, tgt_vocab_size=32, max_len=16, width=32, encoder_depth=2,
                 decoder_depth=2, num_heads=2, mlp_dim=64, dropout=0.0),
    # CPU quick runs (Multi30k in minutes).
    "small": dict(src_vocab_size=2000, tgt_vocab_size=2000, width=128, encoder_depth=2,
                  decoder_depth=2, num_heads=4, mlp_dim=256),
    # Transformer-base-like (6+6 layers, width 512, 8 heads, MLP 2048).
    "base": dict(),
}


def seq2seq_config(name: str, **overrides) -> Seq2SeqConfig:
    """A named encoder-decoder variant ("tiny", "small", "base") with field overrides."""
    return named_config(Seq2SeqConfig, SEQ2SEQ_VARIANTS, name, overrides)


class DecodeState(NamedTuple):
    """State of incremental decoding (rows = batch, or batch * beam_size).

    cache:    DecoderCache stacked on [decoder_depth]: self-attention KV
              [rows, heads, max_len, head_dim] and cross-attention KV of enc_out.
    src_mask: [rows, src_len] bool, True for real source tokens.
    """

    cache: Any
    src_mask: jax.Array


class Seq2SeqTransformer(nnx.Module):
    """Encoder-decoder Transformer; see the module docstring.

    Call: ``logits, aux = model(src, tgt_in, *, src_mask=None, key=None, train=False,
    inference_gamma=None)``.
    """

    def __init__(self, config: Seq2SeqConfig, *, rngs: nnx.Rngs):
        self.config = c = config
        embed_init = nnx.initializers.normal(1.0)
        pos_init = nnx.initializers.normal(0.02)
        self.tgt_embed = nnx.Embed(c.tgt_vocab_size, c.width, embedding_init=embed_init,
                                   rngs=rngs)
        if not c.share_embeddings:
            self.src_embed = nnx.Embed(c.src_vocab_size, c.width, embedding_init=embed_init,
                                       rngs=rngs)
        self.src_pos = nnx.Param(pos_init(rngs.params(), (c.max_len, c.width), jnp.float32))
        self.tgt_pos = nnx.Param(pos_init(rngs.params(), (c.max_len, c.width), jnp.float32))

        def make_encoder_block(block_rngs):
            return EncoderBlock.from_config(c, rngs=block_rngs)

        def make_decoder_block(block_rngs):
            return DecoderBlock(c.width, c.num_heads, c.mlp_dim, dropout=c.dropout,
                                attention_dropout=c.attention_dropout,
                                compute_dtype=c.compute_dtype, attention=c.attention,
                                chunk_size=c.chunk_size, mlp_chunk_size=c.mlp_chunk_size,
                                lora=c.lora, rngs=block_rngs)

        settings = dict(update=c.update, backprop=c.backprop)
        self.encoder = ResidualStack(make_encoder_block, c.encoder_depth, rngs=rngs, **settings)
        self.encoder_norm = LayerNorm(c.width, rngs=rngs)
        self.decoder = ResidualStack(make_decoder_block, c.decoder_depth, rngs=rngs, **settings)
        self.decoder_norm = LayerNorm(c.width, rngs=rngs)
        if not c.tie_output:
            self.head = nnx.Linear(c.width, c.tgt_vocab_size, rngs=rngs)

    # ------------------------------------------------------------------ pieces
    def _check_tokens(self, tokens, what: str, pos=0):
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"{what} must be int [batch, len], got {tokens.dtype} "
                             f"{list(tokens.shape)}.")
        if isinstance(pos, int) and pos + tokens.shape[1] > self.config.max_len:
            raise ValueError(f"{what} has {pos + tokens.shape[1]} positions > max_len="
                             f"{self.config.max_len}; crop it or raise max_len.")

    def _keys(self, key, train):
        if not train or key is None:
            return (None,) * 4
        return tuple(jax.random.fold_in(key, i) for i in range(4))

    def _src_embedding(self):
        return self.tgt_embed if self.config.share_embeddings else self.src_embed

    def _logits(self, y: jax.Array) -> jax.Array:
        """Decoder stream [batch, t, width] → logits [batch, t, tgt_vocab] float32."""
        y = self.decoder_norm(y)
        if self.config.tie_output:
            return self.tgt_embed.attend(y).astype(jnp.float32) / math.sqrt(self.config.width)
        return self.head(y).astype(jnp.float32)

    def _embed_tgt(self, tgt, pos):
        positions = jax.lax.dynamic_slice_in_dim(self.tgt_pos[...], pos, tgt.shape[1])
        return self.tgt_embed(tgt).astype(jnp.float32) + positions

    def encode(self, src: jax.Array, *, src_mask: jax.Array | None = None,
               key: jax.Array | None = None, train: bool = False, inference_gamma=None):
        """Encoder pass.

        Args:
          src: [batch, src_len] int32 source tokens.
          src_mask: [batch, src_len] bool (True = real token); default src != pad_id.
          key, train, inference_gamma: as in ``__call__`` (key: the *model* key).

        Returns:
          (enc_out [batch, src_len, width] float32, src_mask bool, StackStats).
        """
        c = self.config
        self._check_tokens(src, "src")
        src_mask = padding_mask(src, c.pad_id) if src_mask is None else src_mask
        if src_mask.shape != src.shape or src_mask.dtype != jnp.bool_:
            raise ValueError(f"src_mask must be bool {list(src.shape)}, got {src_mask.dtype} "
                             f"{list(src_mask.shape)}.")
        enc_key, _, src_key, _ = self._keys(key, train)
        x = self._src_embedding()(src).astype(jnp.float32) + self.src_pos[: src.shape[1]]
        x = dropout(x, c.dropout, src_key)
        x, stats = self.encoder(x, context=src_mask, key=enc_key, train=train,
                                inference_gamma=inference_gamma)
        return self.encoder_norm(x), src_mask, stats

    def decode(self, tgt_in: jax.Array, enc_out: jax.Array, src_mask: jax.Array, *,
               key: jax.Array | None = None, train: bool = False, inference_gamma=None):
        """Decoder pass (teacher forcing): tgt_in [batch, tgt_len] int32 (BOS-shifted) →
        (logits [batch, tgt_len, tgt_vocab] float32, StackStats)."""
        c = self.config
        self._check_tokens(tgt_in, "tgt_in")
        _, dec_key, _, tgt_key = self._keys(key, train)
        y = dropout(self._embed_tgt(tgt_in, 0), c.dropout, tgt_key)
        y, stats = self.decoder(y, context=(enc_out, src_mask), key=dec_key, train=train,
                                inference_gamma=inference_gamma)
        return self._logits(y), stats

    def __call__(self, src: jax.Array, tgt_in: jax.Array, *, src_mask: jax.Array | None = None,
                 key: jax.Array | None = None, train: bool = False,
                 inference_gamma=None) -> tuple[jax.Array, dict]:
        """Teacher-forced logits.

        Args:
          src: [batch, src_len] int32 source tokens (padded with pad_id).
          tgt_in: [batch, tgt_len] int32 decoder input: BOS followed by the target
            shifted right (position i predicts target token i).
          src_mask: optional [batch, src_len] bool (True = real token); default
            src != pad_id. Padded source tokens never affect the output.
          key: PRNG key; needed when train=True and (update=BDIA(...) or dropout > 0).
          train: training mode (dropout, BDIA update) or inference (γ = 0).
          inference_gamma: update=BDIA(...), train=False: a float (or an array broadcastable
            to [depth-1, batch] of *both* stacks) for the inference-γ sweep.

        Returns:
          logits [batch, tgt_len, tgt_vocab] float32; aux {"max_abs", "overflow",
          "nonfinite"} over both stacks.
        """
        c = self.config
        if train and key is None and (c.update.has_gamma or c.dropout
                                      or c.attention_dropout):
            raise ValueError(
                "train=True needs a PRNG `key` (BDIA γ draw / dropout masks): pass "
                "key=jax.random.key(step)."
            )
        enc_out, src_mask, enc_stats = self.encode(
            src, src_mask=src_mask, key=key, train=train, inference_gamma=inference_gamma)
        logits, dec_stats = self.decode(tgt_in, enc_out, src_mask, key=key, train=train,
                                        inference_gamma=inference_gamma)
        return logits, stats_to_aux(enc_stats, dec_stats)

    # ------------------------------------------------------------------ incremental decoding
    def init_decode_state(self, src: jax.Array, max_len: int, *,
                          src_mask: jax.Array | None = None, beam_size: int = 1) -> DecodeState:
        """Encode (inference) and build an empty decoder cache for max_len positions.

        Each example's rows are repeated beam_size times: row b * beam_size + j.
        """
        if not 1 <= max_len <= self.config.max_len:
            raise ValueError(f"max_len must be in [1, {self.config.max_len}], got {max_len}.")
        enc_out, src_mask, _ = self.encode(src, src_mask=src_mask)
        if beam_size > 1:
            enc_out = jnp.repeat(enc_out, beam_size, axis=0)
            src_mask = jnp.repeat(src_mask, beam_size, axis=0)
        cache = self.decoder.map_blocks(
            lambda block: block.init_cache(enc_out.shape[0], max_len, enc_out))
        return DecodeState(cache, src_mask)

    def decode_chunk(self, state: DecodeState, tokens: jax.Array, pos):
        """Feed tokens [rows, t] at decoder positions pos … pos+t-1.

        Returns (logits [rows, t, tgt_vocab] float32, state). Same math as
        ``decode(train=False)`` on the whole prefix.
        """
        self._check_tokens(tokens, "tokens", pos)
        y, cache = self.decoder.decode(self._embed_tgt(tokens, pos), state.cache, pos,
                                       context=state.src_mask)
        return self._logits(y), DecodeState(cache, state.src_mask)

    def decode_step(self, state: DecodeState, tokens: jax.Array, pos):
        """One step: tokens [rows] int32 at position pos → (log_probs [rows, vocab], state)."""
        logits, state = self.decode_chunk(state, tokens[:, None], pos)
        return jax.nn.log_softmax(logits[:, 0], axis=-1), state

    @staticmethod
    def reorder_state(state: DecodeState, rows_index: jax.Array) -> DecodeState:
        """Gather decoding rows (beam search): rows_index int32 [rows]."""
        cache = jax.tree_util.tree_map(lambda a: jnp.take(a, rows_index, axis=1), state.cache)
        return DecodeState(cache, jnp.take(state.src_mask, rows_index, axis=0))

    def greedy_decode(self, src: jax.Array, max_len: int, *,
                      src_mask: jax.Array | None = None) -> jax.Array:
        """Greedy translation with the KV cache (jitted).

        src: [batch, src_len] int32. Returns [batch, max_len] int32: generated tokens
        without BOS, EOS included when produced, pad_id after it.
        """
        graphdef, state = nnx.split(self)
        return _greedy(graphdef, state, jnp.asarray(src, jnp.int32), src_mask, max_len=max_len)

    def beam_search(self, src: jax.Array, max_len: int, *, beam_size: int = 4,
                    alpha: float = 0.6, src_mask: jax.Array | None = None):
        """Beam-search translation with the KV cache (jitted); see
        ``decoding.beam_search``. Returns (tokens [batch, max_len] int32, scores [batch])."""
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}.")
        graphdef, state = nnx.split(self)
        return _beam(graphdef, state, jnp.asarray(src, jnp.int32), src_mask, max_len=max_len,
                     beam_size=beam_size, alpha=float(alpha))


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len"))
def _greedy(graphdef, state, src, src_mask, *, max_len):
    model = nnx.merge(graphdef, state)
    c = model.config
    dstate = model.init_decode_state(src, max_len, src_mask=src_mask)
    return decoding.greedy_search(model.decode_step, dstate, batch_size=src.shape[0],
                                  max_len=max_len, bos_id=c.bos_id, eos_id=c.eos_id,
                                  pad_id=c.pad_id)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "beam_size", "alpha"))
def _beam(graphdef, state, src, src_mask, *, max_len, beam_size, alpha):
    model = nnx.merge(graphdef, state)
    c = model.config
    dstate = model.init_decode_state(src, max_len, src_mask=src_mask, beam_size=beam_size)
    return decoding.beam_search(model.decode_step, model.reorder_state, dstate,
                                batch_size=src.shape[0], beam_size=beam_size, max_len=max_len,
                                bos_id=c.bos_id, eos_id=c.eos_id, pad_id=c.pad_id, alpha=alpha)
