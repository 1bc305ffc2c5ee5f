"""benchmarks.memory_anatomy: the buffers read from XLA's live-range report add up to the
compiled peak (a tiny ViT, in a subprocess: the dump flags must precede the backend)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmarks import memory_anatomy


def test_live_buffers_add_up_to_the_compiled_peak(tmp_path):
    out = tmp_path / "memory_anatomy.json"
    # Compiled, never run: LLVM -O0 (tests/compile_only.py); XLA reads the last of a flag.
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags.strip()}
    subprocess.run([sys.executable, "-m", "benchmarks.memory_anatomy", "--small",
                    "--variants", "trained", "--models", "bdia", "--out_dir", str(tmp_path)],
                   check=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    results = json.loads(out.read_text())
    step = results["steps"]["trained/bdia"]
    peak = step["compiled"]["peak_estimate_bytes"]
    assert 0.8 * peak <= step["live_at_peak_bytes"] <= peak
    assert set(step["kinds"]) <= set(memory_anatomy.KINDS)
    assert step["kinds"]["parameters"] > 0 and step["kinds"]["backward scan body"] > 0
    assert sum(results["floor_bytes"].values()) < peak
