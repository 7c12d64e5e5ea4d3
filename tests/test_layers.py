"""The layers import one way only: engine -> coordinator -> journal (house style 1)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "journal": {"coordinator", "engine"},
    "coordinator": {"engine"},
    "engine": set(),
}


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_layer_never_imports_the_layers_above_it(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_packages(path) & FORBIDDEN[package])
        for path in sorted((ROOT / package).glob("*.py"))
        if _imported_packages(path) & FORBIDDEN[package]
    }
    assert offenders == {}


def test_the_layer_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text("from engine import Ledger\nimport coordinator._records\n")
    assert _imported_packages(module) == {"engine", "coordinator"}


def _private_imports(path: Path) -> set[str]:
    """The private modules of Tally's other packages that `path` imports (`coordinator._records`...)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = path.parent.name
    found: set[str] = set()
    for node in ast.walk(tree):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
        found.update(name for name in names
                     if "._" in name and name.split(".")[0] in FORBIDDEN and name.split(".")[0] != package)
    return found


@pytest.mark.parametrize("package", ["coordinator", "engine"])
def test_a_layer_uses_only_the_public_names_of_the_layer_below(package: str) -> None:
    offenders = {str(path.relative_to(ROOT)): sorted(_private_imports(path))
                 for path in sorted((ROOT / package).glob("*.py")) if _private_imports(path)}
    assert offenders == {}


def test_the_public_names_check_sees_a_private_import(tmp_path: Path) -> None:
    module = tmp_path / "engine" / "bad.py"
    module.parent.mkdir()
    module.write_text("from coordinator._records import decode\nimport journal._store\nfrom engine._cli import main\n")
    assert _private_imports(module) == {"coordinator._records", "journal._store"}


def _underscored_names_imported(path: Path) -> set[str]:
    """The names with a leading underscore `path` imports from a module of Tally's packages
    (`from engine._stress import _fire`): a name imported across modules is public there."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return {f"{node.module}.{alias.name}" for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
            and node.module.split(".")[0] in FORBIDDEN
            for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")
            and not (ROOT / node.module.replace(".", "/") / f"{alias.name}.py").exists()}  # (a module: `from engine import _ray`)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_name_imported_from_another_module_has_no_leading_underscore(package: str) -> None:
    """House rule 2 (ARCHITECTURE.md): a name another module imports is public in its own."""
    offenders = {str(path.relative_to(ROOT)): sorted(_underscored_names_imported(path))
                 for path in sorted((ROOT / package).glob("*.py")) if _underscored_names_imported(path)}
    assert offenders == {}


def test_the_underscore_check_sees_an_imported_private_name(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text("from engine._stress import StressConfig, _fire\nfrom engine import _ray\n")
    assert _underscored_names_imported(module) == {"engine._stress._fire"}
