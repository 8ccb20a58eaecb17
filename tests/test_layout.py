"""The layout promise, checked on the modules' syntax trees: the core never imports a plugin and defines no
class that is registered under a name users select; every builtin plugin lives in a per-kind subpackage."""

from __future__ import annotations

import ast
import importlib.metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "core"
PLUGINS = ROOT / "plugins"


def _builtin_entry_points() -> dict[str, str]:
    """``{name: module}`` of the saelab distribution's own entry points."""
    return {ep.name: ep.value for ep in importlib.metadata.distribution("saelab").entry_points if ep.group == "saelab"}


def _modules(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def _imported_modules(tree: ast.AST, package: str) -> list[str]:
    """Absolute names of every module ``tree`` imports (relative imports resolved against ``package``)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.append(module)
            names += [f"{module}.{alias.name}" for alias in node.names]
    return names


def _string_constants(tree: ast.AST) -> list[str]:
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)]


@pytest.mark.parametrize("path", _modules(CORE), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_module_never_imports_a_plugin(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    package = "saelab" if path.parent == CORE else "saelab." + ".".join(path.parent.relative_to(CORE).parts)
    imports = [name for name in _imported_modules(tree, package) if name.startswith("saelab.plugins")]
    dynamic = [text for text in _string_constants(tree) if text.startswith("saelab.plugins")]
    assert not imports, f"{path.relative_to(ROOT)} imports {imports}"
    assert not dynamic, f"{path.relative_to(ROOT)} names plugin modules {dynamic} (importlib / entry points)"


@pytest.mark.parametrize("path", _modules(CORE), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_defines_no_selectable_plugin_class(path: Path):
    """A class with a literal ``name = "..."`` is what ``register(cls)`` keys on: such classes live in plugins."""
    tree = ast.parse(path.read_text(), filename=str(path))
    named = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if (
                isinstance(stmt, ast.AnnAssign) and stmt.value is not None) else []
            value = stmt.value if isinstance(stmt, (ast.Assign, ast.AnnAssign)) else None
            literal = (isinstance(value, ast.Constant) and isinstance(value.value, str)) or (
                isinstance(value, ast.Tuple) and bool(value.elts))
            if literal and any(isinstance(t, ast.Name) and t.id in ("name", "aliases") for t in targets):
                named.append(node.name)
    assert not named, f"{path.relative_to(ROOT)} defines registrable classes {named}: move them into a plugin"


def test_builtin_plugins_live_in_per_kind_subpackages():
    entry_points = _builtin_entry_points()
    flat = {name: target for name, target in entry_points.items() if target.count(".") < 3}
    assert not flat, f"entry points outside plugins/<kind>/: {flat}"
    loose = [p.name for p in PLUGINS.glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"plugin modules at the top of plugins/: {loose}"


def test_plugins_import_only_the_public_api_of_the_core():
    """Plugins reach the core through ``saelab`` modules and other plugins only through their own kind's
    private shared modules (``plugins/<kind>/_name.py``), never through a sibling plugin's entry-point module."""
    entry_modules = set(_builtin_entry_points().values())
    offenders = []
    for path in _modules(PLUGINS):
        package = "saelab.plugins." + ".".join(path.parent.relative_to(PLUGINS).parts)
        own = package.rstrip(".") + "." + path.stem
        tree = ast.parse(path.read_text(), filename=str(path))
        for name in _imported_modules(tree, package.rstrip(".")):
            if name in entry_modules and name != own:
                offenders.append(f"{path.relative_to(ROOT)} imports plugin module {name}")
    assert not offenders, "; ".join(offenders)
