"""bdia_jax.training: the one train step (held updates, frozen parameters, reversal error)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from compile_only import compile_for_memory
from flax import nnx

from bdia_jax import BDIA, Reversible, training
from bdia_jax.models import ResidualStack, ReversalProbe


class Block(nnx.Module):
    """LayerNorm-free MLP residual branch; only nnx.Param state."""

    def __init__(self, rngs: nnx.Rngs, width: int = 8):
        self.up = nnx.Linear(width, 2 * width, rngs=rngs)
        self.down = nnx.Linear(2 * width, width, rngs=rngs)

    def __call__(self, x, context, key):
        return self.down(jnp.tanh(self.up(x)))


class Model(nnx.Module):
    """A BDIA stack of ``depth`` blocks and a linear head."""

    def __init__(self, rngs: nnx.Rngs, width: int = 8, depth: int = 4):
        self.stack = ResidualStack(lambda rngs: Block(rngs, width), depth=depth,
                                   update=BDIA(gamma=0.5, frac_bits=9), backprop=Reversible(),
                                   rngs=rngs)
        self.head = nnx.Linear(width, 1, rngs=rngs)

    def __call__(self, x, key):
        y, stats = self.stack(x, key=key, train=True)
        return self.head(y), stats


def loss_fn(model, batch, key):
    out, stats = model(batch["x"], key)
    loss = jnp.mean(out**2) * batch["scale"]
    return loss, {"overflow": stats.overflow, "nonfinite": stats.nonfinite}


def batch(scale=1.0, magnitude=1.0):
    x = jax.random.normal(jax.random.key(0), (4, 3, 8)) * magnitude
    return {"x": x, "scale": jnp.float32(scale)}


def setup(stop_on_nonfinite=True, trainable=nnx.Param):
    optimizer = optax.adam(1e-2)
    graphdef, state = training.init(Model(nnx.Rngs(0)), optimizer, jax.random.key(1),
                                    trainable=trainable)
    step = training.make_train_step(graphdef, loss_fn, optimizer, trainable=trainable,
                                    stop_on_nonfinite=stop_on_nonfinite)
    return jax.jit(step), state


def test_a_bdia_step_trains_with_zero_reversal_error():
    step, state = setup()
    new, metrics = step(state, batch())
    assert float(metrics["reversal_error"]) == 0.0
    assert not bool(metrics["skipped"]) and int(new.step) == 1
    changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), new.params,
                                     state.params)
    assert all(jax.tree_util.tree_leaves(changed))  # every trainable parameter moved


@pytest.mark.parametrize("bad, counter", [
    (dict(scale=float("nan")), "num_nonfinite"),
    (dict(magnitude=1e6), "num_overflow"),  # past the grid's exact range 2**15 at l = 9
])
def test_a_bad_step_holds_the_update(bad, counter):
    step, state = setup(stop_on_nonfinite=False)
    held, metrics = step(state, batch(**bad))
    assert bool(metrics["skipped"])
    chex.assert_trees_all_equal((held.params, held.opt_state, held.rest),
                                (state.params, state.opt_state, state.rest))
    assert int(getattr(held, counter)) == 1 and int(held.step) == 1
    first = counter.replace("num_", "first_") + "_step"
    assert int(getattr(held, first)) == 0
    # "skip": the next good step updates again; "stop" (default) holds it too.
    resumed, metrics = step(held, batch())
    assert not bool(metrics["skipped"])
    assert not jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: bool(jnp.all(a == b)), resumed.params, held.params))
    stop_step, stop_state = setup(stop_on_nonfinite=True)
    stopped, _ = stop_step(stop_state, batch(**bad))
    still, metrics = stop_step(stopped, batch())
    assert bool(metrics["skipped"])
    chex.assert_trees_all_equal(still.params, stop_state.params)


HEAD_ONLY = nnx.All(nnx.Param, nnx.PathContains("head"))


def test_frozen_parameters_keep_their_bits_and_get_no_optimizer_state():
    step, state = setup(trainable=HEAD_ONLY)
    assert {path for path, _ in nnx.to_flat_state(state.params)} == {("head", "bias"),
                                                                      ("head", "kernel")}
    new, metrics = step(state, batch())
    assert float(metrics["reversal_error"]) == 0.0
    chex.assert_trees_all_equal(new.rest, state.rest)  # the frozen stack, bit for bit
    assert not bool(jnp.all(new.params["head"]["kernel"][...]
                            == state.params["head"]["kernel"][...]))
    opt_leaves = jax.tree_util.tree_leaves(state.opt_state)
    param_size = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
    assert sum(x.size for x in opt_leaves) == 2 * param_size + 1  # mu, nu of the head, count


def _compiled_memory(trainable, width):
    optimizer = optax.adam(1e-2)
    model = nnx.eval_shape(lambda: Model(nnx.Rngs(0), width=width, depth=4))
    graphdef = training.split(model, trainable)[0]
    state = jax.eval_shape(lambda: training.init(Model(nnx.Rngs(0), width=width, depth=4),
                                                 optimizer, jax.random.key(1),
                                                 trainable=trainable)[1])
    step = training.make_train_step(graphdef, loss_fn, optimizer, trainable=trainable)
    inputs = {"x": jax.ShapeDtypeStruct((2, 3, width), jnp.float32),
              "scale": jax.ShapeDtypeStruct((), jnp.float32)}
    analysis = compile_for_memory(
        jax.jit(step, donate_argnums=0).lower(state, inputs)).memory_analysis()
    frozen = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state.rest)
                 if x.dtype == jnp.float32)
    return analysis, frozen


def test_frozen_parameters_free_their_gradient_and_optimizer_memory():
    """Compiled memory with every parameter trained against the head only: the arguments
    lose exactly the frozen parameters' two Adam moments, and the temporaries lose at least
    their gradients (the stack's weights dominate: width 128, 4 blocks)."""
    full, _ = _compiled_memory(nnx.Param, 128)
    head, frozen_bytes = _compiled_memory(HEAD_ONLY, 128)
    assert frozen_bytes > 100_000
    assert full.argument_size_in_bytes - head.argument_size_in_bytes == 2 * frozen_bytes
    assert full.temp_size_in_bytes - head.temp_size_in_bytes >= frozen_bytes


class WideMLP(nnx.Module):
    """Two 512 x 512 layers: parameters dominate the step's memory, activations are tiny."""

    def __init__(self, rngs: nnx.Rngs):
        self.a = nnx.Linear(512, 512, rngs=rngs)
        self.b = nnx.Linear(512, 512, rngs=rngs)

    def __call__(self, x):
        return self.b(jax.nn.relu(self.a(x)))


def test_the_held_update_writes_the_state_in_place():
    """The update's temporaries are the gradients plus small change, not copies of the
    parameters and moments: the hold used to be a lax.cond, whose outputs got buffers of their
    own beside the donated state (4x the parameters' bytes; a plain AdamW step 0.5x). Bound:
    the gradients (1x) and half of that again for XLA's scratch."""
    optimizer = optax.adamw(1e-3, weight_decay=0.1)
    graphdef, state = training.init(WideMLP(nnx.Rngs(0)), optimizer, jax.random.key(0))
    step = training.make_train_step(
        graphdef, lambda model, x, key: (jnp.mean(model(x) ** 2), {}), optimizer)
    analysis = compile_for_memory(jax.jit(step, donate_argnums=0).lower(
        state, jnp.ones((8, 512), jnp.float32))).memory_analysis()
    param_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state.params))
    assert analysis.temp_size_in_bytes <= 1.5 * param_bytes, (
        analysis.temp_size_in_bytes / param_bytes)


def test_bad_filters_fail_loudly():
    optimizer = optax.adam(1e-2)
    with pytest.raises(ValueError, match="selects no parameter"):
        training.init(Model(nnx.Rngs(0)), optimizer, jax.random.key(1),
                      trainable=nnx.PathContains("nothing"))
    with pytest.raises(ValueError, match="nnx.Param only"):
        training.init(Model(nnx.Rngs(0)), optimizer, jax.random.key(1),
                      trainable=nnx.Any(nnx.Param, ReversalProbe))  # the probes are not trained
    graphdef, state = training.init(Model(nnx.Rngs(0)), optimizer, jax.random.key(1),
                                    trainable=HEAD_ONLY)
    step = training.make_train_step(graphdef, loss_fn, optimizer)  # trainable= forgotten
    with pytest.raises(ValueError, match="same trainable="):
        jax.jit(step)(state, batch())


def test_the_step_key_is_folded_from_the_state():
    """Two states one step apart draw different keys; the same state the same key."""
    seen = []

    def keyed_loss(model, batch, key):
        loss, metrics = loss_fn(model, batch, key)
        return loss, {**metrics, "key_word": (key[0] % 65536).astype(jnp.float32)}

    optimizer = optax.sgd(0.0)
    graphdef, state = training.init(Model(nnx.Rngs(0)), optimizer, jax.random.key(1))
    step = jax.jit(training.make_train_step(graphdef, keyed_loss, optimizer))
    for _ in range(2):
        _, metrics = step(state, batch())
        seen.append(float(metrics["key_word"]))
    state, _ = step(state, batch())
    seen.append(float(step(state, batch())[1]["key_word"]))
    assert seen[0] == seen[1] != seen[2]
    np.testing.assert_array_equal(
        jax.random.key_data(jax.random.fold_in(jax.random.key(1), 0)),
        jax.random.fold_in(state.base_key, 0))
