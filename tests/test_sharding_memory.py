"""benchmarks.sharding_memory end to end at toy sizes: one worker process per device
count, the size flags forwarded to it, and the reversal exact on every layout."""

from __future__ import annotations

import json

from benchmarks import sharding_memory


def test_one_worker_per_device_count_with_the_size_flags(tmp_path):
    rows = sharding_memory.main(["--devices", "1,2", "--depth", "2", "--batch", "4",
                                 "--seq", "8", "--dim", "16", "--hidden", "32", "--heads", "2",
                                 "--out_dir", str(tmp_path)])
    assert [r["devices"] for r in rows] == [1, 2]
    saved = json.loads((tmp_path / "sharding_memory.json").read_text())
    assert saved["config"]["dim"] == 16 and saved["config"]["heads"] == 2
    for row in rows:
        assert set(row["results"]) == {f"{layout}/{method}" for layout in ("dp", "fsdp")
                                       for method in ("standard", "bdia_remat",
                                                      "bdia_reversible")}
        for name, result in row["results"].items():
            assert result["reversal_error"] == 0.0, name
            assert result["peak_estimate_bytes"] > 0, name
