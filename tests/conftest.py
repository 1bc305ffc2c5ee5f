import os
import shutil
import tempfile

# Keep CPU tests deterministic and quiet; must run before JAX initialises.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

# Compiling is most of the suite's time, and XLA:CPU's compile is mostly LLVM: the suite
# compiles at LLVM -O1 with XLA's older (non-MLIR) fusion emitters, far cheaper than the defaults
# (docs/design.md §5 has the measurements). Lower is not sound: at -O0 two
# differently fused programs round apart by one grid step, and -O0 with these emitters breaks
# the reversal itself in the exactness tests. tests/test_device_check.py runs the probe at
# XLA's defaults in a subprocess, and BDIA_TEST_XLA_DEFAULTS=1 runs the whole suite at them.
# The suite's two workers keep both cores busy, so XLA's parallel LLVM codegen (a module split
# into parts, compiled on threads) only adds the cost of splitting: one part is cheaper; for
# the same reason Eigen's ops run on the calling thread (no intra-op thread pool, as the
# experiments' side-by-side runs in docs/results.md). Subprocesses inherit XLA_FLAGS.
TEST_XLA_FLAG = ("--xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false "
                 "--xla_cpu_parallel_codegen_split_count=1 --xla_cpu_multi_thread_eigen=false")
if os.environ.get("BDIA_TEST_XLA_DEFAULTS", "0") != "1" and (
        TEST_XLA_FLAG not in os.environ.get("XLA_FLAGS", "")):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAG}".strip()


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


def pytest_collection_modifyitems(config, items):
    """Slow tests first (stable otherwise): xdist hands out tests in this order, so a minute-long
    test started last would leave one worker idle at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
