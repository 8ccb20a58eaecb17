"""The HTML report plugin (saelab.plugins.report, `saelab report`) over a synthetic run directory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from report_helpers import EXPLANATIONS, HOOK, LATENTS, PAYLOADS, SCORES, build_run
from saelab.plugins.report import html as report
from saelab.plugins.report import run_data
from saelab.records import Explanation

DATA_RE = re.compile(r'<script type="application/json" id="report-data">(.*?)</script>', re.S)


def _data(page: Path) -> dict:
    match = DATA_RE.search(page.read_text(encoding="utf-8"))
    assert match, f"no inline data in {page}"
    return json.loads(match.group(1))


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return build_run(tmp_path / "results" / "synth")


def test_script_json_escapes_and_round_trips() -> None:
    data = {"a": list(PAYLOADS), "b": "x\u2028y\u2029z & <b>", "n": float("nan")}
    text = report.script_json(data)
    for bad in ("<", ">", "&", "\u2028", "\u2029"):
        assert bad not in text
    assert json.loads(text) == {**data, "n": None}


def test_report_pages_escape_every_payload(run: Path) -> None:
    index = report.write_report(run)
    assert index == run / "report" / "index.html"
    pages = [index, *sorted((run / "report" / "latents" / HOOK).glob("*.html"))]
    assert [p.name for p in pages[1:]] == sorted(f"latent_{i}.html" for i in LATENTS)
    for page in pages:
        html = page.read_text(encoding="utf-8")
        for payload in PAYLOADS:
            assert payload not in html, f"raw payload in {page.name}"
        # exactly the two script elements the report writes: the inline data and report.js
        assert html.count("<script") == 2, page.name
        assert html.count("</script>") == 2, page.name
        assert "<img" not in html
    assert (run / "report" / "assets" / "report.js").is_file()
    assert (run / "report" / "assets" / "report.css").is_file()


def test_index_data_and_tables(run: Path) -> None:
    index = report.write_report(run)
    data = _data(index)
    assert data["scorers"] == ["detection", "fuzz"]
    rows = {r["latent"]: r for r in data["latents"]}
    assert sorted(rows) == sorted(LATENTS)
    for latent, text in EXPLANATIONS.items():
        assert rows[latent]["explanation"] == text  # payloads survive the JSON round trip unchanged
        assert rows[latent]["scores"] == {s: SCORES[s][latent] for s in SCORES}
        assert rows[latent]["href"] == f"latents/{HOOK}/latent_{latent}.html"
        assert (index.parent / rows[latent]["href"]).is_file()
    assert rows[42]["explanation"] is None and rows[42]["scores"] == {}
    assert rows[3]["frequency"] == pytest.approx(0.02) and rows[3]["max_activation"] == pytest.approx(12.5)
    html = index.read_text(encoding="utf-8")
    assert "12.500" in html and "0.910" in html  # dead % and CE loss recovered
    assert "firing frequency (49 alive, 15 dead)" in html
    assert html.count('<svg class="plot"') == 3  # detection, fuzz, frequency


def test_latent_page_content(run: Path) -> None:
    report.write_report(run)
    page = (run / "report" / "latents" / HOOK / "latent_7.html").read_text(encoding="utf-8")
    assert "closing HTML tags &lt;/script&gt;&lt;script&gt;window.__pwned=1&lt;/script&gt;" in page
    # predictions: 8 per scorer, every third one wrong (j % 3 == 0: j = 0, 3, 6)
    assert page.count("\u2717 wrong") == 2 * 3 and page.count("\u2713 right") == 2 * 5
    assert "(5 of 8 right)" in page
    # neighbours link to pages that exist; token activations are in title attributes
    links = re.findall(r'class="neighbour" href="(latent_\d+\.html)"', page)
    assert links and all((run / "report" / "latents" / HOOK / link).is_file() for link in links)
    assert 'title="3.25"' in page
    assert "activations where the latent fires" in page
    assert "top positive logits" in page and "&lt;img src=x onerror=" in page
    assert _data(run / "report" / "latents" / HOOK / "latent_7.html")["explanation"] == EXPLANATIONS[7]


def test_svg_histogram_bars_and_errors() -> None:
    svg = report.svg_histogram([1, 0, 3, 2], [0, 1, 2, 3, 4], title="t <x>", xlabel="x")
    assert svg.count('<rect class="bar"') == 3
    assert "t &lt;x&gt;" in svg
    with pytest.raises(ValueError):
        report.svg_histogram([1, 2], [0, 1], title="t", xlabel="x")
    counts, edges = run_data.histogram([0.0, 0.5, 1.0, 2.0], 0.0, 1.0, 2)
    assert counts == [1, 3] and edges == [0.0, 0.5, 1.0]


def test_main_metric_per_scorer() -> None:
    assert run_data.main_metric("detection", {"balanced_accuracy": 0.7, "auc": 0.9}) == ("balanced_accuracy", 0.7)
    assert run_data.main_metric("simulation", {"correlation": 0.3, "balanced_accuracy": 0.6}) == ("correlation", 0.3)
    assert run_data.main_metric("mine", {"auc": 0.8}) == ("auc", 0.8)
    assert run_data.main_metric("fuzz", {"balanced_accuracy": None})[1] is None


def test_rerun_drops_stale_pages_and_max_latents(run: Path) -> None:
    report.write_report(run)
    report.write_report(run, max_latents=2)
    pages = sorted(p.name for p in (run / "report" / "latents" / HOOK).glob("*.html"))
    assert pages == ["latent_3.html", "latent_7.html"]
    assert not list(run.glob(".report.*"))


def test_missing_stats_and_broken_file(tmp_path: Path) -> None:
    run = build_run(tmp_path / "r", with_stats=False)
    (run / "explanations" / HOOK / "latent_11.json").write_text("{not json")
    report.write_report(run)
    page = (run / "report" / "latents" / HOOK / "latent_11.html").read_text(encoding="utf-8")
    assert "unreadable: latent_11.json" in page and "not explained yet" in page
    # no latent cache: the histogram comes from the examples' activations, stats from the records
    assert "activations where the latent fires" in page
    rows = {r["latent"]: r for r in _data(run / "report" / "index.html")["latents"]}
    assert rows[3]["frequency"] == pytest.approx(0.02)
    assert Explanation.load(run / "explanations" / HOOK / "latent_3.json").text == EXPLANATIONS[3]


def test_report_command(run: Path, cli) -> None:
    result = cli("report", "synth")
    assert result.exit_code == 0, result.output
    assert "latent pages" in result.stdout and "index.html" in result.stdout
    assert (run / "report" / "index.html").is_file()
    out = run.parent / "elsewhere"
    assert cli("report", str(run), "--out", str(out), "--max_latents", "1").exit_code == 0
    assert [p.name for p in (out / "latents" / HOOK).glob("*.html")] == ["latent_3.html"]


def test_report_command_unknown_run(cli) -> None:
    cli("report", "nope").assert_user_error("'nope' not found")


def _fail_fuzz(run: Path, latent: int, failed: int, total: int) -> None:
    """Rewrite the fuzz score of ``latent`` as one whose ``failed`` of ``total`` prompts failed (no value
    when all did)."""
    from saelab.records import Failures, ScoreResult

    path = run / "scores" / "fuzz" / HOOK / f"latent_{latent}.json"
    score = ScoreResult.load(path)
    score.failures = Failures(prompts=failed, examples=4 * failed, requests=0)
    score.n_prompts = total
    if failed == total:
        score.metrics = {"balanced_accuracy": None, "f1": None, "auc": None}
    score.save(path)


def test_failed_score_prompts_are_shown_not_blank(run: Path, cli) -> None:
    _fail_fuzz(run, 3, 10, 10)
    _fail_fuzz(run, 7, 3, 10)
    assert cli("report", str(run)).exit_code == 0
    index = run / "report" / "index.html"
    rows = {r["latent"]: r for r in _data(index)["latents"]}
    assert rows[3]["scores"]["fuzz"] is None and rows[3]["failures"] == {"fuzz": "failed 10/10 prompts"}
    assert rows[7]["failures"] == {"fuzz": "failed 3/10 prompts"} and rows[11]["failures"] == {}
    html = index.read_text(encoding="utf-8")
    assert re.search(r'id="failures-fuzz"><b>fuzz</b>: failed 13/\d+ prompts; 1 of 4 latents have no score', html)
    assert "failures-detection" not in html
    page = (run / "report" / "latents" / HOOK / "latent_3.html").read_text(encoding="utf-8")
    assert '<span class="failed">failed 10/10 prompts</span></h3>' in page
    js = (run / "report" / "assets" / "report.js").read_text(encoding="utf-8")
    assert "r.failures" in js  # the latent table shows the note in the score cell


@pytest.mark.parametrize("hook", ["layers.1", "model.layers.10.mlp.down_proj", "x" * 90])
def test_plot_titles_fit_inside_the_svg(hook: str) -> None:
    freqs = [10 ** -(i % 5) for i in range(20000)] + [0.0] * 123
    svg = report.frequency_histogram_svg(freqs, f"{hook} firing frequency")
    width = int(re.search(r'<svg[^>]* width="(\d+)"', svg).group(1))
    titles = re.findall(r'<text class="plot-title" x="([\d.]+)" y="([\d.]+)">([^<]*)</text>', svg)
    assert titles and " ".join(t for _, _, t in titles).replace(" ", "") == \
        f"{hook} firing frequency (20000 alive, 123 dead)".replace(" ", "")
    for x, _, text in titles:  # upper estimate of the rendered width of a 12 px semi-bold title
        assert float(x) + len(text) * report.TITLE_CHAR_WIDTH <= width - report.TITLE_MARGIN + 1e-9
    bars_top = min(float(y) for y in re.findall(r'<rect class="bar" x="[\d.]+" y="([\d.]+)"', svg))
    assert bars_top > float(titles[-1][1])  # the plot starts below the (wrapped) title


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_killed_report_writes_are_removed(run: Path, cli) -> None:
    import signal
    import subprocess
    import sys

    # a `saelab report` killed mid-write leaves its .report.tmp-<pid>/ behind
    killed = subprocess.Popen([sys.executable, "-c", "import os, pathlib, time; "
                               f"d = pathlib.Path({str(run)!r}) / f'.report.tmp-{{os.getpid()}}'; "
                               "(d / 'latents').mkdir(parents=True); print('ready', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert killed.stdout.readline().strip() == "ready"
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        stale = [run / f".report.tmp-{killed.pid}", run / f".report.old-{_dead_pid()}"]
        stale[1].mkdir()
        kept = run / f".report.tmp-{live.pid}"
        kept.mkdir()
        assert stale[0].is_dir()
        assert cli("report", str(run)).exit_code == 0
        assert not any(p.exists() for p in stale) and kept.is_dir()  # a live writer's directory is left alone
        assert (run / "report" / "index.html").is_file()
    finally:
        for proc in (killed, live):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_run_writes_its_report_through_the_report_command_and_no_report_disables_it(cli, results_dir, tmp_path):
    """``saelab run --enable_visualization`` invokes the registered ``report`` command; ``-p no:report``
    leaves the run whole but writes no report and says so in one line."""
    from llm_server import ScriptedLLMServer
    from pipeline_helpers import API_KEY, SmartHandler, make_dictionary, run_args

    d = make_dictionary(tmp_path / "dict")
    env = {"OPENAI_API_KEY": API_KEY, "HF_TOKEN": None}
    root = results_dir / "viz"
    with ScriptedLLMServer(SmartHandler()) as server:
        args = run_args(d, "viz", server.base_url, "--enable_visualization")
        off = cli("-p", "no:report", *args, "--verbose", "true", env=env)
        assert off.exit_code == 0, off.output
        assert ("--enable_visualization: the report plugin (report) is disabled or not installed; "
                "no report written") in off.stdout
        assert (root / "summary.json").is_file() and not (root / "report").exists()
        quiet = cli(*args, env=env)  # --verbose false: the report is written, nothing is printed about it
        assert quiet.exit_code == 0, quiet.output
        assert (root / "report" / "index.html").is_file() and "report" not in quiet.stdout
        loud = cli(*args, "--verbose", "true", env=env)
    assert loud.exit_code == 0, loud.output
    index = root / "report" / "index.html"
    # the run prints the path as before, not the `saelab report` summary table or file:// URI
    assert f"report: {index}" in loud.stdout.replace("\n", "")
    assert "latent pages" not in loud.stdout and "file://" not in loud.stdout
    rows = _data(index)["latents"]
    assert {r["latent"] for r in rows} and all(r["hookpoint"] == "layers.0" for r in rows)
    assert (root / "report" / "assets" / "report.js").is_file()
