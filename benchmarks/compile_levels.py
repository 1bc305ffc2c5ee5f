"""Compile time and reversal exactness of one train step at each LLVM optimisation level of
XLA (``--xla_backend_optimization_level``), each level in its own process (XLA reads its
flags once): the measurement behind the test suite's -O1 (tests/conftest.py).

    python -m benchmarks.compile_levels            # levels default, 2, 1, 0
    python -m benchmarks.compile_levels --levels 1,0 --extra_flags=--xla_cpu_use_fusion_emitters=false

Per level: the seconds to compile the tiny ViT's train step (``benchmarks.registry``: the
library's step, BDIA with the experiments' settings, batch 8, dropout 0.1), twice; its reversal probe (0.0: exact); and the round trip of the
engine's separately compiled forward (``bdia_forward``) against ``bdia_all_states`` on
tests/test_stack_reversal.py's large-scale tanh stack (bit-equal or not).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure() -> dict:
    """This process's figures (under whatever XLA_FLAGS it was started with)."""
    import jax
    import numpy as np
    from flax import nnx

    import bdia_jax
    from bdia_jax import engine, fixed_point
    from bdia_jax.models import ViT, vit_config
    from bdia_jax.testing import init_mlp, make_tanh_block
    from benchmarks import registry

    config = vit_config("tiny", dropout=0.1, attention_dropout=0.1,
                        **registry.METHODS["bdia"][1])
    compile_s, probe = [], None
    for _ in range(2):
        step, state = registry.train_step(ViT(config, rngs=nnx.Rngs(0)), registry.vit_loss,
                                          donate=False)
        batch = registry.make_batch("vit", config, 8)
        start = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s.append(time.perf_counter() - start)
        probe = float(compiled(state, batch)[1]["reversal_error"])

    depth, gamma = 8, 0.5
    update = bdia_jax.BDIA(gamma=gamma, frac_bits=9)
    block = make_tanh_block(amplitude=250.0)
    params = init_mlp(jax.random.PRNGKey(1), depth, 8)
    x0 = fixed_point.quantize(jax.random.normal(jax.random.PRNGKey(2), (3, 4, 8)) * 1e3, 9)
    keys, gammas = engine.prepare_keys_and_gammas(jax.random.PRNGKey(depth), depth, 3, gamma)
    pair = dict(update=update, keys=keys, gammas=gammas, context=None)
    states = jax.jit(engine.bdia_all_states, static_argnums=(0,),
                     static_argnames=("update",))(block, params, x0, **pair)
    record = jax.jit(engine.bdia_forward, static_argnums=(0,),
                     static_argnames=("update",))(block, params, x0, **pair)
    differ = int(np.sum(np.asarray(record.x_last) != np.asarray(states[-1])))
    return {"compile_s": compile_s, "probe": probe, "forward_programs_differ_in": differ}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--levels", default="default,2,1,0")
    parser.add_argument("--extra_flags", default="",
                        help="XLA flags added at every level (the suite's: see tests/conftest.py)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure()))
        return {}
    results = {}
    for level in args.levels.split(","):
        env = dict(os.environ)
        flags = re.sub(r"--xla_backend_optimization_level=\S*", "", env.get("XLA_FLAGS", ""))
        if level != "default":
            flags += f" --xla_backend_optimization_level={level}"
        flags += f" {args.extra_flags}"
        env["XLA_FLAGS"] = flags.strip()
        out = subprocess.run([sys.executable, "-m", "benchmarks.compile_levels", "--worker"],
                             cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True)
        results[level] = json.loads(out.stdout.strip().splitlines()[-1])
    print("| level | compile (s), 1st / 2nd | probe | forward programs differ in |")
    print("|---|---:|---:|---:|")
    for level, r in results.items():
        print(f"| {level} | {r['compile_s'][0]:.1f} / {r['compile_s'][1]:.1f} | {r['probe']} | "
              f"{r['forward_programs_differ_in']} elements |")
    return results


if __name__ == "__main__":
    main()
