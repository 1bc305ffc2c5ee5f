"""One AdamW train step for any model of ``bdia_jax.models``, with its reversal probe read.

Used by the benchmarks that compile or time a step without the trainer
(``benchmarks.max_batch``, ``benchmarks.device_check``): the model is split into its
``nnx.Param`` state and its ``ReversalProbe`` state, the loss is differentiated with respect
to both, and the probe gradients are summed into the step's reversal error (0.0 when the
BDIA reversal is bit-exact; RevViT's is its floating-point reconstruction error).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from bdia_jax.models import ReversalProbe


def adamw() -> optax.GradientTransformation:
    """The benchmarks' optimizer: AdamW, lr 3e-4, weight decay 0.1 (two moments per
    parameter, like the paper's training)."""
    return optax.adamw(3e-4, weight_decay=0.1)


def split_model(model: nnx.Module):
    """``(graphdef, params, probes)``: ``nnx.split(model, nnx.Param, ReversalProbe)``."""
    return nnx.split(model, nnx.Param, ReversalProbe)


def make_train_step(graphdef, optimizer: optax.GradientTransformation,
                    loss_fn: Callable) -> Callable:
    """``step(params, probes, opt_state, batch, key) -> (params, opt_state, loss,
    reversal_error)``.

    ``loss_fn(model, batch, key) -> float32 scalar`` calls the merged model with
    ``train=True``. ``reversal_error`` is the float32 sum of the probe gradients. Jit it with
    ``donate_argnums=(0, 2)`` to update the parameters and optimizer state in place.
    """

    def step(params, probes, opt_state, batch, key):
        def objective(params, probes):
            return loss_fn(nnx.merge(graphdef, params, probes), batch, key)

        loss, (grads, probe_grads) = jax.value_and_grad(objective, argnums=(0, 1))(params,
                                                                                   probes)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        reversal_error = sum((jnp.sum(g) for g in jax.tree_util.tree_leaves(probe_grads)),
                             jnp.zeros((), jnp.float32))
        return optax.apply_updates(params, updates), opt_state, loss, reversal_error

    return step
