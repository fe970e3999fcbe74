"""The package's shape, checked statically: imports run one way, files stay readable.

The five root folders are installed as `splice.<folder>` through pyproject's package-dir, so a
relative import that climbs out of its folder names a module that does not exist on disk (a reader
and a static tool lose the thread); imports across folders are absolute. The import graph counts
imports at any depth of a file, function bodies included: an import inside a function that closes
a circle is still a circle, only hidden.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """Top-level package name -> folder, as pyproject's package-dir maps them."""
    config = tomllib.loads((root / "pyproject.toml").read_text())
    mapping = config["tool"]["setuptools"]["package-dir"]
    tops = {name: root / path for name, path in mapping.items() if name.count(".") <= 1}
    assert tops, "pyproject's package-dir maps no package"
    return tops


def modules(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name -> (file, is a package __init__)."""
    found: dict[str, tuple[Path, bool]] = {}
    for pkg, folder in package_dirs(root).items():
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            found.setdefault(name, (f, f.name == "__init__.py"))
    return found


def folder_of(name: str, tops: dict[str, Path]) -> str:
    """The top folder a dotted name lives in: splice.ir.core -> splice.ir; splice.api -> splice."""
    parts = name.split(".")
    two = ".".join(parts[:2])
    return two if two in tops and two != "splice" else "splice"


def import_graph(root: Path = ROOT) -> tuple[nx.DiGraph, list[str]]:
    mods = modules(root)
    tops = package_dirs(root)
    graph = nx.DiGraph()
    graph.add_nodes_from(mods)
    climbs = []
    for name, (f, is_pkg) in mods.items():
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level:
                base = here[: len(here) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                if folder_of(target, tops) != folder_of(name, tops):
                    climbs.append(f"{f.relative_to(root)}:{node.lineno}")
                targets = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                # a package importing its own submodules (re-exports) is not a circle of design
                if t and t != name and not (is_pkg and t.startswith(name + ".")):
                    graph.add_edge(name, t)
    return graph, climbs


def test_no_import_cycle():
    graph, _ = import_graph()
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not cycles, "import cycles: " + "; ".join(", ".join(c) for c in cycles)


def test_no_relative_import_across_top_folders():
    _, climbs = import_graph()
    assert not climbs, "relative imports that leave their folder (use splice.x): " + ", ".join(climbs)


def test_every_module_is_readable_in_one_sitting():
    big = {str(f.relative_to(ROOT)): n for f, _ in modules().values()
           if (n := f.read_text(encoding="utf-8").count("\n")) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_the_checker_sees_a_cycle(tmp_path):
    """The graph above is not vacuous: two modules importing each other make a cycle."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from splice.b import g\n")
    (pkg / "b.py").write_text("from . import a\n")
    (tmp_path / "pyproject.toml").write_text('[tool.setuptools.package-dir]\n"splice" = "pkg"\n')
    graph, _ = import_graph(tmp_path)
    assert graph.has_edge("splice.a", "splice.b") and graph.has_edge("splice.b", "splice.a")


def test_every_package_folder_is_listed_for_installation():
    """A folder with an __init__.py that pyproject's `packages` leaves out is missing from a
    non-editable install (the editable one finds it anyway, so nothing else would notice)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    found = {name for name, (_, is_pkg) in modules().items() if is_pkg}
    assert found <= listed, f"packages missing from pyproject's list: {sorted(found - listed)}"


@pytest.mark.parametrize("pkg", ["splice", "splice.ir", "splice.passes", "splice.backends", "splice.runtime"])
def test_packages_installed_from_their_folders(pkg):
    """Every package pyproject lists imports, from the folder package-dir maps it to."""
    import importlib

    module = importlib.import_module(pkg)
    assert Path(module.__file__).resolve().parent == package_dirs()[pkg].resolve()
