"""A reduced `make demo` end to end on the embedded SmolLM2: the same commands as the Makefile's
demo-pipeline with fewer tokens, a small SAE and two latents; every stage's outputs must exist and parse,
and a second run must reuse everything (no LLM request)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import run_saelab_subprocess
from saelab.records import Explanation, LatentRecord, ScoreResult

pytestmark = pytest.mark.slow

HOOK = "layers.15"
TOKENS = "16384"
DATA = ["--dataset_repo", "wikipedia-sample", "--n_tokens", TOKENS, "--name", "demo"]
RUN = ["run", "smollm2", None, "--hookpoints", HOOK, *DATA, "--max_latents", "2", "--scorers", "detection", "fuzz",
       "--min_examples", "20", "--n_examples_train", "8", "--n_examples_test", "5", "--n_non_activating", "5",
       "--num_examples_per_scorer_prompt", "5", "--n_splits", "2", "--explainer_provider", "offline",
       "--enable_visualization"]


def _ok(*args: str) -> str:
    proc = run_saelab_subprocess(list(args), timeout=1200)
    assert proc.returncode == 0, f"saelab {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_reduced_demo_end_to_end(results_dir: Path) -> None:
    run = results_dir / "demo"
    _ok("cache", "smollm2", "--hookpoints", HOOK, *DATA)
    manifests = list((results_dir / ".activations").glob("*/manifest.json"))
    assert len(manifests) == 1 and json.loads(manifests[0].read_text())

    _ok("train", "smollm2", "--hookpoints", HOOK, *DATA, "--architecture", "topk", "-o", "d_sae", "256",
        "-o", "k", "16", "--epochs", "1", "--init_rows", "4096")
    dictionaries = [p.parent for p in (run / "dictionaries").glob("*/cfg.json")]
    assert len(dictionaries) == 1
    assert json.loads((dictionaries[0] / "cfg.json").read_text())["d_sae"] == 256

    _ok("evaluate", str(run), "--n_tokens", "2048", "--batch_size", "4")
    metrics = json.loads((dictionaries[0] / "eval.json").read_text())["metrics"]
    for key in ("fvu", "l0", "dead_frac", "ce_loss_recovered"):
        assert key in metrics
    assert 0 < metrics["l0"] <= 16

    args = [str(run) if a is None else a for a in RUN]
    first = _ok(*args)
    stats = json.loads(next((run / "latents").glob("*/stats.json")).read_text())
    assert stats["d_sae"] == 256
    index = json.loads(next((run / "records").glob("*/index.json")).read_text())
    latents = index["latents"]
    assert len(latents) == 2
    hook_dir = next((run / "records").glob("*/index.json")).parent.name
    for latent in latents:
        record = LatentRecord.load(run / "records" / hook_dir / f"latent_{latent}.json")
        assert record.train and record.test and record.non_activating
        explanation = Explanation.load(run / "explanations" / hook_dir / f"latent_{latent}.json")
        assert explanation.raw_responses and explanation.error is None
        for scorer in ("detection", "fuzz"):
            score = ScoreResult.load(run / "scores" / scorer / hook_dir / f"latent_{latent}.json")
            assert len(score.predictions) == 10 and "balanced_accuracy" in score.metrics
        assert (run / "report" / "latents" / hook_dir / f"latent_{latent}.html").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert {r["name"] for r in summary["rows"] if r["stage"] == "score"} == {"detection", "fuzz"}
    page = (run / "report" / "index.html").read_text(encoding="utf-8")
    data = json.loads(re.search(r'id="report-data">(.*?)</script>', page, re.S).group(1))
    assert sorted(r["latent"] for r in data["latents"]) == sorted(latents)
    assert data["scorers"] == ["detection", "fuzz"]
    assert "report:" in first

    second = _ok(*args)  # everything reused: no LLM request
    assert re.search(r"\b0 LLM requests\b", second), second
