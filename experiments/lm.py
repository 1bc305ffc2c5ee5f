"""GPT vs BDIA-GPT: a character-level language model (nanoGPT's shakespeare_char setting).

    python -m experiments.lm                                    # quick preset, both models
    python -m experiments.lm --config=experiments/configs/lm.py:full --workdir=runs/lm_full
    python -m experiments.lm --config.data.text_file=my.txt --config.mode=bdia

Trains the models that ``config.mode`` names (see ``experiments.common.trainer``) on random
windows of the training text; evaluates the loss on fixed windows of the training and the
validation text at E[γ] = 0 every ``train.eval_every_steps`` steps (the paper's claim is
about the gap between the two curves); samples text from each model at the end. Writes to
``--workdir``: metrics.jsonl, summary.json, config.json, losses.png, samples.txt,
vocab.json and Orbax checkpoints (rerunning the same command resumes).
"""

from __future__ import annotations

if __name__ == "__main__":  # --help at once, before the imports below load JAX
    from experiments.common.quick_help import exit_if_help

    exit_if_help("lm", __doc__)

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from bdia_jax import training
from bdia_jax.chunked_loss import chunk_problem, chunked_token_losses
from bdia_jax.models import GPT, GPTConfig
from experiments.common import data_checks, plots, sharding, trainer
from experiments.common.loop import log
from experiments.configs.lm import PRESETS
from experiments.data.text import char_lm
from experiments.data.text.losses import lm_nll_sums, token_losses
from experiments.data.text.parallel import TextDataError


def mean_loss(step, state, windows, batch_size: int, mesh) -> float:
    """Mean per-character loss (nats) of ``state`` over fixed (inputs, targets) windows."""
    batches = ({"inputs": x, "targets": y, "mask": m}
               for x, y, m in char_lm.padded_batches(*windows, batch_size))
    sums = trainer.sum_over(step, state, batches, mesh)
    return sums["nll_sum"] / sums["count"]


class CharLM(trainer.ValLossTask):
    name, presets = "lm", PRESETS
    config_class, model_class = GPTConfig, GPT
    display_names = {"standard": "GPT", "bdia": "BDIA-GPT"}
    errors = (TextDataError, FileNotFoundError)
    data_dir_field = "data.tfds_data_dir"
    data_dir_help = "TFDS data dir (default: config.data.tfds_data_dir, then $TFDS_DATA_DIR)."
    resumable = ("data.tfds_data_dir", "data.tfds_download", "eval.batch_size",
                 "eval.num_samples", "eval.sample_length", "eval.sample_prompt",
                 "eval.temperature", "eval.top_k")
    batch_fields = ("train.batch_size", "eval.batch_size")
    int_fields = {**{f"model.{f}": 1 for f in ("max_len", "width", "depth", "num_heads",
                                               "mlp_dim")},
                  **{f"train.{f}": 1 for f in ("num_steps", "batch_size", "eval_every_steps")},
                  "train.loss_chunk": 0,
                  **{f"eval.{f}": 0 for f in ("num_windows", "num_samples", "top_k")},
                  "eval.batch_size": 1, "eval.sample_length": 1}
    summary_keys = ("loss", "reversal_error_max", "overflow_steps")
    throughput = ("tokens_per_s", "characters")
    final = {**trainer.ValLossTask.final, "train_loss_final": "train_loss", "gap_final": "gap"}
    table = (trainer.VAL_ROWS["best"], trainer.VAL_ROWS["final"],
             ("training loss (final, eval)", "train_loss_final", "{:.4f}"),
             ("gap val - train (final)", "gap_final", "{:+.4f}"))
    panels = (plots.Panel("training vs validation loss (faint: minibatch loss)",
                          "loss (nats / character)", (
                              plots.MINIBATCH_LOSS, plots.VALIDATION_LOSS,
                              plots.Series("eval", "train_loss", "training", "--", "s"))),
              # Overfitting shows as a gap that keeps growing.
              plots.Panel("generalization gap", "validation - training loss", (
                  plots.Series("eval", "gap", "gap", marker="o"),)))
    plot_file, plot_title = "losses.png", "Character LM: training and validation loss"

    def validate(self, config, checks, mesh):
        m, d, t, e = config.model, config.data, config.train, config.eval
        checks.require(bool(d.text_file or d.tfds_name), "data.tfds_name",
                       "set a TFDS text dataset (e.g. tiny_shakespeare) or data.text_file")
        if not d.text_file:
            data_checks.check_tfds_data_dir(d.tfds_data_dir, "data.tfds_data_dir", checks)
        checks.unit_interval(d.val_fraction, "data.val_fraction")
        checks.one_of(d.vocab_source, ("train", "all"), "data.vocab_source")
        checks.unit_interval(d.train_fraction, "data.train_fraction", include_one=True)
        if all(isinstance(t[f], int) and t[f] >= 1 for f in ("num_steps", "eval_every_steps")):
            checks.require(t.num_steps % t.eval_every_steps == 0, "train.num_steps",
                           f"must be a multiple of train.eval_every_steps="
                           f"{t.eval_every_steps}, got {t.num_steps}")
        if all(isinstance(v, int) and v >= 1 for v in (t.loss_chunk, m.max_len)):
            problem = chunk_problem(t.loss_chunk, m.max_len)
            checks.require(problem is None, "train.loss_chunk",
                           f"{problem} (model.max_len; 0: full logits)")
        checks.positive(e.temperature, "eval.temperature", allow_zero=True)
        checks.require(isinstance(m.max_len, int) and 1 <= len(e.sample_prompt) < m.max_len,
                       "eval.sample_prompt",
                       f"must hold 1 to model.max_len-1 characters, got {e.sample_prompt!r}")

    def load_data(self, config, workdir, mesh):
        return char_lm.load_lm_data(config.data, os.path.join(workdir, "vocab.json"))

    def data_record(self, data):
        return {"source": data.source, "train_characters": len(data.train_ids),
                "val_characters": len(data.val_ids), "vocab_size": data.vocab.size}

    def model_fields(self, config, data):
        return {} if data is None else {"vocab_size": data.vocab.size}

    def schedule(self, config, data):
        # An "epoch" of the loop is eval_every_steps steps (windows are drawn at random).
        t = config.train
        return (t.num_steps // t.eval_every_steps, t.eval_every_steps, 1,
                t.batch_size * config.model.max_len)

    def batch_fn(self, run):
        t, context = run.config.train, run.config.model.max_len

        def get_batch(step):
            inputs, targets = char_lm.train_windows(run.data.train_ids, seed=run.seed,
                                                    step=step, batch_size=t.batch_size,
                                                    context=context)
            return sharding.shard_batch({"inputs": inputs, "targets": targets}, run.mesh)

        return get_batch

    def train_batch_shapes(self, config):
        # The vocabulary is the text's characters: GPTConfig's default (65) stands in.
        shape = (config.train.batch_size, config.model.max_len)
        return {"inputs": (shape, np.int32), "targets": (shape, np.int32)}, {}

    def loss_fn(self, config):
        """batch {"inputs", "targets"}: int32 [b, max_len] each; loss: mean next-character
        cross-entropy (nats), over chunks of train.loss_chunk tokens when it is > 0
        (bdia_jax.chunked_loss)."""
        chunk = config.train.loss_chunk

        def loss_fn(model, batch, key):
            if chunk:
                hidden, aux = model.hidden_states(batch["inputs"], key=key, train=True)
                sums = chunked_token_losses(hidden, model.head_embedding, batch["targets"],
                                            chunk=chunk)
            else:
                logits, aux = model(batch["inputs"], key=key, train=True)
                sums = token_losses(logits, batch["targets"],
                                    jnp.ones(batch["targets"].shape, bool))
            return sums["loss_sum"] / sums["num_tokens"], {
                "accuracy": sums["correct_sum"] / sums["num_tokens"], **aux}

        return loss_fn

    def _windows(self, run):
        kwargs = dict(context=run.config.model.max_len,
                      max_windows=run.config.eval.num_windows or None)
        return (char_lm.eval_windows(run.data.val_ids, **kwargs),
                char_lm.eval_windows(run.data.train_ids, **kwargs))

    def evaluator(self, run):
        step, size = trainer.model_step(run, lm_nll_sums), run.config.eval.batch_size
        val_windows, train_windows = self._windows(run)

        def evaluate(state):
            val = mean_loss(step, state, val_windows, size, run.mesh)
            train = mean_loss(step, state, train_windows, size, run.mesh)
            return {"val_loss": val, "train_loss": train, "gap": val - train,
                    "val_perplexity": float(np.exp(val))}

        return evaluate

    def report(self, run, state):
        """Text samples from the final parameters."""
        e, samples = run.config.eval, []
        if e.num_samples:
            start = time.perf_counter()
            samples = char_lm.sample_texts(training.merge(run.graphdef, state), run.data.vocab,
                                           e, run.config.model.max_len,
                                           jax.random.PRNGKey(run.seed + 7))
            log(f"[{run.display}] {len(samples)} sample(s) of {e.sample_length} characters "
                f"({time.perf_counter() - start:.1f}s); the first:\n{samples[0]}\n")
        val_windows, train_windows = self._windows(run)
        return {"eval_windows": {"val": len(val_windows[0]), "train": len(train_windows[0])},
                "samples": samples}

    def write_files(self, config, workdir, results):
        char_lm.write_samples(os.path.join(workdir, "samples.txt"),
                              {r["name"]: r["samples"] for r in results})
        return ["samples.txt"]


TASK = CharLM()
train_and_evaluate, validate_config = trainer.entry_points(TASK)

if __name__ == "__main__":
    trainer.main(TASK)
