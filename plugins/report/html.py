"""The HTML report of a run: a static site in ``results/<name>/report/`` that opens from ``file://``.

:func:`write_report` reads a run directory with :func:`saelab.plugins.report.run_data.load_run` (the layout
of :mod:`saelab.pipeline`, the latent caches of :mod:`saelab.latents`, the dictionaries' ``eval.json``)
and writes::

    report/index.html                          run config, evaluation table, histograms, latent table
    report/latents/<hook>/latent_<i>.html      one page per latent that has a record, explanation or score
    report/assets/report.css, report.js        copied from this plugin package (``assets/``)

No server and no network: a ``file://`` page cannot fetch JSON, so each page's data is inlined as JSON
in ``<script type="application/json">`` (with ``<``, ``>``, ``&``, U+2028 and U+2029 written as
``\\uXXXX`` escapes, so text can never close the script element) and the JavaScript builds the latent
table from it with ``textContent`` only. Everything else is rendered here with :func:`html.escape`.
Dataset text and LLM answers therefore show as text and never run.

Plots are inline SVG generated here from the data (no matplotlib, no plotting library in the page):
histograms of each scorer's per-latent score, of latent firing frequency (log10 axis), and per latent
of its activations (from ``stats.safetensors``) with a log count axis.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from saelab.fileio import remove_stale_temporaries
from saelab.highlight import display_spans, span_activations, span_texts, visible
from saelab.layout import RunLayout
from saelab.paired import split_site
from saelab.plugins.report.run_data import (
    HookData,
    LatentEntry,
    RunData,
    failure_note,
    histogram,
    load_run,
    main_metric,
)
from saelab.records import Example, ScoreResult

LATENT_PAGES = "latents"
"""Folder of the latent pages inside the report site (the site's own layout, not the run's)."""
ASSETS = ("report.css", "report.js")
"""Files copied from this package's ``assets/`` into ``report/assets/``."""

EVAL_COLUMNS = (("fvu", "FVU"), ("explained_variance", "explained var."), ("l0", "L0"),
                ("dead_frac", "dead %"), ("ce_loss_recovered", "CE loss recovered"), ("fvu_all", "FVU (all pos.)"),
                ("kl_spliced", "KL spliced"), ("tokens", "tokens"))
"""Columns of the evaluation table: (``eval.json`` metric, header)."""

N_TOP_EXAMPLES = 10
"""Top examples shown per latent page."""
PER_QUANTILE = 3
"""Examples shown per activation quantile."""


# --------------------------------------------------------------------------------------------------
# Escaping


_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0))}
"""Control characters (all but tab, newline and carriage return) as visible ``\\xNN`` text: HTML must not
carry them raw (a NUL is a parse error and shows as nothing or U+FFFD)."""


def esc(value: Any) -> str:
    """HTML-escape ``value`` (quotes included) for text and attribute values; control characters other
    than tab and newlines are written as visible ``\\xNN`` escapes, never raw."""
    return html.escape("" if value is None else str(value), quote=True).translate(_CONTROL_ESCAPES)


_SCRIPT_ESCAPES = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026",
                   0x2028: "\\u2028", 0x2029: "\\u2029", **{c: f"\\u{c:04x}" for c in range(0x7F, 0xA0)}}


def _clean(value: Any) -> Any:
    """``value`` with NaN/inf floats replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def script_json(data: Any) -> str:
    """``data`` as JSON safe to inline in ``<script type="application/json">``: ``<``, ``>``, ``&``,
    U+2028, U+2029 and the DEL/C1 controls become ``\\uXXXX`` escapes (still valid JSON, parsed back
    unchanged; ``json`` already escapes the C0 controls)."""
    text = json.dumps(_clean(data), ensure_ascii=False, allow_nan=False, default=str)
    return text.translate(_SCRIPT_ESCAPES)


def fmt(value: Any, digits: int = 3) -> str:
    """Compact number formatting for tables ('' for None)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return ""
        if value != 0 and (abs(value) < 10 ** -digits or abs(value) >= 1e5):
            return f"{value:.{max(1, digits - 1)}e}"
        return f"{value:.{digits}f}"
    return str(value)


# --------------------------------------------------------------------------------------------------
# Inline SVG plots


TITLE_CHAR_WIDTH = 7.5
"""Upper estimate of the width of one character of a plot title (12 px, semi-bold, proportional font)."""
TITLE_LINE_HEIGHT = 15
"""Pixels between the lines of a wrapped plot title."""
TITLE_MARGIN = 6
"""Space kept left and right of a plot title."""


def _text_width(text: str) -> float:
    return len(text) * TITLE_CHAR_WIDTH


def title_lines_for(title: str, width: int) -> list[str]:
    """``title`` as lines that fit a plot ``width`` pixels wide (words wrapped; a word too long for a
    line is cut), so no title is clipped by the SVG's edge."""
    room = max(1, int((width - 2 * TITLE_MARGIN) // TITLE_CHAR_WIDTH))
    lines: list[str] = []
    line = ""
    for word in title.split():
        while len(word) > room:
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:room])
            word = word[room:]
        if not line:
            line = word
        elif len(line) + 1 + len(word) <= room:
            line += " " + word
        else:
            lines.append(line)
            line = word
    if line or not lines:
        lines.append(line)
    return lines


@dataclass
class _Frame:
    """The frame shared by the report's SVG plots: the plot area and the SVG parts written so far."""

    left: int
    top: int
    pw: int
    ph: int
    height: int
    parts: list[str]


def _open_plot(title: str, width: int, height: int) -> _Frame:
    """The ``<svg>`` element and its (wrapped) title; a wrapped title gets more room, the plot keeps its size."""
    left, right, top, bottom = 46, 10, 22, 36
    title_lines = title_lines_for(title, width)
    extra = TITLE_LINE_HEIGHT * (len(title_lines) - 1)
    top, height = top + extra, height + extra
    parts = [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">']
    title_x = left if len(title_lines) == 1 and _text_width(title) <= width - left - TITLE_MARGIN else TITLE_MARGIN
    parts += [f'<text class="plot-title" x="{title_x}" y="{14 + TITLE_LINE_HEIGHT * k}">{esc(line)}</text>'
              for k, line in enumerate(title_lines)]
    return _Frame(left, top, width - left - right, height - top - bottom, height, parts)


def _close_plot(f: _Frame, y_max: str, x_ticks: Sequence[str], xlabel: str, ylabel: str) -> str:
    """Axes, the y range (``y_max`` at the top, 0 at the bottom), the x-tick parts and the axis labels."""
    left, top, pw, ph = f.left, f.top, f.pw, f.ph
    f.parts.append(f'<line class="axis" x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}"/>')
    f.parts.append(f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}"/>')
    f.parts.append(f'<text class="tick" x="{left - 4}" y="{top + 4}" text-anchor="end">{esc(y_max)}</text>')
    f.parts.append(f'<text class="tick" x="{left - 4}" y="{top + ph}" text-anchor="end">0</text>')
    f.parts += x_ticks
    f.parts.append(f'<text class="label" x="{left + pw / 2:.1f}" y="{f.height - 4}" text-anchor="middle">'
                   f'{esc(xlabel)}</text>')
    f.parts.append(f'<text class="label" x="10" y="{top + ph / 2:.1f}" text-anchor="middle" '
                   f'transform="rotate(-90 10 {top + ph / 2:.1f})">{esc(ylabel)}</text>')
    f.parts.append("</svg>")
    return "".join(f.parts)


def svg_histogram(counts: Sequence[float], edges: Sequence[float], *, title: str, xlabel: str,
                  ylabel: str = "latents", log_y: bool = False, x_ticks: Sequence[tuple[float, str]] | None = None,
                  width: int = 380, height: int = 170) -> str:
    """An inline SVG bar histogram of ``counts`` over bins ``edges`` (``len(edges) == len(counts) + 1``).

    ``log_y`` draws bar heights as ``log10(1 + count)``; ``x_ticks`` are (x value, label) pairs (default:
    the first, middle and last edge). Each bar has a ``<title>`` with its range and count.
    """
    if len(edges) != len(counts) + 1:
        raise ValueError(f"svg_histogram: {len(edges)} edges for {len(counts)} counts")
    f = _open_plot(title, width, height)
    left, top, pw, ph = f.left, f.top, f.pw, f.ph
    x0, x1 = float(edges[0]), float(edges[-1])
    span = (x1 - x0) or 1.0

    def sx(x: float) -> float:
        return left + (float(x) - x0) / span * pw

    def h(c: float) -> float:
        return math.log10(1 + c) if log_y else float(c)

    peak = max((h(c) for c in counts), default=0.0) or 1.0
    for i, c in enumerate(counts):
        if c <= 0:
            continue
        xa, xb = sx(edges[i]), sx(edges[i + 1])
        bh = h(c) / peak * ph
        f.parts.append(f'<rect class="bar" x="{xa + 0.5:.2f}" y="{top + ph - bh:.2f}" width="{max(0.5, xb - xa - 1):.2f}" '
                       f'height="{bh:.2f}"><title>{esc(f"{fmt(float(edges[i]))} to {fmt(float(edges[i + 1]))}: {fmt(c)}")}'
                       f'</title></rect>')
    if x_ticks is None:
        mid = (x0 + x1) / 2
        x_ticks = [(x0, fmt(x0, 2)), (mid, fmt(mid, 2)), (x1, fmt(x1, 2))]
    ticks = []
    for x, label in x_ticks:
        if x0 - 1e-9 <= x <= x1 + 1e-9:
            ticks.append(f'<line class="axis" x1="{sx(x):.2f}" y1="{top + ph}" x2="{sx(x):.2f}" y2="{top + ph + 4}"/>')
            ticks.append(f'<text class="tick" x="{sx(x):.2f}" y="{top + ph + 15}" text-anchor="middle">{esc(label)}</text>')
    return _close_plot(f, fmt(max(counts, default=0)), ticks, xlabel, f"{ylabel} (log scale)" if log_y else ylabel)


def svg_bar_chart(labels: Sequence[str], values: Sequence[float], *, title: str, xlabel: str, ylabel: str,
                  names: Sequence[str] | None = None, width: int = 380, height: int = 170) -> str:
    """An inline SVG bar chart of one non-negative value per category (``labels`` under the bars; each bar
    has a ``<title>`` with its ``names`` entry, default the label, and value)."""
    if len(labels) != len(values):
        raise ValueError(f"svg_bar_chart: {len(labels)} labels for {len(values)} values")
    names = list(labels) if names is None else list(names)
    f = _open_plot(title, width, height)
    left, top, pw, ph = f.left, f.top, f.pw, f.ph
    n = max(1, len(values))
    slot = pw / n
    peak = max((float(v) for v in values), default=0.0) or 1.0
    every = max(1, math.ceil(n * 14 / pw))  # thin out the labels of many narrow bars
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        x = left + i * slot
        bh = max(0.0, float(value)) / peak * ph
        f.parts.append(f'<rect class="bar" x="{x + 0.5:.2f}" y="{top + ph - bh:.2f}" width="{max(0.5, slot - 1):.2f}" '
                       f'height="{bh:.2f}"><title>{esc(f"{names[i]}: {fmt(float(value))}")}</title></rect>')
        if i % every == 0:
            f.parts.append(f'<text class="tick" x="{x + slot / 2:.2f}" y="{top + ph + 15}" '
                           f'text-anchor="middle">{esc(label)}</text>')
    return _close_plot(f, fmt(max(values, default=0)), [], xlabel, ylabel)


_LAYER_SITE = re.compile(r"^layers\.(\d+)(?:\.|$)")
"""A site of one layer (saelab's hookpoint names): its layer number labels the decoder-norm bar."""


def decoder_norms_svg(norms: Mapping[str, float]) -> str:
    """Bar chart of a latent's decoder norm to each output site (``LatentRecord.decoder_norms``), one bar per
    site in site order, labelled by layer number where the sites name distinct layers (``layers.3.mlp`` ->
    ``3``), by model label where they are one hookpoint in several models (``layers.6@A`` -> ``A``)."""
    sites = list(norms)
    layers = [m.group(1) if (m := _LAYER_SITE.match(site)) else None for site in sites]
    paired = [split_site(site) for site in sites]
    if None not in layers and len(set(layers)) == len(layers):
        labels, xlabel = [str(layer) for layer in layers], "target layer"
    elif all(label is not None for _, label in paired) and len({hp for hp, _ in paired}) == 1:
        labels, xlabel = [str(label) for _, label in paired], f"model ({paired[0][0]})"
    else:
        labels, xlabel = [m.group(1) if (m := _LAYER_SITE.match(site)) else site for site in sites], "output site"
    return svg_bar_chart(labels, [float(norms[s]) for s in sites], names=sites,
                         title="decoder norm to each output site", xlabel=xlabel, ylabel="norm")


def frequency_histogram_svg(frequencies: Sequence[float], title: str = "latent firing frequency") -> str:
    """Histogram of the log10 firing frequency of the latents that fired (dead ones are counted in the title)."""
    alive = [f for f in frequencies if f and f > 0]
    dead = len(frequencies) - len(alive)
    if not alive:
        return f'<p class="muted">{esc(title)}: no latent fired.</p>'
    logs = [math.log10(f) for f in alive]
    lo, hi = math.floor(min(logs)), max(0, math.ceil(max(logs)))
    lo = min(lo, hi - 1)
    counts, edges = histogram(logs, lo, hi, max(8, 4 * (hi - lo)))
    ticks = [(float(e), f"1e{e}" if e else "1") for e in range(lo, hi + 1)]
    return svg_histogram(counts, edges, title=f"{title} ({len(alive)} alive, {dead} dead)",
                         xlabel="fraction of tokens (log10 scale)", x_ticks=ticks)


# --------------------------------------------------------------------------------------------------
# Rendering


def latent_href(dirname: str, latent: int) -> str:
    """Relative URL of a latent page from the report root."""
    return f"{LATENT_PAGES}/{quote(dirname, safe='')}/latent_{int(latent)}.html"


def _page(title: str, body: str, depth: int, data: Any = None, page: str = "") -> str:
    prefix = "../" * depth
    data_tag = ("" if data is None else
                f'<script type="application/json" id="report-data">{script_json(data)}</script>\n')
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<title>{esc(title)}</title>\n<link rel="icon" href="data:,">\n'
            f'<link rel="stylesheet" href="{prefix}assets/report.css">\n</head>\n'
            f'<body data-page="{esc(page)}">\n{body}\n{data_tag}'
            f'<div id="tooltip" class="tooltip" hidden></div>\n'
            f'<script src="{prefix}assets/report.js"></script>\n</body>\n</html>\n')


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    """A table of already-escaped cells."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _shown_token(text: str) -> str:
    """A token's text for the page: newline as \u21b5, tab as \u2192, other controls as visible escapes."""
    return visible(text.replace("\n", "\u21b5").replace("\t", "\u2192"))


def render_example(example: Example, scale: float | None = None, extra: str = "") -> str:
    """An example as tokens shaded by activation (``scale``: the activation drawn fully coloured; default
    the example's max); the value shows on hover (``title`` and the page's tooltip). A character split
    across tokens (``example.char_spans``) is one piece, with the max activation of its tokens."""
    ref = scale if scale and scale > 0 else (example.max_activation or 0.0)
    ranges = display_spans(len(example.tokens), example.char_spans)
    spans = []
    for tok, act in zip(span_texts(example.token_strs, ranges), span_activations(example.activations, ranges),
                        strict=True):
        alpha = 0.0 if ref <= 0 or act <= 0 else min(1.0, act / ref)
        style = f' style="background-color: rgba(255, 128, 0, {alpha:.3f})"' if alpha > 0 else ""
        cls = "tok on" if act > 0 else "tok"
        spans.append(f'<span class="{cls}" data-act="{act:.4g}" title="{esc(f"{act:.4g}")}"{style}>'
                     f"{esc(_shown_token(tok))}</span>")
    meta = [f"max {fmt(example.max_activation)}"]
    if example.quantile is not None:
        meta.append(f"quantile {example.quantile}")
    if example.source:
        meta.append(example.source)
    meta.append(f"seq {example.sequence} @ {example.start}")
    if example.site_shares:
        meta.append("share " + " / ".join(f"{_site_label(site)} {fmt(v, 2)}"
                                          for site, v in example.site_shares.items()))
    return (f'<div class="example" data-example-id="{esc(example.id)}">{extra}'
            f'<div class="example-meta">{esc(" · ".join(meta))}</div>'
            f'<div class="tokens">{"".join(spans)}</div></div>')


def _site_label(site: str) -> str:
    """A site's short name on the page: a paired site's model label (``layers.1@B`` -> ``B``), else the site."""
    return site.rsplit("@", 1)[1] if "@" in site else site


def relative_norm_histogram_svg(stats: Mapping[str, Any], title: str) -> str:
    """Histogram of the relative decoder norm ``||d_B|| / (||d_A|| + ||d_B||)`` of the latents that fired, from a
    latent cache's ``stats.json`` (its ``diffing`` columns); '' when it has none."""
    diffing = stats.get("diffing") or {}
    relative = diffing.get("relative_norm")
    counts = (stats.get("latents") or {}).get("firing_count")
    if not relative or not counts or len(relative) != len(counts):
        return ""
    values = [float(r) for r, c in zip(relative, counts, strict=True) if c and r is not None]
    if not values:
        return f'<p class="muted">{esc(title)}: no latent fired.</p>'
    hist, edges = histogram(values, 0.0, 1.0, 20)
    a = ", ".join(diffing.get("a_sites") or ["A"])
    b = ", ".join(diffing.get("b_sites") or ["B"])
    return svg_histogram(hist, edges, title=f"{title} ({len(values)} latents that fired)",
                         xlabel=f"||d {b}|| / (||d {a}|| + ||d {b}||)", ylabel="latents")


def _diffing_table(diffing: Mapping[str, Any]) -> str:
    rows = [["class", esc(str(diffing.get("class", "")))],
            ["relative norm", esc(fmt(diffing.get("relative_norm")))],
            ["decoder cosine", esc(fmt(diffing.get("cosine")))]]
    return _table(["model diffing", ""], rows, "compact diffing")


def _svg_activation_histogram(entry: LatentEntry) -> str:
    if entry.histogram is None:
        return '<p class="muted">No activation histogram (no latent cache statistics).</p>'
    counts, lo, hi = entry.histogram
    n = len(counts)
    edges = [lo + (hi - lo) * k / n for k in range(n + 1)]
    return svg_histogram(counts, edges, title="activations where the latent fires", xlabel="activation",
                         ylabel="tokens", log_y=True)


def _logits_table(title: str, values: Any, cls: str) -> str:
    if values is None or not values.tokens:
        return f'<div class="logits"><h3>{esc(title)}</h3><p class="muted">not computed</p></div>'
    peak = max((abs(v) for v in values.values), default=0.0) or 1.0
    rows = []
    for tok, v in zip(values.tokens, values.values, strict=False):
        bar = f'<span class="lbar {cls}" style="width: {abs(v) / peak * 100:.1f}%"></span>'
        rows.append([f'<code class="token">{esc(_shown_token(tok))}</code>', esc(fmt(v)), bar])
    return f'<div class="logits"><h3>{esc(title)}</h3>{_table(["token", "value", ""], rows, "compact")}</div>'


def _score_section(scorer: str, score: ScoreResult, examples: Mapping[str, Example], scale: float | None) -> str:
    name, value = main_metric(scorer, score.metrics)
    metric_rows = [[esc(k), esc(fmt(v))] for k, v in score.metrics.items()]
    f = score.failures
    note = failure_note(score)
    note_html = f' <span class="failed">{esc(note)}</span>' if note else ""
    parts = [f'<section class="score" id="score-{esc(scorer)}"><h3>{esc(scorer)}: {esc(name or "")} '
             f'<span class="big">{esc(fmt(value))}</span>{note_html}</h3>',
             '<div class="row">', _table(["metric", "value"], metric_rows, "compact"),
             f'<p class="muted">{esc(score.model)} via {esc(score.provider)}; {score.n_prompts} prompts; '
             f'failures: {f.prompts} prompts, {f.examples} examples, {f.requests} requests</p></div>']
    if score.explanation:
        parts.append(f'<p>Explanation scored: <q class="llm-text">{esc(score.explanation)}</q></p>')
    rows = []
    for p in score.predictions:
        if p.correct is None:
            verdict = '<span class="verdict none">no answer</span>'
        elif p.correct:
            verdict = '<span class="verdict right">\u2713 right</span>'
        else:
            verdict = '<span class="verdict wrong">\u2717 wrong</span>'
        example = examples.get(p.example_id)
        text = render_example(example, scale) if example is not None else f'<code>{esc(p.example_id)}</code>'
        truth = "activating" if p.truth else "non-activating"
        rows.append([verdict, esc(truth), esc("" if p.prediction is None else p.prediction),
                     esc(fmt(p.probability)), esc(fmt(p.score)), text])
    if rows:
        parts.append('<details open><summary>per-example predictions '
                     f'({sum(1 for p in score.predictions if p.correct)} of {len(score.predictions)} right)</summary>')
        parts.append(_table(["", "truth", "predicted", "P(1)", "score", "example"], rows, "predictions"))
        parts.append("</details>")
    if score.raw_responses:
        items = "".join(f'<li><pre class="llm-text">{esc(r)}</pre></li>' for r in score.raw_responses)
        parts.append(f"<details><summary>raw LLM answers ({len(score.raw_responses)})</summary><ol>{items}</ol>"
                     "</details>")
    if score.errors:
        parts.append("<ul class=\"errors\">" + "".join(f"<li>{esc(e)}</li>" for e in score.errors) + "</ul>")
    parts.append("</section>")
    return "".join(parts)


def render_latent_page(run: RunData, hook: HookData, entry: LatentEntry) -> str:
    """The HTML page of one latent."""
    record, expl = entry.record, entry.explanation
    title = f"{hook.hookpoint} latent {entry.latent}"
    scale = entry.max_activation
    body = [f'<nav><a href="../../index.html" id="back">\u2190 {esc(run.root.name)} report</a></nav>',
            f"<h1>{esc(title)}</h1>"]
    for problem in entry.problems:
        body.append(f'<p class="errors">unreadable: {esc(problem)}</p>')
    if expl is not None:
        status = " (could not be parsed)" if expl.parse_failed else ""
        status = f" (request failed: {expl.error})" if expl.error else status
        body.append(f'<section><h2>Explanation</h2><p class="explanation llm-text" id="explanation">'
                    f'{esc(expl.text)}</p><p class="muted">{esc(expl.explainer)} explainer, {esc(expl.model)} via '
                    f"{esc(expl.provider)}{esc(status)}; {expl.usage.prompt_tokens} prompt + "
                    f"{expl.usage.completion_tokens} completion tokens</p>")
        if expl.raw_responses:
            items = "".join(f'<li><pre class="llm-text">{esc(r)}</pre></li>' for r in expl.raw_responses)
            body.append(f"<details><summary>raw LLM answer</summary><ol>{items}</ol></details>")
        body.append("</section>")
    else:
        body.append('<section><h2>Explanation</h2><p class="muted">not explained yet</p></section>')
    facts = [["frequency", esc(fmt(entry.frequency, 5))], ["max activation", esc(fmt(entry.max_activation))]]
    if record is not None and record.stats is not None:
        facts.append(["firing tokens", esc(record.stats.firing_count)])
        if record.stats.quantile_bounds:
            facts.append(["quantile lower bounds", esc(", ".join(fmt(b, 2) for b in record.stats.quantile_bounds))])
    body.append('<section><h2>Statistics</h2><div class="row">' + _table(["", ""], facts, "compact")
                + _svg_activation_histogram(entry) + "</div></section>")
    examples = {e.id: e for e in record.examples()} if record is not None else {}
    if entry.scores:
        body.append("<section><h2>Scores</h2>")
        body += [_score_section(s, score, examples, scale) for s, score in entry.scores.items()]
        body.append("</section>")
    if record is not None:
        activating = record.train + record.test
        top = sorted(activating, key=lambda e: -(e.max_activation or 0.0))[:N_TOP_EXAMPLES]
        body.append(f'<section id="top-examples"><h2>Top examples</h2>'
                    f'{"".join(render_example(e, scale) for e in top) or "<p class=muted>none</p>"}</section>')
        by_q: dict[int, list[Example]] = {}
        for e in activating:
            if e.quantile is not None:
                by_q.setdefault(int(e.quantile), []).append(e)
        if by_q:
            body.append('<section id="quantile-examples"><h2>Examples by activation quantile</h2>')
            for q in sorted(by_q, reverse=True):
                shown = sorted(by_q[q], key=lambda e: -(e.max_activation or 0.0))[:PER_QUANTILE]
                body.append(f"<h3>quantile {q}</h3>" + "".join(render_example(e, scale) for e in shown))
            body.append("</section>")
        negatives = record.non_activating + record.train_non_activating
        body.append(f'<section id="non-activating"><h2>Non-activating examples ({len(negatives)})</h2>'
                    f'{"".join(render_example(e, scale) for e in negatives) or "<p class=muted>none</p>"}'
                    "</section>")
        body.append('<section><h2>Logits</h2><div class="row">'
                    + _logits_table("top positive logits", record.top_logits, "pos")
                    + _logits_table("top negative logits", record.bottom_logits, "neg") + "</div></section>")
        if record.top_logits_by_model:
            bottoms = record.bottom_logits_by_model or {}
            tables = "".join(_logits_table(f"model {label}: top positive logits", values, "pos")
                             + _logits_table(f"model {label}: top negative logits", bottoms.get(label), "neg")
                             for label, values in record.top_logits_by_model.items())
            body.append('<section id="logits-by-model"><h2>Logits per model (its own unembedding)</h2>'
                        f'<div class="row">{tables}</div></section>')
        if record.decoder_norms:
            diffing = _diffing_table(record.diffing) if record.diffing else ""
            body.append('<section id="decoder-norms"><h2>Decoder norms by output site</h2><div class="row">'
                        + decoder_norms_svg(record.decoder_norms) + diffing + "</div></section>")
        if record.neighbours:
            rows = []
            for n in record.neighbours:
                target = hook.latents.get(n.latent)
                label = f"latent {n.latent}"
                link = (f'<a class="neighbour" href="latent_{int(n.latent)}.html">{esc(label)}</a>'
                        if target is not None else esc(label))
                note = esc(target.explanation.text) if target is not None and target.explanation else ""
                rows.append([link, esc(fmt(n.similarity)), esc(n.kind), f'<span class="llm-text">{note}</span>'])
            body.append("<section id=\"neighbours\"><h2>Neighbours</h2>"
                        + _table(["latent", "similarity", "kind", "explanation"], rows) + "</section>")
    else:
        body.append('<p class="muted">No latent record (examples) for this latent.</p>')
    data = {"hookpoint": hook.hookpoint, "latent": entry.latent,
            "explanation": None if expl is None else expl.text,
            "scores": {s: main_metric(s, r.metrics)[1] for s, r in entry.scores.items()}}
    return _page(title, "\n".join(body), depth=2, data=data, page="latent")


def _scorer_failures(run: RunData) -> str:
    """A line per scorer whose prompts failed: how many prompts and how many latents got no score."""
    items = []
    for scorer in run.scorers:
        scores = [e.scores[scorer] for h in run.hooks for e in h.latents.values() if scorer in e.scores]
        failed = sum(s.failures.prompts for s in scores)
        if failed <= 0:
            continue
        total = max(sum(s.n_prompts for s in scores), failed)
        blank = sum(1 for s in scores if main_metric(scorer, s.metrics)[1] is None)
        items.append(f'<li id="failures-{esc(scorer)}"><b>{esc(scorer)}</b>: failed {failed}/{total} prompts; '
                     f"{blank} of {len(scores)} latents have no score</li>")
    if not items:
        return ""
    return ('<ul class="errors scorer-failures">' + "".join(items) + "</ul>")


def _index_rows(run: RunData) -> list[dict[str, Any]]:
    rows = []
    for hook in run.hooks:
        for i, entry in hook.latents.items():
            expl = entry.explanation
            rows.append({
                "hookpoint": hook.hookpoint, "latent": i, "href": latent_href(hook.dirname, i),
                "explanation": None if expl is None else expl.text,
                "scores": {s: main_metric(s, r.metrics)[1] for s, r in entry.scores.items()},
                "failures": {s: note for s, r in entry.scores.items() if (note := failure_note(r))},
                "frequency": entry.frequency, "max_activation": entry.max_activation,
            })
    return rows


def render_index(run: RunData) -> str:
    """The report's index page."""
    name = run.root.name
    cfg = run.config
    body = [f"<h1>saelab report: {esc(name)}</h1>"]
    conf = cfg.get("config") or {}
    facts = [["command", esc(cfg.get("command", ""))], ["created", esc(cfg.get("created", ""))],
             ["model", esc(conf.get("model", ""))], ["hookpoints", esc(", ".join(h.hookpoint for h in run.hooks))],
             ["saelab", esc(cfg.get("saelab_version", ""))]]
    body.append('<section id="config"><h2>Run</h2>' + _table(["", ""], facts, "compact")
                + '<details><summary>full run_config.json (secrets redacted)</summary><pre>'
                + esc(json.dumps(cfg, indent=1, default=str)) + "</pre></details></section>")
    body.append('<section id="evaluation"><h2>Dictionary evaluation</h2>')
    if run.evals:
        rows = []
        for ev in run.evals:
            m = ev["metrics"]
            cells = [esc(ev["name"]), esc(ev["architecture"]), esc(fmt(ev["d_sae"]))]
            for key, _ in EVAL_COLUMNS:
                value = m.get(key)
                if key == "dead_frac" and isinstance(value, (int, float)):
                    value = 100.0 * value
                cells.append(esc(fmt(value)))
            rows.append(cells)
        body.append(_table(["dictionary", "architecture", "d_sae", *(h for _, h in EVAL_COLUMNS)], rows, "eval"))
        body.append('<p class="muted">Headline metrics leave out the excluded positions (BOS and the massive '
                    "activations); \u201call pos.\u201d includes them. Dead % is over the evaluated tokens.</p>")
    else:
        body.append('<p class="muted">No eval.json found (run <code>saelab evaluate</code>).</p>')
    body.append("</section>")
    plots = []
    for scorer in run.scorers:
        values = [v for h in run.hooks for e in h.latents.values() if scorer in e.scores
                  for v in [main_metric(scorer, e.scores[scorer].metrics)[1]] if v is not None]
        metric = next((main_metric(scorer, e.scores[scorer].metrics)[0] for h in run.hooks
                       for e in h.latents.values() if scorer in e.scores), None)
        if not values:
            continue
        lo = -1.0 if min(values) < 0 else 0.0
        hi = max(1.0, max(values))
        counts, edges = histogram(values, lo, hi, 20)
        mean = sum(values) / len(values)
        plots.append(svg_histogram(counts, edges, title=f"{scorer}: {metric} (mean {fmt(mean)}, {len(values)} latents)",
                                   xlabel=str(metric), width=440))
    for hook in run.hooks:
        freqs = ((hook.stats or {}).get("latents") or {}).get("frequency")
        if freqs:
            plots.append(frequency_histogram_svg(freqs, f"{hook.hookpoint} firing frequency"))
        if hook.stats and (relative := relative_norm_histogram_svg(hook.stats, f"{hook.hookpoint} relative norm")):
            plots.append(relative)
    failures = _scorer_failures(run)
    body.append('<section id="plots"><h2>Distributions</h2>' + failures + '<div class="row plots">'
                + "".join(plots) + "</div></section>" if plots or failures else "")
    skipped = sum(len(h.skipped) for h in run.hooks)
    note = f" Latents skipped for too few activating examples: {skipped}." if skipped else ""
    body.append('<section id="latents"><h2>Latents</h2>'
                '<div class="controls"><label>Filter <input id="filter" type="search" '
                'placeholder="text in explanation, latent id or hookpoint"></label> '
                f'<span id="count" class="muted"></span></div><p class="muted">Click a column header to sort.{esc(note)}'
                '</p><table id="latent-table" class="latents"><thead></thead><tbody></tbody></table>'
                "<noscript>The latent table needs JavaScript.</noscript></section>")
    data = {"run": name, "scorers": run.scorers, "hookpoints": [h.hookpoint for h in run.hooks],
            "latents": _index_rows(run)}
    return _page(f"saelab report: {name}", "\n".join(body), depth=0, data=data, page="index")


def copy_assets(out_dir: Path) -> None:
    """Copy the report's CSS and JS from the package into ``out_dir/assets``."""
    target = out_dir / "assets"
    target.mkdir(parents=True, exist_ok=True)
    package = resources.files("saelab.plugins.report") / "assets"
    for name in ASSETS:
        (target / name).write_bytes((package / name).read_bytes())


def write_report(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None, *,
                 max_latents: int | None = None) -> Path:
    """Write the static HTML report of ``run_dir`` into ``out_dir`` (default ``run_dir/report``) and
    return the path of its ``index.html``. The site is built in a temporary directory next to it and
    swapped in at the end, so pages of latents no longer in the run do not linger."""
    return write_run_report(load_run(run_dir, max_latents=max_latents), out_dir)


def write_run_report(run: RunData, out_dir: str | os.PathLike[str] | None = None) -> Path:
    """:func:`write_report` for a run already read with :func:`load_run`."""
    out = Path(out_dir) if out_dir is not None else RunLayout(run.root).report_dir
    remove_stale_temporaries(out.parent, recursive=False)  # of report writes that were killed
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        copy_assets(tmp)
        (tmp / "index.html").write_text(render_index(run), encoding="utf-8")
        for hook in run.hooks:
            directory = tmp / LATENT_PAGES / hook.dirname
            directory.mkdir(parents=True, exist_ok=True)
            for i, entry in hook.latents.items():
                (directory / f"latent_{i}.html").write_text(render_latent_page(run, hook, entry), encoding="utf-8")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "index.html"


def report_summary(run: RunData) -> list[tuple[str, Any]]:
    """(key, value) rows describing a report (for the command's summary table)."""
    pages = sum(len(h.latents) for h in run.hooks)
    explained = sum(1 for h in run.hooks for e in h.latents.values() if e.explanation is not None)
    return [("hookpoints", ", ".join(h.hookpoint for h in run.hooks) or "(none)"), ("latent pages", pages),
            ("explained", explained), ("scorers", ", ".join(run.scorers) or "(none)"),
            ("dictionaries evaluated", len(run.evals))]


__all__ = [
    "ASSETS",
    "LATENT_PAGES",
    "copy_assets",
    "esc",
    "decoder_norms_svg",
    "frequency_histogram_svg",
    "relative_norm_histogram_svg",
    "latent_href",
    "render_example",
    "render_index",
    "render_latent_page",
    "report_summary",
    "script_json",
    "svg_bar_chart",
    "svg_histogram",
    "title_lines_for",
    "write_report",
    "write_run_report",
]
