"""Invalid configurations fail loudly with a one-line ValueError that names the fix."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

import bdia_jax
from bdia_jax import BDIA, Autodiff, Remat, Reversible, Standard
from bdia_jax.testing import init_mlp, make_tanh_block

DIM = 8
PARAMS = init_mlp(jax.random.PRNGKey(0), 3, DIM)
X = jnp.ones((2, 4, DIM))
KEY = jax.random.PRNGKey(1)
BLOCK = make_tanh_block()


# parse_method's keywords; reversal_probe is apply_stack's argument here.
METHOD_KEYWORDS = set(bdia_jax.methods.METHOD_KEYWORDS) - {"reversal_probe"}


def _stack(**kwargs):
    """apply_stack with the method spelled as parse_method's keywords (the config path):
    each object checks its fields, apply_stack the pair and everything else."""
    method = bdia_jax.parse_method(**{k: kwargs.pop(k) for k in list(kwargs)
                                      if k in METHOD_KEYWORDS})
    args = {**dict(block_fn=BLOCK, params=PARAMS, x=X, key=KEY), **kwargs}
    if isinstance(method["backprop"], Reversible) and args.get("reversal_probe") is None:
        method["backprop"] = dataclasses.replace(method["backprop"], reversal_probe=False)
    return bdia_jax.apply_stack(args.pop("block_fn"), args.pop("params"), args.pop("x"),
                                **method, **args)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(gamma=0.0, backprop="reversible"), "gamma != 0"),
        (dict(gamma=0.3, backprop="reversible"), "power of two|2\\*\\*-m"),
        (dict(gamma=2.0**-9, backprop="reversible"), "2\\*\\*-m with 1 <= m <= 8"),
        (dict(gamma=1.0), r"in \[0, 1\)"),
        (dict(gamma=-0.5), r"sign of γ is drawn per sample.*use gamma=0.5"),
        (dict(gamma="0.5"), "Python float"),
        (dict(frac_bits=None, backprop="reversible"), "needs the fixed-point grid"),
        (dict(frac_bits=21), "out of range"),
        (dict(frac_bits=2.5), "must be an int"),
        (dict(backprop="checkpoint"), "backprop must be one of"),
        (dict(recompute="twice"), "recompute must be one of"),
        (dict(key=None), "needs `key`"),
        (dict(gammas=jnp.full((3, 2), 0.5)), r"\[depth-1, batch\]"),
        (dict(gammas=jnp.full((2, 3), 0.5)), r"\[depth-1, batch\]"),
        (dict(gammas=jnp.full((2, 2), 0.3)), "must all be ±0.5"),
        (dict(x=X.astype(jnp.bfloat16)), "float32 or float64"),
        (dict(x=X[:0]), "empty batch"),
        (dict(block_fn=lambda p, x, c, k: x[..., :4]), "shape and dtype"),
        (dict(block_fn=lambda p, x, c, k: x.astype(jnp.bfloat16)), "astype"),
        (dict(block_fn=lambda p, x, c, k: (x, x)), "single array"),
        (dict(params={"w": jnp.ones((3, DIM, DIM)), "b": jnp.ones((2, DIM))}), "same leading"),
        (dict(params={}), "no array leaves"),
        (dict(train=False, gammas=jnp.ones((5,))), "broadcast"),
        # The probe is never dropped silently: only a reversible training pass reads it.
        (dict(backprop="autodiff", reversal_probe=jnp.zeros(())), "drop reversal_probe"),
        (dict(train=False, reversal_probe=jnp.zeros(())), "drop reversal_probe"),
    ],
)
def test_bad_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        _stack(**kwargs)
    assert "\n" not in str(info.value)


def test_no_quantization_ablation_runs_with_autodiff_and_remat():
    for backprop in ("autodiff", "remat"):
        y, _ = _stack(frac_bits=None, backprop=backprop)
        assert y.shape == X.shape


def _apply(**kwargs):
    return bdia_jax.apply_stack(BLOCK, PARAMS, X, **{"key": KEY, **kwargs})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(update=Standard(), backprop=Reversible()), "no exact inverse"),
        (dict(update="bdia", backprop=Autodiff()), "update must be bdia_jax.Standard"),
        (dict(update=BDIA(), backprop="reversible"), "backprop must be bdia_jax.Autodiff"),
        (dict(update=BDIA(), backprop=Reversible()), "pass reversal_probe=jnp.zeros"),
        (dict(update=BDIA(), backprop=Reversible(reversal_probe=False),
              reversal_probe=jnp.zeros(())),
         "drop reversal_probe"),
        (dict(update=Standard(), backprop=Autodiff(), gammas=jnp.full((2, 2), 0.5)),
         "gammas apply only to update=BDIA"),
        (dict(update=BDIA(), backprop=Autodiff(), train=1), "train must be True or False"),
    ],
)
def test_apply_stack_rejects_bad_method_use(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        _apply(**kwargs)
    assert "\n" not in str(info.value)


def test_inference_with_reversible_runs_but_is_not_differentiable():
    """train never changes what backprop means: an inference pass has no inverse, so with
    Reversible() it runs forward and refuses to be differentiated (no silent autodiff)."""
    method = dict(update=BDIA(), backprop=Reversible())
    y, _ = bdia_jax.apply_stack(BLOCK, PARAMS, X, train=False, **method)
    want, _ = bdia_jax.apply_stack(BLOCK, PARAMS, X, train=False, update=BDIA(),
                                   backprop=Autodiff())
    assert jnp.array_equal(y, want)

    def loss(params, backprop):
        out, _ = bdia_jax.apply_stack(BLOCK, params, X, train=False, update=BDIA(),
                                      backprop=backprop)
        return jnp.sum(out)

    with pytest.raises(ValueError, match="pass backprop=Autodiff\\(\\) or Remat\\(\\)"):
        jax.grad(loss)(PARAMS, Reversible())
    for backprop in (Autodiff(), Remat()):
        assert float(jnp.max(jnp.abs(jax.grad(loss)(PARAMS, backprop)["w"]))) > 0
