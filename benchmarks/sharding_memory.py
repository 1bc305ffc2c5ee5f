"""Per-device compiled memory of the gradient step at 1, 2, 4, 8 devices (DP and FSDP).

    python -m benchmarks.sharding_memory                  # forced CPU host devices
    python -m benchmarks.sharding_memory --devices 1,2,4,8 --depth 24 --batch 32

Each device count runs in its own process (JAX fixes the device count at start-up; on CPU
the devices are forced with ``--xla_force_host_platform_device_count``). The global batch is
fixed and sharded over every device, so the side bits and the two kept states —
sharded along the batch like the activations — shrink per device as devices are added.
With ``fsdp`` the parameters (and so their gradients) are also sharded, in the trainer's
FSDP layout (``experiments.common.sharding``: each array along its largest divisible axis,
all-gathered at the start of the step). Memory is the compiled program's per-device
``memory_analysis()`` (``experiments.common.memory``: arguments + outputs + temporaries -
aliased). Also checks, per device count, that the
reversal stayed bit-exact (reversal probe = 0) and that the loss matches one device.
"""

from __future__ import annotations

import argparse
import json
import os

from benchmarks.host_devices import host_devices, measure
from benchmarks.registry import STACK_METHODS, add_stack_size_args


def worker(num_devices: int, args) -> dict:
    devices = host_devices(num_devices)
    import jax
    import jax.numpy as jnp

    import bdia_jax
    from bdia_jax.testing import init_attn_mlp, make_attn_mlp_block
    from experiments.common import sharding
    from experiments.common.memory import step_memory

    block = make_attn_mlp_block(heads=args.heads)
    params = init_attn_mlp(jax.random.PRNGKey(1), args.depth, args.dim, args.hidden)
    x = jax.random.normal(jax.random.PRNGKey(2), (args.batch, args.seq, args.dim))
    key = jax.random.PRNGKey(0)
    methods = {name: STACK_METHODS[name][1:3]
               for name in ("standard", "bdia_remat", "bdia_reversible")}
    out = {"devices": num_devices, "results": {}}
    for layout in ("dp", "fsdp"):
        # The trainer's layouts (experiments.common.sharding): the batch over every device;
        # the parameters replicated ("dp") or FSDP-sharded over all of them, all-gathered at
        # the start of the step.
        mesh = sharding.make_mesh(devices, fsdp=num_devices if layout == "fsdp" else 1)
        gather = sharding.gather_sharding(mesh)
        placed = sharding.place(params, sharding.param_shardings(params, mesh))
        x_sharded = jax.device_put(x, sharding.batch_sharding(mesh))
        for name, (kind, backprop) in methods.items():
            def loss(params, x, probe, kind=kind, backprop=backprop, gather=gather):
                if gather is not None:
                    params = jax.lax.with_sharding_constraint(
                        params, jax.tree_util.tree_map(lambda _: gather, params))
                if kind == "standard":
                    y = bdia_jax.standard_stack(block, params, x, key=key)
                else:
                    y = bdia_jax.bdia_stack(
                        block, params, x, key=key, backprop=backprop,
                        reversal_probe=probe if backprop == "reversible" else None)
                return jnp.mean(jnp.square(y))

            step = jax.jit(jax.value_and_grad(loss, argnums=(0, 2)))
            figures = step_memory(step, placed, x_sharded, jnp.zeros(()))
            loss_value, (_, probe_grad) = step(placed, x_sharded, jnp.zeros(()))
            out["results"][f"{layout}/{name}"] = {**figures, "loss": float(loss_value),
                                                  "reversal_error": float(probe_grad)}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=24, help="blocks")
    parser.add_argument("--batch", type=int, default=32, help="global batch (divisible)")
    add_stack_size_args(parser)
    parser.add_argument("--out_dir", default="runs/sharding_memory", help="output folder")
    args, rows = measure("benchmarks.sharding_memory", parser, worker,
                         ("depth", "batch", "seq", "dim", "hidden", "heads"), argv)
    if rows is None:  # a worker
        return None

    keys = list(rows[0]["results"])
    print(f"\ndepth={args.depth} global batch={args.batch} seq={args.seq} dim={args.dim}: "
          "per-device compiled memory (MiB); reversal error; loss")
    print("| layout/method | " + " | ".join(f"{r['devices']} dev" for r in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for k in keys:
        cells = [f"{r['results'][k]['peak_estimate_bytes'] / 2**20:.1f}" for r in rows]
        print(f"| {k} | " + " | ".join(cells) + " |")
    errors = {k: max(r["results"][k]["reversal_error"] for r in rows) for k in keys}
    losses = {k: [r["results"][k]["loss"] for r in rows] for k in keys}
    print("max reversal error over device counts:", errors)
    print("loss per device count:", losses)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "sharding_memory.json"), "w") as f:
        json.dump({"config": vars(args), "rows": rows}, f, indent=2)
    print(f"wrote {args.out_dir}/sharding_memory.json")
    return rows


if __name__ == "__main__":
    main()
