"""benchmarks.experiment_step times the step an experiment trains, per method, side by side."""

from __future__ import annotations

import json

import pytest

from benchmarks import experiment_step
from experiments.common import trainer


def test_times_each_method_on_the_experiments_own_step(tmp_path, capsys, monkeypatch):
    built = []
    prepare = trainer.prepare_model
    monkeypatch.setattr(trainer, "prepare_model",
                        lambda task, config, name, *a: built.append(name) or prepare(
                            task, config, name, *a))
    experiment_step.main(["--experiment", "finetune_lm", "--preset", "quick",
                          "--models", "standard,lora_bdia", "--rounds", "2",
                          "--out_dir", str(tmp_path)])
    assert built == ["standard", "lora_bdia"]  # through the trainer's own construction
    saved = json.loads((tmp_path / "experiment_step.json").read_text())
    standard, lora_bdia = saved["models"]["standard"], saved["models"]["lora_bdia"]
    assert standard["ratio_to_first"] == 1.0
    for record in (standard, lora_bdia):
        assert len(record["step_s"]) == 2 and record["step_s_median"] > 0
        compiled = record["compiled"]
        assert compiled["peak_estimate_bytes"] > compiled["argument_bytes"] > 0
    # LoRA + BDIA: the adapters' optimizer state only, and its reversal is exact.
    assert lora_bdia["compiled"]["argument_bytes"] < standard["compiled"]["argument_bytes"]
    assert lora_bdia["reversal_error"] == 0.0 and not lora_bdia["overflow"]
    out = capsys.readouterr().out
    assert "| LoRA+BDIA |" in out and "experiment_step.json" in out


def test_an_unknown_method_is_one_line():
    with pytest.raises(SystemExit, match="--models: nope not in the quick preset's methods"):
        experiment_step.main(["--preset", "quick", "--models", "standard,nope"])
