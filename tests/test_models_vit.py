"""ViT and ResidualStack: shapes, parameter counts, gradient methods, inference modes."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from float_bounds import assert_within, model_grad_rtol, network_bound, transformer_chain
from grad_utils import bdia_rounding_bound
from models_utils import (
    assert_all_params_get_gradients,
    assert_model_grads_close,
    count_params,
    probe_total,
    train_grads,
    train_grads_by_key,
)

from bdia_jax import BDIA, Autodiff, Reversible, Standard
from bdia_jax.models import (
    VIT_VARIANTS,
    ResidualStack,
    ViT,
    ViTConfig,
    vit_config,
)


def ordinary_vit_param_count(c: ViTConfig) -> int:
    """Parameters of an ordinary pre-LN ViT of this size, by formula."""
    d, m = c.width, c.mlp_dim
    patch = c.patch_size**2 * c.channels * d + d
    tokens = c.num_patches + (1 if c.pool == "cls" else 0)
    cls = d if c.pool == "cls" else 0
    block = (2 * d) + 4 * (d * d + d) + (2 * d) + (d * m + m) + (m * d + d)
    return patch + cls + tokens * d + c.depth * block + 2 * d + d * c.num_classes + c.num_classes


def images(batch=3, size=32, seed=1):
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)


def grads_of(model, x, key):
    return train_grads(model, lambda m: m(x, key=key, train=True))


# ----------------------------------------------------------------------------- shapes/params


@pytest.mark.parametrize("name", sorted(VIT_VARIANTS))
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_shapes_and_param_count(name, pool):
    config = vit_config(name, pool=pool)
    model = nnx.eval_shape(lambda: ViT(config, rngs=nnx.Rngs(0)))
    assert count_params(model) == ordinary_vit_param_count(config)
    logits, aux = nnx.eval_shape(lambda m: m(jnp.zeros((2, 32, 32, 3))), model)
    assert logits.shape == (2, config.num_classes) and logits.dtype == jnp.float32
    assert set(aux) == {"max_abs", "overflow", "nonfinite"}
    assert all(v.shape == () for v in aux.values())


def test_paper_vit_has_ordinary_size():
    config = vit_config("paper")
    assert (config.depth, config.width, config.num_heads, config.mlp_dim,
            config.patch_size, config.num_patches) == (6, 512, 8, 512, 4, 64)
    std = nnx.eval_shape(lambda: ViT(vit_config("paper", update="standard"), rngs=nnx.Rngs(0)))
    bdia = nnx.eval_shape(lambda: ViT(config, rngs=nnx.Rngs(0)))
    # BDIA adds nothing: same count as the standard model and as the formula; 9,532,938
    # is the same sum done by hand (patch 25,088 + cls 512 + positions 33,280
    # + 6 blocks x 1,577,984 + final LN 1,024 + head 5,130).
    assert count_params(bdia) == count_params(std) == ordinary_vit_param_count(config)
    assert ordinary_vit_param_count(config) == 9_532_938


def test_stacked_params_have_depth_axis():
    model = ViT(vit_config("tiny", depth=3), rngs=nnx.Rngs(0))
    leaves = jax.tree_util.tree_leaves(model.stack.params())
    assert leaves and all(leaf.shape[0] == 3 for leaf in leaves)
    # Blocks differ (independent initialisation per layer).
    kernel = model.stack.blocks.mlp.fc1.kernel[...]
    assert not np.allclose(kernel[0], kernel[1])


def test_bad_inputs_fail_loudly():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        vit_config("tiny", image_size=30)
    with pytest.raises(ValueError, match="update must be"):
        vit_config("tiny", update="fancy")
    with pytest.raises(ValueError, match="unknown ViTConfig fields"):
        vit_config("tiny", widht=3)
    # Issue 11: impossible methods fail at construction, in one line.
    for overrides, match in [(dict(frac_bits=25), r"float32 stream: use 0\.\.20"),
                             (dict(gamma=0.3, backprop="reversible"), "2\\*\\*-m"),
                             (dict(update="standard", backprop="reversible"), "no exact inverse"),
                             (dict(gamma=-0.5), "use gamma=0.5"),
                             (dict(update=BDIA(), gamma=0.25), "not both")]:
        with pytest.raises(ValueError, match=match) as info:
            vit_config("tiny", **overrides)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="no exact inverse"):
        ViTConfig(update=Standard(), backprop=Reversible())
    # A stack built directly passes its method on unchanged: apply_stack checks the pair
    # when the stack runs (one check where the pair is used, not one per layer).
    stack = ResidualStack(lambda rngs: nnx.Linear(4, 4, rngs=rngs), 2, update=Standard(),
                          backprop=Reversible(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no exact inverse"):
        stack(jnp.zeros((1, 4)))
    # Any γ trains where no inverse is needed (Table 2); the default then is Autodiff.
    assert vit_config("tiny", gamma=0.6, frac_bits=None).backprop == Autodiff()
    with pytest.raises(ValueError, match="only powers of two"):
        vit_config("tiny", gamma=0.6)  # on the grid the default is Reversible
    assert vit_config("tiny", gamma=0.0, frac_bits=None).backprop == Autodiff()
    model = ViT(vit_config("tiny"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="images must be"):
        model(jnp.zeros((2, 28, 28, 3)))
    with pytest.raises(ValueError, match="needs a PRNG `key`"):
        model(images(), train=True)
    with pytest.raises(ValueError, match="empty batch"):
        model(jnp.zeros((0, 32, 32, 3)))


def test_user_block_must_hold_only_params():
    class Noisy(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(4, 4, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)

        def __call__(self, x, context, key):
            return self.lin(x)

    with pytest.raises(ValueError, match="only nnx.Param"):
        ResidualStack(Noisy, 2, rngs=nnx.Rngs(0))


def test_user_block_through_residual_stack():
    class Tanh(nnx.Module):  # a user's own block: h(x) = tanh(W x)
        def __init__(self, rngs):
            self.lin = nnx.Linear(8, 8, rngs=rngs)

        def __call__(self, x, context, key):
            return jnp.tanh(self.lin(x))

    stack = ResidualStack(Tanh, 3, update=BDIA(), backprop=Reversible(), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 8))
    y, stats = stack(x, key=jax.random.key(1), train=True)
    assert y.shape == x.shape and not bool(stats.nonfinite)
    # Inference without quantization equals x + h_0 + ... computed by hand.
    stack.update = BDIA(quantize_at_inference=False)
    want = x
    for k in range(3):
        lin = stack.blocks.lin
        want = want + jnp.tanh(want @ lin.kernel[k] + lin.bias[k])
    got, _ = stack(x)
    # Two float32 evaluations of x_{k+1} = x_k + tanh(x_k W_k) (BDIA at γ = 0; the biases
    # are nnx.Linear's zeros), each within the recurrence's rounding bound.
    assert not np.any(np.asarray(stack.blocks.lin.bias[...]))
    bound = bdia_rounding_bound(stack.blocks.lin.kernel[...], x, np.zeros((2, x.shape[0])))
    assert np.all(np.abs(np.asarray(got, np.float64) - np.asarray(want)) <= bound)


# ----------------------------------------------------------------------------- gradients


def test_vit_reversible_gradients_equal_autodiff_with_dropout():
    x, key = images(), jax.random.key(7)
    results, grads = {}, {}
    for backprop in ("reversible", "autodiff"):
        config = vit_config("tiny", depth=3, dropout=0.1, attention_dropout=0.1,
                            backprop=backprop)
        grads[backprop] = train_grads_by_key(ViT(config, rngs=nnx.Rngs(0)),
                                             lambda m, k: m(x, key=k, train=True))
        results[backprop] = grads[backprop](key)
    logits_r, aux_r, g_r, probe_r = results["reversible"]
    logits_a, aux_a, g_a, _ = results["autodiff"]
    chex.assert_trees_all_equal(logits_r, logits_a)  # same forward, bit for bit
    chex.assert_trees_all_equal(aux_r, aux_a)
    # "tiny" at depth 3 on 3 images of 16 patches and a class token.
    assert_model_grads_close(g_r, g_a, rtol=model_grad_rtol(
        transformer_chain(width=32, mlp_dim=64, seq=17, depth=3, heads=2), positions=3 * 17))
    assert probe_total(probe_r) == 0.0  # reversal was bit-exact
    # Dropout is active: a different key changes the outputs (the key is traced: the same
    # compiled reversible program).
    other_logits = grads["reversible"](jax.random.key(8))[0]
    assert not np.allclose(other_logits, logits_r)
    assert_all_params_get_gradients(g_r)


def test_bfloat16_matmuls_keep_a_float32_stream_and_exact_reversal():
    config = vit_config("tiny", compute_dtype="bfloat16", dropout=0.1, attention_dropout=0.1)
    model = ViT(config, rngs=nnx.Rngs(0))
    assert model.stack.blocks.mlp.fc1.kernel[...].dtype == jnp.float32  # float32 params
    logits, aux, grads, probes = grads_of(model, images(), jax.random.key(2))
    assert logits.dtype == jnp.float32
    assert probe_total(probes) == 0.0 and not bool(aux["nonfinite"])
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


def test_standard_vit_trains_by_autodiff_and_matches_remat():
    x, key = images(), jax.random.key(3)
    out = {bp: grads_of(ViT(vit_config("tiny", update="standard", backprop=bp),
                            rngs=nnx.Rngs(0)), x, key)
           for bp in ("autodiff", "remat")}
    # Not bit-equal: remat moves XLA's fusion boundaries, so the standard (unquantized)
    # forward can differ in the last ulp; only the BDIA training forward is fenced.
    chain = transformer_chain(width=32, mlp_dim=64, seq=17, depth=2, heads=2)  # "tiny"
    assert_within(out["remat"][0], out["autodiff"][0],
                  network_bound(out["autodiff"][0], chain=chain), "remat logits")
    assert_model_grads_close(out["remat"][2], out["autodiff"][2],
                             rtol=model_grad_rtol(chain, positions=3 * 17))
    assert not bool(out["autodiff"][1]["overflow"])


# ----------------------------------------------------------------------------- inference


def _pair(quantize_at_inference=True, **overrides):
    """A standard and a BDIA ViT with the same parameters."""
    std = ViT(vit_config("tiny", depth=3, update="standard", **overrides), rngs=nnx.Rngs(0))
    bdia = ViT(vit_config("tiny", depth=3, update="bdia",
                          quantize_at_inference=quantize_at_inference, **overrides),
               rngs=nnx.Rngs(1))
    nnx.update(bdia, nnx.state(std, nnx.Param))
    return std, bdia


def test_bdia_inference_without_quantization_is_the_standard_model():
    std, bdia = _pair(quantize_at_inference=False, dropout=0.1)
    x = images()
    chex.assert_trees_all_equal(bdia(x)[0], std(x)[0])


def test_bdia_inference_with_quantization_is_within_a_few_delta():
    # Mean pooling: a zero-initialised class token makes LN1 of that token ~50x sensitive
    # at init, which would measure the init, not the quantization.
    std, bdia = _pair(quantize_at_inference=True, pool="mean")
    x = images(batch=4)
    tokens = std.patch_embed(std._patches(x)) + std.pos_embed[...]
    exact, _ = std.stack(tokens)
    quant, stats = bdia.stack(tokens)
    delta = 2.0**-bdia.config.update.frac_bits
    on_grid = quant / delta
    assert float(jnp.max(jnp.abs(on_grid - jnp.round(on_grid)))) == 0.0
    assert not bool(stats.overflow)
    # x_0 = Q(x) and each of the 3 blocks adds Q(h): depth + 1 roundings of at most δ/2,
    # propagated through blocks of gain ~1 at init. Measured: max 3.1 δ, rms 0.85 δ.
    err = jnp.abs(quant - exact)
    assert 0 < float(jnp.max(err)) <= 2 * (3 + 1) * delta
    assert float(jnp.sqrt(jnp.mean(err**2))) <= delta
    logits_err = float(jnp.max(jnp.abs(bdia(x)[0] - std(x)[0])))
    assert 0 < logits_err <= 4 * delta, logits_err / delta  # measured 0.45 δ


def test_inference_gamma_sweep_runs():
    _, bdia = _pair()
    x = images()
    base = bdia(x)[0]
    swept = bdia(x, inference_gamma=jnp.full((2, 3), 0.25))[0]
    assert swept.shape == base.shape and not np.allclose(swept, base)
    std, _ = _pair()
    with pytest.raises(ValueError, match="inference_gamma"):
        std(x, inference_gamma=0.25)
