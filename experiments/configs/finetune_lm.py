"""Configs of ``python -m experiments.finetune_lm`` (fine-tune a pretrained decoder LM,
GPT-2 or Llama family, from a Hugging Face folder or a GGUF file, on E2E NLG or plain text;
five methods side by side from the same checkpoint, data order and seeds).

Select a preset with ``--config=experiments/configs/finetune_lm.py:<preset>`` and override any
field on the command line. Presets:

* ``quick`` (the default): offline. With ``model.checkpoint`` / ``data.dir`` empty, the run
  writes a tiny random Llama-family checkpoint (``pretrained.save``) with a tiny BPE and tiny
  E2E-format CSVs into ``<workdir>/tiny_setup`` and fine-tunes it with all five methods;
  seconds to minutes on a CPU. It exercises every path, not the numbers
  (``--config.data.format=text``: the same on a tiny text).
* ``smollm2_e2e``: SmolLM2-135M-Instruct from ``../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf``
  on ``../shared/data/e2e``: devset.csv split by mr into training and validation parts
  (``data.split="devset_by_mr"``: the official trainset.csv is not available offline),
  BLEU on testset_w_refs.csv with all references per mr. The regime (rows, context, batch,
  steps) is sized for a CPU from a measured step time (docs/results.md). It also trains
  the dropout sweep's other two rates.
* ``smollm2_shakespeare``: the same model on a small slice of tiny_shakespeare (TFDS, in
  ``../shared/tensorflow_datasets``; ``data.format="text"``), where standard fine-tuning
  overfits fast: the validation and test loss per token, samples, no BLEU.

The methods (``config.methods``; ``models`` lists the ones a "compare" run trains):
``standard`` (full fine-tuning, no dropout), ``dropout`` / ``dropout_05`` / ``dropout_20``
(full fine-tuning with dropout 0.1 / 0.05 / 0.2: the sweep whose best validation loss picks
the table's rate), ``bdia`` (full fine-tuning, BDIA γ = ±0.5 on the 2**-l grid, reversible
with recompute="shared"; ``bdia_25`` / ``bdia_125``: γ = ±0.25 / ±0.125, extra rows),
``lora`` (adapters only, standard update) and ``lora_bdia`` (adapters only, BDIA).
A method entry may set the model fields dropout, attention_dropout
and lora_*, and the optim field learning_rate, besides the method keywords.

Changing any field of a preset after a run started in a workdir stops its resume there
(the run checks the config it was started with): start a new workdir instead. Method entries
may be added (and ``models``, ``seeds`` changed): a finished model's own entry is checked
against its result's fingerprint.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common

PRESETS = ("quick", "smollm2_e2e", "smollm2_shakespeare")
SHARED = "../shared"  # the read-only data and model folder beside the project (not copied)
BDIA = dict(update="bdia", gamma=0.5, frac_bits=9, quantize_at_inference=True,
            backprop="reversible", recompute="shared")
LORA = dict(lora_rank=8, lora_alpha=16.0, lora_dropout=0.0,
            lora_targets=("q", "k", "v", "o", "gate", "up", "down"))


# AdamW peak learning rates: optim.learning_rate for full fine-tuning, a LoRA method
# entry's own ``learning_rate`` for the adapters. Full fine-tuning of a ~100M-parameter LM: 1e-4, the upper end of the 5e-5..1e-4 used to fully
# fine-tune GPT-2 on E2E (Li & Liang 2021), as the runs here are short (tens of steps).
# LoRA: 10x that, 1e-3: the LoRA paper's GPT-2 E2E rate is 2e-4 at an update scale alpha /
# rank = 32 / 4 = 8; LORA's alpha / rank = 16 / 8 = 2 scales the adapters' update 4x less,
# so ~8e-4 gives the same step. BDIA keeps its counterpart's rate: only the update differs.
FULL_LR = 1e-4
LORA_LR = 1e-3
# Dropout rates of the sweep (embedding, residual and attention dropout alike, as GPT-2's
# 0.1): entry "dropout" is the conventional 0.1, "dropout_05" and "dropout_20" its
# neighbours. The rate of the "standard+dropout" row is the one with the lowest best
# validation loss at seed 0 (docs/results.md); only that entry trains the other seeds.
DROPOUT_RATES = {"dropout_05": 0.05, "dropout": 0.1, "dropout_20": 0.2}
# BDIA at smaller |γ| (powers of two, so still exactly reversible): the sweep the dropout
# rate gets, for BDIA. Extra rows beside the table's BDIA row, which is the paper's ±0.5.
BDIA_GAMMAS = {"bdia_25": 0.25, "bdia_125": 0.125}


def _dropout(rate: float) -> dict:
    return dict(update="standard", backprop="autodiff", dropout=rate, attention_dropout=rate)


def _base() -> ml_collections.ConfigDict:
    c = common.base_config()  # preset, seed, mode, models, methods, mesh, distributed
    c.methods = ml_collections.ConfigDict()
    c.methods.standard = dict(update="standard", backprop="autodiff")
    # Dropout as the usual regularizer, at three rates (DROPOUT_RATES: the one with the
    # lowest validation loss is the table's).
    c.methods.dropout = _dropout(DROPOUT_RATES["dropout"])
    c.methods.bdia = dict(BDIA)
    c.methods.lora = dict(update="standard", backprop="autodiff", learning_rate=LORA_LR,
                          **LORA)
    c.methods.lora_bdia = dict(BDIA, learning_rate=LORA_LR, **LORA)
    c.methods.dropout_05 = _dropout(DROPOUT_RATES["dropout_05"])
    c.methods.dropout_20 = _dropout(DROPOUT_RATES["dropout_20"])
    for name, gamma in BDIA_GAMMAS.items():
        c.methods[name] = dict(BDIA, gamma=gamma)
    c.models = ("standard", "dropout", "bdia", "lora", "lora_bdia")

    # --- the pretrained model; its architecture comes from the checkpoint.
    c.model = ml_collections.ConfigDict()
    # A Hugging Face folder (config.json + safetensors, tokenizer files; gpt2, llama, qwen2,
    # qwen3, mistral) or a .gguf file of architecture llama. "": the tiny stand-in.
    c.model.checkpoint = ""
    c.model.dropout = 0.0  # embedding and residual dropout (a method entry may override)
    c.model.attention_dropout = 0.0  # dropout on attention probabilities (idem)
    c.model.compute_dtype = "float32"  # matmul dtype: "float32", or "bfloat16" on TPU/GPU
    c.model.attention = "xla"  # softmax attention: "xla" | "chunked" | "cudnn" (GPU)
    # LoRA (bdia_jax.models.LoRA) for the methods that set lora_rank > 0: rank (0: none),
    # alpha (update scale alpha / rank), dropout on the adapters' input, and the projections.
    c.model.lora_rank = 0
    c.model.lora_alpha = 16.0
    c.model.lora_dropout = 0.0
    c.model.lora_targets = ("q", "k", "v", "o", "gate", "up", "down")

    # --- data: E2E NLG CSVs with "mr" and "ref" columns, or plain text
    c.data = ml_collections.ConfigDict()
    # "e2e": mr → ref rows, the loss on the reference; "text": rows of max_len + 1 tokens cut
    # from a plain text (data.text) one after the other, the loss on every token.
    c.data.format = "e2e"
    # format "e2e": the folder of the CSVs; format "text" with a TFDS data.text: the TFDS
    # data dir ("": $TFDS_DATA_DIR). "": the tiny stand-in (e2e).
    c.data.dir = ""
    # format "text": "tfds:<name>" (the "text" feature of its train / validation / test
    # splits, e.g. tiny_shakespeare) or a UTF-8 file (its first 80 % of the characters train,
    # the next and the last 10 % validation and test). "": the tiny stand-in's text.
    c.data.text = ""
    # With model.checkpoint or data.dir empty, write the tiny offline stand-in into
    # <workdir>/tiny_setup and use it for what is empty; False: an empty path is an error.
    c.data.tiny_standin = True
    # "devset_by_mr": training and validation rows from devset.csv, split by mr (no mr on
    # both sides), test = testset_w_refs.csv; "official": trainset.csv / devset.csv / test.
    c.data.split = "devset_by_mr"
    c.data.validation_fraction = 0.2  # devset_by_mr: the share of mrs held out
    c.data.split_seed = 0  # devset_by_mr: the permutation of the mrs (fixed across seeds)
    # At most this many rows per split (0: all): e2e, drawn by split_seed and kept in file
    # order; text, the first ones.
    c.data.max_train_rows = 0
    c.data.max_validation_rows = 0
    c.data.max_test_rows = 0  # (the test loss)
    # Tokens per example row (e2e: "mr → ref<eos>" less one for the shift, a longer example
    # is an error naming it; text: each row, cut from max_len + 1 tokens).
    c.data.max_len = 128

    # --- optimisation: AdamW, linear warmup then decay to 0 (common.add_optim)
    # AdamW (common.add_optim's b1 0.9, b2 0.999, eps 1e-8), weight decay 0.01 on the
    # matrices and clipping at 1 as in the LoRA paper's E2E recipe; FULL_LR (LoRA: LORA_LR).
    common.add_optim(c, learning_rate=FULL_LR, warmup_epochs=0.1, end_learning_rate_factor=0.0,
                     weight_decay=0.01, grad_clip_norm=1.0)

    common.add_train(c)
    c.train.num_epochs = 3  # passes over the training rows
    c.train.batch_size = 8  # rows per step
    c.train.eval_every_epochs = 1  # validation loss every N epochs
    c.train.label_smoothing = 0.0  # ε of the training cross-entropy

    # --- evaluation at E[γ] = 0 (the pretrained architecture), KV-cached decoding
    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 16  # rows per validation-loss batch
    c.eval.bleu_split = "test"  # the split decoded for BLEU: "validation" | "test"
    c.eval.bleu_max_mrs = 0  # decode at most this many distinct mrs (0: all)
    c.eval.decode_batch_size = 16  # mrs decoded together (beam search: x beam_size rows)
    c.eval.max_new_tokens = 64  # longest decode (tokens)
    c.eval.beam_size = 4  # beams of the beam-search decode
    c.eval.length_penalty = 0.9  # α of the GNMT length penalty of finished beams
    c.eval.num_samples = 3  # decodes of the first mrs printed and kept per method
    # format "text": a sample continues the first prompt_tokens tokens of a test row.
    c.eval.prompt_tokens = 32
    # Write each fine-tuned model as a Hugging Face folder <workdir>/<model>/hf (LoRA
    # merged) with the checkpoint's tokenizer files beside it.
    c.eval.export_hf = True
    c.eval.export_dtype = "float32"  # the folder's weights: "float32" | "bfloat16" | "float16"
    return c


def _smollm2(c: ml_collections.ConfigDict) -> None:
    """What the SmolLM2-135M presets share: the GGUF, no stand-in, batch 8, BDIA on a
    coarser grid."""
    c.model.checkpoint = f"{SHARED}/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    c.data.tiny_standin = False
    # A train record every step (a step takes many seconds on a CPU: the progress shows in
    # metrics.jsonl). A full fine-tuning checkpoint is ~1.6 GB (weights + AdamW moments):
    # keep one.
    c.train.update(batch_size=8, log_every_steps=1, checkpoint_every_steps=16,
                   keep_checkpoints=1)
    # SmolLM2's residual stream exceeds the exact range 2**24 · 2**-9 of frac_bits 9
    # (docs/results.md: every step overflowed and was held); frac_bits 7: 4x the range.
    for name in ("bdia", "lora_bdia", *BDIA_GAMMAS):
        c.methods[name].frac_bits = 7


def get_config(preset: str = "quick") -> ml_collections.ConfigDict:
    """The config of ``preset`` ("quick" or "smollm2_e2e")."""
    c = common.preset_config("finetune_lm", preset, PRESETS, _base)
    if c.preset == "quick":
        # The tiny stand-in: a few steps of a 2-block Llama of width 32 on 4 mrs.
        c.optim.update(learning_rate=3e-3, warmup_epochs=0.5)
        for name in ("lora", "lora_bdia"):  # 10x, as LORA_LR / FULL_LR
            c.methods[name].learning_rate = 3e-2
        c.train.update(num_epochs=2, batch_size=2, log_every_steps=2,
                       checkpoint_every_steps=100)
        c.eval.update(batch_size=2, decode_batch_size=2, max_new_tokens=12, beam_size=2,
                      bleu_max_mrs=2)
    elif c.preset == "smollm2_e2e":
        _smollm2(c)
        c.data.dir = f"{SHARED}/data/e2e"
        # Seed 0 of the five methods, then the other two rates of the dropout sweep and
        # BDIA at the smaller |γ|.
        c.models = ("standard", "dropout", "bdia", "lora", "lora_bdia", "dropout_05",
                    "dropout_20", *BDIA_GAMMAS)
        # A CPU regime sized from the timed step (docs/results.md): rows padded to 144
        # tokens (the longest E2E pair, dev and test, fits), batch 8, 64 training rows
        # (limited data) seen 4 times = 32 steps, a validation point per epoch; the
        # evaluations (validation, test loss, two decodes per mr) cost as much again.
        c.data.max_len = 144
        c.data.max_train_rows = 64
        c.data.max_validation_rows = 64
        c.data.max_test_rows = 256
        c.train.num_epochs = 4
        c.eval.update(batch_size=16, decode_batch_size=16, bleu_max_mrs=50,
                      max_new_tokens=48, beam_size=4)
    elif c.preset == "smollm2_shakespeare":
        _smollm2(c)
        c.data.format = "text"
        c.data.text = "tfds:tiny_shakespeare"
        # Seed 0 of the five methods, then the dropout sweep's other two rates and BDIA at
        # the smaller |γ|, as E2E.
        c.models = ("standard", "dropout", "bdia", "lora", "lora_bdia", "dropout_05",
                    "dropout_20", *BDIA_GAMMAS)
        c.data.dir = f"{SHARED}/tensorflow_datasets"
        # A small slice: the first 32 rows of 129 tokens of the train split (~4k tokens),
        # seen 8 times, so that standard fine-tuning overfits within the run; a validation
        # point per epoch on the first 32 validation rows.
        c.data.max_len = 128
        c.data.max_train_rows = 32
        c.data.max_validation_rows = 32
        c.data.max_test_rows = 64
        c.train.num_epochs = 8
        c.eval.update(batch_size=16, decode_batch_size=4, num_samples=3, prompt_tokens=32,
                      max_new_tokens=48)
    return c
