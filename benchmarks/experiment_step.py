"""Step time and compiled memory of an experiment's train step, per method, side by side.

    python -m benchmarks.experiment_step --experiment finetune_lm --preset smollm2_e2e \
        --models standard,dropout_05,bdia,lora,lora_bdia --rounds 7

Each model is built as the experiment trains it (``trainer.prepare_model``: the preset's
model and data, the method's optimizer and schedule, the library's train step, compiled for
every batch shape) at the preset's seed, so the step timed is the step the runs take. After
one warm-up step each, ``--rounds`` rounds follow; in each, every model takes one step on
its training batch of step 0, in turn, so that a shared machine's load slows all of them
alike. Per model: the median step time and the range over the rounds, the ratio of medians
to the first model's, the compile time and the compiled memory of the step (XLA's
``memory_analysis()``: arguments = train state + batch, temporaries, peak estimate).

All the models are held at once (each its train state and executable): the host needs
room for all their states together (a full fine-tuning model's weights and AdamW moments
each). Run it on an otherwise idle machine; the figures are wall-clock times.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import tempfile
import time

EXPERIMENTS = ("vit_cifar", "lm", "translation", "finetune_gpt2", "finetune_lm")


def measure(experiment: str, preset: str, models: list[str], rounds: int) -> dict:
    """{"models": {name: record}, "rounds": rounds, ...} (see the module docstring). What
    the task writes while loading its data (a tiny stand-in) goes to a temporary folder."""
    import jax

    from experiments.common import metrics, sharding, trainer

    task = importlib.import_module(f"experiments.{experiment}").TASK
    config = importlib.import_module(f"experiments.configs.{experiment}").get_config(preset)
    unknown = [name for name in models if name not in config.methods]
    if unknown:
        raise SystemExit(f"--models: {', '.join(unknown)} not in the {preset} preset's "
                         f"methods ({', '.join(config.methods)})")
    mesh = sharding.mesh_from_config(config)
    trainer.validate_config(task, config, mesh)
    with tempfile.TemporaryDirectory(prefix="experiment_step_") as workdir:
        data = task.load_data(config, workdir, mesh)
        writer = metrics.MetricsWriter(os.path.join(workdir, "metrics.jsonl"))
        prepared = {name: trainer.prepare_model(task, config, name, data, mesh, workdir,
                                                writer) for name in models}
        states, batches = {}, {}
        for name, p in prepared.items():
            batches[name] = p.get_batch(0)
            states[name], out = p.step_fn(p.state, batches[name])  # warm-up
            jax.block_until_ready(out)
        times: dict[str, list[float]] = {name: [] for name in models}
        last: dict[str, dict] = {}
        for _ in range(rounds):
            for name, p in prepared.items():
                start = time.perf_counter()
                states[name], out = p.step_fn(states[name], batches[name])
                jax.block_until_ready(out)
                times[name].append(time.perf_counter() - start)
                last[name] = out
    first = statistics.median(times[models[0]])
    records = {}
    for name, p in prepared.items():
        median = statistics.median(times[name])
        records[name] = {
            "display": p.run.display,
            "step_s_median": median,
            "step_s_min": min(times[name]),
            "step_s_max": max(times[name]),
            "step_s": times[name],
            "ratio_to_first": median / first,
            "compile_s": p.compile_seconds,
            "compiled": p.compiled_mem,
            "num_params": p.num_params,
            "examples_per_step": p.schedule[3],
            # The last timed step's reversal error / overflow (BDIA: 0 / False when exact).
            "reversal_error": float(last[name].get("reversal_error", float("nan"))),
            "overflow": bool(last[name].get("overflow", False)),
        }
    return {"experiment": experiment, "preset": preset, "rounds": rounds,
            "backend": jax.default_backend(), "models": records}


def table(result: dict) -> str:
    """The result as a markdown table."""
    first = next(iter(result["models"].values()))["display"]
    lines = [f"| method | step (s), median (range) | / {first} | compile (s) | "
             "args / temp / peak (MiB) |", "|---|---:|---:|---:|---:|"]
    for r in result["models"].values():
        c = r["compiled"] or {}
        mib = [c.get(k, 0) / 2**20 for k in ("argument_bytes", "temp_bytes",
                                              "peak_estimate_bytes")]
        lines.append(f"| {r['display']} | {r['step_s_median']:.2f} ({r['step_s_min']:.2f}–"
                     f"{r['step_s_max']:.2f}) | {r['ratio_to_first']:.3f} | "
                     f"{r['compile_s']:.1f} | {mib[0]:.0f} / {mib[1]:.0f} / {mib[2]:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="finetune_lm", choices=EXPERIMENTS,
                        help="whose train step")
    parser.add_argument("--preset", default="quick", help="the experiment's preset")
    parser.add_argument("--models", default="standard,bdia",
                        help="entries of the preset's methods; the first is the reference")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per model (>= 1)")
    parser.add_argument("--out_dir", default="runs/experiment_step", help="output folder")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    result = measure(args.experiment, args.preset, args.models.split(","), args.rounds)
    print(f"\n{args.experiment} preset={args.preset}, {args.rounds} rounds on "
          f"{result['backend']}:\n{table(result)}")
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "experiment_step.json")
    with open(path, "w") as f:
        json.dump({"config": vars(args), **result}, f, indent=2)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
