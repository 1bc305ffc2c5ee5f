"""GPT vs BDIA-GPT: a character-level language model (nanoGPT's shakespeare_char setting).

    python -m experiments.lm                                    # quick preset, both models
    python -m experiments.lm --config=experiments/configs/lm.py:full --workdir=runs/lm_full
    python -m experiments.lm --config.data.text_file=my.txt --config.mode=bdia

Trains the model(s) that ``config.mode`` names on random windows of the training text (the
same windows, initialisation and keys for both models in "compare" mode); evaluates the
loss on fixed windows of the training and the validation text at E[γ] = 0 every
``train.eval_every_steps`` steps (the paper's claim is about the gap between the two
curves); samples text from each model at the end. Writes to ``--workdir``: metrics.jsonl,
summary.json, losses.png (training and validation loss of both models on one plot),
samples.txt, vocab.json and Orbax checkpoints (rerunning the same command resumes).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np
from flax import nnx

from bdia_jax.models import GPT, GPTConfig
from experiments.common import config as config_lib
from experiments.common import memory, metrics, runs, sharding
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
from experiments.configs.lm import MODES, PRESETS
from experiments.text import char_lm
from experiments.text.losses import token_losses
from experiments.text.parallel import TextDataError

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DISPLAY_NAMES = {"standard": "GPT", "bdia": "BDIA-GPT"}
# Fields that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = (
    "mode", "data.tfds_data_dir", "data.tfds_download", "train.stop_after_steps",
    "train.progress", "train.log_every_steps", "train.checkpoint_every_steps",
    "train.keep_checkpoints", "train.async_checkpoints", "eval.batch_size",
    "eval.num_samples", "eval.sample_length", "eval.sample_prompt", "eval.temperature",
    "eval.top_k", "mesh.fsdp", "distributed.initialize", "distributed.coordinator_address",
    "distributed.num_processes", "distributed.process_id",
)


# --------------------------------------------------------------------------- config


def gpt_config_for(config: ml_collections.ConfigDict, update: str, vocab_size: int) -> GPTConfig:
    """The ``GPTConfig`` of the standard or the BDIA model of this run."""
    m = config.model
    return GPTConfig(
        vocab_size=vocab_size, max_len=m.context, width=m.width, depth=m.depth,
        num_heads=m.num_heads, mlp_dim=m.mlp_dim, dropout=m.dropout,
        attention_dropout=m.attention_dropout, update=update,
        backprop=m.bdia_backprop if update == "bdia" else m.standard_backprop,
        recompute=m.bdia_recompute,
        gamma=m.gamma, frac_bits=m.frac_bits, quantize_at_inference=m.quantize_at_inference,
        compute_dtype=m.compute_dtype,
    )


def _int_at_least(checks, value, field: str, low: int = 1) -> bool:
    return checks.require(
        isinstance(value, int) and not isinstance(value, bool) and value >= low,
        field, f"must be an int >= {low}, got {value!r}",
    )


def validate_config(config: ml_collections.ConfigDict, mesh) -> None:
    """Raise ``ConfigError`` listing every bad field (one line each)."""
    checks = config_lib.Checks()
    checks.one_of(config.preset, PRESETS, "preset")
    checks.one_of(config.mode, MODES, "mode")
    m = config.model
    for field in ("context", "width", "depth", "num_heads", "mlp_dim"):
        _int_at_least(checks, m[field], f"model.{field}")
    if isinstance(m.num_heads, int) and m.num_heads >= 1:
        checks.require(m.width % m.num_heads == 0, "model.num_heads",
                       f"must divide model.width={m.width}, got {m.num_heads}")
    for field in ("dropout", "attention_dropout"):
        checks.require(0 <= m[field] < 1, f"model.{field}", f"must be in [0, 1), got {m[field]}")
    checks.one_of(m.bdia_backprop, ("reversible", "autodiff", "remat"), "model.bdia_backprop")
    checks.one_of(m.bdia_recompute, ("shared", "separate"), "model.bdia_recompute")
    checks.one_of(m.standard_backprop, ("autodiff", "remat"), "model.standard_backprop")
    gamma_ok = isinstance(m.gamma, float) and 0 < m.gamma < 1 and np.log2(m.gamma).is_integer()
    checks.require(gamma_ok, "model.gamma",
                   f"must be a power of two in (0, 1) such as 0.5 or 0.25, got {m.gamma!r}")
    checks.require(isinstance(m.frac_bits, int) and 0 <= m.frac_bits <= 20, "model.frac_bits",
                   f"must be an int in [0, 20] (the paper: 9), got {m.frac_bits!r}")
    checks.one_of(m.compute_dtype, ("float32", "bfloat16", "float16"), "model.compute_dtype")

    d = config.data
    checks.require(bool(d.text_file or d.tfds_name), "data.tfds_name",
                   "set a TFDS text dataset (e.g. tiny_shakespeare) or data.text_file")
    checks.require(0 < d.val_fraction < 1, "data.val_fraction",
                   f"must be in (0, 1), got {d.val_fraction}")
    checks.one_of(d.vocab_source, ("train", "all"), "data.vocab_source")

    ts.validate_optim(config.optim, checks)

    t = config.train
    for field in ("num_steps", "batch_size", "eval_every_steps", "log_every_steps",
                  "checkpoint_every_steps", "keep_checkpoints"):
        _int_at_least(checks, t[field], f"train.{field}")
    if all(isinstance(t[f], int) and t[f] >= 1 for f in ("num_steps", "eval_every_steps")):
        checks.require(t.num_steps % t.eval_every_steps == 0, "train.num_steps",
                       f"must be a multiple of train.eval_every_steps={t.eval_every_steps}, "
                       f"got {t.num_steps}")
    checks.positive(t.stop_after_steps, "train.stop_after_steps", allow_zero=True)
    checks.one_of(t.on_nonfinite, NONFINITE_POLICIES, "train.on_nonfinite")
    checks.one_of(t.progress, PROGRESS_MODES, "train.progress")

    e = config.eval
    _int_at_least(checks, e.num_windows, "eval.num_windows", 0)
    _int_at_least(checks, e.batch_size, "eval.batch_size")
    _int_at_least(checks, e.num_samples, "eval.num_samples", 0)
    _int_at_least(checks, e.sample_length, "eval.sample_length")
    _int_at_least(checks, e.top_k, "eval.top_k", 0)
    checks.require(e.temperature >= 0, "eval.temperature", f"must be >= 0, got {e.temperature}")
    checks.require(isinstance(m.context, int) and 1 <= len(e.sample_prompt) < m.context,
                   "eval.sample_prompt",
                   f"must hold 1 to model.context-1 characters, got {e.sample_prompt!r}")
    sharding.validate_parallel_config(config, mesh, checks)
    for field, size in (("train.batch_size", t.batch_size), ("eval.batch_size", e.batch_size)):
        if isinstance(size, int) and size >= 1:
            problem = sharding.check_batch_divisible(size, mesh, field)
            if problem:
                checks.problems.append(problem)
    checks.raise_if_any("lm config")


# --------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class LMData:
    """Tokenized text: vocab, train_ids / val_ids int32 [n], where it came from."""

    vocab: char_lm.CharVocab
    train_ids: np.ndarray
    val_ids: np.ndarray
    source: str


def load_data(config: ml_collections.ConfigDict, workdir: str) -> LMData:
    """Reads the splits, builds (or reloads) the vocabulary, encodes both splits."""
    d = config.data
    if d.text_file:
        texts = char_lm.split_text(char_lm.read_text_file(d.text_file), d.val_fraction)
        source = f"{d.text_file} (last {d.val_fraction:.0%} = validation)"
    else:
        kwargs = dict(feature=d.text_feature, data_dir=d.tfds_data_dir or None,
                      download=d.tfds_download)
        texts = {
            "train": char_lm.read_tfds_text(d.tfds_name, d.train_split, **kwargs),
            "validation": char_lm.read_tfds_text(d.tfds_name, d.val_split, **kwargs),
        }
        source = f"tfds:{d.tfds_name} ({d.train_split} / {d.val_split})"
    vocab_text = texts["train"] if d.vocab_source == "train" else "".join(texts.values())
    vocab = char_lm.vocab_train_or_load(os.path.join(workdir, "vocab.json"), vocab_text)
    return LMData(
        vocab=vocab,
        train_ids=vocab.encode(texts["train"], what="the training text"),
        val_ids=vocab.encode(texts["validation"], what="the validation text"),
        source=source,
    )


# --------------------------------------------------------------------------- model functions


def make_loss_fn():
    """``loss_fn(model, batch, key) -> (loss, metrics)``; batch {"inputs", "targets"}:
    int32 [b, context] each; loss: mean next-character cross-entropy (nats)."""

    def loss_fn(model, batch, key):
        logits, aux = model(batch["inputs"], key=key, train=True)
        sums = token_losses(logits, batch["targets"], jnp.ones(batch["targets"].shape, bool))
        loss = sums["loss_sum"] / sums["num_tokens"]
        return loss, {
            "accuracy": sums["correct_sum"] / sums["num_tokens"],
            "max_abs": aux["max_abs"],
            "overflow": aux["overflow"],
            "nonfinite": aux["nonfinite"],
        }

    return loss_fn


@functools.lru_cache(maxsize=8)  # same graphdef (e.g. a resumed run in one process): reuse
def make_eval_step(graphdef):
    """Jitted ``(params, probes, rest, batch) -> {"nll_sum", "count"}`` at E[γ] = 0;
    batch {"inputs", "targets": int32 [b, context], "mask": bool [b] (real rows)}."""

    @jax.jit
    def eval_step(params, probes, rest, batch):
        model = nnx.merge(graphdef, params, probes, rest)
        logits, _ = model(batch["inputs"], train=False)
        mask = jnp.broadcast_to(batch["mask"][:, None], batch["targets"].shape)
        sums = token_losses(logits, batch["targets"], mask)
        return {"nll_sum": sums["nll_sum"], "count": sums["num_tokens"]}

    return eval_step


def mean_loss(eval_step, state, windows, batch_size: int, mesh) -> float:
    """Mean per-character loss (nats) of ``state`` over fixed (inputs, targets) windows."""
    nll, count = 0.0, 0.0
    for x, y, mask in char_lm.padded_batches(*windows, batch_size):
        batch = sharding.shard_batch({"inputs": x, "targets": y, "mask": mask}, mesh)
        out = sharding.to_host(eval_step(state.params, state.probes, state.rest, batch))
        nll += float(out["nll_sum"])
        count += float(out["count"])
    return nll / count


def sample_texts(model: GPT, vocab: char_lm.CharVocab, config, key) -> list[str]:
    """``eval.num_samples`` continuations of ``eval.sample_prompt`` (E[γ] = 0, KV cache).

    Longer than the context, a sample is generated in chunks: each chunk restarts the
    cache from the last context/2 characters (nanoGPT instead recomputes the last `context`
    characters at every step; the model sees at least half a context here).
    """
    e, context = config.eval, config.model.context
    prompt = vocab.encode(e.sample_prompt, what="eval.sample_prompt")
    rows = np.repeat(prompt[None, :], e.num_samples, axis=0)
    generated, chunk = 0, 0
    keep = max(1, context // 2)
    top_k = min(e.top_k, vocab.size) or None
    while generated < e.sample_length:
        window = rows[:, -keep:] if generated else rows
        new = min(context - window.shape[1], e.sample_length - generated)
        out = model.generate(jnp.asarray(window), new, key=jax.random.fold_in(key, chunk),
                             temperature=float(e.temperature), top_k=top_k)
        rows = np.concatenate([rows, np.asarray(out[:, window.shape[1] :])], axis=1)
        generated += new
        chunk += 1
    return [vocab.decode(row) for row in rows]


# --------------------------------------------------------------------------- one model


def train_model(config, update: str, data: LMData, mesh, workdir: str,
                writer: metrics.MetricsWriter) -> dict:
    """Train (or resume, or reload) one model, evaluate it, sample from it."""
    name = DISPLAY_NAMES[update]
    result_path = os.path.join(workdir, "checkpoints", f"{update}_result.json")
    if os.path.exists(result_path):
        log(f"[{name}] already finished in this workdir; reusing {result_path}")
        with open(result_path) as f:
            return json.load(f)

    t, e = config.train, config.eval
    gpt_cfg = gpt_config_for(config, update, data.vocab.size)
    model = GPT(gpt_cfg, rngs=nnx.Rngs(config.seed))  # same init for both models
    spe = t.eval_every_steps
    num_epochs = t.num_steps // spe
    optimizer, schedule = ts.make_optimizer(config.optim, t.num_steps, spe)
    base_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
    graphdef, state = ts.create_train_state(model, optimizer, base_key)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
    del model
    replicated = sharding.replicated_sharding(mesh)
    state_sharding = sharding.train_state_shardings(state, mesh)  # FSDP when mesh.fsdp > 1
    state = sharding.place(state, state_sharding)

    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints", update), save_every_steps=t.checkpoint_every_steps,
        keep=t.keep_checkpoints, async_save=t.async_checkpoints,
    )
    loop_result = None
    restored = checkpointer.restore(state, state_sharding)
    if restored is not None:
        state, record = restored
        step = int(sharding.to_host(state.step))
        loop_result = LoopResult.from_record(record.get("loop"))
        dropped = writer.drop_after(name, step)
        log(f"[{name}] resumed from the checkpoint at step {step}/{t.num_steps}"
            f"{f' (dropped {dropped} later records)' if dropped else ''}")

    def get_batch(step):
        inputs, targets = char_lm.train_windows(
            data.train_ids, seed=config.seed, step=step, batch_size=t.batch_size,
            context=config.model.context,
        )
        return sharding.shard_batch({"inputs": inputs, "targets": targets}, mesh)

    compile_start = time.perf_counter()
    train_step = ts.compile_train_step(
        ts.make_train_step(graphdef, make_loss_fn(), optimizer, schedule=schedule,
                           stop_on_nonfinite=t.on_nonfinite == "stop",
                           gather_params=sharding.gather_sharding(mesh)),
        state, get_batch(0), state_sharding=state_sharding,
        batch_sharding=sharding.batch_sharding(mesh), metrics_sharding=replicated,
    )
    compile_seconds = time.perf_counter() - compile_start
    compiled_mem = memory.compiled_memory(train_step)
    log(f"[{name}] {num_params:,} parameters, update={update}, backprop={gpt_cfg.backprop}; "
        f"{t.num_steps} steps of {t.batch_size} x {config.model.context} characters on "
        f"{sharding.num_data_shards(mesh)} device(s); train step compiled in "
        f"{compile_seconds:.1f}s"
        + (f", peak memory estimate {memory.megabytes(compiled_mem['peak_estimate_bytes']):.1f}"
           f" MB/device (temp {memory.megabytes(compiled_mem['temp_bytes']):.1f} MB)"
           if compiled_mem else ""))

    eval_step = make_eval_step(graphdef)
    max_windows = e.num_windows or None
    context = config.model.context
    val_windows = char_lm.eval_windows(data.val_ids, context=context, max_windows=max_windows)
    train_windows = char_lm.eval_windows(data.train_ids, context=context,
                                         max_windows=max_windows)

    def evaluate(state):
        val = mean_loss(eval_step, state, val_windows, e.batch_size, mesh)
        train = mean_loss(eval_step, state, train_windows, e.batch_size, mesh)
        return {"val_loss": val, "train_loss": train, "gap": val - train,
                "val_perplexity": float(np.exp(val))}

    settings = LoopSettings(
        num_epochs=num_epochs, steps_per_epoch=spe, log_every_steps=t.log_every_steps,
        eval_every_epochs=1, stop_after_steps=t.stop_after_steps,
        on_nonfinite=t.on_nonfinite, progress=t.progress,
        examples_per_step=t.batch_size * context,
    )
    try:
        state, loop_result = run_loop(
            name=name, state=state, step_fn=train_step, get_batch=get_batch,
            settings=settings, checkpointer=checkpointer, writer=writer, evaluate=evaluate,
            best_metric="val_loss", best_mode="min", result=loop_result,
            summary_keys=("loss", "reversal_error_max", "overflow_steps"),
        )
    finally:
        checkpointer.close()
    device_mem = memory.device_memory()

    samples = []
    if e.num_samples:
        sample_start = time.perf_counter()
        model = ts.merge_model(graphdef, state)
        samples = sample_texts(model, data.vocab, config, jax.random.PRNGKey(config.seed + 7))
        log(f"[{name}] {len(samples)} sample(s) of {e.sample_length} characters "
            f"({time.perf_counter() - sample_start:.1f}s); the first:\n{samples[0]}\n")

    final = loop_result.last_eval or {}
    step_time = loop_result.step_time_s
    result = {
        "name": name,
        "update": update,
        "backprop": gpt_cfg.backprop,
        "num_params": num_params,
        "steps": t.num_steps,
        "val_loss_final": final.get("val_loss"),
        "train_loss_final": final.get("train_loss"),
        "gap_final": final.get("gap"),
        "val_perplexity_final": final.get("val_perplexity"),
        "val_loss_best": loop_result.best,
        "best_step": loop_result.best_step,
        "eval_windows": {"val": len(val_windows[0]), "train": len(train_windows[0])},
        "samples": samples,
        "memory": runs.memory_record(compiled_mem, device_mem),
        "compile_seconds": compile_seconds,
        "step_time_s": step_time,
        "tokens_per_s": t.batch_size * context / step_time if step_time else None,
        "train_seconds": loop_result.train_seconds,
        "timed_steps": loop_result.timed_steps,
        "reversal_error_max": loop_result.max_reversal_error,
        "reversal_exact": (loop_result.max_reversal_error == 0.0
                           if gpt_cfg.backprop == "reversible" and update == "bdia" else None),
        "overflow_steps": loop_result.overflow_steps,
        "nonfinite_steps": loop_result.nonfinite_steps,
    }
    metrics.write_json(result_path, result)
    return result


# --------------------------------------------------------------------------- whole run


def plot_losses(records_path: str, results: dict, path: str) -> None:
    """Training and validation loss of every model on one plot (same colour per model):
    validation solid, training (same fixed-window estimate, no dropout) dashed, and the
    raw minibatch training loss faint."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(results.values()):
        color = f"C{i}"
        train = metrics.read_records(records_path, model=r["name"], kind="train")
        evals = metrics.read_records(records_path, model=r["name"], kind="eval")
        if train:
            ax.plot([x["step"] for x in train], [x["loss"] for x in train], color=color,
                    alpha=0.25, linewidth=1)
        steps = [x["step"] for x in evals]
        ax.plot(steps, [x["val_loss"] for x in evals], color=color, marker="o",
                label=f"{r['name']} validation")
        ax.plot(steps, [x["train_loss"] for x in evals], color=color, marker="s",
                linestyle="--", label=f"{r['name']} training")
    ax.set(xlabel="step", ylabel="loss (nats / character)",
           title="Training vs validation loss (faint: minibatch loss)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _side_by_side(results: dict) -> str:
    rs = list(results.values())

    def num(key, fmt="{:.4f}"):
        return ["n/a" if r.get(key) is None else fmt.format(r[key]) for r in rs]

    def mb(r, key):
        v = (r["memory"]["compiled"] or {}).get(key)
        return "n/a" if v is None else f"{v / 2**20:.1f} MB"

    rows = [
        ("validation loss (best)", num("val_loss_best")),
        ("validation loss (final)", num("val_loss_final")),
        ("training loss (final, eval)", num("train_loss_final")),
        ("gap val - train (final)", num("gap_final", "{:+.4f}")),
        ("train-step memory (compiled)", [mb(r, "peak_estimate_bytes") for r in rs]),
        ("  of which temp (activations)", [mb(r, "temp_bytes") for r in rs]),
        ("step time", ["n/a" if r["step_time_s"] is None else f"{r['step_time_s'] * 1e3:.1f} ms"
                       for r in rs]),
        ("characters / s", num("tokens_per_s", "{:.0f}")),
        ("reversal error (max)", ["n/a" if r["reversal_exact"] is None
                                  else f"{r['reversal_error_max']:.3g}" for r in rs]),
        ("overflow / non-finite steps", [f"{r['overflow_steps']} / {r['nonfinite_steps']}"
                                         for r in rs]),
    ]
    return runs.format_table([r["name"] for r in rs], rows)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run the experiment that ``config`` describes; write everything to ``workdir``.

    Returns the summary (also written to ``workdir/summary.json``). Raises ``ConfigError``
    for bad fields, FileNotFoundError / TextDataError for missing or malformed data,
    ``TrainingInterrupted`` after ``train.stop_after_steps``.
    """
    start = time.perf_counter()
    mesh = sharding.mesh_from_config(config)  # jax.distributed first when multi-host
    validate_config(config, mesh)
    os.makedirs(workdir, exist_ok=True)
    runs.check_resume_config(config, workdir, resumable=RESUMABLE_CHANGES)
    writer = metrics.MetricsWriter(os.path.join(workdir, "metrics.jsonl"))

    load_start = time.perf_counter()
    data = load_data(config, workdir)
    for split, ids in (("training", data.train_ids), ("validation", data.val_ids)):
        if len(ids) < config.model.context + 1:
            raise TextDataError(
                f"the {split} text has {len(ids)} characters, fewer than model.context + 1 = "
                f"{config.model.context + 1}; use a shorter context or more text."
            )
    log(f"data: {data.source}: {len(data.train_ids):,} training / {len(data.val_ids):,} "
        f"validation characters, vocabulary {data.vocab.size}, loaded in "
        f"{time.perf_counter() - load_start:.1f}s; {sharding.num_data_shards(mesh)} "
        f"{jax.default_backend()} device(s); workdir {workdir}")

    results = {}
    for update in runs.models_for_mode(config.mode):
        results[update] = train_model(config, update, data, mesh, workdir, writer)

    plot_path = os.path.join(workdir, "losses.png")
    samples_path = os.path.join(workdir, "samples.txt")
    if sharding.is_primary():  # multi-host: process 0 writes the files
        plot_losses(writer.path, results, plot_path)
        with open(samples_path, "w", encoding="utf-8") as f:
            for r in results.values():
                for i, sample in enumerate(r["samples"]):
                    f.write(f"===== {r['name']} sample {i + 1} =====\n{sample}\n\n")
    summary = {
        "config": config_lib.to_dict(config),
        "versions": metrics.versions(),
        "devices": metrics.device_info(mesh),
        "data": {"source": data.source, "train_characters": len(data.train_ids),
                 "val_characters": len(data.val_ids), "vocab_size": data.vocab.size},
        "models": results,
        "plots": [os.path.basename(plot_path)],
        "wall_seconds": time.perf_counter() - start,
    }
    metrics.write_json(os.path.join(workdir, "summary.json"), summary)
    log("\n" + _side_by_side(results))
    log(f"\nwrote {os.path.join(workdir, 'summary.json')}, metrics.jsonl, losses.png, "
        f"samples.txt and checkpoints/ ({summary['wall_seconds']:.0f}s)")
    return summary


# --------------------------------------------------------------------------- CLI


def _set_tfds_data_dir(config, data_dir: str) -> None:
    config.data.tfds_data_dir = data_dir


if __name__ == "__main__":
    runs.run_experiment(
        "lm", train_and_evaluate, presets=PRESETS, set_data_dir=_set_tfds_data_dir,
        data_dir_help="TFDS data dir (default: config.data.tfds_data_dir, then $TFDS_DATA_DIR).",
        errors=(config_lib.ConfigError, TextDataError, FileNotFoundError,
                sharding.DistributedInitError, NonFiniteError))
