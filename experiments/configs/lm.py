"""Configs of ``python -m experiments.lm`` (GPT vs BDIA-GPT, character-level LM).

Select a preset with ``--config=experiments/configs/lm.py:<preset>`` and override any field
on the command line, e.g. ``--config.train.num_steps=2000``. Presets:

* ``quick`` (the default): a small character GPT on TFDS ``tiny_shakespeare``; both models
  train, evaluate and sample in about 10 minutes on a 2-core CPU.
* ``full``: nanoGPT's ``shakespeare_char`` setting (6 layers, 6 heads, width 384, context
  256, dropout 0.2, 5000 steps of 64 windows), for accelerators.
* ``tiny``: a few steps of a tiny model, for smoke tests and CI.
* ``overfit``: the quick model on 5% of the training text, 1,000 steps, 3 seeds: the
  standard GPT's validation loss turns up; best and final validation loss and the gap.

Data: a TFDS text dataset (``data.tfds_name``, feature ``data.text_feature``; needs
``TFDS_DATA_DIR`` or ``data.tfds_data_dir`` to point at a prepared copy, or network access
with ``data.tfds_download``), or a plain UTF-8 file (``data.text_file``, split by
``data.val_fraction``).

Steps and "epochs": windows are sampled at random, so there are no passes over the text. The
run is ``train.num_steps`` steps; an "epoch" of the training loop is ``train.eval_every_steps``
steps (evaluation, the per-epoch log line and an end-of-epoch checkpoint follow each).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common

PRESETS = ("quick", "full", "tiny", "overfit")


def _base() -> ml_collections.ConfigDict:
    c = common.base_config()  # preset, seed, mode, models, methods, mesh, distributed

    # --- the decoder-only transformer (fields of bdia_jax.models.GPTConfig, under their
    # names; vocab_size comes from the data)
    c.model = ml_collections.ConfigDict()
    c.model.max_len = 256  # tokens (characters) of context (nanoGPT block_size)
    c.model.width = 384  # residual stream (embedding) dimension (nanoGPT n_embd)
    c.model.depth = 6  # transformer blocks K (nanoGPT n_layer)
    c.model.num_heads = 6  # attention heads; width must be divisible by it
    c.model.mlp_dim = 1536  # hidden size of each block's MLP (4 x width)
    c.model.dropout = 0.2  # embedding and residual-branch dropout rate
    c.model.attention_dropout = 0.2  # dropout rate on attention probabilities
    c.model.compute_dtype = "float32"  # matmul dtype: "float32", or "bfloat16" on TPU/GPU

    # --- data
    c.data = ml_collections.ConfigDict()
    c.data.tfds_name = "tiny_shakespeare"  # TFDS text dataset (ignored if text_file is set)
    c.data.text_feature = "text"  # the TFDS feature holding the text
    c.data.train_split = "train"  # TFDS split to train on
    c.data.val_split = "validation"  # TFDS split for the validation loss
    c.data.tfds_data_dir = ""  # TFDS data dir ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets)
    c.data.tfds_download = False  # let TFDS download and prepare the dataset (network)
    # A plain UTF-8 text file instead of TFDS ("" = use TFDS); its last val_fraction of
    # characters is the validation split.
    c.data.text_file = ""
    c.data.val_fraction = 0.1  # validation share of data.text_file
    # Vocabulary: the characters of the training split ("train") or of all splits ("all").
    c.data.vocab_source = "train"
    # Train on the first fraction of the training characters (1.0: all); the validation
    # split stays whole. Less data than the model can hold is how the LM overfits.
    c.data.train_fraction = 1.0

    # --- optimisation: nanoGPT's shakespeare_char values. Warmup is in loop "epochs" of
    # train.eval_every_steps steps: 100 steps / 250 = 0.4 as in nanoGPT; the cosine ends at
    # lr * 0.1 (nanoGPT: 1e-4); Adam b2 0.99 as in shakespeare_char.
    common.add_optim(c, warmup_epochs=0.4, end_learning_rate_factor=0.1, weight_decay=0.1,
                     b2=0.99)

    # --- training loop (the shared fields: experiments/configs/common.py)
    common.add_train(c)
    c.train.num_steps = 5000  # optimizer steps (a multiple of eval_every_steps)
    c.train.batch_size = 64  # windows per step; must divide evenly over the devices
    c.train.eval_every_steps = 250  # evaluate (and end a loop "epoch") every N steps
    # Training loss: 0 computes the full [batch, max_len, vocab] logits; N > 0 (a divisor of
    # model.max_len) runs the head and loss N positions at a time under jax.checkpoint
    # (bdia_jax.chunked_loss), so only one chunk's logits are ever held. Same loss up to
    # float rounding; saves memory when the vocabulary is large.
    c.train.loss_chunk = 0

    # --- evaluation (at E[γ] = 0: the inference update of both models)
    c.eval = ml_collections.ConfigDict()
    # Loss estimates on fixed windows: up to this many evenly spaced, non-overlapping
    # windows of each split (0: every window); the train estimate makes the train curve
    # comparable with the validation one (same windows, no dropout).
    c.eval.num_windows = 200
    c.eval.batch_size = 64  # windows per evaluation batch (divisible by the device count)
    c.eval.num_samples = 2  # samples generated per model at the end
    c.eval.sample_length = 500  # characters per sample
    c.eval.sample_prompt = "\n"  # prompt the samples start from (characters of the vocab)
    c.eval.temperature = 0.8  # sampling temperature
    c.eval.top_k = 200  # sample among the top-k characters (0: all)
    return c


def get_config(preset: str = "quick") -> ml_collections.ConfigDict:
    """The config of ``preset`` ("quick", "full", "tiny" or "overfit")."""
    c = common.preset_config("lm", preset, PRESETS, _base)
    if c.preset == "quick":
        # Sized for a 2-core CPU: both models train, evaluate and sample in ~10 minutes.
        c.model.update(max_len=64, width=128, depth=4, num_heads=4, mlp_dim=512, dropout=0.0,
                       attention_dropout=0.0)
        c.train.update(num_steps=600, batch_size=32, eval_every_steps=100)
        # warmup_epochs: 50 steps
        c.optim.update(warmup_epochs=0.5, learning_rate=2e-3)
        c.eval.update(num_windows=64, sample_length=300)
    elif c.preset == "overfit":
        # The paper's GPT claim (BDIA: higher training loss, lower validation loss) in a
        # regime that overfits: the quick model on the first 5% of tiny_shakespeare's
        # training text (~50k characters), 1,000 steps of 32 x 64 characters (~40 passes),
        # well past the standard GPT's best-validation step; seeds 0, 1, 2.
        c.model.update(max_len=64, width=128, depth=4, num_heads=4, mlp_dim=512, dropout=0.0,
                       attention_dropout=0.0)
        c.data.train_fraction = 0.05
        c.data.vocab_source = "all"  # 5% of the text lacks some characters (e.g. "Q")
        c.seeds = (0, 1, 2)
        # eval_every_steps: the validation-loss (and gap) curve, 20 points
        c.train.update(num_steps=1000, batch_size=32, eval_every_steps=50)
        c.optim.update(warmup_epochs=0.5, learning_rate=2e-3)
        c.eval.update(num_windows=128, sample_length=300)
    elif c.preset == "full":
        c.train.log_every_steps = 100
    elif c.preset == "tiny":
        c.model.update(max_len=16, width=32, depth=2, num_heads=2, mlp_dim=64, dropout=0.0,
                       attention_dropout=0.0)
        c.train.update(num_steps=8, batch_size=4, eval_every_steps=4, log_every_steps=2,
                       checkpoint_every_steps=4)
        c.eval.update(num_windows=8, batch_size=4, num_samples=1, sample_length=20)
    return c
