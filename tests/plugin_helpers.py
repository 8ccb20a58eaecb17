"""Helpers for plugin-core tests: fake distributions on ``sys.path`` carrying ``saelab`` entry points."""

from __future__ import annotations

import shutil
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_DIR = REPO_ROOT / "docs" / "plugins" / "example"
"""The example third-party plugin package."""


def write_distribution(
    site: Path,
    name: str,
    version: str,
    entry_points: Mapping[str, str],
    modules: Mapping[str, str] | None = None,
) -> Path:
    """Write ``<name>-<version>.dist-info`` (METADATA + ``[saelab]`` entry points) and modules into ``site``.

    ``modules`` maps a module file name (``"pkg_mod.py"``) to its source. Returns ``site``; put it on
    ``sys.path`` (or ``PYTHONPATH`` for a subprocess) and importlib.metadata discovers the plugins.
    """
    site.mkdir(parents=True, exist_ok=True)
    dist_info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = ["[saelab]", *(f"{ep} = {target}" for ep, target in entry_points.items())]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for filename, source in (modules or {}).items():
        path = site / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    return site


def example_project() -> dict:
    """The example plugin's ``pyproject.toml`` as a dict."""
    return tomllib.loads((EXAMPLE_DIR / "pyproject.toml").read_text())


def install_example_as_dist_info(site: Path) -> Path:
    """Copy the example package into ``site`` with a dist-info holding the entry points its pyproject declares."""
    project = example_project()["project"]
    for package in ("saelab_shout",):
        shutil.copytree(EXAMPLE_DIR / package, site / package, ignore=shutil.ignore_patterns("__pycache__"))
    return write_distribution(site, project["name"], project["version"], project["entry-points"]["saelab"])
