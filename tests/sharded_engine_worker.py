"""Run by tests/test_sharding_engine.py in a subprocess with 8 forced CPU devices.

Prints one JSON line: for data-parallel and FSDP layouts, the reversal error, the shardings
and how many state elements the sharded forward put on another grid point than one device.
It asserts that the reversible gradients match the single-device ones within the derived
rounding bound and that the sharded reversal rebuilds its own input bit for bit.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from float_bounds import U, gradient_chain, gradient_rtol, transformer_chain  # noqa: E402
from grad_utils import assert_bound_catches, assert_grads_close  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import bdia_jax  # noqa: E402
from bdia_jax import engine, fixed_point  # noqa: E402
from bdia_jax.testing import assert_bits_equal, init_attn_mlp, make_attn_mlp_block  # noqa: E402


def main():
    assert jax.device_count() == 8, jax.devices()
    block = make_attn_mlp_block(heads=2, dropout=0.1, use_context=True)
    params = init_attn_mlp(jax.random.PRNGKey(0), 6, 16, 32)
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 8, 16))
    context = jax.random.normal(jax.random.PRNGKey(3), (16, 5, 16))
    key = jax.random.PRNGKey(2)

    def loss(params, x, context, probe):
        y, _ = bdia_jax.apply_stack(block, params, x, update=bdia_jax.BDIA(),
                                    backprop=bdia_jax.Reversible(), key=key, context=context,
                                    reversal_probe=probe)
        return jnp.mean(y**2)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    # Single device reference: everything committed to device 0.
    on0 = jax.device_put((params, x, context), jax.devices()[0])
    ref_loss, ref_grads = step(*on0, jnp.zeros(()))

    # Forward states rebuilt under sharding: the rebuild ends at the input's bits.
    update = bdia_jax.BDIA()
    keys, gammas = engine.prepare_keys_and_gammas(key, 6, 16)
    x0 = fixed_point.quantize(x, 9)
    static = dict(static_argnums=(0,), static_argnames=("update",))
    forward = jax.jit(engine.bdia_forward, **static)
    invert = jax.jit(engine.bdia_invert, **static)
    ref_states = jax.jit(engine.bdia_all_states, **static)(
        block, params, x0, update=update, keys=keys, gammas=gammas, context=context)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch = NamedSharding(mesh, P("data"))
    layouts = {
        "dp": lambda a: NamedSharding(mesh, P()),
        "fsdp": lambda a: NamedSharding(mesh, P(*([None] * (a.ndim - 1)), "data")),
    }
    report = {}
    for name, layout in layouts.items():
        p = jax.tree_util.tree_map(lambda a, layout=layout: jax.device_put(a, layout(a)), params)
        xs, cs = jax.device_put(x, batch), jax.device_put(context, batch)
        loss_value, grads = step(p, xs, cs, jnp.zeros(()))
        # The train step is another program under sharding (other fusions, per-device
        # partial sums and an all-reduce). Where its states are the single device's bits,
        # the loss, a mean of n squares, is two evaluations of one sum: each within
        # (n + 1) u of the loss (the sum's n - 1 roundings, the squares' and the division's).
        # The gradients: 6 blocks of width 16, MLP 32, 8 tokens, cross-attention to 5,
        # BDIA's update and cotangent (4 float ops each a step), summed over the 16 x 8
        # positions (test_stack_grads' derivation). Not in the bound: a last-ulp change of
        # h next to a grid boundary moves a state by a grid step (counted in the report as
        # states_unlike_one_device; some do under --xla_cpu_max_isa=SSE4_2).
        n = x.size  # y has x's shape
        loss_diff = abs(float(loss_value) - float(ref_loss))
        assert loss_diff <= 2 * (n + 1) * U * float(ref_loss), (name, loss_diff)
        chain = transformer_chain(width=16, mlp_dim=32, seq=8, depth=6, heads=2, cross_seq=5)
        rtol = gradient_rtol(gradient_chain(chain + 4 * 6, positions=16 * 8))
        assert_grads_close(grads[:3], ref_grads[:3], rtol=rtol)
        assert_bound_catches(grads[:3], ref_grads[:3], rtol=rtol)
        record = forward(block, p, jax.device_put(x0, batch), update=update, keys=keys,
                          gammas=jax.device_put(gammas, NamedSharding(mesh, P(None, "data"))),
                          context=cs)
        rebuilt = invert(block, p, record, update=update, keys=keys, gammas=gammas,
                         context=cs)
        # The sharded inverse undoes the sharded forward exactly: it ends at x_0's bits.
        # The single device's states are another program's (bdia_all_states, unsharded).
        assert_bits_equal(np.asarray(rebuilt[0]), np.asarray(x0))
        report[name] = {
            "reversal_error": float(grads[3]),
            "states_unlike_one_device": int(np.sum(np.asarray(rebuilt)
                                                   != np.asarray(ref_states))),
            "side_bits_sharded_on_batch": str(record.side_bits.sharding.spec),
            "input_grad_sharding": str(grads[1].sharding.spec),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
