"""benchmarks.train_step_memory compiles each experiment's train step on abstract inputs
(the task's train_batch_shapes): a batch that does not match the task's loss fails here."""

from __future__ import annotations

import json

import pytest
from compile_only import memory_only_compiles

from benchmarks import train_step_memory


@pytest.mark.parametrize("experiment", train_step_memory.EXPERIMENTS)
def test_worker_compiles_the_train_step_of_each_experiment(experiment, capsys, monkeypatch):
    memory_only_compiles(monkeypatch)  # the worker compiles the step, never runs it
    # In-process worker: this process already has its one CPU device.
    train_step_memory.main(["--experiment", experiment, "--preset", "tiny", "--models", "bdia",
                            "--layouts", "dp", "--worker", "1"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    memory = row["results"]["dp/bdia"]
    assert memory["peak_estimate_bytes"] > memory["argument_bytes"] > 0
    assert memory["temp_bytes"] > 0
