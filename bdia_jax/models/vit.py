"""Vision Transformer for small images, trainable the standard way or the BDIA way.

Architecture (an ordinary pre-LN ViT; BDIA adds no parameters): non-overlapping patches
→ Linear patch embedding → [class token] + learned position embeddings → dropout →
``ResidualStack`` of ``EncoderBlock``s → final LayerNorm → class token or mean pooling →
Linear head.

Keys: the model key is split with ``jax.random.fold_in``: ``fold_in(key, 0)`` is the stack
key (γ draw and per-block dropout keys), ``fold_in(key, 1)`` the embedding dropout key.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from bdia_jax.models.layers import BlockConfig, EncoderBlock, LayerNorm, check_ints, dropout
from bdia_jax.models.residual_stack import ResidualStack, named_config, stats_to_aux

KEY_STACK, KEY_EMBED = 0, 1  # fold_in indices of the model key (see module docstring)


@dataclasses.dataclass(frozen=True)
class ViTConfig(BlockConfig):
    """ViT settings. Defaults: the paper's CIFAR-10 model. The training method is the
    keyword-only ``update`` / ``backprop`` pair of ``StackMethod`` (default BDIA(), with
    Reversible() resolved from it); the block settings are ``BlockConfig``'s."""

    image_size: int = 32  # input height = width, pixels
    patch_size: int = 4  # square patches; image_size must be a multiple (32/4 → 64 tokens)
    num_classes: int = 10  # classifier outputs
    width: int = 512  # residual stream (embedding) dimension
    depth: int = 6  # number of transformer blocks K
    num_heads: int = 8  # attention heads; width must be divisible by it
    mlp_dim: int = 512  # hidden size of each block's MLP
    dropout: float = 0.1  # embedding dropout and residual dropout on a(x), m(y)
    attention_dropout: float = 0.1  # dropout on attention probabilities
    pool: Literal["cls", "mean"] = "cls"  # class token, or mean over patch tokens
    channels: int = 3  # input channels (C in [batch, H, W, C])
    # Also BlockConfig's compute_dtype, attention, chunk_size and chunk_mlp.

    def __post_init__(self):
        check_image_fields(self)
        super().__post_init__()
        check_ints(self, ("depth",))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def check_image_fields(c) -> None:
    """The image fields and cross-field rules of a ViT-shaped config (``ViTConfig``,
    ``RevViTConfig``)."""
    check_ints(c, ("image_size", "patch_size", "num_classes", "channels", "width",
                   "num_heads"))
    if c.image_size % c.patch_size:
        raise ValueError(
            f"image_size ({c.image_size}) must be a multiple of patch_size ({c.patch_size})."
        )
    if c.pool not in ("cls", "mean"):
        raise ValueError(f"pool must be 'cls' or 'mean', got {c.pool!r}.")
    if c.width % c.num_heads:
        raise ValueError(f"width ({c.width}) must be divisible by num_heads ({c.num_heads}).")


VIT_VARIANTS: dict[str, dict] = {
    # CPU unit tests: seconds per step.
    "tiny": dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8,
                 dropout=0.0, attention_dropout=0.0),
    # CPU quick runs on CIFAR-10 (minutes).
    "small": dict(width=128, depth=4, num_heads=4, mlp_dim=256, patch_size=4),
    # The paper's CIFAR-10 setting: depth 6, width 512, 8 heads, MLP 512, patch 4.
    "paper": dict(width=512, depth=6, num_heads=8, mlp_dim=512, patch_size=4),
}


def vit_config(name: str, **overrides) -> ViTConfig:
    """A named ViT variant ("tiny", "small", "paper") with field overrides (method objects
    or flat method keywords, see ``residual_stack.named_config``)."""
    return named_config(ViTConfig, VIT_VARIANTS, name, overrides)


class PatchTokens:
    """The token embedding a ViT and a RevViT share (a mixin of their modules): patches →
    Linear → [class token] + learned positions. Owns ``patch_embed``, ``cls_token`` (pool
    "cls") and ``pos_embed``; reads ``self.config`` (image_size, patch_size, channels,
    width, pool)."""

    def _init_tokens(self, rngs: nnx.Rngs) -> None:
        c = self.config
        patch_dim = c.patch_size * c.patch_size * c.channels
        # A Linear on flattened patches = a conv with kernel = stride = patch_size.
        self.patch_embed = nnx.Linear(patch_dim, c.width, rngs=rngs)
        num_tokens = c.num_patches + (1 if c.pool == "cls" else 0)
        init = nnx.initializers.normal(0.02)
        if c.pool == "cls":
            self.cls_token = nnx.Param(jnp.zeros((1, 1, c.width), jnp.float32))
        self.pos_embed = nnx.Param(init(rngs.params(), (1, num_tokens, c.width), jnp.float32))

    def _patches(self, images: jax.Array) -> jax.Array:
        """[batch, H, W, C] → [batch, num_patches, patch*patch*C] (row-major patches)."""
        c = self.config
        if images.ndim != 4 or images.shape[1:] != (c.image_size, c.image_size, c.channels):
            raise ValueError(
                f"images must be [batch, {c.image_size}, {c.image_size}, {c.channels}] "
                f"(NHWC), got {list(images.shape)}."
            )
        b, p = images.shape[0], c.patch_size
        n = c.image_size // p
        x = images.reshape(b, n, p, n, p, c.channels).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, n * n, p * p * c.channels)

    def _tokens(self, images: jax.Array) -> jax.Array:
        """[batch, H, W, C] → tokens [batch, num_tokens, width] float32 (before dropout)."""
        c = self.config
        x = self.patch_embed(self._patches(jnp.asarray(images, jnp.float32)))
        if c.pool == "cls":
            cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, c.width))
            x = jnp.concatenate([cls, x], axis=1)
        return x + self.pos_embed[...]


class ViT(PatchTokens, nnx.Module):
    """Vision Transformer; see the module docstring.

    Call: ``logits, aux = model(images, *, key=None, train=False, inference_gamma=None)``.
    """

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        self._init_tokens(rngs)

        def make_block(block_rngs):
            return EncoderBlock.from_config(c, rngs=block_rngs)

        self.stack = ResidualStack(make_block, c.depth, update=c.update, backprop=c.backprop,
                                   rngs=rngs)
        self.norm = LayerNorm(c.width, rngs=rngs)
        self.head = nnx.Linear(c.width, c.num_classes, rngs=rngs)

    def __call__(self, images: jax.Array, *, key: jax.Array | None = None, train: bool = False,
                 inference_gamma=None) -> tuple[jax.Array, dict]:
        """Classify images.

        Args:
          images: [batch, H, W, C] float32, already normalized.
          key: PRNG key; needed when train=True and (update=BDIA(...) or dropout > 0).
          train: training mode (dropout, BDIA update) or inference.
          inference_gamma: update=BDIA(...), train=False: float or array broadcastable to
            [depth-1, batch] (the inference-γ sweep); None = γ 0.

        Returns:
          logits [batch, num_classes] float32; aux: {"max_abs", "overflow", "nonfinite"}
          scalars from the stack.
        """
        c = self.config
        if train and key is None and (c.update.has_gamma or c.dropout
                                      or c.attention_dropout):
            raise ValueError(
                "train=True needs a PRNG `key` (BDIA γ draw / dropout masks): pass "
                "key=jax.random.key(step)."
            )
        x = self._tokens(images)
        stack_key = embed_key = None
        if train and key is not None:
            stack_key = jax.random.fold_in(key, KEY_STACK)
            embed_key = jax.random.fold_in(key, KEY_EMBED)
        x = dropout(x, c.dropout, embed_key)
        x, stats = self.stack(x, key=stack_key, train=train, inference_gamma=inference_gamma)
        x = self.norm(x)
        pooled = x[:, 0] if c.pool == "cls" else jnp.mean(x, axis=1)
        logits = self.head(pooled).astype(jnp.float32)
        return logits, stats_to_aux(stats)
