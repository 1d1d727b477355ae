"""The package's import graph, read from the source (ast), from the entry points down: no cycle, and no
module importing a higher layer (docs/ARCHITECTURE.md draws the same layers)."""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import pytest
from helpers.paths import REPO_ROOT

from geneformer_colon.runs.config import CONF_DIR

PACKAGE = "geneformer_colon"
ENTRY_SCRIPTS = ("train.py", "eval.py", "baseline.py", "pretrain.py")
# Lowest first, one layer a folder of the package: a module imports its own layer or lower ones only.
LAYERS = {
    "common": ("", "common", "common.*"),  # with the package root, which holds nothing but its __init__
    "runs": ("runs", "runs.*"),  # a run's config and directory: no data, no model
    "data": ("data", "data.*"),
    "model": ("model", "model.*"),
    "assembly": ("assembly", "assembly.*"),
    "report": ("report", "report.*"),
    "jobs": ("jobs", "jobs.*"),
    "cli": ("__main__", "cli", "cli.*"),
}


def module_files() -> dict[str, Path]:
    return {path_module(path): path for path in (REPO_ROOT / PACKAGE).rglob("*.py")}


def with_parents(modules: set[str]) -> set[str]:
    """Importing ``a.b.c`` imports the packages ``a`` and ``a.b`` first."""
    return {".".join(module.split(".")[:end]) for module in modules for end in range(1, module.count(".") + 2)}


def imported(path: Path, modules: set[str]) -> set[str]:
    """The package's modules a file imports (anywhere in it: a lazy import inside a function counts)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in modules:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in modules)
    return found


def path_module(path: Path) -> str:
    parts = path.resolve().relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def config_targets(modules: set[str]) -> set[str]:
    """The modules Hydra configs instantiate from (``_target_: geneformer_colon.<module>.<name>``)."""
    named = {match for path in (CONF_DIR).rglob("*.yaml")
             for match in re.findall(rf"\b{PACKAGE}(?:\.\w+)+", path.read_text())}
    return {max((m for m in modules if name.startswith(m + ".")), key=len) for name in named}


def layer_of(module: str) -> int:
    name = module.removeprefix(PACKAGE).removeprefix(".")
    for rank, patterns in enumerate(LAYERS.values()):
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            return rank
    raise AssertionError(f"{module}: in no layer of tests/test_layers.py; give it one (and docs/ARCHITECTURE.md)")


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = module_files()
    return {module: imported(path, set(files)) for module, path in files.items()}


def test_every_module_is_reached_from_the_entry_points(graph):
    reached: set[str] = set()
    todo = [module for script in ENTRY_SCRIPTS for module in imported(REPO_ROOT / script, set(graph))]
    todo += [f"{PACKAGE}.cli", f"{PACKAGE}.__main__", *config_targets(set(graph))]  # the command, python -m, Hydra
    todo = list(with_parents(set(todo)))
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(with_parents(graph[module]))
    assert sorted(set(graph) - reached) == []


def test_no_module_imports_a_higher_layer(graph):
    upward = [f"{module} ({list(LAYERS)[layer_of(module)]}) imports {target} ({list(LAYERS)[layer_of(target)]})"
              for module, targets in graph.items() for target in targets if layer_of(target) > layer_of(module)]
    assert upward == []


def first_cycle(graph: dict[str, set[str]]) -> list[str]:
    """A cycle of imports (its modules, the first repeated at the end), or [] if there is none."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str]:
        if module in path:
            return [*path[path.index(module):], module]
        if module not in done:
            for target in sorted(graph[module]):
                if cycle := visit(target, [*path, module]):
                    return cycle
            done.add(module)
        return []

    return next((cycle for module in sorted(graph) if (cycle := visit(module, []))), [])


def test_the_import_graph_has_no_cycle(graph):
    assert " -> ".join(first_cycle(graph)) == ""


def test_a_cycle_and_the_layers_order_would_be_seen():
    assert first_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert first_cycle({"a": {"b"}, "b": set()}) == []
    assert layer_of(f"{PACKAGE}.common.names") < layer_of(f"{PACKAGE}.runs.layout") \
        < layer_of(f"{PACKAGE}.data.datamodule")
    assert layer_of(f"{PACKAGE}.runs.record") < layer_of(f"{PACKAGE}.model.metrics")  # scoring holds the breakdowns
    assert layer_of(f"{PACKAGE}.model.metrics") < layer_of(f"{PACKAGE}.assembly.scoring") \
        < layer_of(f"{PACKAGE}.report.compare")
    assert layer_of(f"{PACKAGE}.jobs.train") < layer_of(f"{PACKAGE}.cli.verbs")


def test_the_package_root_holds_only_folders_of_layers():
    """Every module lives in its layer's folder: at the root only the package's __init__ and __main__."""
    root = sorted(path.name for path in (REPO_ROOT / PACKAGE).glob("*.py"))
    assert root == ["__init__.py", "__main__.py"]
    folders = {path.name for path in (REPO_ROOT / PACKAGE).iterdir() if (path / "__init__.py").is_file()}
    assert folders == {patterns[-2] for patterns in LAYERS.values()}
