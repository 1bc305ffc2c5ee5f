"""Standard ViT vs BDIA-ViT on CIFAR-10: the project's main job.

    python -m experiments.vit_cifar                       # quick preset, both models
    python -m experiments.vit_cifar --config=experiments/configs/vit_cifar.py:paper \\
        --workdir=runs/vit_cifar_paper --data_dir=/path/to/tensorflow_datasets
    python -m experiments.vit_cifar --config.mode=bdia --config.train.num_epochs=3

Trains the model(s) that ``config.mode`` names on one device mesh over every device of the
job (batch sharded; parameters replicated, or FSDP-sharded with ``--config.mesh.fsdp=N``;
multi-host with ``jax.distributed``, see ``experiments/common/sharding.py``); evaluates on the test split with E[γ] = 0 and runs
the inference-γ sweep; writes to ``--workdir``: metrics.jsonl, summary.json, curves.png,
gamma_sweep.png and Orbax checkpoints (rerunning the same command resumes). In "compare"
mode both models start from the same initialisation and see the same batches,
augmentations and keys.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from bdia_jax.models import ViT, ViTConfig
from experiments import cifar_data
from experiments.common import config as config_lib
from experiments.common import memory, metrics, plots, runs, sharding
from experiments.common import train_state as ts
from experiments.common.checkpoint import Checkpointer
from experiments.common.loop import (
    NONFINITE_POLICIES,
    PROGRESS_MODES,
    LoopResult,
    LoopSettings,
    NonFiniteError,
    log,
    run_loop,
)
from experiments.configs.vit_cifar import MODES, PRESETS

DISPLAY_NAMES = {"standard": "ViT", "bdia": "BDIA-ViT"}
# Fields that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = (
    "mode", "data.data_dir", "data.download", "train.stop_after_steps", "train.progress",
    "train.log_every_steps", "train.checkpoint_every_steps", "train.keep_checkpoints",
    "train.async_checkpoints", "eval.batch_size", "eval.sweep_gammas",
    "eval.sweep_num_examples", "mesh.fsdp", "distributed.initialize",
    "distributed.coordinator_address", "distributed.num_processes", "distributed.process_id",
)
# frac_bits limit: float32 holds grid values exactly only while |x| < 2**(24 - frac_bits).
MAX_FRAC_BITS = 20


# --------------------------------------------------------------------------- config


def vit_config_for(config: ml_collections.ConfigDict, update: str) -> ViTConfig:
    """The ``ViTConfig`` of the standard or the BDIA model of this run."""
    m = config.model
    return ViTConfig(
        image_size=m.image_size, patch_size=m.patch_size, num_classes=m.num_classes,
        width=m.width, depth=m.depth, num_heads=m.num_heads, mlp_dim=m.mlp_dim,
        dropout=m.dropout, attention_dropout=m.attention_dropout, pool=m.pool,
        update=update,
        backprop=m.bdia_backprop if update == "bdia" else m.standard_backprop,
        recompute=m.bdia_recompute,
        gamma=m.gamma, frac_bits=m.frac_bits,
        quantize_at_inference=m.quantize_at_inference, compute_dtype=m.compute_dtype,
    )


def sweep_config_for(vit_cfg: ViTConfig) -> ViTConfig:
    """The model that evaluates ``vit_cfg``'s parameters with an inference γ.

    BDIA-ViT: itself. Standard ViT: the same parameters in the unquantized BDIA inference
    update x_{k+1} = γ x_{k-1} + (1-γ) x_k + (1+γ) h_k (at γ = 0 exactly the standard
    transformer), which is how the paper applies γ to a conventionally trained model.
    """
    if vit_cfg.update == "bdia":
        return vit_cfg
    return ViTConfig(**{**vit_cfg.__dict__, "update": "bdia", "backprop": "autodiff",
                        "frac_bits": None, "quantize_at_inference": False})


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_config(config: ml_collections.ConfigDict, mesh) -> None:
    """Raise ``ConfigError`` listing every bad field (one line each, naming the field and
    the allowed values). ``mesh``: the run's mesh (batch sizes must split over it)."""
    checks = config_lib.Checks()
    checks.one_of(config.preset, PRESETS, "preset")
    checks.require(_is_int(config.seed) and config.seed >= 0, "seed",
                   f"must be an int >= 0, got {config.seed!r}")
    checks.one_of(config.mode, MODES, "mode")
    m = config.model
    for field in ("image_size", "patch_size", "num_classes", "width", "depth", "num_heads",
                  "mlp_dim"):
        value = m[field]
        checks.require(_is_int(value) and value >= 1, f"model.{field}",
                       f"must be an int >= 1, got {value!r}")
    if _is_int(m.patch_size) and m.patch_size >= 1 and _is_int(m.image_size):
        checks.require(m.image_size % m.patch_size == 0, "model.patch_size",
                       f"must divide model.image_size={m.image_size}, got {m.patch_size}")
    if _is_int(m.num_heads) and m.num_heads >= 1 and _is_int(m.width):
        checks.require(m.width % m.num_heads == 0, "model.num_heads",
                       f"must divide model.width={m.width}, got {m.num_heads}")
    for field in ("dropout", "attention_dropout"):
        checks.require(_is_number(m[field]) and 0 <= m[field] < 1, f"model.{field}",
                       f"must be in [0, 1), got {m[field]!r}")
    checks.one_of(m.pool, ("cls", "mean"), "model.pool")
    checks.one_of(m.bdia_backprop, ("reversible", "autodiff", "remat"), "model.bdia_backprop")
    checks.one_of(m.bdia_recompute, ("shared", "separate"), "model.bdia_recompute")
    checks.one_of(m.standard_backprop, ("autodiff", "remat"), "model.standard_backprop")
    gamma_ok = isinstance(m.gamma, float) and 0 < m.gamma < 1 and (
        float(np.log2(m.gamma)).is_integer() if m.gamma > 0 else False)
    checks.require(gamma_ok, "model.gamma",
                   f"must be a power of two in (0, 1) such as 0.5 or 0.25, got {m.gamma!r}")
    checks.require(
        _is_int(m.frac_bits) and 0 <= m.frac_bits <= MAX_FRAC_BITS, "model.frac_bits",
        f"must be an int in [0, {MAX_FRAC_BITS}] (the paper: 9): float32 keeps grid values "
        f"exact only while |x| < 2**(24 - frac_bits), so {MAX_FRAC_BITS} already limits the "
        f"stream to |x| < 16; got {m.frac_bits!r}")
    checks.one_of(m.quantize_at_inference, (True, False), "model.quantize_at_inference")
    checks.one_of(m.compute_dtype, ("float32", "bfloat16", "float16"), "model.compute_dtype")

    d = config.data
    _check_dataset_name(d.name, checks)
    if d.data_dir and "://" not in d.data_dir:  # gs://... etc. are TFDS's to read
        checks.require(os.path.isdir(d.data_dir), "data.data_dir",
                       f"must be an existing folder of prepared TFDS datasets (or \"\" for "
                       f"$TFDS_DATA_DIR); {d.data_dir!r} does not exist")
    elif os.environ.get("TFDS_DATA_DIR") and "://" not in os.environ["TFDS_DATA_DIR"]:
        checks.require(os.path.isdir(os.environ["TFDS_DATA_DIR"]), "data.data_dir",
                       f"is empty, so $TFDS_DATA_DIR is used, but "
                       f"{os.environ['TFDS_DATA_DIR']!r} does not exist; fix TFDS_DATA_DIR "
                       f"or pass --data_dir")
    checks.one_of(d.download, (True, False), "data.download")
    for field in ("train_split", "test_split"):
        checks.require(isinstance(d[field], str) and bool(d[field]), f"data.{field}",
                       f"must name a TFDS split such as 'train' or 'test[:50%]', "
                       f"got {d[field]!r}")
    for field in ("num_train_examples", "num_test_examples", "crop_padding"):
        checks.require(_is_int(d[field]) and d[field] >= 0, f"data.{field}",
                       f"must be an int >= 0, got {d[field]!r}")
    checks.one_of(d.flip, (True, False), "data.flip")

    ts.validate_optim(config.optim, checks)
    checks.require(_is_number(config.optim.label_smoothing)
                   and 0 <= config.optim.label_smoothing < 1, "optim.label_smoothing",
                   f"must be in [0, 1), got {config.optim.label_smoothing!r}")

    t = config.train
    for field in ("num_epochs", "batch_size", "log_every_steps", "eval_every_epochs",
                  "checkpoint_every_steps", "keep_checkpoints"):
        checks.require(_is_int(t[field]) and t[field] >= 1, f"train.{field}",
                       f"must be an int >= 1, got {t[field]!r}")
    checks.require(_is_int(t.stop_after_steps) and t.stop_after_steps >= 0,
                   "train.stop_after_steps",
                   f"must be an int >= 0 (0: never), got {t.stop_after_steps!r}")
    checks.one_of(t.async_checkpoints, (True, False), "train.async_checkpoints")
    checks.one_of(t.on_nonfinite, NONFINITE_POLICIES, "train.on_nonfinite")
    checks.one_of(t.progress, PROGRESS_MODES, "train.progress")
    e = config.eval
    checks.require(_is_int(e.batch_size) and e.batch_size >= 1,
                   "eval.batch_size", f"must be an int >= 1, got {e.batch_size!r}")
    checks.require(_is_int(e.sweep_num_examples) and e.sweep_num_examples >= 0,
                   "eval.sweep_num_examples",
                   f"must be an int >= 0 (0: all), got {e.sweep_num_examples!r}")
    checks.require(all(_is_number(g) and -1 < g < 1 for g in e.sweep_gammas),
                   "eval.sweep_gammas",
                   f"values must be numbers in (-1, 1), got {tuple(e.sweep_gammas)}")
    sharding.validate_parallel_config(config, mesh, checks)
    for field, size in (("train.batch_size", t.batch_size), ("eval.batch_size", e.batch_size)):
        if _is_int(size) and size >= 1:
            problem = sharding.check_batch_divisible(size, mesh, field)
            if problem:
                checks.problems.append(problem)
    checks.raise_if_any("vit_cifar config")


def _check_dataset_name(name, checks) -> None:
    """``data.name`` must be a TFDS dataset (optionally ``name/config:version``)."""
    if not checks.require(isinstance(name, str) and bool(name), "data.name",
                          f"must name a TFDS image dataset such as 'cifar10', got {name!r}"):
        return
    import difflib

    import tensorflow_datasets as tfds

    known = tfds.list_builders(with_community_datasets=False)
    base = name.split(":")[0].split("/")[0]
    close = difflib.get_close_matches(base, known, n=3)
    checks.require(base in known, "data.name",
                   f"unknown TFDS dataset {name!r}; use an image-classification dataset "
                   f"with 'image' and 'label' features such as 'cifar10'"
                   + (f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""))


# --------------------------------------------------------------------------- model functions


def make_loss_fn(config: ml_collections.ConfigDict):
    """``loss_fn(model, batch, key) -> (loss, metrics)`` with on-device augmentation.

    batch: {"image": [b, H, W, C] uint8, "label": [b] int32}. The key is split into the
    augmentation key and the model key (BDIA γ signs, dropout), so the standard and the
    BDIA model see identical augmentations.
    """
    padding, flip = config.data.crop_padding, config.data.flip
    smoothing, num_classes = config.optim.label_smoothing, config.model.num_classes

    def loss_fn(model, batch, key):
        augment_key, model_key = jax.random.split(key)
        images = cifar_data.random_crop_flip(batch["image"], augment_key, padding=padding,
                                             flip=flip)
        logits, aux = model(cifar_data.normalize(images), key=model_key, train=True)
        targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes), smoothing)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, {"accuracy": accuracy, "max_abs": aux["max_abs"],
                      "overflow": aux["overflow"], "nonfinite": aux["nonfinite"]}

    return loss_fn


def make_eval_step(graphdef, gather_params=None):
    """Jitted ``(params, probes, rest, batch, gamma) -> {"correct", "loss_sum", "count"}``.

    batch adds "mask" ([b] bool, real examples); gamma: None (E[γ] = 0) or a float32
    scalar inference γ (traced: one compilation serves the whole sweep).
    gather_params: as in ``train_state.make_train_step`` (FSDP: all-gather the weights).
    """

    @jax.jit
    def eval_step(params, probes, rest, batch, gamma):
        if gather_params is not None:
            params = jax.lax.with_sharding_constraint(
                params, jax.tree_util.tree_map(lambda _: gather_params, params))
        model = nnx.merge(graphdef, params, probes, rest)
        logits, _ = model(cifar_data.normalize(batch["image"]), train=False,
                          inference_gamma=gamma)
        mask = batch["mask"].astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        return {"correct": jnp.sum(correct * mask), "loss_sum": jnp.sum(losses * mask),
                "count": jnp.sum(mask)}

    return eval_step


def evaluate(eval_step, state, data: cifar_data.ImageSplit, batch_size: int, mesh,
             gamma=None) -> dict:
    """{"accuracy", "loss"} of ``state`` on ``data`` (every example once)."""
    totals = {"correct": 0.0, "loss_sum": 0.0, "count": 0.0}
    gamma = None if gamma is None else jnp.float32(gamma)
    for batch in cifar_data.eval_batches(data, batch_size):
        out = eval_step(state.params, state.probes, state.rest,
                        sharding.shard_batch(batch, mesh), gamma)
        for k, v in sharding.to_host(out).items():
            totals[k] += float(v)
    return {"accuracy": totals["correct"] / totals["count"],
            "loss": totals["loss_sum"] / totals["count"]}


# --------------------------------------------------------------------------- one model


def train_model(config, update: str, train_data, test_data, mesh, workdir: str,
                writer: metrics.MetricsWriter) -> dict:
    """Train (or resume, or reload) one model, evaluate it, sweep γ; return its figures."""
    name = DISPLAY_NAMES[update]
    result_path = os.path.join(workdir, "checkpoints", f"{update}_result.json")
    if os.path.exists(result_path):
        log(f"[{name}] already finished in this workdir; reusing {result_path}")
        with open(result_path) as f:
            return json.load(f)

    vit_cfg = vit_config_for(config, update)
    model = ViT(vit_cfg, rngs=nnx.Rngs(config.seed))  # same init for both models
    batches = cifar_data.TrainBatches(train_data, config.train.batch_size, config.seed)
    spe = batches.steps_per_epoch
    num_steps = config.train.num_epochs * spe
    optimizer, schedule = ts.make_optimizer(config.optim, num_steps, spe)
    base_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
    graphdef, state = ts.create_train_state(model, optimizer, base_key)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
    del model
    replicated = sharding.replicated_sharding(mesh)
    # Parameters and optimizer state: replicated, or FSDP-sharded when mesh.fsdp > 1.
    state_sharding = sharding.train_state_shardings(state, mesh)
    state = sharding.place(state, state_sharding)

    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints", update),
        save_every_steps=config.train.checkpoint_every_steps,
        keep=config.train.keep_checkpoints, async_save=config.train.async_checkpoints,
    )
    loop_result = None
    restored = checkpointer.restore(state, state_sharding)
    if restored is not None:
        state, record = restored
        step = int(sharding.to_host(state.step))
        loop_result = LoopResult.from_record(record.get("loop"))
        dropped = writer.drop_after(name, step)
        log(f"[{name}] resumed from the checkpoint at step {step}/{num_steps}"
            f"{f' (dropped {dropped} later records)' if dropped else ''}")
    elif writer.drop_after(name, 0):  # records of a run whose checkpoints are all unusable
        log(f"[{name}] starting from step 0; dropped this model's earlier records")

    # Each process reads only the rows of every global batch that its devices hold.
    rows = sharding.process_rows(mesh, config.train.batch_size)

    def get_batch(step):
        return sharding.shard_local_batch(batches(step, rows), mesh, config.train.batch_size)

    compile_start = time.perf_counter()
    train_step = ts.compile_train_step(
        ts.make_train_step(graphdef, make_loss_fn(config), optimizer, schedule=schedule,
                           stop_on_nonfinite=config.train.on_nonfinite == "stop",
                           gather_params=sharding.gather_sharding(mesh)),
        state, get_batch(0), state_sharding=state_sharding,
        batch_sharding=sharding.batch_sharding(mesh), metrics_sharding=replicated,
    )
    compile_seconds = time.perf_counter() - compile_start
    compiled_mem = memory.compiled_memory(train_step)
    log(f"[{name}] {num_params:,} parameters, update={update}, backprop={vit_cfg.backprop}; "
        f"{num_steps} steps ({config.train.num_epochs} epochs x {spe}) of "
        f"{config.train.batch_size} images on {sharding.num_data_shards(mesh)} device(s)"
        f"{f' (FSDP over {sharding.fsdp_size(mesh)})' if sharding.fsdp_size(mesh) > 1 else ''}; "
        f"train step compiled in {compile_seconds:.1f}s"
        + (f", peak memory estimate {memory.megabytes(compiled_mem['peak_estimate_bytes']):.1f}"
           f" MB/device (temp {memory.megabytes(compiled_mem['temp_bytes']):.1f} MB)"
           if compiled_mem else ""))

    eval_step = make_eval_step(graphdef, sharding.gather_sharding(mesh))
    eval_bs = config.eval.batch_size
    settings = LoopSettings(
        num_epochs=config.train.num_epochs, steps_per_epoch=spe,
        log_every_steps=config.train.log_every_steps,
        eval_every_epochs=config.train.eval_every_epochs,
        stop_after_steps=config.train.stop_after_steps,
        on_nonfinite=config.train.on_nonfinite, progress=config.train.progress,
        examples_per_step=config.train.batch_size,
    )
    try:
        state, loop_result = run_loop(
            name=name, state=state, step_fn=train_step, get_batch=get_batch,
            settings=settings, checkpointer=checkpointer, writer=writer,
            evaluate=lambda s: evaluate(eval_step, s, test_data, eval_bs, mesh),
            best_metric="accuracy", best_mode="max", result=loop_result,
            summary_keys=("loss", "accuracy", "reversal_error_max", "overflow_steps"),
        )
    finally:
        checkpointer.close()
    device_mem = memory.device_memory()

    # Inference-γ sweep on the final parameters.
    sweep = {"gammas": [], "accuracy": []}
    gammas = [float(g) for g in config.eval.sweep_gammas]
    if gammas:
        sweep_cfg = sweep_config_for(vit_cfg)
        sweep_graphdef = graphdef if sweep_cfg == vit_cfg else ts.split_model(
            nnx.eval_shape(lambda: ViT(sweep_cfg, rngs=nnx.Rngs(config.seed))))[0]
        sweep_step = make_eval_step(sweep_graphdef, sharding.gather_sharding(mesh))
        n = config.eval.sweep_num_examples or len(test_data)
        sweep_data = cifar_data.ImageSplit(test_data.images[:n], test_data.labels[:n])
        writer.drop_kind(name, "sweep")
        sweep_start = time.perf_counter()
        for gamma in gammas:
            acc = evaluate(sweep_step, state, sweep_data, eval_bs, mesh, gamma=gamma)["accuracy"]
            sweep["gammas"].append(gamma)
            sweep["accuracy"].append(acc)
            writer.write({"model": name, "kind": "sweep", "step": num_steps,
                          "inference_gamma": gamma, "accuracy": acc,
                          "num_examples": len(sweep_data)})
        log(f"[{name}] inference-γ sweep on {len(sweep_data)} test images "
            f"({time.perf_counter() - sweep_start:.1f}s): "
            + ", ".join(f"γ={g:+.2f}: {a:.2%}" for g, a in zip(gammas, sweep["accuracy"],
                                                                 strict=True)))

    final = loop_result.last_eval or {}
    step_time = loop_result.step_time_s
    result = {
        "name": name,
        "update": update,
        "backprop": vit_cfg.backprop,
        "num_params": num_params,
        "steps": num_steps,
        "epochs": config.train.num_epochs,
        "test_examples": len(test_data),
        "test_accuracy_final": final.get("accuracy"),
        "test_loss_final": final.get("loss"),
        "test_accuracy_best": loop_result.best,
        "best_step": loop_result.best_step,
        "gamma_sweep": {**sweep, "num_examples": len(sweep_data) if gammas else 0},
        "memory": runs.memory_record(compiled_mem, device_mem),
        "compile_seconds": compile_seconds,
        "step_time_s": step_time,
        "images_per_s": config.train.batch_size / step_time if step_time else None,
        "train_seconds": loop_result.train_seconds,
        "timed_steps": loop_result.timed_steps,
        "reversal_error_max": loop_result.max_reversal_error,
        "reversal_exact": (loop_result.max_reversal_error == 0.0
                           if vit_cfg.backprop == "reversible" and update == "bdia" else None),
        "overflow_steps": loop_result.overflow_steps,
        "nonfinite_steps": loop_result.nonfinite_steps,
        "skipped_steps": loop_result.skipped_steps,
    }
    metrics.write_json(result_path, result)
    return result


# --------------------------------------------------------------------------- whole run


def _side_by_side(results: dict) -> str:
    names = [r["name"] for r in results.values()]
    rows = []

    def pct(v):
        return "n/a" if v is None else f"{v:.2%}"

    def mb(v):
        return "n/a" if v is None else f"{v / 2**20:.1f} MB"

    def row(label, values):
        rows.append(f"{label:<32}" + "".join(f"{v:>16}" for v in values))

    row("", names)
    rs = list(results.values())
    row("test accuracy (final, E[γ]=0)", [pct(r["test_accuracy_final"]) for r in rs])
    row("test accuracy (best)", [pct(r["test_accuracy_best"]) for r in rs])
    row("train-step memory (compiled)",
        [mb((r["memory"]["compiled"] or {}).get("peak_estimate_bytes")) for r in rs])
    row("  of which temp (activations)",
        [mb((r["memory"]["compiled"] or {}).get("temp_bytes")) for r in rs])
    row("device peak (memory_stats)",
        [mb((r["memory"]["device"] or {}).get("peak_bytes_in_use")) for r in rs])
    row("step time",
        [("n/a" if r["step_time_s"] is None else f"{r['step_time_s'] * 1e3:.1f} ms") for r in rs])
    row("images / s",
        [("n/a" if r["images_per_s"] is None else f"{r['images_per_s']:.1f}") for r in rs])
    row("reversal error (max)",
        [("n/a" if r["reversal_exact"] is None else f"{r['reversal_error_max']:.3g}")
         for r in rs])
    row("overflow / non-finite steps",
        [f"{r['overflow_steps']} / {r['nonfinite_steps']}" for r in rs])
    gammas = rs[0]["gamma_sweep"]["gammas"]
    for i, g in enumerate(gammas):
        row(f"accuracy at inference γ={g:+.2f}",
            [pct(r["gamma_sweep"]["accuracy"][i]) if i < len(r["gamma_sweep"]["accuracy"])
             else "n/a" for r in rs])
    return "\n".join(rows)


def _plot(workdir: str, records_path: str, results: dict) -> list[str]:
    curves, sweeps = {}, {}
    for r in results.values():
        train = metrics.read_records(records_path, model=r["name"], kind="train")
        evals = metrics.read_records(records_path, model=r["name"], kind="eval")
        curves[r["name"]] = {
            "train_step": [x["step"] for x in train], "train_loss": [x["loss"] for x in train],
            "train_value": [x["accuracy"] for x in train],
            "eval_step": [x["step"] for x in evals],
            "eval_value": [x["accuracy"] for x in evals], "eval_label": "accuracy",
        }
        if r["gamma_sweep"]["gammas"]:
            sweeps[r["name"]] = (r["gamma_sweep"]["gammas"], r["gamma_sweep"]["accuracy"])
    paths = [os.path.join(workdir, "curves.png")]
    plots.plot_curves(curves, paths[0], title="CIFAR-10: loss and accuracy")
    if sweeps:
        paths.append(os.path.join(workdir, "gamma_sweep.png"))
        plots.plot_sweep(sweeps, paths[1], xlabel="inference γ", ylabel="test accuracy",
                         title="Test accuracy against inference γ")
    return paths


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run the experiment that ``config`` describes; write everything to ``workdir``.

    Returns the summary (also written to ``workdir/summary.json``). Raises
    ``ConfigError`` for bad fields, ``cifar_data.DataMissingError`` when the data is not
    there, ``TrainingInterrupted`` after ``train.stop_after_steps``.
    """
    start = time.perf_counter()
    mesh = sharding.mesh_from_config(config)  # jax.distributed first when multi-host
    validate_config(config, mesh)
    os.makedirs(workdir, exist_ok=True)
    runs.check_resume_config(config, workdir, resumable=RESUMABLE_CHANGES)
    writer = metrics.MetricsWriter(os.path.join(workdir, "metrics.jsonl"))

    d = config.data
    load_start = time.perf_counter()
    train_data = cifar_data.load_split(d.name, d.train_split, data_dir=d.data_dir or None,
                                       download=d.download,
                                       num_examples=d.num_train_examples)
    test_data = cifar_data.load_split(d.name, d.test_split, data_dir=d.data_dir or None,
                                      download=d.download, num_examples=d.num_test_examples)
    log(f"data: {d.name} {len(train_data)} train / {len(test_data)} test images loaded in "
        f"{time.perf_counter() - load_start:.1f}s; {sharding.num_data_shards(mesh)} "
        f"{jax.default_backend()} device(s) (mesh {dict(mesh.shape)}, "
        f"{jax.process_count()} process(es)); workdir {workdir}")

    results = {}
    for update in runs.models_for_mode(config.mode):
        results[update] = train_model(config, update, train_data, test_data, mesh, workdir,
                                      writer)

    plot_paths = _plot(workdir, writer.path, results) if sharding.is_primary() else []
    summary = {
        "config": config_lib.to_dict(config),
        "versions": metrics.versions(),
        "devices": metrics.device_info(mesh),
        "models": results,
        "plots": [os.path.basename(p) for p in plot_paths],
        "wall_seconds": time.perf_counter() - start,
    }
    metrics.write_json(os.path.join(workdir, "summary.json"), summary)
    log("\n" + _side_by_side(results))
    log(f"\nwrote {os.path.join(workdir, 'summary.json')}, metrics.jsonl, "
        f"{', '.join(os.path.basename(p) for p in plot_paths)} and checkpoints/ "
        f"({summary['wall_seconds']:.0f}s)")
    return summary


# --------------------------------------------------------------------------- CLI


def _set_data_dir(config, data_dir: str) -> None:
    config.data.data_dir = data_dir


if __name__ == "__main__":
    runs.run_experiment(
        "vit_cifar", train_and_evaluate, presets=PRESETS, set_data_dir=_set_data_dir,
        data_dir_help="TFDS data dir (default: config.data.data_dir, then $TFDS_DATA_DIR).",
        # NonFiniteError includes RangeOverflowError.
        errors=(config_lib.ConfigError, cifar_data.DataMissingError,
                sharding.DistributedInitError, NonFiniteError))
