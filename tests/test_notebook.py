"""The Colab/TPU notebook runs top to bottom (smoke settings) and matches its builder script.

The notebook is executed as a user would run it: a fresh ``python3`` kernel started in
``notebooks/``, with ``BDIA_NOTEBOOK_SMOKE=1`` (tiny sizes, ``tfds.testing.mock_data``
instead of CIFAR-10, so no data is needed). Any cell error fails the test; the notebook's
own asserts check the bit-exact reversal, the zero reversal probe and the training results.
"""

import importlib.util
import json
import os

import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(REPO, "notebooks")
NOTEBOOK = os.path.join(NOTEBOOK_DIR, "bdia_vit_cifar.ipynb")
CELL_TIMEOUT_S = 600  # per cell; the whole smoke run takes about a minute on 2 idle cores


def _builder():
    spec = importlib.util.spec_from_file_location(
        "build_notebook", os.path.join(NOTEBOOK_DIR, "build_notebook.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_notebook_is_generated_and_has_no_outputs():
    with open(NOTEBOOK) as f:
        on_disk = f.read()
    assert on_disk == _builder().render(), (
        "notebooks/bdia_vit_cifar.ipynb differs from notebooks/build_notebook.py: edit the "
        "builder and run `python notebooks/build_notebook.py`.")
    notebook = nbformat.reads(on_disk, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.id


@pytest.mark.slow
def test_notebook_runs_top_to_bottom_in_smoke_mode(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("BDIA_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("BDIA_NOTEBOOK_WORKDIR", str(tmp_path / "runs"))
    # The kernel must find bdia_jax the way a user's would (a checkout's notebooks/ folder),
    # not through this test process's import path.
    monkeypatch.delenv("PYTHONPATH", raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # kernel_name="python3" resolves to this interpreter even without an installed
    # kernelspec (jupyter_client's native ipykernel kernel).
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            allow_errors=False,
                            resources={"metadata": {"path": NOTEBOOK_DIR}})
    client.execute()  # raises CellExecutionError naming the cell on any error

    outputs = "".join(
        output.get("text", "")
        for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs)
    assert "setting: smoke" in outputs
    assert "bit patterns equal: False" not in outputs and "bit patterns equal: True" in outputs
    assert "reversal error (probe gradient): 0.0" in outputs
    images = sum(1 for cell in notebook.cells if cell.cell_type == "code"
                 for output in cell.outputs if "image/png" in output.get("data", {}))
    assert images == 3, f"expected the memory, curves and γ-sweep plots, got {images} images"
    (run,) = (tmp_path / "runs").glob("notebook_smoke_*")  # one run folder, named by backend
    for name in ("metrics.jsonl", "summary.json", "curves.png", "gamma_sweep.png"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["models"]) == {"standard", "bdia"}
    assert summary["models"]["bdia"]["reversal_exact"] is True
    assert "did NOT rebuild" not in outputs
