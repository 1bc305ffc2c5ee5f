"""``experiments.finetune_gpt2``: GPT-2 fine-tuned on E2E NLG, standard vs BDIA (tiny, CPU)."""

from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from bdia_jax import training
from experiments import finetune_gpt2 as ft
from experiments.common import sharding
from experiments.common.trainer import method_fields
from experiments.configs.finetune_gpt2 import get_config
from experiments.data.text import e2e

REPO = pathlib.Path(__file__).resolve().parents[1]


def quick_config(**eval_fields):
    c = get_config("quick")
    c.train.update(num_epochs=2, progress="off")
    c.eval.update(beam_size=2, **eval_fields)
    return c


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint folder, data folder) of the offline stand-in."""
    return e2e.write_tiny_setup(tmp_path_factory.mktemp("tiny"))


@pytest.mark.slow
def test_quick_preset_fine_tunes_both_models_on_the_tiny_standin(tmp_path):
    workdir = tmp_path / "run"
    summary = ft.train_and_evaluate(quick_config(bleu_max_mrs=2, decode_batch_size=2),
                                    str(workdir))
    setup = workdir / "tiny_setup"
    assert summary["data"]["checkpoint"] == str(setup / "checkpoint")
    assert summary["data"]["tokenizer"].startswith(str(setup / "checkpoint"))
    num_mrs = 2  # eval.bleu_max_mrs: the first two distinct test mrs
    assert summary["data"]["bleu_mrs"] == num_mrs
    models = summary["models"]
    assert list(models) == ["standard", "bdia"]
    assert [models[n]["name"] for n in models] == ["GPT-2", "BDIA-GPT-2"]
    for r in models.values():
        # exp on the host (numpy's in the run, math's here): a few ulps apart; approx's 1e-6.
        assert r["val_perplexity_final"] == pytest.approx(math.exp(r["val_loss_final"]))
        # Fine-tuning lowers the loss below a uniform guess over the tiny vocabulary.
        assert r["val_loss_best"] < math.log(summary["data"]["architecture"]["vocab_size"])
        for kind in ("greedy", "beam"):
            assert 0.0 <= r[f"bleu_{kind}"] <= 100.0
            assert len(r[f"decodes_{kind}"]) == num_mrs
            lines = (workdir / f"decodes_{r['name']}_{kind}.txt").read_text().splitlines()
            assert lines == r[f"decodes_{kind}"]
        assert r["memory"]["compiled"]["peak_estimate_bytes"] > 0
        assert r["step_time_s"] > 0
    assert models["bdia"]["backprop"] == "reversible"
    assert models["bdia"]["reversal_error_max"] == 0.0
    assert models["bdia"]["reversal_exact"] is True
    assert models["standard"]["reversal_exact"] is None
    assert summary["plots"] == ["curves.png"] and (workdir / "curves.png").is_file()


def test_models_load_the_checkpoint_and_greedy_decodes_match_generate(tiny, tmp_path):
    checkpoint, data_dir = tiny
    c = quick_config(bleu_max_mrs=2, decode_batch_size=2)
    c.model.checkpoint, c.data.dir = str(checkpoint), str(data_dir)
    data = ft.load_finetune_data(c, str(tmp_path))
    model_config = ft.pretrained_config(**c.model, **ft.TASK.model_fields(c, data),
                                        **method_fields(c.methods.bdia.to_dict()))
    model = ft.load_pretrained(model_config)
    assert model.config.vocab_size == data.architecture["vocab_size"]
    # The weights are the checkpoint's (save_gpt2 of a seed-0 random GPT-2).
    standard = ft.load_pretrained(ft.pretrained_config(
        **c.model, **ft.TASK.model_fields(c, data),
        **method_fields(c.methods.standard.to_dict())))
    np.testing.assert_array_equal(np.asarray(model.pos_embed[...]),
                                  np.asarray(standard.pos_embed[...]))

    graphdef, params, probes, rest = training.split(standard)
    run = types.SimpleNamespace(graphdef=graphdef, gather=None, config=c, data=data,
                                mesh=sharding.mesh_from_config(c))
    # Placed as the trainer places a state: the decode programs are the quick run's.
    params, probes, rest = sharding.place((params, probes, rest),
                                          sharding.replicated_sharding(run.mesh))
    state = types.SimpleNamespace(params=params, probes=probes, rest=rest)
    texts = ft.decode_all(run, state, beam_size=0)
    for prompt, text in zip(data.bleu_prompts, texts, strict=True):
        out = standard.generate(jnp.asarray([prompt], jnp.int32), c.eval.max_new_tokens,
                                temperature=0.0)
        assert text == data.tokenizer.decode(np.asarray(out[0, len(prompt):]).tolist()).strip()
    beams = ft.decode_all(run, state, beam_size=2)
    assert len(beams) == 2 and all(isinstance(t, str) for t in beams)


def test_missing_checkpoint_or_data_stop_with_one_line(tiny, tmp_path):
    checkpoint, data_dir = tiny
    c = quick_config()
    c.model.checkpoint, c.data.dir = str(tmp_path / "gpt2-medium"), str(data_dir)
    with pytest.raises(FileNotFoundError) as error:
        ft.train_and_evaluate(c, str(tmp_path / "a"))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"no config.json in {tmp_path / 'gpt2-medium'}: download")
    assert "huggingface.co/openai-community/gpt2-medium" in message
    assert "--config.model.checkpoint" in message

    paper = get_config("paper")  # no stand-in: empty paths say what to get
    paper.data.dir = str(data_dir)
    with pytest.raises(FileNotFoundError, match=r"^--config.model.checkpoint is empty: "
                                                r"download a GPT-2 checkpoint folder"):
        ft.train_and_evaluate(paper, str(tmp_path / "b"))
    paper.model.checkpoint, paper.data.dir = str(checkpoint), ""
    with pytest.raises(FileNotFoundError, match=r"^--config.data.dir is empty: download "
                                                r"e2e-dataset.zip"):
        ft.train_and_evaluate(paper, str(tmp_path / "c"))

    # The command line: one line on stderr, before any training.
    empty = tmp_path / "no_e2e"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.finetune_gpt2", f"--workdir={tmp_path / 'd'}",
         f"--config.model.checkpoint={checkpoint}", f"--config.data.dir={empty}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: no E2E NLG file {empty / 'trainset.csv'}: download "
                     f"e2e-dataset.zip from https://github.com/tuetschek/e2e-dataset "
                     f"(trainset.csv, devset.csv, testset_w_refs.csv) and unpack it into "
                     f"{empty}."], proc.stderr


def test_paper_preset_validates_and_config_errors_name_the_field(tiny):
    checkpoint, data_dir = tiny
    paper = get_config("paper")
    paper.model.checkpoint, paper.data.dir = str(checkpoint), str(data_dir)
    mesh = sharding.mesh_from_config(paper)
    ft.validate_config(paper, mesh)
    assert paper.eval.beam_size == 10 and paper.train.batch_size == 8
    bad = get_config("quick")
    bad.eval.bleu_split = "dev"
    bad.model.dropout = 1.5
    with pytest.raises(ValueError) as error:
        ft.validate_config(bad, mesh)
    assert "--config.eval.bleu_split: must be one of ('validation', 'test')" in str(error.value)
    assert "--config.model: dropout must be in [0, 1), got 1.5" in str(error.value)


def test_the_log_names_the_real_source_of_the_model_and_the_data(tiny, tmp_path, capsys):
    """The checkpoint given and the data from the stand-in (issue 34, item 9): the log
    names each by where it really comes from, never "a random GPT-2" for a checkpoint."""
    checkpoint, data_dir = tiny
    c = quick_config()
    c.model.checkpoint, c.data.dir = str(checkpoint), ""
    folder, data = ft.resolve_paths(c, str(tmp_path))
    out = capsys.readouterr().out
    assert folder == checkpoint and data == tmp_path / "tiny_setup" / "e2e"
    assert f"model: the checkpoint {checkpoint}; data: the tiny offline stand-in's E2E " \
           f"CSVs in {tmp_path / 'tiny_setup' / 'e2e'} (no data.dir)" in out
    assert "random GPT-2" not in out
    c.model.checkpoint, c.data.dir = "", str(data_dir)
    ft.resolve_paths(c, str(tmp_path))
    assert f"model: the tiny offline stand-in's random GPT-2 and tiny BPE in " \
           f"{tmp_path / 'tiny_setup' / 'checkpoint'} (no model.checkpoint); data: the E2E " \
           f"CSVs in {data_dir}" in capsys.readouterr().out
