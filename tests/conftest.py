import os
import shutil
import tempfile

# Keep CPU tests deterministic and quiet; must run before JAX initialises.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def pytest_configure(config):
    """One persistent XLA compilation cache for this test session, shared by the xdist
    workers and the subprocesses the tests start (they inherit the environment): many tests
    compile the same train step (a run, then its resume), and a cache hit loads the same
    executable. It is created empty per session, so no run depends on an earlier one."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ or hasattr(config, "workerinput"):
        return  # set by the user, or by the controller of this xdist worker
    cache = tempfile.mkdtemp(prefix="bdia_jax_test_xla_cache_")
    config._bdia_xla_cache = cache
    os.environ.update(JAX_COMPILATION_CACHE_DIR=cache,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


def pytest_unconfigure(config):
    cache = getattr(config, "_bdia_xla_cache", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)
