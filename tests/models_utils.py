"""Helpers shared by the model tests (tests/test_models_*.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from grad_utils import assert_bound_catches, assert_grads_close

from bdia_jax.models import ReversalProbe


def count_params(module) -> int:
    """Number of scalar parameters (nnx.Param leaves) of a module."""
    leaves = jax.tree_util.tree_leaves(nnx.state(module, nnx.Param))
    return sum(int(np.prod(a.shape)) for a in leaves)


def _train_grads_program(model, apply):
    """``(jitted run(params, probes) -> (outputs, aux, grads), params, probes)``."""
    graphdef, params, probes = nnx.split(model, nnx.Param, ReversalProbe)

    @jax.jit
    def run(params, probes):
        def loss(params, probes):
            out, aux = apply(nnx.merge(graphdef, params, probes))
            return jnp.mean(jnp.sin(out) * out), (out, aux)

        (_, (out, aux)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            params, probes)
        return out, aux, grads

    return run, params, probes


def train_grads(model, apply):
    """Jitted forward + gradients at train=True.

    ``apply(model) -> (outputs, aux)`` calls the model with train=True. The loss is a fixed
    nonlinear function of the outputs. Returns (outputs, aux, param grads, probe grads).
    """
    run, params, probes = _train_grads_program(model, apply)
    out, aux, (g_params, g_probes) = run(params, probes)
    return out, aux, g_params, g_probes


def lower_train_grads(model, apply):
    """``train_grads``'s program traced and lowered, not compiled (seconds cheaper): proves
    the gradient method accepts the model's inputs and state."""
    run, params, probes = _train_grads_program(model, apply)
    return run.lower(params, probes)


def train_grads_by_key(model, apply):
    """``train_grads`` with the PRNG key as an argument: ``apply(model, key)`` calls the
    model with train=True. Returns ``grads(key) -> (outputs, aux, param grads, probe
    grads)``, compiled once: the key is traced, so another key reuses the program."""
    graphdef, params, probes = nnx.split(model, nnx.Param, ReversalProbe)

    @jax.jit
    def run(params, probes, key):
        def loss(params, probes):
            out, aux = apply(nnx.merge(graphdef, params, probes), key)
            return jnp.mean(jnp.sin(out) * out), (out, aux)

        (_, (out, aux)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            params, probes)
        return out, aux, grads

    def grads(key):
        out, aux, (g_params, g_probes) = run(params, probes, key)
        return out, aux, g_params, g_probes

    return grads


def is_key_bias(path) -> bool:
    """Attention key biases: their true gradient is exactly zero (softmax is shift-invariant:
    the bias adds q·b to every logit of a row), so any method returns rounding noise there."""
    names = [getattr(p, "key", getattr(p, "name", None)) for p in path]
    return any(a == "key" and b == "bias" for a, b in zip(names, names[1:]))


def assert_model_grads_close(got, want, *, rtol):
    """``grad_utils.assert_grads_close`` (``rtol`` of each leaf's scale, derived by the caller:
    ``float_bounds.model_grad_rtol``) on every leaf but the attention key biases, whose true
    gradient is 0: in each of the two, each evaluation's rounding noise is within rtol / 2 of
    the largest gradient entry of the model. The comparison must be able to fail: the
    gradients scaled by 1 + 1e-3 are rejected."""
    scale = max(float(np.max(np.abs(leaf))) for leaf in jax.tree_util.tree_leaves(want))

    def main(path, leaf):
        return None if is_key_bias(path) else leaf

    assert_grads_close(jax.tree_util.tree_map_with_path(main, got),
                       jax.tree_util.tree_map_with_path(main, want), rtol=rtol)
    assert_bound_catches(jax.tree_util.tree_map_with_path(main, got),
                         jax.tree_util.tree_map_with_path(main, want), rtol=rtol)
    for tree in (got, want):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            if is_key_bias(path):
                assert float(np.max(np.abs(leaf))) <= rtol / 2 * scale, \
                    jax.tree_util.keystr(path)


def assert_all_params_get_gradients(grads):
    """Every parameter (but the key biases) has a nonzero gradient somewhere."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        assert is_key_bias(path) or np.any(np.asarray(leaf) != 0), jax.tree_util.keystr(path)


def probe_total(g_probes) -> float:
    """Sum of all reversal-probe gradients (the reversal error)."""
    return float(sum(jnp.sum(leaf) for leaf in jax.tree_util.tree_leaves(g_probes)))


def jitted(model, **static_kwargs):
    """``f(*args, **kwargs) -> model(*args, **kwargs, **static_kwargs)[0]``, jitted (one
    compile per input shape); args/kwargs are traced arrays, static_kwargs are fixed."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, args, kwargs):
        return nnx.merge(graphdef, state)(*args, **kwargs, **static_kwargs)[0]

    return lambda *args, **kwargs: run(state, args, kwargs)
