"""End to end: ``train_and_evaluate`` under ``tfds.testing.mock_data``, config validation
and the command line."""

import json
import os
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

import bdia_jax
from bdia_jax.models import ViTConfig
from experiments import vit_cifar
from experiments.common import sharding, trainer
from experiments.common.config import ConfigError
from experiments.configs.vit_cifar import get_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(**train):
    config = get_config("tiny")
    config.train.update(train)
    return config


@pytest.mark.slow
def test_train_and_evaluate_writes_everything(tmp_path, capsys):
    config = _tiny(progress="on")
    with tfds.testing.mock_data(num_examples=256):
        summary = vit_cifar.train_and_evaluate(config, str(tmp_path))

    for name in ("metrics.jsonl", "summary.json", "config.json", "curves.png",
                 "gamma_sweep.png"):
        assert (tmp_path / name).is_file(), name
    for name in ("curves.png", "gamma_sweep.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["config"]["preset"] == "tiny"
    assert {"jax", "flax", "bdia_jax"} <= set(on_disk["versions"])
    assert set(summary["models"]) == {"standard", "bdia"}

    steps = 2 * (256 // 32)
    for update, result in summary["models"].items():
        assert result["steps"] == steps
        assert 0.0 <= result["test_accuracy_final"] <= 1.0
        assert result["test_accuracy_best"] >= result["test_accuracy_final"]
        assert result["gamma_sweep"]["gammas"] == [-0.5, 0.0, 0.5]
        assert len(result["gamma_sweep"]["accuracy"]) == 3
        compiled = result["memory"]["compiled"]
        assert compiled["temp_bytes"] > 0 and compiled["peak_estimate_bytes"] > 0
        assert result["step_time_s"] > 0 and result["images_per_s"] > 0
        assert result["nonfinite_steps"] == 0
        # Checkpoints: the last two of every model are kept.
        kept = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints" / update))
        assert kept == [steps - 4, steps]
    bdia = summary["models"]["bdia"]
    assert bdia["reversal_exact"] is True and bdia["reversal_error_max"] == 0.0
    assert summary["models"]["standard"]["reversal_exact"] is None

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for name in ("ViT", "BDIA-ViT"):
        mine = [r for r in records if r["model"] == name]
        assert [r["step"] for r in mine if r["kind"] == "train"] == list(range(2, steps + 1, 2))
        assert [r["step"] for r in mine if r["kind"] == "eval"] == [steps // 2, steps]
        assert [r["inference_gamma"] for r in mine if r["kind"] == "sweep"] == [-0.5, 0.0, 0.5]
        assert all("loss" in r and "learning_rate" in r for r in mine if r["kind"] == "train")
    # The per-epoch lines and the side-by-side table were printed.
    out = capsys.readouterr().out
    assert "[BDIA-ViT] epoch 2/2" in out and "accuracy at inference γ=+0.50" in out

    # Rerunning the finished run reuses the results instead of training again.
    with tfds.testing.mock_data(num_examples=256):
        again = vit_cifar.train_and_evaluate(config, str(tmp_path))
    assert again["models"] == json.loads(json.dumps(summary["models"]))
    assert "already finished" in capsys.readouterr().out

    # A finished run whose eval settings changed is evaluated again from its final
    # checkpoint (no training): the summary and the records hold the new sweep only.
    config.mode = "bdia"
    config.eval.sweep_gammas = (0.25,)
    with tfds.testing.mock_data(num_examples=256):
        redone = vit_cifar.train_and_evaluate(config, str(tmp_path))
    out = capsys.readouterr().out
    assert "eval.sweep_gammas changed since; evaluating its final checkpoint again" in out
    assert "epoch 2/2" not in out  # nothing trained
    bdia = redone["models"]["bdia"]
    assert bdia["gamma_sweep"]["gammas"] == [0.25]
    assert bdia["test_accuracy_final"] == summary["models"]["bdia"]["test_accuracy_final"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["inference_gamma"] for r in records
            if r["model"] == "BDIA-ViT" and r["kind"] == "sweep"] == [0.25]
    assert len([r for r in records if r["model"] == "ViT" and r["kind"] == "sweep"]) == 3


@pytest.mark.slow
def test_compare_mode_trains_both_models_from_the_same_start(tmp_path):
    """Same initialisation, batches, augmentations and keys for both models. With one
    block and a fine grid (δ = 2**-20) the BDIA update x_1 = Q(x_0) + Q(h(Q(x_0))) is the
    standard x_0 + h(x_0) up to ~1e-6, so the two training curves coincide closely; a
    different init, batch order or augmentation would separate them at once."""
    config = _tiny(log_every_steps=1, num_epochs=1)
    config.model.update(depth=1, dropout=0.0, attention_dropout=0.0)
    config.methods.bdia.frac_bits = 20
    config.eval.sweep_gammas = ()
    with tfds.testing.mock_data(num_examples=256):
        vit_cifar.train_and_evaluate(config, str(tmp_path))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = {(r["model"], r["step"]): r["loss"] for r in records if r["kind"] == "train"}
    steps = 256 // 32
    # Coarse, not a rounding bound: two programs (float32 chains) and, after the first update,
    # Adam's normalised steps (an ulp of a near-zero gradient moves a weight by up to lr) keep
    # the curves only close; a different start or data order moves the loss by the batch spread.
    for step in range(1, steps + 1):
        assert abs(train["ViT", step] - train["BDIA-ViT", step]) < 1e-3, step
    # ...and the curve is not flat, so agreement is not trivial.
    assert max(train["ViT", s] for s in range(1, steps + 1)) - min(
        train["ViT", s] for s in range(1, steps + 1)) > 1e-2


def test_validation_reports_every_bad_field():
    config = get_config("tiny")
    config.model.depth = 0
    config.model.num_heads = 3  # does not divide width 32
    config.mode = "both"
    config.train.on_nonfinite = "ignore"
    config.methods.bdia.recompute = "twice"
    with pytest.raises(ConfigError) as info:
        vit_cifar.validate_config(config, sharding.make_mesh())
    text = str(info.value)
    for field in ("model.depth", "model", "mode", "train.on_nonfinite", "methods.bdia"):
        assert f"--config.{field}:" in text, field
    assert "num_heads (3)" in text and "recompute" in text
    assert "5 problems" in text


def test_presets():
    assert get_config().preset == "quick"
    paper = get_config("paper")
    assert (paper.model.depth, paper.model.width, paper.model.num_heads, paper.model.mlp_dim,
            paper.model.patch_size, paper.train.batch_size, paper.methods.bdia.gamma,
            paper.methods.bdia.frac_bits) == (6, 512, 8, 512, 4, 128, 0.5, 9)
    for preset in ("quick", "paper", "tiny"):
        vit_cifar.validate_config(get_config(preset), sharding.make_mesh())
    with pytest.raises(ValueError, match="unknown vit_cifar preset 'huge'"):
        get_config("huge")


def test_standard_sweep_model_is_the_unquantized_bdia_inference_twin():
    config = get_config("tiny")

    def vit_config_for(name):
        return ViTConfig(**config.model, **trainer.method_fields(config.methods[name]))

    standard = vit_config_for("standard")
    twin = vit_cifar.sweep_config_for(standard, "standard")
    assert twin.update == bdia_jax.BDIA(frac_bits=None, quantize_at_inference=False)
    assert twin.backprop == bdia_jax.Autodiff()
    assert twin.width == standard.width and twin.depth == standard.depth
    bdia = vit_config_for("bdia")
    assert vit_cifar.sweep_config_for(bdia, "bdia") is bdia


def _cli(args, cwd, env_extra=None):
    env = {**os.environ, "PYTHONPATH": REPO, **(env_extra or {})}
    env.pop("TFDS_DATA_DIR", None)
    return subprocess.run([sys.executable, "-m", "experiments.vit_cifar", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def test_cli_help_lists_the_experiment_flags(tmp_path):
    run = _cli(["--help"], cwd=tmp_path)
    assert "Traceback" not in run.stderr, run.stderr
    for flag in ("--config:", "--workdir:", "--data_dir:"):
        assert flag in run.stdout, run.stdout


def test_cli_rejects_bad_fields_with_one_line_each(tmp_path):
    run = _cli([f"--config={REPO}/experiments/configs/vit_cifar.py:tiny",
                "--config.model.depth=0", "--config.train.batch_size=-4",
                f"--workdir={tmp_path}/w"], cwd=tmp_path)
    assert run.returncode != 0
    assert "--config.model.depth: must be an int >= 1, got 0" in run.stderr
    assert "--config.train.batch_size:" in run.stderr
    assert "Traceback" not in run.stderr


def test_cli_default_is_the_quick_comparison_and_missing_data_stops_it(tmp_path):
    empty = tmp_path / "no_data"
    empty.mkdir()
    run = _cli([f"--data_dir={empty}", "--config.data.download=false"], cwd=tmp_path)
    assert run.returncode != 0
    assert "is not prepared in" in run.stderr and "TFDS_DATA_DIR" in run.stderr
    assert "No fake data" in run.stderr
    written = json.loads((tmp_path / "runs" / "vit_cifar_quick" / "config.json").read_text())
    assert written["preset"] == "quick" and written["mode"] == "compare"
    assert not (tmp_path / "runs" / "vit_cifar_quick" / "metrics.jsonl").exists()
