"""Invalid configurations fail loudly with a ValueError that names the fix."""

import jax
import jax.numpy as jnp
import pytest

import bdia_jax
from bdia_jax.testing import init_mlp, make_tanh_block

DIM = 8
PARAMS = init_mlp(jax.random.PRNGKey(0), 3, DIM)
X = jnp.ones((2, 4, DIM))
KEY = jax.random.PRNGKey(1)
BLOCK = make_tanh_block()


def _stack(**kwargs):
    args = dict(block_fn=BLOCK, params=PARAMS, x=X, key=KEY)
    args.update(kwargs)
    return bdia_jax.bdia_stack(args.pop("block_fn"), args.pop("params"), args.pop("x"), **args)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(gamma=0.0), "gamma != 0"),
        (dict(gamma=0.3), "power of two"),
        (dict(gamma=1.0), "power of two"),
        (dict(frac_bits=None), "needs the fixed-point grid"),
        (dict(quantize=False), "needs the fixed-point grid"),
        (dict(frac_bits=21), "out of range"),
        (dict(frac_bits=2.5), "must be an int"),
        (dict(backprop="checkpoint"), "backprop must be one of"),
        (dict(recompute="twice"), "recompute must be one of"),
        (dict(key=None), "needs `key`"),
        (dict(gammas=jnp.full((3, 2), 0.5)), r"\[depth-1, batch\]"),
        (dict(gammas=jnp.full((2, 3), 0.5)), r"\[depth-1, batch\]"),
        (dict(gammas=jnp.full((2, 2), 0.3)), "must all be"),
        (dict(x=X.astype(jnp.bfloat16)), "float32 or float64"),
        (dict(block_fn=lambda p, x, c, k: x[..., :4]), "shape and dtype"),
        (dict(block_fn=lambda p, x, c, k: x.astype(jnp.bfloat16)), "astype"),
        (dict(block_fn=lambda p, x, c, k: (x, x)), "single array"),
        (dict(params={"w": jnp.ones((3, DIM, DIM)), "b": jnp.ones((2, DIM))}), "same leading"),
        (dict(params={}), "no array leaves"),
        (dict(train=False, gammas=jnp.ones((5,))), "broadcast"),
    ],
)
def test_bad_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _stack(**kwargs)


def test_standard_stack_rejects_reversible():
    with pytest.raises(ValueError, match="no exact inverse"):
        bdia_jax.standard_stack(BLOCK, PARAMS, X, backprop="reversible")


def test_no_quantization_ablation_runs_with_autodiff_and_remat():
    for backprop in ("autodiff", "remat"):
        y = _stack(frac_bits=None, backprop=backprop)
        assert y.shape == X.shape
