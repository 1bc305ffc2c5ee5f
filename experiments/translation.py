"""Transformer vs BDIA-Transformer: English→French translation (Multi30k by default).

    python -m experiments.translation                           # quick preset, both models
    python -m experiments.translation --config=experiments/configs/translation.py:full \\
        --workdir=runs/translation_full --data_dir=/path/to/multi30k

Trains a SentencePiece tokenizer on the training split (``experiments.data.text``), then the
models that ``config.mode`` names on length-bucketed batches; reports validation loss and
perplexity every epoch and, at the end, sacreBLEU on the test split with greedy and beam
decoding at E[γ] = 0. Writes to ``--workdir``: metrics.jsonl, summary.json, config.json,
curves.png, translations_<model>.txt, tokenizer/ and Orbax checkpoints (rerunning the
same command resumes).
"""

from __future__ import annotations

if __name__ == "__main__":  # --help at once, before the imports below load JAX
    from experiments.common.quick_help import exit_if_help

    exit_if_help("translation", __doc__)

import os

import jax.numpy as jnp
import numpy as np
import sacrebleu

from bdia_jax.models import Seq2SeqConfig, Seq2SeqTransformer
from experiments.common import data_checks, plots, sharding, trainer
from experiments.common.loop import log
from experiments.configs.translation import PRESETS
from experiments.data.text import batching, tokenizer, translate, translation_data
from experiments.data.text.losses import token_losses
from experiments.data.text.parallel import TextDataError
from experiments.data.text.translation_data import device_batch


def _token_sums(model, batch):
    """{"nll_sum", "correct_sum", "num_tokens"} of a batch at E[γ] = 0 (no smoothing)."""
    logits, _ = model(batch["src"], batch["tgt_in"], src_mask=batch["src_mask"])
    sums = token_losses(logits, batch["tgt_out"], batch["tgt_mask"])
    return {k: sums[k] for k in ("nll_sum", "correct_sum", "num_tokens")}


class Translation(trainer.ValLossTask):
    name, presets = "translation", PRESETS
    config_class, model_class = Seq2SeqConfig, Seq2SeqTransformer
    display_names = {"standard": "Transformer", "bdia": "BDIA-Transformer"}
    errors = (TextDataError, FileNotFoundError)
    data_dir_help = ("folder of the {split}.{lang}[.gz] files (default: config.data.dir, "
                     "../shared/data/multi30k).")
    resumable = ("data.dir", "data.tfds_data_dir", "data.tfds_download",
                 "eval.decode_batch_size", "eval.num_examples_to_print")
    summary_keys = ("loss", "nll", "reversal_error_max", "overflow_steps")
    batch_fields = ("eval.decode_batch_size",)
    int_fields = {**{f"model.{f}": 1 for f in ("width", "encoder_depth", "decoder_depth",
                                               "num_heads", "mlp_dim")},
                  **{f"data.num_{w}_examples": 0 for w in ("train", "val", "test")},
                  "tokenizer.vocab_size": 8, "batch.tokens_per_batch": 1,
                  "train.num_epochs": 1, "train.eval_every_epochs": 1, "eval.beam_size": 1,
                  "eval.max_decode_len": 2, "eval.decode_batch_size": 1,
                  "eval.num_examples_to_print": 0}
    fraction_fields = ("optim.label_smoothing",)
    throughput = ("sentences_per_s", "sentences")
    table = (("test BLEU (greedy)", "test_bleu_greedy", "{:.2f}"),
             ("test BLEU (beam)", "test_bleu_beam", "{:.2f}"),
             trainer.VAL_ROWS["final"], trainer.VAL_ROWS["perplexity"], trainer.VAL_ROWS["best"])
    panels = (plots.Panel("training loss (label-smoothed)", "loss", (
                  plots.Series("train", "loss", "training batches"),)),
              plots.Panel("validation loss", "nats / token", (
                  plots.VALIDATION_LOSS,)))
    plot_title = "Translation: training and validation loss"

    def validate(self, config, checks, mesh):
        d, tk, b, e = config.data, config.tokenizer, config.batch, config.eval
        checks.require(bool(d.tfds_name or d.dir), "data.dir",
                       "set the folder of the text files (or data.tfds_name)")
        if d.tfds_name:
            data_checks.check_tfds_data_dir(d.tfds_data_dir, "data.tfds_data_dir", checks)
        checks.require(d.src_lang != d.tgt_lang, "data.tgt_lang",
                       f"must differ from data.src_lang={d.src_lang!r}")
        checks.one_of(tk.model_type, ("unigram", "bpe"), "tokenizer.model_type")
        checks.unit_interval(tk.character_coverage, "tokenizer.character_coverage",
                             include_one=True)
        lengths = tuple(b.bucket_lengths)
        checks.require(len(lengths) >= 1 and all(isinstance(n, int) and n >= 2 for n in lengths)
                       and list(lengths) == sorted(set(lengths)), "batch.bucket_lengths",
                       f"must be strictly increasing ints >= 2, got {lengths}")
        checks.positive(e.length_penalty, "eval.length_penalty", allow_zero=True)

    def load_data(self, config, workdir, mesh):
        return translation_data.load_data(config, workdir, mesh)

    def data_record(self, data):
        return data.stats

    def model_fields(self, config, data):
        fields = dict(max_len=max(config.batch.bucket_lengths[-1], config.eval.max_decode_len),
                      pad_id=tokenizer.PAD_ID, bos_id=tokenizer.BOS_ID, eos_id=tokenizer.EOS_ID)
        if data is not None:
            tok = data.tokenizers
            fields.update(src_vocab_size=tok.src_vocab_size, tgt_vocab_size=tok.tgt_vocab_size,
                          share_embeddings=tok.shared)
        return fields

    def schedule(self, config, data):
        spe = data.train.num_batches
        return (config.train.num_epochs, spe, config.train.eval_every_epochs,
                len(data.train.pairs) / spe)

    def batch_fn(self, run):
        plan_cache, spe = {}, run.data.train.num_batches

        def get_batch(step):
            # An epoch's batch order is a function of (seed, epoch): a resume replays it.
            epoch = step // spe
            if epoch not in plan_cache:
                plan_cache.clear()
                plan_cache[epoch] = run.data.train.plan(seed=run.seed, epoch=epoch)
            batch = run.data.train.make_batch(*plan_cache[epoch][step % spe])
            return sharding.shard_batch(device_batch(batch), run.mesh)

        return get_batch

    def example_batches(self, run, get_batch):
        empty = np.zeros((0,), np.int64)  # one batch of every bucket length
        return [sharding.shard_batch(device_batch(run.data.train.make_batch(n, empty)), run.mesh)
                for n in run.data.train.bucket_lengths]

    def train_batch_shapes(self, config):
        # The longest bucket: the most attention per token. The tokenizer's vocab_size is
        # the most pieces it gives (a small corpus may give fewer).
        length = config.batch.bucket_lengths[-1]
        rows = batching.batch_size_for(length, config.batch.tokens_per_batch)
        shapes = {name: ((rows, length), np.int32) for name in ("src", "tgt_in", "tgt_out")}
        shapes.update(src_mask=((rows, length), np.bool_), tgt_mask=((rows, length), np.bool_))
        v = config.tokenizer.vocab_size
        return shapes, {"src_vocab_size": v, "tgt_vocab_size": v,
                        "share_embeddings": config.tokenizer.shared}

    def loss_fn(self, config):
        """Label-smoothed cross-entropy averaged over the batch's real target tokens."""
        smoothing = config.optim.label_smoothing

        def loss_fn(model, batch, key):
            logits, aux = model(batch["src"], batch["tgt_in"], src_mask=batch["src_mask"],
                                key=key, train=True)
            sums = token_losses(logits, batch["tgt_out"], batch["tgt_mask"],
                                label_smoothing=smoothing)
            tokens = jnp.maximum(sums["num_tokens"], 1.0)
            return sums["loss_sum"] / tokens, {
                "nll": sums["nll_sum"] / tokens, "token_accuracy": sums["correct_sum"] / tokens,
                **aux}

        return loss_fn

    def evaluator(self, run):
        step = trainer.model_step(run, _token_sums)

        def evaluate(state):
            sums = trainer.sum_over(step, state, map(device_batch, run.data.val.iterate(
                seed=None)), run.mesh)
            loss = sums["nll_sum"] / sums["num_tokens"]
            return {"val_loss": loss, "val_perplexity": float(np.exp(loss)),
                    "val_token_accuracy": sums["correct_sum"] / sums["num_tokens"]}

        return evaluate

    def report(self, run, state):
        """Test-set translation at E[γ] = 0, greedy and beam search; sacreBLEU."""
        e, data, n = run.config.eval, run.data, len(run.data.test_references)
        out = translate.translate_test_set(
            lambda beam: trainer.model_step(run, translate.translate_batch, beam_size=beam,
                                            max_len=e.max_decode_len, alpha=e.length_penalty),
            state, data, e, run.config.batch.bucket_lengths, run.mesh)
        run.writer.write({"model": run.display, "kind": "test", "step": run.num_steps,
                          "bleu_greedy": out["bleu_greedy"], "bleu_beam": out["bleu_beam"],
                          "beam_size": e.beam_size, "num_sentences": n})
        log(f"[{run.display}] test sacreBLEU on {n} sentences: greedy {out['bleu_greedy']:.2f} "
            f"({out['seconds']['greedy']:.1f}s), beam {e.beam_size} {out['bleu_beam']:.2f} "
            f"({out['seconds']['beam']:.1f}s)  [{out['signature']}]")
        examples = translate.first_examples(data, out, e.num_examples_to_print)
        for ex in examples:
            log("\n".join(f"  {k + ':':<8}{v}" for k, v in ex.items()))
        if sharding.is_primary():  # multi-host: process 0 writes the files
            translate.write_translations(
                os.path.join(run.workdir, f"translations_{run.name}.txt"), out)
        return {"test_bleu_greedy": out["bleu_greedy"], "test_bleu_beam": out["bleu_beam"],
                "beam_size": e.beam_size, "length_penalty": e.length_penalty,
                "bleu_signature": out["signature"], "test_sentences": n,
                "decode_seconds": out["seconds"], "examples": examples}

    def write_files(self, config, workdir, results):
        return [f"translations_{name}.txt" for name in trainer.models_for_mode(config)]

    def versions(self):
        return {"sacrebleu": sacrebleu.__version__}


TASK = Translation()
train_and_evaluate, validate_config = trainer.entry_points(TASK)

if __name__ == "__main__":
    trainer.main(TASK)
