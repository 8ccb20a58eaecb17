"""Runs a user can trust: hookpoints checked against the model and the dictionary, failed LLM work is
loud (stderr line, exit code 3), unusable explanations are not scored, good results are never replaced
by failed ones, run_config.json only describes validated runs, and every invocation lands in the run
history. Every run goes through the CLI on the tiny GPT-2 against the scripted LLM server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from llm_server import Reply, ScriptedLLMServer
from pipeline_helpers import API_KEY, SmartHandler, kind_of, make_dictionary, run_args

ENV = {"OPENAI_API_KEY": API_KEY, "HF_TOKEN": None}
DEAD_URL = "http://127.0.0.1:1/v1"
NO_RETRY = ("--provider_option", "max_retries", "0")


@pytest.fixture(scope="module")
def dictionary(tmp_path_factory) -> Path:
    return make_dictionary(tmp_path_factory.mktemp("dict") / "layers.0")


def at(args: list[str], hookpoint: str) -> list[str]:
    """``args`` with ``--hookpoints`` set to ``hookpoint``."""
    args = list(args)
    args[args.index("--hookpoints") + 1] = hookpoint
    return args


def history(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "run_history.jsonl").read_text().splitlines()]


def error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


# -- hookpoints


def test_a_hookpoint_the_model_lacks_is_one_line_and_writes_nothing(cli, results_dir, dictionary):
    r = cli(*at(run_args(dictionary, "hp99", DEAD_URL), "layers.99"), env=ENV)
    r.assert_user_error("layers.99", "out of range")
    assert not (results_dir / "hp99").exists()


def test_a_hookpoint_the_dictionary_does_not_read_is_one_line(cli, results_dir, dictionary):
    r = cli(*at(run_args(dictionary, "hp1", DEAD_URL), "layers.1"), env=ENV)
    r.assert_user_error("--hookpoints layers.1", "does not match", "reads layers.0", "accepted: layers.0")
    assert not (results_dir / "hp1").exists()


def test_hookpoints_are_compared_after_translating_external_names(dictionary, tmp_path):
    from saelab.dictionary import build_dictionary, save_dictionary
    from saelab.pipeline import find_dictionaries

    assert find_dictionaries(dictionary, ["blocks.0.hook_resid_post"]) == {"layers.0": dictionary}
    transcoder = build_dictionary("transcoder", {"inputs": ["layers.1.mlp.input"], "outputs": ["layers.1.mlp"],
                                                 "d_in": 64, "d_out": 64}, {"d_sae": 8, "k": 2})
    path = save_dictionary(transcoder, tmp_path / "tc")
    assert find_dictionaries(path, ["layers.1.mlp.input"]) == {"layers.1.mlp.input": path}
    assert find_dictionaries(path, ["blocks.1.hook_mlp_out"]) == {"layers.1.mlp": path}
    from saelab import UsageError

    with pytest.raises(UsageError, match="reads layers.1.mlp.input and writes layers.1.mlp"):
        find_dictionaries(path, ["layers.1"])
    sparsify_run = tmp_path / "sparsify"
    sparsify_run.mkdir()
    (sparsify_run / "model.layers.0").symlink_to(dictionary)
    assert find_dictionaries(sparsify_run, ["layers.0"]) == {"model.layers.0": sparsify_run / "model.layers.0"}


def _saelens_without_hookpoint(src: Path, dst: Path) -> Path:
    from saelab.dictionary import load_dictionary, save_dictionary

    save_dictionary(load_dictionary(src), dst, format="saelens")
    cfg = json.loads((dst / "cfg.json").read_text())
    cfg.pop("hook_name", None)
    cfg.get("metadata", {}).pop("hook_name", None)
    (dst / "cfg.json").write_text(json.dumps(cfg))
    return dst


def test_hookpoints_set_the_site_of_a_format_that_records_none(cli, results_dir, dictionary, tmp_path):
    lens = _saelens_without_hookpoint(dictionary, tmp_path / "lens")
    r = cli(*at(run_args(lens, "nohook", DEAD_URL, "--dry_run"), "blocks.0.hook_resid_post"), env=ENV)
    assert r.exit_code == 0, r.output
    assert "records no hookpoint" in r.stderr and "reads layers.0" in r.stderr
    assert (results_dir / "nohook" / "records" / "layers.0" / "index.json").is_file()
    args = run_args(lens, "nohook2", DEAD_URL, "--dry_run")
    del args[args.index("--hookpoints"):args.index("--hookpoints") + 2]
    cli(*args, env=ENV).assert_user_error("does not record the hookpoint", "--hookpoints")


# -- failed LLM work


def test_an_unreachable_server_exits_3_with_one_line_on_stderr(cli, results_dir, dictionary):
    r = cli(*run_args(dictionary, "dead", DEAD_URL, *NO_RETRY), env=ENV)
    assert r.exit_code == 3, r.output
    line = error_line(r.stderr)
    assert line.startswith("Error: 3 explanations failed: ") and "127.0.0.1:1" in line, line
    assert [h["outcome"] for h in history(results_dir / "dead")] == ["failed"]
    assert history(results_dir / "dead")[0]["exit_code"] == 3


def test_unusable_explanations_are_not_scored_and_exit_3_only_with_strict(cli, results_dir, dictionary):
    def garbage(request: dict) -> Reply:
        if kind_of(request) == "explain":
            return Reply(text="I am not sure what to say.")
        return SmartHandler()(request)

    with ScriptedLLMServer(garbage) as server:
        r = cli(*run_args(dictionary, "garbage", server.base_url), env=ENV)
        assert r.exit_code == 0, r.output
        assert "3 explanations unusable and not scored (3 unparsed)" in r.stderr
        assert all(kind_of(req.body) == "explain" for req in server.chat_requests)  # nothing scored
        summary = json.loads((results_dir / "garbage" / "summary.json").read_text())
        rows = {row["name"]: row for row in summary["rows"]}
        for scorer in ("detection", "fuzz"):
            assert rows[scorer]["failed_explanations"] == 3 and rows[scorer]["latents"] == 0
            assert rows[scorer]["metrics"] == {}
        r = cli(*run_args(dictionary, "garbage", server.base_url, "--strict"), env=ENV)
        assert r.exit_code == 3 and "unusable" in error_line(r.stderr)


def test_a_failed_overwrite_keeps_the_good_explanations_and_their_scores(cli, results_dir, dictionary):
    root = results_dir / "keep"
    with ScriptedLLMServer(SmartHandler()) as server:
        r = cli(*run_args(dictionary, "keep", server.base_url), env=ENV)
        assert r.exit_code == 0, r.output
    before = {p: p.read_bytes() for p in sorted((root / "explanations").rglob("*.json"))}
    scores = {p: p.read_bytes() for p in sorted((root / "scores").rglob("*.json"))}
    assert len(before) == 3 and len(scores) == 6
    r = cli(*run_args(dictionary, "keep", DEAD_URL, *NO_RETRY, "--overwrite", "explanations", "--response_cache",
                      "false"), env=ENV)
    assert r.exit_code == 3 and "3 explanations failed" in error_line(r.stderr)
    assert {p: p.read_bytes() for p in before} == before
    assert {p: p.read_bytes() for p in scores} == scores
    rows = {row["name"]: row for row in json.loads((root / "summary.json").read_text())["rows"]}
    assert rows["default"]["latents"] == 3 and rows["default"]["failed_requests"] == 0
    assert rows["detection"]["latents"] == 3 and rows["detection"]["metrics"]
    assert [h["outcome"] for h in history(root)] == ["ok", "failed"]
    # a run failing at the model stage leaves run_config.json as it was, and is recorded
    config = (root / "run_config.json").read_bytes()
    args = run_args(dictionary, "keep", DEAD_URL)
    args[0] = str(results_dir / "no-such-model")
    cli(*args, env=ENV).assert_user_error("no-such-model")
    assert (root / "run_config.json").read_bytes() == config
    assert [(h["outcome"], h["exit_code"]) for h in history(root)] == [("ok", 0), ("failed", 3), ("error", 2)]
    empty = results_dir / "empty.jsonl"
    empty.write_text("")
    args = run_args(dictionary, "keep", DEAD_URL)
    args[args.index("news-sample")] = str(empty)
    cli(*args, env=ENV).assert_user_error("empty.jsonl")  # the dataset stage fails
    assert (root / "run_config.json").read_bytes() == config


def test_a_score_of_a_replaced_explanation_is_not_counted(tmp_path):
    from saelab.layout import RunLayout
    from saelab.pipeline import summarize
    from saelab.records import Explanation, ScoreResult

    layout = RunLayout(tmp_path)
    Explanation(hookpoint="h", latent=0, text="new text").save(layout.explanation_path("h", 0))
    Explanation(hookpoint="h", latent=1, text="", parse_failed=True).save(layout.explanation_path("h", 1))
    for latent, text in ((0, "old text"), (1, "")):
        ScoreResult(scorer="detection", hookpoint="h", latent=latent, explanation=text or "x",
                    metrics={"f1": 1.0}).save(layout.score_path("detection", "h", latent))
    row = summarize(layout, {"h": [0, 1]}, ["detection"])["rows"][1]
    assert (row["latents"], row["missing"], row["failed_explanations"], row["metrics"]) == (0, 1, 1, {})


def test_io_errors_missing_latents_and_zero_latents_exit_3(cli, results_dir, dictionary):
    with ScriptedLLMServer(SmartHandler()) as server:
        (results_dir / "io").mkdir(parents=True)
        (results_dir / "io" / "scores").write_text("a file where the scores directory goes")
        r = cli(*run_args(dictionary, "io", server.base_url), env=ENV)
        assert r.exit_code == 3 and "stopped by an I/O error" in error_line(r.stderr), r.output

        r = cli(*run_args(dictionary, "zero", server.base_url, "--min_examples", "100000"), env=ENV)
        assert r.exit_code == 3, r.output
        assert "0 latents analysed: all" in error_line(r.stderr) and "min_examples" in r.stderr

        args = run_args(dictionary, "some", server.base_url, "--feature_num", "0", "1", "2", "3", "4", "5", "6",
                        "7", "--max_latents", "8", "--min_examples", "120")
        r = cli(*args, env=ENV)
        index = json.loads((results_dir / "some" / "records" / "layers.0" / "index.json").read_text())
        skipped = sorted(int(k) for k in index["skipped"])
        assert skipped and index["latents"], index
        assert r.exit_code == 3 and "requested latent" in r.stderr
        assert ", ".join(map(str, skipped)) + " missing" in error_line(r.stderr)

        capped = run_args(dictionary, "capped", server.base_url, "--feature_num", "4", "5", "7", "--max_latents", "2",
                          "--min_examples", "120")
        r = cli(*capped, env=ENV)
        assert r.exit_code == 3 and "requested latent 7 missing: --max_latents 2 was reached" in error_line(r.stderr)


def test_out_of_range_feature_num_and_unknown_provider_are_one_line(cli, dictionary):
    args = run_args(dictionary, "range", DEAD_URL, "--feature_num", "0", "4096")
    cli(*args, env=ENV).assert_user_error("--feature_num 4096", "0..31")
    args = run_args(dictionary, "prov", DEAD_URL)
    args[args.index("openai")] = "nosuch"
    cli(*args, env=ENV).assert_user_error("nosuch", "offline", "openrouter", "vllm")


def test_cache_invocations_land_in_the_run_history(cli, results_dir):
    from fixtures.tiny_models import TINY_GPT2

    args = ("cache", str(TINY_GPT2), "--hookpoints", "layers.0", "--dataset_repo", "news-sample", "--n_tokens", "512",
            "--cache_ctx_len", "64", "--name", "hist", "--verbose", "false")
    assert cli(*args).exit_code == 0
    bad = list(args)
    bad[bad.index("layers.0")] = "layers.99"
    cli(*bad).assert_user_error("layers.99")
    assert [(h["command"], h["outcome"]) for h in history(results_dir / "hist")] == [("cache", "ok"), ("cache", "error")]
