"""Dataset plugins, split expressions, tokenisation into windows, and the shared CLI options."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
import saelab
import torch
from fixtures.tiny_models import TINY_GPT2
from saelab import UsageError
from saelab.data import DatasetOptions, WindowSpec, iter_windows, load_dataset_source, n_windows_for


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY_GPT2))


@pytest.fixture
def data_dir(tmp_path):
    """Small local files in every supported format, with a text and a non-text column."""
    rows = [{"text": f"document number {i} says {'hello ' * (i + 1)}", "n": i} for i in range(10)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.txt").write_text("\n".join(r["text"] for r in rows) + "\n\n")
    import pandas as pd

    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    repo = tmp_path / "repo" / "data"
    repo.mkdir(parents=True)
    (repo / "train.jsonl").write_text("".join(json.dumps({"body": r["text"]}) + "\n" for r in rows))
    (repo / "test.jsonl").write_text(json.dumps({"body": "the test split"}) + "\n")
    return tmp_path, [r["text"] for r in rows]


def test_wikipedia_sample_is_parsed_articles_with_split_slicing():
    full = list(load_dataset_source("wikipedia-sample").texts())
    assert len(full) == 106
    assert not any(t.lower().startswith("#redirect") for t in full)
    assert all("[[" not in t and "{{" not in t for t in full)  # wiki markup removed
    tenth = list(load_dataset_source("Wikipedia-Sample", split="train[:10%]").texts())
    assert tenth == full[: len(tenth)] and 0 < len(tenth) < 20
    assert list(load_dataset_source("wikipedia-sample", split="train[100:]").texts()) == full[100:]


def test_news_sample_is_one_article_per_line():
    from gensim.test.utils import datapath

    lines = [line.strip() for line in Path(datapath("lee_background.cor")).read_text().splitlines() if line.strip()]
    ds = load_dataset_source("news-sample", split="train[10:20]+train[-2:]")
    assert list(ds.texts()) == lines[10:20] + lines[-2:]
    assert len(list(load_dataset_source("news-sample").texts())) == 300


def test_identity_changes_with_split_and_content(data_dir):
    tmp, _ = data_dir
    a = load_dataset_source("news-sample").identity()
    b = load_dataset_source("news-sample", split="train[:5]").identity()
    assert a != b and a["sha256"] == b["sha256"]
    first = load_dataset_source(str(tmp / "d.jsonl")).identity()
    (tmp / "d.jsonl").write_text(json.dumps({"text": "changed"}) + "\n")
    assert load_dataset_source(str(tmp / "d.jsonl")).identity()["sha256"] != first["sha256"]


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet", "txt"])
def test_local_files_with_split_expressions(data_dir, suffix):
    tmp, texts = data_dir
    ds = load_dataset_source(str(tmp / f"d.{suffix}"), split="train[:50%]")
    assert type(ds).name == "local-files"
    assert [t.strip() for t in ds.texts()] == [t.strip() for t in texts[:5]]


def test_local_dataset_repository_and_streaming(data_dir):
    tmp, texts = data_dir
    repo = str(tmp / "repo")
    assert saelab.resolve("dataset", repo).name == "huggingface"
    ds = load_dataset_source(repo, split="train[2:4]", column="body")
    assert list(ds.texts()) == texts[2:4]
    assert list(load_dataset_source(repo, split="test", column="body").texts()) == ["the test split"]
    streamed = load_dataset_source(repo, split="train[2:4]", column="body", streaming=True)
    assert list(streamed.texts()) == texts[2:4]
    assert ds.identity()["sha256"] and ds.identity()["split"] == "train[2:4]"


def test_resolution_of_names_paths_and_hub_ids(tmp_path):
    assert saelab.resolve("dataset", "EleutherAI/SmolLM2-135M-10B").name == "huggingface"
    assert saelab.resolve("dataset", "NEWS-SAMPLE").name == "news-sample"
    assert saelab.resolve("dataset", str(tmp_path / "x.parquet")).name == "local-files"


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"repo": "d.jsonl", "column": "body"}, ["'body'", "columns: text, n"]),
        ({"repo": "d.jsonl", "column": "n"}, ["'n'", "int"]),
        ({"repo": "missing.csv"}, ["missing.csv", "does not exist"]),
        ({"repo": "d.jsonl", "split": "train[:x]"}, ["train[:x]"]),
        ({"repo": "news-sample", "column": "body"}, ["'body'", "columns: text"]),
        ({"repo": "news-sample", "name": "en"}, ["no configurations"]),
        ({"repo": "news-sample", "split": "validation"}, ["'validation'", "train"]),
        ({"repo": "some-org/not-cached-dataset"}, ["some-org/not-cached-dataset"]),
        ({"repo": "./not/a/path/"}, ["./not/a/path/", "known datasets"]),
        ({"repo": "repo", "split": "train[-5:]", "streaming": True, "column": "body"}, ["cannot be streamed"]),
    ],
)
def test_bad_dataset_inputs_are_one_line_errors(data_dir, monkeypatch, kwargs, fragments):
    tmp, _ = data_dir
    monkeypatch.chdir(tmp)
    kwargs = dict(kwargs)
    repo = kwargs.pop("repo")
    with pytest.raises(UsageError) as info:
        list(load_dataset_source(repo, **kwargs).texts())
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


# ------------------------------------------------------------------------------------------ windows


def test_windows_start_with_bos_and_follow_the_eos_joined_stream(tokenizer):
    docs = list(load_dataset_source("news-sample", split="train[:20]").texts())
    spec = WindowSpec.for_tokenizer(tokenizer, 16)
    windows = list(iter_windows(docs, tokenizer, spec, doc_batch=3))
    stream = []
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert len(windows) == len(stream) // 15
    assert all(w.shape == (16,) and w[0] == tokenizer.bos_token_id for w in windows)
    assert torch.cat([w[1:] for w in windows]).tolist() == stream[: 15 * len(windows)]
    resumed = list(iter_windows(docs, tokenizer, spec, skip_windows=5, max_windows=4))
    assert [w.tolist() for w in resumed] == [w.tolist() for w in windows[5:9]]
    assert n_windows_for(1000, 16) == 63 and n_windows_for(1008, 16) == 63


def test_windows_without_bos_are_plain_chunks(tokenizer):
    class NoBos:
        bos_token_id = None
        eos_token_id = None

        def __call__(self, docs, **kw):
            return {"input_ids": [[ord(c) for c in d] for d in docs]}

    spec = WindowSpec.for_tokenizer(NoBos(), 4)
    windows = [w.tolist() for w in iter_windows(["abcdef", "ghij"], NoBos(), spec)]
    assert windows == [[97, 98, 99, 100], [101, 102, 103, 104]]
    with pytest.raises(UsageError, match="cache_ctx_len"):
        WindowSpec.for_tokenizer(NoBos(), 1)


# ------------------------------------------------------------------------------------------ CLI options


def _probe_command():
    from saelab.cli_options import (
        cache_options,
        dataset_options,
        hookpoints_option,
        model_argument,
        name_option,
        overwrite_option,
        resolve_params,
    )

    seen = {}

    @click.command()
    @model_argument()
    @hookpoints_option()
    @dataset_options()
    @cache_options()
    @name_option()
    @overwrite_option()
    @click.pass_context
    def probe(ctx, **params):
        seen.update(resolve_params(ctx, params))

    return probe, seen


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["smollm2"], {"dataset_repo": "wikipedia-sample", "n_tokens": 200000, "dataset_split": "train"}),
        (["smollm2", "--n_tokens", "5000", "--dataset_split", "train[:3]"],
         {"dataset_repo": "wikipedia-sample", "n_tokens": 5000, "dataset_split": "train[:3]"}),
        (["gpt2"], {"dataset_repo": "EleutherAI/SmolLM2-135M-10B", "n_tokens": 10_000_000,
                    "dataset_split": "train[:1%]", "batch_size": 32, "cache_ctx_len": 256, "filter_bos": False}),
        (["--model", "smollm2", "--dataset_repo", "x.jsonl"], {"model": "smollm2", "dataset_repo": "x.jsonl",
                                                               "dataset_split": "train"}),
        (["gpt2", "--dataset_repo", "x.jsonl", "--dataset_split", "train[:1%]"], {"dataset_split": "train[:1%]"}),
        (["gpt2", "--dataset_repo", "org/hub-dataset"], {"dataset_split": "train[:1%]"}),
        (["m", "--hookpoints", "layers.1", "layers.2", "--filter_bos", "--overwrite", "cache", "scores"],
         {"hookpoints": ["layers.1", "layers.2"], "filter_bos": True, "overwrite": ["cache", "scores"]}),
        ([], {"model": "meta-llama/Meta-Llama-3-8B"}),
    ],
)
def test_shared_options_defaults_and_embedded_rule(args, expected):
    probe, seen = _probe_command()
    probe.main([*args, "--name", "n"], standalone_mode=False)
    for key, value in expected.items():
        assert seen[key] == value, key


def test_cache_help_mentions_the_embedded_defaults(cli):
    result = cli("cache", "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "smollm2" in text and "wikipedia-sample" in text and "200000" in text
    for option in ("--dataset_repo", "--dataset_split", "--dataset_name", "--dataset_column", "--n_tokens",
                   "--batch_size", "--cache_ctx_len", "--filter_bos", "--name", "--overwrite", "--hf_token"):
        assert option in text


def _rows_file(path: Path, n_rows: int = 300) -> Path:
    path.write_text("".join(json.dumps({"text": f"row {i} of the local file says something new"}) + "\n"
                            for i in range(n_rows)))
    return path


@pytest.mark.parametrize("where", ["file", "directory"])
def test_cli_reads_a_local_dataset_whole_by_default(cli, results_dir, tmp_path, where):
    """``--dataset_repo my.jsonl`` without --dataset_split reads all 300 rows, not train[:1%] (3 rows)."""
    if where == "file":
        repo = _rows_file(tmp_path / "my.jsonl")
    else:
        (tmp_path / "mydata").mkdir()
        _rows_file(tmp_path / "mydata" / "train.jsonl")
        repo = tmp_path / "mydata"
    args = ["cache", str(TINY_GPT2), "--hookpoints", "layers.0", "--dataset_repo", str(repo), "--n_tokens", "2000",
            "--cache_ctx_len", "16", "--verbose", "false"]
    result = cli(*args, "--name", "whole")
    assert result.exit_code == 0, result.output
    assert "ran out" not in result.output
    assert json.loads((results_dir / "whole" / "run_config.json").read_text())["config"]["dataset_split"] == "train"
    given = cli(*args, "--name", "given", "--dataset_split", "train[:1%]")
    assert given.exit_code == 0 and "ran out" in given.stderr  # an explicit split is kept


def test_a_split_from_a_config_file_is_kept_for_local_data(tmp_path):
    from saelab.cli_options import dataset_options, resolve_params

    config = tmp_path / "c.yaml"
    config.write_text("dataset_split: train[:5]\ndataset_repo: x.jsonl\n")

    @click.command()
    @click.option("--config", default=None)
    @dataset_options()
    @click.pass_context
    def probe(ctx, **params):
        seen.update(resolve_params(ctx, params))

    seen: dict = {}
    probe.main(["--config", str(config)], standalone_mode=False)
    assert seen["dataset_split"] == "train[:5]"


# ------------------------------------------------------------------- defaults declared by plugins


class _WholeDataset(saelab.Dataset):
    """Third-party data that is read whole by default (``whole:<n>``: n documents)."""

    name = "whole-data"

    @classmethod
    def accepts(cls, repo: str) -> bool:
        return repo.startswith("whole:")

    @classmethod
    def reads_whole(cls, repo: str) -> bool:
        return True

    def texts(self):
        yield from (f"document {i}" for i in range(int(self.repo.split(":")[1])))

    def identity(self):
        return {"repo": self.repo, "split": self.options.split}




class _FakeSource(saelab.ActivationSource):
    """A third-party model that brings its own CLI defaults; never loaded here."""

    name = "fake-lm"
    default_values = {"n_tokens": 1234, "dataset_repo": "whole:7", "cache_ctx_len": 8}

    @classmethod
    def accepts(cls, model: str) -> bool:
        return model.startswith("fake:")


class _DeclaringPlugin:
    @saelab.hookimpl
    def register_datasets(self, register):
        register(_WholeDataset)

    @saelab.hookimpl
    def register_activation_sources(self, register):
        register(_FakeSource)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["fake:lm"], {"n_tokens": 1234, "dataset_repo": "whole:7", "cache_ctx_len": 8, "dataset_split": "train"}),
        (["fake:lm", "--n_tokens", "99", "--dataset_repo", "org/hub"],
         {"n_tokens": 99, "dataset_repo": "org/hub", "cache_ctx_len": 8, "dataset_split": "train[:1%]"}),
        (["gpt2", "--dataset_repo", "whole:3"], {"n_tokens": 10_000_000, "dataset_split": "train"}),
        (["gpt2", "--dataset_repo", "whole:3", "--dataset_split", "train[:1]"], {"dataset_split": "train[:1]"}),
    ],
)
def test_cli_defaults_come_from_the_plugins_declarations(args, expected):
    """MODEL's activation source brings its ``default_values``; a dataset whose class ``reads_whole`` gets
    the split ``train``; explicit flags win (the same rule as smollm2 and the embedded datasets)."""
    saelab.register_plugin(_DeclaringPlugin(), name="declaring")
    probe, seen = _probe_command()
    probe.main([*args, "--name", "n"], standalone_mode=False)
    for key, value in expected.items():
        assert seen[key] == value, key


def test_without_the_builtin_plugins_no_default_applies_and_loading_says_why(monkeypatch):
    monkeypatch.setenv("SAELAB_DISABLE_PLUGINS", "models,datasets")
    probe, seen = _probe_command()
    probe.main(["smollm2", "--dataset_repo", "news-sample", "--name", "n"], standalone_mode=False)
    assert seen["n_tokens"] == 10_000_000 and seen["dataset_split"] == "train[:1%]"
    with pytest.raises(UsageError) as err:
        load_dataset_source("news-sample")
    assert "news-sample" in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------- the dataset factory's contract


class _ShoutOptions(DatasetOptions):
    """The ``--dataset_*`` options plus its own."""

    repeat: int = 2


class _Shout(saelab.Dataset):
    """A third-party dataset shaped like the docs' example package: ``shout:<text>``."""

    name = "shout-test"
    Options = _ShoutOptions

    @classmethod
    def accepts(cls, repo: str) -> bool:
        return repo.startswith("shout-test:")

    def texts(self):
        for i in range(self.options.repeat):
            yield f"{self.repo.partition(':')[2].upper()}! ({i + 1})"

    def identity(self):
        return {"repo": self.repo, "repeat": self.options.repeat}


class _OwnOptionsOnly(_Shout):
    name = "own-options"

    class Options(saelab.Options):
        repeat: int = 2

    @classmethod
    def accepts(cls, repo: str) -> bool:
        return repo.startswith("own-options:")


class _OptionsOnlyConstructor(_Shout):
    name = "options-only"

    def __init__(self, options=None):
        super().__init__("options-only", options)

    @classmethod
    def accepts(cls, repo: str) -> bool:
        return repo.startswith("options-only:")


class _ShoutPlugin:
    @saelab.hookimpl
    def register_datasets(self, register):
        register(_Shout)
        register(_OwnOptionsOnly)
        register(_OptionsOnlyConstructor)


def test_the_factory_builds_a_third_party_dataset_and_names_a_broken_contract(results_dir, cli):
    saelab.register_plugin(_ShoutPlugin(), name="shout-test")
    dataset = load_dataset_source("shout-test:hi", split="train[:1%]")
    assert isinstance(dataset, _Shout) and list(dataset.texts()) == ["HI! (1)", "HI! (2)"]
    assert dataset.options.split == "train[:1%]" and dataset.repo == "shout-test:hi"
    with pytest.raises(UsageError) as err:
        load_dataset_source("own-options:x")
    assert "'own-options'" in str(err.value) and "DatasetOptions" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UsageError) as err:
        load_dataset_source("options-only:x")
    assert "'options-only'" in str(err.value) and "(repo, options)" in str(err.value)
    # and through the CLI's cache command
    r = cli("cache", str(TINY_GPT2), "--hookpoints", "layers.0", "--dataset_repo", "shout-test:hello world",
            "--n_tokens", "8", "--cache_ctx_len", "4", "--name", "shout", "--verbose", "false")
    assert r.exit_code == 0, r.output
