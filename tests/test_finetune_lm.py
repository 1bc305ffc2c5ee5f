"""``experiments.finetune_lm``: a pretrained Llama-family LM fine-tuned on E2E NLG (the tiny
offline stand-in, CPU): the devset split by mr, LoRA + BDIA training only the adapters with
exact reversal, and the exported Hugging Face folder."""

from __future__ import annotations

import math
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from bdia_jax import formats, pretrained
from bdia_jax.models import LoRA
from bdia_jax.testing import assert_bits_equal
from experiments import finetune_lm as ft
from experiments.common import metrics, sharding
from experiments.common.trainer import build_model_config
from experiments.configs.finetune_lm import get_config
from experiments.data.text import e2e

REPO = pathlib.Path(__file__).resolve().parents[1]


def quick_config(*models, **eval_fields):
    c = get_config("quick")
    c.models = models
    c.train.update(num_epochs=1, progress="off")
    c.eval.update(beam_size=1, bleu_max_mrs=1, decode_batch_size=1, max_new_tokens=4,
                  **eval_fields)
    return c


def test_devset_split_by_mr_keeps_every_mr_on_one_side(tmp_path):
    _, data_dir = e2e.write_tiny_setup(tmp_path)
    dev = e2e.read_e2e(data_dir, "validation")
    train, validation = ft.split_by_mr(dev, 0.25, seed=0)
    assert len(train) + len(validation) == len(dev)
    assert not set(train.mrs) & set(validation.mrs)
    assert len(set(validation.mrs)) == 1  # round(0.25 · 4 mrs)
    assert ft.split_by_mr(dev, 0.25, seed=0) == (train, validation)  # seeded
    with pytest.raises(e2e.TextDataError, match="validation_fraction"):
        ft.split_by_mr(dev, 0.9, seed=0)


@pytest.mark.slow  # one whole run: train step, evaluation, two decoders and the export compile
def test_lora_bdia_fine_tunes_and_exports_a_loadable_hf_folder(tmp_path):
    """The quick preset's LoRA+BDIA model, one epoch: reversal error exactly 0, only the
    adapters trained (the exported folder holds the checkpoint's norms and embedding bit for
    bit, and merged kernels that differ from it), pretrained.load reads the folder, and its
    tokenizer files load."""
    workdir = tmp_path / "run"
    summary = ft.train_and_evaluate(quick_config("lora_bdia"), str(workdir))
    r = summary["models"]["lora_bdia"]
    assert r["name"] == "LoRA+BDIA" and r["reversal_error_max"] == 0.0
    assert r["reversal_exact"] is True
    assert np.isfinite(r["val_loss_best"]) and np.isfinite(r["test_loss"])
    # exp on the host (numpy's in the run, math's here): a few ulps apart; approx's 1e-6.
    assert r["val_perplexity_final"] == pytest.approx(math.exp(r["val_loss_final"]))
    assert 0.0 <= r["bleu_greedy"] <= 100.0
    assert len(r["samples"]) == 1 and r["samples"][0]["mr"] == e2e.TINY_MRS[0]
    assert summary["data"]["test_pairs"] > 0
    # The entry's own learning rate (the quick preset's 10x for LoRA) drove its schedule.
    rates = [rec["learning_rate"] for rec in metrics.read_records(
        str(workdir / "metrics.jsonl"), model="LoRA+BDIA", kind="train")]
    peak = get_config("quick").methods.lora_bdia.learning_rate
    assert rates and max(rates) <= peak and max(rates) > get_config("quick").optim.learning_rate
    folder = workdir / "lora_bdia" / "hf"
    assert r["hf_folder"] == str(folder)
    base = pretrained.load(workdir / "tiny_setup" / "llama")
    tuned = pretrained.load(folder)
    assert tuned.config == base.config and tuned.config.lora is None  # max_len: the checkpoint's 256, not the rows' 128
    frozen = nnx.Not(nnx.Any(*(nnx.PathContains(name) for name in (
        "query", "key", "value", "out", "gate", "up", "down"))))
    assert_bits_equal(nnx.state(tuned, nnx.All(nnx.Param, frozen)),
                      nnx.state(base, nnx.All(nnx.Param, frozen)))
    q_tuned = tuned.stack.blocks.attn.query.kernel.get_value()
    q_base = base.stack.blocks.attn.query.kernel.get_value()
    assert not np.array_equal(np.asarray(q_tuned), np.asarray(q_base))
    tokenizer = formats.load_tokenizer(folder)
    assert tokenizer.token_to_id(e2e.END_OF_TEXT) is not None


def test_models_get_their_method_fields(tmp_path):
    """A method entry's model fields (dropout, lora_*) reach only its model; LoRA models
    train the adapters only."""
    c = get_config("quick")
    checkpoint, data_dir = ft.write_tiny_lm_setup(tmp_path)
    c.model.checkpoint, c.data.dir = str(checkpoint), str(data_dir)
    data = ft.load_lm_data(c, str(tmp_path))
    configs = {}
    for name in c.models:
        configs[name], _ = build_model_config(ft.TASK, c, c.methods[name].to_dict(), data)
    assert configs["standard"].dropout == 0.0 and configs["dropout"].dropout == 0.1
    assert configs["standard"].lora is None and configs["bdia"].lora is None
    assert configs["lora"].lora == LoRA(rank=8, alpha=16.0,
                                        targets=("q", "k", "v", "o", "gate", "up", "down"))
    assert ft.TASK.trainable(configs["lora_bdia"]) is nnx.LoRAParam
    assert ft.TASK.trainable(configs["bdia"]) is nnx.Param
    model = ft.load_pretrained_lm(configs["lora_bdia"], rngs=nnx.Rngs(0))
    base = ft.load_pretrained_lm(configs["bdia"])  # the same method, no adapters
    tokens = jax.numpy.asarray(data.train.inputs[:2])
    assert_bits_equal(model(tokens)[0], base(tokens)[0])  # fresh adapters: B = 0


def test_missing_checkpoint_is_one_line(tmp_path):
    c = quick_config("standard")
    c.model.checkpoint = str(tmp_path / "nowhere.gguf")
    with pytest.raises(FileNotFoundError, match="model.checkpoint"):
        ft.load_lm_data(c, str(tmp_path))


def test_a_method_entry_sets_its_own_learning_rate_validated_under_its_name():
    """LoRA's own learning_rate overrides config.optim's for its model only; a bad one is
    one line naming the entry's field."""
    from experiments.common import sharding, trainer
    from experiments.configs import finetune_lm as presets

    c = get_config("smollm2_e2e")
    assert c.optim.learning_rate == presets.FULL_LR
    lora = trainer.method_optim(ft.TASK, c, c.methods.lora.to_dict())
    assert lora.learning_rate == presets.LORA_LR == 10 * presets.FULL_LR
    assert lora.weight_decay == c.optim.weight_decay
    assert trainer.method_optim(ft.TASK, c, c.methods.bdia.to_dict()) == c.optim
    assert trainer.split_method(ft.TASK, c.methods.lora.to_dict())[1].keys() == {
        "update", "backprop"}
    assert {c.methods[n].dropout for n in presets.DROPOUT_RATES} == {0.05, 0.1, 0.2}
    c.methods.lora.learning_rate = -1.0
    with pytest.raises(ValueError) as error:
        ft.validate_config(c, sharding.mesh_from_config(c))
    problems = str(error.value).splitlines()[1:]
    assert problems == ["  --config.methods.lora.learning_rate: must be a number > 0, got -1.0"]


def test_text_rows_are_consecutive_tokens_with_every_target_counted(tmp_path):
    """format "text": a file splits 80/10/10 by characters; a split becomes rows of
    max_len + 1 consecutive tokens, the last short piece dropped, at most ``limit``."""
    from experiments.data.text import lm_text

    lm_text.write_tiny_text(tmp_path / "text.txt")
    text = (tmp_path / "text.txt").read_text()
    tokenizer = e2e.train_tiny_gpt2_tokenizer([text], tmp_path / "bpe")
    splits = lm_text.read_text_splits(str(tmp_path / "text.txt"))
    assert "".join(splits[s] for s in lm_text.SPLITS) == text
    assert len(splits["train"]) == int(0.8 * len(text))
    ids = tokenizer.encode(splits["train"])
    rows = lm_text.encode_text_rows(tokenizer, splits["train"], 16)
    n = len(ids) // 17
    assert rows.inputs.shape == (n, 16) and rows.mask.all()
    np.testing.assert_array_equal(rows.inputs[1], ids[17:33])
    np.testing.assert_array_equal(rows.targets[1], ids[18:34])
    assert len(lm_text.encode_text_rows(tokenizer, splits["train"], 16, limit=2).inputs) == 2
    with pytest.raises(e2e.TextDataError, match="lower --config.data.max_len"):
        lm_text.encode_text_rows(tokenizer, "To be", 16, source="x")


def test_text_format_loads_the_tiny_standin_text_and_prompts(tmp_path):
    c = get_config("quick")
    c.data.format = "text"
    c.eval.update(num_samples=2, prompt_tokens=8)
    data = ft.load_lm_data(c, str(tmp_path))
    assert data.source == str(tmp_path / "tiny_setup" / "text.txt")
    assert data.train.inputs.shape[1] == c.data.max_len and data.train.mask.all()
    assert len(data.bleu_prompts) == 2 and data.bleu_mrs == [] and data.bleu_refs == []
    assert data.bleu_prompts[1] == data.test.inputs[1, :8].tolist()
    c.eval.prompt_tokens = c.data.max_len
    with pytest.raises(ValueError, match="--config.eval.prompt_tokens: must be below"):
        ft.validate_config(c, sharding.mesh_from_config(c))


@pytest.mark.slow  # one whole run (train step, evaluation, test loss, decoder compile)
def test_text_format_fine_tunes_bdia_on_the_tiny_standin_text(tmp_path):
    """data.format="text" end to end: one BDIA step, reversal exactly 0, validation and
    test loss, greedy samples continuing test rows, no BLEU."""
    c = quick_config("bdia", num_samples=1, prompt_tokens=4, export_hf=False)
    c.data.update(format="text", max_train_rows=2)
    summary = ft.train_and_evaluate(c, str(tmp_path))
    r = summary["models"]["bdia"]
    assert r["steps"] == 1 and r["reversal_error_max"] == 0.0
    assert np.isfinite(r["val_loss_best"]) and np.isfinite(r["test_loss"])
    assert "bleu_greedy" not in r and len(r["samples"]) == 1
    data = ft.load_lm_data(c, str(tmp_path))
    assert r["samples"][0]["prompt"] == data.tokenizer.decode(data.bleu_prompts[0])


def test_report_aggregates_finished_seeds_and_shows_missing_ones(tmp_path):
    """scripts/finetune_report.py on a partial workdir: mean ± std over the finished
    seeds, the dropout sweep's winner as the dropout row, missing methods and seeds shown,
    the running model's last step, and the curves PNG."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location(
        "finetune_report", REPO / "scripts" / "finetune_report.py")
    rep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rep)
    c = get_config("smollm2_e2e")
    (tmp_path / "config.json").write_text(json.dumps(c.to_dict()))

    def result(test_loss, val_loss, **extra):
        return {"test_loss": test_loss, "val_loss_best": val_loss, "bleu_greedy": 50.0,
                "bleu_beam": 52.0, "step_time_s": 2.0, "reversal": None,
                "memory": {"compiled": {"peak_estimate_bytes": 3 * 2**20}},
                "samples": [{"mr": "name[x]", "greedy": "x."}], **extra}

    finished = {0: {"standard": result(1.0, 1.5), "dropout_05": result(1.1, 1.4),
                    "dropout": result(1.1, 1.3), "dropout_20": result(1.2, 1.6),
                    "bdia": result(0.9, 1.2, reversal="exact", reversal_error_max=0.0)},
                1: {"standard": result(2.0, 2.5), "dropout": result(1.3, 1.5)}}
    for seed, models in finished.items():
        folder = tmp_path / f"seed_{seed}" / "checkpoints"
        folder.mkdir(parents=True)
        for name, r in models.items():
            (folder / f"{name}_result.json").write_text(json.dumps(r))
        records = [{"model": ft.TASK.display(n), "kind": "eval", "step": 16,
                    "val_loss": r["val_loss_best"]} for n, r in models.items()]
        records.append({"model": "LoRA", "kind": "train", "step": 12, "loss": 1.0})
        (tmp_path / f"seed_{seed}" / "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records))
    # seed 0's last invocation reused its trained models, seed 1's trained them.
    for seed, wall in ((0, 1.0), (1, 360.0)):
        (tmp_path / f"seed_{seed}" / "summary.json").write_text(json.dumps(
            {"wall_seconds": wall, "models": {"standard": {"train_seconds": 10.0}}}))
    md = rep.report(str(tmp_path), str(tmp_path / "out" / "table"), seeds=[0, 1, 2])
    assert "export; a resumed one counts only itself): seed 1: 0.10 h\n" in md
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in md.splitlines()
            if line.startswith("| ") and " seeds" in line}
    assert rows["standard"][1:4] == ["2/3 seeds", "1.5000 ± 0.7071", "50.00 ± 0.00"]
    assert rows["standard + dropout 0.1 (sweep winner)"][1:3] == ["2/3 seeds",
                                                                 "1.2000 ± 0.1414"]
    assert rows["BDIA"][1:3] == ["1/3 seeds", "0.9000"] and rows["BDIA"][-2] == "0"
    assert rows["LoRA"][1] == "0/3 seeds, seed 0 at step 12, seed 1 at step 12"
    assert set(rows["LoRA"][2:-1]) == {rep.MISSING}
    assert "| `dropout` | 0.1 | 1.3000 **(winner)** |" in md
    assert (tmp_path / "out" / "table.md").read_text() == md
    assert (tmp_path / "out" / "table_val.png").stat().st_size > 0
