"""Configs of ``python -m experiments.finetune_gpt2`` (fine-tune a pretrained GPT-2 on E2E NLG,
standard vs BDIA side by side).

Select a preset with ``--config=experiments/configs/finetune_gpt2.py:<preset>`` and override any
field on the command line. Presets:

* ``quick`` (the default): offline. With ``model.checkpoint`` / ``data.dir`` empty, the run
  writes a tiny random GPT-2 (``save_gpt2``), a tiny BPE trained by ``tokenizers`` and tiny
  E2E-format CSVs into ``<workdir>/tiny_setup`` and fine-tunes that; seconds on a CPU. It
  exercises every path of the paper setting (loading, reversible training, BLEU of greedy
  and beam decodes), not its numbers.
* ``paper``: GPT-2 medium fully fine-tuned on E2E NLG, for accelerators; needs
  ``--config.model.checkpoint=/path/to/gpt2-medium --config.data.dir=/path/to/e2e``.

The ``paper`` values: the BDIA paper (arXiv 2407.09093, ICML version) fine-tunes GPT-2 medium
on E2E with BDIA (γ = ±0.5, l = 9 as in its other experiments); its optimiser settings were not
found in the text available here, so they follow the E2E recipe of the LoRA paper (Hu et al.
2021, Table 11: AdamW, weight decay 0.01, dropout 0.1, batch 8, 5 epochs, 500 warmup steps,
label smoothing 0.1, beam 10, length penalty 0.9) with a full-fine-tuning learning rate. Every
such value is marked "guess" below.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common

PRESETS = ("quick", "paper")


def _base() -> ml_collections.ConfigDict:
    c = common.base_config()  # preset, seed, mode, models, methods, mesh, distributed
    # The models keep their GPT-2 names in records and tables.
    c.methods.standard = dict(update="standard", backprop="autodiff")
    c.methods.bdia = dict(update="bdia", gamma=0.5, frac_bits=9, quantize_at_inference=True,
                          backprop="reversible", recompute="shared")

    # --- the pretrained model. Its architecture (vocab, width, depth, heads, context) comes
    # from the checkpoint's config.json; these are the fields a fine-tuning run chooses.
    c.model = ml_collections.ConfigDict()
    # A GPT-2 folder in the Hugging Face layout: config.json + model.safetensors, and the
    # tokenizer (tokenizer.json, or vocab.json + merges.txt), e.g. a download of
    # huggingface.co/openai-community/gpt2-medium. "": the tiny stand-in (data.tiny_standin).
    c.model.checkpoint = ""
    c.model.dropout = 0.1  # embedding and residual dropout while fine-tuning (GPT-2: 0.1)
    c.model.attention_dropout = 0.1  # dropout on attention probabilities (GPT-2: 0.1)
    c.model.compute_dtype = "float32"  # matmul dtype: "float32", or "bfloat16" on TPU/GPU
    c.model.attention = "xla"  # softmax attention: "xla" | "chunked" | "cudnn" (GPU)

    # --- data: E2E NLG (tuetschek/e2e-dataset) CSVs with "mr" and "ref" columns
    c.data = ml_collections.ConfigDict()
    # Folder with trainset.csv, devset.csv and testset_w_refs.csv. "": the tiny stand-in.
    c.data.dir = ""
    # With model.checkpoint or data.dir empty, write the tiny offline stand-in into
    # <workdir>/tiny_setup and use it for what is empty; False: an empty path is an error
    # that says what to download.
    c.data.tiny_standin = True
    # Tokens per example row ("mr → ref<|endoftext|>" less one for the shift); a longer
    # example is an error naming it. E2E pairs fit in 128 GPT-2 tokens (guess; LoRA: 512).
    c.data.max_len = 128

    # --- optimisation (experiments/configs/common.py:add_optim). Warmup is in epochs.
    common.add_optim(c, learning_rate=5e-5, warmup_epochs=0.1, end_learning_rate_factor=0.0,
                     weight_decay=0.01, grad_clip_norm=1.0)

    # --- training loop (the shared fields: experiments/configs/common.py)
    common.add_train(c)
    c.train.num_epochs = 5  # passes over the training pairs
    c.train.batch_size = 8  # pairs per step; must divide evenly over the devices
    c.train.eval_every_epochs = 1  # validation loss every N epochs
    c.train.label_smoothing = 0.1  # ε of the training cross-entropy (LoRA's E2E value)

    # --- evaluation: at E[γ] = 0 (the pretrained architecture), with the KV cache
    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 16  # rows per validation-loss batch (divisible by the device count)
    c.eval.bleu_split = "test"  # the split decoded for BLEU: "validation" | "test"
    c.eval.bleu_max_mrs = 0  # decode at most this many distinct mrs of it (0: all)
    c.eval.decode_batch_size = 16  # mrs decoded together (beam search: x beam_size rows)
    c.eval.max_new_tokens = 64  # longest decode (tokens), also capped by the context
    c.eval.beam_size = 10  # beams of the beam-search decode (LoRA's E2E value)
    # α of the GNMT length penalty ((5 + length) / 6) ** α that scores finished beams
    # (bdia_jax.models.decoding); LoRA's 0.9 is for Hugging Face's length ** α (guess).
    c.eval.length_penalty = 0.9
    return c


def get_config(preset: str = "quick") -> ml_collections.ConfigDict:
    """The config of ``preset`` ("quick" or "paper")."""
    c = common.preset_config("finetune_gpt2", preset, PRESETS, _base)
    if c.preset == "quick":
        # The tiny stand-in: a few steps of a 2-layer GPT-2 of width 32 on 4 mrs.
        c.model.update(dropout=0.0, attention_dropout=0.0)
        c.optim.update(learning_rate=3e-3, warmup_epochs=0.5)
        c.train.update(num_epochs=10, batch_size=4, log_every_steps=2,
                       checkpoint_every_steps=100)
        c.eval.update(batch_size=4, decode_batch_size=4, max_new_tokens=24, beam_size=3)
    elif c.preset == "paper":
        c.data.tiny_standin = False  # the real files, named on the command line
        # Full fine-tuning of GPT-2 medium: lr 5e-5 and a decay to 0 (guess: the HF
        # run_clm default; LoRA's 2e-4 is for its adapters); 500 warmup steps of LoRA are
        # ~0.1 epoch of E2E's 42k pairs at batch 8.
        c.train.log_every_steps = 100
        c.train.checkpoint_every_steps = 2000
    return c
