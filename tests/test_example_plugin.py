"""The example third-party plugin (docs/plugins/example) is found through entry points and can be disabled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from plugin_helpers import EXAMPLE_DIR, example_project, install_example_as_dist_info


@pytest.fixture
def example_site(tmp_path: Path) -> Path:
    """The example package plus a dist-info carrying its declared entry points, in a fresh directory."""
    return install_example_as_dist_info(tmp_path / "site")


def test_example_declares_its_plugin_in_the_saelab_group():
    entry_points = example_project()["project"]["entry-points"]["saelab"]
    assert entry_points == {"shout": "saelab_shout.plugin"}


def test_example_is_discovered_through_entry_points(example_site, saelab_subprocess):
    env = {"PYTHONPATH": str(example_site)}
    hello = saelab_subprocess(["hello", "saelab", "--loud"], env=env)
    assert hello.returncode == 0, hello.stderr
    assert hello.stdout.strip() == "HELLO, SAELAB!"

    listed = saelab_subprocess(["plugins", "--json", "--hook", "register_datasets"], env=env)
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    shout = rows["shout"]
    assert shout["module"] == "saelab_shout.plugin"
    assert (shout["distribution"], shout["version"]) == ("saelab-shout", "0.1.0")
    assert shout["hooks"] == ["register_commands", "register_datasets"]
    assert shout["registers"] == {"dataset": ["shout"], "command": ["hello"]}


def test_example_dataset_resolves_by_name_alias_and_accepts(example_site):
    code = (
        "import json, saelab;"
        "cls = saelab.resolve('dataset', 'SHOUT');"
        "assert saelab.resolve('dataset', 'loud') is cls and saelab.resolve('dataset', 'shout:hi') is cls;"
        "print(json.dumps(list(cls(cls.Options(text='hi', repeat=2)).texts())))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**_env(), "PYTHONPATH": str(example_site)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["HI! (1)", "HI! (2)"]


def test_example_plugin_can_be_disabled(example_site, saelab_subprocess):
    env = {"PYTHONPATH": str(example_site)}
    by_flag = saelab_subprocess(["-p", "no:shout", "hello"], env=env)
    assert by_flag.returncode == 2
    assert by_flag.stderr.count("\n") == 1 and "unknown command 'hello'" in by_flag.stderr

    by_env = saelab_subprocess(["plugins", "--all", "--json"], env={**env, "SAELAB_DISABLE_PLUGINS": "shout"})
    assert by_env.returncode == 0, by_env.stderr
    rows = {row["name"]: row for row in json.loads(by_env.stdout)}
    assert rows["shout"]["status"] == "disabled"
    assert rows["shout"]["registers"] == {}
    assert rows["inspect"]["status"] == "loaded"


@pytest.mark.slow
def test_example_pip_installs_into_a_target_dir(tmp_path, saelab_subprocess):
    target = tmp_path / "target"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(_copy_example(tmp_path / "src"))],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    hello = saelab_subprocess(["hello"], env={"PYTHONPATH": str(target)})
    assert hello.returncode == 0, hello.stderr
    assert hello.stdout.strip() == "Hello, world!"


def test_example_classes_pass_the_generic_contract(example_site, monkeypatch):
    monkeypatch.syspath_prepend(str(example_site))
    import saelab
    from saelab_shout.plugin import ShoutDataset
    from test_contracts import check_generic_contract

    check_generic_contract("dataset", ShoutDataset)
    assert saelab.registry("dataset").get("shout") is ShoutDataset


def _copy_example(dest: Path) -> Path:
    import shutil

    shutil.copytree(EXAMPLE_DIR, dest, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    return dest


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)
