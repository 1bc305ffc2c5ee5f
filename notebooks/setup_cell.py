"""The first code cell of every notebook: install on Colab, or use this checkout.

Both builders (``build_notebook.py``, ``build_finetune_notebook.py``) render it, each with the
repository modules it imports and the extra packages it needs on Colab; the cell itself must
stand alone (it runs before the repository is importable).
"""

from __future__ import annotations

_TEMPLATE = '''
# Install (Colab) or use this checkout. On a plain machine nothing is installed.
import importlib.util
import os
import shutil
import subprocess
import sys

# Colab: the git URL of this repository. <-- EDIT THIS on Colab if it is still the placeholder.
REPO_URL = "https://github.com/YOUR-ORG/bdia_jax.git"
COLAB_CHECKOUT = "/content/bdia_jax"
IN_COLAB = "google.colab" in sys.modules
MODULES = {modules!r}  # this notebook's imports from the repository


def _importable() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in MODULES)


def _find_checkout() -> str | None:
    """The repository root: this folder, its parent (notebooks/), or the Colab clone."""
    for folder in (os.getcwd(), os.path.dirname(os.getcwd()), COLAB_CHECKOUT):
        if all(os.path.isfile(os.path.join(folder, name, "__init__.py")) for name in MODULES):
            return os.path.abspath(folder)
    return None


def _colab_install(root: str) -> None:
    """pip install requirements.txt; jax only if the runtime's own jax is outside the pin."""
    from importlib import metadata

    from packaging.specifiers import SpecifierSet

    with open(os.path.join(root, "requirements.txt")) as f:
        lines = [line.split("#")[0].strip() for line in f]
    # Colab's preinstalled jax is built for the runtime's chip: keep it when it fits the pin.
    # tensorflow-cpu: Colab's own tensorflow prepares TFDS datasets. The others: test tools.
    jax_pin = SpecifierSet(next(line for line in lines if line.startswith("jax[")).split("]")[1])
    skip = ("jax[", "tensorflow-cpu", "pytest", "hypothesis", "nbclient", "nbformat", "ipykernel")
    packages = [line for line in lines if line and not line.startswith(skip)]
    packages += {extra_packages!r}  # this notebook's own
    try:
        jax_ok = metadata.version("jax") in jax_pin
    except metadata.PackageNotFoundError:
        jax_ok = False
    if not jax_ok:
        if os.environ.get("COLAB_TPU_ADDR"):
            raise RuntimeError("This is the legacy Colab TPU (TPU Node) runtime, which current "
                               "jax does not support: choose a TPU v2-8/v5e runtime instead.")
        # TPU VMs expose /dev/accel* (v2-v4) or /dev/vfio/* (v5e and later).
        tpu = os.path.exists("/dev/accel0") or os.path.isdir("/dev/vfio") or \\
            bool(os.environ.get("TPU_ACCELERATOR_TYPE"))
        chip = "cuda12" if shutil.which("nvidia-smi") else ("tpu" if tpu else "cpu")
        packages.append(f"jax[{{chip}}]{{jax_pin}}")
        if "jax" in sys.modules:
            print("jax was imported before this install: Runtime > Restart session, then run "
                  "this notebook again.")
    filtered = os.path.join(root, "requirements-colab.txt")  # "-e ." is relative to root
    with open(filtered, "w") as f:
        f.write("\\n".join(packages) + "\\n")
    print("Colab: pip install " + " ".join(packages))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", filtered], check=True,
                   cwd=root)


if not _importable():
    root = _find_checkout()
    if root is None and IN_COLAB:
        if "YOUR-ORG" in REPO_URL:
            raise RuntimeError(
                "Set REPO_URL in this cell to the git URL of the bdia_jax repository (or upload "
                f"the repository to {{COLAB_CHECKOUT}}), then run the cell again.")
        subprocess.run(["git", "clone", "--depth=1", REPO_URL, COLAB_CHECKOUT], check=True)
        root = COLAB_CHECKOUT
    if root is None:
        raise RuntimeError(
            f"{{'/'.join(MODULES)}} not importable and no checkout was found here or in the "
            "parent folder: open this notebook from the repository's notebooks/ folder, or add "
            "the repository root to PYTHONPATH.")
    sys.path.insert(0, root)
# The folder that holds bdia_jax/ (and requirements.txt).
REPO_ROOT = os.path.dirname(os.path.dirname(importlib.util.find_spec("bdia_jax").origin))
if IN_COLAB and not os.path.exists("/content/.bdia_jax_installed"):
    _colab_install(REPO_ROOT)
    open("/content/.bdia_jax_installed", "w").close()
print(f"repository: {{REPO_ROOT}}; Colab: {{IN_COLAB}}")
'''


def setup_cell(*, modules: tuple[str, ...], extra_packages: tuple[str, ...] = ()) -> str:
    """The cell's source; ``modules``: the top-level packages it needs importable (the first
    is bdia_jax), ``extra_packages``: pip requirements added on Colab."""
    return _TEMPLATE.format(modules=tuple(modules), extra_packages=list(extra_packages)).strip("\n")
