"""RevViT and the two-stream reversible engine (bdia_jax.revnet): gradients against autodiff
through the same forward, the reversal error (reported, small, not zero in float32),
inverse round trips, config errors, shapes, and a few training steps."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from compile_only import compile_for_memory
from flax import nnx
from float_bounds import (
    ELEMENTWISE_ULPS,
    U,
    gradient_chain,
    gradient_rtol,
    model_grad_rtol,
    transformer_chain,
)
from grad_utils import assert_bound_catches, assert_grads_close
from models_utils import count_params, is_key_bias, probe_total, train_grads

from bdia_jax import Autodiff, Remat, Reversible, revnet
from bdia_jax.models import (
    LoRA,
    ReversalProbe,
    RevViT,
    RevViTConfig,
    ViT,
    revvit_config,
    vit_config,
)
from bdia_jax.models.layers import BlockSettings

DEPTH, WIDTH = 6, 16
# RevViT's default: each sub-block's output from its VJP, as the authors' code.
SHARED = Reversible(recompute="shared")


# ----------------------------------------------------------------------------- engine


def f_fn(p, x, key):
    """A toy F with dropout (Lipschitz ~2, so rebuild errors grow through the blocks)."""
    y = jnp.tanh(x @ p["wf"])
    if key is not None:
        y = jnp.where(jax.random.bernoulli(key, 0.8, y.shape), y / 0.8, 0.0)
    return y


def g_fn(p, y, key):
    del key
    return jnp.sin(y @ p["wg"] + p["bg"])


def toy(dtype=jnp.float32):
    """Depth-stacked toy parameters and two input streams [4, WIDTH] (numpy RNG: no
    compiles)."""
    rng = np.random.default_rng(0)
    scale = 2.0 / np.sqrt(WIDTH)
    params = {"wf": rng.normal(size=(DEPTH, WIDTH, WIDTH)) * scale,
              "wg": rng.normal(size=(DEPTH, WIDTH, WIDTH)) * scale,
              "bg": rng.normal(size=(DEPTH, WIDTH))}
    x1, x2 = rng.normal(size=(2, 4, WIDTH))
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), (params, x1, x2))


def rebuild_grad_rtol(params, probe, u=U) -> float:
    """rtol (of each leaf's scale) between the reversible and the autodiff gradients of
    ``engine_grads``: the two round differently, and the reversible one evaluates each
    sub-block's VJP at rebuilt inputs that are off by up to the probe's reversal error E (the
    largest |rebuilt - forward|, at the inputs, where the rebuild ends).

    Rounding: per sub-block a WIDTH contraction, its nonlinearity, dropout and bias, and the
    stream's add (its inverse's subtraction), over 2 DEPTH sub-blocks, forward and transposed,
    and the sum over the 4 rows (``float_bounds.gradient_rtol``). The rebuild: in a sub-block's
    gradient terms x^T (c * φ'(x W)) (activations O(1), the chain's convention) an input error
    e moves x by e and φ'(x W) by at most |φ''| |e W| <= E max_k ||W_k||_1 (|tanh''|, |sin''| <=
    1), each a relative change of the leaf's terms; the 2 DEPTH sub-blocks' changes add up
    along the cotangent: 2 DEPTH E (1 + max ||W||_1) (||.||_1 the largest column sum).
    u: the unit roundoff of the dtype (2**-53 in float64)."""
    chain = 2 * DEPTH * (WIDTH + ELEMENTWISE_ULPS + 3)
    column_sums = max(float(np.max(np.sum(np.abs(np.asarray(params[w], np.float64)), -2)))
                      for w in ("wf", "wg"))
    return (gradient_rtol(gradient_chain(chain, positions=4), u=u)
            + 2 * DEPTH * float(probe) * (1 + column_sums))


def engine_grads(params, x1, x2, backprop, key=jax.random.key(7)):
    """(param grads, x1 grad, x2 grad, probe grad) of a fixed nonlinear loss (the probe's
    gradient is 0 where the method reads no probe)."""

    def loss(params, x1, x2, probe):
        (y1, y2), _ = revnet.revnet_stack(
            f_fn, g_fn, params, x1, x2, key=key, backprop=backprop,
            reversal_probe=probe if backprop.reversal_probe else None)
        return jnp.sum(jnp.sin(y1) * y2)

    probe = jnp.zeros((), x1.dtype)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(params, x1, x2, probe)


def round_trip_error(params, x1, x2, key=jax.random.key(7)):
    """max |revnet_inverse(revnet_forward(x)) - x| over both streams."""

    @jax.jit
    def run(params, x1, x2, keys):
        y1, y2 = revnet.revnet_forward(f_fn, g_fn, params, x1, x2, keys)
        r1, r2 = revnet.revnet_inverse(f_fn, g_fn, params, y1, y2, keys)
        return jnp.maximum(jnp.max(jnp.abs(r1 - x1)), jnp.max(jnp.abs(r2 - x2)))

    return float(run(params, x1, x2, revnet.block_keys(key, DEPTH)))


def test_engine_round_trip_is_close_but_not_exact_in_float32():
    params, x1, x2 = toy()
    error = round_trip_error(params, x1, x2)
    # Rounding makes (a + b) - b != a: the reversal is inexact, and the test says so.
    # 1e-4: a sanity ceiling, not a rounding bound (its worst case grows as the blocks'
    # Lipschitz constants to the depth); a broken inverse errs by O(1) (wrong keys: > 1e-2).
    assert 0.0 < error < 1e-4, error


def test_engine_round_trip_error_shrinks_in_float64():
    error32 = round_trip_error(*toy(jnp.float32))
    with jax.enable_x64(True):
        error64 = round_trip_error(*toy(jnp.float64))
    # The unit roundoffs' ratio is 2**-29 (~2e-9): rounding errors scale with it; 1e-6 leaves
    # the float64 error's constant a wide margin, and an error that is not rounding (a wrong
    # inverse) would not shrink at all.
    assert error64 < 1e-6 * error32, (error32, error64)


def test_engine_inverse_with_wrong_keys_does_not_round_trip():
    params, x1, x2 = toy()
    keys = revnet.block_keys(jax.random.key(7), DEPTH)
    y1, y2 = revnet.revnet_forward(f_fn, g_fn, params, x1, x2, keys)
    other = revnet.block_keys(jax.random.key(8), DEPTH)
    r1, _ = revnet.revnet_inverse(f_fn, g_fn, params, y1, y2, other)
    assert float(jnp.max(jnp.abs(r1 - x1))) > 1e-2  # dropout masks must be replayed


def test_engine_reversible_grads_match_autodiff_and_report_the_error():
    params, x1, x2 = toy()
    *auto, probe_auto = engine_grads(params, x1, x2, Autodiff())
    assert float(probe_auto) == 0.0  # nothing is rebuilt under autodiff
    for method in (SHARED, Reversible(recompute="separate")):
        *rev, probe = engine_grads(params, x1, x2, method)
        # The probe's gradient is the rebuild error of the input streams: > 0, small (the
        # round trip's sanity ceiling).
        assert np.isfinite(float(probe)) and 0.0 < float(probe) < 1e-4, (method, probe)
        rtol = rebuild_grad_rtol(params, probe)
        assert_grads_close(rev, auto, rtol=rtol)
        # A 1% error in any gradient is caught (the bound carries the float32 rebuild's
        # error, so a finer one is the float64 test's to catch).
        assert_bound_catches(rev, auto, rtol=rtol, perturbation=1e-2)


def test_engine_remat_is_autodiff_with_each_block_recomputed():
    """Remat wraps each block's call in jax.checkpoint: the same forward and, recomputing
    the same ops, the same gradient bits as Autodiff."""
    params, x1, x2 = toy()
    chex.assert_trees_all_equal(engine_grads(params, x1, x2, Remat()),
                                engine_grads(params, x1, x2, Autodiff()))


def test_engine_probe_is_the_round_trip_error_bit_for_bit_op_by_op():
    """The probe reports the rebuild's own error: run op by op (every op its own kernel, so
    the VJP's rebuild does the same float operations as revnet_inverse), it equals the
    round trip's error exactly. (Two jitted programs fuse differently and round apart.)"""
    params, x1, x2 = toy()
    with jax.disable_jit():
        *_, probe = engine_grads(params, x1, x2, SHARED)
        error = round_trip_error(params, x1, x2)
    assert 0.0 < error < 1e-4, error  # the round trip's sanity ceiling (above)
    assert float(probe) == error


def test_engine_reversible_grads_match_autodiff_tightly_in_float64():
    with jax.enable_x64(True):
        params, x1, x2 = toy(jnp.float64)
        *rev, probe = engine_grads(params, x1, x2, SHARED)
        *auto, _ = engine_grads(params, x1, x2, Autodiff())
        assert float(probe) < 1e-10  # the float32 ceiling (1e-4) times 2**-29, with margin
        rtol = rebuild_grad_rtol(params, probe, u=2.0**-53)
        assert_grads_close(rev, auto, rtol=rtol)
        assert_bound_catches(rev, auto, rtol=rtol, perturbation=1e-9)


def test_engine_outputs_equal_the_plain_forward():
    params, x1, x2 = toy()
    key = jax.random.key(7)
    want = revnet.revnet_forward(f_fn, g_fn, params, x1, x2, revnet.block_keys(key, DEPTH))
    for backprop in (Reversible(reversal_probe=False), Autodiff(), Remat()):
        got, max_abs = revnet.revnet_stack(f_fn, g_fn, params, x1, x2, key=key,
                                           backprop=backprop)
        chex.assert_trees_all_equal(got, want)
        assert float(max_abs) >= float(jnp.max(jnp.abs(jnp.stack(want))))


def test_engine_reversible_memory_is_constant_in_depth():
    """Only the final streams are kept: the compiled gradient's scratch memory does not grow
    with depth under "reversible", and grows by stored activations under "autodiff"."""
    batch = 4096  # activations dominate the [depth, 16, 16] parameters
    stream_bytes = batch * WIDTH * 4

    def temp_bytes(depth, backprop):
        rng = np.random.default_rng(0)
        params = {"wf": jnp.asarray(rng.normal(size=(depth, WIDTH, WIDTH)), jnp.float32),
                  "wg": jnp.asarray(rng.normal(size=(depth, WIDTH, WIDTH)), jnp.float32),
                  "bg": jnp.zeros((depth, WIDTH), jnp.float32)}
        x = jnp.ones((batch, WIDTH), jnp.float32)

        def loss(params, x):
            (y1, y2), _ = revnet.revnet_stack(f_fn, g_fn, params, x, x,
                                              key=jax.random.key(0), backprop=backprop)
            return jnp.sum(y1 * y2)

        compiled = compile_for_memory(jax.jit(jax.grad(loss)).lower(params, x))
        return compiled.memory_analysis().temp_size_in_bytes

    rev = Reversible(recompute="shared", reversal_probe=False)
    rev_growth = temp_bytes(16, rev) - temp_bytes(2, rev)
    auto_growth = temp_bytes(16, Autodiff()) - temp_bytes(2, Autodiff())
    assert rev_growth < stream_bytes, rev_growth
    assert auto_growth > 14 * stream_bytes, auto_growth


@pytest.mark.parametrize("call, match", [
    (lambda p, a, b: revnet.revnet_stack(f_fn, g_fn, p, a, b, backprop="reversible"),
     "backprop must be bdia_jax.Autodiff"),
    (lambda p, a, b: revnet.revnet_stack(f_fn, g_fn, p, a, b, backprop=SHARED),
     "pass reversal_probe=jnp.zeros"),
    (lambda p, a, b: revnet.revnet_stack(f_fn, g_fn, p, a, b, backprop=Autodiff(),
                                         reversal_probe=jnp.zeros(())),
     "drop reversal_probe"),
    (lambda p, a, b: revnet.revnet_stack(f_fn, g_fn, p, a, b[:, :8], backprop=Autodiff()),
     "the two streams must have one shape"),
    (lambda p, a, b: revnet.revnet_stack(lambda q, x, k: x[:, :3], g_fn, p, a, b,
                                         backprop=Autodiff()),
     "f_fn must return one array"),
    (lambda p, a, b: revnet.revnet_stack(f_fn, g_fn, {**p, "bg": p["bg"][:2]}, a, b,
                                         backprop=Autodiff()),
     "same leading depth axis"),
    (lambda p, a, b: revnet.revnet_inverse(f_fn, g_fn, {}, a, b),
     "params has no array leaves"),
])
def test_engine_errors_are_one_line(call, match):
    params, x1, x2 = toy()
    with pytest.raises(ValueError, match=match) as err:
        call(params, x1, x2)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- model


def images(batch=3, size=32, seed=1):
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)


def revvit_param_count(c: RevViTConfig) -> int:
    """ViT-sized blocks; the final LayerNorm and the head see both streams (2·width)."""
    d, m = c.width, c.mlp_dim
    patch = c.patch_size**2 * c.channels * d + d
    tokens = c.num_patches + (1 if c.pool == "cls" else 0)
    cls = d if c.pool == "cls" else 0
    block = (2 * d) + 4 * (d * d + d) + (2 * d) + (d * m + m) + (m * d + d)
    head = 2 * (2 * d) + 2 * d * c.num_classes + c.num_classes
    return patch + cls + tokens * d + c.depth * block + head


def model_rebuild_grad_rtol(model, images, key, probe) -> float:
    """rtol (of each leaf's scale) between a RevViT's reversible and autodiff parameter
    gradients (train_grads' loss): the rounding of the two gradient evaluations
    (``float_bounds.model_grad_rtol`` of the blocks' ``transformer_chain``), plus the rebuild:
    the reversible pass evaluates each sub-block's VJP at inputs off by up to the probe's
    error E (largest at the stack's inputs, where the rebuild ends).

    Rebuild, to first order in E, per sub-block (LayerNorm → attention or MLP): LayerNorm's
    normalised output n = (x - mean) / σ moves by at most A E, A = (2 + m) / σ (m = max|n|;
    the mean's change is <= E and σ's <= E), and its Jacobian P / σ (P = I - 11^T/d -
    n n^T/d) by a relative (1 + m) A E + E / σ: LayerNorm's second derivative (1/σ² against
    its Jacobian's 1/σ), so σ is taken at its smallest over the forward's sub-block inputs
    (the rows of Σ|n_j| / d <= 1 and ||P|| >= 1 give the constants). After the
    LayerNorm (scale s) the inner function's gradient terms change, as in
    ``rebuild_grad_rtol``, by a relative max|s| A E (1 + max ||W||_1) (activations O(1),
    |softmax''|, |gelu''| <= 1). The 2 depth sub-blocks' changes add up along the cotangent.
    Evaluated from the model's own forward (the one ``train_grads`` ran: same key)."""
    c = model.config
    f_fn, g_fn, params = model.stack.sub_block_fns()
    keys = revnet.block_keys(jax.random.fold_in(key, 0), c.depth)
    x1 = x2 = model.embed(images, jax.random.fold_in(key, 1))
    inputs = []  # each sub-block's input (LayerNorm's), in the forward's order
    for k in range(c.depth):
        params_k = jax.tree_util.tree_map(lambda a, k=k: a[k], params)
        kf, kg = jax.random.split(keys[k])  # revnet's per-sub-block keys
        inputs.append(x2)
        x1 = x1 + f_fn(params_k, x2, kf)
        inputs.append(x1)
        x2 = x2 + g_fn(params_k, x1, kg)
    centred = [np.asarray(v, np.float64) - np.mean(np.asarray(v, np.float64), -1, keepdims=True)
               for v in inputs]
    sigmas = [np.sqrt(np.mean(v**2, -1, keepdims=True)) for v in centred]
    sigma = min(float(s.min()) for s in sigmas)
    m = max(float(np.max(np.abs(v / s))) for v, s in zip(centred, sigmas))
    leaves = jax.tree_util.tree_leaves_with_path(params)
    column_sums = max(float(np.max(np.sum(np.abs(np.asarray(a, np.float64)), -2)))
                      for _, a in leaves if a.ndim == 3)
    ln_scale = max(float(np.max(np.abs(np.asarray(a)))) for p, a in leaves
                   if "ln" in jax.tree_util.keystr(p) and "scale" in jax.tree_util.keystr(p))
    a = (2 + m) / sigma
    per_sub_block = probe * ((1 + m) * a + 1 / sigma + ln_scale * a * (1 + column_sums))
    tokens = c.num_patches + (1 if c.pool == "cls" else 0)
    chain = transformer_chain(width=c.width, mlp_dim=c.mlp_dim, seq=tokens, depth=c.depth,
                              heads=c.num_heads) + 2 * c.depth  # the streams' adds
    return (model_grad_rtol(chain, positions=images.shape[0] * tokens)
            + 2 * c.depth * per_sub_block)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_revvit_shapes_aux_and_param_count(pool):
    config = revvit_config("paper", pool=pool)
    model = nnx.eval_shape(lambda: RevViT(config, rngs=nnx.Rngs(0)))
    assert count_params(model) == revvit_param_count(config)
    # Same blocks as the ViT of this size: only the head differs (2·width inputs).
    vit = nnx.eval_shape(lambda: ViT(vit_config("paper", pool=pool), rngs=nnx.Rngs(0)))
    head_extra = 2 * config.width + config.width * config.num_classes
    assert count_params(model) == count_params(vit) + head_extra
    logits, aux = nnx.eval_shape(lambda m: m(jnp.zeros((2, 32, 32, 3))), model)
    _, vit_aux = nnx.eval_shape(lambda m: m(jnp.zeros((2, 32, 32, 3))), vit)
    assert logits.shape == (2, config.num_classes) and logits.dtype == jnp.float32
    assert set(aux) == set(vit_aux)
    assert all(v.shape == () for v in aux.values())


def test_revvit_reversible_grads_match_autodiff_and_report_the_error():
    """The judged test: reversible gradients = autodiff through the same two-stream forward
    (float tolerance), and the reversal error is reported by the probe (> 0, small)."""
    settings = dict(depth=3, dropout=0.1, attention_dropout=0.1)
    rev = RevViT(revvit_config("tiny", **settings), rngs=nnx.Rngs(0))
    auto = RevViT(revvit_config("tiny", backprop="autodiff", **settings), rngs=nnx.Rngs(0))
    x, key = images(), jax.random.key(5)
    out_r, aux_r, g_rev, p_rev = train_grads(rev, lambda m: m(x, key=key, train=True))
    out_a, _, g_auto, p_auto = train_grads(auto, lambda m: m(x, key=key, train=True))
    chex.assert_trees_all_equal(out_r, out_a)  # one forward pass, two gradient methods

    def without_key_biases(tree):  # their true gradient is 0: both return rounding noise
        return jax.tree_util.tree_map_with_path(lambda p, g: None if is_key_bias(p) else g,
                                                tree)

    error = probe_total(p_rev)
    # A sanity ceiling, as the round trip's; the gradient bound below scales with it.
    assert np.isfinite(error) and 0.0 < error < 1e-3, error
    rtol = model_rebuild_grad_rtol(rev, x, key, error)
    assert_grads_close(without_key_biases(g_rev), without_key_biases(g_auto), rtol=rtol)
    # A 1% error in any gradient is caught (the bound carries the float32 rebuild's error).
    assert_bound_catches(without_key_biases(g_rev), without_key_biases(g_auto), rtol=rtol,
                         perturbation=1e-2)
    assert probe_total(p_auto) == 0.0
    assert not bool(aux_r["nonfinite"]) and not bool(aux_r["overflow"])
    assert 0.0 < float(aux_r["max_abs"]) < 1e3


def test_revvit_stack_round_trip_on_the_model_blocks():
    model = RevViT(revvit_config("tiny", depth=3), rngs=nnx.Rngs(0))
    f, g, params = model.stack.sub_block_fns()
    assert all(leaf.shape[0] == 3 for leaf in jax.tree_util.tree_leaves(params))
    kernel = model.stack.blocks.mlp.fc1.kernel[...]
    assert not np.allclose(kernel[0], kernel[1])  # independent initialisation per block
    probes = jax.tree_util.tree_leaves(nnx.state(model, ReversalProbe))
    assert len(probes) == 1 and float(probes[0]) == 0.0
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, params, x_images):
        x = nnx.merge(graphdef, state).embed(x_images)
        y1, y2 = revnet.revnet_forward(f, g, params, x, x)
        r1, r2 = revnet.revnet_inverse(f, g, params, y1, y2)
        return jnp.maximum(jnp.max(jnp.abs(r1 - x)), jnp.max(jnp.abs(r2 - x)))

    error = float(run(state, params, images()))
    # 1e-4: a sanity ceiling, not a rounding bound (its worst case grows as the blocks'
    # Lipschitz constants to the depth); a broken inverse errs by O(1) (wrong keys: > 1e-2).
    assert 0.0 < error < 1e-4, error


def test_revvit_inference_needs_no_key_and_train_with_dropout_does():
    model = RevViT(revvit_config("tiny", dropout=0.1), rngs=nnx.Rngs(0))
    x = images(batch=2)
    chex.assert_trees_all_equal(model(x)[0], model(x, key=jax.random.key(1))[0])
    with pytest.raises(ValueError, match="needs a PRNG `key`"):
        model(x, train=True)


@pytest.mark.parametrize("overrides, match", [
    (dict(patch_size=5), "must be a multiple of patch_size"),
    (dict(pool="max"), "pool must be 'cls' or 'mean'"),
    (dict(num_heads=3), "must be divisible by num_heads"),
    (dict(backprop="checkpoint"), "backprop must be one of"),
    (dict(backprop="reversible", recompute="twice"), "recompute must be one of"),
    (dict(recompute="shared"), "needs backprop="),
    (dict(backprop=Remat(), recompute="shared"), "not both"),
    (dict(depth=0), "depth must be an int >= 1"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(compute_dtype="int8"), "compute_dtype must be"),
])
def test_revvit_config_errors_are_one_line(overrides, match):
    with pytest.raises(ValueError, match=match) as err:
        revvit_config("tiny", **overrides)
    assert "\n" not in str(err.value)


def test_revvit_config_variant_errors():
    with pytest.raises(ValueError, match="unknown RevViT variant"):
        revvit_config("huge")
    with pytest.raises(ValueError, match="unknown RevViTConfig fields"):
        revvit_config("tiny", update="bdia")


def test_revvit_trains_and_reads_the_probe_like_the_trainer():
    """A few optax steps on one batch: the loss falls, and the probe gradient (read as the
    trainer reads it: value_and_grad w.r.t. Param and ReversalProbe) is the reversal error."""
    model = RevViT(revvit_config("tiny", dropout=0.0, attention_dropout=0.0),
                   rngs=nnx.Rngs(0))
    graphdef, params, probes = nnx.split(model, nnx.Param, ReversalProbe)
    x = images(batch=8)
    labels = jnp.arange(8) % 10
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, key):
        def loss_fn(params, probes):
            logits, _ = nnx.merge(graphdef, params, probes)(x, key=key, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, (grads, probe_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params,
                                                                                 probes)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        error = sum(jnp.sum(g) for g in jax.tree_util.tree_leaves(probe_grads))
        return optax.apply_updates(params, updates), opt_state, loss, error

    losses, errors = [], []
    for i in range(8):
        params, opt_state, loss, error = step(params, opt_state, jax.random.key(i))
        losses.append(float(loss))
        errors.append(float(error))
    assert losses[-1] < 0.7 * losses[0], losses
    # The reversal error's sanity ceiling (see the round-trip tests), while training.
    assert all(np.isfinite(e) and 0.0 <= e < 1e-3 for e in errors), errors
    assert max(errors) > 0.0, errors


def test_revvit_config_shares_the_block_settings():
    """RevViTConfig declares no block field of its own: width … lora come from
    BlockSettings (validated there), and LoRA, which RevBlock does not wire, is refused."""
    assert issubclass(RevViTConfig, BlockSettings)
    fields = {f.name for f in dataclasses.fields(RevViTConfig)}
    assert {f.name for f in dataclasses.fields(BlockSettings)} <= fields
    with pytest.raises(ValueError, match="attention must be one of"):
        RevViTConfig(attention="nope")
    with pytest.raises(ValueError, match="RevViT has no LoRA option"):
        RevViTConfig(lora=LoRA(rank=2))
