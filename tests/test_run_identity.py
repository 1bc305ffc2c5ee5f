"""A result or checkpoint is reused or resumed only by the config that produced it (each
carries ``runs.run_config``'s fingerprint), and a run that trained nothing leaves no record
that blocks its corrected rerun (issue 34, items 1 and 7)."""

import json
import os

import pytest
import tensorflow_datasets as tfds

from experiments import vit_cifar
from experiments.common import config as config_lib
from experiments.common import runs, trainer
from experiments.common.checkpoint import CheckpointMismatchError
from experiments.configs.vit_cifar import get_config

NUM_EXAMPLES = 64


def _config(**model):
    config = get_config("tiny")
    config.mode = "bdia"
    config.data.update(num_train_examples=NUM_EXAMPLES, num_test_examples=32)
    config.train.update(num_epochs=1, batch_size=32, checkpoint_every_steps=1)
    config.eval.update(batch_size=32, sweep_gammas=())
    config.model.update(model)
    return config


def _run(config, workdir):
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        return vit_cifar.train_and_evaluate(config, str(workdir))


def test_a_finished_run_is_never_reused_under_another_config(tmp_path, capsys):
    summary = _run(_config(), tmp_path)
    params = summary["models"]["bdia"]["num_params"]
    # The case: config.json deleted, then a rerun with another width.
    (tmp_path / "config.json").unlink()
    with pytest.raises(config_lib.ConfigError, match=r"bdia_result.json was trained with a "
                       r"different config \(model.width 32 -> 64\)"):
        _run(_config(width=64), tmp_path)
    # The result is gone too: the final checkpoint is not resumed under the new config.
    (tmp_path / "config.json").unlink()
    (tmp_path / "checkpoints" / "bdia_result.json").unlink()
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint step 2 .* different "
                       r"config \(model.width 32 -> 64\)"):
        _run(_config(width=64), tmp_path)
    # A change the arrays cannot show (same shapes) is caught by the fingerprint too.
    (tmp_path / "config.json").unlink()
    config = _config()
    config.optim.learning_rate = 0.5
    with pytest.raises(CheckpointMismatchError, match=r"optim.learning_rate 0.001 -> 0.5"):
        _run(config, tmp_path)
    # The same config still resumes (here: re-evaluates the final checkpoint) and reuses.
    (tmp_path / "config.json").unlink()
    capsys.readouterr()
    again = _run(_config(), tmp_path)
    assert "resumed from the checkpoint at step 2/2" in capsys.readouterr().out
    assert again["models"]["bdia"]["num_params"] == params
    assert _run(_config(), tmp_path)["models"]["bdia"]["num_params"] == params
    assert "already finished in this workdir; reusing" in capsys.readouterr().out
    # A method entry added to the run (a variant to train beside the finished model) does
    # not block the workdir; a finished model's own entry changed is caught by its result.
    config = _config()
    config.methods.bdia_25 = dict(config.methods.bdia.to_dict(), gamma=0.25)
    assert _run(config, tmp_path)["models"]["bdia"]["num_params"] == params
    config.methods.bdia.gamma = 0.25
    with pytest.raises(config_lib.ConfigError, match=r"bdia_result.json was trained with a "
                       r"different config \(methods.bdia.gamma 0.5 -> 0.25\)"):
        _run(config, tmp_path)


def test_run_config_ignores_eval_resumable_fields_and_other_models():
    resumable = trainer.RESUMABLE + vit_cifar.TASK.resumable
    base = runs.run_config(_config(), "bdia", resumable=resumable)
    assert "eval" not in base and set(base["methods"]) == {"bdia"}
    for change in (lambda c: c.eval.update(batch_size=64),
                   lambda c: c.train.update(stop_after_steps=3, progress="off"),
                   lambda c: c.methods.standard.update(backprop="remat"),
                   lambda c: c.update(mode="compare", seeds=(0, 1))):
        config = _config()
        change(config)
        assert runs.fingerprint(runs.run_config(config, "bdia", resumable=resumable)) == \
            runs.fingerprint(base)
    for change in (lambda c: c.methods.bdia.update(gamma=0.25),
                   lambda c: c.data.update(num_train_examples=32),
                   lambda c: c.train.update(batch_size=16),
                   lambda c: c.update(seed=1)):
        config = _config()
        change(config)
        assert runs.fingerprint(runs.run_config(config, "bdia", resumable=resumable)) != \
            runs.fingerprint(base)


def test_a_config_json_of_a_run_that_trained_nothing_does_not_block_the_fix(tmp_path):
    resumable = trainer.RESUMABLE + vit_cifar.TASK.resumable
    config = _config()
    config.train.batch_size = 60000  # stopped before its first step
    runs.check_resume_config(config, str(tmp_path), resumable=resumable)
    (tmp_path / "checkpoints" / "bdia").mkdir(parents=True)  # opened, nothing saved
    runs.check_resume_config(_config(), str(tmp_path), resumable=resumable)  # the fix
    assert json.loads((tmp_path / "config.json").read_text())["train"]["batch_size"] == 32
    (tmp_path / "checkpoints" / "bdia" / "2").mkdir()  # now a step was saved
    with pytest.raises(config_lib.ConfigError, match="different config .*train.batch_size"):
        runs.check_resume_config(config, str(tmp_path), resumable=resumable)
    assert os.path.exists(tmp_path / "config.json")
