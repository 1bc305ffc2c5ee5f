"""``runs.save_records`` / ``runs.restore_records`` (``scripts/run_records.py``): a run's
records without its checkpoints, carried to a fresh workdir, resume the run there without
retraining a finished model, and never mix two runs."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

from experiments import finetune_lm as ft
from experiments.common import runs
from experiments.configs.finetune_lm import get_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT = _load("run_records")
IGNORES = SCRIPT.SAME_RUN_IGNORES


def quick_config(*models):
    c = get_config("quick")
    c.models, c.seeds = models, (0,)
    c.train.update(num_epochs=1, progress="off")
    c.eval.update(beam_size=1, bleu_max_mrs=1, decode_batch_size=1, max_new_tokens=4,
                  export_hf=False)
    return c


def test_records_resume_a_run_in_a_fresh_workdir_without_retraining(tmp_path, capsys):
    """Train, save the records, restore them into a new workdir (the tiny stand-in written
    again there), rerun: the finished model is reused (same result, no checkpoint written),
    and the report reads the records folder as the run's workdir."""
    first, records, second = tmp_path / "w1", tmp_path / "records", tmp_path / "w2"
    ft.train_and_evaluate(quick_config("lora"), str(first))
    trained = json.loads((first / "seed_0" / "checkpoints" / "lora_result.json").read_text())
    SCRIPT.main(["save", str(first), str(records)])
    saved = sorted(p.relative_to(records).as_posix() for p in records.rglob("*") if p.is_file())
    assert saved == ["config.json", "seed_0/checkpoints/lora_result.json",
                     "seed_0/config.json", "seed_0/metrics.jsonl", "seed_0/summary.json",
                     "summary.json"]
    # A new machine: the stand-in data and checkpoint are rewritten, the records restored.
    ft.load_lm_data(quick_config("lora"), str(second))
    SCRIPT.main(["restore", str(records), str(second)])
    capsys.readouterr()
    again = ft.train_and_evaluate(quick_config("lora"), str(second))
    assert "[LoRA] already finished in this workdir; reusing" in capsys.readouterr().out
    assert json.loads(json.dumps(again["models"]["lora"]["per_seed"]["0"])) == trained
    assert not (second / "seed_0" / "checkpoints" / "lora").exists()  # nothing retrained
    # The report reads the records folder as it reads the run's workdir.
    report = _load("finetune_report")
    tables = [report.report(str(folder), str(tmp_path / out / "table")).split("\n", 1)[1]
              for folder, out in ((first, "from_workdir"), (records, "from_records"))]
    assert tables[0] == tables[1] and "| LoRA | 1/1 seeds |" in tables[0]


def _fake_run(root: pathlib.Path, *, width=32, results=("bdia",), fingerprint="abc",
              metrics="x\n"):
    """A records-shaped run folder: config.json (with model.width), one seed."""
    config = {"model": {"width": width}, "seeds": [0], "models": list(results)}
    (root / "seed_0" / "checkpoints").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config))
    (root / "seed_0" / "config.json").write_text(json.dumps({**config, "seeds": []}))
    (root / "seed_0" / "metrics.jsonl").write_text(metrics)
    for name in results:
        (root / "seed_0" / "checkpoints" / f"{name}_result.json").write_text(
            json.dumps({runs.CONFIG_FINGERPRINT_KEY: fingerprint}))
    return root


def test_records_of_two_runs_are_never_mixed(tmp_path):
    records = _fake_run(tmp_path / "records")
    before = {p: p.read_bytes() for p in records.rglob("*") if p.is_file()}
    with pytest.raises(runs.RecordsError, match="model.width.*folder of its own"):
        runs.save_records(str(_fake_run(tmp_path / "wide", width=64)), str(records),
                          resumable=IGNORES)
    with pytest.raises(runs.RecordsError, match="lacks; restore the records"):
        runs.save_records(str(_fake_run(tmp_path / "other", results=("lora",))),
                          str(records), resumable=IGNORES)
    with pytest.raises(runs.RecordsError, match="different configs"):
        runs.save_records(str(_fake_run(tmp_path / "refit", fingerprint="def")),
                          str(records), resumable=IGNORES)
    assert {p: p.read_bytes() for p in records.rglob("*") if p.is_file()} == before
    busy = _fake_run(tmp_path / "busy", results=(), metrics="y\n")
    with pytest.raises(runs.RecordsError, match="already holds other records.*new --workdir"):
        runs.restore_records(str(records), str(busy), resumable=IGNORES)
    assert not (busy / "seed_0" / "checkpoints" / "bdia_result.json").exists()  # all or none
    with pytest.raises(SystemExit, match="^error: .*no config.json"):
        SCRIPT.main(["restore", str(tmp_path / "nowhere"), str(busy)])


def test_seeds_and_resumable_fields_may_differ_between_invocations(tmp_path):
    records = _fake_run(tmp_path / "records")
    later = _fake_run(tmp_path / "later", results=("bdia", "lora"))
    config = json.loads((later / "config.json").read_text())
    (later / "config.json").write_text(json.dumps({**config, "seeds": [0, 1]}))
    written = runs.save_records(str(later), str(records), resumable=IGNORES)
    assert str(records / "seed_0" / "checkpoints" / "lora_result.json") in written
    assert runs.restore_records(str(records), str(later), resumable=IGNORES) == []
