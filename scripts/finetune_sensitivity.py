"""The loss a fine-tuning method sees at its first step: a pretrained checkpoint's training-
mode loss under each method's noise (BDIA's random γ, dropout), before any update.

    python scripts/finetune_sensitivity.py [--preset smollm2_e2e] [--rows 64] [--keys 3]

Run it from the repository root. It reads the preset's checkpoint and training rows exactly
as ``python -m experiments.finetune_lm --config=experiments/configs/finetune_lm.py:<preset>``
does (same split, rows, context and loss: mean cross-entropy over the reference tokens) and
prints, per perturbation, the loss over the first ``--rows`` training rows in batches of
``train.batch_size``: at inference (train=False, the loss the validation split reports) and
in training mode under ``--keys`` PRNG keys (mean ± std over keys), with the stream's
largest |x| in training mode.

Perturbations: none; BDIA γ = ±0.1, ±0.25, ±0.5 in real arithmetic (``frac_bits=None``,
autodiff: the same forward as the reversible kernel off the grid); BDIA γ = ±0.5 on the
preset's grid (its ``methods.bdia``, as trained); dropout at the preset's three rates.
"""
import argparse
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # bdia_jax, experiments
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bdia_jax import pretrained
from experiments import finetune_lm
from experiments.configs import finetune_lm as presets
from experiments.data.text.losses import token_losses


def perturbations(config) -> dict[str, dict]:
    """name → the ``pretrained.load`` overrides of the model in training mode."""
    grid = dict(config.methods.bdia)
    runs = {"none": {}}
    for gamma in (0.1, 0.25, 0.5):
        runs[f"BDIA γ=±{gamma}, real arithmetic"] = dict(
            update="bdia", gamma=gamma, frac_bits=None, backprop="autodiff")
    runs[f"BDIA γ=±{grid['gamma']}, grid 2^-{grid['frac_bits']} (as trained)"] = dict(
        update="bdia", gamma=grid["gamma"], frac_bits=grid["frac_bits"],
        quantize_at_inference=grid["quantize_at_inference"], backprop="autodiff")
    for rate in sorted(presets.DROPOUT_RATES.values()):
        runs[f"dropout {rate}"] = dict(dropout=rate, attention_dropout=rate)
    return runs


def mean_loss(model, batches, key) -> tuple[float, float]:
    """(mean loss over the batches' reference tokens, largest stream |x|); train=key given."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def sums(state, batch, key):
        m = nnx.merge(graphdef, state)
        logits, aux = m(batch["inputs"], key=key, train=key is not None)
        s = token_losses(logits, batch["targets"], batch["mask"])
        return s["loss_sum"], s["num_tokens"], aux["max_abs"]

    total = count = 0.0
    max_abs = 0.0
    for i, batch in enumerate(batches):
        k = None if key is None else jax.random.fold_in(key, i)
        loss_sum, n, m = sums(state, batch, k)
        total, count, max_abs = total + float(loss_sum), count + float(n), max(max_abs, float(m))
    return total / count, max_abs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="smollm2_e2e", choices=presets.PRESETS[1:])
    parser.add_argument("--rows", type=int, default=64, help="training rows (from the first)")
    parser.add_argument("--keys", type=int, default=3, help="PRNG keys per perturbation")
    args = parser.parse_args()
    config = presets.get_config(args.preset)
    with tempfile.TemporaryDirectory() as workdir:
        data = finetune_lm.load_lm_data(config, workdir)
    size = config.train.batch_size
    rows = min(args.rows, len(data.train.inputs))
    if rows < size:
        sys.exit(f"--rows={args.rows}: need at least train.batch_size={size} rows.")
    batches = [{"inputs": jnp.asarray(data.train.inputs[i:i + size]),
                "targets": jnp.asarray(data.train.targets[i:i + size]),
                "mask": jnp.asarray(data.train.mask[i:i + size])}
               for i in range(0, rows - rows % size, size)]
    print(f"{data.checkpoint}: {len(batches) * size} training rows of {args.preset}, "
          f"{args.keys} keys\n")
    print("| perturbation | loss, inference | loss, training mode (mean ± std over keys) "
          "| max abs(x), training |")
    print("|---|---:|---:|---:|")
    for name, overrides in perturbations(config).items():
        model = pretrained.load(data.checkpoint, max_len=config.data.max_len, **overrides)
        inference, _ = mean_loss(model, batches, None)
        train = [mean_loss(model, batches, jax.random.key(k)) for k in range(args.keys)]
        losses = np.array([t[0] for t in train])
        print(f"| {name} | {inference:.3f} | {losses.mean():.3f} ± {losses.std(ddof=1):.3f} "
              f"| {max(t[1] for t in train):,.0f} |", flush=True)


if __name__ == "__main__":
    main()
