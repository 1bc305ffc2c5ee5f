"""Small command-line faults end in one line (issue 34, item 8): the config file of another
experiment, --help, float16, and checkpoint files' modes."""

import os
import subprocess
import sys

import jax.numpy as jnp
import pytest
from subprocess_env import REPO, child_env

from experiments import vit_cifar
from experiments.common import config as config_lib
from experiments.common import sharding
from experiments.common.checkpoint import Checkpointer
from experiments.configs import lm as lm_configs
from experiments.configs.vit_cifar import get_config


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "experiments.vit_cifar", *args], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=timeout)


def test_the_config_file_of_another_experiment_is_one_line(tmp_path):
    with pytest.raises(config_lib.ConfigError, match=r"^--config is not a vit_cifar config: "
                       r"it lacks model.image_size, model.patch_size, model.num_classes and "
                       r"\d+ more; pass --config=experiments/configs/vit_cifar.py:<preset>$"):
        config_lib.check_experiment_config(lm_configs.get_config("tiny"), "vit_cifar")
    config_lib.check_experiment_config(get_config("paper"), "vit_cifar")  # its own: fine
    proc = _cli("--config=experiments/configs/lm.py:tiny", f"--workdir={tmp_path / 'run'}")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: --config is not a vit_cifar config: it lacks model.image_size, "), proc.stderr
    assert lines[0].endswith("; pass --config=experiments/configs/vit_cifar.py:<preset>")
    assert not (tmp_path / "run").exists()


def test_help_exits_0_at_once_and_lists_the_flags():
    proc = _cli("--help")
    assert proc.returncode == 0, proc.stderr
    assert "experiments/configs/vit_cifar.py:<quick|paper|tiny|overfit|gamma_ablation>" in \
        proc.stdout and "--workdir" in proc.stdout
    # Answered before JAX is imported: the module's imports never ran.
    probe = subprocess.run(
        [sys.executable, "-c", "import runpy, sys; sys.argv = ['vit_cifar', '--help']\n"
         "try:\n runpy.run_module('experiments.vit_cifar', run_name='__main__')\n"
         "except SystemExit as e:\n print('exit', e.code, 'jax' in sys.modules)"],
        cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip().splitlines()[-1] == "exit 0 False", probe.stdout + probe.stderr
    full = _cli("--helpfull")  # absl's list of every flag, after the imports
    assert full.returncode == 0 and "--workdir" in full.stdout, full.stderr


def test_float16_is_refused_in_one_line():
    config = get_config("tiny")
    config.model.compute_dtype = "float16"
    with pytest.raises(config_lib.ConfigError) as caught:
        vit_cifar.validate_config(config, sharding.make_mesh())
    assert str(caught.value).splitlines()[1:] == [
        "  --config.model.compute_dtype: float16 is not supported (the training has no loss "
        "scaling, so small gradients vanish); use 'float32' or 'bfloat16'"]


def test_checkpoints_are_written_with_the_umask_modes(tmp_path):
    previous = os.umask(0o002)  # a group-shared checkpoint folder
    try:
        ckpt = Checkpointer(str(tmp_path / "ck"), save_every_steps=1, keep=1)
        ckpt.save(1, {"w": jnp.ones(3)}, {})
        ckpt.close()
    finally:
        os.umask(previous)
    for root, dirs, files in os.walk(tmp_path / "ck"):
        for name in dirs:
            assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o775, name
        for name in files:
            assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o664, name
