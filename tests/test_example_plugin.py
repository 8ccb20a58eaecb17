"""The example third-party plugin (docs/plugins/example): found through entry points, built by the
factories the CLI uses, pip-installed into a fresh virtual environment and used through that
environment's ``saelab`` (its dataset in ``cache``, its provider and scorer in a run), and disabled
with ``-p no:NAME``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from plugin_helpers import EXAMPLE_DIR, example_project, install_example_as_dist_info

EXAMPLE_PLUGINS = {"shout": "saelab_shout.plugin", "shout-provider": "saelab_shout.provider",
                   "shout-scorer": "saelab_shout.scorer"}
"""Entry-point name -> module, as the example's pyproject declares them."""


@pytest.fixture
def example_site(tmp_path: Path) -> Path:
    """The example package plus a dist-info carrying its declared entry points, in a fresh directory."""
    return install_example_as_dist_info(tmp_path / "site")


def test_example_declares_its_plugins_in_the_saelab_group():
    entry_points = example_project()["project"]["entry-points"]["saelab"]
    assert entry_points == EXAMPLE_PLUGINS


def test_example_is_discovered_through_entry_points(example_site, saelab_subprocess):
    env = {"PYTHONPATH": str(example_site)}
    hello = saelab_subprocess(["hello", "saelab", "--loud"], env=env)
    assert hello.returncode == 0, hello.stderr
    assert hello.stdout.strip() == "HELLO, SAELAB!"

    listed = saelab_subprocess(["plugins", "--json"], env=env)
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    shout = rows["shout"]
    assert shout["module"] == "saelab_shout.plugin"
    assert (shout["distribution"], shout["version"]) == ("saelab-shout", "0.1.0")
    assert shout["hooks"] == ["register_commands", "register_datasets"]
    assert shout["registers"] == {"dataset": ["shout"], "command": ["hello"]}
    assert rows["shout-provider"]["registers"] == {"provider": ["shout"]}
    assert rows["shout-scorer"]["registers"] == {"scorer": ["contains"]}
    assert {rows[n]["distribution"] for n in EXAMPLE_PLUGINS} == {"saelab-shout"}


def test_example_classes_are_built_by_the_cli_factories(example_site, monkeypatch):
    """The dataset through ``load_dataset_source``, the provider through the run's provider factory and
    the scorer through ``make_scorers``; each does one real step."""
    monkeypatch.syspath_prepend(str(example_site))
    import asyncio

    import saelab
    from interp_helpers import make_record
    from saelab.data import load_dataset_source
    from saelab.llm import Completion
    from saelab.pipeline import make_run_provider, make_scorers
    from saelab.records import Explanation, ScoreResult

    cls = saelab.resolve("dataset", "SHOUT")
    assert saelab.resolve("dataset", "loud") is cls and saelab.resolve("dataset", "shout:hi") is cls
    assert list(load_dataset_source("shout:hi").texts())[:2] == ["HI! (1)", "HI! (2)"]
    assert next(iter(load_dataset_source("shout").texts())) == "SPARSE DICTIONARIES FIND FEATURES! (1)"

    provider = make_run_provider("shout", model="any")
    reply = asyncio.run(provider.generate([{"role": "user", "content": "cat dog cat"}]))
    assert isinstance(reply, Completion) and reply.text == "[EXPLANATION]: CAT" and reply.prompt_tokens == 3

    (scorer,) = make_scorers(["contains"])
    record = make_record()
    result = asyncio.run(scorer.score(record, Explanation(hookpoint=record.hookpoint, latent=record.latent, text="cat"),
                                      None))
    assert isinstance(result, ScoreResult)
    assert len(result.predictions) == len(record.test) + len(record.non_activating)
    assert result.metrics == {"accuracy": 1.0}  # the hand-made latent fires exactly on "cat"


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
    assert rows["shout-scorer"]["status"] == "loaded"
    assert rows["inspect"]["status"] == "loaded"


def test_example_classes_pass_the_generic_contract(example_site, monkeypatch):
    monkeypatch.syspath_prepend(str(example_site))
    import saelab
    from saelab_shout.plugin import ShoutDataset
    from saelab_shout.provider import ShoutProvider
    from saelab_shout.scorer import ContainsScorer
    from test_contracts import check_generic_contract

    for kind, cls in (("dataset", ShoutDataset), ("provider", ShoutProvider), ("scorer", ContainsScorer)):
        check_generic_contract(kind, cls)
        assert saelab.registry(kind).get(cls.name) is cls


# --------------------------------------------------------------------------------------------------
# pip install into a fresh virtual environment, then that environment's saelab


def make_venv(root: Path) -> Path:
    """A fresh venv (``--system-site-packages``) that also sees this interpreter's site-packages (saelab,
    torch...) through a ``.pth`` file; returns its python. A venv made from a venv's python gets the
    *base* interpreter's site-packages, hence the ``.pth``."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(root)],
                   check=True, capture_output=True, timeout=120)
    python = root / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    here = sysconfig.get_paths()["purelib"]
    Path(purelib, "_saelab_test_parent.pth").write_text(f"import site; site.addsitedir({here!r})\n")
    return python


def venv_saelab(python: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m saelab ARGS`` with the venv's python (the per-test results dir is inherited)."""
    return subprocess.run([str(python), "-m", "saelab", *args], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_example_pip_installed_in_a_venv_works_through_its_cli(tmp_path, results_dir):
    from fixtures.tiny_models import TINY_GPT2
    from pipeline_helpers import make_dictionary, run_args

    python = make_venv(tmp_path / "venv")
    source = tmp_path / "src"
    shutil.copytree(EXAMPLE_DIR, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                          str(source)], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    located = subprocess.run([str(python), "-c", "import saelab_shout; print(saelab_shout.__file__)"],
                             capture_output=True, text=True, check=True)
    assert located.stdout.startswith(str(tmp_path / "venv"))  # installed, not imported from the checkout

    listed = venv_saelab(python, "plugins", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert {rows[n]["distribution"] for n in EXAMPLE_PLUGINS} == {"saelab-shout"}

    store = tmp_path / "store"
    cache = venv_saelab(python, "cache", str(TINY_GPT2), "--name", "loud", "--hookpoints", "layers.0",
                        "--dataset_repo", "shout:hello world", "--n_tokens", "512", "--cache_ctx_len", "32",
                        "--store", str(store), "--verbose", "false")
    assert cache.returncode == 0, cache.stderr
    (manifest,) = list(store.rglob("manifest.json"))
    assert json.loads(manifest.read_text())["n_tokens"] >= 512

    dictionary = make_dictionary(tmp_path / "dict")
    args = run_args(dictionary, "shouted", "unused")
    del args[args.index("--explainer_api_base_url"):args.index("--explainer_api_base_url") + 2]  # no server
    args[args.index("--explainer_provider") + 1] = "shout"
    args[args.index("--scorers") + 1:args.index("--scorers") + 3] = ["contains"]
    run = venv_saelab(python, *args)
    assert run.returncode == 0, run.stdout + run.stderr
    root = results_dir / "shouted"
    explanations = sorted((root / "explanations" / "layers.0").glob("latent_*.json"))
    assert explanations
    for path in explanations:
        explanation = json.loads(path.read_text())
        assert explanation["provider"] == "shout" and explanation["text"].isupper() and explanation["text"]
        score = json.loads((root / "scores" / "contains" / "layers.0" / path.name).read_text())
        assert score["predictions"] and 0.0 <= score["metrics"]["accuracy"] <= 1.0

    for plugin, flag, fragment in (("shout-scorer", "--scorers", "contains"),
                                   ("shout-provider", "--explainer_provider", "shout")):
        disabled = venv_saelab(python, "-p", f"no:{plugin}", *args, "--name", "off")
        assert disabled.returncode == 2, disabled.stderr
        lines = [line for line in disabled.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in disabled.stderr, (flag, lines)
    hello = venv_saelab(python, "-p", "no:shout", "hello")
    assert hello.returncode == 2 and "unknown command 'hello'" in hello.stderr
    assert venv_saelab(python, "hello").stdout.strip() == "Hello, world!"
