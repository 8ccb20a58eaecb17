"""The delphi-style command: a pasted delphi command with every CLI.md option parses; each option's
resolved value (table-driven), user errors, and an end-to-end run on the tiny GPT-2 against the scripted
LLM server (never the network)."""

from __future__ import annotations

import json
from typing import Any

import pytest
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
