"""Per-device compiled memory of an experiment's full train step (model, loss, gradients,
optimizer update) at 1, 2, 4, 8 devices, with data parallelism and with FSDP.

    python -m benchmarks.train_step_memory                     # vit_cifar quick, CPU devices
    python -m benchmarks.train_step_memory --preset paper --devices 1,8 --models bdia
    python -m benchmarks.train_step_memory --experiment lm --preset full --devices 1 --layouts dp

Each device count runs in its own process (JAX fixes the device count at start-up; on CPU
the devices are forced with ``--xla_force_host_platform_device_count``). The step is only
compiled, on abstract inputs: no data, no training (the task's ``train_batch_shapes``: the
preset's batch, the longest bucket for translation, the tokenizer's vocabulary size). The
global batch is fixed, so the activations, side bits and kept states per device fall as
devices are added; with ``fsdp`` (``mesh.fsdp`` = all devices) the parameters, gradients and
Adam moments are stored sharded too (the step all-gathers the weights at its start, as the
trainer does). Figures: XLA's ``memory_analysis()`` per device — arguments (state + batch),
temporaries (activations and scratch) and peak = arguments + outputs + temporaries - aliased.
See ``benchmarks/sharding_memory.py`` for the same at the engine level.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from benchmarks.host_devices import host_devices, measure

EXPERIMENTS = ("vit_cifar", "lm", "translation")


def worker(num_devices: int, args) -> dict:
    devices = host_devices(num_devices)
    import importlib

    import jax
    from flax import nnx

    from bdia_jax import training
    from experiments.common import memory, sharding, trainer
    from experiments.common import train_state as ts

    task = importlib.import_module(f"experiments.{args.experiment}").TASK
    config = importlib.import_module(f"experiments.configs.{args.experiment}").get_config(
        args.preset)
    if args.batch:
        if "batch_size" not in config.train:
            raise SystemExit(f"--batch: {args.experiment} sizes its batches by "
                             "batch.tokens_per_batch; leave --batch out")
        config.train.batch_size = args.batch
    shapes, data_fields = task.train_batch_shapes(config)
    rows = next(iter(shapes.values()))[0][0]
    if rows % num_devices:
        raise SystemExit(f"the batch of {rows} does not split over {num_devices} devices; "
                         "pass --batch or other --devices")
    out = {"devices": num_devices, "results": {}}
    for layout in args.layouts.split(","):
        # The trainer's layouts: parameters replicated ("dp") or FSDP over every device.
        mesh = sharding.make_mesh(devices, fsdp=num_devices if layout == "fsdp" else 1)
        batch_sharding = sharding.batch_sharding(mesh)
        batch = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
                 for name, (shape, dtype) in shapes.items()}
        for name in args.models.split(","):
            # RevViT too: the trainer builds every config.methods entry.
            model_cfg, model_class = trainer.build_model_config(
                task, config, config.methods[name].to_dict(), None)
            model_cfg = dataclasses.replace(model_cfg, **data_fields)
            optimizer, schedule = ts.make_optimizer(config.optim, 1000, 100)
            graphdef, state = training.init(model_class(model_cfg, rngs=nnx.Rngs(0)),
                                            optimizer, jax.random.PRNGKey(0))
            shardings = sharding.train_state_shardings(state, mesh)
            abstract = jax.tree_util.tree_map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                shardings)
            compiled = ts.compile_train_step(
                training.make_train_step(graphdef, task.loss_fn(config), optimizer,
                                         schedule=schedule,
                                         gather_params=sharding.gather_sharding(mesh)),
                abstract, batch, state_sharding=shardings, batch_sharding=batch_sharding,
                metrics_sharding=sharding.replicated_sharding(mesh))
            out["results"][f"{layout}/{name}"] = {
                **memory.compiled_memory(compiled),
                "params": sum(x.size for x in jax.tree_util.tree_leaves(state.params))}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="vit_cifar", choices=EXPERIMENTS,
                        help="whose train step")
    parser.add_argument("--preset", default="quick", help="the experiment's preset")
    parser.add_argument("--batch", type=int, default=0,
                        help="global batch, divisible by the devices (0: the preset's)")
    parser.add_argument("--models", default="standard,bdia",
                        help="entries of the config's methods, e.g. standard,bdia")
    parser.add_argument("--layouts", default="dp,fsdp", help="dp and/or fsdp")
    parser.add_argument("--out_dir", default="runs/train_step_memory", help="output folder")
    args, rows = measure("benchmarks.train_step_memory", parser, worker,
                         ("experiment", "preset", "batch", "models", "layouts"), argv)
    if rows is None:  # a worker
        return None

    batch = f"global batch {args.batch}" if args.batch else "the preset's batch"
    print(f"\n{args.experiment} preset={args.preset}, {batch}: per-device compiled memory "
          f"of the train step, MiB (arguments = state + batch / temporaries / peak)")
    print("| layout/model | " + " | ".join(f"{r['devices']} dev" for r in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for key in rows[0]["results"]:
        cells = []
        for r in rows:
            m = r["results"][key]
            cells.append(f"{m['argument_bytes'] / 2**20:.2f} / {m['temp_bytes'] / 2**20:.2f} / "
                         f"{m['peak_estimate_bytes'] / 2**20:.2f}")
        print(f"| {key} | " + " | ".join(cells) + " |")
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "train_step_memory.json")
    with open(path, "w") as f:
        json.dump({"config": vars(args), "rows": rows}, f, indent=2)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
