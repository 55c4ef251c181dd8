"""The house rules a newcomer relies on: no import cycles among treeopt's modules, pure
library modules (no argparse, no printing), nothing outside the repository named, and
outputs that never land in tracked files."""
import ast
import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PKG = REPO / "treeopt"


def imports_of(path: pathlib.Path) -> set[str]:
    """treeopt modules a file imports at any level (relative imports resolved)."""
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    pkg = name.rsplit(".", 1)[0] if path.name != "__init__.py" else name.removesuffix(".__init__")
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
            mod = ".".join(base + ([node.module] if node.module else []))
            out |= {f"{mod}.{a.name}" for a in node.names} if node.module is None else {mod}
    return out


def test_no_import_cycles():
    files = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for p in PKG.rglob("*.py")}
    graph = {m: {d for d in imports_of(p) if d in files and d != m} for m, p in files.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in graph[m]:
            assert state.get(d) != 1, f"import cycle: {' -> '.join(path + [d])}"
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_library_modules_are_pure():
    for p in PKG.rglob("*.py"):
        if p.name == "cli.py" or p.parent.name == "verbs":
            continue
        text = p.read_text()
        assert "import argparse" not in text, p.name
        assert "print(" not in text, p.name


def test_nothing_names_the_outside():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True,
                             text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    outside = "../" + "shared"
    for name in tracked:
        p = REPO / name
        if p.is_file() and p.suffix in {".py", ".md", ".json", ".toml", ".txt", ".html", ""}:
            assert outside not in p.read_text(errors="ignore"), name


def test_default_outputs_go_to_treeopt_home():
    from treeopt import paths

    home = pathlib.Path(os.environ["TREEOPT_HOME"])
    assert paths.home() == home and paths.user_profiles() == home / "profiles"
    assert not str(home.resolve()).startswith(str(REPO))
    # artefact names are built from sanitised parts only
    assert "/" not in paths.tree_name("../../../../tmp/x", "a/../b", "float32")
    assert ".." not in paths.tree_name("../../../../tmp/x", "a/../b", "float32")


def test_the_search_is_a_package_read_top_down():
    """One concern a module, none over ~400 lines, and within each module a function calls
    only what is defined above it (a reader never scrolls up to follow a call)."""
    for p in sorted((PKG / "search").glob("*.py")):
        tree = ast.parse(p.read_text())
        assert len(p.read_text().splitlines()) <= 400, p.name
        defined: dict[str, int] = {}
        for i, node in enumerate(tree.body):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined[node.name] = i
        for i, node in enumerate(tree.body):
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                continue
            for call in ast.walk(node):
                if isinstance(call, ast.Call) and isinstance(call.func, ast.Name):
                    j = defined.get(call.func.id)
                    assert j is None or j <= i, f"{p.name}: {node.name} calls {call.func.id} " \
                        "defined below it"
