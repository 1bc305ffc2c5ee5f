"""Depth-stacked residual blocks: the BDIA stack, its exact inverse, and the baseline.

Public entry points:
  * ``bdia_stack``      – the BDIA recurrence; gradient by ``"reversible"`` (custom VJP that
                          rebuilds states bit for bit), ``"autodiff"`` (the oracle) or ``"remat"``.
  * ``standard_stack``  – the conventional transformer x_{k+1} = x_k + h_k(x_k).
  * ``bdia_encode`` / ``bdia_decode`` – the forward/inverse pair behind the custom VJP,
                          exposed for tests, debugging and verification.

The block contract: ``block_fn(params_k, x, context, key_k) -> h`` is a pure function;
h has x's shape and dtype. ``key_k`` is None when the stack got no key: a block should
apply dropout only when it receives a key.

Layout of the math (see docs/design.md): x_0 = Q(x); x_1 = x_0 + Q(h_0(x_0));
x_{k+1} = γ_k (x_{k-1} - s_{k-1} δ) + Q((1-γ_k) x_k + (1+γ_k) h_k(x_k)) for k ≥ 1.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bdia_jax import fixed_point
from bdia_jax.step import bdia_combine, bdia_uncombine, broadcast_gamma, euler_step

BlockFn = Callable[[Any, jax.Array, Any, Any], jax.Array]
Backprop = Literal["reversible", "autodiff", "remat"]
BACKPROP_METHODS = ("reversible", "autodiff", "remat")
Recompute = Literal["separate", "shared"]
RECOMPUTE_MODES = ("separate", "shared")


class StackStats(NamedTuple):
    """Range and health of the residual stream, from the forward pass.

    max_abs:   float scalar, largest |x_k| and |Q-term| over all blocks and elements.
    overflow:  bool scalar, max_abs reached the exact range of the fixed-point grid
               (``fixed_point.exact_range``): reversal is no longer guaranteed exact.
    nonfinite: bool scalar, a NaN or Inf reached the residual stream.
    """

    max_abs: jax.Array
    overflow: jax.Array
    nonfinite: jax.Array


class EncodedStack(NamedTuple):
    """What the reversible forward pass keeps: constant in depth apart from the side bits.

    x_last:      [batch, ...] x_K.
    x_before:    [batch, ...] x_{K-1}.
    side_bits:   [depth-1, batch, m, ceil(n/8)] uint8, n elements per sample.
    stats:       StackStats.
    """

    x_last: jax.Array
    x_before: jax.Array
    side_bits: jax.Array
    stats: StackStats


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static settings of one stack call (hashable: it is a custom_vjp nondiff arg)."""

    depth: int
    gamma: float  # |γ|, a power of two; 0.0 at inference
    side_bits: int  # m = -log2|γ|
    frac_bits: int | None  # None: no quantization
    verify: bool
    remat: bool
    exact_range: float
    # How the reversible backward pass gets h_k(x_k): "separate" (its own forward, then the
    # VJP) or "shared" (the VJP's primal output). See ``bdia_stack``.
    recompute: str = "separate"


# --------------------------------------------------------------------------- validation


def _depth_of(params) -> int:
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError(
            "params has no array leaves; bdia_stack needs depth-stacked parameters "
            "(every leaf with a leading [depth] axis)."
        )
    depths = {int(np.shape(leaf)[0]) if np.ndim(leaf) else -1 for leaf in leaves}
    if len(depths) != 1 or -1 in depths:
        raise ValueError(
            f"every params leaf must have the same leading depth axis, got leading sizes "
            f"{sorted(depths)}; stack per-block parameters with jnp.stack or nnx.vmap."
        )
    depth = depths.pop()
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got params with leading axis {depth}.")
    return depth


def _side_bits_of(gamma: float) -> int:
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool):
        raise ValueError(f"gamma must be a Python float such as 0.5 or 0.25, got {gamma!r}.")
    if gamma == 0:
        raise ValueError(
            "backprop='reversible' needs gamma != 0 (the update is not invertible at γ=0); "
            "use gamma=0.5 or 0.25, or backprop='autodiff'/'remat'."
        )
    m = -math.log2(abs(gamma))
    if not (0 < abs(gamma) < 1) or m != round(m) or round(m) > 8:
        raise ValueError(
            f"|gamma| must be a power of two 2**-m with 1 <= m <= 8 (e.g. 0.5 or 0.25), got "
            f"{gamma}; the inverse divides by γ and only powers of two divide exactly."
        )
    return int(round(m))


def _check_frac_bits(frac_bits, dtype) -> None:
    if frac_bits is None:
        return
    if not isinstance(frac_bits, (int, np.integer)) or isinstance(frac_bits, bool):
        raise ValueError(f"frac_bits must be an int (e.g. 9) or None, got {frac_bits!r}.")
    limit = fixed_point.MAX_FRAC_BITS.get(jnp.dtype(dtype))
    if limit is None:
        fixed_point.exact_range(dtype, 0)  # raises the dtype error
    if not 0 <= frac_bits <= limit:
        raise ValueError(
            f"frac_bits={frac_bits} is out of range for {jnp.dtype(dtype)}: use 0..{limit} "
            f"(exact range |x| < 2**{24 if jnp.dtype(dtype) == jnp.float32 else 53}"
            f" * 2**-frac_bits)."
        )


def _check_block_output(block_fn, params, x, context, keys) -> None:
    p0 = jax.tree_util.tree_map(lambda a: a[0], params)
    k0 = None if keys is None else keys[0]
    out = jax.eval_shape(block_fn, p0, x, context, k0)
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != x.shape or out.dtype != x.dtype:
        got = (
            f"{out.shape} {out.dtype}"
            if isinstance(out, jax.ShapeDtypeStruct)
            else type(out).__name__
        )
        raise ValueError(
            f"block_fn must return a single array of the input's shape and dtype "
            f"{x.shape} {x.dtype}, got {got}; cast the block's output back with "
            f".astype(x.dtype) if it computes in bfloat16."
        )


def _check_backprop(backprop) -> None:
    if backprop not in BACKPROP_METHODS:
        raise ValueError(f"backprop must be one of {BACKPROP_METHODS}, got {backprop!r}.")


def _check_recompute(recompute) -> None:
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(
            f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}: 'separate' is "
            "exact for any block; 'shared' saves one block forward per block in the backward "
            "pass when the block's statistics use bdia_jax.stable (see bdia_stack)."
        )


def draw_gammas(key: jax.Array, depth: int, batch: int, gamma: float, dtype=jnp.float32):
    """Draw γ_{k,b} ∈ {+γ, -γ} uniformly: [depth-1, batch] of dtype."""
    signs = jax.random.bernoulli(key, 0.5, (max(depth - 1, 0), batch))
    return jnp.where(signs, gamma, -gamma).astype(dtype)


def _keys_and_gammas(key, gammas, depth, batch, gamma, dtype, need_gammas):
    """Split the stack key into per-block keys and (if not given) the γ draw."""
    if key is None:
        block_keys = None
        if need_gammas and gammas is None:
            raise ValueError(
                "bdia_stack(train=True) needs `key` (to draw γ and block keys) or an explicit "
                "`gammas` array of shape [depth-1, batch]."
            )
    else:
        gamma_key, block_key = jax.random.split(key)
        block_keys = jax.random.split(block_key, depth)
        if need_gammas and gammas is None:
            gammas = draw_gammas(gamma_key, depth, batch, gamma, dtype)
    return block_keys, gammas


def _check_gammas(gammas, depth, batch, train):
    gammas = jnp.asarray(gammas)
    want = (depth - 1, batch)
    if train:
        if gammas.shape != want:
            raise ValueError(
                f"gammas must have shape [depth-1, batch] = {list(want)}, got "
                f"{list(gammas.shape)}."
            )
    else:
        try:
            np.broadcast_shapes(gammas.shape, want)
        except ValueError:
            raise ValueError(
                f"inference gammas must broadcast to [depth-1, batch] = {list(want)}, got "
                f"{list(gammas.shape)}."
            ) from None
        gammas = jnp.broadcast_to(gammas, want)
    return gammas


def _check_train_gammas_values(gammas, gamma) -> None:
    """With concrete gammas, check they are ±γ (the reversal divides by them)."""
    try:
        values = np.asarray(gammas)
    except jax.errors.TracerArrayConversionError:
        return  # traced: cannot check here; documented contract
    if values.size and not np.all(np.abs(values) == gamma):
        raise ValueError(
            f"training gammas must all be +{gamma} or -{gamma}; got values "
            f"{np.unique(values)[:8]}."
        )


# --------------------------------------------------------------------------- forward pieces


def _apply_block(block_fn, params_k, x, context, key_k):
    """h = block_fn(...), fenced so that XLA compiles the forward and the backward
    recomputation of the block as the same island (no fusion across the fence).

    The fence holds on backends that keep ``optimization_barrier`` through fusion (GPU,
    TPU). XLA:CPU removes it before fusion (its compiled HLO has no barrier left), so on CPU
    exactness rests on the plain block compiling alike in both passes; the reversal tests
    check that at training sizes.
    """
    params_k, x, context = jax.lax.optimization_barrier((params_k, x, context))
    h = block_fn(params_k, x, context, key_k)
    return jax.lax.optimization_barrier(h)


def _block_caller(block_fn, remat: bool):
    call = functools.partial(_apply_block, block_fn)
    return jax.checkpoint(call) if remat else call


def _max_abs(*arrays):
    # stop_gradient: statistics never carry gradients.
    return jax.lax.stop_gradient(
        functools.reduce(jnp.maximum, [jnp.max(jnp.abs(a)) for a in arrays])
    )


def _stats(max_abs, spec: _Spec) -> StackStats:
    overflow = (
        max_abs >= spec.exact_range if spec.frac_bits is not None else jnp.zeros((), bool)
    )
    return StackStats(max_abs, overflow, ~jnp.isfinite(max_abs))


def _slice0(tree):
    return jax.tree_util.tree_map(lambda a: a[0], tree)


def _slice_rest(tree):
    return jax.tree_util.tree_map(lambda a: a[1:], tree)


def _train_forward(block_fn, spec: _Spec, params, x0, context, keys, gammas, keep_bits: bool):
    """BDIA training forward from a grid input x0. Returns (x_K, x_{K-1}, x_1, bits, max_abs)."""
    call = _block_caller(block_fn, spec.remat)
    h0 = call(_slice0(params), x0, context, None if keys is None else keys[0])
    x1 = euler_step(x0, h0, spec.frac_bits)
    max_abs0 = _max_abs(x0, x1, h0 if spec.frac_bits is None else x1 - x0)

    def body(carry, xs):
        x_prev, x_cur, max_abs = carry
        params_k, key_k, gamma_k = xs
        h = call(params_k, x_cur, context, key_k)
        gamma_b = broadcast_gamma(gamma_k, x_cur)
        x_next, s, b = bdia_combine(x_prev, x_cur, h, gamma_b, spec.frac_bits, spec.side_bits)
        bits = fixed_point.pack_side_bits(s, spec.side_bits) if keep_bits else None
        return (x_cur, x_next, jnp.maximum(max_abs, _max_abs(x_next, b))), bits

    xs = (_slice_rest(params), None if keys is None else keys[1:], gammas)
    (x_before, x_last, max_abs), bits = jax.lax.scan(body, (x0, x1, max_abs0), xs)
    return x_last, x_before, x1, bits, max_abs


def _rebuild_step(block_fn, spec: _Spec, context, x_cur, x_next, params_k, key_k, gamma_k, bits):
    """Rebuild x_{k-1} from (x_k, x_{k+1}); also returns the block's VJP at x_k."""
    if spec.recompute == "shared":
        # One evaluation: the VJP's primal output rebuilds x_{k-1}. Exact only when the
        # block's forward has the same bits with and without its VJP (bdia_jax.stable).
        h, pullback = jax.vjp(
            lambda p, x, c: block_fn(p, x, c, key_k), params_k, x_cur, context
        )
    else:
        # h comes from the *same* fenced computation as in the forward pass and the VJP is
        # a separate evaluation: XLA compiles a block whose VJP is also taken with other
        # fusions and reduction orders (on XLA:CPU a jnp.mean in a LayerNorm changed h's
        # last bits at batch >= 64: an inexact rebuild). Costs one more block forward.
        h = _apply_block(block_fn, params_k, x_cur, context, key_k)
        _, pullback = jax.vjp(
            lambda p, x, c: block_fn(p, x, c, key_k), params_k, x_cur, context
        )
    gamma_b = broadcast_gamma(gamma_k, x_cur)
    s = fixed_point.unpack_side_bits(bits, x_cur.shape, x_cur.dtype)
    x_prev = bdia_uncombine(x_cur, x_next, h, s, gamma_b, spec.frac_bits, spec.side_bits)
    return x_prev, gamma_b, pullback


# --------------------------------------------------------------------------- encode / decode


def bdia_encode(block_fn: BlockFn, spec: _Spec, params, x0, context, keys, gammas):
    """Reversible forward: x0 (on the grid) → EncodedStack. See ``bdia_stack`` for args."""
    x_last, x_before, _, bits, max_abs = _train_forward(
        block_fn, spec, params, x0, context, keys, gammas, keep_bits=True
    )
    return EncodedStack(x_last, x_before, bits, _stats(max_abs, spec))


def bdia_decode(block_fn: BlockFn, spec: _Spec, params, encoded: EncodedStack, context, keys,
                gammas):
    """Inverse of ``bdia_encode``: rebuild all states [depth+1, batch, ...] (x_0 … x_K)."""
    if spec.depth == 1:
        return jnp.stack([encoded.x_before, encoded.x_last])

    def body(carry, xs):
        x_cur, x_next = carry
        params_k, key_k, gamma_k, bits = xs
        x_prev, _, _ = _rebuild_step(
            block_fn, spec, context, x_cur, x_next, params_k, key_k, gamma_k, bits
        )
        return (x_prev, x_cur), x_prev

    xs = (_slice_rest(params), None if keys is None else keys[1:], gammas, encoded.side_bits)
    _, rebuilt = jax.lax.scan(body, (encoded.x_before, encoded.x_last), xs, reverse=True)
    return jnp.concatenate([rebuilt, encoded.x_before[None], encoded.x_last[None]])


def bdia_forward_states(block_fn: BlockFn, spec: _Spec, params, x0, context, keys, gammas):
    """All forward states [depth+1, batch, ...] (x_0 … x_K), computed step by step with
    the same update as the stack (for round-trip tests against ``bdia_decode``)."""
    call = _block_caller(block_fn, False)
    h0 = call(_slice0(params), x0, context, None if keys is None else keys[0])
    x1 = euler_step(x0, h0, spec.frac_bits)

    def body(carry, xs):
        x_prev, x_cur = carry
        params_k, key_k, gamma_k = xs
        h = call(params_k, x_cur, context, key_k)
        x_next, _, _ = bdia_combine(
            x_prev, x_cur, h, broadcast_gamma(gamma_k, x_cur), spec.frac_bits, spec.side_bits
        )
        return (x_cur, x_next), x_next

    xs = (_slice_rest(params), None if keys is None else keys[1:], gammas)
    _, rest = jax.lax.scan(body, (x0, x1), xs)
    return jnp.concatenate([x0[None], x1[None], rest])


# --------------------------------------------------------------------------- custom VJP


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _reversible(block_fn, spec: _Spec, params, x0, context, keys, gammas, probe):
    x_last, _, _, _, max_abs = _train_forward(
        block_fn, spec, params, x0, context, keys, gammas, keep_bits=False
    )
    return x_last, _stats(max_abs, spec)


def _reversible_fwd(block_fn, spec: _Spec, params, x0, context, keys, gammas, probe):
    x_last, x_before, x1, bits, max_abs = _train_forward(
        block_fn, spec, params, x0, context, keys, gammas, keep_bits=True
    )
    # Verification keeps x_0 and x_1 (constant in depth) to compare with their rebuilds.
    refs = (x0, x1) if spec.verify else None
    residuals = (params, context, keys, gammas, x_before, x_last, bits, refs, probe)
    return (x_last, _stats(max_abs, spec)), residuals


def _reversible_bwd(block_fn, spec: _Spec, residuals, cotangents):
    params, context, keys, gammas, x_before, x_last, bits, refs, probe = residuals
    g_last, _ = cotangents  # the stats output carries no gradient
    # Only inexact context leaves carry gradients (a bool padding mask gets a float0 zero).
    ctx_leaves, ctx_def = jax.tree_util.tree_flatten(context)
    diff_leaf = [jnp.issubdtype(jnp.result_type(c), jnp.inexact) for c in ctx_leaves]

    def diff_part(tree):
        return [g for g, d in zip(jax.tree_util.tree_leaves(tree), diff_leaf) if d]

    def full_ctx_cotangent(diff_grads):
        it = iter(diff_grads)
        return jax.tree_util.tree_unflatten(ctx_def, [
            next(it) if d else np.zeros(np.shape(c), jax.dtypes.float0)
            for c, d in zip(ctx_leaves, diff_leaf)
        ])

    zeros_ctx = diff_part(jax.tree_util.tree_map(jnp.zeros_like, context))

    def body(carry, xs):
        # Invariant: g_next = dL/dx_{k+1} is complete; g_cur holds only the
        # γ_{k+1} dL/dx_{k+2} contribution of step k+1 to x_k.
        x_cur, x_next, g_cur, g_next, g_ctx = carry
        params_k, key_k, gamma_k, bits_k = xs
        x_prev, gamma_b, pullback = _rebuild_step(
            block_fn, spec, context, x_cur, x_next, params_k, key_k, gamma_k, bits_k
        )
        g_params_k, g_x_h, g_ctx_k = pullback(g_next + gamma_b * g_next)
        g_cur = g_cur + (g_next - gamma_b * g_next) + g_x_h
        g_prev = gamma_b * g_next
        g_ctx = [a + b for a, b in zip(g_ctx, diff_part(g_ctx_k))]
        return (x_prev, x_cur, g_prev, g_cur, g_ctx), g_params_k

    init = (x_before, x_last, jnp.zeros_like(x_last), g_last, zeros_ctx)
    xs = (_slice_rest(params), None if keys is None else keys[1:], gammas, bits)
    (x0, x1, g0, g1, g_ctx), g_params_rest = jax.lax.scan(body, init, xs, reverse=True)

    # Block 0 (plain Euler step): x_1 = x_0 + Q(h_0(x_0)), straight-through Q.
    key0 = None if keys is None else keys[0]
    _, pullback0 = jax.vjp(
        lambda p, x, c: _apply_block(block_fn, p, x, c, key0), _slice0(params), x0, context
    )
    g_params0, g_x_h0, g_ctx0 = pullback0(g1)
    g_x0 = g0 + g1 + g_x_h0
    g_ctx = full_ctx_cotangent([a + b for a, b in zip(g_ctx, diff_part(g_ctx0))])
    g_params = jax.tree_util.tree_map(
        lambda first, rest: jnp.concatenate([first[None], rest]), g_params0, g_params_rest
    )

    if spec.verify:
        ref0, ref1 = refs
        error = jnp.maximum(jnp.max(jnp.abs(x0 - ref0)), jnp.max(jnp.abs(x1 - ref1)))
        g_probe = error.astype(probe.dtype)
    else:
        g_probe = None
    return g_params, g_x0, g_ctx, None, None, g_probe


_reversible.defvjp(_reversible_fwd, _reversible_bwd)


# --------------------------------------------------------------------------- inference


def _inference_forward(block_fn, params, x, context, keys, gammas, frac_bits, remat):
    """x_{k+1} = x_k + Q(h_k(x_k)) (γ = 0), or with explicit inference gammas
    x_{k+1} = Q(γ x_{k-1} + (1-γ) x_k + (1+γ) h_k(x_k)). Unquantized if frac_bits is None."""
    call = _block_caller(block_fn, remat)
    x0 = x if frac_bits is None else fixed_point.quantize_ste(x, frac_bits)
    h0 = call(_slice0(params), x0, context, None if keys is None else keys[0])
    x1 = euler_step(x0, h0, frac_bits)

    def body(carry, xs):
        x_prev, x_cur, max_abs = carry
        params_k, key_k, gamma_k = xs
        h = call(params_k, x_cur, context, key_k)
        if gamma_k is None:
            x_next = euler_step(x_cur, h, frac_bits)
        else:
            g = broadcast_gamma(gamma_k, x_cur)
            v = g * x_prev + ((x_cur - g * x_cur) + (h + g * h))
            x_next = v if frac_bits is None else fixed_point.quantize_ste(v, frac_bits)
        return (x_cur, x_next, jnp.maximum(max_abs, _max_abs(x_next))), None

    xs = (_slice_rest(params), None if keys is None else keys[1:], gammas)
    (_, x_last, max_abs), _ = jax.lax.scan(body, (x0, x1, _max_abs(x0, x1)), xs)
    return x_last, max_abs


# --------------------------------------------------------------------------- public API


def bdia_stack(
    block_fn: BlockFn,
    params,
    x: jax.Array,
    *,
    key: jax.Array | None = None,
    gammas: jax.Array | None = None,
    context: Any = None,
    gamma: float = 0.5,
    frac_bits: int | None = 9,
    backprop: Backprop = "reversible",
    train: bool = True,
    quantize: bool = True,
    reversal_probe: jax.Array | None = None,
    recompute: Recompute = "separate",
    return_stats: bool = False,
):
    """Run K residual blocks with the BDIA update.

    Args:
      block_fn: ``block_fn(params_k, x, context, key_k) -> h``, the residual branch, pure;
        h has x's shape and dtype (it may compute internally in bfloat16).
      params: pytree, every leaf stacked on a leading [depth] axis.
      x: [batch, ...] float32 (or float64) stack input, e.g. [batch, seq, dim].
      key: PRNG key. Draws γ (when ``gammas`` is None) and the per-block ``key_k`` given
        to ``block_fn`` (for dropout); the backward pass replays the same keys.
      gammas: optional [depth-1, batch] array of ±gamma for blocks 1…K-1. With
        ``train=False`` any values broadcastable to that shape (inference-γ sweep).
      context: optional pytree given to every block (e.g. encoder output). Differentiable.
      gamma: |γ|, a power of two (0.5, 0.25, …).
      frac_bits: l in δ = 2**-l; None disables quantization (autodiff/remat only).
      backprop: "reversible" | "autodiff" | "remat".
      train: True for the BDIA training update; False for inference (γ = 0, or ``gammas``).
        At inference ``backprop`` only chooses plain autodiff or per-block remat
        ("reversible" differentiates as "autodiff": γ = 0 has no inverse).
      quantize: False gives the unquantized standard transformer at inference.
      reversal_probe: optional float scalar (use 0.0). With "reversible", its gradient is
        the largest |rebuilt - forward| over x_0 and x_1 (0.0 when reversal was exact).
        Costs two stored states, constant in depth; cheap enough for training.
      return_stats: also return a ``StackStats`` (range, overflow, non-finite values).
      recompute: how the "reversible" backward pass gets h_k(x_k) to rebuild x_{k-1}.
        "separate" (default): the same fenced call as the forward pass, then the block's
        VJP as a second evaluation; exact for any block, one extra block forward per block.
        "shared": the VJP's own primal output; one forward fewer (the step costs about what
        per-block remat costs), exact when the block's forward has the same bits whether or
        not its VJP is taken. XLA:CPU breaks that for ``jnp.mean``-style reductions at
        training sizes; compute a block's statistics with ``bdia_jax.stable`` (the models
        in ``bdia_jax.models`` do) and keep ``reversal_probe`` on to check it on your
        hardware. Ignored by "autodiff" and "remat".

    Returns:
      x_K: same shape and dtype as x; or ``(x_K, StackStats)`` with ``return_stats``.
    """
    _check_backprop(backprop)
    _check_recompute(recompute)
    depth = _depth_of(params)
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"x must have a leading batch axis, got shape {x.shape}.")
    batch = x.shape[0]
    quantized = quantize and frac_bits is not None
    if quantized or (train and backprop == "reversible"):
        fixed_point.exact_range(x.dtype, 0)  # raises for non-float32/64 streams
        _check_frac_bits(frac_bits, x.dtype)

    if not train:
        block_keys, _ = _keys_and_gammas(key, None, depth, batch, gamma, x.dtype, False)
        if gammas is not None:
            gammas = _check_gammas(gammas, depth, batch, train=False).astype(x.dtype)
        _check_block_output(block_fn, params, x, context, block_keys)
        x_last, max_abs = _inference_forward(
            block_fn, params, x, context, block_keys, gammas,
            frac_bits if quantized else None, backprop == "remat",
        )
        if not return_stats:
            return x_last
        spec = _Spec(depth, 0.0, 0, frac_bits if quantized else None, False, False,
                     fixed_point.exact_range(x.dtype, frac_bits) if quantized else math.inf)
        return x_last, _stats(max_abs, spec)

    if backprop == "reversible" and not quantized:
        raise ValueError(
            "backprop='reversible' needs the fixed-point grid: set frac_bits (e.g. 9) and "
            "quantize=True, or use backprop='autodiff'/'remat' for the no-quantization ablation."
        )
    side_bits = _side_bits_of(gamma)
    block_keys, gammas = _keys_and_gammas(key, gammas, depth, batch, gamma, x.dtype, True)
    gammas = _check_gammas(gammas, depth, batch, train=True).astype(x.dtype)
    _check_train_gammas_values(gammas, gamma)
    _check_block_output(block_fn, params, x, context, block_keys)
    if reversal_probe is not None and backprop != "reversible":
        reversal_probe = None  # nothing is rebuilt: the probe's gradient is 0
    spec = _Spec(
        depth=depth,
        gamma=float(abs(gamma)),
        side_bits=side_bits,
        frac_bits=frac_bits if quantized else None,
        verify=reversal_probe is not None,
        remat=backprop == "remat",
        exact_range=fixed_point.exact_range(x.dtype, frac_bits) if quantized else math.inf,
        recompute=recompute,
    )
    x0 = x if spec.frac_bits is None else fixed_point.quantize_ste(x, spec.frac_bits)
    if backprop == "reversible":
        probe = None if reversal_probe is None else jnp.asarray(reversal_probe, x.dtype)
        x_last, stats = _reversible(block_fn, spec, params, x0, context, block_keys, gammas, probe)
    else:
        x_last, _, _, _, max_abs = _train_forward(
            block_fn, spec, params, x0, context, block_keys, gammas, keep_bits=False
        )
        stats = _stats(max_abs, spec)
    return (x_last, stats) if return_stats else x_last


def standard_stack(
    block_fn: BlockFn,
    params,
    x: jax.Array,
    *,
    key: jax.Array | None = None,
    context: Any = None,
    backprop: Literal["autodiff", "remat"] = "autodiff",
    return_stats: bool = False,
):
    """The conventional pre-LN transformer: x_{k+1} = x_k + h_k(x_k), unquantized.

    The baseline every experiment compares against. Same block contract and key split as
    ``bdia_stack`` (so a standard and a BDIA model given the same key draw the same dropout
    masks). ``backprop`` is "autodiff" or "remat" ("reversible" raises: this update has no
    exact inverse).
    """
    if backprop == "reversible":
        raise ValueError(
            "standard_stack cannot use backprop='reversible': x_{k+1} = x_k + h(x_k) has no "
            "exact inverse; use bdia_stack for reversible training, or 'autodiff'/'remat'."
        )
    _check_backprop(backprop)
    return bdia_stack(
        block_fn, params, x, key=key, context=context, frac_bits=None, backprop=backprop,
        train=False, quantize=False, return_stats=return_stats,
    )


def make_spec(depth: int, *, gamma: float = 0.5, frac_bits: int = 9, dtype=jnp.float32,
              verify: bool = False) -> _Spec:
    """Static spec for ``bdia_encode`` / ``bdia_decode`` / ``bdia_forward_states``."""
    _check_frac_bits(frac_bits, dtype)
    return _Spec(depth, float(abs(gamma)), _side_bits_of(gamma), frac_bits, verify, False,
                 fixed_point.exact_range(dtype, frac_bits))


def prepare_keys_and_gammas(key, depth: int, batch: int, gamma: float = 0.5,
                            dtype=jnp.float32):
    """The (block_keys [depth], gammas [depth-1, batch]) that ``bdia_stack`` derives from
    ``key`` in training, for use with ``bdia_encode`` / ``bdia_decode``."""
    return _keys_and_gammas(key, None, depth, batch, gamma, dtype, True)
