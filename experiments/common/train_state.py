"""The optimizer factory, the compiled train step and the state fingerprint of the harness.

The train step itself and its state are the library's (``bdia_jax.training``: ``TrainState``,
``init``, ``make_train_step``); this module builds the optax optimizer from a config's
``optim`` section, compiles the step ahead of time for the trainer's shardings (donating the
state), and fingerprints a state for the checkpoints.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from bdia_jax.training import TrainState

OPTIMIZERS = ("adamw", "adam", "sgd", "lamb")
SCHEDULES = ("warmup_cosine", "warmup_constant")


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


# --------------------------------------------------------------------------- compiling


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
