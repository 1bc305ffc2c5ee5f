"""benchmarks.max_context: the fit-and-verify search, the library LoRA of mode "lora16", and one compile-only
run at the tiny test shape."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from compile_only import MEMORY_ONLY_XLA_FLAG, memory_only_compiles
from flax import nnx
from subprocess_env import child_env

from benchmarks import max_context as mc

CURVES = {  # peak bytes at size n: growing, affine or with the causal mask's n² term
    "affine": lambda n: 1000 + 10 * n,
    "quadratic": lambda n: 1000 + 10 * n + n * n // 7,
    "steps": lambda n: 1000 + 10 * n + 40 * (n // 16),  # buffer-assignment jumps
    "concave": lambda n: 1000 + 10 * n + int(50 * n**0.5),
}


@pytest.mark.parametrize("curve", sorted(CURVES))
@pytest.mark.parametrize("budget, ceiling", [
    (5000, 4096), (500, 4096), (1010, 4096), (1011, 4096), (10**9, 64), (10**6, 4096)])
def test_fit_search_returns_the_last_size_that_fits(curve, budget, ceiling):
    calls = []

    def peak(n):
        calls.append(n)
        return CURVES[curve](n)

    found = mc.largest_fitting(peak, budget, ceiling)
    want = max([0] + [n for n in range(1, ceiling + 1) if CURVES[curve](n) <= budget])
    assert found == want
    assert len(set(calls)) <= 20  # a search, not a scan
    if 0 < found < ceiling:
        assert found in calls and found + 1 in calls  # both compiled, not predicted
    # Another budget's measurements seed the fit; the answer is still checked at n, n + 1.
    prior = {n: CURVES[curve](n) for n in (1, 4, 16, 100) if n <= ceiling}
    again = []
    assert mc.largest_fitting(lambda n: again.append(n) or CURVES[curve](n), budget,
                              ceiling, prior=prior) == want
    if 0 < want < ceiling:
        assert {want, want + 1} <= set(again) | set(prior)


def test_lora_adapters_are_the_only_trainable_parameters():
    config = mc.model_config("test-tiny", "bdia", 32, "float32", 16, mode="lora16")
    assert config.lora == mc.LORA16 and mc.trainable_of("lora16") is nnx.LoRAParam
    model = nnx.eval_shape(lambda: mc.make_model(config))
    _, lora, _ = nnx.split(model, nnx.LoRAParam, ...)
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(lora))
    assert n == mc.lora_param_count(mc.SHAPES["test-tiny"][0]) > 0
    assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(lora))
    base = nnx.split(model, nnx.Param, ...)[1]
    n_base = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(base))
    assert n_base > n  # the base (frozen by trainable=LoRAParam) is the rest


def test_analytic_rows_subtract_the_saved_block_inputs():
    fields = mc.SHAPES["test-tiny"][0]
    saved = fields["depth"] * 2 * 64 * fields["width"] * 4
    assert mc.saved_inputs_bytes("test-tiny", 2, 64) == saved
    assert mc.analytic_peak("remat_bf16", "test-tiny", 10**7, 2, 64) == 10**7 - saved // 2
    keep_two = saved * (fields["depth"] - 2) // fields["depth"]
    assert mc.analytic_peak("remat_offload", "test-tiny", 10**7, 2, 64) == 10**7 - keep_two


@pytest.mark.slow  # five compiles of about 6 s of CPU each at the suite's XLA flags
def test_tiny_run_records_and_bdia_fits_longer_context(tmp_path, monkeypatch):
    memory_only_compiles(monkeypatch)  # the search compiles steps, never runs them
    # Five compiles of the tiny step (was eleven): steps of 128 tokens under a ceiling of three, so
    # remat compiles 128 (fits) and 256 (over), bdia 128, 256 (fit) and 384 (over), and
    # remat_bf16's answer is read from remat's peaks.
    budget, unit = 0.0015, 128
    argv = ["--shapes", "test-tiny", "--modes", "full", "--methods", "remat,remat_bf16,bdia",
            "--budget_gib", str(budget), "--searches", "context", "--context_step", str(unit),
            "--loss_chunk", "32", "--attention_chunk", "32", "--max_context", str(3 * unit),
            "--no_breakdown", "--out_dir", str(tmp_path)]
    data = mc.main(argv)
    on_disk = json.loads((tmp_path / "max_context.json").read_text())
    assert on_disk["records"] == data["records"]
    records = {r["method"]: r for r in data["records"]}
    assert set(records) == {"remat", "remat_bf16", "bdia"}
    for r in records.values():
        assert {"shape", "mode", "method", "budget_gib", "max_context", "max_batch_at_4096",
                "analytic", "commit"} <= set(r)
        assert r["shape"] == "test-tiny" and r["mode"] == "full" and r["budget_gib"] == budget
        assert r["max_context"] % unit == 0
    assert records["remat_bf16"]["analytic"] and not records["bdia"]["analytic"]
    assert records["bdia"]["max_context"] > records["remat"]["max_context"] > 0
    measured = data["measurements"]
    for method in ("remat", "bdia"):
        t = records[method]["max_context"]
        fits = measured[f"test-tiny/full/{method}/b1/t{t}"]["peak_estimate_bytes"]
        over = measured[f"test-tiny/full/{method}/b1/t{t + unit}"]["peak_estimate_bytes"]
        assert fits <= budget * 2**30 < over  # compiled at the answer and one step above
    assert len(measured) <= 5  # a search, not a scan
    # A rerun resumes from the cached measurements: no compile.
    again = mc.main(argv)
    assert again["measurements"] == measured and again["records"] == data["records"]


def test_unchunked_mlp_compiles_another_step_under_its_own_key(tmp_path, monkeypatch):
    memory_only_compiles(monkeypatch)  # two compiles of the tiny step, never run
    opts = dict(compute_dtype="float32", attention_chunk=8, loss_chunk=32, context_step=64,
                max_context=64, max_batch=2)
    runner = mc.Runner(str(tmp_path), opts, unchunked_mlp=["bdia"])
    chunked = runner.peak("test-tiny", "full", "bdia", 2, 64)
    unchunked = runner.method_peak("test-tiny", "full", "bdia", 2, 64)  # bdia's setting
    # chunk_mlp=False: one block's [64, mlp_dim] activations where the chunked MLP holds
    # an [8, mlp_dim] block of them.
    assert unchunked > chunked
    assert set(runner.data["measurements"]) == {"test-tiny/full/bdia/b2/t64",
                                                "test-tiny/full/bdia+unchunked_mlp/b2/t64"}
    assert mc.model_config("test-tiny", "bdia", 64, "float32", 8,
                           unchunked_mlp=True).mlp_chunk_size is None
    assert mc.model_config("test-tiny", "bdia", 64, "float32", 8).mlp_chunk_size == 8


def test_the_cache_keeps_chunked_and_unchunked_peaks_apart(tmp_path, monkeypatch):
    # No compile: a stand-in peak, the unchunked MLP's steeper in the context; remat's
    # steeper than remat_bf16 takes off (half of 6 blocks · 32 wide · 4 B = 384 B a token).
    calls = []

    def fake_measure(shape, mode, method, batch, context, opts, unchunked_mlp=False):
        calls.append((method, context, unchunked_mlp))
        per_token = (400 if method == "remat" else 10) + (20 if unchunked_mlp else 0)
        return {"peak_estimate_bytes": 1000 + per_token * batch * context,
                "compile_seconds": 0.0, "param_bytes": 1, "frozen_bytes": 0,
                "opt_state_bytes": 2}

    monkeypatch.setattr(mc, "measure", fake_measure)
    argv = ["--shapes", "test-tiny", "--modes", "full", "--methods", "remat_bf16,bdia",
            "--budget_gib", str(5000 / 2**30), "--searches", "context",
            "--context_step", "32", "--loss_chunk", "32", "--max_context", "1024",
            "--no_breakdown", "--out_dir", str(tmp_path)]
    mc.main(argv)
    first = len(calls)
    assert first and not any(u for _, _, u in calls)
    data = mc.main(argv + ["--unchunked_mlp", "bdia"])
    # bdia unchunked compiled anew (none of the chunked peaks reused); remat_bf16's
    # chunked remat peaks were reused (no call).
    assert calls[first:] and all(m == "bdia" and u for m, _, u in calls[first:])
    records = {(r["method"], r["unchunked_mlp"]): r["max_context"] for r in data["records"]}
    # The last multiple of 32 with 1000 + k·t <= 5000: remat_bf16's k = 400 - 384.
    assert records == {("remat_bf16", False): 224, ("bdia", False): 384,
                       ("bdia", True): 128}
    assert "| bdia (MLP unchunked) | " in data["markdown"]
    keys = {k.split("/")[2] for k in data["measurements"]}
    assert keys == {"remat", "bdia", "bdia+unchunked_mlp"}
    n = len(calls)
    again = mc.main(argv + ["--unchunked_mlp", "bdia"])  # resumes: nothing measured
    assert len(calls) == n and again["records"] == data["records"]
    with pytest.raises(SystemExit, match="--unchunked_mlp takes methods of"):
        mc.main(argv + ["--unchunked_mlp", "bdia,rmat"])


def test_live_at_peak_lists_the_buffers_live_at_the_peak(tmp_path):
    # A fresh process: XLA reads the dump flags when its backend starts. It only compiles
    # the steps (from shapes) and reads their buffer assignment: -O0 (tests/compile_only.py).
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "benchmarks.max_context", "--shapes", "test-tiny",
                    "--modes", "full", "--methods", "bdia", "--live_at_peak", "1,2",
                    "--top", "1000", "--out_dir", str(tmp_path)], check=True,
                   capture_output=True, env=child_env(MEMORY_ONLY_XLA_FLAG))
    result = json.loads((tmp_path / "live_at_peak.json").read_text())
    assert sorted(result["batches"]) == ["1", "2"]
    for batch in result["batches"].values():
        sizes = [b["bytes"] for b in batch["top"]]
        assert sizes == sorted(sizes, reverse=True) and len(sizes) < 1000  # all of them
        assert batch["live_bytes"] == sum(sizes)
        # Not compared with the peak: the report leaves out the buffer assignment's packing
        # (a large share of a tiny step's peak) and may count a donated buffer twice.
        assert 0 < sizes[0] <= batch["compiled"]["peak_estimate_bytes"]
        assert any(b["op_name"].startswith("state.params") for b in batch["top"])
    assert result["batches"]["2"]["live_bytes"] > result["batches"]["1"]["live_bytes"]
