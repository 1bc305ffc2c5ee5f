"""Configs of ``python -m experiments.translation`` (Transformer vs BDIA-Transformer, En→Fr).

Select a preset with ``--config=experiments/configs/translation.py:<preset>`` and override
any field on the command line, e.g. ``--config.train.num_epochs=3``. Presets:

* ``quick`` (the default): a small encoder-decoder on Multi30k En→Fr; both models train,
  evaluate and decode the test set in about 10 minutes on a 2-core CPU.
* ``full``: a base-sized Transformer (6+6 layers, width 512) for accelerators.
* ``overfit``: the quick model on the first 1,000 training pairs for 16 epochs, seeds 0-2,
  well past the standard model's best validation loss: the regime of the paper's
  regularization claim.
* ``tiny``: a few steps on a few sentences, for smoke tests and CI.

Data: by default aligned text files ``{data.dir}/{split}.{lang}[.gz]`` (one sentence per
line; Multi30k lies at ``../shared/data/multi30k`` relative to the repository, override with
``--data_dir`` or ``--config.data.dir``). With ``data.tfds_name`` set (e.g.
``wmt14_translate/fr-en``) the splits are read from TFDS instead.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common

PRESETS = ("quick", "full", "tiny", "overfit")


def _base() -> ml_collections.ConfigDict:
    c = common.base_config()  # preset, seed, mode, models, methods, mesh, distributed

    # --- the encoder-decoder (fields of bdia_jax.models.Seq2SeqConfig, under their names;
    # vocabularies and token ids come from the tokenizer, max_len from the bucket lengths
    # and eval.max_decode_len)
    c.model = ml_collections.ConfigDict()
    c.model.width = 256  # residual stream (embedding) dimension
    c.model.encoder_depth = 3  # encoder blocks (>= 1)
    c.model.decoder_depth = 3  # decoder blocks (>= 1)
    c.model.num_heads = 4  # attention heads; width must be divisible by it
    c.model.mlp_dim = 1024  # hidden size of each block's MLP
    c.model.dropout = 0.1  # embedding and residual-branch dropout rate
    c.model.attention_dropout = 0.0  # dropout rate on attention probabilities
    c.model.compute_dtype = "float32"  # matmul dtype: "float32", or "bfloat16" on TPU/GPU

    # --- data
    c.data = ml_collections.ConfigDict()
    # Folder of the aligned text files {dir}/{split}.{lang}[.gz]; relative paths are taken
    # from the working directory (run from the repository root). --data_dir overrides it.
    c.data.dir = "../shared/data/multi30k"
    c.data.src_lang = "en"  # source language code (file suffix / TFDS feature name)
    c.data.tgt_lang = "fr"  # target language code
    c.data.train_split = "train"  # training split (file prefix or TFDS split)
    c.data.val_split = "val"  # validation split: loss and perplexity every epoch
    c.data.test_split = "test_2016_flickr"  # test split: sacreBLEU at the end
    # TFDS translation dataset instead of files, e.g. "wmt14_translate/fr-en" ("" = files);
    # its splits are then named like "train", "validation", "test".
    c.data.tfds_name = ""
    c.data.tfds_data_dir = ""  # TFDS data dir ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets)
    c.data.tfds_download = False  # let TFDS download and prepare the dataset (network)
    c.data.num_train_examples = 0  # use the first N training pairs (0: all)
    c.data.num_val_examples = 0  # use the first N validation pairs (0: all)
    c.data.num_test_examples = 0  # translate the first N test pairs (0: all)

    # --- tokenizer (SentencePiece, trained on the training split, saved in the workdir)
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.vocab_size = 8000  # pieces per model (a small corpus may give fewer)
    c.tokenizer.shared = True  # one vocabulary for both languages (else one per language)
    c.tokenizer.model_type = "unigram"  # "unigram" | "bpe"
    c.tokenizer.character_coverage = 1.0  # share of characters covered (1.0: all)

    # --- batches (length-bucketed; one compiled step per bucket length)
    c.batch = ml_collections.ConfigDict()
    # Bucket lengths in tokens (incl. BOS/EOS), strictly increasing. Training pairs longer
    # than the last are dropped (counted in summary.json); test sources are truncated.
    c.batch.bucket_lengths = (16, 24, 32, 48, 64)
    # Tokens per batch: a bucket of length L gets tokens_per_batch // L sentences (rounded
    # down to a multiple of the device count).
    c.batch.tokens_per_batch = 4096

    # --- optimisation: the shared fields are described in experiments/configs/common.py;
    # Adam b2 0.98 as in the Transformer paper.
    common.add_optim(c, warmup_epochs=1.0, end_learning_rate_factor=0.05, weight_decay=0.01,
                     b2=0.98, eps=1e-9)
    c.optim.label_smoothing = 0.1  # label smoothing ε of the training cross-entropy

    # --- training loop (the shared fields: experiments/configs/common.py)
    common.add_train(c)
    c.train.num_epochs = 10  # passes over the training pairs
    c.train.eval_every_epochs = 1  # validation loss/perplexity every N epochs (and at the end)

    # --- evaluation (at E[γ] = 0: the inference update of both models)
    c.eval = ml_collections.ConfigDict()
    c.eval.beam_size = 4  # beam width for the beam-search BLEU (greedy is always run too)
    c.eval.length_penalty = 0.6  # GNMT length-penalty exponent α of beam search
    # Decoding stops at this many target tokens (incl. EOS); the KV cache has this length.
    c.eval.max_decode_len = 64
    c.eval.decode_batch_size = 64  # test sentences decoded at once (beam: x beam_size rows)
    c.eval.num_examples_to_print = 5  # example translations printed and saved per model
    return c


def get_config(preset: str = "quick") -> ml_collections.ConfigDict:
    """The config of ``preset`` ("quick", "full", "tiny" or "overfit")."""
    c = common.preset_config("translation", preset, PRESETS, _base)
    if c.preset == "quick":
        # Sized for a 2-core CPU: both models train, evaluate and decode in ~10 minutes.
        # One epoch of a small model, no dropout (it underfits anyway in one epoch).
        c.model.update(width=128, encoder_depth=2, decoder_depth=2, num_heads=4, mlp_dim=256,
                       dropout=0.0)
        c.tokenizer.vocab_size = 2000
        c.data.num_train_examples = 0
        # Three shapes to compile per model. With 2000 pieces 96% of the Multi30k training
        # pairs fit in 36 tokens; the longer ones are dropped (counted in summary.json) and
        # the few longer test sources are truncated.
        c.batch.update(bucket_lengths=(16, 24, 36), tokens_per_batch=2048)
        c.train.num_epochs = 1
        # Peak learning rate measured on this preset (standard model, 1 epoch, validation
        # loss): 2e-3 → 3.45, 4e-3 → 3.04, 7e-3 → 2.86 (BDIA at 7e-3: 2.97, stable).
        c.optim.update(learning_rate=7e-3, warmup_epochs=0.1)
        c.eval.update(beam_size=4, max_decode_len=48)
    elif c.preset == "overfit":
        # The quick model, small enough data to overfit: validation loss every epoch shows
        # the standard model's turn; BDIA's claim is a lower best and final validation loss.
        c.model.update(width=128, encoder_depth=2, decoder_depth=2, num_heads=4, mlp_dim=256,
                       dropout=0.0)
        c.tokenizer.vocab_size = 1000  # a small corpus gives too few pieces for more
        c.data.num_train_examples = 1000
        c.batch.update(bucket_lengths=(16, 24, 36), tokens_per_batch=1024)
        c.train.num_epochs = 16  # ~400 steps
        c.seeds = (0, 1, 2)
        c.optim.update(learning_rate=7e-3, warmup_epochs=1.0)
        c.eval.update(beam_size=4, max_decode_len=48)
    elif c.preset == "full":
        # Transformer-base-like model for accelerators (Multi30k or WMT via data.tfds_name).
        c.model.update(width=512, encoder_depth=6, decoder_depth=6, num_heads=8,
                       mlp_dim=2048, dropout=0.1)
        c.tokenizer.vocab_size = 8000
        c.batch.tokens_per_batch = 8192
        c.train.update(num_epochs=30, log_every_steps=100, checkpoint_every_steps=1000)
        c.optim.update(learning_rate=7e-4, warmup_epochs=2.0)
        c.eval.update(beam_size=5, decode_batch_size=128)
    elif c.preset == "tiny":
        c.model.update(width=32, encoder_depth=2, decoder_depth=2, num_heads=2, mlp_dim=64,
                       dropout=0.0)
        c.tokenizer.vocab_size = 300
        c.data.update(num_train_examples=64, num_val_examples=16, num_test_examples=8)
        c.batch.update(bucket_lengths=(32, 64), tokens_per_batch=256)
        c.train.update(num_epochs=2, log_every_steps=2, checkpoint_every_steps=4)
        c.eval.update(beam_size=2, max_decode_len=24, decode_batch_size=4, num_examples_to_print=2)
    return c
