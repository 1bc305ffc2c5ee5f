"""``ResidualStack``: K identical residual blocks with depth-stacked parameters.

The module owns the parameters (built with ``nnx.split_rngs`` + ``nnx.vmap``, so every
parameter has a leading [depth] axis) and hands them to the pure-JAX engine
``bdia_jax.apply_stack`` with its method objects, unchanged:

  update=Standard()            x_{k+1} = x_k + h_k(x_k), unquantized (Autodiff or Remat)
  update=BDIA(...), train=True  the BDIA update, gradient by ``backprop``
  update=BDIA(...), train=False γ = 0 (a standard transformer), on the grid iff
                                ``quantize_at_inference``; an optional ``inference_gamma``
                                for the paper's inference-γ sweep

A block is any Flax NNX module whose state is only ``nnx.Param`` and whose call is
``block(x, context, key) -> h`` (h: x's shape and dtype; dropout only when key is not
None, drawn from that key). Pass a factory ``make_block(rngs) -> block`` to wrap your own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from bdia_jax import fixed_point
from bdia_jax.engine import StackStats, apply_stack
from bdia_jax.methods import (
    BDIA,
    METHOD_KEYWORDS,
    Backprop,
    Update,
    default_backprop,
    parse_method,
)
from bdia_jax.models.layers import ReversalProbe


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


def named_config(config_cls, variants: dict[str, dict], name: str, overrides: dict):
    """``config_cls(**variants[name], **overrides)`` for the models' ``*_config(name, ...)``.

    The method may be given as objects (update=BDIA(...), backprop=Reversible(...)) or as
    the keywords of ``bdia_jax.parse_method`` (update="standard", backprop="remat",
    gamma=..., frac_bits=..., recompute=...), which it turns into objects.
    """
    kind = config_cls.__name__.removesuffix("Config")
    if name not in variants:
        raise ValueError(f"unknown {kind} variant {name!r}; choose one of {sorted(variants)}.")
    fields = {f.name for f in dataclasses.fields(config_cls)} | set(METHOD_KEYWORDS)
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(
            f"unknown {config_cls.__name__} fields {sorted(unknown)}; valid: {sorted(fields)}."
        )
    method = {k: overrides[k] for k in METHOD_KEYWORDS if k in overrides}
    rest = {k: v for k, v in overrides.items() if k not in method}
    return config_cls(**{**variants[name], **rest, **(parse_method(**method) if method else {})})


class ResidualStack(nnx.Module):
    """K residual blocks x_{k+1} = x_k + h_k(x_k) (standard) or the BDIA update.

    Args:
      make_block: ``make_block(rngs) -> nnx.Module``; called once under ``nnx.vmap`` to
        create all K blocks with a leading [depth] axis on every parameter.
      depth: K ≥ 1.
      update: ``Standard()`` | ``BDIA(gamma, frac_bits, quantize_at_inference)``.
      backprop: ``Autodiff()`` | ``Remat()`` | ``Reversible(recompute, reversal_probe)``,
        or None for ``bdia_jax.methods.default_backprop(update)``. Passed on unchanged: the
        pair is checked where it is defined, by a model config (``StackMethod``) or, for a
        stack built directly, by ``apply_stack`` when it first runs.
      rngs: parameter initialisation.
    """

    def __init__(self, make_block: Callable[[nnx.Rngs], nnx.Module], depth: int, *,
                 update: Update = BDIA(), backprop: Backprop | None = None, rngs: nnx.Rngs):
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}.")
        self.depth = depth
        self.update = update
        self.backprop = default_backprop(update) if backprop is None else backprop

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
        """Pure ``block_fn(params_k, x, context, key_k, **kw)`` closing over the static
        graphdef (kw: ``cotangent=`` of recompute="fused")."""

        def block_fn(params_k, x, context, key_k, **kw):
            return nnx.merge(graphdef, params_k)(x, context, key_k, **kw)

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
          train: training update (True) or inference (False). With Reversible() an
            inference pass runs but is not differentiable (see ``bdia_jax.apply_stack``).
          inference_gamma: update=BDIA(...), train=False only: a float or an array
            broadcastable to [depth-1, batch] for the inference-γ sweep (None: γ = 0).

        Returns:
          (x_K [batch, ...] float32, StackStats).
        """
        graphdef, params = self._block_graph()
        if inference_gamma is not None and (train or not self.update.has_gamma):
            raise ValueError(
                "inference_gamma applies only to update=BDIA(...) at train=False; drop it or "
                "switch the model to update=BDIA()."
            )
        if train and self.update.has_gamma and key is None:
            raise ValueError(
                "update=BDIA(...) with train=True needs a PRNG `key` (it draws the random "
                "γ signs and the dropout masks): pass key=jax.random.key(step)."
            )
        probe = None
        if train and self.backprop.reversal_probe:
            probe = self.reversal_probe[...]
        return apply_stack(
            self._block_fn(graphdef), params, x, update=self.update, backprop=self.backprop,
            key=key if train else None, gammas=inference_gamma, context=context, train=train,
            reversal_probe=probe,
        )

    # ------------------------------------------------------------------ cached decoding
    @property
    def quantized_inference(self) -> bool:
        """Whether inference keeps the stream on the fixed-point grid."""
        return self.update.inference_frac_bits is not None

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
        frac_bits = self.update.inference_frac_bits
        if frac_bits is not None:
            x = fixed_point.quantize(x, frac_bits)

        def body(x_k, layer):
            params_k, cache_k = layer
            h, cache_k = nnx.merge(graphdef, params_k).decode(x_k, context, cache_k, pos)
            h = h if frac_bits is None else fixed_point.quantize(h, frac_bits)
            return x_k + h, cache_k

        return jax.lax.scan(body, x, (params, cache))
