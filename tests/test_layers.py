"""The package's import graph, read from the source (ast), from the entry points down: no cycle, and no
module importing a higher layer (docs/ARCHITECTURE.md draws the same layers)."""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

import pytest
from conftest import REPO_ROOT

PACKAGE = "geneformer_colon"
ENTRY_SCRIPTS = ("train.py", "eval.py", "baseline.py", "pretrain.py")
# Lowest first: a module imports its own layer or lower ones only (module names without the package's).
LAYERS = {
    "leaf": ("", "errors", "io", "names", "tables", "figures", "console", "cpus"),
    "config": ("config",),
    "rundir": ("rundir",),  # the run directory's files and records: no data, no model
    "data": ("data", "data.*"),
    "model": ("model", "model.*", "callbacks"),
    "assembly": ("scoring", "builders", "saved_classifier"),
    "report": ("report", "report.*"),
    "jobs": ("fine_tune", "masked_gene_run", "retest", "donor_cv", "sweep", "predict", "embed", "export",
             "cell_choice", "perturb", "explain", "baseline", "baseline.*", "study"),
    "entry": ("cli", "entry", "command_line", "__main__"),
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
    named = {match for path in (REPO_ROOT / "conf").rglob("*.yaml")
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
    assert layer_of(f"{PACKAGE}.names") < layer_of(f"{PACKAGE}.rundir") < layer_of(f"{PACKAGE}.data.datamodule")
    assert layer_of(f"{PACKAGE}.rundir") < layer_of(f"{PACKAGE}.model.metrics")  # scoring holds the breakdowns
    assert layer_of(f"{PACKAGE}.model.metrics") < layer_of(f"{PACKAGE}.scoring") < layer_of(f"{PACKAGE}.report.compare")
    assert layer_of(f"{PACKAGE}.fine_tune") < layer_of(f"{PACKAGE}.cli")
