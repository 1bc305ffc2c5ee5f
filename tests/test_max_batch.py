"""benchmarks.max_batch: the batch search, and one compile-only run at a tiny size."""

from __future__ import annotations

import json

import pytest
from compile_only import memory_only_compiles

from benchmarks import max_batch

CURVES = {  # peak bytes at batch b: growing, near-affine like compiled peaks
    "affine": lambda b: 100 + 10 * b,
    "convex": lambda b: 100 + 10 * b + 3 * b * b // 10,  # the first guess is too large
    "concave": lambda b: 100 + 10 * b + int(50 * b**0.5),  # the first guess is too small
    "steps": lambda b: 100 + 10 * b + 40 * (b // 16),  # buffer-assignment jumps
}


@pytest.mark.parametrize("curve", sorted(CURVES))
@pytest.mark.parametrize("budget, ceiling", [
    (1000, 4096), (50, 4096), (109, 4096), (110, 4096), (10**9, 64), (10**6, 4096)])
def test_largest_batch_is_the_last_that_fits(curve, budget, ceiling):
    calls = []

    def peak(b):
        calls.append(b)
        return CURVES[curve](b)

    found = max_batch.largest_batch(peak, budget, ceiling)
    want = max([0] + [b for b in range(1, ceiling + 1) if CURVES[curve](b) <= budget])
    assert found == want
    assert len(set(calls)) <= 20  # a search, not a scan


@pytest.mark.slow
def test_small_run_writes_the_table(tmp_path, monkeypatch):
    memory_only_compiles(monkeypatch)  # the search only reads compiled memory
    # A budget that holds BDIA's batch 2, not 3, and remat's batch 1, not 2: a compile per
    # batch searched, five in all (benchmarks.device_check --small searches the same BDIA one).
    results = max_batch.main(["--small", "--budget_gib", "0.001", "--methods", "remat,bdia",
                              "--attention", "chunked", "--out_dir", str(tmp_path)])
    assert json.loads((tmp_path / "max_batch.json").read_text())["table"] == results["table"]
    assert "| BDIA, reversible |" in (tmp_path / "max_batch.md").read_text()
    for method in ("remat", "bdia"):
        search = results["searches"][f"{method}/chunked"]
        found = search["max_batch"]["0.001"]
        assert found >= 1, method  # the budget holds batch 1 of this model
        peaks = {int(b): p for b, p in search["peak_bytes"].items()}
        assert peaks[found] <= 0.001 * 2**30 < peaks[found + 1]  # compiled, not guessed
        # Bracketed in a few compiles: a peak that stays flat over small batches (parameters
        # dominating) sends the secant guesses to batches in the hundreds, a minute each here.
        assert len(peaks) <= 3, peaks
