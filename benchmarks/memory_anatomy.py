"""Where the compiled memory of the BDIA-ViT train step goes, beside its analytic floor.

    python -m benchmarks.memory_anatomy                  # paper size: depth 6, width 512, batch 128
    python -m benchmarks.memory_anatomy --depth 24       # the same width, 24 blocks
    python -m benchmarks.memory_anatomy --small          # seconds (the test)

The step is the one ``benchmarks.train_step_memory`` compiles: vit_cifar's loss (augmentation,
label smoothing) and AdamW update, one device, the state donated. For every variant it
compiles the step on abstract inputs with XLA's dumps on and reads the buffers live at the
peak from the buffer assignment's live-range report (``*-live-range.txt``, "Live ranges at N
(peak)"), each named by its HLO instruction and traced back to the JAX operation that made it
(``op_name`` metadata). They are summed by kind: the step's arguments (parameters, optimizer
state, batch), dropout's random bits, the backward scan's body (one block's VJP and the
scan's carries), copies XLA inserted (no ``op_name``), and the rest.

The analytic floor: parameters + gradients + Adam moments + the two kept states (and the two
states the reversal probe compares) + side bits + one block's forward-and-VJP internals (the
block's VJP compiled alone at the same batch).

Variants (``--variants``): ``trained`` (the paper's dropout 0.1, JAX's default threefry keys),
``no_dropout`` (dropout 0), ``rbg`` (dropout 0.1 with ``jax_default_prng_impl="rbg"``: XLA's
RngBitGenerator instead of threefry). Writes ``memory_anatomy.json`` to ``--out_dir`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import shutil
import tempfile

DUMP_FLAGS = "--xla_dump_to={dir} --xla_dump_hlo_as_text"
VARIANTS = ("trained", "no_dropout", "rbg")
KINDS = ("parameters", "optimizer state", "batch and other state", "dropout random bits",
         "backward scan body", "copies (no op_name)", "other")
MIB = 2**20


def live_at_peak(dump_dir: str, module: str) -> list[dict]:
    """The buffers live at the peak of the newest compiled ``module`` in ``dump_dir``:
    [{"name", "bytes", "op_name", "shape"}], from the live-range report and the HLO text."""
    pattern = os.path.join(dump_dir, f"module_*.{module}.cpu_after_optimizations")
    live_range = sorted(glob.glob(pattern + "-live-range.txt"))[-1]
    hlo = live_range.replace("-live-range.txt", ".txt")
    instructions = {}
    with open(hlo) as f:
        for line in f:
            m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+)", line)
            if m:
                op = re.search(r'op_name="([^"]*)"', line)
                instructions[m.group(1)] = (m.group(2), op.group(1) if op else "")
    buffers, in_peak = [], False
    with open(live_range) as f:
        for line in f:
            if "(peak):" in line:
                in_peak = True
                continue
            if in_peak:
                m = re.match(r"\s+([\w.\-]+)\{[\d,]*\}: (\d+) bytes", line)
                if not m:
                    break
                shape, op_name = instructions.get(m.group(1), ("?", ""))
                buffers.append({"name": m.group(1), "bytes": int(m.group(2)),
                                "op_name": op_name, "shape": shape})
    return buffers


def kind_of(buffer: dict) -> str:
    name, op = buffer["name"], buffer["op_name"]
    if name.startswith("state_params"):
        return "parameters"
    if name.startswith("state_opt_state"):
        return "optimizer state"
    if name.startswith(("state_", "batch_")):
        return "batch and other state"
    if re.search(r"bernoulli|_uniform|threefry|random_bits|rng", op):
        return "dropout random bits"
    if "transpose(jvp" in op and "/while/body/" in op:
        return "backward scan body"
    if not op and name.startswith("copy"):
        return "copies (no op_name)"
    return "other"


def tensor_bytes(tree) -> int:
    import jax
    import numpy as np

    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def compile_step(args, update: str, dropout: float):
    """(compiled step, abstract state) of the vit_cifar train step."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bdia_jax import training
    from experiments import vit_cifar
    from experiments.common import train_state as ts
    from experiments.common import trainer
    from experiments.configs.vit_cifar import get_config

    config = get_config(args.preset)
    config.train.batch_size = args.batch
    config.model.depth = args.depth
    config.model.dropout = config.model.attention_dropout = dropout
    task = vit_cifar.TASK
    vit_cfg, model_class = trainer.build_model_config(
        task, config, config.methods[update].to_dict(), None)
    optimizer, schedule = ts.make_optimizer(config.optim, 1000, 100)
    graphdef = training.split(nnx.eval_shape(lambda: model_class(vit_cfg, rngs=nnx.Rngs(0))))[0]
    state = jax.eval_shape(lambda: training.init(
        model_class(vit_cfg, rngs=nnx.Rngs(0)), optimizer, jax.random.PRNGKey(0))[1])
    size = config.model.image_size
    batch = {"image": jax.ShapeDtypeStruct((args.batch, size, size, 3), jnp.uint8),
             "label": jax.ShapeDtypeStruct((args.batch,), jnp.int32)}
    step = training.make_train_step(graphdef, task.loss_fn(config), optimizer,
                                    schedule=schedule)
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
    return compiled, state, config


def block_internals(config, batch: int, dropout: float) -> tuple[int, int, int]:
    """(temp bytes of one encoder block's forward + VJP, bytes of x, tokens) for
    x: [batch, tokens, width] float32."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bdia_jax.models.layers import EncoderBlock

    m = config.model
    block = nnx.eval_shape(lambda: EncoderBlock(
        m.width, m.num_heads, m.mlp_dim, dropout=dropout, attention_dropout=dropout,
        rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(block, nnx.Param)
    tokens = (m.image_size // m.patch_size) ** 2 + (1 if m.pool == "cls" else 0)
    x = jax.ShapeDtypeStruct((batch, tokens, m.width), jnp.float32)

    def vjp(params, x, g, key):
        h, pullback = jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x, None, key), params, x)
        return h, pullback(g)

    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    compiled = jax.jit(vjp).lower(params, x, x, key).compile()
    from experiments.common.memory import compiled_memory

    return compiled_memory(compiled)["temp_bytes"], int(x.size) * 4, tokens


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="paper", help="vit_cifar preset (model size)")
    parser.add_argument("--depth", type=int, default=None, help="blocks (default: preset's)")
    parser.add_argument("--batch", type=int, default=128, help="global batch")
    parser.add_argument("--small", action="store_true", help="quick preset, depth 2, batch 8")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=",".join(VARIANTS))
    parser.add_argument("--models", default="bdia,standard", help="bdia and/or standard")
    parser.add_argument("--top", type=int, default=12, help="largest op_name groups listed")
    parser.add_argument("--out_dir", default="runs/memory_anatomy",
                        help="output folder (memory_anatomy.json)")
    parser.add_argument("--keep_dump", action="store_true", help="keep XLA's dump folder")
    args = parser.parse_args(argv)
    if args.small:
        args.preset, args.batch, args.depth = "quick", 8, args.depth or 2
    variants = args.variants.split(",")
    if set(variants) - set(VARIANTS):
        parser.error(f"--variants: choose from {VARIANTS}")

    dump_dir = tempfile.mkdtemp(prefix="memory_anatomy_")
    # The dump flags must be set before the first backend use in this process.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                               + DUMP_FLAGS.format(dir=dump_dir)).strip()
    import jax

    from experiments.common.memory import compiled_memory
    from experiments.configs.vit_cifar import get_config

    if jax.default_backend() != "cpu":
        print(f"note: the live-range report is read for XLA:CPU dumps; backend is "
              f"{jax.default_backend()}", flush=True)
    config = get_config(args.preset)
    args.depth = args.depth or config.model.depth
    results = {"config": vars(args), "backend": jax.default_backend(), "jax": jax.__version__,
               "steps": {}}
    for variant in variants:
        dropout = 0.0 if variant == "no_dropout" else config.model.dropout
        jax.config.update("jax_default_prng_impl", "rbg" if variant == "rbg" else "threefry2x32")
        for update in args.models.split(","):
            compiled, state, cfg = compile_step(args, update, dropout)
            memory = compiled_memory(compiled)
            buffers = live_at_peak(dump_dir, "jit_train_step")
            kinds = collections.Counter()
            groups = collections.Counter()
            for b in buffers:
                kinds[kind_of(b)] += b["bytes"]
                groups[(kind_of(b), b["op_name"] or f"{b['name']} {b['shape']}")] += b["bytes"]
            results["steps"][f"{variant}/{update}"] = {
                "compiled": memory, "live_at_peak_bytes": sum(kinds.values()),
                "kinds": dict(kinds),
                "top": [(k, o, n) for (k, o), n in groups.most_common(args.top)]}
            print(f"compiled {variant}/{update}: peak {memory['peak_estimate_bytes'] / MIB:.1f} "
                  f"MiB", flush=True)
    jax.config.update("jax_default_prng_impl", "threefry2x32")

    # The analytic floor of the BDIA step (the trained variant's sizes).
    _, state, cfg = compile_step(args, "bdia", config.model.dropout)
    param_bytes = tensor_bytes(state.params)
    internals, stream_bytes, tokens = block_internals(cfg, args.batch, cfg.model.dropout)
    elements = tokens * cfg.model.width
    side_bits = (args.depth - 1) * args.batch * ((elements + 7) // 8)  # |γ| = 1/2: 1 bit
    floor = {"parameters": param_bytes, "gradients": param_bytes,
             "optimizer state": tensor_bytes(state.opt_state),
             "kept states x_K, x_K-1": 2 * stream_bytes,
             "probe reference x_0": stream_bytes,
             "side bits": side_bits, "one block's forward + VJP internals": internals}
    results["floor_bytes"] = floor
    results["markdown"] = markdown(results, floor)
    print("\n" + results["markdown"])
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "memory_anatomy.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    if args.keep_dump:
        print(f"XLA dumps in {dump_dir}")
    else:
        shutil.rmtree(dump_dir, ignore_errors=True)
    print(f"wrote {path}")
    return results


def markdown(results, floor) -> str:
    c = results["config"]
    steps = results["steps"]
    names = list(steps)
    lines = [f"ViT preset {c['preset']}, depth {c['depth']}, batch {c['batch']}: the buffers "
             f"live at the compiled peak, MiB (XLA:{results['backend'].upper()})", "",
             "| kind | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for kind in KINDS:
        lines.append(f"| {kind} | " + " | ".join(
            f"{steps[n]['kinds'].get(kind, 0) / MIB:.1f}" for n in names) + " |")
    lines.append("| **live at peak** | " + " | ".join(
        f"**{steps[n]['live_at_peak_bytes'] / MIB:.1f}**" for n in names) + " |")
    lines.append("| compiled peak estimate | " + " | ".join(
        f"{steps[n]['compiled']['peak_estimate_bytes'] / MIB:.1f}" for n in names) + " |")
    total = sum(floor.values())
    lines += ["", "Analytic floor of the BDIA step, MiB:", "", "| part | MiB |", "|---|---:|"]
    lines += [f"| {k} | {v / MIB:.1f} |" for k, v in floor.items()]
    lines.append(f"| **floor** | **{total / MIB:.1f}** |")
    first = names[0]
    lines += ["", f"Largest groups live at the peak of {first} (kind, JAX op or HLO buffer, MiB):",
              "", "| kind | op_name / buffer | MiB |", "|---|---|---:|"]
    lines += [f"| {k} | `{o[-90:]}` | {n / MIB:.1f} |" for k, o, n in steps[first]["top"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
