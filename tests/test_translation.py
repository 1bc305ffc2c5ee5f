"""End-to-end runs of ``experiments.translation`` on tiny synthetic parallel text."""

from __future__ import annotations

import gzip
import json
import math
import os

import numpy as np
import pytest

from experiments import translation
from experiments.common.config import ConfigError
from experiments.common.loop import TrainingInterrupted
from experiments.configs.translation import get_config
from experiments.data.text.parallel import TextDataError

# A toy "language pair": French is the word-by-word image of English.
LEXICON = {
    "a": "un", "red": "rouge", "blue": "bleu", "dog": "chien", "cat": "chat",
    "runs": "court", "sleeps": "dort", "big": "grand", "small": "petit", "man": "homme",
    "eats": "mange", "here": "ici",
}  # fmt: skip


def synthetic_pairs(n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    words = sorted(LEXICON)
    en, fr = [], []
    for _ in range(n):
        sentence = list(rng.choice(words, size=rng.integers(2, 6)))
        en.append(" ".join(sentence))
        fr.append(" ".join(LEXICON[w] for w in sentence))
    return en, fr


def write_corpus(directory, *, gz_train=True) -> str:
    os.makedirs(directory, exist_ok=True)
    for split, n, seed in (("train", 240, 0), ("val", 24, 1), ("test", 12, 2)):
        en, fr = synthetic_pairs(n, seed)
        for lang, lines in (("en", en), ("fr", fr)):
            data = "".join(line + "\n" for line in lines).encode()
            if split == "train" and gz_train:
                with gzip.open(os.path.join(directory, f"{split}.{lang}.gz"), "wb") as f:
                    f.write(data)
            else:
                with open(os.path.join(directory, f"{split}.{lang}"), "wb") as f:
                    f.write(data)
    return str(directory)


def tiny_config(data_dir: str, **train):
    c = get_config("tiny")
    c.data.update(dir=data_dir, train_split="train", val_split="val", test_split="test",
                  num_train_examples=0, num_val_examples=0, num_test_examples=0)
    c.tokenizer.vocab_size = 40
    c.model.update(width=32, encoder_depth=2, decoder_depth=2, num_heads=2, mlp_dim=64)
    c.batch.update(bucket_lengths=(24,), tokens_per_batch=24 * 24)  # one shape, 24 pairs
    c.optim.update(learning_rate=3e-3, warmup_epochs=0.5)
    c.train.update(num_epochs=4, log_every_steps=5, checkpoint_every_steps=5, progress="off",
                   **train)
    c.eval.update(beam_size=2, max_decode_len=20, decode_batch_size=8, num_examples_to_print=2)
    return c


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory, corpus):
    """(workdir, summary) of the compare run of ``tiny_config``: both tests below read it."""
    workdir = str(tmp_path_factory.mktemp("compare") / "run")
    config = tiny_config(corpus)
    config.train.checkpoint_every_steps = 20  # the resume test checkpoints often, not this run
    return workdir, translation.train_and_evaluate(config, workdir)


@pytest.mark.slow
@pytest.mark.xdist_group("translation_compare_run")  # one worker: one run
def test_translation_compare_run_learns_and_writes_outputs(compare_run):
    workdir, summary = compare_run
    for name in ("summary.json", "metrics.jsonl", "curves.png", "config.json",
                 "translations_standard.txt", "translations_bdia.txt",
                 "tokenizer/spm_shared.model", "tokenizer/spm_shared.json"):
        assert os.path.isfile(os.path.join(workdir, name)), name
    data = summary["data"]
    assert data["pairs"] == {"train": 240, "val": 24, "test": 12}
    assert data["batches_per_epoch"] == 10
    vocab = data["vocab_size"]["tgt"]
    models = summary["models"]
    assert set(models) == {"standard", "bdia"}
    for r in models.values():
        assert r["val_loss_final"] < math.log(vocab) - 1.0, r  # real learning
        assert 0.0 <= r["test_bleu_greedy"] <= 100.0 and 0.0 <= r["test_bleu_beam"] <= 100.0
        assert r["test_sentences"] == 12 and len(r["examples"]) == 2
        assert r["examples"][0]["source"] and r["examples"][0]["reference"]
        assert "tok:13a" in r["bleu_signature"]
    assert models["bdia"]["reversal_exact"] is True
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(evals) == 2 * 4 and all("val_perplexity" in r for r in evals)
    assert len([r for r in records if r["kind"] == "test"]) == 2


@pytest.mark.slow
@pytest.mark.xdist_group("translation_compare_run")  # one worker: one run
def test_translation_resume_matches_an_uninterrupted_run(tmp_path, corpus, compare_run):
    # The compare run's config, BDIA alone: its programs (train step, eval, decodes) are the
    # compare run's, so the compile cache serves them. The uninterrupted run is the compare
    # run's BDIA model: every model of a run starts from the same initialisation, batches
    # and keys (those of the seed), so it is the run of BDIA alone.
    config = tiny_config(corpus)
    config.mode = "bdia"
    _, straight = compare_run
    workdir = str(tmp_path / "b")
    config.train.stop_after_steps = 13  # mid-epoch, between checkpoints (every 5 steps)
    with pytest.raises(TrainingInterrupted):
        translation.train_and_evaluate(config, workdir)
    tokenizer_file = os.path.join(workdir, "tokenizer", "spm_shared.model")
    mtime = os.stat(tokenizer_file).st_mtime_ns
    config.train.stop_after_steps = 0
    resumed = translation.train_and_evaluate(config, workdir)
    assert os.stat(tokenizer_file).st_mtime_ns == mtime  # reused, not retrained
    a, b = straight["models"]["bdia"], resumed["models"]["bdia"]
    for key in ("val_loss_final", "test_bleu_greedy", "test_bleu_beam", "examples"):
        assert a[key] == b[key], key


def test_translation_data_errors(tmp_path, corpus):
    with pytest.raises(FileNotFoundError, match=r"data.dir \(or --data_dir\)"):
        translation.train_and_evaluate(tiny_config(str(tmp_path / "missing")),
                                       str(tmp_path / "w1"))
    bad = write_corpus(tmp_path / "bad", gz_train=False)
    with open(os.path.join(bad, "val.fr"), "a") as f:
        f.write("une ligne de trop\n")
    with pytest.raises(TextDataError, match="val.en has 24 lines but .*val.fr has 25"):
        translation.train_and_evaluate(tiny_config(bad), str(tmp_path / "w2"))


def test_translation_config_errors(tmp_path, corpus):
    config = tiny_config(corpus)
    config.model.num_heads = 3
    config.batch.bucket_lengths = (32, 16)
    config.eval.beam_size = 0
    with pytest.raises(ConfigError) as info:
        translation.train_and_evaluate(config, str(tmp_path / "w"))
    message = str(info.value)
    for field in ("--config.model: width (32) must be divisible by num_heads (3)",
                  "batch.bucket_lengths", "eval.beam_size"):
        assert field in message
