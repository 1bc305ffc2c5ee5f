"""Decoder-only GPT language model, trainable the standard way or the BDIA way.

Architecture: token embedding + learned positions → dropout → ``ResidualStack`` of causal
``EncoderBlock``s → final LayerNorm → logits with the token embedding (tied weights).
Biases on every Linear and LayerNorm. This is GPT-2's architecture; with
``layer_norm_eps=1e-5`` and ``approximate_gelu=True`` it is GPT-2 exactly, which is how
``bdia_jax.pretrained.load_gpt2`` builds it.

Keys: the model key is split with ``jax.random.fold_in``: ``fold_in(key, 0)`` is the stack
key (γ draw and per-block dropout keys), ``fold_in(key, 1)`` the embedding dropout key.

Inference with a KV cache (``init_cache`` / ``decode_step`` / ``generate``) runs the γ = 0
update, the same as ``__call__(train=False)``: for a BDIA model with
``quantize_at_inference`` the stream stays on the grid (x_0 = Q(x), x_{k+1} = x_k + Q(h)).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from bdia_jax.methods import BDIA, StackMethod
from bdia_jax.models.attention import check_attention
from bdia_jax.models.layers import EncoderBlock, LayerNorm, canonical_dtype, dropout
from bdia_jax.models.residual_stack import ResidualStack, named_config, stats_to_aux

KEY_STACK, KEY_EMBED = 0, 1  # fold_in indices of the model key (see module docstring)


@dataclasses.dataclass(frozen=True)
class GPTConfig(StackMethod):
    """GPT settings. Defaults: nanoGPT's ``shakespeare_char`` model. The training method is
    the keyword-only ``update`` / ``backprop`` pair of ``StackMethod``."""

    vocab_size: int = 65  # tokens (65 characters in tiny_shakespeare)
    max_len: int = 256  # context length: positions 0 … max_len-1 (nanoGPT block_size)
    width: int = 384  # residual stream (embedding) dimension
    depth: int = 6  # number of transformer blocks K
    num_heads: int = 6  # attention heads; width must be divisible by it
    mlp_dim: int = 1536  # hidden size of each block's MLP
    dropout: float = 0.2  # embedding dropout and residual dropout on a(x), m(y)
    attention_dropout: float = 0.2  # dropout on attention probabilities
    compute_dtype: str = "float32"  # matmul dtype ("bfloat16" on accelerators)
    # Softmax attention: "xla" (einsum, materializes the probabilities), "chunked" (query
    # blocks, O(seq·chunk) memory, any backend; the MLP runs in position blocks too), "cudnn"
    # (fused kernel, GPU only).
    attention: str = "xla"
    # Init std of the token and position embeddings (nanoGPT: 0.02). Note for BDIA: the
    # stack input is then ~0.03 per element, so rounding it to δ = 2**-9 (x_0 = Q(x)) is a
    # ~2% perturbation that the first LayerNorm scales up to O(1) at init.
    embed_std: float = 0.02
    layer_norm_eps: float = 1e-6  # ε of every LayerNorm (GPT-2: 1e-5)
    approximate_gelu: bool = True  # MLP GELU: tanh approximation (GPT-2) or exact erf

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(
                f"width ({self.width}) must be divisible by num_heads ({self.num_heads})."
            )
        if self.vocab_size < 2 or self.max_len < 1:
            raise ValueError("vocab_size must be >= 2 and max_len >= 1.")
        super().__post_init__()
        canonical_dtype(self.compute_dtype)
        if not isinstance(self.layer_norm_eps, float) or not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be a float > 0 (GPT-2: 1e-5), got "
                             f"{self.layer_norm_eps!r}.")
        if not isinstance(self.approximate_gelu, bool):
            raise ValueError(f"approximate_gelu must be True (tanh GELU) or False (erf GELU), "
                             f"got {self.approximate_gelu!r}.")
        check_attention(self.attention, self.attention_dropout, self.dropout)


GPT_VARIANTS: dict[str, dict] = {
    # CPU unit tests.
    "tiny": dict(vocab_size=32, max_len=16, width=32, depth=2, num_heads=2, mlp_dim=64,
                 dropout=0.0, attention_dropout=0.0),
    # CPU quick runs (character LM in minutes).
    "small": dict(max_len=64, width=128, depth=4, num_heads=4, mlp_dim=512, dropout=0.0,
                  attention_dropout=0.0),
    # nanoGPT shakespeare_char: 6 layers, 6 heads, width 384, context 256, dropout 0.2.
    "nanogpt": dict(),
}


def gpt_config(name: str, **overrides) -> GPTConfig:
    """A named GPT variant ("tiny", "small", "nanogpt") with field overrides."""
    return named_config(GPTConfig, GPT_VARIANTS, name, overrides)


class GPT(nnx.Module):
    """Causal language model; see the module docstring.

    Call: ``logits, aux = model(tokens, *, key=None, train=False, inference_gamma=None)``;
    ``hidden_states`` (same arguments) stops before the head.
    """

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = c = config
        init = nnx.initializers.normal(c.embed_std)
        self.token_embed = nnx.Embed(c.vocab_size, c.width, embedding_init=init, rngs=rngs)
        self.pos_embed = nnx.Param(init(rngs.params(), (c.max_len, c.width), jnp.float32))

        def make_block(block_rngs):
            return EncoderBlock(c.width, c.num_heads, c.mlp_dim, causal=True,
                                dropout=c.dropout, attention_dropout=c.attention_dropout,
                                compute_dtype=c.compute_dtype,
                                layer_norm_eps=c.layer_norm_eps,
                                approximate_gelu=c.approximate_gelu, attention=c.attention,
                                rngs=block_rngs)

        self.stack = ResidualStack(make_block, c.depth, update=c.update, backprop=c.backprop,
                                   rngs=rngs)
        self.norm = LayerNorm(c.width, epsilon=c.layer_norm_eps, rngs=rngs)

    def _check_tokens(self, tokens, pos=0):
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be int [batch, seq], got {tokens.dtype} "
                             f"{list(tokens.shape)}.")
        if isinstance(pos, int) and pos + tokens.shape[1] > self.config.max_len:
            raise ValueError(
                f"sequence of {pos + tokens.shape[1]} tokens exceeds max_len="
                f"{self.config.max_len}; crop the input or raise max_len."
            )

    def _embed(self, tokens: jax.Array, pos) -> jax.Array:
        """tokens [batch, t] at positions pos … pos+t-1 → [batch, t, width] float32."""
        positions = jax.lax.dynamic_slice_in_dim(self.pos_embed[...], pos, tokens.shape[1])
        return self.token_embed(tokens).astype(jnp.float32) + positions

    def _logits(self, x: jax.Array) -> jax.Array:
        """Tied head: LN(x) @ Eᵀ → [batch, t, vocab] float32."""
        return self.token_embed.attend(self.norm(x)).astype(jnp.float32)

    def __call__(self, tokens: jax.Array, *, key: jax.Array | None = None, train: bool = False,
                 inference_gamma=None) -> tuple[jax.Array, dict]:
        """Next-token logits.

        Args:
          tokens: [batch, seq] int32, seq <= max_len.
          key: PRNG key; needed when train=True and (update=BDIA(...) or dropout > 0).
          train: training mode (dropout, BDIA update) or inference (γ = 0).
          inference_gamma: update=BDIA(...), train=False only: the inference-γ sweep.

        Returns:
          logits [batch, seq, vocab] float32 (position i predicts token i+1);
          aux {"max_abs", "overflow", "nonfinite"} scalars.
        """
        hidden, aux = self.hidden_states(tokens, key=key, train=train,
                                         inference_gamma=inference_gamma)
        return self.token_embed.attend(hidden).astype(jnp.float32), aux

    @property
    def head_embedding(self) -> jax.Array:
        """The tied head's weights: the token embedding [vocab, width] float32."""
        return self.token_embed.embedding[...]

    def hidden_states(self, tokens: jax.Array, *, key: jax.Array | None = None,
                      train: bool = False, inference_gamma=None) -> tuple[jax.Array, dict]:
        """The final normalized hidden states, before the head: ``__call__``'s logits are
        ``hidden @ head_embeddingᵀ``. Feed them to ``bdia_jax.chunked_loss`` to train
        without holding the [batch, seq, vocab] logits.

        Args: as ``__call__``.

        Returns:
          hidden [batch, seq, width] float32 (LN of the stack output);
          aux {"max_abs", "overflow", "nonfinite"} scalars.
        """
        c = self.config
        self._check_tokens(tokens)
        if train and key is None and (isinstance(c.update, BDIA) or c.dropout
                                      or c.attention_dropout):
            raise ValueError(
                "train=True needs a PRNG `key` (BDIA γ draw / dropout masks): pass "
                "key=jax.random.key(step)."
            )
        stack_key = embed_key = None
        if train and key is not None:
            stack_key = jax.random.fold_in(key, KEY_STACK)
            embed_key = jax.random.fold_in(key, KEY_EMBED)
        x = dropout(self._embed(tokens, 0), c.dropout, embed_key)
        x, stats = self.stack(x, key=stack_key, train=train, inference_gamma=inference_gamma)
        return self.norm(x), stats_to_aux(stats)

    # ------------------------------------------------------------------ KV cache
    def init_cache(self, batch: int):
        """Empty KV cache: KVCache of [depth, batch, heads, max_len, head_dim]."""
        return self.stack.map_blocks(lambda block: block.init_cache(batch, self.config.max_len))

    def decode_step(self, cache, tokens: jax.Array, pos):
        """Feed tokens [batch, t] at positions pos … pos+t-1 (a prompt chunk, or t = 1).

        Returns (logits [batch, t, vocab] float32, updated cache). Inference only (γ = 0,
        no dropout); equals ``__call__(train=False)`` on the whole sequence.
        """
        self._check_tokens(tokens, pos)
        x, cache = self.stack.decode(self._embed(tokens, pos), cache, pos)
        return self._logits(x), cache

    def generate(self, prompt: jax.Array, max_new_tokens: int, *, key: jax.Array | None = None,
                 temperature: float = 1.0, top_k: int | None = None) -> jax.Array:
        """Sample a continuation with the KV cache (jitted).

        Args:
          prompt: [batch, prompt_len] int32, prompt_len >= 1.
          max_new_tokens: tokens to generate; prompt_len + max_new_tokens <= max_len.
          key: PRNG key for sampling (not needed for temperature == 0: greedy argmax).
          temperature: softmax temperature; 0.0 gives greedy decoding.
          top_k: sample among the k most likely tokens (None or 0: all).

        Returns:
          [batch, prompt_len + max_new_tokens] int32: the prompt and its continuation.
        """
        prompt = jnp.asarray(prompt, jnp.int32)
        self._check_tokens(prompt)
        if prompt.shape[1] < 1 or max_new_tokens < 1:
            raise ValueError("generate needs a prompt of >= 1 token and max_new_tokens >= 1.")
        if prompt.shape[1] + max_new_tokens > self.config.max_len:
            raise ValueError(
                f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                f"max_len={self.config.max_len}."
            )
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}.")
        if temperature > 0 and key is None:
            raise ValueError("sampling (temperature > 0) needs a PRNG `key`; or use "
                             "temperature=0.0 for greedy decoding.")
        if top_k is not None and not 0 <= top_k <= self.config.vocab_size:
            raise ValueError(f"top_k must be in [0, vocab_size], got {top_k}.")
        key = jax.random.key(0) if key is None else key  # unused by greedy decoding
        graphdef, state = nnx.split(self)
        return _generate(graphdef, state, prompt, key, max_new_tokens=max_new_tokens,
                         temperature=float(temperature), top_k=int(top_k or 0))


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float, top_k: int):
    """logits [batch, vocab] → token ids [batch] int32 (argmax when temperature == 0)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature",
                                             "top_k"))
def _generate(graphdef, state, prompt, key, *, max_new_tokens, temperature, top_k):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = prompt.shape
    logits, cache = model.decode_step(model.init_cache(batch), prompt, 0)
    first = sample_logits(logits[:, -1], jax.random.fold_in(key, 0), temperature, top_k)

    def step(carry, i):
        cache, token = carry
        logits, cache = model.decode_step(cache, token[:, None], prompt_len + i)
        nxt = sample_logits(logits[:, -1], jax.random.fold_in(key, i + 1), temperature, top_k)
        return (cache, nxt), nxt

    _, rest = jax.lax.scan(step, (cache, first), jnp.arange(max_new_tokens - 1))
    new = jnp.concatenate([first[:, None], rest.T], axis=1)
    return jnp.concatenate([prompt, new], axis=1)
