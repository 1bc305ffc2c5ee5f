"""The pure-JAX engine: K residual blocks with depth-stacked parameters.

Public entry points:
  * ``apply_stack``     – the one way to run a stack: ``update`` (``Standard`` | ``BDIA``)
                          and ``backprop`` (``Autodiff`` | ``Remat`` | ``Reversible``) objects
                          from ``bdia_jax.methods``; returns ``(x_K, StackStats)``. The
                          update picks the pass (``update.stack_pass``: ``_TrainPass`` or
                          ``_InferencePass``, a ``methods.StackPass``) and ``backprop.run``
                          runs it: stored activations, per-block remat or the custom VJP.
  * ``bdia_forward`` / ``bdia_invert`` – the forward/inverse pair behind the reversible
                          custom VJP (``bdia_all_states`` is their step-by-step reference),
                          exposed for tests, debugging and verification.

The block contract: ``block_fn(params_k, x, context, key_k) -> h`` is a pure function;
h has x's shape and dtype. ``key_k`` is None when the stack got no key: a block should
apply dropout only when it receives a key.

Layout of the math (see docs/design.md): x_0 = Q(x); x_1 = x_0 + Q(h_0(x_0));
x_{k+1} = γ_k (x_{k-1} - s_{k-1} δ) + Q((1-γ_k) x_k + (1+γ_k) h_k(x_k)) for k ≥ 1 with
|γ| = 2**-m; for other γ x_{k+1} = Q(γ_k x_{k-1} + (1-γ_k) x_k + (1+γ_k) h_k(x_k)) (no
inverse). Without a grid (BDIA(frac_bits=None)) Q is the identity.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from bdia_jax import fixed_point
from bdia_jax.methods import BDIA, Backprop, Reversible, Update, check_method
from bdia_jax.step import (
    bdia_combine,
    bdia_uncombine,
    broadcast_gamma,
    euler_step,
    noninvertible_step,
)

BlockFn = Callable[[Any, jax.Array, Any, Any], jax.Array]


class StackStats(NamedTuple):
    """Range and health of the residual stream, from the forward pass.

    max_abs:   float scalar, largest |x_k| and |Q-term| over all blocks and elements.
    overflow:  bool scalar, max_abs reached the exact range of the fixed-point grid
               (``fixed_point.exact_range``): reversal is no longer guaranteed exact.
               Always False without a grid.
    nonfinite: bool scalar, a NaN or Inf reached the residual stream.
    """

    max_abs: jax.Array
    overflow: jax.Array
    nonfinite: jax.Array


class ForwardRecord(NamedTuple):
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
    """Static settings of one stack pass (hashable: it is a custom_vjp nondiff arg)."""

    depth: int
    frac_bits: int | None  # None: no grid
    side_bits: int | None  # m of the invertible update (|γ| = 2**-m on a grid); else None
    exact_range: float


def _spec(depth, dtype, frac_bits, side_bits) -> _Spec:
    if frac_bits is not None:
        fixed_point.check_frac_bits(frac_bits, dtype)
    return _Spec(
        depth=depth, frac_bits=frac_bits, side_bits=side_bits if frac_bits is not None else None,
        exact_range=math.inf if frac_bits is None else fixed_point.exact_range(dtype, frac_bits),
    )


# --------------------------------------------------------------------------- validation


def _depth_of(params) -> int:
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError(
            "params has no array leaves; apply_stack needs depth-stacked parameters "
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
                "a BDIA training pass needs `key` (to draw γ and block keys) or an explicit "
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
    """With concrete gammas, check they are ±γ (the invertible update keeps log2(1/γ) side
    bits and the reversal divides by γ)."""
    try:
        values = np.asarray(gammas)
    except jax.errors.TracerArrayConversionError:
        return  # traced: cannot check here; documented contract
    if values.size and not np.all(np.abs(values) == gamma):
        raise ValueError(
            f"training gammas must all be ±{gamma} (update=BDIA(gamma={gamma})); got values "
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


def _call_block(block_fn, params_k, x, context, key_k, **kw):
    """block_fn(...), with recompute="fused"'s ``cotangent=`` keyword named in the error
    of a block that does not take it."""
    if not kw:
        return block_fn(params_k, x, context, key_k)
    try:
        return block_fn(params_k, x, context, key_k, **kw)
    except TypeError as e:
        if "cotangent" not in str(e):
            raise
        raise TypeError(
            "Reversible(recompute='fused') calls the block as block(x, context, key, "
            "cotangent=dL/dh), and this block does not take `cotangent` (" + str(e) + "); "
            "use recompute='shared', or add the keyword (the models' blocks show how)."
        ) from None


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


def _take(tree, k):
    """Block k of every [depth, ...] leaf (k a traced int scalar), without copying the rest."""
    return jax.tree_util.tree_map(
        lambda a: jax.lax.dynamic_index_in_dim(a, k, keepdims=False), tree)


def _put(tree, block, k):
    """Write block k (leaves [...]) into every [depth, ...] leaf of tree, in place."""
    return jax.tree_util.tree_map(
        lambda a, b: jax.lax.dynamic_update_index_in_dim(a, b.astype(a.dtype), k, 0),
        tree, block)


def _scan_rest(step, init, params, keys, per_block, *, by_index: bool, reverse: bool = False):
    """``lax.scan`` of ``step(carry, k, params_k, key_k, per_block_k) -> (carry, y)`` over
    blocks k = 1 … depth-1.

    params: [depth, ...] leaves; keys: [depth] block keys or None; per_block: pytree of
    [depth-1, ...] arrays (γ_k, side bits) scanned as they are; k: int32 scalar.
    by_index: read block k from the full stacks inside the body, so XLA does not copy
    params[1:]. Only where JAX does not differentiate the scan: its transpose would add a
    full-size cotangent of the closed-over stack at every step.
    """
    depth = _depth_of(params)
    index = jnp.arange(1, depth, dtype=jnp.int32)
    if by_index:
        def body(carry, xs):
            k, per_k = xs
            return step(carry, k, _take(params, k), None if keys is None else keys[k], per_k)

        xs = (index, per_block)
    else:
        def body(carry, xs):
            k, params_k, key_k, per_k = xs
            return step(carry, k, params_k, key_k, per_k)

        xs = (index, _slice_rest(params), None if keys is None else keys[1:], per_block)
    return jax.lax.scan(body, init, xs, reverse=reverse)


def _train_forward(call, spec: _Spec, params, x0, context, keys, gammas, keep_bits: bool,
                   by_index: bool):
    """BDIA training forward from x0 (on the grid when spec.frac_bits is set).

    call: ``call(params_k, x, context, key_k) -> h``, the fenced block (``_apply_block``),
    as the gradient method wraps it. Returns (x_K, x_{K-1}, packed side bits or None,
    max_abs). The side-bit form is used when spec.side_bits is set, the one-rounding
    ``noninvertible_step`` otherwise. by_index: see ``_scan_rest`` (True under the
    reversible custom VJP).
    """
    h0 = call(_slice0(params), x0, context, None if keys is None else keys[0])
    x1 = euler_step(x0, h0, spec.frac_bits)
    max_abs0 = _max_abs(x0, x1, h0 if spec.frac_bits is None else x1 - x0)
    keep_bits = keep_bits and spec.side_bits is not None

    def step(carry, k, params_k, key_k, gamma_k):
        x_prev, x_cur, max_abs = carry
        h = call(params_k, x_cur, context, key_k)
        gamma_b = broadcast_gamma(gamma_k, x_cur)
        if spec.side_bits is None:
            x_next = noninvertible_step(x_prev, x_cur, h, gamma_b, spec.frac_bits)
            new_max, bits = _max_abs(x_next), None
        else:
            x_next, s, b = bdia_combine(x_prev, x_cur, h, gamma_b, spec.frac_bits,
                                        spec.side_bits)
            new_max = _max_abs(x_next, b)
            bits = fixed_point.pack_side_bits(s, spec.side_bits) if keep_bits else None
        return (x_cur, x_next, jnp.maximum(max_abs, new_max)), bits

    (x_before, x_last, max_abs), bits = _scan_rest(step, (x0, x1, max_abs0), params, keys,
                                                   gammas, by_index=by_index)
    return x_last, x_before, bits, max_abs


def _rebuild_step(block_fn, method: Reversible, spec: _Spec, context, x_cur, x_next, params_k,
                  key_k, gamma_k, bits, g_h):
    """Rebuild x_{k-1} from (x_k, x_{k+1}); also returns the block's VJP at x_k, which
    ``method.output_and_vjp`` gets as its ``recompute`` says, to be pulled back with g_h."""
    h, pullback = method.output_and_vjp(
        lambda p, x, c, **kw: _call_block(block_fn, p, x, c, key_k, **kw),
        (params_k, x_cur, context),
        fenced=lambda p, x, c: _apply_block(block_fn, p, x, c, key_k), cotangent=g_h)
    gamma_b = broadcast_gamma(gamma_k, x_cur)
    s = fixed_point.unpack_side_bits(bits, x_cur.shape, x_cur.dtype)
    x_prev = bdia_uncombine(x_cur, x_next, h, s, gamma_b, spec.frac_bits)
    return x_prev, gamma_b, pullback


# --------------------------------------------------------------------------- forward / invert


# The method of the forward/inverse pair: the engine's own rebuild, no probe.
_PAIR_METHOD = Reversible(reversal_probe=False)


def _pair_spec(update: BDIA, params, x0) -> _Spec:
    check_method(update, _PAIR_METHOD)
    return _spec(_depth_of(params), jnp.asarray(x0).dtype, update.frac_bits, update.side_bits)


def bdia_forward(block_fn: BlockFn, params, x0, *, update: BDIA, keys, gammas,
                 context=None) -> ForwardRecord:
    """Reversible forward from x0 [batch, ...] (already on the grid: Q(x)) → ForwardRecord.

    update: an invertible BDIA (a grid and |γ| = 2**-m). keys: [depth] block keys or None;
    gammas: [depth-1, batch] of ±γ (``prepare_keys_and_gammas`` gives both).
    """
    spec = _pair_spec(update, params, x0)
    x_last, x_before, bits, max_abs = _train_forward(
        functools.partial(_apply_block, block_fn), spec, params, x0, context, keys, gammas,
        keep_bits=True, by_index=True
    )
    return ForwardRecord(x_last, x_before, bits, _stats(max_abs, spec))


def bdia_invert(block_fn: BlockFn, params, record: ForwardRecord, *, update: BDIA, keys,
                gammas, context=None) -> jax.Array:
    """Inverse of ``bdia_forward``: rebuild all states [depth+1, batch, ...] (x_0 … x_K)."""
    spec = _pair_spec(update, params, record.x_last)
    if spec.depth == 1:
        return jnp.stack([record.x_before, record.x_last])

    def step(carry, k, params_k, key_k, per_k):
        x_cur, x_next = carry
        gamma_k, bits = per_k
        x_prev, _, _ = _rebuild_step(  # no VJP is pulled back: no cotangent
            block_fn, _PAIR_METHOD, spec, context, x_cur, x_next, params_k, key_k, gamma_k, bits,
            None)
        return (x_prev, x_cur), x_prev

    _, rebuilt = _scan_rest(step, (record.x_before, record.x_last), params, keys,
                            (gammas, record.side_bits), by_index=True, reverse=True)
    return jnp.concatenate([rebuilt, record.x_before[None], record.x_last[None]])


def bdia_all_states(block_fn: BlockFn, params, x0, *, update: BDIA, keys, gammas,
                    context=None) -> jax.Array:
    """All forward states [depth+1, batch, ...] (x_0 … x_K), computed step by step with the
    same update as the stack: the reference for round trips through ``bdia_invert``."""
    spec = _pair_spec(update, params, x0)
    call = functools.partial(_apply_block, block_fn)
    h0 = call(_slice0(params), x0, context, None if keys is None else keys[0])
    x1 = euler_step(x0, h0, spec.frac_bits)

    def step(carry, k, params_k, key_k, gamma_k):
        x_prev, x_cur = carry
        h = call(params_k, x_cur, context, key_k)
        x_next, _, _ = bdia_combine(
            x_prev, x_cur, h, broadcast_gamma(gamma_k, x_cur), spec.frac_bits, spec.side_bits
        )
        return (x_cur, x_next), x_next

    _, rest = _scan_rest(step, (x0, x1), params, keys, gammas, by_index=True)
    return jnp.concatenate([x0[None], x1[None], rest])


# --------------------------------------------------------------------------- custom VJP


# symbolic_zeros (defvjp): the forward rule sees which inputs are differentiated, so the backward pass
# accumulates gradients only for those parameter leaves: a frozen base (LoRA) gets no
# zero-filled [depth, ...] gradient buffer carried through the backward loop.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _reversible(block_fn, method: Reversible, spec: _Spec, params, x0, context, keys, gammas,
                reversal_probe):
    x_last, _, _, max_abs = _train_forward(
        functools.partial(_apply_block, block_fn), spec, params, x0, context, keys, gammas,
        keep_bits=False, by_index=True
    )
    return x_last, _stats(max_abs, spec)


def _is_none(x):
    return x is None


def _reversible_fwd(block_fn, method: Reversible, spec: _Spec, params, x0, context, keys,
                    gammas, reversal_probe):
    # Every input leaf arrives as a CustomVJPPrimal (value, perturbed). The parameters are
    # kept as two trees of params' structure with None where the other has the leaf:
    # `trained` (differentiated) and `frozen`, which tells the backward pass which to grow.
    trained = jax.tree_util.tree_map(lambda p: p.value if p.perturbed else None, params)
    frozen = jax.tree_util.tree_map(lambda p: None if p.perturbed else p.value, params)
    x0, context, keys, gammas, reversal_probe = jax.tree_util.tree_map(
        lambda p: p.value, (x0, context, keys, gammas, reversal_probe))
    params = _join_params(trained, frozen)
    x_last, x_before, bits, max_abs = _train_forward(
        functools.partial(_apply_block, block_fn), spec, params, x0, context, keys, gammas,
        keep_bits=True, by_index=True
    )
    # The probe keeps x_0 (constant in depth) to compare with its rebuild: the last state
    # rebuilt, which an error anywhere in the reversal reaches, doubled at every block.
    probe_x0 = x0 if method.reversal_probe else None
    residuals = ((trained, frozen), context, keys, gammas, x_before, x_last, bits, probe_x0,
                 reversal_probe)
    return (x_last, _stats(max_abs, spec)), residuals


def _join_params(trained, frozen):
    """The parameter tree from its differentiated and frozen parts (None-complementary)."""
    return jax.tree_util.tree_map(lambda t, f: f if t is None else t, trained, frozen,
                                  is_leaf=_is_none)


def _reversible_bwd(block_fn, method: Reversible, spec: _Spec, residuals, cotangents):
    ((trained, frozen), context, keys, gammas, x_before, x_last, bits, probe_x0,
     reversal_probe) = residuals
    params = _join_params(trained, frozen)
    g_last, _ = cotangents  # the stats output carries no gradient
    if isinstance(g_last, SymbolicZero):  # x_last unused by the loss
        g_last = jnp.zeros(g_last.shape, g_last.dtype)
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

    n = spec.depth - 1  # BDIA steps k = n … 1, then block 0's Euler step

    def gamma_of(k):
        """γ_k [batch] (0 for k = 0, whose Euler step is the BDIA step with γ = 0, and for
        k = n + 1, past the last block)."""
        if n == 0:
            return jnp.zeros(gammas.shape[1:], gammas.dtype)
        gamma = jax.lax.dynamic_index_in_dim(gammas, jnp.clip(k - 1, 0, n - 1), keepdims=False)
        return jnp.where((k == 0) | (k > n), 0, gamma).astype(gamma.dtype)

    def block_step(k, x_cur, x_next, g_after, g_next):
        """Step k backwards: x_{k-1} and the complete dL/dx_k, with block k's parameter and
        context gradients. g_next = dL/dx_{k+1} is complete; g_after = dL/dx_{k+2} (zeros
        for k = n), of which step k+1 gave x_k the part γ_{k+1} dL/dx_{k+2}.

        Block 0's Euler step x_1 = x_0 + Q(h_0(x_0)) is the BDIA step with γ = 0 (both take
        straight-through gradients of Q), so k = 0 runs the same code with γ_0 = 0 and no
        x_{-1}: its rebuild divides by 1 instead of 0 and is discarded.
        """
        bits_k = (jnp.zeros(bits.shape[1:], bits.dtype) if n == 0  # depth 1: no side bits
                  else jax.lax.dynamic_index_in_dim(bits, jnp.maximum(k - 1, 0), keepdims=False))
        gamma_k = gamma_of(k)
        gamma_b = broadcast_gamma(gamma_k, x_cur)
        g_h = g_next + gamma_b * g_next  # dL/dh_k, known before the rebuild ("fused")
        x_prev, _, pullback = _rebuild_step(
            block_fn, method, spec, context, x_cur, x_next, _take(params, k),
            None if keys is None else keys[k], jnp.where(k == 0, 1, gamma_k).astype(gamma_k.dtype),
            bits_k, g_h)
        g_params_k, g_x_h, g_ctx_k = pullback(g_h)
        # γ_{k+1} dL/dx_{k+2} is formed here, not kept from step k+1: dL/dx_{k+2} stays in its
        # buffer unchanged, and no fifth stream-sized buffer holds the scaled copy.
        g_cur = (broadcast_gamma(gamma_of(k + 1), x_cur) * g_after
                 + (g_next - gamma_b * g_next) + g_x_h)
        return x_prev, g_cur, g_params_k, diff_part(g_ctx_k)

    def step_into(k, streams, g_ctx, g_params):
        """Step k, if 0 <= k <= n, on the four stream buffers (x_k, x_{k+1}, dL/dx_{k+2},
        dL/dx_{k+1}): x_{k-1} overwrites x_{k+1} and dL/dx_k overwrites dL/dx_{k+2}, both
        dead once read. Returns the buffers in the roles of step k-1: (x_{k-1}, x_k,
        dL/dx_{k+1}, dL/dx_k), and the context and parameter gradients."""
        def body(carry):
            _, (x_cur, x_next, g_after, g_next), g_ctx, g_params = carry
            x_prev, g_cur, g_params_k, g_ctx_k = block_step(k, x_cur, x_next, g_after, g_next)
            g_ctx = [a + b for a, b in zip(g_ctx, g_ctx_k)]
            g_params_k = jax.tree_util.tree_map(  # the frozen leaves' are dropped unused
                lambda t, g: None if t is None else g, trained, g_params_k, is_leaf=_is_none)
            return (jnp.zeros((), bool), (x_cur, x_prev, g_cur, g_next), g_ctx,
                    _put(g_params, g_params_k, k))

        # A while loop of at most one trip: its body is compiled and scheduled on its own,
        # so the two steps of an iteration never overlap, and a loop's carry keeps each
        # buffer in place (a lax.cond gives its outputs new buffers and copies what a
        # branch passes through, on XLA:CPU).
        _, (x_cur, x_prev, g_cur, g_next), g_ctx, g_params = jax.lax.while_loop(
            lambda carry: carry[0], body, ((k >= 0) & (k <= n), streams, g_ctx, g_params))
        return (x_prev, x_cur, g_next, g_cur), g_ctx, g_params

    # Two steps per loop iteration, so that every buffer is back in its carry position
    # after each iteration: one step swaps the roles of the two state buffers and of the two
    # gradient buffers, and a loop that carried them in fixed roles would copy each one
    # every step. With an odd number of steps the first iteration's first step is k = n + 1,
    # which does not run. Block 0 runs in the loop, with its key read at a traced k: after
    # the loop, XLA merged its dropout bits with the forward pass's and kept them live
    # through every step.
    top = n + (n + 1) % 2

    def two_steps(i, carry):
        k = top - 2 * i
        return step_into(k - 1, *step_into(k, *carry))

    g_params = jax.tree_util.tree_map(jnp.zeros_like, trained)  # None (zero) where frozen
    streams = (x_before, x_last, jnp.zeros_like(x_last), g_last)  # the roles of step n
    if top > n:  # the roles of step n + 1, which step_into turns into those of step n
        streams = (streams[1], streams[0], streams[3], streams[2])
    (_, x0, _, g_x0), g_ctx, g_params = jax.lax.fori_loop(
        0, (n + 2) // 2, two_steps, (streams, zeros_ctx, g_params))
    g_ctx = full_ctx_cotangent(g_ctx)

    if method.reversal_probe:
        error = jnp.max(jnp.abs(x0 - probe_x0))
        g_probe = error.astype(reversal_probe.dtype)
    else:
        g_probe = None
    return g_params, g_x0, g_ctx, None, None, g_probe


_reversible.defvjp(_reversible_fwd, _reversible_bwd, symbolic_zeros=True)


# --------------------------------------------------------------------------- inference


def _inference_forward(call, spec: _Spec, params, x, context, keys, gammas,
                       by_index: bool = False):
    """x_0 = Q(x), x_{k+1} = x_k + Q(h_k(x_k)) (γ = 0), or with explicit inference gammas
    ``noninvertible_step``. Q is the identity when spec.frac_bits is None. call: the fenced
    block as the gradient method wraps it (see ``_train_forward``). by_index: see
    ``_scan_rest`` (True where no gradient is taken)."""
    x0 = x if spec.frac_bits is None else fixed_point.quantize_ste(x, spec.frac_bits)
    h0 = call(_slice0(params), x0, context, None if keys is None else keys[0])
    x1 = euler_step(x0, h0, spec.frac_bits)

    def step(carry, k, params_k, key_k, gamma_k):
        x_prev, x_cur, max_abs = carry
        h = call(params_k, x_cur, context, key_k)
        if gamma_k is None:
            x_next = euler_step(x_cur, h, spec.frac_bits)
        else:
            x_next = noninvertible_step(x_prev, x_cur, h, broadcast_gamma(gamma_k, x_cur),
                                        spec.frac_bits)
        return (x_cur, x_next, jnp.maximum(max_abs, _max_abs(x_next))), None

    (_, x_last, max_abs), _ = _scan_rest(step, (x0, x1, _max_abs(x0, x1)), params, keys,
                                         gammas, by_index=by_index)
    return x_last, _stats(max_abs, spec)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _inference_without_gradient(block_fn, spec: _Spec, params, x, context, keys, gammas):
    return _inference_forward(functools.partial(_apply_block, block_fn), spec, params, x,
                              context, keys, gammas, by_index=True)


def _inference_without_gradient_fwd(block_fn, spec, params, x, context, keys, gammas):
    raise ValueError(
        "this stack pass has train=False with backprop=Reversible(): the inference update "
        "has no inverse, so it is not differentiable; pass backprop=Autodiff() or Remat() "
        "to differentiate an inference pass, or train=True."
    )


def _inference_without_gradient_bwd(block_fn, spec, residuals, cotangents):
    raise AssertionError("unreachable: the forward rule raises")


_inference_without_gradient.defvjp(_inference_without_gradient_fwd,
                                   _inference_without_gradient_bwd)


# --------------------------------------------------------------------------- the passes


class _TrainPass(NamedTuple):
    """A BDIA training pass from x0 (on the grid when spec.frac_bits is set), as the gradient
    method runs it (``methods.StackPass``): stored activations or the reversible VJP."""

    block_fn: BlockFn
    spec: _Spec
    params: Any
    x0: jax.Array
    context: Any
    keys: jax.Array | None
    gammas: jax.Array
    reversal_probe: jax.Array | None

    def stored(self, wrap_block):
        x_last, _, _, max_abs = _train_forward(
            wrap_block(functools.partial(_apply_block, self.block_fn)), self.spec, self.params,
            self.x0, self.context, self.keys, self.gammas, keep_bits=False, by_index=False,
        )
        return x_last, _stats(max_abs, self.spec)

    def reversible(self, method: Reversible):
        return _reversible(self.block_fn, method, self.spec, self.params, self.x0,
                           self.context, self.keys, self.gammas, self.reversal_probe)


class _InferencePass(NamedTuple):
    """An inference pass (γ = 0 or explicit gammas; the standard update) from x. The
    reversible method has no inverse to differentiate it with: it runs forward and raises
    if differentiated."""

    block_fn: BlockFn
    spec: _Spec
    params: Any
    x: jax.Array
    context: Any
    keys: jax.Array | None
    gammas: jax.Array | None

    def stored(self, wrap_block):
        return _inference_forward(wrap_block(functools.partial(_apply_block, self.block_fn)),
                                  self.spec, self.params, self.x, self.context, self.keys,
                                  self.gammas)

    def reversible(self, method: Reversible):
        return _inference_without_gradient(self.block_fn, self.spec, self.params, self.x,
                                           self.context, self.keys, self.gammas)


# --------------------------------------------------------------------------- public API


def apply_stack(
    block_fn: BlockFn,
    params,
    x: jax.Array,
    *,
    update: Update,
    backprop: Backprop,
    key: jax.Array | None = None,
    gammas: jax.Array | None = None,
    context: Any = None,
    train: bool = True,
    reversal_probe: jax.Array | None = None,
) -> tuple[jax.Array, StackStats]:
    """Run K residual blocks with ``update`` and differentiate them by ``backprop``.

    Args:
      block_fn: ``block_fn(params_k, x, context, key_k) -> h``, the residual branch, pure;
        h has x's shape and dtype (it may compute internally in bfloat16). With
        ``Reversible(recompute="fused")`` the backward pass calls it with ``cotangent=``
        dL/dh as well (see ``bdia_jax.methods.Reversible``).
      params: pytree, every leaf stacked on a leading [depth] axis.
      x: [batch, ...] float32 (or float64) stack input, batch >= 1, e.g. [batch, seq, dim].
      update: ``Standard()`` or ``BDIA(gamma, frac_bits, quantize_at_inference)``.
      backprop: ``Autodiff()``, ``Remat()`` or ``Reversible(recompute, reversal_probe)``; the pair is
        checked by ``check_method`` (Standard + Reversible raises).
      key: PRNG key. Split into the γ draw (BDIA training, when ``gammas`` is None) and
        the per-block ``key_k`` given to ``block_fn`` (dropout); the reversible backward
        pass replays the same keys. None: every key_k is None.
      gammas: BDIA only. Training: optional [depth-1, batch] γ_k per sample for blocks
        1…K-1 (±gamma when the update is invertible). Inference: optional values
        broadcastable to [depth-1, batch] (the inference-γ sweep; None is γ = 0).
      context: optional pytree given to every block (e.g. encoder output). Differentiable.
      train: True runs the BDIA training update (random ±γ); False the inference update
        (γ = 0 or ``gammas``; on the grid iff frac_bits is set and quantize_at_inference).
        ``train`` never changes what ``backprop`` means: Autodiff and Remat differentiate
        either pass; an inference pass with Reversible runs forward but raises if it is
        differentiated (γ = 0 has no inverse: say Autodiff() or Remat() to differentiate
        it). For Standard, train changes nothing.
      reversal_probe: float scalar (use 0.0), required exactly when train=True with
        ``Reversible(reversal_probe=True)``: its gradient is the largest |rebuilt - forward| of
        x_0, the last state rebuilt (0.0 when the reversal was exact). Anything else raises.

    Returns:
      (x_K of x's shape and dtype, StackStats).
    """
    check_method(update, backprop)
    depth = _depth_of(params)
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"x must have a leading batch axis, got shape {x.shape}.")
    if x.shape[0] == 0:
        raise ValueError(f"x has an empty batch (shape {x.shape}); pass at least one example.")
    if not isinstance(train, bool):
        raise ValueError(f"train must be True or False, got {train!r}.")
    batch = x.shape[0]
    reads_probe = train and backprop.reversal_probe
    if reads_probe and reversal_probe is None:
        raise ValueError(
            "backprop=Reversible(reversal_probe=True) reports the reversal error as the "
            "gradient of `reversal_probe`: pass reversal_probe=jnp.zeros(()), or use "
            "Reversible(reversal_probe=False)."
        )
    if reversal_probe is not None and not reads_probe:
        raise ValueError(
            f"reversal_probe is read only by a train=True pass with "
            f"backprop=Reversible(reversal_probe=True), got train={train}, "
            f"backprop={backprop!r}: nothing is rebuilt here, so drop reversal_probe."
        )
    if gammas is not None and not update.has_gamma:
        raise ValueError("gammas apply only to update=BDIA(...); drop them for Standard().")
    kernel = _Kernel(block_fn, params, x, context, key, gammas, reversal_probe, depth, batch)
    return backprop.run(update.stack_pass(kernel, train))


class _Kernel(NamedTuple):
    """``apply_stack``'s arguments as the passes an update picks from
    (``methods.StackKernel``)."""

    block_fn: BlockFn
    params: Any
    x: jax.Array
    context: Any
    key: jax.Array | None
    gammas: jax.Array | None
    reversal_probe: jax.Array | None
    depth: int
    batch: int

    def inference(self, frac_bits: int | None) -> _InferencePass:
        x = self.x
        spec = _spec(self.depth, x.dtype, frac_bits, None)
        block_keys, _ = _keys_and_gammas(self.key, None, self.depth, self.batch, 0.0, x.dtype,
                                         False)
        gammas = self.gammas
        if gammas is not None:
            gammas = _check_gammas(gammas, self.depth, self.batch, train=False).astype(x.dtype)
        _check_block_output(self.block_fn, self.params, x, self.context, block_keys)
        return _InferencePass(self.block_fn, spec, self.params, x, self.context, block_keys,
                              gammas)

    def training(self, update: BDIA) -> _TrainPass:
        x = self.x
        spec = _spec(self.depth, x.dtype, update.frac_bits, update.side_bits)
        block_keys, gammas = _keys_and_gammas(self.key, self.gammas, self.depth, self.batch,
                                              update.gamma, x.dtype, True)
        gammas = _check_gammas(gammas, self.depth, self.batch, train=True).astype(x.dtype)
        if spec.side_bits is not None:
            _check_train_gammas_values(gammas, update.gamma)
        _check_block_output(self.block_fn, self.params, x, self.context, block_keys)
        x0 = x if spec.frac_bits is None else fixed_point.quantize_ste(x, spec.frac_bits)
        probe = None if self.reversal_probe is None else jnp.asarray(self.reversal_probe,
                                                                      x.dtype)
        return _TrainPass(self.block_fn, spec, self.params, x0, self.context, block_keys,
                          gammas, probe)


def prepare_keys_and_gammas(key, depth: int, batch: int, gamma: float = 0.5,
                            dtype=jnp.float32):
    """The (block_keys [depth], gammas [depth-1, batch]) that a BDIA training pass derives
    from ``key``, for use with ``bdia_forward`` / ``bdia_invert`` / ``bdia_all_states``."""
    return _keys_and_gammas(key, None, depth, batch, gamma, dtype, True)
