"""The train state, the optimizer factory and the generic pure train step.

An experiment supplies ``loss_fn(model, batch, key) -> (loss, metrics)``: ``model`` is the
NNX module rebuilt from the state, ``batch`` a dict of arrays with a leading batch axis,
``key`` the step's PRNG key; ``loss`` a float32 scalar and ``metrics`` a dict of scalars
(the keys "overflow" and "nonfinite", when present, are read as the model's health flags).

The step splits the model with ``nnx.split(model, nnx.Param, ReversalProbe, ...)``,
differentiates with respect to the parameters AND the reversal probes, applies the optax
update to the parameters only, and reports the summed probe gradients as
"reversal_error" (0.0: every reversible stack rebuilt its states bit for bit).

Randomness: the step's key is ``fold_in(base_key, step)``, so a resumed run replays the same
stream. Bad steps: a non-finite loss or gradient (or a "nonfinite" flag from the model), and
a fixed-point range overflow reported by the engine (the "overflow" flag: the BDIA stream
left the grid's exact range, so the reversal and its gradient are no longer exact). Their
update is not applied (parameters and optimizer state keep their old values);
``num_nonfinite`` / ``num_overflow`` count them and ``first_nonfinite_step`` /
``first_overflow_step`` remember the first; with ``stop_on_nonfinite`` every later update is
held back too, so the host loop can stop with the state from just before the bad step. A
state therefore never contains a bad update, and never NaNs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx, struct

LossFn = Callable[[nnx.Module, dict, jax.Array], tuple[jax.Array, dict]]

OPTIMIZERS = ("adamw", "adam", "sgd", "lamb")
SCHEDULES = ("warmup_cosine", "warmup_constant")


def probe_type():
    """The reversal-probe variable type of ``bdia_jax.models``."""
    from bdia_jax.models import ReversalProbe

    return ReversalProbe


def split_model(model: nnx.Module):
    """``(graphdef, params, probes, rest)``: trainable parameters, reversal probes, the rest."""
    return nnx.split(model, nnx.Param, probe_type(), ...)


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; a pytree (checkpointed as a whole).

    step:                 int32 scalar, optimizer steps taken (= batches consumed).
    params:               nnx.State of nnx.Param leaves (float32).
    probes:               nnx.State of ReversalProbe scalars (always 0.0; only their
                          gradients are read).
    rest:                 nnx.State of every other variable of the model.
    opt_state:            optax state of ``params``.
    base_key:             uint32[2] raw PRNG key; step k uses ``fold_in(base_key, k)``.
    num_nonfinite:        int32 scalar, steps with a non-finite loss/gradient (held back).
    first_nonfinite_step: int32 scalar, the first such step, -1 if none.
    num_overflow:         int32 scalar, steps whose BDIA stack overflowed its fixed-point
                          range (held back).
    first_overflow_step:  int32 scalar, the first such step, -1 if none.
    """

    step: jax.Array
    params: Any
    probes: Any
    rest: Any
    opt_state: Any
    base_key: jax.Array
    num_nonfinite: jax.Array
    first_nonfinite_step: jax.Array
    num_overflow: jax.Array
    first_overflow_step: jax.Array


def create_train_state(model: nnx.Module, optimizer: optax.GradientTransformation,
                       base_key: jax.Array) -> tuple[nnx.GraphDef, TrainState]:
    """Split ``model`` and build its step-0 state. ``base_key``: a raw uint32[2] key."""
    graphdef, params, probes, rest = split_model(model)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        probes=probes,
        rest=rest,
        opt_state=optimizer.init(params),
        base_key=jnp.asarray(base_key, jnp.uint32),
        num_nonfinite=jnp.zeros((), jnp.int32),
        first_nonfinite_step=jnp.full((), -1, jnp.int32),
        num_overflow=jnp.zeros((), jnp.int32),
        first_overflow_step=jnp.full((), -1, jnp.int32),
    )
    return graphdef, state


def merge_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
    """The NNX module for ``state`` (e.g. for evaluation)."""
    return nnx.merge(graphdef, state.params, state.probes, state.rest)


def gathered(params, gather_params):
    """``params`` constrained to ``gather_params`` (inside a jitted step; see
    ``make_train_step``): under FSDP the weights are all-gathered once, so the
    batch-sharded activations keep their layout. None: unchanged."""
    if gather_params is None:
        return params
    return jax.lax.with_sharding_constraint(
        params, jax.tree_util.tree_map(lambda _: gather_params, params))


# --------------------------------------------------------------------------- optimizer


def validate_optim(optim: ml_collections.ConfigDict, checks, prefix: str = "optim") -> None:
    """Append problems with an optimizer config (see ``make_optimizer``) to ``checks``."""
    checks.one_of(optim.name, OPTIMIZERS, f"{prefix}.name")
    checks.one_of(optim.schedule, SCHEDULES, f"{prefix}.schedule")
    checks.positive(optim.learning_rate, f"{prefix}.learning_rate")
    checks.positive(optim.warmup_epochs, f"{prefix}.warmup_epochs", allow_zero=True)
    checks.positive(optim.end_learning_rate_factor, f"{prefix}.end_learning_rate_factor",
                    allow_zero=True)
    checks.positive(optim.weight_decay, f"{prefix}.weight_decay", allow_zero=True)
    checks.positive(optim.grad_clip_norm, f"{prefix}.grad_clip_norm", allow_zero=True)
    checks.require(0 <= optim.b1 < 1, f"{prefix}.b1", f"must be in [0, 1), got {optim.b1}")
    checks.require(0 <= optim.b2 < 1, f"{prefix}.b2", f"must be in [0, 1), got {optim.b2}")
    checks.positive(optim.eps, f"{prefix}.eps")
    checks.require(0 <= optim.momentum < 1, f"{prefix}.momentum",
                   f"must be in [0, 1), got {optim.momentum}")


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int,
                  steps_per_epoch: int) -> optax.Schedule:
    """Linear warmup from 0 over ``warmup_epochs``, then cosine decay to
    ``learning_rate * end_learning_rate_factor`` at ``total_steps`` (or constant)."""
    warmup = min(int(round(optim.warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))
    peak = optim.learning_rate
    if optim.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=warmup,
            decay_steps=max(total_steps, warmup + 1),
            end_value=peak * optim.end_learning_rate_factor,
        )
    if optim.schedule == "warmup_constant":
        if warmup == 0:
            return optax.constant_schedule(peak)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]
        )
    raise ValueError(f"unknown optim.schedule {optim.schedule!r}; use one of {SCHEDULES}.")


def _decay_mask(params):
    # Decay weight matrices only, not biases, norm scales or embeddings' 1-D parts.
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int, steps_per_epoch: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(optimizer, schedule)`` from an optimizer config.

    Fields: name ("adamw" | "adam" | "sgd" | "lamb"), schedule, learning_rate,
    warmup_epochs, end_learning_rate_factor, weight_decay (adamw/lamb/sgd; matrices only),
    b1, b2, eps, momentum (sgd), grad_clip_norm (0 disables clipping).
    """
    schedule = make_schedule(optim, total_steps, steps_per_epoch)
    if optim.name == "adamw":
        base = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay, mask=_decay_mask)
    elif optim.name == "adam":
        base = optax.adam(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps)
    elif optim.name == "lamb":
        base = optax.lamb(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                          weight_decay=optim.weight_decay, mask=_decay_mask)
    elif optim.name == "sgd":
        base = optax.chain(
            optax.add_decayed_weights(optim.weight_decay, mask=_decay_mask),
            optax.sgd(schedule, momentum=optim.momentum or None, nesterov=optim.momentum > 0),
        )
    else:
        raise ValueError(f"unknown optim.name {optim.name!r}; use one of {OPTIMIZERS}.")
    if optim.grad_clip_norm > 0:
        base = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), base)
    return base, schedule


# --------------------------------------------------------------------------- train step


def make_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn,
                    optimizer: optax.GradientTransformation, *,
                    schedule: optax.Schedule | None = None,
                    stop_on_nonfinite: bool = True,
                    gather_params=None):
    """The pure train step ``(state, batch) -> (state, metrics)``; jit it with
    ``donate_argnums=0`` (see ``compile_train_step``).

    metrics (float32/bool scalars): the loss_fn's metrics plus "loss", "grad_norm",
    "reversal_error" (summed probe gradients), "nonfinite" (non-finite loss, gradient or
    model values this step), "overflow" (the model's fixed-point range overflow flag, False
    when the loss_fn reports none), "skipped" (this step's update was held back),
    "learning_rate" (when ``schedule`` is given).

    With ``stop_on_nonfinite`` (the "stop" policy) every update after the first bad step is
    held back as well; otherwise ("skip") only the bad steps are.

    ``gather_params``: None, or a sharding (e.g. replicated) that the parameters are
    constrained to at the start of the step. With FSDP-sharded parameters this makes XLA
    all-gather the weights once per step (and reduce-scatter their gradients) instead of
    resharding the batch-sharded activations to follow the weights' layout.
    """
    probe = probe_type()

    def train_step(state: TrainState, batch: dict):
        key = jax.random.fold_in(state.base_key, state.step)

        def objective(params, probes):
            model = nnx.merge(graphdef, gathered(params, gather_params), probes, state.rest)
            loss, metrics = loss_fn(model, batch, key)
            _, _, _, rest = nnx.split(model, nnx.Param, probe, ...)
            return loss, (metrics, rest)

        (loss, (metrics, rest)), (grads, probe_grads) = jax.value_and_grad(
            objective, argnums=(0, 1), has_aux=True
        )(state.params, state.probes)

        grad_norm = optax.tree.norm(grads)
        nonfinite = ~jnp.isfinite(loss) | ~jnp.isfinite(grad_norm)
        if "nonfinite" in metrics:
            nonfinite = nonfinite | jnp.asarray(metrics["nonfinite"], bool)
        overflow = jnp.asarray(metrics.get("overflow", False), bool)
        bad = nonfinite | overflow
        seen_bad = (state.first_nonfinite_step >= 0) | (state.first_overflow_step >= 0)
        hold = bad | seen_bad if stop_on_nonfinite else bad

        def update(old):
            params, opt_state, _ = old
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, rest

        # A cond, not a select of old against new: with jnp.where the old moments stay live
        # beside the new ones, and XLA copies them for the whole step (docs/results.md).
        params, opt_state, rest = jax.lax.cond(
            hold, lambda old: old, update, (state.params, state.opt_state, state.rest))

        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            rest=rest,
            num_nonfinite=state.num_nonfinite + nonfinite.astype(jnp.int32),
            first_nonfinite_step=jnp.where(
                nonfinite & (state.first_nonfinite_step < 0), state.step,
                state.first_nonfinite_step),
            num_overflow=state.num_overflow + overflow.astype(jnp.int32),
            first_overflow_step=jnp.where(
                overflow & (state.first_overflow_step < 0), state.step,
                state.first_overflow_step),
        )
        reversal_error = sum(
            (jnp.asarray(g, jnp.float32) for g in jax.tree_util.tree_leaves(probe_grads)),
            jnp.zeros((), jnp.float32),
        )
        out = dict(metrics)
        out.update(loss=loss, grad_norm=grad_norm, reversal_error=reversal_error,
                   nonfinite=nonfinite, overflow=overflow, skipped=hold)
        if schedule is not None:
            out["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        return new_state, out

    return train_step


def state_shardings(state: TrainState, sharding) -> TrainState:
    """A pytree like ``state`` with ``sharding`` at every leaf (for jit/restore); a pytree
    of shardings (e.g. ``sharding.train_state_shardings``) is returned as it is."""
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda _: sharding, state)
    return sharding


def compile_train_step(train_step, state: TrainState, batch: dict, *, state_sharding,
                       batch_sharding, metrics_sharding):
    """AOT-compile ``train_step`` for these (sharded) argument shapes, donating the state.

    ``state_sharding``: one sharding for every leaf (replicated data parallelism) or a
    pytree of shardings like ``state`` (FSDP: ``sharding.train_state_shardings``).
    Returns the compiled executable (call it like the step; its ``memory_analysis()``
    describes the step's memory).
    """
    jitted = jax.jit(
        train_step,
        in_shardings=(state_shardings(state, state_sharding),
                      jax.tree_util.tree_map(lambda _: batch_sharding, batch)),
        out_shardings=(state_shardings(state, state_sharding), metrics_sharding),
        donate_argnums=0,
    )
    return jitted.lower(state, batch).compile()


def finite_and_fingerprint(tree) -> tuple[bool, int]:
    """``(every floating leaf finite, fingerprint)`` of ``tree``, computed on the devices.

    The fingerprint is a position-weighted uint32 sum of the raw bits of every leaf
    (sum over leaves i and elements j of bits_ij * (2j + 1) * c_i mod 2**32): any change
    of a single element changes it, and integer addition makes it independent of how the
    leaves are sharded. Checkpoints store it to detect corrupted files on restore.
    """
    from experiments.common.sharding import to_host

    leaves = [jnp.asarray(x) if not isinstance(x, jax.Array) else x
              for x in jax.tree_util.tree_leaves(tree)]
    if not leaves:
        return True, 0
    # One small program per leaf shape, reused by every leaf of that shape (a train state
    # repeats each parameter's shape in its Adam moments): one program over all the leaves
    # compiles a kernel per leaf, seconds of XLA for every new state structure.
    parts = to_host([_leaf_finite_and_sum(x, jnp.uint32((2654435761 * (i + 1)) % 2**32))
                     for i, x in enumerate(leaves)])
    return all(bool(f) for f, _ in parts), sum(int(t) for _, t in parts) % 2**32


def _uint32_words(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = jnp.dtype(x.dtype).itemsize * 8
    if bits == 64:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[bits]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _leaf_finite_and_sum(x, salt):
    """(x finite, or True for a non-float leaf; salt * sum_j bits_j * (2j + 1) mod 2**32)."""
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.floating) else True
    words = _uint32_words(x)
    weights = jnp.arange(words.size, dtype=jnp.uint32).reshape(words.shape) * 2 + 1
    return jnp.bool_(finite), jnp.sum(words * weights, dtype=jnp.uint32) * salt
