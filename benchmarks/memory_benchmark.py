"""Memory and speed of the gradient methods, side by side in one run.

    python -m benchmarks.memory_benchmark                      # CPU-sized defaults
    python -m benchmarks.memory_benchmark --depths 6,12,24,48,96 --batches 8,16 \
        --seq 65 --dim 512 --hidden 512 --heads 8 --out_dir runs/memory_benchmark

For every method and every (depth, batch) it compiles the full value-and-grad step of a pre-LN
attention+MLP stack and reads the compiled program's memory (``memory_analysis()``: arguments
+ outputs + temporaries - aliased). The activation memory per block per element is the
mixed slope ∂²M/∂depth∂batch (between the two largest depths) divided by the elements per
sample (seq·dim): parameters and their gradients grow with depth but not with batch, so they
drop out. The step is then timed,
all methods interleaved round by round so that machine noise hits them alike.

Writes ``memory_benchmark.json`` and ``memory_vs_depth.png`` to ``--out_dir`` and prints a
markdown table (the README's table comes from this command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import bdia_jax
from bdia_jax.testing import init_attn_mlp, make_attn_mlp_block
from benchmarks.registry import STACK_METHODS, add_stack_size_args
from experiments.common import plots
from experiments.common.memory import step_memory

METHODS = STACK_METHODS  # name: (label, stack kind, backprop, recompute)


def make_step(kind: str, backprop: str, block, gamma: float, frac_bits: int,
              recompute: str | None = None, probe: bool = False):
    """value_and_grad of a mean-square loss w.r.t. the stacked params and the input.

    With ``probe`` the step also returns the reversal error (reversible methods only):
    (loss, (grad_params, grad_x, reversal_error)).
    """

    update = (bdia_jax.Standard() if kind == "standard"
              else bdia_jax.BDIA(gamma=gamma, frac_bits=frac_bits))
    fields = (dict(recompute=recompute or "separate", reversal_probe=probe)
              if backprop == "reversible" else {})
    method = bdia_jax.parse_method(update=update, backprop=backprop, **fields)

    def loss(params, x, key, reversal_probe):
        y, _ = bdia_jax.apply_stack(block, params, x, **method, key=key,
                                    reversal_probe=reversal_probe)
        return jnp.mean(jnp.square(y))

    if probe:
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 3)))
    return jax.jit(lambda params, x, key: jax.value_and_grad(loss, argnums=(0, 1))(
        params, x, key, None))


def mixed_slope(depths, batches, totals) -> float:
    """∂²M/∂K∂B between the two largest depths (then least squares over batches).

    The asymptotic slope: at small depths XLA's buffer assignment can change which
    depth-independent temporaries are live at the peak, which bends M(K) there.
    """
    order = np.argsort(depths)
    k1, k2 = order[-2], order[-1]
    depth_slopes = [(t[k2] - t[k1]) / (depths[k2] - depths[k1]) for t in totals]
    return float(np.polyfit(batches, depth_slopes, 1)[0])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", default="6,12,24,48,96", help="comma-separated depths")
    parser.add_argument("--batches", default="4,8", help="two or more batch sizes")
    add_stack_size_args(parser)
    parser.add_argument("--gamma", type=float, default=0.5, help="|γ| (0.5 or 0.25)")
    parser.add_argument("--frac_bits", type=int, default=9, help="l in δ = 2**-l")
    parser.add_argument("--methods", default=",".join(METHODS), help="subset of " + ",".join(METHODS))
    parser.add_argument("--time_depth", type=int, default=24, help="depth of the timed step")
    parser.add_argument("--time_rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--time_steps", type=int, default=3, help="steps per method per round")
    parser.add_argument("--layer_norm", default="stable", choices=("stable", "jnp"),
                        help="LayerNorm statistics of the benchmark block: 'stable' "
                             "(bdia_jax.stable tree sums, needed for recompute=shared) or "
                             "'jnp' (jnp.mean; recompute=shared is then inexact on XLA:CPU)")
    parser.add_argument("--out_dir", default="runs/memory_benchmark", help="output folder")
    args = parser.parse_args(argv)

    depths = [int(d) for d in args.depths.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    if len(batches) < 2 or len(depths) < 2:
        parser.error("--depths and --batches need at least two values each (slopes)")
    os.makedirs(args.out_dir, exist_ok=True)

    block = make_attn_mlp_block(heads=args.heads, stable_stats=args.layer_norm == "stable")
    key = jax.random.PRNGKey(0)
    elements = args.seq * args.dim

    memory = {m: {} for m in methods}
    for method in methods:
        _, kind, backprop, recompute = METHODS[method]
        step = make_step(kind, backprop, block, args.gamma, args.frac_bits, recompute)
        for depth in depths:
            params = init_attn_mlp(jax.random.PRNGKey(1), depth, args.dim, args.hidden)
            for batch in batches:
                x = jax.ShapeDtypeStruct((batch, args.seq, args.dim), jnp.float32)
                memory[method][(depth, batch)] = step_memory(step, params, x, key)
        print(f"compiled {method}", flush=True)

    # Timing, interleaved: round r runs every method once, so drift hits all alike.
    timing_batch = batches[-1]
    params = init_attn_mlp(jax.random.PRNGKey(1), args.time_depth, args.dim, args.hidden)
    x = jax.random.normal(jax.random.PRNGKey(2), (timing_batch, args.seq, args.dim))
    steps = {}
    for method in methods:
        _, kind, backprop, recompute = METHODS[method]
        steps[method] = make_step(kind, backprop, block, args.gamma, args.frac_bits, recompute)
        jax.block_until_ready(steps[method](params, x, key))  # compile + warm up
    times = {m: [] for m in methods}
    for _ in range(args.time_rounds):
        for method in methods:
            start = time.perf_counter()
            for _ in range(args.time_steps):
                out = steps[method](params, x, key)
            jax.block_until_ready(out)
            times[method].append((time.perf_counter() - start) / args.time_steps)

    # Exactness of what was timed: the reversal probe of each reversible method on the same
    # configuration (a separate program, so the timed steps carry no probe).
    reversal_error = {}
    for method in methods:
        _, kind, backprop, recompute = METHODS[method]
        if backprop == "reversible":
            probed = make_step(kind, backprop, block, args.gamma, args.frac_bits, recompute,
                               probe=True)
            _, (_, _, error) = probed(params, x, key, jnp.zeros(()))
            reversal_error[method] = float(error)

    results = {"config": vars(args), "backend": jax.default_backend(),
               "device": str(jax.devices()[0]), "platform": platform.platform(),
               "jax": jax.__version__, "methods": {}}
    rows = []
    for method in methods:
        totals = [[memory[method][(d, b)]["peak_estimate_bytes"] for d in depths]
                  for b in batches]
        slope = mixed_slope(depths, batches, totals)  # bytes per block per sample
        bits = slope * 8 / elements
        median_time = statistics.median(times[method])
        results["methods"][method] = {
            "label": METHODS[method][0],
            "bits_per_element_per_block": bits,
            "step_time_s": median_time,
            "step_times_s": times[method],
            "reversal_error": reversal_error.get(method),
            "memory_bytes": {f"depth={d},batch={b}": memory[method][(d, b)]
                             for d in depths for b in batches},
        }
        rows.append((method, bits, median_time,
                     memory[method][(depths[-1], batches[-1])]["peak_estimate_bytes"] / 2**20))

    reference = results["methods"].get("bdia_remat", {}).get("step_time_s")
    print()
    print(f"backend={results['backend']} seq={args.seq} dim={args.dim} hidden={args.hidden} "
          f"heads={args.heads} depths={depths} batches={batches} γ=±{args.gamma} "
          f"l={args.frac_bits}; step time at depth {args.time_depth}, batch {timing_batch}")
    print(f"LayerNorm statistics: {args.layer_norm}")
    print("| method | activation bits / element / block | compiled MiB at depth "
          f"{depths[-1]}, batch {batches[-1]} | step time (ms) | time / BDIA remat "
          "| reversal error |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, bits, step_time, mib in rows:
        ratio = f"{step_time / reference:.2f}x" if reference else "n/a"
        error = reversal_error.get(method)
        error = "–" if error is None else f"{error:g}"
        print(f"| {METHODS[method][0]} | {bits:.2f} | {mib:.1f} | {step_time * 1e3:.1f} "
              f"| {ratio} | {error} |")
        results["methods"][method]["time_vs_bdia_remat"] = (
            step_time / reference if reference else None)

    with open(os.path.join(args.out_dir, "memory_benchmark.json"), "w") as f:
        json.dump(results, f, indent=2)
    _plot(results, depths, batches[-1], os.path.join(args.out_dir, "memory_vs_depth.png"))
    print(f"\nwrote {args.out_dir}/memory_benchmark.json and memory_vs_depth.png")
    return results


def _plot(results, depths, batch, path):
    plots.plot_lines(
        {r["label"]: (depths, [r["memory_bytes"][f"depth={d},batch={batch}"]
                               ["peak_estimate_bytes"] / 2**20 for d in depths])
         for r in results["methods"].values()},
        path, xlabel="depth (blocks)", ylabel=f"compiled step memory (MiB), batch {batch}",
        title="value-and-grad memory vs depth")


if __name__ == "__main__":
    main()
