"""Transformer vs BDIA-Transformer: English→French translation (Multi30k by default).

    python -m experiments.translation                           # quick preset, both models
    python -m experiments.translation --config=experiments/configs/translation.py:full \\
        --workdir=runs/translation_full --data_dir=/path/to/multi30k
    python -m experiments.translation --config.data.tfds_name=wmt14_translate/fr-en \\
        --config.data.val_split=validation --config.data.test_split=test

Reads aligned sentence files (or a TFDS translation dataset), trains a SentencePiece
tokenizer on the training split (saved in the workdir and reused on resume), trains the
model(s) that ``config.mode`` names on length-bucketed batches (label-smoothed
cross-entropy, AdamW with warmup), reports the validation loss and perplexity every epoch
and, at the end, detokenized sacreBLEU on the test split with greedy and beam decoding at
E[γ] = 0, with example translations. Writes to ``--workdir``: metrics.jsonl, summary.json,
curves.png, translations_<model>.txt, tokenizer/ and Orbax checkpoints (rerunning the same
command resumes). In "compare" mode both models start from the same initialisation and
see the same batches and keys.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import sacrebleu
from flax import nnx

from bdia_jax.models import Seq2SeqConfig, Seq2SeqTransformer, decoding
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
from experiments.configs.translation import MODES, PRESETS
from experiments.text import batching, parallel, tokenizer
from experiments.text.losses import token_losses
from experiments.text.parallel import TextDataError

DISPLAY_NAMES = {"standard": "Transformer", "bdia": "BDIA-Transformer"}
# Fields that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = (
    "mode", "data.dir", "data.tfds_data_dir", "data.tfds_download", "train.stop_after_steps",
    "train.progress", "train.log_every_steps", "train.checkpoint_every_steps",
    "train.keep_checkpoints", "train.async_checkpoints", "eval.decode_batch_size",
    "eval.num_examples_to_print", "mesh.fsdp", "distributed.initialize",
    "distributed.coordinator_address", "distributed.num_processes", "distributed.process_id",
)
# The arrays of a batch that go to the device (the host keeps "index").
DEVICE_KEYS = ("src", "src_mask", "tgt_in", "tgt_out", "tgt_mask")


# --------------------------------------------------------------------------- config


def seq2seq_config_for(config: ml_collections.ConfigDict, update: str,
                       tok: tokenizer.TranslationTokenizers) -> Seq2SeqConfig:
    """The ``Seq2SeqConfig`` of the standard or the BDIA model of this run."""
    m = config.model
    return Seq2SeqConfig(
        src_vocab_size=tok.src_vocab_size, tgt_vocab_size=tok.tgt_vocab_size,
        share_embeddings=tok.shared, tie_output=True,
        max_len=max(config.batch.bucket_lengths[-1], config.eval.max_decode_len),
        width=m.width, encoder_depth=m.encoder_depth, decoder_depth=m.decoder_depth,
        num_heads=m.num_heads, mlp_dim=m.mlp_dim, dropout=m.dropout,
        attention_dropout=m.attention_dropout, update=update,
        backprop=m.bdia_backprop if update == "bdia" else m.standard_backprop,
        recompute=m.bdia_recompute,
        gamma=m.gamma, frac_bits=m.frac_bits, quantize_at_inference=m.quantize_at_inference,
        compute_dtype=m.compute_dtype, pad_id=tokenizer.PAD_ID, bos_id=tokenizer.BOS_ID,
        eos_id=tokenizer.EOS_ID,
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
    for field in ("width", "encoder_depth", "decoder_depth", "num_heads", "mlp_dim"):
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
    checks.require(bool(d.tfds_name or d.dir), "data.dir",
                   "set the folder of the text files (or data.tfds_name)")
    checks.require(d.src_lang != d.tgt_lang, "data.tgt_lang",
                   f"must differ from data.src_lang={d.src_lang!r}")
    for field in ("num_train_examples", "num_val_examples", "num_test_examples"):
        _int_at_least(checks, d[field], f"data.{field}", 0)

    tk = config.tokenizer
    _int_at_least(checks, tk.vocab_size, "tokenizer.vocab_size", 8)
    checks.one_of(tk.model_type, ("unigram", "bpe"), "tokenizer.model_type")
    checks.require(0 < tk.character_coverage <= 1, "tokenizer.character_coverage",
                   f"must be in (0, 1], got {tk.character_coverage}")

    b = config.batch
    lengths = tuple(b.bucket_lengths)
    checks.require(len(lengths) >= 1 and all(isinstance(n, int) and n >= 2 for n in lengths)
                   and list(lengths) == sorted(set(lengths)), "batch.bucket_lengths",
                   f"must be strictly increasing ints >= 2, got {lengths}")
    _int_at_least(checks, b.tokens_per_batch, "batch.tokens_per_batch")

    ts.validate_optim(config.optim, checks)
    checks.require(0 <= config.optim.label_smoothing < 1, "optim.label_smoothing",
                   f"must be in [0, 1), got {config.optim.label_smoothing}")

    t = config.train
    for field in ("num_epochs", "log_every_steps", "eval_every_epochs",
                  "checkpoint_every_steps", "keep_checkpoints"):
        _int_at_least(checks, t[field], f"train.{field}")
    checks.positive(t.stop_after_steps, "train.stop_after_steps", allow_zero=True)
    checks.one_of(t.on_nonfinite, NONFINITE_POLICIES, "train.on_nonfinite")
    checks.one_of(t.progress, PROGRESS_MODES, "train.progress")

    e = config.eval
    _int_at_least(checks, e.beam_size, "eval.beam_size")
    checks.require(e.length_penalty >= 0, "eval.length_penalty",
                   f"must be >= 0, got {e.length_penalty}")
    _int_at_least(checks, e.max_decode_len, "eval.max_decode_len", 2)
    _int_at_least(checks, e.decode_batch_size, "eval.decode_batch_size")
    _int_at_least(checks, e.num_examples_to_print, "eval.num_examples_to_print", 0)
    sharding.validate_parallel_config(config, mesh, checks)
    if isinstance(e.decode_batch_size, int) and e.decode_batch_size >= 1:
        problem = sharding.check_batch_divisible(e.decode_batch_size, mesh,
                                                 "eval.decode_batch_size")
        if problem:
            checks.problems.append(problem)
    checks.raise_if_any("translation config")


# --------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class TranslationData:
    """Everything the training and evaluation of one run read.

    tokenizers:    source/target SentencePiece models.
    train, val:    length-bucketed batches of the training / validation split.
    test_src:      list of int32 [len] source ids (+EOS, truncated to the largest bucket).
    test_sources, test_references: the raw test sentences (BLEU compares with these).
    stats:         sizes and counts of dropped/truncated pairs, for summary.json.
    """

    tokenizers: tokenizer.TranslationTokenizers
    train: batching.BucketedBatches
    val: batching.BucketedBatches
    test_src: list
    test_sources: list[str]
    test_references: list[str]
    stats: dict


def read_split(config: ml_collections.ConfigDict, which: str) -> parallel.ParallelCorpus:
    """The ``which`` ("train" | "val" | "test") split, cut to ``data.num_<which>_examples``."""
    d = config.data
    split = d[f"{which}_split"]
    limit = d[f"num_{which}_examples"] or None
    if d.tfds_name:
        return parallel.read_tfds_parallel(
            d.tfds_name, split, d.src_lang, d.tgt_lang, data_dir=d.tfds_data_dir or None,
            download=d.tfds_download, max_examples=limit,
        )
    corpus = parallel.read_parallel(os.path.join(d.dir, split), d.src_lang, d.tgt_lang,
                                    what=f"data.dir (or --data_dir) / data.{which}_split")
    if limit is None:
        return corpus
    return dataclasses.replace(corpus, src=corpus.src[:limit], tgt=corpus.tgt[:limit])


def load_data(config: ml_collections.ConfigDict, workdir: str, mesh) -> TranslationData:
    """Reads the splits, trains or reloads the tokenizer(s), tokenizes and buckets."""
    d, b = config.data, config.batch
    corpora = {which: read_split(config, which) for which in ("train", "val", "test")}
    tk = config.tokenizer
    settings = tokenizer.SentencePieceSettings(
        vocab_size=tk.vocab_size, model_type=tk.model_type,
        character_coverage=tk.character_coverage,
    )
    tok = tokenizer.translation_tokenizers(
        os.path.join(workdir, "tokenizer"), corpora["train"].src, corpora["train"].tgt,
        src_lang=d.src_lang, tgt_lang=d.tgt_lang, shared=tk.shared, settings=settings,
    )
    max_len = b.bucket_lengths[-1]
    shards = sharding.num_data_shards(mesh)
    bucketed, too_long = {}, {}
    for which in ("train", "val"):
        pairs = batching.encode_pairs(corpora[which].src, corpora[which].tgt, tok.src, tok.tgt,
                                      max_len=max_len, too_long="drop")
        too_long[which] = pairs.num_too_long
        bucketed[which] = batching.BucketedBatches(
            pairs, bucket_lengths=b.bucket_lengths, tokens_per_batch=b.tokens_per_batch,
            batch_multiple=shards)
    test_pieces = tok.src.encode(corpora["test"].src)
    test_src = [np.asarray([*ids[: max_len - 1], tokenizer.EOS_ID], np.int32)
                for ids in test_pieces]
    too_long["test_truncated_sources"] = sum(len(ids) >= max_len for ids in test_pieces)
    stats = {
        "source": d.tfds_name and f"tfds:{d.tfds_name}" or os.path.abspath(d.dir),
        "pairs": {w: len(c) for w, c in corpora.items()},
        "dropped_empty": {w: c.num_dropped_empty for w, c in corpora.items()},
        "dropped_too_long": too_long,
        "vocab_size": {"src": tok.src_vocab_size, "tgt": tok.tgt_vocab_size,
                       "shared": tok.shared},
        "batches_per_epoch": bucketed["train"].num_batches,
        "batch_sizes": {str(k): v for k, v in bucketed["train"].batch_sizes.items()},
    }
    return TranslationData(tok, bucketed["train"], bucketed["val"], test_src,
                           corpora["test"].src, corpora["test"].tgt, stats)


def device_batch(batch: dict) -> dict:
    return {k: batch[k] for k in DEVICE_KEYS}


# --------------------------------------------------------------------------- model functions


def make_loss_fn(config: ml_collections.ConfigDict):
    """``loss_fn(model, batch, key) -> (loss, metrics)``: label-smoothed cross-entropy
    averaged over the batch's real target tokens (see ``batching.BucketedBatches``)."""
    smoothing = config.optim.label_smoothing

    def loss_fn(model, batch, key):
        logits, aux = model(batch["src"], batch["tgt_in"], src_mask=batch["src_mask"], key=key,
                            train=True)
        sums = token_losses(logits, batch["tgt_out"], batch["tgt_mask"],
                            label_smoothing=smoothing)
        tokens = jnp.maximum(sums["num_tokens"], 1.0)
        return sums["loss_sum"] / tokens, {
            "nll": sums["nll_sum"] / tokens,
            "token_accuracy": sums["correct_sum"] / tokens,
            "max_abs": aux["max_abs"],
            "overflow": aux["overflow"],
            "nonfinite": aux["nonfinite"],
        }

    return loss_fn


class BucketedTrainStep:
    """The compiled train step, one executable per bucket shape, all compiled up front
    (so compilation never lands in the timed training windows)."""

    def __init__(self, train_step, state, batches: batching.BucketedBatches, mesh):
        replicated = sharding.replicated_sharding(mesh)
        state_sharding = sharding.train_state_shardings(state, mesh)  # FSDP if mesh.fsdp > 1

        def compile_for(length):
            example = sharding.shard_batch(
                device_batch(batches.make_batch(length, np.zeros((0,), np.int64))), mesh)
            return example["src"].shape, ts.compile_train_step(
                train_step, state, example, state_sharding=state_sharding,
                batch_sharding=sharding.batch_sharding(mesh), metrics_sharding=replicated)

        # XLA compiles outside the GIL: the bucket shapes compile in parallel.
        with ThreadPoolExecutor(max_workers=min(len(batches.bucket_lengths),
                                                os.cpu_count() or 1)) as pool:
            self.compiled = dict(pool.map(compile_for, batches.bucket_lengths))
        self.largest = self.compiled[max(self.compiled, key=lambda shape: shape[1])]

    def __call__(self, state, batch):
        return self.compiled[batch["src"].shape](state, batch)


@functools.lru_cache(maxsize=8)  # same graphdef (e.g. a resumed run in one process): reuse
def make_eval_step(graphdef):
    """Jitted ``(params, probes, rest, batch) -> {"nll_sum", "correct_sum", "num_tokens"}``
    at E[γ] = 0 (one compilation per bucket shape)."""

    @jax.jit
    def eval_step(params, probes, rest, batch):
        model = nnx.merge(graphdef, params, probes, rest)
        logits, _ = model(batch["src"], batch["tgt_in"], src_mask=batch["src_mask"])
        sums = token_losses(logits, batch["tgt_out"], batch["tgt_mask"])
        return {k: sums[k] for k in ("nll_sum", "correct_sum", "num_tokens")}

    return eval_step


def evaluate_loss(eval_step, state, batches: batching.BucketedBatches, mesh) -> dict:
    """Validation loss (nats per target token, no smoothing), perplexity, token accuracy."""
    totals = {"nll_sum": 0.0, "correct_sum": 0.0, "num_tokens": 0.0}
    for batch in batches.iterate(seed=None):
        out = eval_step(state.params, state.probes, state.rest,
                        sharding.shard_batch(device_batch(batch), mesh))
        for k, v in sharding.to_host(out).items():
            totals[k] += float(v)
    loss = totals["nll_sum"] / totals["num_tokens"]
    return {"val_loss": loss, "val_perplexity": float(np.exp(loss)),
            "val_token_accuracy": totals["correct_sum"] / totals["num_tokens"]}


@functools.lru_cache(maxsize=8)
def make_translate_fn(graphdef, *, max_len: int, beam_size: int, alpha: float):
    """Jitted ``(params, probes, rest, src, src_mask) -> tokens int32 [b, max_len]``:
    greedy decoding (beam_size 1) or beam search, at E[γ] = 0 with the KV cache. PAD and
    BOS are never generated."""
    banned = jnp.asarray([tokenizer.PAD_ID, tokenizer.BOS_ID])

    @jax.jit
    def translate(params, probes, rest, src, src_mask):
        model = nnx.merge(graphdef, params, probes, rest)

        def step_fn(state, tokens, pos):
            log_probs, state = model.decode_step(state, tokens, pos)
            return log_probs.at[:, banned].set(-jnp.inf), state

        ids = dict(bos_id=tokenizer.BOS_ID, eos_id=tokenizer.EOS_ID, pad_id=tokenizer.PAD_ID)
        if beam_size == 1:
            state = model.init_decode_state(src, max_len, src_mask=src_mask)
            return decoding.greedy_search(step_fn, state, batch_size=src.shape[0],
                                          max_len=max_len, **ids)
        state = model.init_decode_state(src, max_len, src_mask=src_mask, beam_size=beam_size)
        tokens, _ = decoding.beam_search(step_fn, model.reorder_state, state,
                                         batch_size=src.shape[0], beam_size=beam_size,
                                         max_len=max_len, alpha=alpha, **ids)
        return tokens

    return translate


def ids_until_eos(row) -> list[int]:
    """Decoder output ids up to (not including) EOS / padding."""
    out = []
    for t in row:
        if t in (tokenizer.EOS_ID, tokenizer.PAD_ID):
            break
        out.append(int(t))
    return out


def translate_all(translate, state, data: TranslationData, config, mesh) -> list[str]:
    """Detokenized translations of every test source (one compiled shape: sources padded
    to the smallest bucket that holds the longest one; a partial last batch padded with
    one-token rows that are thrown away)."""
    size = config.eval.decode_batch_size
    longest = max(len(s) for s in data.test_src)
    length = next(n for n in config.batch.bucket_lengths if n >= longest)
    outputs = []
    for begin in range(0, len(data.test_src), size):
        rows = data.test_src[begin : begin + size]
        src = np.full((size, length), tokenizer.PAD_ID, np.int32)
        src[:, 0] = tokenizer.EOS_ID  # padding rows: a lone EOS (no all-masked attention)
        for r, ids in enumerate(rows):
            src[r, : len(ids)] = ids
        batch = sharding.shard_batch({"src": src, "src_mask": src != tokenizer.PAD_ID}, mesh)
        tokens = sharding.to_host(translate(state.params, state.probes, state.rest,
                                          batch["src"], batch["src_mask"]))
        outputs += [ids_until_eos(row) for row in tokens[: len(rows)]]
    return [data.tokenizers.tgt.decode(ids) for ids in outputs]


def bleu(hypotheses: list[str], references: list[str]) -> tuple[float, str]:
    """Corpus sacreBLEU (default 13a tokenization) of detokenized text, and its signature."""
    metric = sacrebleu.metrics.BLEU()
    score = metric.corpus_score(hypotheses, [references])
    return float(score.score), str(metric.get_signature())


# --------------------------------------------------------------------------- one model


def train_model(config, update: str, data: TranslationData, mesh, workdir: str,
                writer: metrics.MetricsWriter) -> dict:
    """Train (or resume, or reload) one model, evaluate it, translate the test split."""
    name = DISPLAY_NAMES[update]
    result_path = os.path.join(workdir, "checkpoints", f"{update}_result.json")
    if os.path.exists(result_path):
        log(f"[{name}] already finished in this workdir; reusing {result_path}")
        with open(result_path) as f:
            return json.load(f)

    t, e = config.train, config.eval
    model_cfg = seq2seq_config_for(config, update, data.tokenizers)
    model = Seq2SeqTransformer(model_cfg, rngs=nnx.Rngs(config.seed))  # same init for both
    spe = data.train.num_batches
    num_steps = t.num_epochs * spe
    optimizer, schedule = ts.make_optimizer(config.optim, num_steps, spe)
    base_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
    graphdef, state = ts.create_train_state(model, optimizer, base_key)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
    del model
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
        log(f"[{name}] resumed from the checkpoint at step {step}/{num_steps}"
            f"{f' (dropped {dropped} later records)' if dropped else ''}")

    plan_cache: dict[int, list] = {}

    def get_batch(step):
        # The epoch's batch order is a function of (seed, epoch): resuming mid-epoch replays it.
        epoch = step // spe
        if epoch not in plan_cache:
            plan_cache.clear()
            plan_cache[epoch] = data.train.plan(seed=config.seed, epoch=epoch)
        batch = data.train.make_batch(*plan_cache[epoch][step % spe])
        return sharding.shard_batch(device_batch(batch), mesh)

    compile_start = time.perf_counter()
    train_step = BucketedTrainStep(
        ts.make_train_step(graphdef, make_loss_fn(config), optimizer, schedule=schedule,
                           stop_on_nonfinite=t.on_nonfinite == "stop",
                           gather_params=sharding.gather_sharding(mesh)),
        state, data.train, mesh)
    compile_seconds = time.perf_counter() - compile_start
    compiled_mem = memory.compiled_memory(train_step.largest)
    log(f"[{name}] {num_params:,} parameters, update={update}, backprop={model_cfg.backprop}; "
        f"{num_steps} steps ({t.num_epochs} epochs x {spe} batches, buckets "
        f"{data.stats['batch_sizes']} sentences) on {sharding.num_data_shards(mesh)} "
        f"device(s); {len(train_step.compiled)} train-step shapes compiled in "
        f"{compile_seconds:.1f}s"
        + (f", peak memory estimate (largest bucket) "
           f"{memory.megabytes(compiled_mem['peak_estimate_bytes']):.1f} MB/device (temp "
           f"{memory.megabytes(compiled_mem['temp_bytes']):.1f} MB)" if compiled_mem else ""))

    eval_step = make_eval_step(graphdef)
    mean_sentences = len(data.train.pairs) / spe
    settings = LoopSettings(
        num_epochs=t.num_epochs, steps_per_epoch=spe, log_every_steps=t.log_every_steps,
        eval_every_epochs=t.eval_every_epochs, stop_after_steps=t.stop_after_steps,
        on_nonfinite=t.on_nonfinite, progress=t.progress,
        examples_per_step=max(1, round(mean_sentences)),
    )
    try:
        state, loop_result = run_loop(
            name=name, state=state, step_fn=train_step, get_batch=get_batch,
            settings=settings, checkpointer=checkpointer, writer=writer,
            evaluate=lambda s: evaluate_loss(eval_step, s, data.val, mesh),
            best_metric="val_loss", best_mode="min", result=loop_result,
            summary_keys=("loss", "nll", "reversal_error_max", "overflow_steps"),
        )
    finally:
        checkpointer.close()
    device_mem = memory.device_memory()

    # Test-set translation at E[γ] = 0: greedy and beam search.
    decode_len = e.max_decode_len
    translations, bleu_scores, decode_seconds = {}, {}, {}
    signature = None
    for method, beam in (("greedy", 1), ("beam", e.beam_size)):
        decode_start = time.perf_counter()
        translate = make_translate_fn(graphdef, max_len=decode_len, beam_size=beam,
                                      alpha=e.length_penalty)
        translations[method] = translate_all(translate, state, data, config, mesh)
        decode_seconds[method] = time.perf_counter() - decode_start
        bleu_scores[method], signature = bleu(translations[method], data.test_references)
    writer.write({"model": name, "kind": "test", "step": num_steps,
                  "bleu_greedy": bleu_scores["greedy"], "bleu_beam": bleu_scores["beam"],
                  "beam_size": e.beam_size, "num_sentences": len(data.test_references)})
    log(f"[{name}] test sacreBLEU on {len(data.test_references)} sentences: greedy "
        f"{bleu_scores['greedy']:.2f} ({decode_seconds['greedy']:.1f}s), beam {e.beam_size} "
        f"{bleu_scores['beam']:.2f} ({decode_seconds['beam']:.1f}s)  [{signature}]")
    examples = [
        {"source": data.test_sources[i], "reference": data.test_references[i],
         "greedy": translations["greedy"][i], "beam": translations["beam"][i]}
        for i in range(min(e.num_examples_to_print, len(data.test_sources)))
    ]
    for ex in examples:
        log(f"  src:    {ex['source']}\n  ref:    {ex['reference']}\n"
            f"  greedy: {ex['greedy']}\n  beam:   {ex['beam']}")
    if sharding.is_primary():  # multi-host: process 0 writes the files
        with open(os.path.join(workdir, f"translations_{update}.txt"), "w",
                  encoding="utf-8") as f:
            for i, (g, b) in enumerate(zip(translations["greedy"], translations["beam"],
                                           strict=True)):
                f.write(f"{i}\tgreedy\t{g}\n{i}\tbeam\t{b}\n")

    final = loop_result.last_eval or {}
    step_time = loop_result.step_time_s
    result = {
        "name": name,
        "update": update,
        "backprop": model_cfg.backprop,
        "num_params": num_params,
        "steps": num_steps,
        "epochs": t.num_epochs,
        "val_loss_final": final.get("val_loss"),
        "val_perplexity_final": final.get("val_perplexity"),
        "val_loss_best": loop_result.best,
        "val_perplexity_best": None if loop_result.best is None else float(np.exp(loop_result.best)),
        "best_step": loop_result.best_step,
        "test_bleu_greedy": bleu_scores["greedy"],
        "test_bleu_beam": bleu_scores["beam"],
        "beam_size": e.beam_size,
        "length_penalty": e.length_penalty,
        "bleu_signature": signature,
        "test_sentences": len(data.test_references),
        "decode_seconds": decode_seconds,
        "examples": examples,
        "memory": runs.memory_record(compiled_mem, device_mem),
        "compile_seconds": compile_seconds,
        "step_time_s": step_time,
        "sentences_per_s": mean_sentences / step_time if step_time else None,
        "train_seconds": loop_result.train_seconds,
        "timed_steps": loop_result.timed_steps,
        "reversal_error_max": loop_result.max_reversal_error,
        "reversal_exact": (loop_result.max_reversal_error == 0.0
                           if model_cfg.backprop == "reversible" and update == "bdia" else None),
        "overflow_steps": loop_result.overflow_steps,
        "nonfinite_steps": loop_result.nonfinite_steps,
    }
    metrics.write_json(result_path, result)
    return result


# --------------------------------------------------------------------------- whole run


def _side_by_side(results: dict) -> str:
    rs = list(results.values())

    def num(key, fmt="{:.4f}"):
        return ["n/a" if r.get(key) is None else fmt.format(r[key]) for r in rs]

    def mb(r, key):
        v = (r["memory"]["compiled"] or {}).get(key)
        return "n/a" if v is None else f"{v / 2**20:.1f} MB"

    rows = [
        ("test BLEU (greedy)", num("test_bleu_greedy", "{:.2f}")),
        (f"test BLEU (beam {rs[0]['beam_size']})", num("test_bleu_beam", "{:.2f}")),
        ("validation loss (final)", num("val_loss_final")),
        ("validation perplexity (final)", num("val_perplexity_final", "{:.2f}")),
        ("validation loss (best)", num("val_loss_best")),
        ("train-step memory (compiled)", [mb(r, "peak_estimate_bytes") for r in rs]),
        ("  of which temp (activations)", [mb(r, "temp_bytes") for r in rs]),
        ("step time", ["n/a" if r["step_time_s"] is None else f"{r['step_time_s'] * 1e3:.1f} ms"
                       for r in rs]),
        ("sentences / s", num("sentences_per_s", "{:.1f}")),
        ("reversal error (max)", ["n/a" if r["reversal_exact"] is None
                                  else f"{r['reversal_error_max']:.3g}" for r in rs]),
        ("overflow / non-finite steps", [f"{r['overflow_steps']} / {r['nonfinite_steps']}"
                                         for r in rs]),
    ]
    return runs.format_table([r["name"] for r in rs], rows)


def _plot(workdir: str, records_path: str, results: dict) -> str:
    curves = {}
    for r in results.values():
        train = metrics.read_records(records_path, model=r["name"], kind="train")
        evals = metrics.read_records(records_path, model=r["name"], kind="eval")
        curves[r["name"]] = {
            "train_step": [x["step"] for x in train], "train_loss": [x["loss"] for x in train],
            "eval_step": [x["step"] for x in evals],
            "eval_value": [x["val_loss"] for x in evals],
            "eval_label": "validation loss (nats / token)", "eval_split": "validation",
        }
    path = os.path.join(workdir, "curves.png")
    plots.plot_curves(curves, path, title="Translation: training loss (label-smoothed) and "
                      "validation loss")
    return path


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
    data = load_data(config, workdir, mesh)
    s = data.stats
    log(f"data: {s['source']} {config.data.src_lang}→{config.data.tgt_lang}: {s['pairs']} "
        f"pairs (dropped empty {s['dropped_empty']}, too long {s['dropped_too_long']}); "
        f"vocabulary {s['vocab_size']}; loaded and tokenized in "
        f"{time.perf_counter() - load_start:.1f}s; {sharding.num_data_shards(mesh)} "
        f"{jax.default_backend()} device(s); workdir {workdir}")

    results = {}
    for update in runs.models_for_mode(config.mode):
        results[update] = train_model(config, update, data, mesh, workdir, writer)

    plot_path = (_plot(workdir, writer.path, results) if sharding.is_primary()
                 else os.path.join(workdir, "curves.png"))
    summary = {
        "config": config_lib.to_dict(config),
        "versions": {**metrics.versions(), "sacrebleu": sacrebleu.__version__},
        "devices": metrics.device_info(mesh),
        "data": s,
        "models": results,
        "plots": [os.path.basename(plot_path)],
        "wall_seconds": time.perf_counter() - start,
    }
    metrics.write_json(os.path.join(workdir, "summary.json"), summary)
    log("\n" + _side_by_side(results))
    log(f"\nwrote {os.path.join(workdir, 'summary.json')}, metrics.jsonl, curves.png, "
        f"translations_*.txt and checkpoints/ ({summary['wall_seconds']:.0f}s)")
    return summary


# --------------------------------------------------------------------------- CLI


def _set_data_dir(config, data_dir: str) -> None:
    config.data.dir = data_dir


if __name__ == "__main__":
    runs.run_experiment(
        "translation", train_and_evaluate, presets=PRESETS, set_data_dir=_set_data_dir,
        data_dir_help="folder of the {split}.{lang}[.gz] files (default: config.data.dir, "
                      "../shared/data/multi30k).",
        errors=(config_lib.ConfigError, TextDataError, FileNotFoundError,
                sharding.DistributedInitError, NonFiniteError))
