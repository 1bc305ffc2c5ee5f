"""The environment of the processes the tests start: this checkout on the import path, the
CPU backend, and the suite's XLA flag (``conftest.TEST_XLA_FLAG``) with ``xla_flags`` after
it, whatever XLA_FLAGS the test process itself was given."""

import os

from conftest import TEST_XLA_FLAG

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(xla_flags: str = "", **extra: str) -> dict:
    """``os.environ`` plus PYTHONPATH=REPO, JAX_PLATFORMS=cpu, XLA_FLAGS and ``extra``."""
    suite_flag = TEST_XLA_FLAG if TEST_XLA_FLAG in os.environ.get("XLA_FLAGS", "") else ""
    return {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{suite_flag} {xla_flags}".strip(), **extra}
