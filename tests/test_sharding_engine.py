"""The reversible engine under data-parallel and FSDP sharding on 8 forced CPU devices."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

TESTS = pathlib.Path(__file__).resolve().parent


@pytest.mark.slow
def test_sharded_reversible_matches_single_device_and_stays_exact():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS), str(TESTS.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(TESTS / "sharded_engine_worker.py")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for layout in ("dp", "fsdp"):
        assert report[layout]["reversal_error"] == 0.0
        # Side bits are sharded along the batch axis like the activations.
        assert "data" in report[layout]["side_bits_sharded_on_batch"], report
