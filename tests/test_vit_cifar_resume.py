"""An interrupted run resumes from its last checkpoint with the same data order and RNG
stream: its final parameters and its records equal those of an uninterrupted run."""

import json

import chex
import jax
import pytest
import tensorflow_datasets as tfds

from bdia_jax import training
from experiments import vit_cifar
from experiments.common import config as config_lib
from experiments.common import runs, sharding, trainer
from experiments.common import train_state as ts
from experiments.common.checkpoint import Checkpointer
from experiments.common.loop import TrainingInterrupted
from experiments.configs.vit_cifar import get_config

NUM_EXAMPLES = 256


def _config(**train):
    config = get_config("tiny")
    config.mode = "bdia"  # random γ signs every step: the RNG stream matters
    config.model.update(dropout=0.1, attention_dropout=0.1)  # ...and dropout masks
    config.eval.sweep_gammas = ()
    config.train.update(checkpoint_every_steps=4, keep_checkpoints=5, log_every_steps=1)
    config.train.update(train)
    return config


def _final_state(workdir, config):
    """The final checkpoint of the BDIA model, restored onto this process's mesh."""
    mesh = sharding.make_mesh()
    from flax import nnx

    from bdia_jax.models import ViT, ViTConfig

    vit_cfg = ViTConfig(**config.model, **trainer.method_fields(config.methods.bdia))
    optimizer, _ = ts.make_optimizer(config.optim, 16, 8)
    _, like = training.init(ViT(vit_cfg, rngs=nnx.Rngs(0)), optimizer,
                            jax.random.PRNGKey(0))
    ckpt = Checkpointer(str(workdir / "checkpoints" / "bdia"), save_every_steps=4, keep=5)
    state, _ = ckpt.restore(like, sharding.replicated_sharding(mesh))
    ckpt.close()
    return jax.device_get(state)


def _records(workdir):
    out = []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("time")
        out.append(record)
    return out


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(tmp_path, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
        vit_cifar.train_and_evaluate(_config(), str(straight))
        # Stop after step 11 (epoch 2 of 2, 8 steps per epoch): the last checkpoint is at
        # step 8, so steps 9-11 are run again after the restart.
        with pytest.raises(TrainingInterrupted, match="after step 11"):
            vit_cifar.train_and_evaluate(_config(stop_after_steps=11), str(resumed))
        assert max(r["step"] for r in _records(resumed)) == 11
        capsys.readouterr()
        summary = vit_cifar.train_and_evaluate(_config(), str(resumed))
        out = capsys.readouterr().out
        assert "resumed from the checkpoint at step 8/16 (dropped 3 later records)" in out

    assert summary["models"]["bdia"]["steps"] == 16
    a, b = _final_state(straight, _config()), _final_state(resumed, _config())
    assert int(a.step) == int(b.step) == 16
    chex.assert_trees_all_equal(a.params, b.params)
    chex.assert_trees_all_equal(a.opt_state, b.opt_state)
    # Same per-step losses, evaluations, and no duplicated steps 9-11.
    assert _records(straight) == _records(resumed)


def test_resume_refuses_a_changed_config(tmp_path):
    resumable = trainer.RESUMABLE + vit_cifar.TASK.resumable
    config = _config()
    runs.check_resume_config(config, str(tmp_path), resumable=resumable)
    config.train.stop_after_steps = 3  # allowed: it does not change the run
    runs.check_resume_config(config, str(tmp_path), resumable=resumable)
    config.model.width = 64
    config.optim.learning_rate = 0.1
    # Refused once a step was saved (before that, the changed config is recorded instead:
    # tests/test_run_identity.py).
    (tmp_path / "checkpoints" / "bdia" / "4").mkdir(parents=True)
    with pytest.raises(config_lib.ConfigError,
                       match="different config .*model.width, optim.learning_rate"):
        runs.check_resume_config(config, str(tmp_path), resumable=resumable)
