"""The explain/score engine (core/pipeline.py) and the `explain` / `score` commands, against the scripted
OpenAI-compatible server (tests/llm_server.py) only: reuse by fingerprint, per-latent resume after
SIGKILL, response-cache hits under --overwrite scores, dry runs, concurrency, secrets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import saelab
from interp_helpers import make_record, openai_provider
from llm_server import Reply, ScriptedLLMServer
from pipeline_helpers import API_KEY, SmartHandler
from saelab.layout import RunLayout
from saelab.llm import Completion
from saelab.pipeline import (
    AutoInterp,
    RecordSet,
    estimate_tokens,
    fit_to_context,
    load_records,
    make_explainer,
    make_scorers,
    save_records,
    summarize,
)
from saelab.records import Explanation, LatentRecord, ScoreResult


def records(n: int = 6, hook: str = "layers.1") -> list[LatentRecord]:
    """``n`` hand-made records (7 test + 6 non-activating examples: 3 detection prompts of 5)."""
    out = []
    for i in range(n):
        r = make_record()
        r.latent, r.hookpoint = i, hook
        out.append(r)
    return out


def make_run(root: Path, n: int = 6, name: str = "run") -> RunLayout:
    """A run directory holding ``n`` saved records (what `saelab run` writes before explaining)."""
    layout = RunLayout(root / name)
    save_records(layout, RecordSet("layers.1", records(n), {99: "too few"}, "fp"))
    (layout.root / "run_config.json").write_text(json.dumps({"commands": {}}))
    return layout


def stage_args(server: ScriptedLLMServer, *extra: str) -> list[str]:
    return ["--explainer_provider", "openai", "--explainer_api_base_url", server.base_url,
            "--explainer_model", "test-model", "--provider_option", "max_retries", "0", "--verbose", "false", *extra]


# --------------------------------------------------------------------------------------------------
# Engine


def test_run_writes_one_file_per_latent_and_reuses_them(tmp_path, monkeypatch):
    layout = RunLayout(tmp_path / "r")
    handler = SmartHandler()
    with ScriptedLLMServer(handler) as server:
        provider = openai_provider(server, monkeypatch)
        engine = AutoInterp(layout, make_explainer("default"), make_scorers(["recall", "fuzz"]), provider,
                            progress=False)
        report = engine.run(records(4))
        assert handler.counts == {"explain": 4, "binary": 4 * 3 * 2}
        assert report.explain.computed == 4 and report.scores["detection"].computed == 4
        for i in range(4):
            e = Explanation.load(layout.explanation_path("layers.1", i))
            assert e.text == "the letter e" and e.fingerprint
            s = ScoreResult.load(layout.score_path("detection", "layers.1", i))
            assert s.explanation == "the letter e" and len(s.predictions) == 13
        server.reset()
        again = AutoInterp(layout, make_explainer("default"), make_scorers(["detection", "fuzz"]), provider,
                           progress=False).run(records(4))
        assert len(server.chat_requests) == 0
        assert again.explain.reused == 4 and again.scores["fuzz"].reused == 4


def test_changed_inputs_are_recomputed_and_the_rest_reused(tmp_path, monkeypatch):
    layout = RunLayout(tmp_path / "r")
    handler = SmartHandler()
    with ScriptedLLMServer(handler) as server:
        provider = openai_provider(server, monkeypatch)
        AutoInterp(layout, make_explainer("default"), make_scorers(["detection"]), provider,
                   progress=False).run(records(3))
        # a scorer option changes: only the scores are recomputed
        server.reset()
        handler.counts.clear()
        AutoInterp(layout, make_explainer("default"),
                   make_scorers(["detection"], {"num_examples_per_scorer_prompt": 13}), provider,
                   progress=False).run(records(3))
        assert handler.counts == {"binary": 3}
        # a new explanation text (explainer option changed, new answer): explanations and scores redone
        handler.counts.clear()
        handler.explanation = "vowels"
        AutoInterp(layout, make_explainer("default", {"show_activations": True}),
                   make_scorers(["detection"], {"num_examples_per_scorer_prompt": 13}), provider,
                   progress=False).run(records(3))
        assert handler.counts == {"explain": 3, "binary": 3}
        assert ScoreResult.load(layout.score_path("detection", "layers.1", 0)).explanation == "vowels"
        # one latent's examples change: only that latent is redone
        handler.counts.clear()
        changed = records(3)
        changed[1].test = changed[1].test[:-1]
        AutoInterp(layout, make_explainer("default", {"show_activations": True}),
                   make_scorers(["detection"], {"num_examples_per_scorer_prompt": 13}), provider,
                   progress=False).run(changed)
        assert handler.counts == {"binary": 1}


def test_overwrite_forces_and_explanations_imply_scores(tmp_path, monkeypatch):
    layout = RunLayout(tmp_path / "r")
    handler = SmartHandler()
    with ScriptedLLMServer(handler) as server:
        provider = openai_provider(server, monkeypatch)

        def run(*overwrite: str) -> None:
            handler.counts.clear()
            AutoInterp(layout, make_explainer("default"), make_scorers(["detection"]), provider,
                       overwrite=overwrite, progress=False).run(records(2))

        run()
        run("scores")
        assert handler.counts == {"binary": 6}
        run("explanations")
        assert handler.counts == {"explain": 2, "binary": 6}


def test_failed_requests_are_stored_but_retried_next_time(tmp_path, monkeypatch):
    layout = RunLayout(tmp_path / "r")
    with ScriptedLLMServer(Reply(status=500)) as server:
        provider = openai_provider(server, monkeypatch)
        report = AutoInterp(layout, make_explainer("default"), make_scorers(["detection"]), provider,
                            progress=False).run(records(2))
    assert report.explain.failed == 2 and report.scores["detection"].skipped == 2
    assert Explanation.load(layout.explanation_path("layers.1", 0)).error
    handler = SmartHandler()
    with ScriptedLLMServer(handler) as server:
        provider = openai_provider(server, monkeypatch)
        AutoInterp(layout, make_explainer("default"), make_scorers(["detection"]), provider,
                   progress=False).run(records(2))
    assert handler.counts == {"explain": 2, "binary": 6}
    assert Explanation.load(layout.explanation_path("layers.1", 0)).error is None


@pytest.mark.parametrize("limit", [1, 3, 6])
def test_max_in_flight_equals_the_concurrency_limit(tmp_path, monkeypatch, limit):
    with ScriptedLLMServer(SmartHandler(delay_s=0.15)) as server:
        provider = openai_provider(server, monkeypatch, max_concurrency=limit)
        start = time.monotonic()
        AutoInterp(RunLayout(tmp_path / "r"), make_explainer("default"), make_scorers(["detection"]), provider,
                   progress=False).run(records(8))
        elapsed = time.monotonic() - start
        assert server.max_in_flight == limit
        assert len(server.chat_requests) == 8 * 4
        assert elapsed >= 32 * 0.15 / limit * 0.9


def test_dry_run_plan_makes_no_requests_and_counts_prompts(tmp_path, monkeypatch):
    layout = RunLayout(tmp_path / "r")
    with ScriptedLLMServer(SmartHandler()) as server:
        provider = openai_provider(server, monkeypatch, input_price_per_1k=1.0, output_price_per_1k=2.0)
        explainer, scorers = make_explainer("default"), make_scorers(["detection", "fuzz"])
        engine = AutoInterp(layout, explainer, scorers, provider, progress=False)
        plan = engine.plan(records(5))
        assert len(server.chat_requests) == 0
        rows = {r.name: r for r in plan.rows}
        assert rows["default"].calls == 5 and rows["detection"].calls == 15 and rows["fuzz"].calls == 15
        expected = sum(estimate_tokens(m) for r in records(5) for m in explainer.messages(r))
        assert rows["default"].prompt_tokens == expected
        assert rows["default"].cost_prompt == pytest.approx(expected / 1000.0)
        answer = explainer.options.max_tokens  # the explainer's longest answer, priced at 2 USD per 1k
        assert rows["default"].cost_max == pytest.approx(expected / 1000.0 + 5 * answer * 2 / 1000.0)
        engine.run(records(2))  # two latents done: the plan shrinks to the rest
        server.reset()
        plan = AutoInterp(layout, explainer, scorers, provider, progress=False).plan(records(5))
        rows = {r.name: r for r in plan.rows}
        assert rows["default"].calls == 3 and rows["detection"].reused == 2 and rows["detection"].calls == 9
        assert len(server.chat_requests) == 0


def test_fit_to_context_drops_train_examples_until_the_prompt_fits():
    explainer = make_explainer("default", {"few_shot": False})
    record = make_record(n_train=12)
    full = estimate_tokens(explainer.messages(record)[0])
    trimmed, dropped = fit_to_context(explainer, record, full - 1)
    assert dropped >= 1 and len(trimmed.train) == 12 - dropped
    assert estimate_tokens(explainer.messages(trimmed)[0]) <= full - 1
    bigger, _ = fit_to_context(explainer, record, full - 1 + 40)
    assert len(bigger.train) >= len(trimmed.train)
    same, none = fit_to_context(explainer, record, full)
    assert none == 0 and same is record


def test_summary_means_failures_and_skipped(tmp_path, monkeypatch):
    layout = RunLayout(tmp_path / "r")

    def handler(request):
        if SmartHandler.__call__ and "investigating" in request["messages"][0]["content"]:
            return "[EXPLANATION]: cats"
        return "I cannot tell"  # unparseable: every prompt fails

    with ScriptedLLMServer(handler) as server:
        provider = openai_provider(server, monkeypatch)
        AutoInterp(layout, make_explainer("default"), make_scorers(["detection"]), provider,
                   progress=False).run(records(2))
    summary = summarize(layout, {"layers.1": [0, 1, 5]}, ["detection"], {"layers.1": {9: "few"}})
    rows = {r["name"]: r for r in summary["rows"]}
    det = rows["detection"]
    assert det["latents"] == 2 and det["missing"] == 1 and det["skipped_min_examples"] == 1
    assert det["failed_prompts"] == 6 and det["failed_examples"] == 26 and det["calls"] == 6
    assert rows["default"]["latents"] == 2 and rows["default"]["calls"] == 2


class _MinimalOptions(saelab.Options):
    """A third-party provider's options: only a model name."""

    model: str | None = None
    """Recorded with every explanation and score."""


class _MinimalProvider(saelab.Provider):
    """A third-party provider that implements ``generate`` only: the interface's defaults do the rest
    (constructor, model, max_concurrency, identity, aclose)."""

    name = "minimal"
    Options = _MinimalOptions

    async def generate(self, messages, **params) -> Completion:
        return Completion(text="[EXPLANATION]: the letter e", prompt_tokens=3, completion_tokens=5)


class _MinimalPlugin:
    @saelab.hookimpl
    def register_providers(self, register) -> None:
        register(_MinimalProvider)


def test_a_provider_with_only_generate_runs_through_the_factory_and_the_engine(tmp_path):
    from saelab.pipeline import make_run_provider

    saelab.register_plugin(_MinimalPlugin(), name="minimal-provider")
    provider = make_run_provider("minimal", model="tiny-model", max_concurrency=3, given={"model"})
    assert isinstance(provider, _MinimalProvider) and isinstance(provider.options, _MinimalOptions)
    assert (provider.model, provider.max_concurrency) == ("tiny-model", None)
    assert provider.identity() == {"provider": "minimal", "model": "tiny-model"}
    layout = RunLayout(tmp_path / "r")
    engine = AutoInterp(layout, make_explainer("default"), make_scorers(["detection"]), provider, progress=False)
    assert engine.latent_concurrency == 4  # no limit of its own: twice the fallback of 2
    report = engine.run(records(2))  # the default aclose() is awaited at the end
    assert report.explain.computed == 2 and not report.errors
    explanation = Explanation.load(layout.explanation_path("layers.1", 0))
    assert (explanation.text, explanation.provider, explanation.model) == ("the letter e", "minimal", "tiny-model")
    assert ScoreResult.load(layout.score_path("detection", "layers.1", 0)).model == "tiny-model"
    unnamed = _MinimalProvider()  # built without options: its own model says nothing
    assert (unnamed.model, unnamed.identity()["model"]) == ("", "")
    unnamed.model = "assigned"
    assert unnamed.identity() == {"provider": "minimal", "model": "assigned"}


def test_answer_budget_defaults_to_the_options_max_tokens():
    """The engine's dry-run and context-fitting budget: ``call_params()["max_tokens"]``; a plugin without
    ``call_params`` of its own gives its options' ``max_tokens`` when it has one, else nothing."""
    from saelab.pipeline import _max_tokens

    class Budget(saelab.Options):
        max_tokens: int = 77
        """Longest answer."""

    class Bare(saelab.Scorer):
        name = "bare-budget"

        async def score(self, record, explanation, provider):
            raise AssertionError("not called")

    class Budgeted(Bare):
        Options = Budget

    assert Bare().call_params() == {} and _max_tokens(Bare()) == 0
    assert Budgeted().call_params() == {"max_tokens": 77} and _max_tokens(Budgeted()) == 77
    assert _max_tokens(make_explainer("default")) == make_explainer("default").options.max_tokens
    assert _max_tokens(None) == 0


def test_llm_explainer_and_prompt_scorer_options_must_subclass_their_base():
    from saelab.autointerp import LLMExplainer, PromptScorer

    class Own(saelab.Options):
        few_shot: bool = True
        """Few-shot examples."""

    class Odd(LLMExplainer):
        name = "odd"
        prompt_prefix = "explainers.odd"
        Options = Own  # type: ignore[assignment]

    class OddScorer(PromptScorer):
        name = "odd-scorer"
        prompt_prefix = "scorers.odd"
        Options = Own  # type: ignore[assignment]

    for cls, base in ((Odd, "ExplainerOptions"), (OddScorer, "ScorerOptions")):
        with pytest.raises(saelab.UsageError, match=f"Own, which do not subclass saelab.autointerp.{base}"):
            cls()


# --------------------------------------------------------------------------------------------------
# Commands


def test_explain_and_score_commands_over_a_run_dir(cli, results_dir):
    layout = make_run(results_dir)
    handler = SmartHandler()
    with ScriptedLLMServer(handler) as server:
        env = {"OPENAI_API_KEY": API_KEY}
        r = cli("explain", "run", *stage_args(server, "--max_latents", "4"), env=env)
        assert r.exit_code == 0, r.stderr
        assert handler.counts == {"explain": 4}
        r = cli("score", "run", *stage_args(server, "--scorers", "recall", "--feature_num", "0", "1", "5"), env=env)
        assert r.exit_code == 0, r.stderr
        assert handler.counts == {"explain": 4, "binary": 6}  # latent 5 has no explanation
    assert sorted(p.name for p in (layout.root / "scores" / "detection" / "layers.1").glob("*.json")) == [
        "latent_0.json", "latent_1.json"]
    assert not layout.explanation_path("layers.1", 5).exists()  # latent 5 had no explanation
    summary = json.loads(layout.summary_json.read_text())
    det = next(r for r in summary["rows"] if r["name"] == "detection")
    assert det["latents"] == 2 and det["skipped_min_examples"] == 1
    assert summary["this_invocation"]["scores"]["detection"]["skipped"] == 1
    assert "detection" in layout.summary_csv.read_text()
    config = json.loads((layout.root / "run_config.json").read_text())
    assert config["commands"]["score"]["config"]["scorers"] == ["recall"]


def test_score_takes_provider_defaults_from_the_run_config(cli, results_dir):
    make_run(results_dir)
    handler = SmartHandler()
    with ScriptedLLMServer(handler) as server:
        env = {"OPENAI_API_KEY": API_KEY}
        assert cli("explain", "run", *stage_args(server, "--max_latents", "1"), env=env).exit_code == 0
        r = cli("score", "run", "--scorers", "detection", "--max_latents", "1", "--verbose", "false", env=env)
        assert r.exit_code == 0, r.stderr
        assert handler.counts == {"explain": 1, "binary": 3}


def test_dry_run_command_makes_zero_requests(cli, results_dir):
    layout = make_run(results_dir)
    with ScriptedLLMServer(SmartHandler()) as server:
        r = cli("explain", "run", *stage_args(server, "--dry_run"), env={"OPENAI_API_KEY": API_KEY})
        assert r.exit_code == 0, r.stderr
        assert len(server.requests) == 0
    assert "6 LLM calls" in r.stdout and "prompt tokens" in r.stdout
    assert not (layout.root / "explanations").exists()


def test_response_cache_hit_under_overwrite_scores(cli, results_dir):
    layout = make_run(results_dir, n=3)
    handler = SmartHandler()
    with ScriptedLLMServer(handler) as server:
        env = {"OPENAI_API_KEY": API_KEY}
        assert cli("explain", "run", *stage_args(server), env=env).exit_code == 0
        assert cli("score", "run", *stage_args(server, "--scorers", "detection"), env=env).exit_code == 0
        first = ScoreResult.load(layout.score_path("detection", "layers.1", 0))
        assert first.usage.cached_calls == 0
        server.reset()
        time.sleep(1.1)  # created_at has one-second resolution
        r = cli("score", "run", *stage_args(server, "--scorers", "detection", "--overwrite", "scores"), env=env)
        assert r.exit_code == 0, r.stderr
        assert len(server.chat_requests) == 0
    again = ScoreResult.load(layout.score_path("detection", "layers.1", 0))
    assert again.created_at != first.created_at
    assert again.usage.cached_calls == again.usage.calls == 3
    assert again.metrics == first.metrics
    assert (layout.root / "llm_cache").is_dir()


def test_api_key_never_written_or_logged(cli, results_dir):
    layout = make_run(results_dir, n=2)
    with ScriptedLLMServer(SmartHandler()) as server:
        env = {"OPENAI_API_KEY": API_KEY}
        outputs = []
        for command in (("explain", "run"), ("score", "run", "--scorers", "detection", "fuzz")):
            r = cli(*command, *stage_args(server, "--verbose", "true"), env=env)
            assert r.exit_code == 0, r.stderr
            outputs.append(r.output)
        assert all(req.headers.get("authorization") == f"Bearer {API_KEY}" for req in server.chat_requests)
    assert all(API_KEY not in out for out in outputs)
    files = [p for p in layout.root.rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        assert API_KEY.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("command", ["explain", "score"])
def test_resume_after_sigkill_makes_no_requests_for_finished_latents(tmp_path, results_dir, command):
    n = 8
    layout = make_run(results_dir, n=n)
    env = dict(os.environ, OPENAI_API_KEY=API_KEY, PYTHONUNBUFFERED="1")
    handler = SmartHandler(delay_s=0.3)
    with ScriptedLLMServer(handler) as server:
        if command == "score":  # explanations first (fast), then kill the scoring
            handler.delay_s = 0.0
            subprocess.run([sys.executable, "-m", "saelab", "explain", "run", *stage_args(server)], env=env,
                           check=True, capture_output=True, timeout=120)
            handler.delay_s = 0.3
        args = [sys.executable, "-m", "saelab", command, "run", *stage_args(server, "--response_cache", "false",
                                                                            "--max_concurrency", "1")]
        if command == "score":
            args += ["--scorers", "detection"]
        out_dir = (layout.root / ("explanations" if command == "explain" else "scores/detection") / "layers.1")
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if out_dir.is_dir() and len(list(out_dir.glob("latent_*.json"))) >= 2:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done = sorted(out_dir.glob("latent_*.json"))
        assert 2 <= len(done) < n
        assert not list(out_dir.glob(".*tmp"))  # atomic writes: no half-written file left behind
        time.sleep(1.0)  # let requests the killed client had already sent reach the server before counting
        server.reset()
        handler.delay_s = 0.0
        result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        per_latent = 1 if command == "explain" else 3
        assert len(server.chat_requests) == (n - len(done)) * per_latent
    assert len(list(out_dir.glob("latent_*.json"))) == n


def test_records_round_trip_and_selection(tmp_path):
    layout = make_run(tmp_path, n=5)
    rs = load_records(layout, "layers.1", latents=[3, 1])
    assert [r.latent for r in rs.records] == [1, 3] and rs.skipped == {99: "too few"}
    assert layout.hookpoints_with_records() == ["layers.1"]
