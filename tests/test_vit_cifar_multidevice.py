"""The same run on 1 device, on 8 (forced host) devices with a data=2 x fsdp=4 mesh (batch
split over all 8, parameters and optimizer state FSDP-sharded over groups of 4), and on two
processes of 2 devices each joined by ``jax.distributed`` on localhost (multi-host: each
process feeds its own rows of every batch; FSDP over 2) gives the same results. (Plain
data parallelism on 4 devices was covered here before; the 2 x 4 mesh exercises both axes
at once.)

JAX fixes its device count when it initialises, so each run is a subprocess (with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``) and this process only compares.

Not bit-identical, by nature of data parallelism: with the batch split over the devices the
loss mean and the gradient sums are reduced in a different order (per-device partial sums,
then an all-reduce) and each device's program has other shapes, which moves float32 results
by ulps; Adam and BDIA's fixed-point grid carry such differences forward. The first step
(same weights, data and keys) is compared within a bound derived from the computation
(``first_step_loss_bound``); the runs use a fine grid (l = 20), since at the paper's l = 9 a
last-ulp difference can move a state by a grid step δ = 2**-9, and no rounding bound below a
real bug's effect then exists (the code and its checks are the same for every l). Everything
the sharding could get wrong (batch order, augmentation, γ draws, dropout masks) moves the
first step's loss by far more than that bound.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from checkpoint_utils import restore_on_one_device
from float_bounds import ELEMENTWISE_ULPS, U, network_bound, transformer_chain
from subprocess_env import child_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 4 steps of 32 (one checkpoint, at the end) and the full 128 test images of the tiny
# preset: every step after the first is run on 8 devices, which a 2-core CPU pays for.
NUM_EXAMPLES = 128

SCRIPT = r"""
import sys
import tensorflow_datasets as tfds
from experiments import vit_cifar
from experiments.common import sharding
from experiments.common.config import ConfigError
from experiments.configs.vit_cifar import get_config

config = get_config("tiny")
config.mesh.fsdp = int(sys.argv[2])
config.mode = "bdia"  # the reversible custom VJP under sharding; the loop is shared
config.methods.bdia.frac_bits = 20  # a grid step below the stream's rounding (docstring)
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


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(workdir, devices, fsdp=1, process=None):
    """One run; ``process=(index, count, port)`` makes it one process of a multi-process
    job (the config's distributed.initialize="auto" picks the environment up)."""
    env = child_env(f"--xla_force_host_platform_device_count={devices}")
    if process is not None:
        index, count, port = process
        env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(count),
                   JAX_PROCESS_ID=str(index))
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(workdir), str(fsdp)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def first_step_loss_bound(config: dict, record: dict) -> float:
    """How far two programs' first-step losses (same weights, batch and keys) may differ.

    The logits: two float32 evaluations of the network (``float_bounds.network_bound``),
    its chain a pre-LN transformer of the config's sizes (``transformer_chain``) plus the
    BDIA update's float ops (4 per block), at the magnitude of the largest stream value
    (the record's ``max_abs``); and the grid: each of the depth + 1 quantized states may
    land a grid step δ apart (first order, the chain's unit gain). The cross-entropy is
    2-Lipschitz in the logits (max norm) and adds its own rounding in each program (its sum
    over the classes, an exp and a log, and the subtractions); the batch mean sums B
    losses in other orders ((B - 1) u Σ|loss_b| each)."""
    m = config["model"]
    tokens = (m["image_size"] // m["patch_size"]) ** 2 + (m["pool"] == "cls")
    chain = transformer_chain(width=m["width"], mlp_dim=m["mlp_dim"], seq=tokens,
                              depth=m["depth"], heads=m["num_heads"]) + 4 * m["depth"]
    magnitude = max(record["max_abs"], record["loss"], 1.0)
    delta = 2.0 ** -config["methods"]["bdia"]["frac_bits"]
    logits = network_bound(magnitude, chain=chain) + (m["depth"] + 1) * delta
    cross_entropy = 2 * logits + 2 * (m["num_classes"] + 2 * ELEMENTWISE_ULPS + 2) * U * magnitude
    batch = config["train"]["batch_size"]
    return cross_entropy + 2 * (batch - 1) * U * record["loss"]


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _final_params(path):
    """A checkpoint's params (leaves) restored onto this process's single device."""
    return jax.tree_util.tree_leaves(restore_on_one_device(path)["params"])


@pytest.mark.slow
def test_fsdp_and_multihost_runs_match_one_device(tmp_path):
    workdirs = {"one": tmp_path / "one", "fsdp8": tmp_path / "fsdp8",
                "hosts2": tmp_path / "hosts2"}
    port = _free_port()
    runs = {"one": _launch(workdirs["one"], 1),  # all concurrently: less wall time
            "fsdp8": _launch(workdirs["fsdp8"], 8, fsdp=4),
            "hosts2": _launch(workdirs["hosts2"], 2, fsdp=2, process=(0, 2, port)),
            "hosts2_process1": _launch(workdirs["hosts2"], 2, fsdp=2, process=(1, 2, port))}
    outputs = {}
    for name, process in runs.items():
        outputs[name], _ = process.communicate(timeout=600)
        assert process.returncode == 0, f"{name} run failed:\n{outputs[name][-3000:]}"
    # Only process 0 logs; both trained (process 1 validated the bad batch size too).
    assert "[BDIA-ViT] epoch 1/1" in outputs["hosts2"]
    assert "[BDIA-ViT]" not in outputs["hosts2_process1"]
    assert "BATCH30 rejected" in outputs["hosts2_process1"]

    summaries = {n: json.loads((w / "summary.json").read_text()) for n, w in workdirs.items()}
    assert summaries["one"]["devices"]["num_devices"] == 1
    assert summaries["fsdp8"]["devices"]["mesh"] == {"data": 2, "fsdp": 4}
    assert summaries["hosts2"]["devices"]["mesh"] == {"data": 2, "fsdp": 2}
    assert summaries["hosts2"]["devices"]["num_processes"] == 2
    assert summaries["hosts2"]["devices"]["num_global_devices"] == 4
    assert "BATCH30 accepted" in outputs["one"]
    for name, devices in (("fsdp8", 8), ("hosts2", 4)):
        assert "BATCH30 rejected" in outputs[name]
        assert f"--config.train.batch_size: 30 is not divisible by the {devices} devices" in (
            outputs[name])
        assert summaries[name]["models"]["bdia"]["reversal_exact"] is True
        assert summaries[name]["models"]["bdia"]["reversal_error_max"] == 0.0
        assert len(summaries[name]["models"]["bdia"]["gamma_sweep"]["accuracy"]) == 3
    assert summaries["one"]["models"]["bdia"]["reversal_error_max"] == 0.0

    # FSDP really shards the state: per device, the step's arguments (state + batch) are
    # far smaller than on one device (fsdp8: about 1/4 of the state and 1/8 of the batch;
    # hosts2: 1/2 and 1/4).
    argument_mb = {n: summaries[n]["models"]["bdia"]["memory"]["compiled"]["argument_bytes"]
                   / 2**20 for n in workdirs}
    assert argument_mb["fsdp8"] < 0.4 * argument_mb["one"], argument_mb
    assert argument_mb["hosts2"] < 0.6 * argument_mb["one"], argument_mb

    config = json.loads((workdirs["one"] / "config.json").read_text())
    a = _records(workdirs["one"])
    for name in ("fsdp8", "hosts2"):
        b = _records(workdirs[name])
        assert [(r["model"], r["kind"], r["step"]) for r in a] == [
            (r["model"], r["kind"], r["step"]) for r in b]
        for x, y in zip(a, b, strict=True):
            if x["kind"] == "train":
                if x["step"] == 1:  # the first step: same weights, data, keys
                    bound = first_step_loss_bound(config, x)
                    assert abs(x["loss"] - y["loss"]) <= bound, (name, x, y, bound)
                    assert x["accuracy"] == y["accuracy"], name
                # Later steps: not a rounding bound (Adam's normalised update turns an ulp of
                # a near-zero gradient into up to 2 lr per weight); a coarse check, far below
                # the spread between batches' losses that a wrong batch order would show.
                assert abs(x["loss"] - y["loss"]) < 1e-3, (name, x, y)
                assert y["reversal_error"] == 0.0, (name, y)
            else:  # eval / sweep accuracy on 128 test images: at most one prediction flips
                # (coarse, as the later steps' losses: the weights differ after step 1)
                assert abs(x["accuracy"] - y["accuracy"]) <= 1 / 128 + 1e-12, (name, x, y)

    steps = NUM_EXAMPLES // 32
    p1 = _final_params(workdirs["one"] / "checkpoints" / "bdia" / str(steps) / "state")
    for name in ("fsdp8", "hosts2"):
        p = _final_params(workdirs[name] / "checkpoints" / "bdia" / str(steps) / "state")
        assert len(p1) == len(p)
        worst = max(float(np.max(np.abs(x - y))) for x, y in zip(p1, p, strict=True))
        # Coarse, not a rounding bound: Adam moves each weight by up to ~lr per step whatever
        # its gradient, so two runs may lie 2 Σ lr apart; this says they stayed together.
        assert worst < 2e-3, (name, worst)
