"""RevViT: the two-stream reversible Vision Transformer of Mangalam et al. (CVPR 2022),
the baseline of the paper's Table 1 beside ViT and BDIA-ViT.

Architecture, as in the authors' code (SlowFast's reversible ViT/MViT, minREV):
non-overlapping patches → Linear patch embedding → [class token] + learned position
embeddings → dropout → the embedding is *duplicated* into two streams X1 = X2 (each of the
full width) → K reversible blocks

    Y1 = X1 + F(X2),   F = LayerNorm → attention  (→ residual dropout)
    Y2 = X2 + G(Y1),   G = LayerNorm → MLP        (→ residual dropout)

→ the two streams concatenated on the feature axis [batch, tokens, 2·width] → class token or
mean over tokens → LayerNorm(2·width) → Linear head. Each block has one attention and one MLP
with the parameters of an ordinary ViT block; only the final LayerNorm and the head are
twice as wide. The authors' model has no class token (``pool="mean"``, the default here);
``pool="cls"`` prepends one to both streams and reads it after the fusion.

Gradient (``backprop``, the method objects of ``bdia_jax.methods``): ``Reversible`` rebuilds
each block's inputs from its outputs in the backward pass (``bdia_jax.revnet``), keeping only
the final two streams; ``Autodiff`` differentiates the same two-stream forward with stored
activations (the oracle); ``Remat`` recomputes each block. The
reversal is exact in real arithmetic but **not in floating point**: its error is measured by
the model's ``ReversalProbe`` (``model.stack.reversal_probe``), whose gradient is
max |rebuilt - forward| of the stack's input streams, read by a trainer like the BDIA probe.

Keys: as in ``ViT``, ``fold_in(key, 0)`` is the stack key (per-block dropout keys, replayed
by the reversible backward pass) and ``fold_in(key, 1)`` the embedding dropout key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from bdia_jax import revnet
from bdia_jax.methods import Autodiff, Backprop, Reversible, parse_method
from bdia_jax.models.layers import (
    MLP,
    BlockSettings,
    LayerNorm,
    MultiHeadAttention,
    ReversalProbe,
    check_ints,
    dropout,
    mlp_cotangent,
    split_key,
)
from bdia_jax.models.vit import VIT_VARIANTS, PatchTokens, check_image_fields

KEY_STACK, KEY_EMBED = 0, 1  # fold_in indices of the model key (see module docstring)


@dataclasses.dataclass(frozen=True)
class RevViTConfig(BlockSettings):
    """RevViT settings: the shared block fields of ``BlockSettings`` (width: of EACH stream)
    and the image fields of ``ViTConfig``, with the defaults of the paper's CIFAR-10 size,
    but mean pooling by default (the authors' RevViT has no class token). ``lora`` is not
    supported (None)."""

    image_size: int = 32  # input height = width, pixels
    patch_size: int = 4  # square patches; image_size must be a multiple
    num_classes: int = 10  # classifier outputs
    width: int = 512  # width of EACH stream (the embedding dimension)
    depth: int = 6  # number of reversible blocks K (one attention + one MLP each)
    mlp_dim: int = 512  # hidden size of each block's MLP
    dropout: float = 0.1  # embedding dropout and residual dropout on F(x), G(y)
    attention_dropout: float = 0.1  # dropout on attention probabilities
    pool: Literal["cls", "mean"] = "mean"  # class token, or mean over tokens
    channels: int = 3  # input channels (C in [batch, H, W, C])
    # Reversible(): rebuild states from the outputs (activation memory constant in depth;
    # inexact in floating point, measured by the probe), each sub-block's output from its
    # VJP ("shared", as the authors' code); Autodiff(): stored activations; Remat().
    backprop: Backprop = Reversible(recompute="shared")

    def __post_init__(self):
        super().__post_init__()
        check_image_fields(self)
        check_ints(self, ("depth",))
        if self.lora is not None:
            raise ValueError("RevViT has no LoRA option: set lora=None (LoRA trains ViT, "
                             "Seq2Seq and DecoderLM blocks).")
        revnet.check_backprop(self.backprop)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# The method keywords of revvit_config (``bdia_jax.parse_method``'s, with update=None: RevViT
# has its own update).
METHOD_KEYWORDS = ("backprop", "recompute", "reversal_probe")


def revvit_config(name: str, **overrides) -> RevViTConfig:
    """A RevViT of the size of the named ViT variant (``VIT_VARIANTS``: "tiny", "small",
    "paper"), with field overrides; the method as an object (backprop=Reversible(...)) or as
    ``parse_method``'s keywords (backprop="reversible", recompute="shared")."""
    if name not in VIT_VARIANTS:
        raise ValueError(
            f"unknown RevViT variant {name!r}; choose one of {sorted(VIT_VARIANTS)}."
        )
    fields = {f.name for f in dataclasses.fields(RevViTConfig)} | set(METHOD_KEYWORDS)
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(
            f"unknown RevViTConfig fields {sorted(unknown)}; valid: {sorted(fields)}."
        )
    method = {k: overrides[k] for k in METHOD_KEYWORDS if k in overrides}
    rest = {k: v for k, v in overrides.items() if k not in method}
    if method:
        rest.update(parse_method(update=None, **method))
    return RevViTConfig(**{**VIT_VARIANTS[name], **rest})


class RevBlock(nnx.Module):
    """One reversible block's sub-blocks F (attention) and G (MLP), pre-LN.

    The same parameters (and names: ln1, attn, ln2, mlp) as an ``EncoderBlock``. Dropout
    only when a key is given, drawn from it (the reversible backward pass replays the key).
    """

    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, dropout: float = 0.0,
                 attention_dropout: float = 0.0, compute_dtype="float32",
                 attention: str = "xla", chunk_size: int = 128,
                 mlp_chunk_size: int | None = None, rngs: nnx.Rngs):
        self.dropout = dropout
        self.ln1 = LayerNorm(width, rngs=rngs)
        self.attn = MultiHeadAttention(width, num_heads, attention_dropout=attention_dropout,
                                       compute_dtype=compute_dtype, attention=attention,
                                       chunk_size=chunk_size, rngs=rngs)
        self.ln2 = LayerNorm(width, rngs=rngs)
        self.mlp = MLP(width, mlp_dim, compute_dtype=compute_dtype, chunk_size=mlp_chunk_size,
                       rngs=rngs)

    def attention_branch(self, x: jax.Array, key=None, cotangent=None) -> jax.Array:
        """F(x) = Dropout(Attn(LN1(x))): [batch, len, width] float32 → same. ``cotangent``
        (recompute="fused") is not used: attention has no blocked forward to fuse."""
        del cotangent
        k_attn, k_drop = split_key(key, 2)
        a = self.attn(self.ln1(x), key=k_attn)
        return dropout(a, self.dropout, k_drop).astype(x.dtype)

    def mlp_branch(self, y: jax.Array, key=None, cotangent=None) -> jax.Array:
        """G(y) = Dropout(MLP(LN2(y))): [batch, len, width] float32 → same. ``cotangent``:
        None, or dL/dG known in advance (recompute="fused", ``layers.mlp_cotangent``)."""
        m = self.mlp(self.ln2(y), cotangent=mlp_cotangent(cotangent, self.dropout, key))
        return dropout(m, self.dropout, key).astype(y.dtype)


class TwoStreamStack(nnx.Module):
    """K reversible blocks with depth-stacked parameters (built under ``nnx.vmap``) and the
    ``ReversalProbe`` that reports the floating-point error of their reversal.

    Args:
      make_block: ``make_block(rngs) -> module`` with ``attention_branch(x, key)`` (F) and
        ``mlp_branch(y, key)`` (G), holding only ``nnx.Param`` state.
      depth: K >= 1.
      backprop: ``Reversible(...)`` | ``Autodiff()`` | ``Remat()`` (see
        ``bdia_jax.revnet.revnet_stack``), the training pass's method.
      rngs: parameter initialisation.
    """

    def __init__(self, make_block: Callable[[nnx.Rngs], nnx.Module], depth: int, *,
                 backprop: Backprop = Reversible(recompute="shared"), rngs: nnx.Rngs):
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}.")
        self.depth = depth
        self.backprop = backprop

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def build(block_rngs):
            return make_block(block_rngs)

        self.blocks = build(rngs)
        self.sub_block_fns()  # validate now: only Params in a block
        self.reversal_probe = ReversalProbe(jnp.zeros((), jnp.float32))

    def sub_block_fns(self):
        """``(f_fn, g_fn, params)``: the pure sub-blocks of ``bdia_jax.revnet`` and the
        depth-stacked parameter State (every leaf [depth, ...])."""
        graphdef, params, rest = nnx.split(self.blocks, nnx.Param, ...)
        if jax.tree_util.tree_leaves(rest):
            raise ValueError(
                "a reversible block may hold only nnx.Param state (no RNG streams or other "
                f"variables); draw dropout from the `key` argument instead. Found: {rest}"
            )

        def f_fn(params_k, x, key, **kw):
            return nnx.merge(graphdef, params_k).attention_branch(x, key, **kw)

        def g_fn(params_k, y, key, **kw):
            return nnx.merge(graphdef, params_k).mlp_branch(y, key, **kw)

        return f_fn, g_fn, params

    def __call__(self, x1: jax.Array, x2: jax.Array, *, key: jax.Array | None = None,
                 train: bool = False) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
        """Run the K blocks on [batch, len, width] float32 streams.

        ``key`` (train=True only; inference never drops out) gives the per-block dropout
        keys. At train=False the gradient, if one is taken, is plain autodiff.

        Returns ((y1, y2), max_abs float32 scalar: largest |stream value|).
        """
        f_fn, g_fn, params = self.sub_block_fns()
        backprop = self.backprop if train else Autodiff()
        return revnet.revnet_stack(
            f_fn, g_fn, params, x1, x2, key=key if train else None, backprop=backprop,
            reversal_probe=self.reversal_probe[...] if backprop.reversal_probe else None,
        )


class RevViT(PatchTokens, nnx.Module):
    """Reversible Vision Transformer; see the module docstring.

    Call: ``logits, aux = model(images, *, key=None, train=False)`` (as ``ViT``).
    """

    def __init__(self, config: RevViTConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        self._init_tokens(rngs)

        def make_block(block_rngs):
            return RevBlock(c.width, c.num_heads, c.mlp_dim, dropout=c.dropout,
                            attention_dropout=c.attention_dropout,
                            compute_dtype=c.compute_dtype, attention=c.attention,
                            chunk_size=c.chunk_size, mlp_chunk_size=c.mlp_chunk_size,
                            rngs=block_rngs)

        self.stack = TwoStreamStack(make_block, c.depth, backprop=c.backprop, rngs=rngs)
        # The fused streams are 2·width wide (concatenation, as the authors' default).
        self.norm = LayerNorm(2 * c.width, rngs=rngs)
        self.head = nnx.Linear(2 * c.width, c.num_classes, rngs=rngs)

    def embed(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Tokens [batch, num_tokens, width] float32: patches + [cls] + positions, dropout
        drawn from ``key`` (None: no dropout). Both streams start from this."""
        return dropout(self._tokens(images), self.config.dropout, key)

    def __call__(self, images: jax.Array, *, key: jax.Array | None = None,
                 train: bool = False) -> tuple[jax.Array, dict]:
        """Classify images.

        Args:
          images: [batch, H, W, C] float32, already normalized.
          key: PRNG key; needed when train=True and dropout > 0.
          train: training mode (dropout; the ``backprop`` gradient) or inference.

        Returns:
          logits [batch, num_classes] float32; aux: {"max_abs" float32 (largest |stream
          value|), "overflow" bool (always False: no fixed-point grid), "nonfinite" bool}
          scalars, the keys of ``ViT``'s aux. The reversal error is not in aux (it exists
          only in the backward pass): it is the gradient of ``ReversalProbe``.
        """
        c = self.config
        if train and key is None and (c.dropout or c.attention_dropout):
            raise ValueError(
                "train=True needs a PRNG `key` (dropout masks): pass key=jax.random.key(step)."
            )
        stack_key = embed_key = None
        if train and key is not None:
            stack_key = jax.random.fold_in(key, KEY_STACK)
            embed_key = jax.random.fold_in(key, KEY_EMBED)
        x = self.embed(images, embed_key)
        (y1, y2), max_abs = self.stack(x, x, key=stack_key, train=train)
        fused = jnp.concatenate([y1, y2], axis=-1)
        pooled = fused[:, 0] if c.pool == "cls" else jnp.mean(fused, axis=1)
        logits = self.head(self.norm(pooled)).astype(jnp.float32)
        max_abs = max_abs.astype(jnp.float32)
        aux = {"max_abs": max_abs, "overflow": jnp.zeros((), jnp.bool_),
               "nonfinite": ~jnp.isfinite(max_abs)}
        return logits, aux
