"""Configs of ``python -m experiments.vit_cifar`` (ViT vs BDIA-ViT on CIFAR-10).

Select a preset with ``--config=experiments/configs/vit_cifar.py:<preset>`` and override
any field on the command line, e.g. ``--config.train.num_epochs=3``. Presets:

* ``quick`` (the default): a small ViT trained briefly on real CIFAR-10; both models
  finish within minutes on a 2-core CPU and end well above chance.
* ``paper``: the paper's CIFAR-10 setting (ViT depth 6, width 512, 8 heads, MLP 512,
  patch 4, batch 128, γ = ±0.5, l = 9, long training), for accelerators.
* ``tiny``: a few steps on a few hundred images, for smoke tests and CI.
"""

from __future__ import annotations

import ml_collections

from experiments.common import sharding

PRESETS = ("quick", "paper", "tiny")
MODES = ("compare", "standard", "bdia")


def _base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.preset = "quick"  # the preset these values came from (recorded in summary.json)
    c.seed = 0  # initialisation, data order, augmentation and γ draws all derive from it
    # Which model(s) to train: "compare" trains the standard ViT and then the BDIA-ViT on
    # the same initialisation, data order and keys and prints them side by side;
    # "standard" or "bdia" trains only that one.
    c.mode = "compare"

    # --- the ViT (fields of bdia_jax.models.ViTConfig; `update` comes from `mode`)
    c.model = ml_collections.ConfigDict()
    c.model.image_size = 32  # input height = width in pixels (CIFAR: 32)
    c.model.patch_size = 4  # square patches; image_size must be a multiple of it
    c.model.num_classes = 10  # classifier outputs (CIFAR-10: 10)
    c.model.width = 128  # residual stream (embedding) dimension
    c.model.depth = 4  # number of transformer blocks K (>= 1)
    c.model.num_heads = 4  # attention heads; width must be divisible by it
    c.model.mlp_dim = 256  # hidden size of each block's MLP
    c.model.dropout = 0.0  # embedding and residual-branch dropout rate
    c.model.attention_dropout = 0.0  # dropout rate on attention probabilities
    c.model.pool = "cls"  # "cls" (class token) or "mean" (mean over patch tokens)
    c.model.bdia_backprop = "reversible"  # BDIA-ViT gradient: "reversible" | "autodiff" | "remat"
    # Reversible backward: "shared" reuses the VJP forward for the rebuild (the models' blocks
    # are built for it), "separate" runs one more block forward (exact for any block).
    c.model.bdia_recompute = "shared"
    c.model.standard_backprop = "autodiff"  # standard ViT gradient: "autodiff" | "remat"
    c.model.gamma = 0.5  # |γ| of the BDIA training update (γ = ±gamma), a power of two
    c.model.frac_bits = 9  # l: fixed-point grid δ = 2**-l for BDIA (the paper: 9)
    c.model.quantize_at_inference = True  # BDIA inference keeps the stream on the grid
    c.model.compute_dtype = "float32"  # matmul dtype: "float32", or "bfloat16" on TPU/GPU

    # --- data (TFDS)
    c.data = ml_collections.ConfigDict()
    c.data.name = "cifar10"  # TFDS dataset name (image + label features)
    # Folder of prepared TFDS datasets; "" means $TFDS_DATA_DIR, else ~/tensorflow_datasets.
    c.data.data_dir = ""
    c.data.download = True  # let TFDS download and prepare a missing dataset
    c.data.train_split = "train"  # TFDS split to train on
    c.data.test_split = "test"  # TFDS split to evaluate on
    c.data.num_train_examples = 0  # use the first N training examples (0: all)
    c.data.num_test_examples = 0  # evaluate on the first N test examples (0: all)
    c.data.crop_padding = 4  # random-crop augmentation: zero-pad by this many pixels
    c.data.flip = True  # random horizontal flips

    # --- optimisation (Optax)
    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"  # "adamw" | "adam" | "sgd" | "lamb"
    c.optim.schedule = "warmup_cosine"  # "warmup_cosine" | "warmup_constant"
    c.optim.learning_rate = 1e-3  # peak learning rate
    c.optim.warmup_epochs = 0.2  # linear warmup from 0, in epochs (fractions allowed)
    c.optim.end_learning_rate_factor = 0.01  # cosine decays to lr * this at the last step
    c.optim.weight_decay = 0.05  # decoupled weight decay on weight matrices (adamw/lamb/sgd)
    c.optim.b1 = 0.9  # Adam/LAMB first-moment decay
    c.optim.b2 = 0.999  # Adam/LAMB second-moment decay
    c.optim.eps = 1e-8  # Adam/LAMB epsilon
    c.optim.momentum = 0.9  # SGD momentum (Nesterov); 0 for plain SGD
    c.optim.grad_clip_norm = 1.0  # clip gradients to this global norm (0: no clipping)
    c.optim.label_smoothing = 0.0  # cross-entropy label smoothing

    # --- training loop
    c.train = ml_collections.ConfigDict()
    c.train.num_epochs = 1  # passes over the training examples
    c.train.batch_size = 128  # global batch; must divide evenly over all devices
    c.train.log_every_steps = 50  # write a metrics.jsonl "train" record every N steps
    c.train.eval_every_epochs = 1  # evaluate on the test split every N epochs (and at the end)
    c.train.checkpoint_every_steps = 500  # Orbax checkpoint every N steps (and every epoch end)
    c.train.keep_checkpoints = 2  # keep the last N checkpoints per model
    c.train.async_checkpoints = False  # write checkpoints in the background
    # "stop": end the run at a NaN/Inf loss or gradient, naming the step (the bad update is
    # never applied or saved); "skip": drop such updates, count them and continue.
    c.train.on_nonfinite = "stop"
    c.train.progress = "auto"  # progress bars: "auto" (when a terminal), "on", "off"
    # Testing aid: stop after this global step as if killed (0: never); rerunning resumes.
    c.train.stop_after_steps = 0

    # --- evaluation
    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 512  # evaluation batch (last one padded); must divide over the devices
    # Inference-γ sweep (the paper's robustness figure) on the final parameters; empty: skip.
    c.eval.sweep_gammas = (-0.5, -0.4, -0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    c.eval.sweep_num_examples = 0  # sweep on the first N test examples (0: all used ones)

    # --- devices: the mesh (data parallelism, optional FSDP) and multi-host set-up; the
    # fields are documented in experiments/common/sharding.py:add_parallel_config.
    sharding.add_parallel_config(c)
    return c


def get_config(preset: str = "quick") -> ml_collections.ConfigDict:
    """The config of ``preset`` ("quick", "paper" or "tiny")."""
    preset = preset or "quick"
    if preset not in PRESETS:
        raise ValueError(
            f"unknown vit_cifar preset {preset!r}; use one of {PRESETS}, e.g. "
            f"--config=experiments/configs/vit_cifar.py:quick"
        )
    c = _base()
    c.preset = preset
    if preset == "quick":
        # Sized for a 2-core CPU: a width-64 ViT, one epoch over all 50k training images,
        # for each model, plus a full test evaluation and a 5-point γ sweep on 2000 test
        # images. Measured on an idle 2-core CPU: 3 min 45 s wall for both models; test
        # accuracy ViT 41.6%, BDIA-ViT 39.0% (chance: 10%). See the README's results.
        c.model.update(width=64, depth=4, num_heads=2, mlp_dim=128, patch_size=4)
        c.train.num_epochs = 1
        c.train.batch_size = 128
        c.train.log_every_steps = 25
        c.eval.sweep_gammas = (-0.5, -0.25, 0.0, 0.25, 0.5)
        c.eval.sweep_num_examples = 2000
    elif preset == "paper":
        c.model.update(width=512, depth=6, num_heads=8, mlp_dim=512, patch_size=4,
                       dropout=0.1, attention_dropout=0.1, gamma=0.5, frac_bits=9)
        c.train.batch_size = 128
        c.train.num_epochs = 200  # long training, as in the paper's CIFAR-10 runs
        c.train.log_every_steps = 100
        c.train.checkpoint_every_steps = 2000
        c.optim.learning_rate = 5e-4
        c.optim.warmup_epochs = 5.0
        c.optim.weight_decay = 0.05
        c.eval.batch_size = 1024
        c.eval.sweep_num_examples = 0
    elif preset == "tiny":
        c.model.update(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8)
        c.data.num_train_examples = 256
        c.data.num_test_examples = 128
        c.train.num_epochs = 2
        c.train.batch_size = 32
        c.train.log_every_steps = 2
        c.train.checkpoint_every_steps = 4
        c.eval.batch_size = 64
        c.eval.sweep_gammas = (-0.5, 0.0, 0.5)
        c.eval.sweep_num_examples = 0
    return c
