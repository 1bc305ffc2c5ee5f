"""The environment of the processes the tests start: this checkout on the import path, the
CPU backend, and the suite's XLA flag (``conftest.TEST_XLA_FLAG``) and the test process's ISA
cap (``--xla_cpu_max_isa=...``, so a suite run under the cap checks its subprocesses under it
too) with ``xla_flags`` after them, whatever other XLA_FLAGS the test process was given."""

import os

from conftest import TEST_XLA_FLAG

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(xla_flags: str = "", **extra: str) -> dict:
    """``os.environ`` plus PYTHONPATH=REPO, JAX_PLATFORMS=cpu, XLA_FLAGS and ``extra``."""
    parent = os.environ.get("XLA_FLAGS", "")
    suite_flag = TEST_XLA_FLAG if TEST_XLA_FLAG in parent else ""
    isa_cap = " ".join(f for f in parent.split() if f.startswith("--xla_cpu_max_isa="))
    return {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{suite_flag} {isa_cap} {xla_flags}".strip(), **extra}
