"""Configs of ``python -m experiments.vit_cifar`` (ViT vs BDIA-ViT, and RevViT, on CIFAR-10).

Select a preset with ``--config=experiments/configs/vit_cifar.py:<preset>`` and override
any field on the command line, e.g. ``--config.train.num_epochs=3``. Presets:

* ``quick`` (the default): a small ViT trained briefly on real CIFAR-10; both models
  finish within minutes on a 2-core CPU and end well above chance.
* ``paper``: the paper's CIFAR-10 setting (ViT depth 6, width 512, 8 heads, MLP 512,
  patch 4, batch 128, γ = ±0.5, l = 9, long training), for accelerators.
* ``tiny``: a few steps on a few hundred images, for smoke tests and CI.
* ``overfit``: the data-limited regime where the paper's regularization claim lives: the
  first 2,500 training images, a depth-6 width-64 ViT, 100 epochs (the standard ViT
  overfits clearly), ViT / RevViT / BDIA-ViT (mode "table1") at seeds 0, 1, 2.
* ``gamma_ablation``: the paper's Table 2 at the ``overfit`` size, 50 epochs: the
  unquantized BDIA-ViT (frac_bits None, autodiff) at γ = 0, ±0.25, ±0.5, ±0.6, seeds 0, 1, 2.

Modes (``--config.mode``) of every preset: "compare" (``models``), "table1" (ViT, RevViT,
BDIA-ViT), "gamma_ablation" (the ``GAMMA_ABLATION`` entries), or one ``methods`` name.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import common

PRESETS = ("quick", "paper", "tiny", "overfit", "gamma_ablation")

# The paper's Table 2: ``methods`` entry → |γ| of the unquantized BDIA-ViT trained with
# autodiff (no grid, no inverse, so any γ in [0, 1) trains; γ = 0 is the standard update).
GAMMA_ABLATION = {"bdia_g000": 0.0, "bdia_g025": 0.25, "bdia_g050": 0.5, "bdia_g060": 0.6}


def _base() -> ml_collections.ConfigDict:
    c = common.base_config()  # preset, seed, mode, models, methods, mesh, distributed
    # RevViT (bdia_jax.models.RevViTConfig) with the config.model fields it shares with the
    # ViT; backprop "reversible" (rebuilt in floating point; recompute "shared": each
    # sub-block's output from its VJP, as the authors' code) or "autodiff" / "remat".
    c.methods.revvit = dict(architecture="revvit", backprop="reversible", recompute="shared")
    for name, gamma in GAMMA_ABLATION.items():
        c.methods[name] = dict(update="bdia", gamma=gamma, frac_bits=None, backprop="autodiff")

    # --- the ViT architecture (fields of bdia_jax.models.ViTConfig, under their names)
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

    # --- optimisation (the shared fields are described in experiments/configs/common.py)
    common.add_optim(c)
    c.optim.label_smoothing = 0.0  # cross-entropy label smoothing

    # --- training loop (the shared fields: experiments/configs/common.py)
    common.add_train(c)
    c.train.num_epochs = 1  # passes over the training examples
    c.train.batch_size = 128  # global batch; must divide evenly over all devices
    c.train.eval_every_epochs = 1  # evaluate on the test split every N epochs (and at the end)

    # --- evaluation
    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 512  # evaluation batch (last one padded); must divide over the devices
    # Inference-γ sweep (the paper's robustness figure) on the final parameters; empty: skip.
    c.eval.sweep_gammas = (-0.5, -0.4, -0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    c.eval.sweep_num_examples = 0  # sweep on the first N test examples (0: all used ones)
    return c


def get_config(preset: str = "quick") -> ml_collections.ConfigDict:
    """The config of ``preset`` ("quick", "paper", "tiny", "overfit", "gamma_ablation")."""
    c = common.preset_config("vit_cifar", preset, PRESETS, _base)
    if c.preset == "quick":
        # Sized for a 2-core CPU: a width-64 ViT, one epoch over all 50k training images,
        # for each model, plus a full test evaluation and a 5-point γ sweep on 2000 test
        # images (the README's results give the figures and the wall time).
        c.model.update(width=64, depth=4, num_heads=2, mlp_dim=128, patch_size=4)
        c.train.update(num_epochs=1, batch_size=128, log_every_steps=25)
        c.eval.update(sweep_gammas=(-0.5, -0.25, 0.0, 0.25, 0.5), sweep_num_examples=2000)
    elif c.preset == "paper":
        c.model.update(width=512, depth=6, num_heads=8, mlp_dim=512, patch_size=4,
                       dropout=0.1, attention_dropout=0.1)
        c.methods.bdia.update(gamma=0.5, frac_bits=9)
        # num_epochs: long training, as in the paper's CIFAR-10 runs
        c.train.update(batch_size=128, num_epochs=200, log_every_steps=100,
                       checkpoint_every_steps=2000)
        c.optim.update(learning_rate=5e-4, warmup_epochs=5.0, weight_decay=0.05)
        c.eval.update(batch_size=1024, sweep_num_examples=0)
    elif c.preset == "tiny":
        c.model.update(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8)
        c.data.update(num_train_examples=256, num_test_examples=128)
        c.train.update(num_epochs=2, batch_size=32, log_every_steps=2, checkpoint_every_steps=4)
        c.eval.update(batch_size=64, sweep_gammas=(-0.5, 0.0, 0.5), sweep_num_examples=0)
    elif c.preset in ("overfit", "gamma_ablation"):
        # The quick model at depth 6 on 5% of the training set. overfit: 100 epochs (1,900
        # steps), about three times the step of the standard ViT's lowest test loss, which
        # then rises clearly while its training accuracy keeps climbing; gamma_ablation:
        # 50 epochs. docs/results.md gives their wall times on the 2-core CPU.
        c.model.update(width=64, depth=6, num_heads=2, mlp_dim=128, patch_size=4)
        c.data.update(num_train_examples=2500, num_test_examples=2000)
        c.mode = "table1" if c.preset == "overfit" else "gamma_ablation"
        c.seeds = (0, 1, 2)
        # eval_every_epochs: the test loss curve every 5 epochs
        c.train.update(num_epochs=100 if c.preset == "overfit" else 50, batch_size=128,
                       eval_every_epochs=5, log_every_steps=20, checkpoint_every_steps=400)
        c.eval.update(sweep_gammas=(-0.5, -0.25, 0.0, 0.25, 0.5), sweep_num_examples=2000)
    return c
