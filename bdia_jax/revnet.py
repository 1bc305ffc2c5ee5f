"""Two-stream reversible residual stack (the RevNet coupling used by RevViT).

Block k maps two streams (X1, X2) to (Y1, Y2) with two sub-blocks F, G:

    Y1 = X1 + F(X2)          (in RevViT: F = LayerNorm -> attention)
    Y2 = X2 + G(Y1)          (in RevViT: G = LayerNorm -> MLP)

and its inverse recomputes the inputs from the outputs:

    X2 = Y2 - G(Y1)
    X1 = Y1 - F(X2)

The gradient method is one of BDIA's objects (``bdia_jax.methods``): ``Reversible`` keeps only
the final two streams, and its backward pass rebuilds each block's inputs from its outputs,
block by block in reverse, and takes the block's VJP there (Mangalam et al., "Reversible
Vision Transformers", CVPR 2022); its ``recompute`` says whether a sub-block's output comes
from the VJP ("shared", RevViT's default) or from a second call ("separate"). ``Autodiff``
differentiates the stored activations (the oracle), ``Remat`` recomputes each block.

**The reversal is exact in real arithmetic, not in floating point.** ``(a + b) - b`` is not
``a`` after rounding, so every rebuilt state carries a rounding error, and the error of one
block feeds the next (F and G are evaluated at rebuilt, slightly wrong inputs). The
gradients therefore differ slightly from autodiff through the same forward pass. This is
the contrast with BDIA (``bdia_jax.apply_stack``), whose fixed-point update rebuilds states
bit for bit. The size of the error is measured, not assumed: with
``Reversible(reversal_probe=True)`` pass ``reversal_probe`` and its gradient is max |rebuilt input - forward input| over both streams (the BDIA probe pattern).

The sub-block contract: ``f_fn(params_k, x, key) -> F(x)`` and ``g_fn(params_k, y, key) ->
G(y)`` are pure, return their input's shape and dtype, and apply dropout only when ``key``
is not None (drawn from that key, so the backward pass redraws the same masks). Both get
the whole block's ``params_k`` (each uses its own part). Per-block keys come from
``block_keys``; block k gives F and G ``jax.random.split(keys[k])``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bdia_jax.methods import Backprop, Reversible

SubBlockFn = Callable[[Any, jax.Array, Any], jax.Array]


# --------------------------------------------------------------------------- validation


def check_backprop(backprop) -> None:
    """One-line error for a value that is not a gradient method object (a field's type,
    checked where a two-stream stack's settings are defined)."""
    if not isinstance(backprop, Backprop):
        raise ValueError(
            f"backprop must be bdia_jax.Autodiff(), Remat() or Reversible(...), got "
            f"{backprop!r}; bdia_jax.parse_method(update=None, backprop='reversible', "
            "recompute='shared') builds one from strings."
        )


def _depth_of(params) -> int:
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError(
            "params has no array leaves; the reversible stack needs depth-stacked parameters "
            "(every leaf with a leading [depth] axis)."
        )
    depths = {int(np.shape(leaf)[0]) if np.ndim(leaf) else -1 for leaf in leaves}
    if len(depths) != 1 or -1 in depths or min(depths) < 1:
        raise ValueError(
            f"every params leaf must have the same leading depth axis >= 1, got leading sizes "
            f"{sorted(depths)}; stack per-block parameters with jnp.stack or nnx.vmap."
        )
    return depths.pop()


def _check_streams(f_fn, g_fn, params, x1, x2, keys) -> None:
    if x1.shape != x2.shape or x1.dtype != x2.dtype:
        raise ValueError(
            f"the two streams must have one shape and dtype, got {x1.shape} {x1.dtype} and "
            f"{x2.shape} {x2.dtype}; RevViT starts both from the same embedding."
        )
    p0 = jax.tree_util.tree_map(lambda a: a[0], params)
    kf, kg = _sub_keys(None if keys is None else keys[0])
    for name, fn, key in (("f_fn", f_fn, kf), ("g_fn", g_fn, kg)):
        out = jax.eval_shape(fn, p0, x1, key)
        if not isinstance(out, jax.ShapeDtypeStruct) or (out.shape, out.dtype) != (
                x1.shape, x1.dtype):
            got = f"{out.shape} {out.dtype}" if isinstance(out, jax.ShapeDtypeStruct) else type(
                out).__name__
            raise ValueError(
                f"{name} must return one array of the stream's shape and dtype {x1.shape} "
                f"{x1.dtype}, got {got}; cast its output with .astype(x.dtype)."
            )


# --------------------------------------------------------------------------- pieces


def block_keys(key: jax.Array | None, depth: int):
    """Per-block keys [depth] from one stack key (None: no dropout anywhere)."""
    return None if key is None else jax.random.split(key, depth)


def _sub_keys(key_k):
    """(F key, G key) of one block."""
    if key_k is None:
        return None, None
    kf, kg = jax.random.split(key_k)
    return kf, kg


def _max_abs(*arrays):
    # stop_gradient: statistics never carry gradients.
    return jax.lax.stop_gradient(
        functools.reduce(jnp.maximum, [jnp.max(jnp.abs(a)) for a in arrays])
    )


def _block_forward(f_fn, g_fn, params_k, x1, x2, key_k):
    kf, kg = _sub_keys(key_k)
    y1 = x1 + f_fn(params_k, x2, kf)
    y2 = x2 + g_fn(params_k, y1, kg)
    return y1, y2


def _block_inverse(f_fn, g_fn, params_k, y1, y2, key_k):
    kf, kg = _sub_keys(key_k)
    x2 = y2 - g_fn(params_k, y1, kg)
    x1 = y1 - f_fn(params_k, x2, kf)
    return x1, x2


def _forward_scan(call, params, x1, x2, keys):
    """All blocks forward, block k as ``call(params_k, x1, x2, key_k)`` (``_block_forward``
    as the gradient method wraps it); returns (y1, y2, max_abs over all streams)."""

    def body(carry, xs):
        a, b, max_abs = carry
        params_k, key_k = xs
        a, b = call(params_k, a, b, key_k)
        return (a, b, jnp.maximum(max_abs, _max_abs(a, b))), None

    (y1, y2, max_abs), _ = jax.lax.scan(body, (x1, x2, _max_abs(x1, x2)), (params, keys))
    return y1, y2, max_abs


# --------------------------------------------------------------------------- forward / inverse


def revnet_forward(f_fn: SubBlockFn, g_fn: SubBlockFn, params, x1: jax.Array, x2: jax.Array,
                   keys=None) -> tuple[jax.Array, jax.Array]:
    """Run the K blocks forward: (X1, X2) -> (Y1, Y2).

    Args:
      f_fn, g_fn: the sub-blocks (see the module docstring).
      params: pytree, every leaf stacked on a leading [depth] axis.
      x1, x2: [batch, ...] float streams of one shape and dtype.
      keys: per-block keys [depth] (``block_keys``) or None (no dropout).

    Returns:
      (y1, y2), each of x1's shape and dtype. Differentiable by plain autodiff (stored
      activations): the oracle for the reversible gradient.
    """
    _depth_of(params)
    _check_streams(f_fn, g_fn, params, x1, x2, keys)
    y1, y2, _ = _forward_scan(functools.partial(_block_forward, f_fn, g_fn), params, x1, x2,
                              keys)
    return y1, y2


def revnet_inverse(f_fn: SubBlockFn, g_fn: SubBlockFn, params, y1: jax.Array, y2: jax.Array,
                   keys=None) -> tuple[jax.Array, jax.Array]:
    """Inverse of ``revnet_forward``: (Y1, Y2) -> (X1, X2), blocks in reverse order.

    Exact in real arithmetic only: in floating point the result differs from the forward
    input by rounding errors that grow with depth (see the module docstring). Same
    arguments as ``revnet_forward`` (the same ``keys`` replay the same dropout masks).
    """
    _depth_of(params)
    _check_streams(f_fn, g_fn, params, y1, y2, keys)

    def body(carry, xs):
        params_k, key_k = xs
        return _block_inverse(f_fn, g_fn, params_k, *carry, key_k), None

    (x1, x2), _ = jax.lax.scan(body, (y1, y2), (params, keys), reverse=True)
    return x1, x2


# --------------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _reversible(f_fn, g_fn, method: Reversible, params, x1, x2, keys, reversal_probe):
    return _forward_scan(functools.partial(_block_forward, f_fn, g_fn), params, x1, x2, keys)


def _reversible_fwd(f_fn, g_fn, method: Reversible, params, x1, x2, keys, reversal_probe):
    y1, y2, max_abs = _forward_scan(functools.partial(_block_forward, f_fn, g_fn), params, x1,
                                    x2, keys)
    # The probe keeps the two inputs (constant in depth) to compare with their rebuilds.
    probe_inputs = (x1, x2) if method.reversal_probe else None
    return (y1, y2, max_abs), (params, keys, y1, y2, probe_inputs, reversal_probe)


def _reversible_bwd(f_fn, g_fn, method: Reversible, residuals, cotangents):
    params, keys, y1, y2, probe_inputs, reversal_probe = residuals
    g_y1, g_y2, _ = cotangents  # max_abs carries no gradient

    def body(carry, xs):
        # carry: the block's outputs (Y1, Y2) and their complete cotangents.
        y1, y2, g_y1, g_y2 = carry
        params_k, key_k = xs
        kf, kg = _sub_keys(key_k)
        # Y2 = X2 + G(Y1): rebuild X2 and pull dL/dY2 back through G.
        g_call = functools.partial(_sub_block, g_fn, kg)
        g_out, g_pullback = method.output_and_vjp(g_call, (params_k, y1), fenced=g_call,
                                                  cotangent=g_y2)
        x2 = y2 - g_out
        g_params_g, g_y1_via_g = g_pullback(g_y2)
        g_x1 = g_y1 + g_y1_via_g  # dL/dY1 in full = dL/dX1 (Y1 = X1 + F(X2))
        # Y1 = X1 + F(X2): rebuild X1 and pull dL/dY1 back through F.
        f_call = functools.partial(_sub_block, f_fn, kf)
        f_out, f_pullback = method.output_and_vjp(f_call, (params_k, x2), fenced=f_call,
                                                  cotangent=g_x1)
        x1 = y1 - f_out
        g_params_f, g_x2_via_f = f_pullback(g_x1)
        g_x2 = g_y2 + g_x2_via_f
        g_params_k = jax.tree_util.tree_map(jnp.add, g_params_f, g_params_g)
        return (x1, x2, g_x1, g_x2), g_params_k

    (x1, x2, g_x1, g_x2), g_params = jax.lax.scan(
        body, (y1, y2, g_y1, g_y2), (params, keys), reverse=True
    )
    if method.reversal_probe:
        ref1, ref2 = probe_inputs
        error = jnp.maximum(jnp.max(jnp.abs(x1 - ref1)), jnp.max(jnp.abs(x2 - ref2)))
        g_probe = error.astype(reversal_probe.dtype)
    else:
        g_probe = None
    return g_params, g_x1, g_x2, None, g_probe


_reversible.defvjp(_reversible_fwd, _reversible_bwd)


def _sub_block(fn, key, params_k, x, **kw):
    return fn(params_k, x, key, **kw)  # kw: cotangent= of recompute="fused"


class _TwoStreamPass(NamedTuple):
    """One pass of the two-stream stack, as the gradient method runs it
    (``bdia_jax.methods.StackPass``)."""

    f_fn: SubBlockFn
    g_fn: SubBlockFn
    params: Any
    x1: jax.Array
    x2: jax.Array
    keys: jax.Array | None
    reversal_probe: jax.Array | None

    def stored(self, wrap_block):
        call = wrap_block(functools.partial(_block_forward, self.f_fn, self.g_fn))
        return _forward_scan(call, self.params, self.x1, self.x2, self.keys)

    def reversible(self, method: Reversible):
        return _reversible(self.f_fn, self.g_fn, method, self.params, self.x1, self.x2,
                           self.keys, self.reversal_probe)


# --------------------------------------------------------------------------- public API


def revnet_stack(
    f_fn: SubBlockFn,
    g_fn: SubBlockFn,
    params,
    x1: jax.Array,
    x2: jax.Array,
    *,
    backprop: Backprop,
    key: jax.Array | None = None,
    reversal_probe: jax.Array | None = None,
) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """K two-stream reversible blocks, differentiated by ``backprop``.

    Args:
      f_fn, g_fn: the sub-blocks (see the module docstring).
      params: pytree, every leaf stacked on a leading [depth] axis.
      x1, x2: [batch, ...] float32 (or float64) streams of one shape and dtype.
      backprop: ``Reversible(recompute, reversal_probe)`` (custom VJP: only (Y1, Y2) are
        kept; the backward pass rebuilds each block's inputs from its outputs),
        ``Autodiff()`` (stored activations; the oracle) or ``Remat()`` (per block
        ``jax.checkpoint``).
      key: PRNG key for the per-block dropout keys (``block_keys``); None: no dropout.
      reversal_probe: float scalar (use 0.0), required exactly with
        ``Reversible(reversal_probe=True)``: its gradient is the largest |rebuilt - forward|
        over the two input streams, the floating-point error of the reversal (> 0 in
        general). Costs two stored states, constant in depth.

    Returns:
      ((y1, y2), max_abs): the output streams (x1's shape and dtype) and the largest |value|
      of any stream state (a float scalar without gradient).
    """
    check_backprop(backprop)
    if backprop.reversal_probe and reversal_probe is None:
        raise ValueError(
            "backprop=Reversible(reversal_probe=True) reports the reversal error as the "
            "gradient of `reversal_probe`: pass reversal_probe=jnp.zeros(()), or use "
            "Reversible(reversal_probe=False)."
        )
    if reversal_probe is not None and not backprop.reversal_probe:
        raise ValueError(
            f"reversal_probe is read only with backprop=Reversible(reversal_probe=True), got "
            f"backprop={backprop!r}: nothing is rebuilt here, so drop reversal_probe."
        )
    depth = _depth_of(params)
    x1, x2 = jnp.asarray(x1), jnp.asarray(x2)
    if not jnp.issubdtype(x1.dtype, jnp.floating):
        raise ValueError(f"streams must be float arrays, got {x1.dtype}.")
    keys = block_keys(key, depth)
    _check_streams(f_fn, g_fn, params, x1, x2, keys)
    probe = None if reversal_probe is None else jnp.asarray(reversal_probe)
    y1, y2, max_abs = backprop.run(_TwoStreamPass(f_fn, g_fn, params, x1, x2, keys, probe))
    return (y1, y2), max_abs
