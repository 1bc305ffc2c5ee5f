"""Standard ViT vs BDIA-ViT (and RevViT) on CIFAR-10: the project's main job.

    python -m experiments.vit_cifar                       # quick preset, ViT and BDIA-ViT
    python -m experiments.vit_cifar --config.mode=table1  # ViT, RevViT, BDIA-ViT (Table 1)
    python -m experiments.vit_cifar --config=experiments/configs/vit_cifar.py:overfit

Modes beyond the trainer's (``experiments.common.trainer``): "table1" trains ViT, RevViT and
BDIA-ViT; "gamma_ablation" the unquantized BDIA-ViT (autodiff) at γ = 0, ±0.25, ±0.5, ±0.6
(Table 2). RevViT shares ``config.model``; its floating-point reconstruction error is
reported, not checked to be 0; it has no inference γ. Training uses on-device crop/flip
augmentation; evaluation is at E[γ] = 0, then the inference-γ sweep. Writes to
``--workdir``: metrics.jsonl, summary.json, config.json, curves.png, gamma_sweep.png and
Orbax checkpoints (rerunning the same command resumes).
"""

from __future__ import annotations

if __name__ == "__main__":  # --help at once, before the imports below load JAX
    from experiments.common.quick_help import exit_if_help

    exit_if_help("vit_cifar", __doc__)

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bdia_jax import training
from bdia_jax.models import RevViT, RevViTConfig, ViT, ViTConfig
from experiments.common import data_checks, plots, sharding, trainer
from experiments.common.loop import log
from experiments.configs.vit_cifar import GAMMA_ABLATION, PRESETS
from experiments.data import cifar

# The inference update that a standard ViT's parameters are swept in (the paper applies
# γ to a conventionally trained model this way; at γ = 0 it is the standard transformer).
SWEEP_METHOD = dict(update="bdia", frac_bits=None, quantize_at_inference=False,
                    backprop="autodiff")


def sweep_config_for(vit_cfg: ViTConfig, update: str) -> ViTConfig:
    """The model that evaluates ``vit_cfg``'s parameters with an inference γ: itself for
    BDIA (``update`` "bdia"), else the same architecture with ``SWEEP_METHOD``."""
    if update == "bdia":
        return vit_cfg
    return dataclasses.replace(vit_cfg, **trainer.method_fields(SWEEP_METHOD))


def evaluate(step, state, data: cifar.ImageSplit, batch_size: int, mesh, gamma=None):
    """{"accuracy", "loss"} of ``state`` on ``data`` (every example once)."""
    gamma = None if gamma is None else jnp.float32(gamma)
    sums = trainer.sum_over(step, state, cifar.eval_batches(data, batch_size), mesh, gamma)
    return {"accuracy": sums["correct"] / sums["count"], "loss": sums["loss_sum"] / sums["count"]}


class ViTCifar(trainer.Task):
    name, presets = "vit_cifar", PRESETS
    config_class, model_class = ViTConfig, ViT
    architectures = {"revvit": trainer.Architecture(RevViTConfig, RevViT)}
    mode_models = {"table1": ("standard", "revvit", "bdia"),
                   "gamma_ablation": tuple(GAMMA_ABLATION)}
    display_names = {"standard": "ViT", "bdia": "BDIA-ViT", "revvit": "RevViT",
                     **{name: f"BDIA γ=±{g:g}" if g else "BDIA γ=0"
                        for name, g in GAMMA_ABLATION.items()}}
    summary_keys = ("loss", "accuracy", "reversal_error_max", "overflow_steps")
    data_dir_field = "data.data_dir"
    data_dir_help = "TFDS data dir (default: config.data.data_dir, then $TFDS_DATA_DIR)."
    errors = (cifar.DataMissingError,)
    resumable = ("data.data_dir", "data.download", "eval.batch_size", "eval.sweep_gammas",
                 "eval.sweep_num_examples")
    int_fields = {**{f"model.{f}": 1 for f in ("image_size", "patch_size", "num_classes",
                                               "width", "depth", "num_heads", "mlp_dim")},
                  **{f"data.{f}": 0 for f in ("num_train_examples", "num_test_examples",
                                              "crop_padding")},
                  "train.num_epochs": 1, "train.batch_size": 1, "train.eval_every_epochs": 1,
                  "eval.batch_size": 1}
    fraction_fields = ("optim.label_smoothing",)
    batch_fields = ("train.batch_size", "eval.batch_size")
    table = (("test accuracy (final, E[γ]=0)", "test_accuracy_final", "{:.2%}"),
             ("test accuracy (best)", "test_accuracy_best", "{:.2%}"),
             ("test loss (final)", "test_loss_final", "{:.4f}"))
    best, throughput = ("accuracy", "max", "test_accuracy_best"), ("images_per_s", "images")
    final = {"test_accuracy_final": "accuracy", "test_loss_final": "loss"}
    panels = (plots.Panel("loss", "cross-entropy", (
                  plots.Series("train", "loss", "training batches", alpha=0.7),
                  plots.Series("eval", "loss", "test", marker="o"))),
              plots.Panel("accuracy", "accuracy", (
                  plots.Series("train", "accuracy", "training batches", "--", alpha=0.7),
                  plots.Series("eval", "accuracy", "test", marker="o"))))
    plot_title = "CIFAR-10: loss and accuracy"

    def validate(self, config, checks, mesh):
        d, e = config.data, config.eval
        data_checks.check_tfds_name(d.name, "data.name", checks, example="cifar10",
                                    kind="image dataset")
        data_checks.check_tfds_data_dir(d.data_dir, "data.data_dir", checks)
        for field in ("download", "flip"):
            checks.one_of(d[field], (True, False), f"data.{field}")
        for field in ("train_split", "test_split"):
            data_checks.check_tfds_split(d[field], f"data.{field}", checks)
        checks.int_at_least(e.sweep_num_examples, "eval.sweep_num_examples", 0, " (0: all)")
        # A batch larger than the training split, from the prepared dataset's metadata:
        # before any data loads or any program compiles.
        batch, wanted = config.train.batch_size, d.num_train_examples
        size = (cifar.tfds_download.split_size(d.name, d.train_split, d.data_dir or None)
                if isinstance(batch, int) and isinstance(wanted, int) else None)
        if size is not None:
            used = size if wanted <= 0 else min(wanted, size)
            checks.require(used >= batch, "train.batch_size",
                           f"{batch} is larger than the {used} training examples "
                           f"({d.name} {d.train_split!r} has {size} in its TFDS metadata"
                           f"{f', num_train_examples={wanted}' if wanted > 0 else ''}); "
                           f"use at most {used}")
        checks.require(all(isinstance(g, (int, float)) and not isinstance(g, bool) and -1 < g < 1
                           for g in e.sweep_gammas), "eval.sweep_gammas",
                       f"values must be numbers in (-1, 1), got {tuple(e.sweep_gammas)}")

    def load_data(self, config, workdir, mesh):
        d = config.data
        kwargs = dict(data_dir=d.data_dir or None, download=d.download)
        splits = {split: cifar.load_split(d.name, d[f"{split}_split"],
                                               num_examples=d[f"num_{split}_examples"],
                                               **kwargs) for split in ("train", "test")}
        return {**splits, "source": f"tfds:{d.name}"}

    def data_record(self, data):
        return {"source": data["source"], "train_examples": len(data["train"]),
                "test_examples": len(data["test"])}

    def schedule(self, config, data):
        t = config.train
        spe = cifar.TrainBatches(data["train"], t.batch_size, config.seed).steps_per_epoch
        return t.num_epochs, spe, t.eval_every_epochs, t.batch_size

    def batch_fn(self, run):
        size = run.config.train.batch_size
        batches = cifar.TrainBatches(run.data["train"], size, run.seed)
        # Each process reads only the rows of every global batch that its devices hold.
        rows = sharding.process_rows(run.mesh, size)
        return lambda step: sharding.shard_local_batch(batches(step, rows), run.mesh, size)

    def train_batch_shapes(self, config):
        b, size = config.train.batch_size, config.model.image_size
        return {"image": ((b, size, size, 3), np.uint8), "label": ((b,), np.int32)}, {}

    def loss_fn(self, config):
        """batch: {"image": [b, H, W, C] uint8, "label": [b] int32}. The key is split into
        the augmentation key and the model key (γ signs, dropout), so every model sees
        identical augmentations."""
        padding, flip = config.data.crop_padding, config.data.flip
        smoothing, num_classes = config.optim.label_smoothing, config.model.num_classes

        def loss_fn(model, batch, key):
            augment_key, model_key = jax.random.split(key)
            images = cifar.random_crop_flip(batch["image"], augment_key, padding=padding,
                                                 flip=flip)
            logits, aux = model(cifar.normalize(images), key=model_key, train=True)
            targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes),
                                          smoothing)
            loss = optax.softmax_cross_entropy(logits, targets).mean()
            accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
            return loss, {"accuracy": accuracy, **aux}  # aux: max_abs, overflow, nonfinite

        return loss_fn

    def evaluator(self, run):
        step = trainer.model_step(run, cifar.eval_sums)
        size = run.config.eval.batch_size
        return lambda state: evaluate(step, state, run.data["test"], size, run.mesh)

    def report(self, run, state):
        """The inference-γ sweep on the final parameters."""
        e, test = run.config.eval, run.data["test"]
        gammas = [float(g) for g in e.sweep_gammas]
        sweep = {"gammas": [], "accuracy": [], "num_examples": 0}
        if gammas and "architecture" not in run.method:  # RevViT: no inference γ
            sweep_cfg = sweep_config_for(run.model_config, run.method.get("update"))
            graphdef = run.graphdef if sweep_cfg == run.model_config else training.split(
                nnx.eval_shape(lambda: ViT(sweep_cfg, rngs=nnx.Rngs(run.seed))))[0]
            step = trainer.model_step(run, cifar.eval_sums, graphdef=graphdef)
            n = e.sweep_num_examples or len(test)
            subset = cifar.ImageSplit(test.images[:n], test.labels[:n])
            sweep["num_examples"] = len(subset)
            start = time.perf_counter()
            for gamma in gammas:
                acc = evaluate(step, state, subset, e.batch_size, run.mesh, gamma)["accuracy"]
                sweep["gammas"].append(gamma)
                sweep["accuracy"].append(acc)
                run.writer.write({"model": run.display, "kind": "sweep", "step": run.num_steps,
                                  "inference_gamma": gamma, "accuracy": acc,
                                  "num_examples": len(subset)})
            shown = (f"γ={g:+.2f}: {a:.2%}" for g, a in zip(gammas, sweep["accuracy"], strict=True))
            log(f"[{run.display}] inference-γ sweep on {len(subset)} test images "
                f"({time.perf_counter() - start:.1f}s): " + ", ".join(shown))
        return {"test_examples": len(test), "gamma_sweep": sweep}

    def extra_rows(self, results):
        gammas = max((r["gamma_sweep"]["gammas"] for r in results), key=len)
        return [(f"accuracy at inference γ={g:+.2f}",
                 lambda r, i=i: (r["gamma_sweep"]["accuracy"][i]
                                 if i < len(r["gamma_sweep"]["accuracy"]) else None), "{:.2%}")
                for i, g in enumerate(gammas)]

    def write_files(self, config, workdir, results):
        lines = {r["name"]: (r["gamma_sweep"]["gammas"], r["gamma_sweep"]["accuracy"])
                 for r in results if r["gamma_sweep"]["gammas"]}
        if not lines:
            return []
        plots.plot_lines(lines, os.path.join(workdir, "gamma_sweep.png"), xlabel="inference γ",
                         ylabel="test accuracy", title="Test accuracy against inference γ")
        return ["gamma_sweep.png"]


TASK = ViTCifar()
train_and_evaluate, validate_config = trainer.entry_points(TASK)

if __name__ == "__main__":
    trainer.main(TASK)
