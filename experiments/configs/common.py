"""The config sections every experiment shares: the models to train (``mode``, ``models``,
``methods``), the training loop (``train``), the optimizer (``optim``) and the devices
(``mesh``, ``distributed``). Each experiment's config file adds its own ``model``, ``data``
and ``eval`` sections and its own values; the trainer (``experiments.common.trainer``)
validates the fields defined here.
"""

from __future__ import annotations

import ml_collections

from experiments.common import sharding


def base_config() -> ml_collections.ConfigDict:
    """``preset``, ``seed``, ``mode``, ``models``, ``methods`` and the device sections."""
    c = ml_collections.ConfigDict()
    c.preset = "quick"  # the preset these values came from (recorded in summary.json)
    # Initialisation, data order, augmentation, dropout masks and γ draws all derive from it.
    c.seed = 0
    # Several seeds, e.g. (0, 1, 2): each trains in workdir/seed_<s>/ and the summary gives
    # mean ± std over them (empty: `seed` alone, in the workdir itself).
    c.seeds = ()
    # Which model(s) to train: "compare" trains every entry of `models`, in order, from the
    # same initialisation on the same data order and keys, and prints them side by side; the
    # name of one entry of `methods` trains only that one.
    c.mode = "compare"
    c.models = ("standard", "bdia")  # the models of "compare" mode: names of `methods` entries

    # --- how each model trains: the keywords of bdia_jax.parse_method (the one parser).
    # update: "standard" (x_{k+1} = x_k + h_k) or "bdia" (x_{k+1} = γ x_{k-1} + (1-γ) x_k
    #   + (1+γ) h_k with γ = ±gamma); gamma: |γ|; frac_bits: l of the fixed-point grid
    #   δ = 2**-l (the paper: 9); quantize_at_inference: BDIA inference keeps the stream on
    #   the grid; backprop: "autodiff" (stored activations), "remat" (per-block
    #   recomputation) or "reversible" (BDIA on the grid with γ a power of two: the states
    #   are rebuilt bit for bit); recompute: how the reversible backward gets h_k(x_k),
    #   "fused" (reuses the block's VJP forward and gives the block its output's cotangent,
    #   so that a chunked MLP runs forward and VJP in one loop; the same bits as "shared"),
    #   "shared" (reuses the block's VJP forward; the models' blocks are built for both) or
    #   "separate" (one more block forward; exact for any block).
    c.methods = ml_collections.ConfigDict()
    c.methods.standard = dict(update="standard", backprop="autodiff")
    c.methods.bdia = dict(update="bdia", gamma=0.5, frac_bits=9, quantize_at_inference=True,
                          backprop="reversible", recompute="fused")

    # --- devices: the mesh (data parallelism, optional FSDP) and multi-host set-up; the
    # fields are documented in experiments/common/sharding.py:add_parallel_config.
    sharding.add_parallel_config(c)
    return c


def add_train(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The ``train`` fields every experiment has (the length of the run and the batch size
    are the experiment's own)."""
    c.train = ml_collections.ConfigDict()
    c.train.log_every_steps = 50  # write a metrics.jsonl "train" record every N steps
    c.train.checkpoint_every_steps = 500  # Orbax checkpoint every N steps and at every epoch end
    c.train.keep_checkpoints = 2  # keep the last N checkpoints per model
    c.train.async_checkpoints = False  # write checkpoints in the background
    # "stop": end the run at a NaN/Inf loss or gradient or a fixed-point range overflow,
    # naming the step (the bad update is never applied or saved); "skip": drop such
    # updates, count them, warn once at the end and continue.
    c.train.on_nonfinite = "stop"
    c.train.progress = "auto"  # progress bars: "auto" (when a terminal), "on", "off"
    # Testing aid: stop after this global step as if killed (0: never); rerunning resumes.
    c.train.stop_after_steps = 0
    return c


def add_optim(c: ml_collections.ConfigDict, **values) -> ml_collections.ConfigDict:
    """The ``optim`` section (Optax; see experiments.common.train_state.make_optimizer);
    ``values`` are the experiment's own settings of these fields."""
    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"  # "adamw" | "adam" | "sgd" | "lamb"
    c.optim.schedule = "warmup_cosine"  # "warmup_cosine" | "warmup_constant"
    c.optim.learning_rate = 1e-3  # peak learning rate
    # Linear warmup from 0, in epochs of the training loop (fractions allowed).
    c.optim.warmup_epochs = 0.2
    c.optim.end_learning_rate_factor = 0.01  # cosine decays to lr * this at the last step
    c.optim.weight_decay = 0.05  # decoupled weight decay on weight matrices (adamw/lamb/sgd)
    c.optim.b1 = 0.9  # Adam/LAMB first-moment decay
    c.optim.b2 = 0.999  # Adam/LAMB second-moment decay
    c.optim.eps = 1e-8  # Adam/LAMB epsilon
    c.optim.momentum = 0.9  # SGD momentum (Nesterov; only for name="sgd"); 0 for plain SGD
    c.optim.grad_clip_norm = 1.0  # clip gradients to this global norm (0: no clipping)
    unknown = set(values) - set(c.optim)
    if unknown:
        raise ValueError(f"add_optim: unknown optim fields {sorted(unknown)}")
    c.optim.update(values)
    return c


def preset_config(experiment: str, preset: str, presets: tuple[str, ...], base):
    """``base()`` with ``preset`` recorded ("" means "quick"); a ValueError naming the
    presets for an unknown one. The caller then applies the preset's values."""
    preset = preset or "quick"
    if preset not in presets:
        raise ValueError(
            f"unknown {experiment} preset {preset!r}; use one of {presets}, e.g. "
            f"--config=experiments/configs/{experiment}.py:quick"
        )
    c = base()
    c.preset = preset
    return c
