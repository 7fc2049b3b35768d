"""The package's layers (DESIGN.md), read from the source with `ast`: no module imports a layer
above its own or a sibling layer, no two modules import each other (directly or round a longer
loop), only entry points build `Settings()`, and only the allowed modules run as `__main__`.

Every import counts, wherever it stands: at module level, inside a function, or under
`TYPE_CHECKING`."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "clinicloop"

#: Bottom to top. Packages on one level never import each other: serving reaches rl, and rl
#: serving, over HTTP only; quant sits with them because it grades quantized models with the
#: verifier (and nothing but the CLI imports it).
LAYERS: list[set[str]] = [
    {"config", "errors"},
    {"model"},
    {"store"},
    {"backends"},
    {"verifier"},
    {"quant", "serving", "rl"},
    {"cli"},
]
LEVEL = {part: n for n, parts in enumerate(LAYERS) for part in parts}

#: Entry points: the command line, the one place that reads the settings.
SETTINGS_BUILDERS = {"clinicloop.cli"}
#: `python -m` targets: the command line, the child process that probes a GGUF load, and the
#: ranks `accelerate launch` starts for the refresh's training step.
MAIN_MODULES = {"clinicloop.cli", "clinicloop.backends.artifacts", "clinicloop.rl.train_job"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def trees() -> Iterator[tuple[str, Path, ast.Module]]:
    for name, path in MODULES.items():
        yield name, path, ast.parse(path.read_text(encoding="utf-8"), str(path))


def imports(name: str, path: Path, tree: ast.Module) -> set[str]:
    """The clinicloop modules `name` imports (a `from package import module` names the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names
                         if f"{source}.{alias.name}" in MODULES)
    return {m for m in found if m in MODULES and m != name and m != "clinicloop"}


GRAPH = {name: imports(name, path, tree) for name, path, tree in trees()}


def layer(module: str) -> str:
    return module.split(".")[1]


def test_every_package_has_a_layer():
    assert {layer(m) for m in MODULES if m != "clinicloop"} == set(LEVEL)


def test_no_import_goes_up_or_sideways():
    wrong = sorted(f"{m} -> {target}" for m, targets in GRAPH.items() if m != "clinicloop"
                   for target in targets
                   if layer(target) != layer(m) and LEVEL[layer(target)] >= LEVEL[layer(m)])
    assert wrong == []


def cycles() -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(GRAPH[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while (member := stack.pop()) != node:
                group.append(member)
            group.append(node)
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    return found


def test_no_two_modules_import_each_other():
    assert cycles() == []


def test_the_cycle_finder_finds_a_loop(monkeypatch):
    # The check above must not pass because the finder is blind.
    monkeypatch.setitem(GRAPH, "clinicloop.rl.runfiles",
                        GRAPH["clinicloop.rl.runfiles"] | {"clinicloop.rl.report"})
    assert ["clinicloop.rl.report", "clinicloop.rl.runfiles"] in cycles()


def _builds_settings(tree: ast.Module) -> bool:
    return any(isinstance(node, ast.Call) and (
        isinstance(node.func, ast.Name) and node.func.id == "Settings"
        or isinstance(node.func, ast.Attribute) and node.func.attr == "Settings")
        for node in ast.walk(tree))


def _runs_as_main(tree: ast.Module) -> bool:
    return any(isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
               and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
               for node in tree.body)


@pytest.mark.parametrize(("check", "allowed"), [(_builds_settings, SETTINGS_BUILDERS),
                                                (_runs_as_main, MAIN_MODULES)],
                         ids=["Settings()", "__main__"])
def test_only_entry_points(check, allowed):
    assert {name for name, _, tree in trees() if check(tree)} == allowed
