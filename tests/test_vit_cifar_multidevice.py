"""The same run on 4 (forced host) devices and on 1 device gives the same results.

JAX fixes its device count when it initialises, so each run is a subprocess (with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``) and this process only compares.

Not bit-identical, by nature of data parallelism: with the batch split over 4 devices the
loss mean and the gradient sums are reduced in a different order (per-device partial sums,
then an all-reduce), which moves float32 results by an ulp; Adam and BDIA's fixed-point
grid carry such differences forward. Everything the sharding could get wrong (batch order,
augmentation, γ draws, dropout masks: a different draw changes the loss by ~1e-2 or more)
is checked against ulp-level and reduction-level tolerances below.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_EXAMPLES = 256

SCRIPT = r"""
import sys
import tensorflow_datasets as tfds
from experiments import vit_cifar
from experiments.common import sharding
from experiments.common.config import ConfigError
from experiments.configs.vit_cifar import get_config

config = get_config("tiny")
config.mode = "bdia"  # the reversible custom VJP under sharding; the loop is shared
config.model.update(dropout=0.1, attention_dropout=0.1)
config.train.update(log_every_steps=1, progress="off", num_epochs=1)
with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    vit_cifar.train_and_evaluate(config, sys.argv[1])
config.train.batch_size = 30
try:
    vit_cifar.validate_config(config, sharding.make_mesh())
    print("BATCH30 accepted")
except ConfigError as error:
    print("BATCH30 rejected:", error)
""".replace("NUM_EXAMPLES", str(NUM_EXAMPLES))


def _launch(workdir, devices):
    env = {**os.environ, "PYTHONPATH": REPO,
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(workdir)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _final_params(path):
    """A checkpoint's params restored onto this process's single device, whatever the
    topology it was saved from."""
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(path)
    metadata = getattr(metadata, "item_metadata", metadata)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
    return jax.tree_util.tree_leaves(jax.device_get(checkpointer.restore(path, target)["params"]))


@pytest.mark.slow
def test_four_devices_match_one_device(tmp_path):
    one, four = tmp_path / "one", tmp_path / "four"
    runs = {1: _launch(one, 1), 4: _launch(four, 4)}  # concurrently: halves the wall time
    outputs = {}
    for n, process in runs.items():
        outputs[n], _ = process.communicate(timeout=600)
        assert process.returncode == 0, f"{n}-device run failed:\n{outputs[n][-3000:]}"

    summaries = {n: json.loads((w / "summary.json").read_text())
                 for n, w in ((1, one), (4, four))}
    assert summaries[1]["devices"]["num_devices"] == 1
    assert summaries[4]["devices"]["num_devices"] == 4
    assert "BATCH30 accepted" in outputs[1]
    assert "BATCH30 rejected" in outputs[4] and "--config.train.batch_size: 30" in outputs[4]
    assert summaries[4]["models"]["bdia"]["reversal_exact"] is True
    assert len(summaries[4]["models"]["bdia"]["gamma_sweep"]["accuracy"]) == 3

    a, b = _records(one), _records(four)
    assert [(r["model"], r["kind"], r["step"]) for r in a] == [
        (r["model"], r["kind"], r["step"]) for r in b]
    for x, y in zip(a, b, strict=True):
        if x["kind"] == "train":
            if x["step"] == 1:  # the first step: same weights, data, keys; only the mean's
                # summation order differs
                assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=0)
                assert x["accuracy"] == y["accuracy"]
            assert abs(x["loss"] - y["loss"]) < 1e-3, (x, y)
        else:  # eval / sweep accuracy on 128 test images: at most one prediction flips
            assert abs(x["accuracy"] - y["accuracy"]) <= 1 / 128 + 1e-12, (x, y)

    steps = NUM_EXAMPLES // 32
    p1 = _final_params(one / "checkpoints" / "bdia" / str(steps) / "state")
    p4 = _final_params(four / "checkpoints" / "bdia" / str(steps) / "state")
    assert len(p1) == len(p4)
    worst = max(float(np.max(np.abs(x - y))) for x, y in zip(p1, p4, strict=True))
    assert worst < 2e-3, worst
