"""The HTML report in headless Debian chromium (Playwright, no browser download).

Skipped when chromium or Playwright is missing, except with ``CI=true``, where that fails the test.
``make test`` installs both (``make browser-deps``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from report_helpers import EXPLANATIONS, HOOK, LATENTS, PAYLOADS, build_run
from saelab.plugins.report.html import write_report

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def _chromium() -> str | None:
    for name in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if os.path.exists(name):
            return name
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: browser tests must run; `make browser-deps` installs it)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = _chromium()
    if executable is None:
        _unavailable("chromium is not installed")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright (python) is not installed")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


class Page:
    """A page plus every console error, page error and failed request it produced."""

    def __init__(self, browser: Any):
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.problems: list[str] = []
        self.page.on("console", lambda m: self.problems.append(f"console {m.type}: {m.text}")
                     if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"request failed: {r.url}"))

    def rows(self) -> list[int]:
        """Latent ids of the visible rows of the latent table, in order."""
        return [int(x) for x in self.page.eval_on_selector_all(
            "#latent-table tbody tr:not([hidden])", "rows => rows.map(r => r.dataset.latent)")]

    def pwned(self) -> Any:
        return self.page.evaluate("() => window.__pwned")


@pytest.fixture
def report(tmp_path: Path) -> Path:
    run = build_run(tmp_path / "run")
    return write_report(run)


def test_latent_table_sorts_and_filters(browser: Any, report: Path, tmp_path: Path) -> None:
    p = Page(browser)
    p.page.goto(report.as_uri())
    assert p.rows() == list(LATENTS)
    p.page.click('th[data-key="score:detection"]')  # scores sort best first; unscored latents last
    assert p.rows() == [3, 11, 20, 7, 42]
    assert p.page.get_attribute('th[data-key="score:detection"]', "aria-sort") == "descending"
    p.page.click('th[data-key="score:detection"]')
    assert p.rows() == [7, 20, 11, 3, 42]
    p.page.click('th[data-key="frequency"]')
    assert p.rows() == [11, 3, 20, 7, 42]
    p.page.click('th[data-key="latent"]')
    assert p.rows() == [3, 7, 11, 20, 42]
    p.page.click('th[data-key="explanation"]')
    assert p.rows()[-1] == 42  # the unexplained latent sorts last
    p.page.fill("#filter", "moon")
    assert p.rows() == [3]
    assert p.page.text_content("#count") == "1 of 5 latents shown"
    p.page.fill("#filter", "PWNED")
    assert sorted(p.rows()) == [7, 11, 20]
    p.page.fill("#filter", "")
    assert len(p.rows()) == 5
    p.page.screenshot(path=str(tmp_path / "index.png"), full_page=True)
    assert (tmp_path / "index.png").stat().st_size > 10_000
    assert p.problems == []
    assert p.pwned() is None


def test_payloads_show_as_text_and_never_run(browser: Any, report: Path) -> None:
    p = Page(browser)
    p.page.goto(report.as_uri())
    texts = p.page.eval_on_selector_all("#latent-table td.expl", "cells => cells.map(c => c.textContent)")
    for latent in (7, 11, 20):
        assert EXPLANATIONS[latent] in texts
    config = p.page.text_content("#config pre")
    assert PAYLOADS[0] in config  # the dataset name in run_config.json
    assert p.page.query_selector_all("#latent-table img, #latent-table script") == []
    assert p.pwned() is None
    for latent in LATENTS:
        p.page.goto((report.parent / "latents" / HOOK / f"latent_{latent}.html").as_uri())
        assert p.pwned() is None, f"payload ran on latent {latent}'s page"
        assert p.page.query_selector_all("img") == []
        assert len(p.page.query_selector_all("script")) == 2
        body = p.page.inner_text("body")
        assert "".join(PAYLOADS).replace(" ", "") in body.replace(" ", "")  # dataset tokens, spaces dropped
        if latent in EXPLANATIONS:
            assert p.page.text_content("#explanation") == EXPLANATIONS[latent]
    assert p.problems == []


def test_links_between_pages_and_hover(browser: Any, report: Path, tmp_path: Path) -> None:
    p = Page(browser)
    p.page.goto(report.as_uri())
    p.page.click('#latent-table tr[data-latent="7"] a.latent-link')
    p.page.wait_for_load_state()
    assert p.page.url.endswith(f"/latents/{HOOK}/latent_7.html")
    assert p.page.text_content("h1") == f"{HOOK} latent 7"
    assert p.page.text_content("#explanation") == EXPLANATIONS[7]
    p.page.hover("#top-examples .tok.on >> nth=0")
    assert p.page.is_visible("#tooltip")
    assert "3.25" in p.page.text_content("#tooltip")
    p.page.screenshot(path=str(tmp_path / "latent_7.png"), full_page=True)
    p.page.click('#neighbours a.neighbour >> nth=0')
    p.page.wait_for_load_state()
    assert p.page.url.endswith(f"/latents/{HOOK}/latent_3.html")
    assert p.page.text_content("h1") == f"{HOOK} latent 3"
    p.page.click("#back")
    p.page.wait_for_load_state()
    assert p.page.url.endswith("/index.html")
    assert len(p.rows()) == 5
    assert p.problems == []
    assert p.pwned() is None
