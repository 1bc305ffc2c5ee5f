"""Writes ``notebooks/bdia_finetune_llama.ipynb`` from the cells below (outputs cleared).

    python notebooks/build_finetune_notebook.py           # regenerate the notebook
    python notebooks/build_finetune_notebook.py --check   # exit 1 if the committed one differs

Edit the notebook here, not in Jupyter: the .ipynb is generated, so reviews read this file
and ``tests/test_notebook.py`` checks that the two agree and that the notebook runs (offline,
on the GGUF in ../shared/models, with ``BDIA_NOTEBOOK_SMOKE=1``).
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

NOTEBOOK_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                             "bdia_finetune_llama.ipynb")

# (kind, source) in order; "md" = markdown, "code" = code.
CELLS: list[tuple[str, str]] = []


def md(source: str) -> None:
    CELLS.append(("md", textwrap.dedent(source).strip("\n")))


def code(source: str) -> None:
    CELLS.append(("code", textwrap.dedent(source).strip("\n")))


# --------------------------------------------------------------------------- intro + install

md("""
# Fine-tune a Llama-family model with BDIA: exact reversal, less memory, a Hugging Face export

[`bdia_jax`](../README.md) trains an *unchanged* pretrained transformer with the BDIA update
(Zhang, Lewis & Kleijn, *On Exact Bit-level Reversible Transformers Without Changing
Architectures*, ICML 2025): every block's input is rebuilt, bit for bit, from its output in the
backward pass, so the activations of the block stack need not be stored. This notebook
fine-tunes SmolLM2-135M-Instruct (a Llama-architecture model) on E2E restaurant descriptions:

1. **Load** the pretrained checkpoint (a Hugging Face hub download, or a GGUF file offline) with
   the BDIA method, and add LoRA adapters.
2. **Train** a few steps; every step reports its *reversal error*, which must be exactly 0.
3. **Memory**: the compiled train step of standard backprop, per-block remat and reversible
   BDIA at the same shape.
4. **Export** the fine-tuned model as a Hugging Face folder (adapters merged), read it back and
   let it **generate** text with the KV cache.

**Runs on** a Colab GPU or TPU runtime (Runtime > Change runtime type) or a plain machine with
the repository checked out (`pip install -r requirements.txt`, then open this notebook from
`notebooks/`). `BDIA_NOTEBOOK_SMOKE=1` in the environment shrinks everything to seconds on the
offline GGUF (the CI test runs it that way).
""")

# huggingface_hub: the hub download (Colab has it; a no-op there).
code(setup_cell(modules=('bdia_jax',), extra_packages=('huggingface_hub',)))

# --------------------------------------------------------------------------- parameters

md("""
## Parameters

`CHECKPOINT` picks the model: `"hub"` downloads `HUB_MODEL` from the Hugging Face hub (a
folder of config.json + safetensors + tokenizer files), a path loads that folder or `.gguf`
file, and `"auto"` uses the offline GGUF of this repository's `../shared/models` when it is
there and the hub cannot be reached (or in a smoke run), else the hub.
`FULL_FINETUNE = True` trains every weight with BDIA instead of LoRA adapters.
""")

code('''
import socket

# "auto" | "hub" | a path to a Hugging Face folder or a .gguf file.
CHECKPOINT = os.environ.get("BDIA_NOTEBOOK_CHECKPOINT", "auto")
HUB_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # any Llama, Qwen2/3, Mistral or GPT-2 repo
SHARED = os.path.join(os.path.dirname(REPO_ROOT), "shared")  # offline data beside the checkout
OFFLINE_GGUF = os.path.join(SHARED, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
# E2E NLG CSVs (columns mr, ref): the offline copy, else the dataset's public release.
E2E_DIR = os.path.join(SHARED, "data", "e2e")
E2E_URL = "https://github.com/tuetschek/e2e-dataset/releases/download/v1.0.0/e2e-dataset.zip"
FULL_FINETUNE = False  # True: BDIA on every weight; False: LoRA adapters (+ BDIA)

# CI: BDIA_NOTEBOOK_SMOKE=1 makes every size tiny and never touches the network.
SMOKE = os.environ.get("BDIA_NOTEBOOK_SMOKE", "0") == "1"
# Where the downloads and the exported model are written.
OUTPUT_ROOT = os.environ.get("BDIA_NOTEBOOK_WORKDIR") or os.path.join(REPO_ROOT, "runs")


def hub_reachable() -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


if CHECKPOINT == "auto":
    if os.path.isfile(OFFLINE_GGUF) and (SMOKE or not hub_reachable()):
        CHECKPOINT = OFFLINE_GGUF
    elif SMOKE:
        raise FileNotFoundError(f"BDIA_NOTEBOOK_SMOKE=1 runs offline on {OFFLINE_GGUF}, which "
                                "is absent: set BDIA_NOTEBOOK_CHECKPOINT to a local checkpoint.")
    else:
        CHECKPOINT = "hub"
if CHECKPOINT == "hub":
    from huggingface_hub import snapshot_download  # pip install huggingface_hub

    CHECKPOINT = snapshot_download(
        HUB_MODEL, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"])
print(f"checkpoint: {CHECKPOINT}")
''')

code('''
import csv
import dataclasses
import io
import tempfile
import time
import urllib.request
import zipfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import bdia_jax
from bdia_jax import pretrained, training
from bdia_jax.formats import write_tokenizer
from bdia_jax.models import DecoderLM, LoRA, merge_lora, with_lora

BACKEND = jax.default_backend()  # "cpu", "gpu" or "tpu"
ACCELERATOR = BACKEND != "cpu"
SETTING = "smoke" if SMOKE else ("accelerator" if ACCELERATOR else "cpu")
# Every size in one place. context: tokens per training row; new_tokens: generated tokens.
SIZES = {
    "smoke": dict(batch=2, context=64, steps=2, lora_rank=4, learning_rate=1e-3,
                  new_tokens=8, log_every=1, remat=False),
    "cpu": dict(batch=4, context=64, steps=20, lora_rank=8, learning_rate=1e-3,
                new_tokens=24, log_every=2, remat=True),
    "accelerator": dict(batch=16, context=128, steps=300, lora_rank=16, learning_rate=1e-3,
                        new_tokens=32, log_every=20, remat=True),
}[SETTING]
if FULL_FINETUNE:
    SIZES["learning_rate"] = 2e-5
# BDIA: γ = ±0.5 (m = 1 side bit per element per block) on the grid δ = 2^-l. SmolLM2's
# residual stream leaves the exact range 2^24·2^-9 of the paper's l = 9; l = 7 holds 2^17
# (docs/results.md, "Fine-tuning SmolLM2-135M").
BDIA_METHOD = dict(update="bdia", gamma=0.5, frac_bits=7, backprop="reversible")
print(f"jax {jax.__version__} on {jax.device_count()} {BACKEND} device(s); setting {SETTING}: "
      f"{SIZES}")
''')

# --------------------------------------------------------------------------- 1. load

md("""
## 1. Load the checkpoint with BDIA, add LoRA adapters

`pretrained.load(path)` alone returns the checkpoint's own network (standard update, off the
grid). The BDIA keywords make it a BDIA model: during training the residual stream lives on the
fixed-point grid and the update draws γ = ±0.5 per sample and block; at inference (γ = 0) it
is the checkpoint's network on the grid. `with_lora` adds adapters whose B factor is zero, so
the model still computes the checkpoint's logits until it is trained.
""")

code('''
start = time.perf_counter()
tokenizer = pretrained.load_tokenizer(CHECKPOINT)
model = pretrained.load(CHECKPOINT, **BDIA_METHOD)
if not FULL_FINETUNE:
    lora = LoRA(rank=SIZES["lora_rank"], alpha=2.0 * SIZES["lora_rank"],
                targets=("q", "k", "v", "o", "gate", "up", "down"))
    model = with_lora(model, lora, rngs=nnx.Rngs(0))
# LoRA: only the adapters train (the base weights get no gradients, no optimizer state).
TRAINABLE = nnx.Param if FULL_FINETUNE else nnx.LoRAParam
EOS_ID = tokenizer.token_to_id("<|endoftext|>")
if EOS_ID is None:
    raise ValueError(f"{CHECKPOINT}: its tokenizer has no <|endoftext|> token, which ends "
                     "every training text here: set EOS_ID to the checkpoint's end token.")

c = model.config
n_params, n_trained = (sum(x.size for x in jax.tree.leaves(nnx.state(model, f)))
                       for f in (nnx.Param, TRAINABLE))
print(f"{c.depth} blocks, width {c.width}, {c.num_heads} query / {c.kv_heads} key-value heads, "
      f"MLP {c.mlp_dim}, vocabulary {c.vocab_size}, context {c.max_len}; "
      f"{n_params / 1e6:.1f}M parameters, {n_trained / 1e6:.2f}M trained; "
      f"update {c.update}, backprop {c.backprop} ({time.perf_counter() - start:.0f}s)")
''')

# --------------------------------------------------------------------------- data

md("""
## The data: E2E NLG

Each example is `mr → ref<|endoftext|>`: a meaning representation (`name[The Eagle],
food[French], ...`), an arrow, and a human-written restaurant description. The loss is on the
description and its end token only. The last meaning representation is held out as the
generation prompt. (Without the offline copy or a network, a few hand-written rows in the
E2E style stand in.)
""")

code('''
SAMPLE = [  # hand-written rows in the E2E style, used only when no E2E file can be read
    ("name[Blue Door], eatType[pub], food[Italian], area[riverside]",
     "Blue Door is an Italian pub by the riverside."),
    ("name[Green Hill], eatType[coffee shop], priceRange[cheap], familyFriendly[yes]",
     "Green Hill is a cheap, family-friendly coffee shop."),
    ("name[The Lantern], food[Indian], customer rating[high], area[city centre]",
     "The Lantern serves highly rated Indian food in the city centre."),
    ("name[Old Mill], eatType[restaurant], food[English], priceRange[moderate]",
     "Old Mill is a moderately priced restaurant serving English food."),
    ("name[Red Kite], eatType[pub], familyFriendly[no], near[Old Mill]",
     "Red Kite is a pub near Old Mill that is not family-friendly."),
    ("name[Sea Glass], food[Japanese], priceRange[high], area[riverside]",
     "Sea Glass is an expensive Japanese place on the riverside."),
]


def read_e2e() -> tuple[list[tuple[str, str]], str]:
    """(mr, ref) rows and where they came from: the offline devset.csv, else the public
    release's trainset.csv."""
    path = os.path.join(E2E_DIR, "devset.csv")
    if os.path.isfile(path):
        with open(path, newline="", encoding="utf-8") as f:
            return [(r["mr"], r["ref"]) for r in csv.DictReader(f)], path
    if not SMOKE:
        try:
            with urllib.request.urlopen(E2E_URL, timeout=30) as response:
                archive = zipfile.ZipFile(io.BytesIO(response.read()))
            name = next((n for n in archive.namelist() if n.endswith("trainset.csv")), None)
            if name is None:
                raise ValueError(f"{E2E_URL} holds no trainset.csv: {archive.namelist()}")
            text = io.TextIOWrapper(archive.open(name), encoding="utf-8", newline="")
            return [(r["mr"], r["ref"]) for r in csv.DictReader(text)], f"{E2E_URL}:{name}"
        except OSError as err:
            print(f"E2E download failed ({err}): training on the hand-written sample")
    return SAMPLE, "the hand-written sample"


rows, source = read_e2e()
held_out_mr = rows[-1][0]  # its rows are not trained on
rows = [r for r in rows if r[0] != held_out_mr]
order = np.random.default_rng(0).permutation(len(rows))
needed = SIZES["steps"] * SIZES["batch"]
train_rows = [rows[i] for i in order[:needed]]  # cycled when the data is smaller


def encode_row(mr: str, ref: str, context: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens int32 [context + 1] (padded with EOS), loss mask float32 [context]: 1 where
    the next token is part of the reference or its EOS."""
    prompt = tokenizer.encode(mr + " →", add_special_tokens=False).ids
    target = tokenizer.encode(" " + ref, add_special_tokens=False).ids + [EOS_ID]
    ids = (prompt + target)[:context + 1]
    tokens = np.full(context + 1, EOS_ID, np.int32)
    tokens[:len(ids)] = ids
    mask = np.zeros(context, np.float32)
    mask[len(prompt) - 1:len(ids) - 1] = 1.0  # position i predicts token i + 1
    return tokens, mask


def batch_at(step: int) -> dict:
    b = SIZES["batch"]
    picked = [train_rows[(step * b + j) % len(train_rows)] for j in range(b)]
    tokens, mask = zip(*(encode_row(mr, ref, SIZES["context"]) for mr, ref in picked))
    if not all(m.any() for m in mask):
        raise ValueError(f"a prompt of step {step} fills the whole context of "
                         f"{SIZES['context']} tokens: raise SIZES['context'].")
    return {"tokens": jnp.asarray(np.stack(tokens)), "mask": jnp.asarray(np.stack(mask))}


print(f"{len(rows)} training rows from {source}; held out: {held_out_mr!r}")
print("first example:", repr(tokenizer.decode(batch_at(0)["tokens"][0].tolist(),
                                              skip_special_tokens=False)))
''')

# --------------------------------------------------------------------------- 2. train + memory

md("""
## 2. Train with exact reversal, and what it saves

The train step is `bdia_jax.training`'s: `init` splits the model into the trained parameters
(here `TRAINABLE`), the reversal probes and the rest, and `make_train_step` returns a pure,
jittable step. A reversal probe is a zero added to each reversible stack's rebuilt input in the
backward pass; its gradient, reported as `reversal_error`, is the sum of the differences
between the rebuilt and the forward states: **exactly 0.0 when every state was rebuilt bit for
bit**. A step whose stream left the grid's exact range (`overflow`) or went non-finite is not
applied. The training loss is the BDIA network's, under random γ = ±0.5 (every block also
averages in its previous state), so it starts well above the checkpoint's own loss; the network
that is exported and generates below is the γ = 0 one (E[γ] = 0), the checkpoint's architecture.

Each method is compiled once, at the training shape, from the model's *shapes* only, and
`memory_analysis()` reads what XLA allocates: the arguments (weights, optimizer state, batch)
and the temporaries (activations kept for the backward pass and workspace). The BDIA step that
trains below is the same compiled program.
""")

code('''
optimizer = optax.adamw(SIZES["learning_rate"])


def loss_fn(model, batch, key):
    """Mean next-token NLL on the masked positions; the model's health flags as metrics."""
    logits, aux = model(batch["tokens"][:, :-1], key=key, train=True)
    log_probs = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(log_probs, batch["tokens"][:, 1:, None], -1)[..., 0]
    loss = jnp.sum(nll * batch["mask"]) / jnp.maximum(jnp.sum(batch["mask"]), 1.0)
    return loss, {"max_abs": aux["max_abs"], "overflow": aux["overflow"],
                  "nonfinite": aux["nonfinite"]}


def compile_step(config, memory_only=False):
    """The jitted train step of a model with ``config``, compiled at the training shape from
    shapes alone (no weights are read or allocated). ``memory_only``: never run, so on a CPU
    it compiles at LLVM -O0: XLA assigns the buffers before LLVM, so the same memory figures,
    in a fraction of the compile time."""
    graphdef = None

    def abstract_init():
        nonlocal graphdef
        graphdef, state = training.init(DecoderLM(config, rngs=nnx.Rngs(0)), optimizer,
                                        jax.random.key(0), trainable=TRAINABLE)
        return state

    state_shape = jax.eval_shape(abstract_init)
    step = jax.jit(training.make_train_step(graphdef, loss_fn, optimizer, trainable=TRAINABLE),
                   donate_argnums=0)
    options = {"xla_backend_optimization_level": 0} if memory_only and BACKEND == "cpu" else None
    return step.lower(state_shape, jax.eval_shape(lambda: batch_at(0))).compile(
        compiler_options=options)


METHODS = {  # label: the method keywords of the same model
    "standard backprop": dict(update="standard", backprop="autodiff"),
    "standard + per-block remat": dict(update="standard", backprop="remat"),
    "BDIA, reversible": BDIA_METHOD,
}
if not SIZES["remat"]:
    del METHODS["standard + per-block remat"]  # smoke: one compile less
memory = {}
for label, method in METHODS.items():
    start = time.perf_counter()
    config = dataclasses.replace(model.config, **bdia_jax.parse_method(**method))
    compiled = compile_step(config, memory_only=method is not BDIA_METHOD)
    memory[label] = compiled.memory_analysis()
    print(f"compiled {label} ({time.perf_counter() - start:.0f}s)")
train_step = compiled  # the BDIA step (the last one compiled)
''')

code('''
def mib(n):
    return f"{n / 2**20:9.1f}"


base = memory["standard backprop"].temp_size_in_bytes
what = "all weights" if FULL_FINETUNE else "LoRA adapters"
print(f"{BACKEND}: train step of {what}, batch {SIZES['batch']} x {SIZES['context']} tokens\\n")
print(f"{'method':28s} {'temporaries MiB':>16s} {'arguments MiB':>14s} {'temp vs standard':>17s}")
for label, m in memory.items():
    print(f"{label:28s} {mib(m.temp_size_in_bytes):>16s} {mib(m.argument_size_in_bytes):>14s} "
          f"{m.temp_size_in_bytes / base:16.2f}x")
print("\\n(temporaries: activations kept for the backward pass plus workspace, the [batch, "
      "context, vocabulary] logits included; the saving grows with batch x context x depth)")
''')

code('''
graphdef, state = training.init(model, optimizer, jax.random.key(0), trainable=TRAINABLE)
del model  # its arrays now live in `state`; the step donates and replaces them
history = []
start = time.perf_counter()
for step in range(SIZES["steps"]):
    state, metrics = train_step(state, batch_at(step))
    metrics = {k: float(v) for k, v in metrics.items()}
    history.append(metrics)
    if step % SIZES["log_every"] == 0 or step == SIZES["steps"] - 1:
        print(f"step {step + 1:4d}  loss {metrics['loss']:.4f}  reversal error (probe "
              f"gradient): {metrics['reversal_error']}  max|x| {metrics['max_abs']:9.1f}  "
              f"overflow {bool(metrics['overflow'])}  ({time.perf_counter() - start:.0f}s)")
errors = [m["reversal_error"] for m in history]
assert all(e == 0.0 for e in errors), f"reversal was not exact: errors {errors}"
assert not any(m["skipped"] for m in history), (
    "a step was held (overflow or non-finite): lower BDIA_METHOD['frac_bits'] or the "
    "learning rate")
print(f"all {len(history)} steps: reversal error exactly 0.0, every update applied")

if len(history) > 1:
    plt.figure(figsize=(6, 3.5))
    plt.plot(np.arange(1, len(history) + 1), [m["loss"] for m in history])
    plt.xlabel("step")
    plt.ylabel("training loss (reference tokens)")
    plt.grid(alpha=0.3)
    plt.show()
''')

# --------------------------------------------------------------------------- 3. export

md("""
## 3. Export a Hugging Face folder, read it back, generate

`merge_lora` folds the adapters into the base weights; `pretrained.save` writes config.json and
safetensors (in shards above 2 GiB), which `transformers` reads too
(`AutoModelForCausalLM.from_pretrained(folder)`); `write_tokenizer` puts the checkpoint's
tokenizer beside it. Read back with `pretrained.load`, the folder is the fine-tuned network as
a standard model; `generate` decodes greedily with a KV cache (`max_len` at load only sizes that
cache).
""")

code('''
trained = training.merge(graphdef, state)
export = merge_lora(trained) if not FULL_FINETUNE else trained
os.makedirs(OUTPUT_ROOT, exist_ok=True)
EXPORT_DIR = tempfile.mkdtemp(prefix="finetuned-hf-", dir=OUTPUT_ROOT)
pretrained.save(export, EXPORT_DIR, eos_token_id=EOS_ID)
write_tokenizer(EXPORT_DIR, CHECKPOINT)
print(f"wrote {EXPORT_DIR}: " + ", ".join(
    f"{name} ({os.path.getsize(os.path.join(EXPORT_DIR, name)) / 2**20:.1f} MiB)"
    for name in sorted(os.listdir(EXPORT_DIR))))

prompt = tokenizer.encode(held_out_mr + " →", add_special_tokens=False).ids
reloaded = pretrained.load(EXPORT_DIR, max_len=len(prompt) + SIZES["new_tokens"])
saved = nnx.state(export, nnx.Param)
same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), saved,
                    nnx.state(reloaded, nnx.Param))
assert all(jax.tree.leaves(same)), "the exported weights did not read back bit for bit"
print(f"read back: {reloaded.config.update}, every weight equal to the trained one, bit for bit")
''')

code('''
start = time.perf_counter()
out = reloaded.generate(jnp.asarray([prompt], jnp.int32), SIZES["new_tokens"], temperature=0.0)
new = np.asarray(out)[0, len(prompt):].tolist()
if EOS_ID in new:
    new = new[:new.index(EOS_ID)]
print(f"prompt:       {held_out_mr} →")
print(f"continuation: {tokenizer.decode(new)!r}  ({len(new)} tokens, greedy, "
      f"{time.perf_counter() - start:.0f}s)")
''')

code('''
# The same folder in Hugging Face transformers (when installed, as on Colab; not in smoke runs).
if not SMOKE and importlib.util.find_spec("transformers") and importlib.util.find_spec("torch"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(EXPORT_DIR)
    hf_model = AutoModelForCausalLM.from_pretrained(EXPORT_DIR)  # float32, as saved
    ids = torch.tensor([prompt])
    hf_out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=SIZES["new_tokens"], pad_token_id=EOS_ID)
    hf_text = hf_tokenizer.decode(hf_out[0, len(prompt):], skip_special_tokens=True)
    print(f"transformers: {hf_text!r}")
''')

md("""
## Where to go from here

* `python -m experiments.finetune_lm --config=experiments/configs/finetune_lm.py:smollm2_e2e`
  runs the full comparison (standard, standard + dropout, BDIA, LoRA, LoRA + BDIA) with BLEU on
  the E2E test set and writes each model as a Hugging Face folder; point
  `--config.model.checkpoint` at a hub download to use another model.
* `pretrained.save_peft_adapter(model, folder)` writes the adapters alone, in PEFT's layout.
* `notebooks/bdia_vit_cifar.ipynb` shows the reversal on the bits and the memory against depth.
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
        "accelerator": "GPU",
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
                print(f"{NOTEBOOK_PATH} is out of date: run python "
                      "notebooks/build_finetune_notebook.py", file=sys.stderr)
                return 1
        return 0
    with open(NOTEBOOK_PATH, "w") as f:
        f.write(text)
    print(f"wrote {NOTEBOOK_PATH} ({len(CELLS)} cells)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
