"""docs/architecture.md's import rules, checked on every module's parsed imports (ast)."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("bdia_jax", "experiments", "benchmarks")
LIBRARY_TOP = ("bdia_jax.models", "bdia_jax.training", "bdia_jax.pretrained", "bdia_jax.testing")


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_base(node: ast.ImportFrom, package: str) -> str:
    """The absolute module of a ``from … import`` in ``package`` (relative levels resolved)."""
    base = node.module or ""
    if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    return base


def imports(name: str, source: str, is_package: bool = False) -> set[str]:
    """Every first-party module (and imported name) that module ``name`` imports, made
    absolute, function-level imports included."""
    package = name if is_package else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = import_base(node, package)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in PACKAGES}


PATHS = {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}
IMPORTS = {name: imports(name, path.read_text(), path.name == "__init__.py")
           for name, path in PATHS.items()}


def under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(rule, modules=None) -> list[str]:
    return [f"{name} imports {target}" for name, targets in (modules or IMPORTS).items()
            for target in sorted(targets) if rule(name, target)]


def is_core(name: str) -> bool:
    return under(name, "bdia_jax") and name != "bdia_jax" and not under(name, *LIBRARY_TOP)


def is_task(name: str) -> bool:
    return name.count(".") == 1 and under(name, "experiments") and not under(
        name, "experiments.common", "experiments.configs", "experiments.data")


RULES = {
    "the library never imports experiments or benchmarks": lambda n, t: (
        under(n, "bdia_jax") and under(t, "experiments", "benchmarks")),
    "experiments never import benchmarks": lambda n, t: (
        under(n, "experiments") and under(t, "benchmarks")),
    "the core never imports models, training, pretrained or testing": lambda n, t: (
        is_core(n) and under(t, *LIBRARY_TOP)),
    "models never import training, pretrained or testing": lambda n, t: (
        under(n, "bdia_jax.models") and under(t, *LIBRARY_TOP[1:])),
    "common/ imports no task, config, data module or benchmark": lambda n, t: (
        under(n, "experiments.common") and (is_task(t) or under(
            t, "experiments.configs", "experiments.data", "benchmarks"))),
    "configs/ import configs/, common/sharding and the library only": lambda n, t: (
        under(n, "experiments.configs") and under(t, "experiments", "benchmarks")
        and t not in ("experiments", "experiments.common") and not under(
            t, "experiments.configs", "experiments.common.sharding")),
    "data/ imports data/, common/sharding, common/tfds_download and the library only":
        lambda n, t: (under(n, "experiments.data") and under(t, "experiments", "benchmarks")
                      and t not in ("experiments", "experiments.common") and not under(
                          t, "experiments.data", "experiments.common.sharding",
                          "experiments.common.tfds_download")),
}


def test_every_package_is_scanned():
    assert {"bdia_jax.training", "experiments.common.trainer", "experiments.data.cifar",
            "benchmarks.registry", "benchmarks.device_check"} <= set(IMPORTS)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_import_rule(rule):
    assert not violations(RULES[rule]), f"{rule} (docs/architecture.md)"


@pytest.mark.parametrize("name, source, rule", [
    ("bdia_jax.engine", "def f():\n    from experiments.common import trainer\n",
     "the library never imports experiments or benchmarks"),
    ("bdia_jax.engine", "from .models import ReversalProbe\n",
     "the core never imports models, training, pretrained or testing"),
    ("bdia_jax.models.vit", "from bdia_jax import training\n",
     "models never import training, pretrained or testing"),
    ("experiments.common.trainer", "import experiments.vit_cifar\n",
     "common/ imports no task, config, data module or benchmark"),
    ("experiments.data.cifar", "from experiments.common import trainer\n",
     "data/ imports data/, common/sharding, common/tfds_download and the library only"),
    ("experiments.lm", "from benchmarks import registry\n",
     "experiments never import benchmarks"),
])
def test_each_rule_catches_its_violation(name, source, rule):
    """The checker itself: a planted import breaks exactly the rule it should."""
    planted = {name: imports(name, source)}
    assert violations(RULES[rule], planted), rule
    assert not violations(RULES[rule], {name: imports(name, "import jax\n")})


def drives(name: str, source: str, programs: set[str]) -> list[str]:
    """Where module ``name`` uses another program's command line or starts its module."""
    found = []
    for node in ast.walk(ast.parse(source, name)):
        if (isinstance(node, ast.Attribute) and node.attr in ("parse_args", "main")
                and isinstance(node.value, ast.Name)
                and f"benchmarks.{node.value.id}" in programs - {name}):
            found.append(f"{name} uses {node.value.id}.{node.attr}")
    for other in sorted(set(re.findall(r'"-m",\s*"(benchmarks\.\w+)"', source)) - {name}):
        found.append(f"{name} runs {other}")
    return found


PROGRAMS = {n for n in PATHS if under(n, "benchmarks") and n != "benchmarks"}


def test_no_benchmark_drives_another_program():
    """device_check calls max_batch's functions, never its command line; a benchmark's
    worker processes run its own module only."""
    assert not [p for name in PROGRAMS for p in drives(name, PATHS[name].read_text(),
                                                       PROGRAMS)]


def test_driving_another_program_is_caught():
    planted = ("from benchmarks import max_batch\n"
               "max_batch.run(max_batch.parse_args(['--small']))\n"
               "cmd = [sys.executable, \"-m\", \"benchmarks.max_batch\"]\n")
    assert drives("benchmarks.device_check", planted, PROGRAMS) == [
        "benchmarks.device_check uses max_batch.parse_args",
        "benchmarks.device_check runs benchmarks.max_batch"]


def module_level_imports(name: str, source: str, is_package: bool = False) -> set[str]:
    """The first-party modules that module ``name`` imports when it is loaded (top-level
    statements only): ``from X import Y`` counts X.Y where that is a module, else X."""
    package = name if is_package else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.parse(source, name).body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = import_base(node, package)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in PATHS else base)
    return {target for target in found if target in PATHS and target != name}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles found by a depth-first search of ``graph`` (one per back edge)."""
    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_no_module_level_import_cycle():
    """A cycle makes a module importable only after some other module (``python -m pytest
    tests/test_faults.py`` alone once failed so: checkpoint and runs imported each other)."""
    graph = {name: module_level_imports(name, path.read_text(), path.name == "__init__.py")
             for name, path in PATHS.items()}
    assert import_cycles(graph) == []


def test_an_import_cycle_is_caught():
    graph = {"experiments.common.checkpoint": {"experiments.common.runs"},
             "experiments.common.runs": {"experiments.common.checkpoint"}}
    assert import_cycles(graph) == [["experiments.common.checkpoint",
                                     "experiments.common.runs",
                                     "experiments.common.checkpoint"]]
