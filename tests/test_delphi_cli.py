"""The delphi-style command: a pasted delphi command with every CLI.md option parses; each option's
resolved value (table-driven), user errors, and an end-to-end run on the tiny GPT-2 against the scripted
LLM server (never the network)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from fixtures.tiny_models import TINY_GPT2
from llm_server import ScriptedLLMServer
from pipeline_helpers import API_KEY, SmartHandler, make_dictionary, run_args

PASTED = (
    "meta-llama/Meta-Llama-3-8B EleutherAI/sae-llama-3-8b-32x --hookpoints layers.16 layers.24 --max_latents 7 "
    "--feature_num 0 1 2 3 4 --explainer_model hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4 "
    "--explainer_model_max_len 4208 --explainer_provider vllm --explainer_api_base_url http://localhost:8002/v1 "
    "--explainer contrastive --prompt_override --prompt_config_file my_prompts.yaml --scorers recall fuzz "
    "--num_examples_per_scorer_prompt 10 --dataset_repo EleutherAI/fineweb-edu-dedup-10b "
    "--dataset_split train[:1%] --dataset_name sample --dataset_column content --n_tokens 1000000 "
    "--batch_size 16 --cache_ctx_len 128 --n_splits 3 --min_examples 100 --n_examples_train 30 "
    "--n_examples_test 20 --n_non_activating 25 --example_ctx_len 16 --center_examples False "
    "--non_activating_source neighbours --neighbours_type decoder_similarity --n_quantiles 5 --train_type mix "
    "--test_type top --ratio_top 0.3 --pipeline_num_proc 3 --num_gpus 0 --seed 7 --verbose False --filter_bos "
    "--log_probs True --load_in_8bit False --hf_token hf_secret_token_123 --overwrite cache neighbours scores "
    "--enable_visualization --name pasted"
).split()

EXPECTED: list[tuple[str, Any]] = [
    ("model", "meta-llama/Meta-Llama-3-8B"), ("sparse_model", "EleutherAI/sae-llama-3-8b-32x"),
    ("hookpoints", ["layers.16", "layers.24"]), ("max_latents", 7), ("feature_num", [0, 1, 2, 3, 4]),
    ("explainer_model", "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4"), ("explainer_model_max_len", 4208),
    ("explainer_provider", "vllm"), ("explainer_api_base_url", "http://localhost:8002/v1"),
    ("explainer", "contrastive"), ("prompt_override", True), ("scorers", ["recall", "fuzz"]),
    ("num_examples_per_scorer_prompt", 10), ("dataset_repo", "EleutherAI/fineweb-edu-dedup-10b"),
    ("dataset_split", "train[:1%]"), ("dataset_name", "sample"), ("dataset_column", "content"),
    ("n_tokens", 1_000_000), ("batch_size", 16), ("cache_ctx_len", 128), ("n_splits", 3), ("min_examples", 100),
    ("n_examples_train", 30), ("n_examples_test", 20), ("n_non_activating", 25), ("example_ctx_len", 16),
    ("center_examples", False), ("non_activating_source", "neighbours"), ("neighbours_type", "decoder_similarity"),
    ("n_quantiles", 5), ("train_type", "mix"), ("test_type", "top"), ("ratio_top", 0.3), ("pipeline_num_proc", 3),
    ("num_gpus", 0), ("seed", 7), ("verbose", False), ("filter_bos", True), ("log_probs", True),
    ("load_in_8bit", False), ("overwrite", ["cache", "neighbours", "scores"]), ("enable_visualization", True),
    ("name", "pasted"), ("device", "cpu"),
]

DEFAULTS: list[tuple[str, Any]] = [
    ("model", "meta-llama/Meta-Llama-3-8B"), ("sparse_model", "EleutherAI/sae-llama-3-8b-32x"), ("hookpoints", []),
    ("max_latents", None), ("feature_num", None),
    ("explainer_model", "hugging-quants/Meta-Llama-3.1-70B-Instruct-AWQ-INT4"), ("explainer_model_max_len", 5120),
    ("explainer_provider", "offline"), ("explainer_api_base_url", None), ("explainer", "default"),
    ("prompt_override", False), ("prompt_config_file", None), ("scorers", ["fuzz", "detection"]),
    ("num_examples_per_scorer_prompt", 5), ("dataset_repo", "EleutherAI/SmolLM2-135M-10B"),
    ("dataset_split", "train[:1%]"), ("dataset_name", ""), ("dataset_column", "text"), ("n_tokens", 10_000_000),
    ("batch_size", 32), ("cache_ctx_len", 256), ("n_splits", 5), ("min_examples", 200), ("n_examples_train", 40),
    ("n_examples_test", 50), ("n_non_activating", 50), ("example_ctx_len", 32), ("center_examples", True),
    ("non_activating_source", "random"), ("neighbours_type", "co-occurrence"), ("n_quantiles", 10),
    ("train_type", "quantiles"), ("test_type", "quantiles"), ("ratio_top", 0.2), ("seed", 22), ("verbose", True),
    ("filter_bos", False), ("log_probs", False), ("load_in_8bit", False), ("hf_token", None), ("overwrite", []),
    ("enable_visualization", False), ("dry_run", False),
]


@pytest.fixture
def captured(monkeypatch):
    """Replace the run's execution by a recorder of its resolved values."""
    from saelab.plugins.commands import run as run_commands

    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(run_commands, "run_command", lambda values: seen.append(values))
    return seen


def resolve(cli, captured, args: list[str], env: dict[str, str | None] | None = None) -> dict[str, Any]:
    r = cli(*args, env=env)
    assert r.exit_code == 0, r.output
    assert len(captured) == 1
    return captured.pop()


@pytest.mark.parametrize("key,expected", EXPECTED, ids=[k for k, _ in EXPECTED])
def test_pasted_delphi_command_resolves_every_option(cli, captured, key, expected):
    values = resolve(cli, captured, PASTED)
    assert values[key] == expected


def test_pasted_command_keeps_the_secret_and_prompt_file(cli, captured):
    values = resolve(cli, captured, PASTED)
    assert values["hf_token"] == "hf_secret_token_123"  # used for the hub, redacted when written
    assert str(values["prompt_config_file"]) == "my_prompts.yaml"


@pytest.mark.parametrize("key,expected", DEFAULTS, ids=[k for k, _ in DEFAULTS])
def test_defaults_are_delphis(cli, captured, key, expected):
    values = resolve(cli, captured, ["run", "--name", "d"], env={"HF_TOKEN": None})
    assert values[key] == expected


def test_python_m_form_dispatches_to_run(cli, captured):
    values = resolve(cli, captured, ["run", "gpt2", "some/dir", "--name", "x"])
    assert (values["model"], values["sparse_model"]) == ("gpt2", "some/dir")


@pytest.mark.parametrize("args,key,expected", [
    (["smollm2", "d", "--name", "e"], "explainer_model", "smollm2"),
    (["smollm2", "d", "--name", "e"], "dataset_repo", "wikipedia-sample"),
    (["smollm2", "d", "--name", "e"], "n_tokens", 200_000),
    (["smollm2", "d", "--name", "e", "--explainer_model", "x/y"], "explainer_model", "x/y"),
    (["smollm2", "d", "--name", "e", "--n_tokens", "5000"], "n_tokens", 5000),
    (["m", "d", "--name", "e", "--non_activating_source", "FAISS"], "explainer", "contrastive"),
    (["m", "d", "--name", "e", "--non_activating_source", "FAISS", "--explainer", "default"], "explainer", "default"),
    (["m", "d", "--name", "e", "--explainer_option", "cot", "true"], "explainer_option", {"cot": True}),
    (["m", "d", "--name", "e", "--scorer_option", "fuzz.threshold", "0.5"], "scorer_option",
     {"fuzz": {"threshold": 0.5}}),
    (["m", "d", "--name", "e", "--dry-run"], "dry_run", True),
])
def test_embedded_defaults_and_derived_values(cli, captured, args, key, expected):
    assert resolve(cli, captured, args)[key] == expected


@pytest.mark.parametrize("args,fragments", [
    (["m", "d", "--name", "e", "--load_in_8bit", "--num_gpus", "0"], ["--load_in_8bit needs a CUDA GPU"]),
    (["m", "d", "--name", "e", "--num_gpus", "64"], ["--num_gpus 64", "accepted"]),
    (["m", "d", "--name", "e", "--overwrite", "everything"], ["everything"]),
    (["m", "d"], ["--name"]),
    (["m", "d", "--name", "e", "--scorer_option", "threshold", "1"], ["SCORER.KEY"]),
])
def test_user_errors_are_one_line(cli, captured, args, fragments):
    cli(*args).assert_user_error(*fragments)


def test_unknown_scorer_and_missing_dictionary_are_one_line(cli, tmp_path):
    cli("m", str(tmp_path / "nope"), "--name", "e", "--num_gpus", "0").assert_user_error("nope", "does not exist")
    d = tmp_path / "dict"
    make_dictionary(d)
    cli("m", str(d), "--name", "e", "--num_gpus", "0", "--scorers", "bogus").assert_user_error("bogus")


@pytest.mark.slow
def test_end_to_end_run_then_rerun_makes_no_requests(cli, results_dir, tmp_path):
    """The tiny GPT-2 + a random TopK dictionary through every stage; the second run asks nothing."""
    d = make_dictionary(tmp_path / "dict")
    handler = SmartHandler()
    env = {"OPENAI_API_KEY": API_KEY, "HF_TOKEN": None}
    with ScriptedLLMServer(handler) as server:
        args = run_args(d, "e2e", server.base_url, "--hf_token", "hf_never_written_42", "--log_probs", "true",
                        "--num_examples_per_scorer_prompt", "2", "--explainer_model_max_len", "100000")
        r = cli(*args, env=env)
        assert r.exit_code == 0, r.output
        first = len(server.chat_requests)
        assert handler.counts["explain"] == 3
        assert all(req.body["logprobs"] is True for req in server.chat_requests if "top_logprobs" in req.body)
        server.reset()
        r = cli(*args, env=env)
        assert r.exit_code == 0, r.output
        assert len(server.chat_requests) == 0 and first > 3
    root = results_dir / "e2e"
    config = json.loads((root / "run_config.json").read_text())
    assert config["config"]["n_splits"] == 2 and config["config"]["hf_token"] == "<redacted>"
    assert len(list((root / "latents" / "layers.0").glob("split_*"))) == 2
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"hf_never_written_42" not in data and API_KEY.encode() not in data, path
    summary = json.loads((root / "summary.json").read_text())
    assert {r["name"] for r in summary["rows"]} == {"default", "detection", "fuzz"}
    record = json.loads((root / "records" / "layers.0" / "latent_0.json").read_text())
    assert len(record["train"]) == 3 and len(record["test"]) == 2 and len(record["non_activating"]) == 2
    assert all(len(e["tokens"]) == 8 for e in record["train"])
    assert json.loads((root / "scores" / "detection" / "layers.0" / "latent_0.json").read_text())["n_prompts"] == 2


# -- the run's latent cache: streamed from the model, or read from a matching activation cache

ENV = {"OPENAI_API_KEY": API_KEY, "HF_TOKEN": None}
NO_SERVER = "http://127.0.0.1:1/v1"  # --dry_run makes no LLM call
DATA = ["--dataset_repo", "news-sample", "--n_tokens", "2048", "--cache_ctx_len", "64", "--batch_size", "8"]


def _manifest(results_dir: Path, name: str) -> dict[str, Any]:
    return json.loads((results_dir / name / "latents" / "layers.0" / "manifest.json").read_text())


def _run_config(results_dir: Path, name: str) -> dict[str, Any]:
    return json.loads((results_dir / name / "run_config.json").read_text())


def test_run_streams_latents_and_writes_no_activation_cache(cli, results_dir, tmp_path, monkeypatch):
    """Without a matching activation cache the run computes its latents from the model's forward pass: the
    activation cache writer is never constructed, no store appears, the run config records no cache; and
    `saelab latents` with the same options reuses that latent cache (one path, the same exclusions)."""
    import saelab.activation_cache

    def no_dense_cache(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("run started writing a dense activation cache")

    monkeypatch.setattr(saelab.activation_cache._Writer, "__init__", no_dense_cache)
    d = make_dictionary(tmp_path / "dict")
    store = tmp_path / "store"
    exclusions = ["--exclude_positions", "1", "2", "--filter_bos", "true"]
    r = cli(*run_args(d, "s", NO_SERVER, "--dry_run", "--store", str(store), *exclusions), env=ENV)
    assert r.exit_code == 0, r.output
    assert not store.exists() and not (results_dir / ".activations").exists()
    assert _run_config(results_dir, "s")["activation_cache"] == {"layers.0": None}
    manifest = _manifest(results_dir, "s")
    assert manifest["complete"] and manifest["tokens"]["kind"] == "chunks"
    assert manifest["exclude_positions"] == [1, 2] and manifest["filter_bos"] is True
    assert (results_dir / "s" / "records" / "layers.0" / "index.json").is_file()

    latents = [str(TINY_GPT2), str(d), "--hookpoints", "layers.0", *DATA, "--n_splits", "2", "--store", str(store), "--name", "s"]
    same = cli("latents", *latents, *exclusions)
    assert same.exit_code == 0, same.output
    assert "reused" in same.stdout and _manifest(results_dir, "s") == manifest
    other = cli("latents", *latents)  # without the exclusions: the model's (position 0), another latent cache
    assert other.exit_code == 0, other.output
    assert "rebuilt" in other.stdout and _manifest(results_dir, "s")["exclude_positions"] == [0]
    none = cli("latents", *latents, "--exclude_positions", "none")  # explicitly none: nothing excluded
    assert none.exit_code == 0, none.output
    assert "rebuilt" in none.stdout and _manifest(results_dir, "s")["exclude_positions"] == []
    cli("latents", *latents, "--exclude_positions", "first").assert_user_error("'first'", "'none'")
    assert not store.exists() and not (results_dir / ".activations").exists()


def test_run_reads_a_covering_activation_cache_and_gets_the_same_latents(cli, results_dir, tmp_path):
    """An activation cache of the same model and data holding the dictionary's site (and another) is read
    instead of running the model, and recorded in run_config.json; the latents equal the streamed ones.
    ``--overwrite cache`` recomputes from the model and writes no dense cache."""
    from saelab.latents import LatentCache

    d = make_dictionary(tmp_path / "dict")
    streamed = cli(*run_args(d, "streamed", NO_SERVER, "--dry_run"), env=ENV)
    assert streamed.exit_code == 0, streamed.output
    cached = cli("cache", str(TINY_GPT2), "--hookpoints", "layers.0", "layers.1", *DATA, "--name", "c",
                 "--verbose", "false")
    assert cached.exit_code == 0, cached.output
    activation_cache = Path(_run_config(results_dir, "c")["activation_cache"]).resolve()
    assert json.loads((activation_cache / "manifest.json").read_text())["hookpoints"] == ["layers.0", "layers.1"]
    caches = sorted((results_dir / ".activations").glob("*/manifest.json"))
    assert len(caches) == 1

    reads = cli(*run_args(d, "reads", NO_SERVER, "--dry_run"), env=ENV)
    assert reads.exit_code == 0, reads.output
    recorded = _run_config(results_dir, "reads")["activation_cache"]
    assert list(recorded) == ["layers.0"] and Path(recorded["layers.0"]).resolve() == activation_cache
    assert sorted((results_dir / ".activations").glob("*/manifest.json")) == caches
    a, b = (LatentCache.open(results_dir / name / "latents" / "layers.0") for name in ("streamed", "reads"))
    assert b.manifest["tokens"]["kind"] == "activation_cache" and not (b.path / "tokens").exists()
    assert torch.equal(a.tokens(), b.tokens())
    torch.testing.assert_close(a.dense(), b.dense(), rtol=1e-5, atol=1e-6)

    again = cli(*run_args(d, "reads", NO_SERVER, "--dry_run", "--overwrite", "cache"), env=ENV)
    assert again.exit_code == 0, again.output
    assert _run_config(results_dir, "reads")["activation_cache"] == {"layers.0": None}
    assert _manifest(results_dir, "reads")["tokens"]["kind"] == "chunks"
    assert sorted((results_dir / ".activations").glob("*/manifest.json")) == caches


def test_a_streamed_run_killed_mid_latents_resumes_after_its_last_chunk(cli, results_dir, tmp_path):
    """kill -9 while a run streams its latent cache (one chunk per batch, slowed forward passes): the same
    command keeps the chunks already listed in the manifest and writes only the rest."""
    d = make_dictionary(tmp_path / "dict")
    args = run_args(d, "k", NO_SERVER, "--dry_run")
    slow = ("import sys, time; import saelab.latents as latents; "
            "from saelab.plugins.models import transformers_models as models; "
            "forward = models.TransformersSource.activations; "
            "models.TransformersSource.activations = lambda *a, **k: (time.sleep(0.2), forward(*a, **k))[1]; "
            "latents.build_latent_caches.__kwdefaults__['flush_nonzeros'] = 1; "
            "from saelab.cli import main; main(sys.argv[1:])")
    env = {**os.environ, **{k: v for k, v in ENV.items() if v is not None}, "OMP_NUM_THREADS": "1"}
    env.pop("HF_TOKEN", None)
    # batch size and flush size are not in the latent cache's fingerprint
    proc = subprocess.Popen([sys.executable, "-c", slow, "run", *args, "--batch_size", "2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    manifest_path = results_dir / "k" / "latents" / "layers.0" / "manifest.json"
    try:
        deadline = time.monotonic() + 120
        while not (manifest_path.is_file() and len(json.loads(manifest_path.read_text())["chunks"]) >= 2):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the latent cache never wrote two chunks"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    killed = json.loads(manifest_path.read_text())
    assert not killed["complete"] and 2 <= len(killed["chunks"]) < killed["n_sequences_target"] // 2
    first = manifest_path.parent / killed["chunks"][0]["splits"][0]["path"]
    before = first.stat()
    rerun = cli(*args, env=ENV)
    assert rerun.exit_code == 0, rerun.output
    resumed = _manifest(results_dir, "k")
    assert resumed["complete"] and resumed["chunks"][:len(killed["chunks"])] == killed["chunks"]
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not (results_dir / ".activations").exists()
    fresh = cli(*run_args(d, "fresh", NO_SERVER, "--dry_run"), env=ENV)
    assert fresh.exit_code == 0, fresh.output
    from saelab.latents import LatentCache

    a, b = (LatentCache.open(results_dir / name / "latents" / "layers.0") for name in ("k", "fresh"))
    assert torch.equal(a.tokens(), b.tokens())
    torch.testing.assert_close(a.dense(), b.dense(), rtol=1e-5, atol=1e-6)
