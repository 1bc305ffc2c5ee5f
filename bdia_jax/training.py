"""The train step for any Flax NNX model: a state pytree and pure functions, in optax's style.

    graphdef, state = training.init(model, optimizer, key)
    step = jax.jit(training.make_train_step(graphdef, loss_fn, optimizer), donate_argnums=0)
    state, metrics = step(state, batch)        # metrics["reversal_error"] == 0.0: bit-exact

``loss_fn(model, batch, key) -> (loss, metrics)``: ``model`` is the NNX module rebuilt from
the state, ``batch`` any pytree of arrays, ``key`` the step's raw uint32[2] PRNG key
(``fold_in(base_key, step)``, so a resumed run replays the same stream); ``loss`` a float32
scalar and ``metrics`` a dict of scalars. The metrics "overflow" and "nonfinite" (bool
scalars, e.g. the fields of the model's ``bdia_jax.StackStats``), when present, are the
model's health flags.

The model is split into the trainable parameters (the ``trainable`` filter, default every
``nnx.Param``), the reversal probes (``bdia_jax.models.ReversalProbe``) and the rest (frozen
parameters included). The step differentiates the loss with respect to the parameters and
the probes, applies the optimizer (any ``optax.GradientTransformation``) to the parameters,
and reports the summed probe gradients as "reversal_error" (0.0: every reversible stack
rebuilt its states bit for bit). Frozen parameters get neither gradients nor optimizer state.

Bad steps: a non-finite loss or gradient (or the "nonfinite" flag), and a fixed-point range
overflow (the "overflow" flag: the BDIA stream left the grid's exact range, so the reversal
and its gradient are no longer exact). Their update is not applied: the parameters, the
optimizer state and the rest keep their old values; ``num_nonfinite`` / ``num_overflow``
count them and ``first_nonfinite_step`` / ``first_overflow_step`` remember the first. With
``stop_on_nonfinite`` every later update is held as well, so a host loop can stop with the
state from just before the bad step. A state therefore never holds a bad update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from bdia_jax.models import ReversalProbe

LossFn = Callable[[nnx.Module, Any, jax.Array], tuple[jax.Array, dict]]


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; a pytree (checkpoint it as a whole).

    step:                 int32 scalar, optimizer steps taken (= batches consumed).
    params:               nnx.State of the trainable nnx.Param leaves.
    probes:               nnx.State of ReversalProbe float32 scalars (always 0.0; only their
                          gradients are read).
    rest:                 nnx.State of every other variable (frozen parameters included).
    opt_state:            the optimizer's state of ``params``.
    base_key:             uint32[2] raw PRNG key; step k uses ``fold_in(base_key, k)``.
    num_nonfinite:        int32 scalar, steps with a non-finite loss/gradient (held).
    first_nonfinite_step: int32 scalar, the first such step, -1 if none.
    num_overflow:         int32 scalar, steps whose BDIA stream overflowed its fixed-point
                          range (held).
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


def split(model: nnx.Module, trainable: nnx.filterlib.Filter = nnx.Param):
    """``(graphdef, params, probes, rest)``: the ``trainable`` parameters, the reversal
    probes, everything else. ``trainable`` must select ``nnx.Param`` variables only."""
    graphdef, params, probes, rest = nnx.split(model, trainable, ReversalProbe, ...)
    wrong = sorted({type(v).__name__ for v in jax.tree_util.tree_leaves(
        params, is_leaf=lambda x: isinstance(x, nnx.Variable)) if isinstance(v, nnx.Variable)
        and not isinstance(v, nnx.Param)})
    if wrong:
        raise ValueError(f"trainable= selects {wrong} variables; give a filter of nnx.Param "
                         "only, e.g. nnx.All(nnx.Param, nnx.PathContains('lora')).")
    return graphdef, params, probes, rest


def merge(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
    """The NNX module of ``state`` (e.g. for evaluation)."""
    return nnx.merge(graphdef, state.params, state.probes, state.rest)


def init(model: nnx.Module, optimizer: optax.GradientTransformation, key: jax.Array, *,
         trainable: nnx.filterlib.Filter = nnx.Param) -> tuple[nnx.GraphDef, TrainState]:
    """``(graphdef, step-0 state)`` of ``model``. ``key``: a raw uint32[2] key or a typed
    ``jax.random.key``; ``trainable``: the parameters to train (pass the same filter to
    ``make_train_step``); the others stay frozen."""
    graphdef, params, probes, rest = split(model, trainable)
    if not jax.tree_util.tree_leaves(params):
        raise ValueError("trainable= selects no parameter of the model; give a filter that "
                         "matches at least one nnx.Param (default: nnx.Param).")
    if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        probes=probes,
        rest=rest,
        opt_state=optimizer.init(params),
        base_key=jnp.asarray(key, jnp.uint32),
        num_nonfinite=jnp.zeros((), jnp.int32),
        first_nonfinite_step=jnp.full((), -1, jnp.int32),
        num_overflow=jnp.zeros((), jnp.int32),
        first_overflow_step=jnp.full((), -1, jnp.int32),
    )
    return graphdef, state


def gathered(params, gather_params):
    """``params`` constrained to the sharding ``gather_params`` inside a jitted function:
    under FSDP the weights are all-gathered once, so the batch-sharded activations keep
    their layout. None: unchanged."""
    if gather_params is None:
        return params
    return jax.lax.with_sharding_constraint(
        params, jax.tree_util.tree_map(lambda _: gather_params, params))


def make_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn,
                    optimizer: optax.GradientTransformation, *,
                    trainable: nnx.filterlib.Filter = nnx.Param,
                    schedule: optax.Schedule | None = None,
                    stop_on_nonfinite: bool = True,
                    gather_params=None) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
    """The pure step ``(state, batch) -> (state, metrics)``; jit it with ``donate_argnums=0``.

    metrics (float32/bool scalars): the loss_fn's metrics plus "loss", "grad_norm" (of the
    trainable parameters), "reversal_error" (summed probe gradients), "nonfinite", "overflow"
    (False when the loss_fn reports none), "skipped" (this step's update was held),
    "learning_rate" (when ``schedule`` is given).

    ``trainable``: the filter given to ``init``. ``stop_on_nonfinite``: hold every update
    after the first bad step too (else only the bad steps). ``gather_params``: None, or a
    sharding (e.g. replicated) the parameters are constrained to at the start of the step:
    with FSDP-sharded parameters XLA then all-gathers the weights once per step (and
    reduce-scatters their gradients) instead of resharding the activations.
    """

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(state.base_key, state.step)

        def objective(params, probes):
            model = nnx.merge(graphdef, gathered(params, gather_params), probes, state.rest)
            out = loss_fn(model, batch, key)
            if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
                raise ValueError("loss_fn must return (loss, metrics dict); return (loss, {}) "
                                 "when there are no metrics.")
            _, _, _, rest = nnx.split(model, trainable, ReversalProbe, ...)
            return out[0], (out[1], rest)

        (loss, (metrics, rest)), (grads, probe_grads) = jax.value_and_grad(
            objective, argnums=(0, 1), has_aux=True
        )(state.params, state.probes)
        if jax.tree_util.tree_structure(rest) != jax.tree_util.tree_structure(state.rest):
            raise ValueError("the model's variables differ from the state's: pass the same "
                             "trainable= to init and make_train_step.")

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

        # A loop of at most one trip, neither a select nor a cond: with jnp.where the old
        # moments stay live beside the new ones and XLA copies them; a cond's outputs get
        # buffers of their own (its hold branch returns its operands). A while loop's carry
        # is updated in place (docs/results.md, "the held update").
        _, (params, opt_state, rest) = jax.lax.while_loop(
            lambda carry: carry[0], lambda carry: (jnp.zeros((), bool), update(carry[1])),
            (~hold, (state.params, state.opt_state, state.rest)))

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
            (jnp.sum(jnp.asarray(g, jnp.float32)) for g in jax.tree_util.tree_leaves(probe_grads)),
            jnp.zeros((), jnp.float32),
        )
        out = dict(metrics)
        out.update(loss=loss, grad_norm=grad_norm, reversal_error=reversal_error,
                   nonfinite=nonfinite, overflow=overflow, skipped=hold)
        if schedule is not None:
            out["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        return new_state, out

    return train_step
