"""benchmarks.device_check --small: every section on the CPU, its JSON and markdown; and the
subprocess rerun with the deterministic-ops flag that a non-zero GPU probe triggers."""

from __future__ import annotations

import json
import os

import pytest
from compile_only import memory_only_compiles
from conftest import TEST_XLA_FLAG

from benchmarks import device_check


def max_batch_compiles_for_memory_only(monkeypatch):
    """The max-batch section only reads its compiled steps' memory, never runs them: its
    search compiles at -O0 (tests/compile_only.py, as tests/test_max_batch.py's does). The
    other sections run what they compile, at the suite's level."""
    search = device_check.max_batch.run

    def run(*args, **kwargs):
        with pytest.MonkeyPatch.context() as patch:
            memory_only_compiles(patch)
            return search(*args, **kwargs)

    monkeypatch.setattr(device_check.max_batch, "run", run)


@pytest.mark.slow
def test_small_run_answers_every_section(tmp_path, monkeypatch):
    max_batch_compiles_for_memory_only(monkeypatch)
    # A budget no loaded CPU spends: the skipping is test_time_budget_skips_cleanly's.
    results = device_check.main(["--small", "--out_dir", str(tmp_path),
                                 "--time_budget_s", "3600"])
    saved = json.loads((tmp_path / "device_check.json").read_text())
    assert saved["passed"] is results["passed"] is True
    for section in ("environment", *device_check.SECTIONS):
        assert section in saved and "error" not in saved[section], section
        assert "skipped" not in saved[section], section
    assert saved["environment"]["backend"] == "cpu"

    cases = saved["exactness"]["cases"]
    bdia = {name: r for name, r in cases.items() if not name.startswith("revvit/")}
    assert {r["model"] for r in bdia.values()} == {"vit", "gpt", "seq2seq"}
    assert {r["method"]["recompute"] for r in bdia.values()} == {"shared", "separate"}
    assert {r["dtype"] for r in bdia.values()} == {"float32", "bfloat16"}
    for name, record in bdia.items():
        assert record["probe"] == 0.0 and record["exact"] is True, name
        assert record["loss_finite"], name
    revvit = cases["revvit/reversible/float32"]
    assert revvit["reconstruction_error"] >= 0.0 and "exact" not in revvit  # not a verdict

    rows = saved["memory"]["rows"]
    assert set(rows) == set(device_check.PAPER_MEMORY_MB)
    for name, row in rows.items():
        assert row["peak_bytes"] > row["param_bytes"] + row["opt_state_bytes"] > 0, name
        assert row["peak_source"].startswith("compiled")  # CPU: no memory_stats()
        assert row["paper_mb"] == device_check.PAPER_MEMORY_MB[name]
    assert saved["memory"]["processes"] == "this one"

    methods = saved["step_time"]["methods"]
    assert set(methods) == {"autodiff", "remat", "bdia"}
    assert methods["remat"]["over_remat"] == 1.0
    assert all(m["median_s"] > 0 for m in methods.values())

    assert saved["max_batch"]["table"]["bdia"]["0.001"]["batch"] >= 1

    table = (tmp_path / "device_check.md").read_text()
    for heading in ("## Exactness", "## Table 1's memory column", "## Step time",
                    "## Largest batch"):
        assert heading in table
    assert "| vit | shared | float32 | 0 | yes |" in table
    assert "| BDIA-ViT (reversible) |" in table and "| 693.4 |" in table
    assert "| BDIA, reversible |" in table


def test_deterministic_rerun_in_a_subprocess_at_xla_default_optimization(monkeypatch):
    """The worker that reruns a case with the deterministic-ops flag, here also at XLA's
    default optimisation level and fusion emitters (without the suite's XLA flags, see
    conftest), under which the rest of the suite's exactness checks compile."""
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "").replace(TEST_XLA_FLAG, ""))
    spec = device_check.exactness_specs(["gpt/shared/float32"])["gpt/shared/float32"]
    record = device_check.run_worker("exactness", spec, "small", timeout=300,
                                     extra_xla_flags=device_check.DETERMINISTIC_FLAG)
    assert "error" not in record, record
    assert device_check.DETERMINISTIC_FLAG in record["xla_flags"]
    assert TEST_XLA_FLAG not in record["xla_flags"]
    assert record["probe"] == 0.0 and record["exact"] is True


def test_time_budget_skips_cleanly(tmp_path):
    results = device_check.main(["--small", "--out_dir", str(tmp_path), "--time_budget_s", "0"])
    for section in device_check.SECTIONS:
        assert "skipped" in results[section], section
    assert "skipped (time budget)" in (tmp_path / "device_check.md").read_text()


def test_memory_runs_one_process_per_model_where_memory_stats_exist(monkeypatch):
    """The accelerator path of the memory section, on the CPU: a stand-in memory_stats()
    sends each model to its own worker process (whose CPU reports none: compiled figures)."""
    monkeypatch.setattr(device_check, "device_memory", lambda: {"bytes_limit": 2**30})
    monkeypatch.setattr(device_check, "MEMORY_MODELS",  # two, to keep the test short
                        {k: device_check.MEMORY_MODELS[k] for k in ("vit", "bdia_vit")})
    args = device_check.parse_args(["--small"])
    section = device_check.memory(args, device_check.PRESETS["small"],
                                  device_check.TimeBudget(300))
    assert section["processes"] == "one per model"
    assert set(section["rows"]) == {"vit", "bdia_vit"}
    for name, row in section["rows"].items():
        assert "error" not in row and "skipped" not in row, row
        assert row["peak_bytes"] > row["param_bytes"] > 0, name
        assert row["xla_flags"] == os.environ.get("XLA_FLAGS", ""), name
    assert section["rows"]["bdia_vit"]["vit_over_this"] > 0


def test_largest_batch_on_a_device_keeps_the_presets_settings(monkeypatch):
    """The accelerator path of the max-batch section, on the CPU: the budget comes from a
    stand-in memory_stats(), and the full preset's own settings (the README's loss_chunk 32,
    GPT-2 medium) reach benchmarks.max_batch.run with it. The search itself is stubbed
    (tests/test_max_batch.py runs it)."""
    monkeypatch.setattr(device_check, "device_memory", lambda: {"bytes_limit": 80 * 2**30})
    seen = []

    def run(budgets_gib, size, *, methods, attention, loss_chunk):
        seen.append(dict(budgets_gib=budgets_gib, size=size, methods=methods,
                         attention=attention, loss_chunk=loss_chunk))
        table = {methods[0]: {"80.0": {"batch": 3, "attention": "chunked"}}}
        return {"searches": {}, "table": table, "backend": "cpu",
                "config": {**size, "budgets_gib": [80.0], "loss_chunk": loss_chunk,
                           "compute_dtype": "float32"}}

    monkeypatch.setattr(device_check.max_batch, "run", run)
    args = device_check.parse_args([])
    section = device_check.largest_batch(args, device_check.PRESETS["full"],
                                         device_check.TimeBudget(300))
    assert section["budget_source"] == "memory_stats() bytes_limit"
    assert [tuple(a["methods"]) for a in seen] == [("bdia",), ("remat",), ("autodiff",)]
    for a in seen:
        assert (a["loss_chunk"], tuple(a["budgets_gib"]), a["attention"]) == (
            32, (80.0,), ["chunked"])
        size = a["size"]
        assert (size["depth"], size["width"], size["context"]) == (24, 1024, 1024)
    assert "BDIA / remat" in section["markdown"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_chunked_cases_build_the_chunked_mlp_under_fused(dtype):
    """The full preset's "fused" cases (run only on an accelerator) build a GPT whose MLP runs
    over position blocks under recompute="fused": the one-loop path they exist to check.
    Built here with the small preset's model (no compile)."""
    name = f"gpt/fused-chunked/{dtype}"
    spec = device_check.exactness_specs([name])[name]
    model, _, _ = device_check.build(spec, device_check.PRESETS["small"], 2)
    assert model.stack.backprop.recompute == "fused"
    assert model.config.attention == "chunked" and model.config.mlp_chunk_size == 64
    assert model.config.compute_dtype == dtype
