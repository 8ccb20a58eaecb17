"""Every Python example in docs/ runs (extracted from the Markdown at test time), and the hook examples
of docs/plugins/hooks.md run through the real pipeline: registered in code, then used by the same
commands and factories a user's ``saelab`` call goes through."""

from __future__ import annotations

import json
import linecache
import re
import sys
import textwrap
import types
from pathlib import Path

import pytest
import saelab
import torch
from fixtures.tiny_models import TINY_GPT2
from llm_server import ScriptedLLMServer
from pipeline_helpers import API_KEY, SmartHandler, run_args
from saelab.activation_cache import ActivationCache
from saelab.dictionary import build_dictionary, load_dictionary, save_dictionary
from saelab.models import load_activation_source

DOCS = Path(__file__).resolve().parent.parent / "docs"
HOOKS_MD = DOCS / "plugins" / "hooks.md"
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """``(line number, dedented source)`` of each ```python block of a Markdown file, in order."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, textwrap.dedent(m.group("body"))) for m in FENCE.finditer(text)]


def exec_markdown(path: Path, module_name: str) -> types.ModuleType:
    """Run a Markdown file's Python blocks in order as one fresh module (as a reader pasting them would).

    Each block keeps its line numbers in the Markdown file (tracebacks point into the docs), and the
    source is put in ``linecache`` so that ``inspect.getsource`` works on the classes: pydantic reads
    option fields' docstrings from there."""
    lines = [""] * (path.read_text(encoding="utf-8").count("\n") + 1)
    for line, source in python_blocks(path):
        for offset, code in enumerate(source.splitlines()):
            lines[line + offset] = code
    source = "\n".join(lines) + "\n"
    filename = f"{path}::python"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    module = types.ModuleType(module_name)
    module.__file__ = filename
    sys.modules[module_name] = module
    exec(compile(source, filename, "exec"), module.__dict__)  # noqa: S102 - our own docs
    return module


DOC_FILES = sorted(p for p in DOCS.rglob("*.md") if python_blocks(p))


def test_the_docs_have_python_examples():
    names = {p.relative_to(DOCS).as_posix() for p in DOC_FILES}
    assert {"plugins/hooks.md", "plugins/guide.md"} <= names
    assert len(python_blocks(HOOKS_MD)) >= 12


@pytest.mark.parametrize("path", DOC_FILES, ids=[p.relative_to(DOCS).as_posix() for p in DOC_FILES])
def test_every_python_example_runs(path: Path):
    exec_markdown(path, f"docs_{path.stem}")


# --------------------------------------------------------------------------------------------------
# hooks.md through the real pipeline


@pytest.fixture
def hooks_plugin() -> types.ModuleType:
    """hooks.md's examples as one plugin module, registered in code (undone after the test)."""
    module = exec_markdown(HOOKS_MD, "docs_hooks")
    saelab.register_plugin(module, name="docs-hooks")
    return module


def test_hooks_examples_register_as_one_plugin(hooks_plugin, cli):
    r = cli("plugins", "--json")
    assert r.exit_code == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["docs-hooks"]["registers"] == {
        "architecture": ["tied-relu"], "dictionary_format": ["npz"], "activation_source": ["mamba"],
        "dataset": ["shout"], "sampler": ["tail"], "non_activating_source": ["first"],
        "neighbour_finder": ["index-distance"], "explainer": ["one-word"], "scorer": ["overlap"],
        "provider": ["echo"], "command": ["hello"]}
    assert saelab.resolve("activation_source", "state-spaces/mamba-130m") is hooks_plugin.MambaSource


def test_command_example_runs_through_the_cli(hooks_plugin, cli):
    r = cli("hello", "saelab")
    assert (r.exit_code, r.stdout) == (0, "Hello, saelab!\n")


def test_dataset_example_feeds_saelab_cache(hooks_plugin, cli, tmp_path):
    store = tmp_path / "store"
    r = cli("cache", str(TINY_GPT2), "--name", "shouted", "--hookpoints", "layers.0", "--dataset_repo", "shout",
            "--n_tokens", "512", "--cache_ctx_len", "32", "--store", str(store), "--verbose", "false")
    assert r.exit_code == 0, r.output
    (manifest,) = list(store.rglob("manifest.json"))
    cache = ActivationCache.open(manifest.parent)
    assert cache.manifest["n_tokens"] >= 512
    text = load_activation_source(str(TINY_GPT2)).tokenizer.decode(cache.tokens()[0].tolist())
    assert "HELLO WORLD!" in text


def test_architecture_and_format_examples_train_load_and_evaluate(hooks_plugin, cli, results_dir, tmp_path):
    r = cli("train", str(TINY_GPT2), "--name", "tied", "--architecture", "tied-relu", "-o", "d_sae", "64",
            "--hookpoints", "layers.0", "--dataset_repo", "news-sample", "--n_tokens", "4096",
            "--cache_ctx_len", "64", "--train_batch_size", "64", "--max_steps", "40", "--log_every", "5",
            "--on_the_fly", "--verbose", "false")
    assert r.exit_code == 0, r.output
    out = results_dir / "tied" / "dictionaries" / "layers.0"
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses[-1] < losses[0]
    trained = load_dictionary(out)
    assert isinstance(trained, hooks_plugin.TiedReLU)
    assert not torch.equal(trained.input_scale, torch.ones_like(trained.input_scale))  # scales were folded
    x = torch.randn(5, 1, 64)
    # the format example round-trips it, and is found by detection
    save_dictionary(trained, tmp_path / "npz", format="npz")
    again = load_dictionary(tmp_path / "npz")
    assert torch.equal(again.encode(x), trained.encode(x)) and torch.equal(again(x).reconstruction, trained(x).reconstruction)

    r = cli("evaluate", str(tmp_path / "npz"), "--model", str(TINY_GPT2), "--dataset_repo", "news-sample",
            "--n_tokens", "512", "--ctx_len", "64", "--json")
    assert r.exit_code == 0, r.output
    (payload,) = json.loads(r.stdout).values()
    assert payload["format"] == "npz" and 0 <= payload["metrics"]["fvu"] < 10, payload["metrics"]
    assert (tmp_path / "npz" / "eval.json").is_file()


def tied_dictionary(path: Path, seed: int = 0) -> Path:
    """A random ``tied-relu`` dictionary (the architecture example) on the tiny GPT-2's layers.0, saved."""
    torch.manual_seed(seed)
    module = build_dictionary("tied-relu", {"inputs": ["layers.0"], "outputs": ["layers.0"], "d_in": 64, "d_out": 64},
                              {"d_sae": 16})
    with torch.no_grad():
        module.W.normal_(0, 0.2)
    save_dictionary(module, path)
    return path


def without(args: list[str], *flags: str) -> list[str]:
    """``args`` without each ``--flag VALUE`` pair of ``flags``."""
    out = list(args)
    for flag in flags:
        i = out.index(flag)
        del out[i:i + 2]
    return out


def _records(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / "records" / "layers.0").glob("latent_*.json"))]


def test_scorer_sampler_and_source_examples_in_a_run(hooks_plugin, cli, results_dir, tmp_path):
    """``saelab run`` with the local test LLM server explaining, the example scorer next to a builtin one,
    the example sampler for train and test examples and the example non-activating source."""
    d = tied_dictionary(tmp_path / "dict")
    with ScriptedLLMServer(SmartHandler(explanation="the")) as server:
        args = run_args(d, "docs", server.base_url, "--train_type", "tail", "--test_type", "tail",
                        "--non_activating_source", "first")
        args[args.index("--scorers") + 1:args.index("--scorers") + 3] = ["overlap", "detection"]
        r = cli(*args, env={"OPENAI_API_KEY": API_KEY})
        assert r.exit_code == 0, r.output
    root = results_dir / "docs"
    records = _records(root)
    assert records
    for record in records:
        assert {e["source"] for e in record["train"] + record["test"]} == {"tail"}
        assert {e["source"] for e in record["non_activating"]} == {"first"}
        strongest = max(max(e["activations"]) for e in record["train"] + record["test"])
        assert strongest > 0
        score = json.loads((root / "scores" / "overlap" / "layers.0" / f"latent_{record['latent']}.json").read_text())
        assert len(score["predictions"]) == len(record["test"]) + len(record["non_activating"])
        assert 0.0 <= score["metrics"]["accuracy"] <= 1.0
        assert (root / "scores" / "detection" / "layers.0" / f"latent_{record['latent']}.json").is_file()
    rows = {row["name"] for row in json.loads((root / "summary.json").read_text())["rows"]}
    assert {"overlap", "detection"} <= rows


def test_provider_explainer_and_neighbour_examples_in_a_run(hooks_plugin, cli, results_dir, tmp_path):
    """``saelab run`` with the example provider (--explainer_provider echo: no server at all), the example
    explainer, and the example neighbour finder behind the builtin ``neighbours`` source."""
    d = tied_dictionary(tmp_path / "dict")
    args = without(run_args(d, "echo", "unused", "--explainer", "one-word", "--non_activating_source",
                            "neighbours", "--neighbours_type", "index-distance"),
                   "--explainer_api_base_url", "--explainer_model")  # echo takes neither
    args[args.index("--explainer_provider") + 1] = "echo"
    args[args.index("--scorers") + 1:args.index("--scorers") + 3] = ["overlap"]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    root = results_dir / "echo"
    records = _records(root)
    assert records
    for record in records:
        latent = record["latent"]
        assert [n["latent"] for n in record["neighbours"]] == [(latent + d) % 16 for d in range(1, 11)]
        assert {n["kind"] for n in record["neighbours"]} <= {"index-distance"}
        explanation = json.loads((root / "explanations" / "layers.0" / f"latent_{latent}.json").read_text())
        assert (explanation["explainer"], explanation["provider"], explanation["model"]) == ("one-word", "echo", "echo")
        shown = "".join(record["train"][0]["token_strs"])
        assert explanation["text"] == shown.split()[-1] and explanation["usage"]["prompt_tokens"] > 0
        assert (root / "scores" / "overlap" / "layers.0" / f"latent_{latent}.json").is_file()
