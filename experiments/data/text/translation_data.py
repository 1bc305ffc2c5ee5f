"""The data of the translation experiment: aligned sentence files or a TFDS translation
dataset, a SentencePiece tokenizer trained on the training split, length-bucketed batches
(see ``batching``) and the test sources and references that BLEU reads."""

from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np

from experiments.common import sharding
from experiments.data.text import batching, parallel, tokenizer

# The arrays of a batch that go to the device (the host keeps "index").
DEVICE_KEYS = ("src", "src_mask", "tgt_in", "tgt_out", "tgt_mask")


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
