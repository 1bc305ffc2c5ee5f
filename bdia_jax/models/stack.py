"""``ResidualStack``: K identical residual blocks with depth-stacked parameters.

The module owns the parameters (built with ``nnx.split_rngs`` + ``nnx.vmap``, so every
parameter has a leading [depth] axis) and hands them to the pure-JAX engine:

  update="standard"            → ``bdia_jax.standard_stack`` (x_{k+1} = x_k + h_k(x_k),
                                   unquantized; gradient by autodiff, or per-block remat)
  update="bdia", train=True    → ``bdia_jax.bdia_stack`` (BDIA update; gradient by
                                   ``backprop`` = "reversible" | "autodiff" | "remat")
  update="bdia", train=False   → ``bdia_stack(train=False)``: γ = 0 (a standard transformer),
                                   quantized iff ``quantize_at_inference``; an optional
                                   ``inference_gamma`` for the paper's inference-γ sweep.

A block is any Flax NNX module whose state is only ``nnx.Param`` and whose call is
``block(x, context, key) -> h`` (h: x's shape and dtype; dropout only when key is not
None, drawn from that key). Pass a factory ``make_block(rngs) -> block`` to wrap your own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from bdia_jax import fixed_point
from bdia_jax.models.layers import ReversalProbe
from bdia_jax.stack import (
    BACKPROP_METHODS,
    RECOMPUTE_MODES,
    StackStats,
    bdia_stack,
    standard_stack,
)

Update = Literal["standard", "bdia"]
UPDATES = ("standard", "bdia")


def check_update_settings(update, backprop, gamma, frac_bits, recompute="separate") -> None:
    """Fail early, with the fix, on a bad update/backprop/recompute combination."""
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(
            f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}: 'shared' (the "
            "models' blocks are built for it) or 'separate' (exact for any block)."
        )
    if update not in UPDATES:
        raise ValueError(f"update must be one of {UPDATES}, got {update!r}.")
    if backprop not in BACKPROP_METHODS:
        raise ValueError(f"backprop must be one of {BACKPROP_METHODS}, got {backprop!r}.")
    if update == "bdia" and backprop == "reversible" and frac_bits is None:
        raise ValueError(
            "update='bdia' with backprop='reversible' needs frac_bits (e.g. 9): exact "
            "reversal works on the fixed-point grid; use backprop='autodiff' for the "
            "unquantized ablation."
        )
    if update == "bdia" and not isinstance(gamma, (int, float)):
        raise ValueError(f"gamma must be a Python float such as 0.5, got {gamma!r}.")


def stats_to_aux(*stats: StackStats) -> dict[str, jax.Array]:
    """Merge the StackStats of one or more stacks into the models' aux dict of scalars:
    {"max_abs": float32 (max over stacks), "overflow": bool (any), "nonfinite": bool (any)}."""
    max_abs = stats[0].max_abs.astype(jnp.float32)
    overflow, nonfinite = stats[0].overflow, stats[0].nonfinite
    for s in stats[1:]:
        max_abs = jnp.maximum(max_abs, s.max_abs.astype(jnp.float32))
        overflow = jnp.logical_or(overflow, s.overflow)
        nonfinite = jnp.logical_or(nonfinite, s.nonfinite)
    return {"max_abs": max_abs, "overflow": overflow, "nonfinite": nonfinite}


class ResidualStack(nnx.Module):
    """K residual blocks x_{k+1} = x_k + h_k(x_k) (standard) or the BDIA update.

    Args:
      make_block: ``make_block(rngs) -> nnx.Module``; called once under ``nnx.vmap`` to
        create all K blocks with a leading [depth] axis on every parameter.
      depth: K ≥ 1.
      update: "standard" (baseline) | "bdia".
      backprop: "reversible" | "autodiff" | "remat". With update="standard" the gradient
        is autodiff through stored activations ("reversible" means the same there: the
        standard update has no inverse), or per-block remat with "remat".
      gamma: |γ| of the BDIA training update (a power of two: 0.5, 0.25, …).
      frac_bits: l in δ = 2**-l of the fixed-point grid (None: unquantized; not with
        "reversible").
      quantize_at_inference: for update="bdia" at train=False, keep the stream on the grid
        (x_0 = Q(x), x_{k+1} = x_k + Q(h)); False gives exactly the standard transformer.
      recompute: "separate" | "shared", how the reversible backward pass gets h_k(x_k)
        (see ``bdia_jax.bdia_stack``). "shared" is one block forward cheaper and needs
        blocks whose statistics come from ``bdia_jax.stable`` (the models' blocks do).
      rngs: parameter initialisation.
    """

    def __init__(self, make_block: Callable[[nnx.Rngs], nnx.Module], depth: int, *,
                 update: Update = "bdia", backprop: str = "reversible", gamma: float = 0.5,
                 frac_bits: int | None = 9, quantize_at_inference: bool = True,
                 recompute: str = "separate", rngs: nnx.Rngs):
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}.")
        check_update_settings(update, backprop, gamma, frac_bits, recompute)
        self.depth = depth
        self.recompute = recompute
        self.update = update
        self.backprop = backprop
        self.gamma = float(gamma)
        self.frac_bits = frac_bits
        self.quantize_at_inference = quantize_at_inference

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def build(block_rngs):
            return make_block(block_rngs)

        self.blocks = build(rngs)
        self._block_graph()  # validate now: only Params in a block
        self.reversal_probe = ReversalProbe(jnp.zeros((), jnp.float32))

    # ------------------------------------------------------------------ plumbing
    def _block_graph(self):
        """(graphdef, params) of the stacked blocks; every params leaf is [depth, ...]."""
        graphdef, params, rest = nnx.split(self.blocks, nnx.Param, ...)
        if jax.tree_util.tree_leaves(rest):
            raise ValueError(
                "a stacked block may hold only nnx.Param state (no RNG streams, batch stats "
                "or other variables); draw dropout from the `key` argument of "
                f"block(x, context, key) instead. Found: {rest}"
            )
        return graphdef, params

    @staticmethod
    def _block_fn(graphdef):
        """Pure ``block_fn(params_k, x, context, key_k)`` closing over the static graphdef."""

        def block_fn(params_k, x, context, key_k):
            return nnx.merge(graphdef, params_k)(x, context, key_k)

        return block_fn

    def params(self):
        """The depth-stacked parameter State (each leaf [depth, ...])."""
        return self._block_graph()[1]

    # ------------------------------------------------------------------ full pass
    def __call__(self, x: jax.Array, *, context: Any = None, key: jax.Array | None = None,
                 train: bool = False, inference_gamma=None) -> tuple[jax.Array, StackStats]:
        """Run the K blocks.

        Args:
          x: [batch, ...] float32 residual stream (e.g. [batch, seq, width]).
          context: pytree given to every block (e.g. encoder output and source mask).
          key: PRNG key for the BDIA γ draw and the per-block dropout keys (train=True
            only; ignored at inference, which never drops out).
          train: training update (True) or inference (False).
          inference_gamma: update="bdia", train=False only: a float or an array
            broadcastable to [depth-1, batch] for the inference-γ sweep (None: γ = 0).

        Returns:
          (x_K [batch, ...] float32, StackStats).
        """
        graphdef, params = self._block_graph()
        block_fn = self._block_fn(graphdef)
        if inference_gamma is not None and (train or self.update != "bdia"):
            raise ValueError(
                "inference_gamma applies only to update='bdia' at train=False; drop it or "
                "switch the model to update='bdia'."
            )
        if self.update == "standard":
            return standard_stack(
                block_fn, params, x, key=key if train else None, context=context,
                backprop="remat" if self.backprop == "remat" else "autodiff",
                return_stats=True,
            )
        if train:
            if key is None:
                raise ValueError(
                    "update='bdia' with train=True needs a PRNG `key` (it draws the random "
                    "γ signs and the dropout masks): pass key=jax.random.key(step)."
                )
            probe = self.reversal_probe[...] if self.backprop == "reversible" else None
            return bdia_stack(
                block_fn, params, x, key=key, context=context, gamma=self.gamma,
                frac_bits=self.frac_bits, backprop=self.backprop, train=True,
                reversal_probe=probe, return_stats=True, recompute=self.recompute,
            )
        return bdia_stack(
            block_fn, params, x, gammas=inference_gamma, context=context,
            frac_bits=self.frac_bits, backprop=self.backprop, train=False,
            quantize=self.quantize_at_inference, return_stats=True,
        )

    # ------------------------------------------------------------------ cached decoding
    @property
    def quantized_inference(self) -> bool:
        """Whether inference keeps the stream on the fixed-point grid."""
        return (self.update == "bdia" and self.quantize_at_inference
                and self.frac_bits is not None)

    def map_blocks(self, fn: Callable[[nnx.Module], Any]):
        """Apply ``fn(block)`` to every block; outputs stacked on a leading [depth] axis.

        Used to build per-layer caches (e.g. cross-attention keys of the encoder output).
        """
        graphdef, params = self._block_graph()
        return jax.lax.map(lambda p: fn(nnx.merge(graphdef, p)), params)

    def decode(self, x: jax.Array, cache, pos, *, context: Any = None):
        """Inference (γ = 0) through the blocks' ``decode(x, context, cache_k, pos)``.

        The same update as the full inference pass: x_0 = Q(x), x_{k+1} = x_k + Q(h_k)
        when ``quantized_inference``, else x_{k+1} = x_k + h_k (the standard transformer).

        Args:
          x: [batch, t, width] float32, the new tokens at positions pos … pos+t-1.
          cache: per-layer cache pytree stacked on a leading [depth] axis.
          pos: int (may be traced), the position of x's first token.
          context: given to every block's ``decode``.

        Returns:
          (x_K [batch, t, width], updated cache).
        """
        graphdef, params = self._block_graph()
        frac_bits = self.frac_bits if self.quantized_inference else None
        if frac_bits is not None:
            x = fixed_point.quantize(x, frac_bits)

        def body(x_k, layer):
            params_k, cache_k = layer
            h, cache_k = nnx.merge(graphdef, params_k).decode(x_k, context, cache_k, pos)
            h = h if frac_bits is None else fixed_point.quantize(h, frac_bits)
            return x_k + h, cache_k

        return jax.lax.scan(body, x, (params, cache))
