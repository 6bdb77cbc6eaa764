"""The package's shape: what imports what, read from the source (no module is executed)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fusion_bench_moect"


def module_name(path: Path) -> str:
    """``fusion_bench_moect/io/lora.py`` -> ``fusion_bench_moect.io.lora`` (packages too)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, ast.stmt]]:
    """The absolute module names ``path`` imports, with the statement (top level or nested)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
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
