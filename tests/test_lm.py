"""End-to-end runs of ``experiments.lm`` on tiny data (seconds each)."""

from __future__ import annotations

import json
import math
import os

import pytest
import tensorflow_datasets as tfds

from experiments import lm
from experiments.common.config import ConfigError
from experiments.common.loop import TrainingInterrupted
from experiments.common.metrics import read_records
from experiments.configs.lm import get_config

TEXT = "the cat sat on the mat. the dog sat on the log. " * 40


def tiny_config(text_file: str, **train):
    c = get_config("tiny")
    c.data.text_file = text_file
    c.data.val_fraction = 0.2
    c.model.update(max_len=16, width=32, depth=2, num_heads=2, mlp_dim=64)
    c.optim.learning_rate = 1e-2
    c.optim.warmup_epochs = 0.0
    # Checkpoints at the ends of the loop's "epochs" (eval_every_steps), each a write.
    c.train.update(num_steps=48, batch_size=8, eval_every_steps=16, log_every_steps=8,
                   checkpoint_every_steps=16, progress="off")
    c.train.update(**train)
    # 8 + 16 characters: longer than the context (16), so sampling continues in a second
    # chunk, from the last 8 characters; a prompt of half the context gives both chunks the
    # same shapes, so one generate program serves them.
    c.eval.update(num_windows=8, batch_size=8, num_samples=2, sample_length=16,
                  sample_prompt="the cat ")
    return c


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


@pytest.mark.slow
def test_lm_compare_run_learns_and_writes_outputs(tmp_path, text_file):
    workdir = str(tmp_path / "run")
    summary = lm.train_and_evaluate(tiny_config(text_file), workdir)
    for name in ("summary.json", "metrics.jsonl", "losses.png", "samples.txt", "vocab.json",
                 "config.json"):
        assert os.path.isfile(os.path.join(workdir, name)), name
    models = summary["models"]
    assert set(models) == {"standard", "bdia"}
    vocab_size = summary["data"]["vocab_size"]
    assert vocab_size == len(set(TEXT[: int(len(TEXT) * 0.8)]))
    for r in models.values():
        # Real learning: far below the uniform-guess loss log(vocab).
        assert r["val_loss_best"] < math.log(vocab_size) - 1.0, r
        assert r["train_loss_final"] is not None and r["gap_final"] is not None
        assert len(r["samples"]) == 2 and all(s.startswith("the cat ") for s in r["samples"])
        assert all(len(s) == 8 + 16 for s in r["samples"])  # longer than the context
    assert models["bdia"]["reversal_exact"] is True
    assert models["standard"]["reversal_exact"] is None
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    evals = [r for r in records if r["kind"] == "eval"]
    assert {r["model"] for r in evals} == {"GPT", "BDIA-GPT"}
    assert all({"val_loss", "train_loss", "gap"} <= set(r) for r in evals)


@pytest.mark.slow
def test_lm_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path, text_file):
    config = tiny_config(text_file)
    config.mode = "bdia"
    straight = lm.train_and_evaluate(config, str(tmp_path / "a"))
    config.train.stop_after_steps = 20  # mid-"epoch", between checkpoints (every 16 steps)
    workdir = str(tmp_path / "b")
    with pytest.raises(TrainingInterrupted):
        lm.train_and_evaluate(config, workdir)
    config.train.stop_after_steps = 0
    resumed = lm.train_and_evaluate(config, workdir)
    a, b = straight["models"]["bdia"], resumed["models"]["bdia"]
    for key in ("val_loss_final", "train_loss_final", "val_loss_best", "samples"):
        assert a[key] == b[key], key
    steps = [r["step"] for r in read_records(os.path.join(workdir, "metrics.jsonl"),
                                             kind="train")]
    assert steps == sorted(set(steps))  # no duplicated records after the resume


def test_lm_reads_tfds_text(tmp_path):
    def fake_source(self, split, **kwargs):
        del self, kwargs
        return [{"text": (TEXT if split == "train" else TEXT[:300]).encode()}]

    config = tiny_config("")
    config.mode = "standard"
    config.eval.num_samples = 0  # the compare run's train and eval steps: cache hits
    with tfds.testing.mock_data(as_data_source_fn=fake_source):
        summary = lm.train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["data"]["source"].startswith("tfds:tiny_shakespeare")
    assert summary["data"]["train_characters"] == len(TEXT)
    assert summary["data"]["val_characters"] == 300


def test_lm_config_and_data_errors(tmp_path, text_file):
    config = tiny_config(text_file)
    config.model.num_heads = 3
    config.train.num_steps = 50
    with pytest.raises(ConfigError) as info:
        lm.train_and_evaluate(config, str(tmp_path / "bad"))
    assert "--config.model: width (32) must be divisible by num_heads (3)" in str(info.value)
    assert "train.num_steps" in str(info.value)
    with pytest.raises(FileNotFoundError, match="data.text_file"):
        lm.train_and_evaluate(tiny_config(str(tmp_path / "nope.txt")), str(tmp_path / "x"))
    # A resumed workdir with a changed config is refused (once a checkpoint holds steps of
    # the old one; before that the changed config is recorded instead).
    config = tiny_config(text_file, stop_after_steps=8, checkpoint_every_steps=8)
    config.mode = "standard"
    with pytest.raises(TrainingInterrupted):
        lm.train_and_evaluate(config, str(tmp_path / "r"))
    config.model.width = 64
    with pytest.raises(ConfigError, match="model.width"):
        lm.train_and_evaluate(config, str(tmp_path / "r"))
