"""The package's shape: what imports what, read from the source (no module is executed)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fusion_bench_moect"


def module_name(path: Path) -> str:
    """``fusion_bench_moect/io/lora.py`` -> ``fusion_bench_moect.io.lora`` (packages too)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, typing_too: bool = False) -> list[tuple[str, ast.stmt]]:
    """The absolute module names ``path`` imports, with the statement (top level or nested;
    those under ``if TYPE_CHECKING:``, which never run, only with ``typing_too``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
        for n in ast.walk(block)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in typing_only and not typing_too:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((base, node))
            # ``from . import x`` imports the submodule x.
            found += [(f"{base}.{alias.name}", node) for alias in node.names]
    return found


def test_the_package_does_not_import_the_study_or_experiments():
    for name, path in package_modules().items():
        for target, node in imports(path):
            top = target.split(".")[0]
            assert top not in ("study", "benchmarks"), f"{name}:{node.lineno} imports {target}"
            assert not target.startswith("fusion_bench_moect.experiments"), name
    assert not (PACKAGE / "experiments").exists()
    assert not (PACKAGE / "cli" / "study.py").exists()


def import_graph(typing_too: bool = False) -> dict[str, set[str]]:
    """Package module -> the package modules it imports, at the top or inside a function
    (not its own parent packages, which Python always initialises first); with
    ``typing_too`` also those imported for type hints only."""
    modules = package_modules()
    return {
        name: {
            t
            for t, _ in imports(path, typing_too)
            if t in modules and not (name + ".").startswith(t + ".")
        }
        for name, path in modules.items()
    }


def dependency_order(graph: dict[str, set[str]]) -> list[str]:
    """The modules, each after everything it imports; fails on a cycle, naming it."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", "import cycle: " + " -> ".join([*path, name])
        state[name] = "open"
        for target in sorted(graph[name]):
            visit(target, [*path, name])
        state[name] = "done"
        order.append(name)

    for name in sorted(graph):
        visit(name, [])
    return order


def test_no_import_cycle():
    """Not even through ``if TYPE_CHECKING:`` imports: a circle hidden there is still two
    modules that each need the other to be understood (``plan`` imports ``arch``; the
    families read a plan through ``arch.base.PlanLayout``)."""
    graph = import_graph(typing_too=True)
    dependency_order(graph)
    assert "fusion_bench_moect.arch" in graph["fusion_bench_moect.plan"]
    lora, sources = "fusion_bench_moect.io.lora", "fusion_bench_moect.io.sources"
    assert sources in graph[lora] and lora not in graph[sources]


@pytest.mark.cross_version  # _compat and the arch modules import differently per major
def test_every_module_imports_in_a_fresh_interpreter():
    """Dependents first, so that each import loads its own dependencies as a user's would."""
    order = dependency_order(import_graph())[::-1]
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run(
        [sys.executable, "-c", script, *order], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_only_cli_imports_cli():
    for name, path in package_modules().items():
        if name.startswith("fusion_bench_moect.cli"):
            continue
        for target, node in imports(path):
            assert not target.startswith("fusion_bench_moect.cli"), f"{name}:{node.lineno}"


def local_imports(path: Path) -> list[ast.stmt]:
    """The import statements inside functions of ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return found


def has_reason(line: str) -> bool:
    """Whether ``line`` carries a comment other than a linter's ``# noqa``."""
    return "#" in re.sub(r"#\s*noqa[\w:, ]*", "", line)


def test_function_local_imports_say_why_and_repeat_nothing():
    """A function-local import keeps a module cheap to import (or an optional extra out of
    it): a comment says so just above it, and it never repeats a top-level import."""
    for path in package_modules().values():
        relative = path.relative_to(PACKAGE).as_posix()
        lines = path.read_text().splitlines()
        tree = ast.parse(path.read_text())
        top = {t for t, node in imports(path) if node in tree.body}
        for node in local_imports(path):
            where = f"{relative}:{node.lineno}"
            line = node.lineno - 1
            if not has_reason(lines[line]):  # else the reason is on the import's own line
                line -= 1
                while lines[line].strip().startswith(("import ", "from ")):
                    line -= 1  # a block of imports shares one comment
            assert has_reason(lines[line]), f"{where}: say why this import is function-local"
            repeated = {t for t, n in imports(path) if n is node} & top
            assert not repeated, f"{where} repeats the top-level import of {sorted(repeated)}"


def cross_version_listing() -> list[str]:
    """The tests/README.md lines naming what runs under transformers 4.57 (the tests marked
    ``cross_version``: the whole module, or the named tests), from the test sources."""
    lines = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        marked = []
        for node in tree.body:
            decorators = [ast.unparse(d) for d in getattr(node, "decorator_list", [])]
            if not any("cross_version" in d for d in decorators):
                continue
            whole_test = any("cross_version" in d and "pytest.param" not in d for d in decorators)
            marked.append(f"`{node.name}`" + ("" if whole_test else " (its marked parameters)"))
        whole = any(
            isinstance(node, ast.Assign)
            and any(getattr(t, "id", None) == "pytestmark" for t in node.targets)
            and "cross_version" in ast.unparse(node.value)
            for node in tree.body
        )
        if whole:
            lines.append(f"- `{path.name}`: all")
        elif marked:
            lines.append(f"- `{path.name}`: " + ", ".join(marked))
    return lines


def test_tests_readme_lists_what_runs_under_transformers_4():
    text = (ROOT / "tests" / "README.md").read_text()
    block = text.split("<!-- BEGIN CROSS_VERSION -->\n", 1)[1].split("<!-- END", 1)[0]
    assert block.strip().splitlines() == cross_version_listing()
