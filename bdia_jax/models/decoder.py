"""Decoder-only language model: GPT-2 and the Llama family, trainable the standard way or
the BDIA way.

Architecture: token embedding [+ learned positions] → dropout → ``ResidualStack`` of causal
``EncoderBlock``s → final norm → logits with the token embedding (tied) or a Linear head.
One ``DecoderConfig`` picks every architectural switch:

  GPT-2:   norm="layernorm", position="learned", mlp="gelu", bias="all", tied head
           (the defaults; ``layer_norm_eps=1e-5``, ``approximate_gelu=True`` make it GPT-2
           exactly);
  Llama:   norm="rmsnorm", position="rope" (rope_theta, rope_scaling "default" | "llama3" |
           "linear"), mlp="swiglu", bias="none", num_kv_heads < num_heads (GQA), tied or
           untied head;
  Qwen2:   as Llama with bias="qkv";  Qwen3: as Llama with qk_norm=True and its head_dim;
  Mistral / SmolLM2: Llama configs.

``bdia_jax.pretrained`` maps Hugging Face checkpoints to and from this config. Rotary
positions are numpy tables computed once per shape (``layers.Rope``), so the forward pass,
the VJP that recomputes a block and KV-cached decoding rotate with the same bits; RMSNorm
and LayerNorm statistics are pairwise tree sums (``bdia_jax.stable``), so
``recompute="shared"`` stays exact.

Parameters are stored in ``param_dtype`` (float32 or bfloat16); the residual stream is
float32 whatever it is (on the fixed-point grid for BDIA), and norms, softmax and rotations
run in float32.

Keys: the model key is split with ``jax.random.fold_in``: ``fold_in(key, 0)`` is the stack
key (γ draw and per-block dropout keys), ``fold_in(key, 1)`` the embedding dropout key.

Inference with a KV cache (``init_cache`` / ``decode_step`` / ``generate``) runs the γ = 0
update, the same as ``__call__(train=False)``: for a BDIA model with
``quantize_at_inference`` the stream stays on the grid (x_0 = Q(x), x_{k+1} = x_k + Q(h)).
The cache holds only the key/value heads ([depth, batch, num_kv_heads, max_len, head_dim]).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from bdia_jax.models.layers import (
    BIASES,
    MLPS,
    NORMS,
    ROPE_SCALINGS,
    BlockConfig,
    EncoderBlock,
    LayerNorm,
    RMSNorm,
    Rope,
    check_ints,
    dropout,
    param_dtype_of,
)
from bdia_jax.models.residual_stack import ResidualStack, named_config, stats_to_aux

KEY_STACK, KEY_EMBED = 0, 1  # fold_in indices of the model key (see module docstring)
POSITIONS = ("learned", "rope")


@dataclasses.dataclass(frozen=True)
class DecoderConfig(BlockConfig):
    """Decoder-only LM settings. Defaults: nanoGPT's ``shakespeare_char`` model (a GPT-2
    architecture). The training method is the keyword-only ``update`` / ``backprop`` pair
    of ``StackMethod``; the shared block settings are ``BlockConfig``'s."""

    vocab_size: int = 65  # tokens (65 characters in tiny_shakespeare)
    max_len: int = 256  # context length: positions 0 … max_len-1 (nanoGPT block_size)
    width: int = 384  # residual stream (embedding) dimension
    depth: int = 6  # number of transformer blocks K
    num_heads: int = 6  # query heads; width must be divisible by it unless head_dim is set
    mlp_dim: int = 1536  # hidden size of each block's MLP
    dropout: float = 0.2  # embedding dropout and residual dropout on a(x), m(y)
    attention_dropout: float = 0.2  # dropout on attention probabilities
    # Init std of the token and position embeddings (nanoGPT: 0.02). Note for BDIA: the
    # stack input is then ~0.03 per element, so rounding it to δ = 2**-9 (x_0 = Q(x)) is a
    # ~2% perturbation that the first LayerNorm scales up to O(1) at init.
    embed_std: float = 0.02
    layer_norm_eps: float = 1e-6  # ε of every norm, LayerNorm or RMSNorm (GPT-2: 1e-5)
    approximate_gelu: bool = True  # mlp="gelu": tanh approximation (GPT-2) or exact erf
    norm: str = "layernorm"  # "layernorm" (GPT-2) | "rmsnorm" (Llama)
    position: str = "learned"  # "learned" (GPT-2: a [max_len, width] table) | "rope"
    mlp: str = "gelu"  # "gelu" (Linear-GELU-Linear) | "swiglu" (Llama's gated MLP)
    bias: str = "all"  # Linear biases: "all" (GPT-2) | "none" (Llama) | "qkv" (Qwen2)
    num_kv_heads: int | None = None  # key/value heads (grouped-query attention); None: num_heads
    head_dim: int | None = None  # per-head width; None: width // num_heads (Qwen3 sets it)
    qk_norm: bool = False  # per-head RMSNorm of queries and keys before rotation (Qwen3)
    tie_embeddings: bool = True  # head = token embedding (else an untied Linear head)
    param_dtype: str = "float32"  # stored parameters: "float32" | "bfloat16"
    rope_theta: float = 10000.0  # position="rope": base of the rotary frequencies
    rope_scaling: str = "default"  # "default" | "llama3" | "linear" (frequency scaling)
    rope_factor: float = 1.0  # "llama3" / "linear": the scaling factor
    rope_low_freq_factor: float = 1.0  # "llama3" only
    rope_high_freq_factor: float = 4.0  # "llama3" only
    rope_original_max_len: int = 8192  # "llama3" only: original_max_position_embeddings

    def __post_init__(self):
        check_ints(self, ("vocab_size",), low=2)
        check_ints(self, ("max_len", "depth"))
        for name, value, choices in (("norm", self.norm, NORMS), ("mlp", self.mlp, MLPS),
                                     ("position", self.position, POSITIONS),
                                     ("bias", self.bias, BIASES),
                                     ("rope_scaling", self.rope_scaling, ROPE_SCALINGS)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}.")
        if not isinstance(self.layer_norm_eps, float) or not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be a float > 0 (GPT-2: 1e-5), got "
                             f"{self.layer_norm_eps!r}.")
        for name in ("approximate_gelu", "qk_norm", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        param_dtype_of(self.param_dtype)
        if self.lora is not None and "gate" in self.lora.targets and self.mlp != "swiglu":
            raise ValueError("LoRA target 'gate' needs mlp='swiglu'; a GELU MLP has 'up' (fc1) "
                             "and 'down' (fc2).")
        super().__post_init__()  # the block settings (width, heads, ...) and the method
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads}).")
        if self.position == "rope":
            if self.head_size % 2:
                raise ValueError(f"position='rope' needs an even head_dim, got "
                                 f"{self.head_size}.")
            if not self.rope_theta > 0 or not self.rope_factor > 0:
                raise ValueError(f"rope_theta and rope_factor must be > 0, got "
                                 f"{self.rope_theta!r}, {self.rope_factor!r}.")
            if (self.rope_scaling == "llama3"
                    and not self.rope_high_freq_factor > self.rope_low_freq_factor > 0):
                raise ValueError(f"rope_scaling='llama3' needs rope_high_freq_factor > "
                                 f"rope_low_freq_factor > 0, got {self.rope_high_freq_factor}"
                                 f", {self.rope_low_freq_factor}.")

    def _check_heads(self):
        if self.head_dim is not None:
            if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) \
                    or self.head_dim < 1:
                raise ValueError(f"head_dim must be an int >= 1 or None, got "
                                 f"{self.head_dim!r}.")
        else:
            super()._check_heads()
        if self.num_kv_heads is not None and (isinstance(self.num_kv_heads, bool) or not
                                              isinstance(self.num_kv_heads, int) or
                                              self.num_kv_heads < 1):
            raise ValueError(f"num_kv_heads must be an int >= 1 or None, got "
                             f"{self.num_kv_heads!r}.")

    @property
    def kv_heads(self) -> int:
        """Key/value heads (num_kv_heads, or num_heads when None)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_size(self) -> int:
        """Per-head width (head_dim, or width // num_heads when None)."""
        return self.width // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def rope(self) -> Rope | None:
        """The rotary embedding of position="rope" (None for learned positions)."""
        if self.position != "rope":
            return None
        return Rope(self.head_size, self.max_len, float(self.rope_theta), self.rope_scaling,
                    float(self.rope_factor), float(self.rope_low_freq_factor),
                    float(self.rope_high_freq_factor), int(self.rope_original_max_len))


# Llama-family architecture of the tiny test models (a GQA, rope, SwiGLU, RMSNorm block).
_LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu", bias="none",
              tie_embeddings=False, layer_norm_eps=1e-5, dropout=0.0, attention_dropout=0.0)

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

DECODER_VARIANTS: dict[str, dict] = {
    **GPT_VARIANTS,
    # GPT-2 small (124M), as pretrained.load reads it from config.json.
    "gpt2": dict(vocab_size=50257, max_len=1024, width=768, depth=12, num_heads=12,
                 mlp_dim=3072, dropout=0.1, attention_dropout=0.1, layer_norm_eps=1e-5),
    # CPU unit tests of the Llama family: GQA (4 query heads on 2 key/value heads).
    "llama-tiny": dict(vocab_size=32, max_len=16, width=32, depth=2, num_heads=4,
                       num_kv_heads=2, mlp_dim=64, **_LLAMA),
    # SmolLM2-135M (a Llama: 30 blocks, 9 heads on 3 key/value heads, tied head).
    "smollm2-135m": dict(vocab_size=49152, max_len=8192, width=576, depth=30, num_heads=9,
                         num_kv_heads=3, mlp_dim=1536, rope_theta=100000.0,
                         **{**_LLAMA, "tie_embeddings": True}),
}


def decoder_config(name: str, **overrides) -> DecoderConfig:
    """A named decoder variant (``DECODER_VARIANTS``: "tiny", "small", "nanogpt", "gpt2",
    "llama-tiny", "smollm2-135m") with field overrides (method objects or flat method
    keywords, see ``residual_stack.named_config``)."""
    return named_config(DecoderConfig, DECODER_VARIANTS, name, overrides)


def gpt_config(name: str, **overrides) -> DecoderConfig:
    """A named GPT variant ("tiny", "small", "nanogpt") with field overrides."""
    return named_config(DecoderConfig, GPT_VARIANTS, name, overrides)


def block_options(c: DecoderConfig) -> dict:
    """The ``EncoderBlock`` options of a decoder config beyond ``BlockConfig``'s."""
    return dict(layer_norm_eps=c.layer_norm_eps, approximate_gelu=c.approximate_gelu,
                norm=c.norm, mlp=c.mlp, bias=c.bias, num_kv_heads=c.num_kv_heads,
                head_dim=c.head_dim, qk_norm=c.qk_norm, rope=c.rope, param_dtype=c.param_dtype)


class DecoderLM(nnx.Module):
    """Causal language model; see the module docstring.

    Call: ``logits, aux = model(tokens, *, key=None, train=False, inference_gamma=None)``;
    ``hidden_states`` (same arguments) stops before the head.
    """

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = c = config
        init = nnx.initializers.normal(c.embed_std)
        p_dtype = param_dtype_of(c.param_dtype)
        # dtype float32: lookups and the tied head compute in float32 whatever param_dtype.
        self.token_embed = nnx.Embed(c.vocab_size, c.width, embedding_init=init,
                                     dtype=jnp.float32, param_dtype=p_dtype, rngs=rngs)
        if c.position == "learned":
            self.pos_embed = nnx.Param(init(rngs.params(), (c.max_len, c.width), p_dtype))
        options = block_options(c)

        def make_block(block_rngs):
            return EncoderBlock.from_config(c, causal=True, rngs=block_rngs, **options)

        self.stack = ResidualStack(make_block, c.depth, update=c.update, backprop=c.backprop,
                                   rngs=rngs)
        norm = LayerNorm if c.norm == "layernorm" else RMSNorm
        self.norm = norm(c.width, epsilon=c.layer_norm_eps, param_dtype=p_dtype, rngs=rngs)
        if not c.tie_embeddings:
            self.head = nnx.Linear(c.width, c.vocab_size, use_bias=False, dtype=jnp.float32,
                                   param_dtype=p_dtype, rngs=rngs)

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
        x = self.token_embed(tokens).astype(jnp.float32)
        if self.config.position != "learned":
            return x
        positions = jax.lax.dynamic_slice_in_dim(self.pos_embed[...], pos, tokens.shape[1])
        return x + positions.astype(jnp.float32)

    def _head(self, hidden: jax.Array) -> jax.Array:
        """hidden [batch, t, width] float32 → logits [batch, t, vocab] float32."""
        if self.config.tie_embeddings:
            return self.token_embed.attend(hidden).astype(jnp.float32)
        return self.head(hidden).astype(jnp.float32)

    def _logits(self, x: jax.Array) -> jax.Array:
        """Final norm and head: x [batch, t, width] → [batch, t, vocab] float32."""
        return self._head(self.norm(x))

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
        return self._head(hidden), aux

    @property
    def head_embedding(self) -> jax.Array:
        """The head's weights [vocab, width] float32 (the token embedding when tied):
        ``__call__``'s logits are ``hidden @ head_embeddingᵀ``."""
        if self.config.tie_embeddings:
            return self.token_embed.embedding[...].astype(jnp.float32)
        return self.head.kernel[...].astype(jnp.float32).T

    def hidden_states(self, tokens: jax.Array, *, key: jax.Array | None = None,
                      train: bool = False, inference_gamma=None) -> tuple[jax.Array, dict]:
        """The final normalized hidden states, before the head: ``__call__``'s logits are
        ``hidden @ head_embeddingᵀ``. Feed them to ``bdia_jax.chunked_loss`` to train
        without holding the [batch, seq, vocab] logits.

        Args: as ``__call__``.

        Returns:
          hidden [batch, seq, width] float32 (the final norm of the stack output);
          aux {"max_abs", "overflow", "nonfinite"} scalars.
        """
        c = self.config
        self._check_tokens(tokens)
        if train and key is None and (c.update.has_gamma or c.dropout
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
        """Empty KV cache: KVCache of [depth, batch, num_kv_heads, max_len, head_dim]."""
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


# GPT-2 is a configuration of this model; the GPT names stay for the experiments.
GPT = DecoderLM
GPTConfig = DecoderConfig
