"""The paper's tables through the one trainer: Table 1 (ViT / RevViT / BDIA-ViT, several
seeds, mean ± std), Table 2 (the unquantized γ ablation up to ±0.6), the seeds aggregation
and the presets' validity. Real training on ``tfds.testing.mock_data``, seconds each."""

import json
import sys

import pytest
import tensorflow_datasets as tfds

from experiments import vit_cifar
from experiments.common import sharding, trainer
from experiments.common.config import ConfigError
from experiments.configs import lm as lm_configs
from experiments.configs.vit_cifar import GAMMA_ABLATION, PRESETS, get_config


def _tiny(**fields):
    config = get_config("tiny")
    # One short epoch and no γ sweep beyond two points: the test is about the table.
    config.data.update(num_train_examples=64, num_test_examples=64)
    config.train.update(num_epochs=1, progress="off", log_every_steps=1)
    config.eval.sweep_gammas = (0.0, 0.5)
    config.update(fields)
    return config


# --------------------------------------------------------------------------- aggregation


def test_mean_std_over_seeds_of_numbers_lists_and_dicts():
    per_seed = {0: {"acc": 0.5, "name": "ViT", "mem": {"peak": 10, "note": "x"},
                    "curve": [1.0, 2.0], "flag": True, "none": None},
                3: {"acc": 0.7, "name": "ViT", "mem": {"peak": 10, "note": "x"},
                    "curve": [3.0, 6.0], "flag": True, "none": None}}
    entry = trainer.aggregate(per_seed)
    assert entry["seeds"] == [0, 3]
    assert entry["per_seed"] == {"0": per_seed[0], "3": per_seed[3]}
    # Host float64 (IEEE on every machine): approx only absorbs the last ulp of 0.6, 1/sqrt(2).
    assert entry["mean"] == {"acc": pytest.approx(0.6), "mem": {"peak": 10.0},
                             "curve": [2.0, 4.0]}
    # Sample standard deviation (ddof=1): |a - b| / sqrt(2) for two values.
    assert entry["std"]["acc"] == pytest.approx(0.2 / 2**0.5)
    assert entry["std"]["mem"] == {"peak": 0.0}
    assert entry["std"]["curve"] == pytest.approx([2 / 2**0.5, 4 / 2**0.5])
    # Strings, booleans and None are not averaged.
    assert not {"name", "flag", "none"} & set(entry["mean"])
    one = trainer.aggregate({7: {"acc": 0.25}})
    assert one["mean"] == {"acc": 0.25} and one["std"] == {"acc": None}


def test_table_cells_are_mean_plus_minus_std_and_na_when_missing():
    assert trainer._cell([0.5, 0.7], "{:.2%}") == "60.00% ± 14.14%"
    assert trainer._cell([0.5], "{:.2%}") == "50.00%"
    assert trainer._cell([0.5, None], "{:.2%}") == "n/a"


# --------------------------------------------------------------------------- Table 1


@pytest.mark.slow
def test_table1_three_models_two_seeds_mean_std_and_revvit_reconstruction_error(
        tmp_path, capsys):
    config = _tiny(mode="table1", seeds=(0, 1))
    with tfds.testing.mock_data(num_examples=64):
        summary = vit_cifar.train_and_evaluate(config, str(tmp_path))
    out = capsys.readouterr().out

    assert list(summary["models"]) == ["standard", "revvit", "bdia"]
    assert summary["seeds"] == [0, 1]
    for name, entry in summary["models"].items():
        assert entry["seeds"] == [0, 1] and set(entry["per_seed"]) == {"0", "1"}
        for key in ("test_accuracy_final", "test_loss_final", "step_time_s"):
            assert key in entry["mean"] and entry["std"][key] is not None, (name, key)
        assert entry["mean"]["memory"]["compiled"]["peak_estimate_bytes"] > 0
        # Each seed is its own complete run: per-seed checkpoints and summary.
        for seed in (0, 1):
            seed_dir = tmp_path / f"seed_{seed}"
            assert (seed_dir / "checkpoints" / name).is_dir()
            seed_summary = json.loads((seed_dir / "summary.json").read_text())
            assert seed_summary["config"]["seed"] == seed
            assert seed_summary["models"][name] == entry["per_seed"][str(seed)]
    # Different seeds are different runs (initialisation and data order).
    standard = summary["models"]["standard"]["per_seed"]
    assert standard["0"]["test_loss_final"] != standard["1"]["test_loss_final"]

    revvit = summary["models"]["revvit"]["per_seed"]["0"]
    assert revvit["name"] == "RevViT" and revvit["backprop"] == "reversible"
    assert revvit["reversal"] == "floating-point" and revvit["reversal_exact"] is None
    assert revvit["reversal_error_max"] > 0.0  # float rounding: measured, not zero
    assert revvit["gamma_sweep"]["gammas"] == []  # no inference γ
    bdia = summary["models"]["bdia"]["per_seed"]["1"]
    assert bdia["reversal"] == "exact" and bdia["reversal_exact"] is True
    assert bdia["reversal_error_max"] == 0.0
    # The BDIA exactness warning is never raised for RevViT's floating-point reversal.
    assert "WARNING" not in out

    lines = out.splitlines()
    start = max(i for i, line in enumerate(lines) if line.split() == ["ViT", "RevViT", "BDIA-ViT"])
    print("\n".join(lines[start:]), file=sys.stderr)
    rows = {line[:34].strip(): line[34:] for line in lines[start:]}
    assert rows["test accuracy (final, E[γ]=0)"].count("±") == 3
    assert rows["train-step memory (compiled)"].count("±") == 3
    assert rows["step time"].count("±") == 3
    revvit_error = rows["reversal error (max)"].split()
    assert revvit_error[0] == "n/a" and "±" in revvit_error  # ViT: n/a; RevViT: measured
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"

    # Rerunning resumes every seed from its own workdir: nothing trains again.
    with tfds.testing.mock_data(num_examples=64):
        again = vit_cifar.train_and_evaluate(config, str(tmp_path))
    assert capsys.readouterr().out.count("already finished") == 6
    assert again["models"] == json.loads(json.dumps(summary["models"]))


# --------------------------------------------------------------------------- Table 2


def test_gamma_ablation_trains_unquantized_bdia_at_plus_minus_0_6(tmp_path):
    config = _tiny(mode="bdia_g060")
    config.eval.sweep_gammas = ()
    with tfds.testing.mock_data(num_examples=64):
        summary = vit_cifar.train_and_evaluate(config, str(tmp_path))
    result = summary["models"]["bdia_g060"]
    assert result["name"] == "BDIA γ=±0.6"
    assert result["method"] == dict(update="bdia", gamma=0.6, frac_bits=None,
                                    backprop="autodiff")
    assert result["backprop"] == "autodiff" and result["reversal"] is None
    assert 0.0 <= result["test_accuracy_final"] <= 1.0 and result["nonfinite_steps"] == 0


def test_gamma_ablation_mode_lists_the_papers_gammas():
    config = get_config("gamma_ablation")
    assert trainer.models_for_mode(config, vit_cifar.TASK) == tuple(GAMMA_ABLATION)
    assert sorted(GAMMA_ABLATION.values()) == [0.0, 0.25, 0.5, 0.6]
    for name, gamma in GAMMA_ABLATION.items():
        method = config.methods[name].to_dict()
        assert method["gamma"] == gamma and method["frac_bits"] is None
    vit_cifar.validate_config(config, sharding.make_mesh())


def test_reversible_bdia_at_gamma_0_6_is_rejected_naming_the_field():
    config = _tiny(mode="bdia")
    config.methods.bdia.gamma = 0.6
    with pytest.raises(ConfigError, match="methods.bdia"):
        vit_cifar.validate_config(config, sharding.make_mesh())


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("preset", PRESETS)
def test_every_vit_cifar_preset_validates(preset):
    config = get_config(preset)
    vit_cifar.validate_config(config, sharding.make_mesh())
    if preset == "overfit":
        assert config.mode == "table1" and tuple(config.seeds) == (0, 1, 2)
        assert config.data.num_train_examples == 2500 and config.model.depth == 6
        assert config.train.num_epochs == 100  # past the standard ViT's best, clearly
    if preset == "gamma_ablation":
        assert config.train.num_epochs == 50 and config.mode == "gamma_ablation"


def test_revvit_takes_the_shared_block_fields():
    """RevViTConfig has the ViT's block fields (BlockSettings), so a model field such as
    attention reaches it; a bad value fails where BlockSettings validates it."""
    config = _tiny(mode="revvit")
    config.model.attention = "chunked"
    vit_cifar.validate_config(config, sharding.make_mesh())
    config.model.attention = "nope"
    with pytest.raises(ConfigError, match="attention must be one of"):
        vit_cifar.validate_config(config, sharding.make_mesh())


def test_bad_seeds_are_rejected():
    config = _tiny(seeds=(1, 1))
    with pytest.raises(ConfigError, match="seeds"):
        vit_cifar.validate_config(config, sharding.make_mesh())


def test_lm_overfit_preset_validates():
    from experiments import lm

    config = lm_configs.get_config("overfit")
    lm.validate_config(config, sharding.make_mesh())
    assert tuple(config.seeds) == (0, 1, 2) and 0 < config.data.train_fraction < 1

