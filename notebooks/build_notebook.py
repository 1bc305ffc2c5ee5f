"""Writes ``notebooks/bdia_vit_cifar.ipynb`` from the cells below (outputs cleared).

    python notebooks/build_notebook.py           # regenerate the notebook
    python notebooks/build_notebook.py --check   # exit 1 if the committed notebook differs

Edit the notebook here, not in Jupyter: the .ipynb is generated, so reviews read this file
and ``tests/test_notebook.py`` checks that the two agree and that the notebook runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from setup_cell import setup_cell  # noqa: E402 (a sibling file, not a package)

NOTEBOOK_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bdia_vit_cifar.ipynb")

# (kind, source) in order; "md" = markdown, "code" = code.
CELLS: list[tuple[str, str]] = []


def md(source: str) -> None:
    CELLS.append(("md", textwrap.dedent(source).strip("\n")))


def code(source: str) -> None:
    CELLS.append(("code", textwrap.dedent(source).strip("\n")))


# --------------------------------------------------------------------------- intro + install

md("""
# BDIA-ViT on CIFAR-10: exact bit-level reversible training in JAX

This notebook walks through [`bdia_jax`](../README.md), an implementation of the
BDIA-transformer (Zhang, Lewis & Kleijn, *On Exact Bit-level Reversible Transformers
Without Changing Architectures*, arXiv 2407.09093):

1. **Exact reversal** – the hidden states of a ViT block stack are rebuilt from the last two
   states plus 1 side bit per element per block, and compared bit for bit.
2. **Memory** – the compiled memory of standard backprop, per-block remat and reversible BDIA
   at growing depth.
3. **Training** – BDIA-ViT against a standard ViT on CIFAR-10 (same initialisation, batches and
   augmentations), with progress bars and curves.
4. **Inference-γ sweep** – test accuracy when the BDIA averaging γ is applied at inference.

**Runs anywhere**: a Colab runtime (TPU, GPU or CPU) or a plain machine with the repository
checked out (`pip install -r requirements.txt`, then open this notebook from `notebooks/`).
The default setting is small (minutes on a CPU); set `FULL = True` in the parameters cell for
the paper's setting (a GPU/TPU and hours). `BDIA_NOTEBOOK_SMOKE=1` in the environment shrinks
everything to seconds on random mock data (the CI test runs it that way).
""")

code(setup_cell(modules=('bdia_jax', 'experiments', 'benchmarks'), extra_packages=()))

# --------------------------------------------------------------------------- parameters

md("""
## Parameters

`FULL = True` switches the training to the paper's CIFAR-10 setting (ViT depth 6, width 512,
8 heads, MLP 512, patch 4, batch 128, γ = ±0.5, l = 9, 200 epochs: use a GPU/TPU runtime).
The default is small: on a CPU a few minutes on a subset of CIFAR-10, on a GPU/TPU a few epochs
on all of it. Runs are saved under `OUTPUT_ROOT`, one folder per distinct config; running the
training cell again reuses a finished run (delete its folder to train again).
""")

code('''
FULL = False  # True: the paper's setting (GPU/TPU, hours). False: small and fast.

# CI: BDIA_NOTEBOOK_SMOKE=1 makes every section tiny and trains on random mock images.
SMOKE = os.environ.get("BDIA_NOTEBOOK_SMOKE", "0") == "1"
# Where runs are written (metrics.jsonl, summary.json, plots, checkpoints).
OUTPUT_ROOT = os.environ.get("BDIA_NOTEBOOK_WORKDIR") or os.path.join(REPO_ROOT, "runs")
# Folder of prepared TFDS datasets; "" = $TFDS_DATA_DIR, else ~/tensorflow_datasets
# (TFDS downloads and prepares CIFAR-10 there on first use when there is a network).
DATA_DIR = ""

if SMOKE and FULL:
    raise ValueError("BDIA_NOTEBOOK_SMOKE=1 and FULL = True contradict each other: unset one.")
SETTING = "smoke" if SMOKE else ("full" if FULL else "default")
print(f"setting: {SETTING}; outputs under {OUTPUT_ROOT}")
''')

code('''
import dataclasses
import hashlib
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import bdia_jax
from bdia_jax.models import ReversalProbe, ViT, vit_config
from bdia_jax.testing import init_attn_mlp, make_attn_mlp_block
from benchmarks import memory_benchmark
from experiments import vit_cifar
from experiments.common import metrics as run_metrics
from experiments.common.memory import memory_only_options, step_memory
from experiments.configs.vit_cifar import get_config

# experiments.common.plots selects the headless Agg backend; plot inline in this notebook.
%matplotlib inline

BACKEND = jax.default_backend()  # "cpu", "gpu" or "tpu"
ACCELERATOR = BACKEND != "cpu"
print(f"jax {jax.__version__} on {jax.device_count()} {BACKEND} device(s): {jax.devices()}")
''')

code('''
# Every size in one place: smoke (CI), default (small) and full (the paper).
SETTINGS = {
    "smoke": dict(
        exact_vit=dict(name="tiny", depth=4), exact_batch=2,
        memory=dict(depths=(2, 4), batches=(1, 2), seq=17, dim=32, hidden=64, heads=2,
                    methods=("standard", "bdia_reversible")),
    ),
    "default": dict(
        exact_vit=dict(name="small", depth=8, dropout=0.1, attention_dropout=0.1),
        exact_batch=8,
        # seq 65 = the ViT's 64 patches + class token; width/MLP/heads of the quick ViT.
        memory=dict(depths=(4, 8, 16, 32, 64), batches=(16, 32), seq=65, dim=128, hidden=256,
                    heads=4, methods=("standard", "standard_remat", "bdia_reversible")),
    ),
    "full": dict(
        exact_vit=dict(name="paper"), exact_batch=8,
        memory=dict(depths=(6, 12, 24, 48, 96), batches=(64, 128), seq=65, dim=512, hidden=512,
                    heads=8, methods=("standard", "standard_remat", "bdia_reversible")),
    ),
}[SETTING]
GAMMA, FRAC_BITS = 0.5, 9  # |γ| = 2**-m with m = 1 side bit; grid δ = 2**-9 (the paper's l)
SETTINGS
''')

# --------------------------------------------------------------------------- 1. exactness

md("""
## 1. Reversal is exact, bit for bit

BDIA trains an ordinary transformer with the update (k ≥ 1, γ_k = ±γ drawn per sample and block)

x_{k+1} = γ_k x_{k-1} + (1 − γ_k) x_k + (1 + γ_k) h_k(x_k),

which is invertible: x_{k-1} = (x_{k+1} − (1 − γ_k) x_k − (1 + γ_k) h_k(x_k)) / γ_k. In floating
point that inverse is only approximate, so `bdia_jax` keeps the residual stream on a
fixed-point grid δ = 2^-l and stores the m = −log2|γ| low bits of x_{k-1} that the
multiplication by γ would drop. Then every step is exact and the backward pass can rebuild
each x_k instead of storing it.

Below: the block stack of a real ViT (its `EncoderBlock`s, attention + MLP, with dropout whose
keys are replayed), run forward while keeping every state, then run by the reversible forward
(`bdia_forward`: only x_K, x_{K-1} and the side bits are kept) and inverted back (`bdia_invert`). The rebuilt states are compared as uint32 bit patterns,
signs of zeros included: Q returns +0.0 for every zero, which is what the inverse rebuilds.
""")

code('''
exact_cfg = vit_config(**SETTINGS["exact_vit"],
                       update=bdia_jax.BDIA(gamma=GAMMA, frac_bits=FRAC_BITS),
                       backprop=bdia_jax.Reversible())
model = ViT(exact_cfg, rngs=nnx.Rngs(0))
depth, batch = exact_cfg.depth, SETTINGS["exact_batch"]
tokens = exact_cfg.num_patches + 1  # patches + class token

# The stacked blocks as a pure block_fn(params_k, x, context, key_k) with [depth, ...] params.
block_graph, block_params = nnx.split(model.stack.blocks, nnx.Param)


def block_fn(params_k, x, context, key_k):
    return nnx.merge(block_graph, params_k)(x, context, key_k)


x = jax.random.normal(jax.random.PRNGKey(1), (batch, tokens, exact_cfg.width))  # token embeddings
key = jax.random.PRNGKey(2)  # draws the γ signs and the per-block dropout keys
block_keys, gammas = bdia_jax.engine.prepare_keys_and_gammas(key, depth, batch, GAMMA)
x0 = bdia_jax.fixed_point.quantize(x, FRAC_BITS)  # the stack puts its input on the grid first



@jax.jit
def forward_and_invert(block_params, x0, block_keys, gammas):
    """All forward states [depth+1, ...]; the reversible forward's record; the states rebuilt
    from it."""
    pair = dict(update=exact_cfg.update, keys=block_keys, gammas=gammas)
    states = bdia_jax.engine.bdia_all_states(block_fn, block_params, x0, **pair)
    record = bdia_jax.engine.bdia_forward(block_fn, block_params, x0, **pair)
    rebuilt = bdia_jax.engine.bdia_invert(block_fn, block_params, record, **pair)
    return states, record, rebuilt


states, record, rebuilt = forward_and_invert(block_params, x0, block_keys, gammas)

print(f"ViT blocks: depth {depth}, width {exact_cfg.width}, {tokens} tokens, batch {batch}, "
      f"γ = ±{GAMMA}, δ = 2^-{FRAC_BITS}, dropout {exact_cfg.dropout}")
print(f"γ draw for block 1..{depth - 1}, sample 0: {np.asarray(gammas[:, 0]).tolist()}")


def bit_patterns(a):
    """uint32 view of float32 values (tells -0.0 from +0.0)."""
    return np.asarray(a).view(np.uint32)


forward_bits, rebuilt_bits = bit_patterns(states), bit_patterns(rebuilt)
for k in range(depth + 1):
    differ = int(np.count_nonzero(forward_bits[k] != rebuilt_bits[k]))
    print(f"x_{k:<2d} max|x| {float(jnp.max(jnp.abs(states[k]))):8.3f}   "
          f"bit patterns equal: {differ == 0}   ({differ} of {forward_bits[k].size} elements "
          f"differ)")
assert np.array_equal(forward_bits, rebuilt_bits), "reversal was not bit-exact"
assert np.array_equal(np.asarray(states), np.asarray(rebuilt))  # as numbers, too
assert not bool(record.stats.overflow), "the states left the exact range of the grid"
''')

code('''
# What the reversible forward pass keeps, against storing every state: x_K and x_{K-1}, plus
# side bits [depth-1, batch, m, ceil(elements/8)] uint8 (m = 1 bit per element per block).
two_states = record.x_last.nbytes + record.x_before.nbytes
print(f"all {depth + 1} states: {states.nbytes / 2**10:.1f} KiB;  kept by the reversible "
      f"forward pass: x_K and x_K-1 {two_states / 2**10:.1f} KiB + side bits "
      f"{record.side_bits.nbytes / 2**10:.2f} KiB {record.side_bits.shape}")
''')


md("""
**Without the grid** the same recurrence in plain float32 cannot be run backwards exactly: the
inverse divides by γ = ±0.5, so every rounding error doubles per block on the way down.
""")

code('''
def block_at(k, x_k):
    """h_k(x_k) with block k's parameters and dropout key."""
    return block_fn(jax.tree.map(lambda p: p[k], block_params), x_k, None, block_keys[k])


def float_bdia_states(x_first):
    """The unquantized BDIA forward pass (same blocks, keys and γ draw), all states."""
    xs = [x_first, x_first + block_at(0, x_first)]
    for k in range(1, depth):
        g = gammas[k - 1][:, None, None]
        xs.append(g * xs[k - 1] + (1 - g) * xs[k] + (1 + g) * block_at(k, xs[k]))
    return xs


def float_bdia_inverse(x_last, x_before):
    """x_{k-1} = (x_{k+1} - (1-γ) x_k - (1+γ) h_k(x_k)) / γ, from the top down."""
    xs = {depth: x_last, depth - 1: x_before}
    for k in range(depth - 1, 0, -1):
        g = gammas[k - 1][:, None, None]
        xs[k - 1] = (xs[k + 1] - (1 - g) * xs[k] - (1 + g) * block_at(k, xs[k])) / g
    return [xs[k] for k in range(depth + 1)]


float_states = float_bdia_states(x)
float_rebuilt = float_bdia_inverse(float_states[-1], float_states[-2])
for k in range(depth + 1):
    error = float(jnp.max(jnp.abs(float_rebuilt[k] - float_states[k])))
    print(f"float32 inverse, x_{k:<2d}: max |rebuilt - forward| = {error:.3g}")
''')

md("""
**In training** the check is built in: each stacked-layers module holds a `ReversalProbe`
(a zero scalar). With `backprop=Reversible()`, the gradient of the loss with respect to it is the
largest |rebuilt − forward| state difference seen in the backward pass, so every training step
reports its own reversal error (it is the `reversal_error` column of the training logs). Here it is
for one gradient of the whole ViT, next to the gradient of the same model by ordinary autodiff
(the oracle, storing all activations): they agree up to float rounding (different summation order).
""")

code('''
images = jax.random.normal(jax.random.PRNGKey(3), (batch, exact_cfg.image_size,
                                                   exact_cfg.image_size, 3))
labels = jax.random.randint(jax.random.PRNGKey(4), (batch,), 0, exact_cfg.num_classes)
graph_rev, params, probes, rest = nnx.split(model, nnx.Param, ReversalProbe, ...)
# The same parameters in the autodiff model (only the gradient method differs).
graph_ad = nnx.split(ViT(dataclasses.replace(exact_cfg, backprop=bdia_jax.Autodiff()),
                         rngs=nnx.Rngs(0)),
                     nnx.Param, ReversalProbe, ...)[0]


def make_grad(graph):
    def loss(params, probes):
        logits, _ = nnx.merge(graph, params, probes, rest)(images, key=key, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


grads_rev, probe_grads = make_grad(graph_rev)(params, probes)
grads_ad, _ = make_grad(graph_ad)(params, probes)
reversal_error = float(sum(jax.tree.leaves(probe_grads)))
largest = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads_ad))
difference = max(float(jnp.max(jnp.abs(a - b)))
                 for a, b in zip(jax.tree.leaves(grads_rev), jax.tree.leaves(grads_ad)))
print(f"reversal error (probe gradient): {reversal_error}")
print(f"reversible vs autodiff gradient: max |difference| {difference:.3g} "
      f"(largest |gradient| {largest:.3g}, ratio {difference / largest:.2g})")
assert reversal_error == 0.0, "the backward pass did not rebuild the states exactly"
''')

# --------------------------------------------------------------------------- 2. memory

md("""
## 2. Compiled memory at growing depth

For each method and depth, XLA compiles the full value-and-grad step of a pre-LN attention + MLP
stack (`benchmarks/memory_benchmark.py`) and reports the program's memory
(`memory_analysis()`: arguments + outputs + temporaries). Nothing is run, so large shapes cost
only compile time (on a CPU they compile at LLVM -O0: XLA assigns the buffers before LLVM, so
the figures are the same, in a fraction of the time). The *activation* memory per block is the mixed
slope ∂²M/∂depth∂batch (parameters and their gradients grow with depth but not with batch, so
they drop out), in bits
per element of the residual stream: standard backprop stores every intermediate of every block,
per-block remat stores each block's input (32 bits), reversible BDIA only its side bit (m = 1).
""")

code('''
mem = SETTINGS["memory"]
MEMORY_METHODS = mem["methods"]  # keys of benchmarks.memory_benchmark.METHODS
big_batch = mem["batches"][-1]
slope_depths = mem["depths"][-2:]  # the mixed slope uses the two largest depths
# Every depth at the largest batch (the plot), the other batches only where the slope needs them.
points = sorted({(d, big_batch) for d in mem["depths"]}
                | {(d, b) for d in slope_depths for b in mem["batches"]})
block = make_attn_mlp_block(heads=mem["heads"])
compiled = {m: {} for m in MEMORY_METHODS}  # method -> {(depth, batch): bytes}
start = time.perf_counter()
for method in MEMORY_METHODS:
    _, kind, backprop, recompute = memory_benchmark.METHODS[method]
    step = memory_benchmark.make_step(kind, backprop, block, GAMMA, FRAC_BITS, recompute)
    for d, b in points:
        stack_params = init_attn_mlp(jax.random.PRNGKey(1), d, mem["dim"], mem["hidden"])
        shape = jax.ShapeDtypeStruct((b, mem["seq"], mem["dim"]), jnp.float32)
        compiled[method][(d, b)] = step_memory(
            step, stack_params, shape, jax.random.PRNGKey(0),
            compiler_options=memory_only_options())["peak_estimate_bytes"]
    print(f"compiled {method} at {len(points)} (depth, batch) points "
          f"({time.perf_counter() - start:.0f}s)")

elements = mem["seq"] * mem["dim"]
print(f"\\n{BACKEND}: seq {mem['seq']}, width {mem['dim']}, MLP {mem['hidden']}, "
      f"batches {mem['batches']}, γ = ±{GAMMA}; activation slope between depths {slope_depths}")
print(f"{'method':45s} {'bits/element/block':>18s} {'MiB at depth ' + str(mem['depths'][-1]):>18s}")
for method in MEMORY_METHODS:
    totals = [[compiled[method][(d, b)] for d in slope_depths] for b in mem["batches"]]
    bits = memory_benchmark.mixed_slope(slope_depths, mem["batches"], totals) * 8 / elements
    print(f"{memory_benchmark.METHODS[method][0]:45s} {bits:18.2f} "
          f"{compiled[method][(mem['depths'][-1], big_batch)] / 2**20:18.1f}")

fig, ax = plt.subplots(figsize=(6.5, 4.2))
for method in MEMORY_METHODS:
    ax.plot(mem["depths"], [compiled[method][(d, big_batch)] / 2**20 for d in mem["depths"]],
            marker="o", label=memory_benchmark.METHODS[method][0])
ax.set(xlabel="depth (blocks)", ylabel=f"compiled step memory (MiB), batch {big_batch}",
       title=f"value-and-grad memory vs depth ({BACKEND})")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
plt.show()
''')


# --------------------------------------------------------------------------- 3. training

md("""
## 3. Training BDIA-ViT against ViT on CIFAR-10

`experiments.vit_cifar.train_and_evaluate` trains the standard ViT and then the BDIA-ViT
(reversible backprop) from the same initialisation, on the same batches, augmentations and keys,
evaluates both with E[γ] = 0 (at inference BDIA-ViT is a standard ViT on the grid) and runs the
inference-γ sweep. It prints a progress bar, a line per epoch and a side-by-side table, and writes
`metrics.jsonl`, `summary.json`, plots and Orbax checkpoints to the run folder (one per distinct
config: running the cell again resumes an interrupted run, or reuses a finished one). The same run from a shell:
`python -m experiments.vit_cifar --config=experiments/configs/vit_cifar.py:quick`.
""")

code('''
if SETTING == "full":
    config = get_config("paper")  # the paper's setting, unchanged
elif SETTING == "default":
    config = get_config("quick")  # the README's quick preset (see its results section)
    config.eval.sweep_gammas = (-0.5, -0.375, -0.25, -0.125, 0.0, 0.125, 0.25, 0.375, 0.5)
    if ACCELERATOR:  # all of CIFAR-10, a few epochs
        config.train.num_epochs = 5
        config.eval.sweep_num_examples = 0
    else:  # a CPU: 80 steps on the first 10,240 training images, 2,000 test images
        config.data.num_train_examples = 10240
        config.data.num_test_examples = 2000
        config.train.log_every_steps = 10
        config.eval.sweep_num_examples = 1000
else:  # smoke: a tiny ViT, a few steps on random mock images
    config = get_config("tiny")
    config.data.num_train_examples = 64
    config.data.num_test_examples = 64
    config.train.num_epochs = 1
    config.train.log_every_steps = 1
    config.eval.sweep_gammas = (-0.5, 0.0, 0.5)
config.train.progress = "on"  # progress bars also when stderr is not a terminal
config.data.data_dir = DATA_DIR
# One run folder per distinct config: rerunning reuses it, a changed config starts a new one.
config_hash = hashlib.sha1(config.to_json(sort_keys=True).encode()).hexdigest()[:8]
workdir = os.path.join(OUTPUT_ROOT, f"notebook_{SETTING}_{BACKEND}_{config_hash}")
m, bdia = config.model, config.methods.bdia
print(f"preset {config.preset}, mode {config.mode}: ViT width {m.width}, depth {m.depth}, "
      f"{m.num_heads} heads, MLP {m.mlp_dim}, patch {m.patch_size}; {config.train.num_epochs} "
      f"epoch(s) of batch {config.train.batch_size}; BDIA γ = ±{bdia.gamma}, "
      f"l = {bdia.frac_bits}; run folder {workdir}")
''')

code('''
train_start = time.perf_counter()
if SMOKE:
    import tensorflow_datasets as tfds

    print("SMOKE: random mock images from tfds.testing.mock_data; the numbers mean nothing.")
    with tfds.testing.mock_data(num_examples=max(config.data.num_train_examples,
                                                 config.data.num_test_examples)):
        summary = vit_cifar.train_and_evaluate(config, workdir)
else:
    summary = vit_cifar.train_and_evaluate(config, workdir)
print(f"training cell: {time.perf_counter() - train_start:.0f}s")
''')

code('''
# Curves from metrics.jsonl (one record per logging step / evaluation).
records_path = os.path.join(workdir, "metrics.jsonl")
names = [r["name"] for r in summary["models"].values()]
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
for index, name in enumerate(names):
    color = f"C{index}"
    train = run_metrics.read_records(records_path, model=name, kind="train")
    evals = run_metrics.read_records(records_path, model=name, kind="eval")
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], color=color, label=name)
    axes[1].plot(steps, [r["accuracy"] for r in train], color=color, alpha=0.6,
                 label=f"{name} train (batch mean)")
    axes[1].plot([r["step"] for r in evals], [r["accuracy"] for r in evals], color=color,
                 marker="o", linestyle="--", label=f"{name} test")
    axes[2].plot(steps, [r["max_abs"] for r in train], color=color, label=name)
axes[0].set(xlabel="step", ylabel="training loss", title="training loss")
axes[1].set(xlabel="step", ylabel="accuracy", title="accuracy (test: E[γ] = 0)")
axes[2].set(xlabel="step", ylabel="max |x_k|", title="residual-stream range (exact up to "
            f"{bdia_jax.fixed_point.exact_range(jnp.float32, FRAC_BITS):g} at l = {FRAC_BITS})")
for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend()
plt.tight_layout()
plt.show()

for r in summary["models"].values():
    compiled_mem = r["memory"]["compiled"] or {}
    temp = compiled_mem.get("temp_bytes")
    print(f"{r['name']:9s} test accuracy {r['test_accuracy_final']:.2%} (best "
          f"{r['test_accuracy_best']:.2%}); {r['steps']} steps at "
          f"{(r['step_time_s'] or float('nan')) * 1e3:.0f} ms; train-step temp memory "
          f"{'n/a' if temp is None else f'{temp / 2**20:.1f} MiB'}; reversal error "
          f"{r['reversal_error_max'] if r['reversal_exact'] is not None else 'n/a'}; "
          f"overflow steps {r['overflow_steps']}")
bdia_result = summary["models"]["bdia"]
error = bdia_result["reversal_error_max"]
assert bdia_result["reversal_exact"], (
    f"in training the backward pass did NOT rebuild the BDIA-ViT states exactly (largest state "
    f"difference {error:g} = {error * 2**FRAC_BITS:g} grid steps δ), so its gradients were "
    f"off. Retry with config.methods.bdia.recompute = 'separate' and please report it with "
    f"the settings above.")
''')

# --------------------------------------------------------------------------- 4. γ sweep

md("""
## 4. Inference-γ sweep

At inference BDIA-ViT normally uses E[γ] = 0, i.e. the standard ViT update. The sweep instead
applies a fixed γ at every block, x_{k+1} = γ x_{k-1} + (1 − γ) x_k + (1 + γ) h_k, to both trained
models (the standard ViT's parameters in the unquantized update, as in the paper). A model trained
with random γ = ±0.5 has seen such averaging and should hold its accuracy over a range of γ; the
standard ViT was only ever trained at γ = 0. (The run above already swept `config.eval.sweep_gammas`
on the final parameters; this cell plots it.)
""")

code('''
fig, ax = plt.subplots(figsize=(6.5, 4.2))
for r in summary["models"].values():
    sweep = r["gamma_sweep"]
    ax.plot(sweep["gammas"], sweep["accuracy"], marker="o", label=r["name"])
    print(f"{r['name']:9s} on {sweep['num_examples']} test images: " + ", ".join(
        f"γ={g:+.3f}: {a:.1%}" for g, a in zip(sweep["gammas"], sweep["accuracy"])))
ax.set(xlabel="inference γ", ylabel="test accuracy", title="test accuracy against inference γ")
ax.grid(alpha=0.3)
ax.legend()
plt.show()
''')

md("""
## Where to go from here

* `python -m experiments.vit_cifar --config=experiments/configs/vit_cifar.py:paper` runs the
  full comparison from a shell (add `--config.model.compute_dtype=bfloat16` on a GPU/TPU).
* `python -m benchmarks.memory_benchmark` prints the memory/speed table of section 2 with timings.
* `bdia_jax.apply_stack(block_fn, params, x, update=BDIA(), backprop=Reversible(), key=...)`
  makes any residual stack of identical blocks reversible; `bdia_jax.models` has the ViT, a GPT
  and an encoder-decoder built on it.
""")


# --------------------------------------------------------------------------- writing


def build() -> nbformat.NotebookNode:
    """The notebook, outputs cleared, with stable cell ids (so regenerating is a no-op)."""
    cells = []
    for index, (kind, source) in enumerate(CELLS):
        make = new_markdown_cell if kind == "md" else new_code_cell
        cells.append(make(source, id=f"cell-{index:02d}"))
    notebook = new_notebook(cells=cells)
    notebook.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "colab": {"provenance": []},
    }
    nbformat.validate(notebook)
    return notebook


def render() -> str:
    return nbformat.writes(build())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the notebook on disk differs from this script's")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        with open(NOTEBOOK_PATH) as f:
            if f.read() != text:
                print(f"{NOTEBOOK_PATH} is out of date: run python notebooks/build_notebook.py",
                      file=sys.stderr)
                return 1
        return 0
    with open(NOTEBOOK_PATH, "w") as f:
        f.write(text)
    print(f"wrote {NOTEBOOK_PATH} ({len(CELLS)} cells)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
