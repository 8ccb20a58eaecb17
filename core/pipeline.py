"""Auto-interpretation orchestration: latent records -> explanations -> scores, resumable, concurrent.

Run directory layout (``results/<name>/``; the earlier stages are described in their modules)::

    run_config.json
    latents/<hook>/                       latent cache (:mod:`saelab.latents`)
    records/<hook>/index.json             the selected latents, skipped ones with reasons, inputs fingerprint
    records/<hook>/latent_<i>.json        :class:`saelab.records.LatentRecord` (examples the LLM sees)
    explanations/<hook>/latent_<i>.json   :class:`saelab.records.Explanation`
    scores/<scorer>/<hook>/latent_<i>.json :class:`saelab.records.ScoreResult`
    llm_cache/                            this run's LLM response cache (content-addressed)
    summary.json, summary.csv             one row per scorer (and one for the explainer)

Reuse: every explanation and score stores a fingerprint of its inputs (examples, explainer or scorer
with options and prompt version, provider and model; scores also the explanation text). A re-run
computes the fingerprint it *would* produce and reuses the file when it matches and holds no request
error; anything else is recomputed. ``overwrite`` forces a stage (``explanations`` implies ``scores``).
Files are written atomically as each latent finishes, so a killed run's re-run asks the LLM only for
what is missing. Latents are processed concurrently (``asyncio``, at most ``latent_concurrency`` at a
time) and each latent's scorer prompts are sent concurrently too: the provider's own concurrency
limit (``max_concurrency``) is the throughput knob.

:func:`plan` is the dry run: the LLM calls and prompt tokens (an estimate: about 4 characters per
token, see :func:`estimate_tokens`) that :meth:`AutoInterp.run` would make, with the cost where the
provider knows prices; it makes no calls.
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .autointerp import checked_result, explanation_fingerprint, provider_names, score_fingerprint
from .errors import UsageError
from .fileio import atomic_write
from .formats import canonical_hookpoint, dictionaries_by_hookpoint, dictionary_sites_text, records_hookpoint
from .interfaces import Explainer, Plugin, Provider, Scorer, SiteSpec, SparseDictionary
from .layout import RunLayout
from .records import (
    Explanation,
    LatentRecord,
    ScoreResult,
    Usage,
    content_hash,
    now_iso,
    score_is_current,
    write_json_atomic,
)

log = logging.getLogger("saelab.pipeline")

INDEX_SCHEMA = "saelab.records_index/1"
SUMMARY_SCHEMA = "saelab.summary/1"

OVERWRITE_STAGES = ("cache", "neighbours", "explanations", "scores")
"""What ``--overwrite`` may force: the activation and latent caches, neighbours, explanations, scores."""

PLACEHOLDER_EXPLANATION = "a short explanation of what the latent detects"
"""Stands in for explanations not written yet when a dry run sizes scorer prompts."""


# --------------------------------------------------------------------------------------------------
# Records on disk


@dataclass
class RecordSet:
    """The latent records of one hookpoint and the latents skipped while building them."""

    hookpoint: str
    records: list[LatentRecord]
    skipped: dict[int, str] = field(default_factory=dict)
    """Latent -> why it was skipped (e.g. ``"12 activating examples < min_examples 200"``)."""
    fingerprint: str = ""
    """Hash of the inputs the records were built from (latent cache, example options)."""


def save_records(layout: RunLayout, records: RecordSet) -> None:
    """Write each record and the index atomically (records first, so an index never names a missing file)."""
    for record in records.records:
        record.save(layout.record_path(records.hookpoint, record.latent))
    write_json_atomic(layout.record_index(records.hookpoint), {
        "schema": INDEX_SCHEMA, "hookpoint": records.hookpoint, "fingerprint": records.fingerprint,
        "latents": [int(r.latent) for r in records.records],
        "skipped": {str(k): v for k, v in sorted(records.skipped.items())}, "created_at": now_iso(),
    })


def read_index(layout: RunLayout, hookpoint: str) -> dict[str, Any] | None:
    """The records index of ``hookpoint`` (None when there is none or it is unreadable)."""
    path = layout.record_index(hookpoint)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("schema") == INDEX_SCHEMA else None


def load_records(layout: RunLayout, hookpoint: str, latents: Sequence[int] | None = None) -> RecordSet:
    """The records of ``hookpoint`` named by its index (optionally only ``latents``)."""
    index = read_index(layout, hookpoint)
    if index is None:
        raise UsageError(f"no latent records for hookpoint {hookpoint!r} in {str(layout.root)!r}; build them "
                         f"with `saelab run MODEL SPARSE_MODEL --name {layout.root.name} ...` first")
    wanted = [int(x) for x in index.get("latents", [])]
    if latents is not None:
        keep = {int(x) for x in latents}
        wanted = [x for x in wanted if x in keep]
    records = [LatentRecord.load(layout.record_path(hookpoint, i)) for i in wanted]
    skipped = {int(k): str(v) for k, v in (index.get("skipped") or {}).items()}
    return RecordSet(hookpoint, records, skipped, str(index.get("fingerprint", "")))


# --------------------------------------------------------------------------------------------------
# Token estimates


def estimate_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """Prompt tokens of chat ``messages``, estimated as ceil(characters / 4) per message plus 4 tokens of
    chat formatting each (close to BPE tokenizers on English text; no tokenizer is loaded)."""
    return sum(math.ceil(len(str(m.get("content", ""))) / 4) + 4 for m in messages)


def fit_to_context(explainer: Explainer, record: LatentRecord, max_len: int | None,
                   reserve: int = 0, count: Callable[[Sequence[Mapping[str, Any]]], int] = estimate_tokens,
                   ) -> tuple[LatentRecord, int]:
    """``record`` with its last train examples dropped until the explainer's prompt plus ``reserve``
    answer tokens fits ``max_len`` tokens (``--explainer_model_max_len``); returns (record, dropped).
    At least one train example is always kept."""
    if not max_len:
        return record, 0
    prompts = explainer.messages(record)
    if not prompts or max(count(p) for p in prompts) + reserve <= max_len:
        return record, 0
    lo, hi = 1, len(record.train)
    trimmed = record
    while lo < hi:  # largest n that fits
        mid = (lo + hi + 1) // 2
        candidate = _with_train(record, mid)
        if max(count(p) for p in explainer.messages(candidate)) + reserve <= max_len:
            lo = mid
        else:
            hi = mid - 1
    trimmed = _with_train(record, lo)
    return trimmed, len(record.train) - lo


def _with_train(record: LatentRecord, n: int) -> LatentRecord:
    copy = LatentRecord.from_dict(record.to_dict())
    copy.train = copy.train[:n]
    return copy


# --------------------------------------------------------------------------------------------------
# The explain/score engine


@dataclass
class StageStats:
    """What one stage did in this invocation."""

    computed: int = 0
    """Results computed (LLM asked or local model run)."""
    reused: int = 0
    """Results reused from disk (fingerprint matched)."""
    failed: int = 0
    """Results whose LLM requests failed (stored with the error; retried on the next run)."""
    skipped: int = 0
    """Latents not processed (e.g. no usable explanation to score)."""
    crashed: int = 0
    """Latents where the plugin raised an unexpected exception (logged; nothing stored)."""
    unusable: int = 0
    """Explanations whose answer gave no usable explanation (unparsed, copied few-shot); not scored."""
    kept_previous: int = 0
    """Failed results not written because a good earlier result was kept in their place."""
    failure_reasons: dict[str, int] = field(default_factory=dict)
    """Failure reason -> count (request errors and unusable answers of this invocation)."""

    def count_failure(self, reason: str) -> None:
        """Count one failure under ``reason`` (first line, trimmed)."""
        line = (str(reason).strip().splitlines() or ["unknown error"])[0][:300]
        self.failure_reasons[line] = self.failure_reasons.get(line, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {**self.__dict__, "failure_reasons": dict(self.failure_reasons)}


@dataclass
class RunReport:
    """Outcome of :meth:`AutoInterp.run`: per-stage counts, trimmed prompts and provider usage."""

    explain: StageStats = field(default_factory=StageStats)
    scores: dict[str, StageStats] = field(default_factory=dict)
    trimmed_latents: int = 0
    """Latents whose train examples were cut to fit ``explainer_model_max_len``."""
    usage: dict[str, Any] = field(default_factory=dict)
    """The provider's usage totals for this invocation (requests, cached answers, tokens, cost)."""
    errors: list[str] = field(default_factory=list)
    """One line per crashed latent."""
    io_errors: list[str] = field(default_factory=list)
    """One line per latent stopped by an I/O error (e.g. a full disk or an unwritable directory)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"explain": self.explain.to_dict(), "scores": {k: v.to_dict() for k, v in self.scores.items()},
                "trimmed_latents": self.trimmed_latents, "usage": self.usage, "errors": list(self.errors),
                "io_errors": list(self.io_errors)}


def _load_reusable(cls: type[Any], path: Path, fingerprint: str | None) -> Any:
    """The record at ``path`` when it parses, has ``fingerprint`` (any when None) and no request error."""
    if not path.is_file():
        return None
    try:
        result = cls.load(path)
    except UsageError:
        return None
    if fingerprint is not None and result.fingerprint != fingerprint:
        return None
    if isinstance(result, Explanation) and result.error:
        return None
    if isinstance(result, ScoreResult) and (result.errors or result.failures.requests):
        return None
    return result


def _stored_usable_explanation(path: Path) -> Explanation | None:
    """The explanation stored at ``path`` when it is usable (request succeeded, answer usable)."""
    stored = _load_reusable(Explanation, path, None)
    return stored if stored is not None and stored.usable else None


class AutoInterp:
    """Explains and scores latent records into a run directory, reusing what matches on disk.

    ``explainer`` None means score-only: explanations are read from disk (latents without one are
    skipped). ``scorers`` empty means explain-only.
    """

    def __init__(
        self,
        layout: RunLayout,
        explainer: Explainer | None,
        scorers: Sequence[Scorer],
        provider: Provider | None,
        *,
        overwrite: Iterable[str] = (),
        latent_concurrency: int | None = None,
        explainer_max_len: int | None = None,
        cpu_workers: int | None = None,
        progress: bool = True,
    ):
        self.layout = layout
        self.explainer = explainer
        self.scorers = list(scorers)
        self.provider = provider
        self.overwrite = set(overwrite)
        if "explanations" in self.overwrite:
            self.overwrite.add("scores")
        # Twice the provider's limit: while some latents wait for their explanation, others' scoring prompts
        # keep every request slot busy (with exactly the limit, slots idle at each explain -> score step).
        default = 2 * ((provider.max_concurrency if provider is not None else None) or 2)
        self.latent_concurrency = max(1, int(latent_concurrency or default))
        """Latents in flight at once (default: twice the provider's ``max_concurrency``)."""
        self.explainer_max_len = explainer_max_len
        self.cpu_workers = cpu_workers
        """Threads for CPU-side work (local scorers run in ``asyncio.to_thread``); None: Python's default."""
        self.progress = progress
        names = [s.name for s in self.scorers]
        if len(set(names)) != len(names):
            raise UsageError(f"scorer given twice in {names}")
        needs_provider = (explainer is not None) or any(s.uses_provider for s in self.scorers)
        if needs_provider and provider is None:
            raise UsageError("an LLM provider is needed to explain or to run an LLM scorer")

    # -- fingerprints and reuse

    def _answer_reserve(self) -> int:
        return _max_tokens(self.explainer)

    def prepared(self, record: LatentRecord) -> tuple[LatentRecord, int]:
        """The record as the explainer sees it (train examples trimmed to the context length)."""
        if self.explainer is None:
            return record, 0
        return fit_to_context(self.explainer, record, self.explainer_max_len, self._answer_reserve())

    def reusable_explanation(self, record: LatentRecord) -> Explanation | None:
        """The stored explanation when it can be reused (score-only mode: any stored one without error)."""
        path = self.layout.explanation_path(record.hookpoint, record.latent)
        if self.explainer is None:
            return _load_reusable(Explanation, path, None)
        if "explanations" in self.overwrite:
            return None
        prepared, _ = self.prepared(record)
        return _load_reusable(Explanation, path, explanation_fingerprint(prepared, self.explainer, self.provider))

    def reusable_score(self, record: LatentRecord, scorer: Scorer, text: str) -> ScoreResult | None:
        """The stored score when its fingerprint matches (never under ``overwrite scores``)."""
        if "scores" in self.overwrite:
            return None
        fp = score_fingerprint(record, text, scorer, self.provider if scorer.uses_provider else None)
        return _load_reusable(ScoreResult, self.layout.score_path(scorer.name, record.hookpoint, record.latent), fp)

    # -- running

    def run(self, records: Sequence[LatentRecord]) -> RunReport:
        """Explain and score ``records`` (blocking; see :meth:`run_async`)."""
        return asyncio.run(self.run_async(records))

    async def run_async(self, records: Sequence[LatentRecord]) -> RunReport:
        """Process every record, at most ``latent_concurrency`` at a time; files are written as each finishes."""
        report = RunReport(scores={s.name: StageStats() for s in self.scorers})
        before = _usage_snapshot(self.provider)
        if self.cpu_workers:
            asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=self.cpu_workers))
        semaphore = asyncio.Semaphore(self.latent_concurrency)
        bar = _Progress(len(records), "explain + score" if self.explainer and self.scorers else
                        ("explain" if self.explainer else "score"), self.progress)

        async def one(record: LatentRecord) -> None:
            async with semaphore:
                try:
                    await self._process(record, report)
                except UsageError:
                    raise
                except OSError as exc:  # summed up in one stderr line by the command (see outcome)
                    line = f"{record.hookpoint} latent {record.latent}: {exc}"
                    log.info("%s", line)
                    report.io_errors.append(line.splitlines()[0])
                except Exception as exc:  # noqa: BLE001 - one latent's plugin bug must not lose the others
                    line = f"{record.hookpoint} latent {record.latent}: {type(exc).__name__}: {exc}"
                    log.info("%s", line, exc_info=True)
                    report.errors.append(line.splitlines()[0])
                finally:
                    bar.advance()

        try:
            with bar:
                await asyncio.gather(*(one(r) for r in records))
        finally:
            if self.provider is not None:
                await self.provider.aclose()
        report.usage = _usage_delta(before, _usage_snapshot(self.provider))
        return report

    async def _process(self, record: LatentRecord, report: RunReport) -> None:
        explanation = await self._explanation(record, report)
        usable = explanation if explanation is not None and explanation.usable else None
        jobs = []
        for scorer in self.scorers:
            if scorer.requires_explanation and usable is None:
                report.scores[scorer.name].skipped += 1
                continue
            jobs.append(self._score(record, scorer, usable if scorer.requires_explanation else None, report))
        await asyncio.gather(*jobs)

    async def _explanation(self, record: LatentRecord, report: RunReport) -> Explanation | None:
        stats = report.explain
        reused = self.reusable_explanation(record)
        if reused is not None:
            stats.reused += 1
            if not reused.usable:
                stats.unusable += 1
                stats.count_failure(reused.failure or "unparsed")
            return reused
        if self.explainer is None:
            stats.skipped += 1
            return None
        assert self.provider is not None
        prepared, dropped = self.prepared(record)
        report.trimmed_latents += int(dropped > 0)
        try:
            explanation = checked_result(await self.explainer.explain(prepared, self.provider), Explanation,
                                         "explainer", self.explainer)
        except Exception:
            stats.crashed += 1
            raise
        path = self.layout.explanation_path(record.hookpoint, record.latent)
        if explanation.error:
            stats.failed += 1
            stats.count_failure(explanation.error)
        elif not explanation.usable:
            stats.unusable += 1
            stats.count_failure(explanation.failure or "unparsed")
        if not explanation.usable and _stored_usable_explanation(path) is not None:
            stats.kept_previous += 1  # a failed answer never replaces a good explanation
            return None
        explanation.save(path)
        if explanation.error:
            return None
        if explanation.usable:
            stats.computed += 1
        return explanation

    async def _score(self, record: LatentRecord, scorer: Scorer, explanation: Explanation | None,
                     report: RunReport) -> None:
        stats = report.scores[scorer.name]
        text = "" if explanation is None else explanation.text
        if self.reusable_score(record, scorer, text) is not None:
            stats.reused += 1
            return
        try:
            result = checked_result(
                await scorer.score(record, explanation, self.provider if scorer.uses_provider else None),
                ScoreResult, "scorer", scorer)
        except Exception:
            stats.crashed += 1
            raise
        path = self.layout.score_path(scorer.name, record.hookpoint, record.latent)
        failed = bool(result.errors or result.failures.requests)
        if failed:
            stats.failed += 1
            stats.count_failure(result.errors[0] if result.errors else "request failed")
            previous = _load_reusable(ScoreResult, path, None)
            if previous is not None and previous.explanation == result.explanation:
                stats.kept_previous += 1  # a failed score never replaces a good one of the same explanation
                return
        else:
            stats.computed += 1
        result.save(path)

    # -- dry run

    def plan(self, records: Sequence[LatentRecord]) -> DryRunPlan:
        """What :meth:`run` would ask the LLM (calls, estimated prompt tokens, cost); makes no calls."""
        result = DryRunPlan(provider=provider_names(self.provider)[0], model=provider_names(self.provider)[1])
        rows: dict[str, PlanRow] = {}
        if self.explainer is not None:
            rows["explain"] = PlanRow("explain", self.explainer.name)
        for scorer in self.scorers:
            rows[scorer.name] = PlanRow("score", scorer.name, local=not scorer.uses_provider)
        for record in records:
            existing = self.reusable_explanation(record)
            text: str | None
            if existing is not None:
                text = existing.text
            elif self.explainer is not None:
                prepared, _ = self.prepared(record)
                prompts = self.explainer.messages(prepared)
                rows["explain"].add(prompts, self._answer_reserve())
                text = None
            else:
                text = None
            for scorer in self.scorers:
                row = rows[scorer.name]
                if scorer.requires_explanation and text is None and self.explainer is None:
                    row.skipped += 1
                    continue
                shown = "" if not scorer.requires_explanation else (text if text is not None
                                                                   else PLACEHOLDER_EXPLANATION)
                if text is not None and self.reusable_score(record, scorer, shown) is not None:
                    row.reused += 1
                    continue
                if not scorer.uses_provider:
                    row.latents += 1
                    continue
                max_tokens = _max_tokens(scorer)
                shown_explanation = (Explanation(hookpoint=record.hookpoint, latent=record.latent, text=shown)
                                     if shown else None)
                row.add(scorer.messages(record, shown_explanation), max_tokens)
        prices = self.provider.prices() if self.provider is not None else None
        for row in rows.values():
            if prices is not None and not row.local:
                row.cost_prompt = row.prompt_tokens * prices[0] / 1000.0
                row.cost_max = row.cost_prompt + row.max_completion_tokens * prices[1] / 1000.0
        result.rows = list(rows.values())
        return result


@dataclass
class PlanRow:
    """One stage of a dry run."""

    stage: str
    name: str
    local: bool = False
    """Runs a local model (no LLM calls)."""
    latents: int = 0
    """Latents that would be processed."""
    reused: int = 0
    """Latents whose stored result would be reused."""
    skipped: int = 0
    """Latents that could not be processed (no explanation)."""
    calls: int = 0
    prompt_tokens: int = 0
    """Estimated prompt tokens (:func:`estimate_tokens`)."""
    max_completion_tokens: int = 0
    """Upper bound of answer tokens (calls x ``max_tokens``)."""
    cost_prompt: float | None = None
    """USD of the prompt tokens, where prices are known."""
    cost_max: float | None = None
    """USD upper bound including answers at ``max_tokens``, where prices are known."""

    def add(self, prompts: Sequence[Sequence[Mapping[str, Any]]], max_tokens: int) -> None:
        """Count one latent's prompts."""
        self.latents += 1
        self.calls += len(prompts)
        self.prompt_tokens += sum(estimate_tokens(p) for p in prompts)
        self.max_completion_tokens += len(prompts) * max_tokens

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dict(self.__dict__)


@dataclass
class DryRunPlan:
    """The LLM work a run would do."""

    provider: str = ""
    model: str = ""
    rows: list[PlanRow] = field(default_factory=list)

    @property
    def calls(self) -> int:
        """Total LLM calls."""
        return sum(r.calls for r in self.rows)

    @property
    def prompt_tokens(self) -> int:
        """Total estimated prompt tokens."""
        return sum(r.prompt_tokens for r in self.rows)

    def cost(self) -> tuple[float | None, float | None]:
        """(prompt cost, upper bound) in USD, None when prices are unknown."""
        if any(r.cost_prompt is None and r.calls for r in self.rows):
            return None, None
        return (sum(r.cost_prompt or 0.0 for r in self.rows), sum(r.cost_max or 0.0 for r in self.rows))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        prompt_cost, max_cost = self.cost()
        return {"provider": self.provider, "model": self.model, "calls": self.calls,
                "prompt_tokens": self.prompt_tokens, "cost_prompt": prompt_cost, "cost_max": max_cost,
                "rows": [r.to_dict() for r in self.rows]}


def plan(autointerp: AutoInterp, records: Sequence[LatentRecord]) -> DryRunPlan:
    """:meth:`AutoInterp.plan` as a function."""
    return autointerp.plan(records)


# --------------------------------------------------------------------------------------------------
# Summary


METRIC_ORDER = ("balanced_accuracy", "accuracy", "precision", "recall", "f1", "auc", "correlation")


def summarize(layout: RunLayout, selection: Mapping[str, Sequence[int]], scorers: Sequence[str],
              skipped: Mapping[str, Mapping[int, str]] | None = None, report: RunReport | None = None,
              ) -> dict[str, Any]:
    """Summary of the selected latents from the files on disk: one row for the explainer and one per scorer
    (mean of each metric over latents, failures, skipped latents, calls, tokens, cost)."""
    skipped = skipped or {}
    n_skipped = sum(len(v) for v in skipped.values())
    rows: list[dict[str, Any]] = []
    failure_reasons: dict[str, int] = {}
    expl = _Acc()
    explanations: dict[tuple[str, int], Explanation] = {}
    for hook, latents in selection.items():
        for latent in latents:
            path = layout.explanation_path(hook, latent)
            if not path.is_file():
                expl.missing += 1
                continue
            e = Explanation.load(path)
            explanations[(hook, latent)] = e
            expl.add_usage(e.usage)
            if e.error:
                expl.failed_requests += 1
            elif e.parse_failed:
                expl.failed_prompts += 1
                reason = e.failure or "unparsed"
                failure_reasons[reason] = failure_reasons.get(reason, 0) + 1
            else:
                expl.done += 1
    if explanations or expl.missing:
        rows.append({"stage": "explain", "name": _first({e.explainer for e in explanations.values()}),
                     "latents": expl.done + expl.failed_prompts, "skipped_min_examples": n_skipped,
                     "missing": expl.missing, "failed_prompts": expl.failed_prompts,
                     "failed_examples": 0, "failed_requests": expl.failed_requests,
                     "failed_explanations": expl.failed_prompts + expl.failed_requests,
                     "failure_reasons": dict(sorted(failure_reasons.items())), **expl.usage_row()})
    for scorer in scorers:
        acc = _Acc()
        metric_values: dict[str, list[float]] = {}
        needs_explanation = _requires_explanation(scorer)
        for hook, latents in selection.items():
            for latent in latents:
                explanation = explanations.get((hook, latent))
                if needs_explanation and explanation is not None and not explanation.usable:
                    acc.failed_explanations += 1  # never scored; a stale score of an earlier text is not counted
                    continue
                path = layout.score_path(scorer, hook, latent)
                if not path.is_file():
                    acc.missing += 1
                    continue
                s = ScoreResult.load(path)
                if needs_explanation and not score_is_current(s, explanation):
                    acc.missing += 1  # scored an explanation that has since been replaced
                    continue
                acc.add_usage(s.usage)
                acc.failed_prompts += s.failures.prompts
                acc.failed_examples += s.failures.examples
                acc.failed_requests += s.failures.requests
                acc.done += 1
                for key, value in s.metrics.items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                        metric_values.setdefault(key, []).append(float(value))
        keys = [k for k in METRIC_ORDER if k in metric_values] + sorted(set(metric_values) - set(METRIC_ORDER))
        row: dict[str, Any] = {"stage": "score", "name": scorer, "latents": acc.done,
                               "skipped_min_examples": n_skipped, "missing": acc.missing,
                               "failed_prompts": acc.failed_prompts, "failed_examples": acc.failed_examples,
                               "failed_requests": acc.failed_requests,
                               "failed_explanations": acc.failed_explanations, **acc.usage_row()}
        row["metrics"] = {k: sum(v) / len(v) for k, v in ((k, metric_values[k]) for k in keys)}
        rows.append(row)
    summary: dict[str, Any] = {
        "schema": SUMMARY_SCHEMA, "created_at": now_iso(), "run": layout.root.name,
        "hookpoints": {h: len(v) for h, v in selection.items()},
        "skipped_latents": {h: {str(k): v for k, v in s.items()} for h, s in skipped.items()},
        "rows": rows,
    }
    if report is not None:
        summary["this_invocation"] = report.to_dict()
    return summary


def _requires_explanation(scorer: str) -> bool:
    """Whether the registered scorer ``scorer`` scores an explanation (True when it is not registered)."""
    from .errors import SaelabError
    from .manager import registry

    try:
        return bool(registry("scorer").get(scorer).requires_explanation)
    except SaelabError:
        return True


@dataclass
class _Acc:
    done: int = 0
    missing: int = 0
    failed_explanations: int = 0
    failed_prompts: int = 0
    failed_examples: int = 0
    failed_requests: int = 0
    usage: Usage = field(default_factory=Usage)

    def add_usage(self, usage: Usage) -> None:
        self.usage = self.usage + usage

    def usage_row(self) -> dict[str, Any]:
        return self.usage.to_dict()


def _first(values: set[str]) -> str:
    return ",".join(sorted(v for v in values if v))


def flat_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The summary rows with metrics as top-level columns (for the CSV and the printed table)."""
    rows = []
    for row in summary.get("rows", []):
        flat = {k: v for k, v in row.items() if k != "metrics"}
        flat.update(row.get("metrics") or {})
        rows.append(flat)
    return rows


def write_summary(layout: RunLayout, summary: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``summary.json`` and ``summary.csv`` (atomically); returns their paths."""
    write_json_atomic(layout.summary_json, summary)
    rows = flat_rows(summary)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with atomic_write(layout.summary_csv, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_cell(row.get(k)) for k in columns})
    return layout.summary_json, layout.summary_csv


def _csv_cell(value: Any) -> Any:
    """A summary value as a CSV cell: empty for None, JSON for dicts and lists."""
    if value is None:
        return ""
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


TABLE_METRICS = (("balanced_accuracy", "bal. acc"), ("f1", "F1"), ("auc", "AUC"), ("correlation", "corr"))
"""Metrics shown in the printed table (every metric is in summary.json / summary.csv)."""


def print_summary(summary: Mapping[str, Any], title: str = "saelab auto-interp summary") -> None:
    """Print the summary table (rich, stdout): one row per stage, the main metrics, failures, usage."""
    from .progress import stdout_console, summary_table

    rows = list(summary.get("rows", []))
    if not rows:
        stdout_console.print("no explanations or scores yet")
        return
    shown_metrics = [(k, label) for k, label in TABLE_METRICS
                     if any(k in (r.get("metrics") or {}) for r in rows)]
    table = []
    for row in rows:
        metrics = row.get("metrics") or {}
        item: dict[str, Any] = {
            "stage": f"{row['stage']} {row['name']}", "latents": row["latents"],
            "skipped": row.get("skipped_min_examples", 0), "missing": row.get("missing", 0),
            "failed prompts/req.": f"{row.get('failed_prompts', 0)}/{row.get('failed_requests', 0)}",
            "failed expl.": row.get("failed_explanations", 0),
        }
        item.update({label: metrics.get(k) for k, label in shown_metrics})
        item.update({"calls": row.get("calls", 0), "cached": row.get("cached_calls", 0),
                     "tokens": row.get("prompt_tokens", 0) + row.get("completion_tokens", 0),
                     "cost $": row.get("cost")})
        table.append(item)
    stdout_console.print(summary_table(title, table))


@dataclass
class Outcome:
    """What failed in one explain/score invocation, as one line, and whether it is a failed run (exit 3)."""

    problems: list[str] = field(default_factory=list)
    """Failures that make the run fail (exit code 3)."""
    notes: list[str] = field(default_factory=list)
    """Failures counted but tolerated unless ``--strict`` (unparsed or copied explanations)."""

    @property
    def line(self) -> str:
        """Everything that failed, in one line ('' when nothing did)."""
        return "; ".join(self.problems + self.notes)

    def failed(self, strict: bool = False) -> bool:
        """True when the invocation must exit with code 3."""
        return bool(self.problems or (strict and self.notes))


def _reasons(reasons: Mapping[str, int]) -> str:
    if not reasons:
        return ""
    ranked = sorted(reasons.items(), key=lambda kv: -kv[1])
    shown = ranked[0][0] if len(ranked) == 1 else "; ".join(f"{n}x {reason}" for reason, n in ranked[:2])
    return f": {shown}" + (f" (+{len(ranked) - 2} other reasons)" if len(ranked) > 2 else "")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def outcome(report: RunReport, *, analysed: int, missing_requested: Mapping[int, str] | None = None,
            no_latents_reason: str = "") -> Outcome:
    """The :class:`Outcome` of an invocation: failed requests (after retries), I/O errors, crashed plugins,
    requested latents that are missing and 0 latents analysed are problems; unusable answers are notes."""
    result = Outcome()
    if analysed == 0:
        result.problems.append("0 latents analysed" + (f": {no_latents_reason}" if no_latents_reason else ""))
    if missing_requested:
        ids = sorted(missing_requested)
        reasons = sorted(set(missing_requested.values()))
        result.problems.append(f"requested latent{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))} "
                               f"missing: {'; '.join(reasons)}")
    explain = report.explain
    request_failures = explain.failed
    if request_failures:
        requests = {k: v for k, v in explain.failure_reasons.items() if k not in UNUSABLE_REASONS}
        result.problems.append(f"{_plural(request_failures, 'explanation')} failed" + _reasons(requests))
    for name, stats in report.scores.items():
        if stats.failed:
            result.problems.append(f"{_plural(stats.failed, name + ' score')} failed{_reasons(stats.failure_reasons)}")
    if report.io_errors:
        result.problems.append(f"{_plural(len(report.io_errors), 'latent')} stopped by an I/O error: "
                               f"{report.io_errors[0]}")
    if report.errors:
        result.problems.append(f"{_plural(len(report.errors), 'latent')} crashed: {report.errors[0]}")
    if explain.unusable:
        unusable = {k: v for k, v in explain.failure_reasons.items() if k in UNUSABLE_REASONS}
        detail = ", ".join(f"{v} {k}" for k, v in sorted(unusable.items()))
        result.notes.append(f"{_plural(explain.unusable, 'explanation')} unusable and not scored"
                            + (f" ({detail})" if detail else ""))
    return result


UNUSABLE_REASONS = ("unparsed", "copied_few_shot")
"""``Explanation.failure`` values: answers that gave no usable explanation (tolerated unless ``--strict``)."""


def print_plan(plan_: DryRunPlan) -> None:
    """Print a dry run's table and totals (rich, stdout)."""
    from .progress import format_value, stdout_console, summary_table

    rows = [{"stage": r.stage, "name": r.name, "latents": r.latents, "reused": r.reused, "skipped": r.skipped,
             "LLM calls": r.calls if not r.local else "local model", "prompt tokens (est.)": r.prompt_tokens,
             "max answer tokens": r.max_completion_tokens, "cost USD (prompts)": r.cost_prompt,
             "cost USD (max)": r.cost_max} for r in plan_.rows]
    stdout_console.print(summary_table(f"dry run: {plan_.provider} {plan_.model} (no LLM calls made)", rows))
    prompt_cost, max_cost = plan_.cost()
    cost = ("unknown (no prices for this model)" if prompt_cost is None
            else f"{format_value(prompt_cost)} USD for prompts, at most {format_value(max_cost)} USD")
    stdout_console.print(f"total: {plan_.calls} LLM calls, ~{plan_.prompt_tokens} prompt tokens; cost: {cost}")


# --------------------------------------------------------------------------------------------------
# Building plugins from resolved command values


def scorer_names(names: Iterable[str]) -> list[str]:
    """Canonical scorer names (``recall`` -> ``detection``), duplicates dropped, order kept."""
    from .manager import registry

    reg = registry("scorer")
    out: list[str] = []
    for name in names:
        canonical = reg.canonical(str(name))
        if canonical not in out:
            out.append(canonical)
    return out


def _fields(cls: type[Plugin]) -> Mapping[str, Any]:
    return cls.Options.model_fields


def make_explainer(name: str, options: Mapping[str, Any] | None = None, prompts: Any = None) -> Explainer:
    """The explainer plugin ``name`` with ``options`` (validated by its options model) and ``prompts``."""
    from .manager import registry

    cls = registry("explainer").get(name)
    return cls(cls.Options.parse(dict(options or {}), where=f"explainer {cls.name!r} options"), prompts)


def make_scorers(names: Sequence[str], shared: Mapping[str, Any] | None = None,
                 per_scorer: Mapping[str, Mapping[str, Any]] | None = None, prompts: Any = None) -> list[Scorer]:
    """Scorer plugins; ``shared`` options (``num_examples_per_scorer_prompt``, ``seed``, ``log_probs``)
    go to each scorer whose options model has the field; ``per_scorer[name]`` to that scorer only."""
    from .manager import registry

    reg = registry("scorer")
    per = {reg.canonical(k): dict(v) for k, v in (per_scorer or {}).items()}
    unknown = set(per) - set(scorer_names(names))
    if unknown:
        raise UsageError(f"--scorer_option for {sorted(unknown)[0]!r}, which is not among --scorers "
                         f"{' '.join(scorer_names(names))}")
    out = []
    for name in scorer_names(names):
        cls = reg.get(name)
        options = {k: v for k, v in (shared or {}).items() if k in _fields(cls)}
        options.update(per.get(name, {}))
        out.append(cls(cls.Options.parse(options, where=f"scorer {cls.name!r} options"), prompts))
    return out


def make_run_provider(name: str, *, model: str | None, base_url: str | None = None,
                      max_concurrency: int | None = None, api_key_env: str | None = None,
                      cache: bool = True, cache_dir: str | os.PathLike[str] | None = None,
                      device: str | None = None, extra: Mapping[str, Any] | None = None,
                      given: Iterable[str] = ()) -> Provider:
    """A provider from ``--explainer_provider`` and friends, resolved through the provider registry only
    (delphi's ``offline``, ``vllm`` and ``openrouter`` are registered providers).

    Options are validated by the provider's options model, never dropped when the user gave them: every
    ``extra`` key (``--provider_option``) and every option named in ``given`` (run flags set explicitly:
    ``model``, ``base_url``, ``max_concurrency``, ``api_key_env``, ``cache``) that the provider does not
    accept is a one-line :class:`UsageError` naming the key, the provider and the accepted options. The
    run's own settings (defaults, ``cache_dir``, and ``device``, the subject model's device) are passed
    only where the provider takes them; None values leave the provider's defaults."""
    from .llm import make_provider
    from .manager import resolve

    cls = resolve("provider", str(name).strip())
    accepted = _fields(cls)
    given = set(given)
    settings: dict[str, Any] = {"model": model, "base_url": base_url, "max_concurrency": max_concurrency,
                                "api_key_env": api_key_env, "cache": cache,
                                "cache_dir": None if cache_dir is None else str(cache_dir), "device": device}
    options = {k: v for k, v in settings.items()
               if v is not None and (k in accepted or (k in given and k not in RUN_PROVIDER_SETTINGS))}
    options.update(extra or {})
    return make_provider(cls.name, **options)


RUN_PROVIDER_SETTINGS = ("cache_dir", "device")
"""Run settings handed to a provider only when it takes them (``device`` is the subject model's, and is
also the local provider's device)."""


# --------------------------------------------------------------------------------------------------
# Dictionaries and records of a full run


def sites_at(hookpoint: str, sites: SiteSpec) -> SiteSpec:
    """``sites`` moved to ``hookpoint`` (for a dictionary whose format records no hookpoint): an
    autoencoder reads and writes it; a transcoder reads ``layers.N.mlp.input`` and writes ``layers.N.mlp``
    whichever of the two is given."""
    if sites.is_autoencoder:
        inputs, outputs = [hookpoint], [hookpoint]
    elif hookpoint.endswith(".input"):
        inputs, outputs = [hookpoint], [hookpoint[: -len(".input")]]
    else:
        inputs, outputs = [f"{hookpoint}.input"], [hookpoint]
    return SiteSpec(inputs=inputs, outputs=outputs, d_in=sites.d_in, d_out=sites.d_out)


def sparse_model_path(sparse_model: str | os.PathLike[str]) -> Path:
    """``sparse_model`` as a path; one-line error when it does not exist."""
    path = Path(sparse_model).expanduser()
    if not path.exists():
        raise UsageError(f"SPARSE_MODEL {str(sparse_model)!r} does not exist; give a saelab, SAELens or sparsify "
                         f"dictionary directory, a directory of them, or a run directory (results/<name>)")
    return path


def find_dictionaries(sparse_model: str | os.PathLike[str], hookpoints: Sequence[str] = (), *,
                      loaded: dict[Path, SparseDictionary] | None = None) -> dict[str, Path]:
    """Dictionary directories of SPARSE_MODEL by hookpoint: :func:`saelab.formats.dictionaries_by_hookpoint`
    (one discovery for every command), after the SPARSE_MODEL check of :func:`sparse_model_path`."""
    return dictionaries_by_hookpoint(sparse_model_path(sparse_model), hookpoints, loaded=loaded)


EXAMPLE_KEYS = ("example_ctx_len", "center_examples", "min_examples", "n_examples_train", "n_examples_test",
                "n_non_activating", "n_quantiles", "train_type", "test_type", "ratio_top", "non_activating_source",
                "neighbours_type", "filter_bos", "max_latents", "feature_num", "seed")
"""Run options that go to :class:`saelab.examples.ExampleOptions` unchanged."""


PLUGIN_OPTION_KEYS = ("sampler_options", "non_activating_options", "neighbour_options")
"""Example options addressed to one sampler / non-activating source / neighbour finder by name; left out of
the records' fingerprint when empty (records built before they existed stay valid)."""


def example_options(values: Mapping[str, Any], contrastive: bool = False) -> dict[str, Any]:
    """:class:`saelab.examples.ExampleOptions` values from resolved run values."""
    options = {k: values[k] for k in EXAMPLE_KEYS if k in values}
    if options.get("feature_num") is not None:
        from .examples import feature_num_values

        options["feature_num"] = feature_num_values(options["feature_num"])
    if contrastive:
        options["n_train_non_activating"] = int(values.get("n_examples_train", 40))
    options["overwrite_neighbours"] = "neighbours" in set(values.get("overwrite") or ())
    from .examples import addressed_options

    for flag, key in zip(("sampler_option", "non_activating_option", "neighbour_option"), PLUGIN_OPTION_KEYS,
                         strict=True):
        if values.get(flag):
            options[key] = addressed_options(values[flag], f"--{flag}")
    return options


def record_set(layout: RunLayout, latent_cache: Any, options: Mapping[str, Any], *, tokenizer: Any,
               dictionary: Any = None, rebuild: bool = False) -> RecordSet:
    """The records of one latent cache: reused from ``records/<hook>/`` when built from the same cache
    and example options, else built with :func:`saelab.examples.build_records` and saved."""
    from .examples import TEXT_DECODING, ExampleOptions, build_records

    opts = ExampleOptions.parse(dict(options), where="examples")
    hook = latent_cache.hookpoint
    fp = inputs_fingerprint({"latent_cache": latent_cache.fingerprint, "text_decoding": TEXT_DECODING,
                             "examples": opts.model_dump(mode="json", exclude={"overwrite_neighbours", *(
                                 k for k in PLUGIN_OPTION_KEYS if not getattr(opts, k))})})
    index = read_index(layout, hook)
    if index is not None and index.get("fingerprint") == fp and not rebuild and not opts.overwrite_neighbours:
        try:
            return load_records(layout, hook)
        except UsageError:
            pass
    records, summary = build_records(latent_cache, opts, tokenizer=tokenizer, dictionary=dictionary)
    skipped = {int(i): f"fewer than min_examples={opts.min_examples} activating windows" for i in summary.skipped}
    result = RecordSet(hook, records, skipped, fp)
    save_records(layout, result)
    return result


# --------------------------------------------------------------------------------------------------
# Helpers


def _usage_snapshot(provider: Provider | None) -> Usage | None:
    """A copy of the provider's usage totals now (None without a provider or when it does not count)."""
    return None if provider is None or provider.usage is None else provider.usage.snapshot()


def _usage_delta(before: Usage | None, after: Usage | None) -> dict[str, Any]:
    """What was counted between two snapshots, as the run summary's ``usage`` (empty when not counted)."""
    if after is None:
        return {}
    return (after - before if before is not None else after).to_json()


class _Progress:
    """A rich progress bar over latents (a no-op when disabled)."""

    def __init__(self, total: int, description: str, enabled: bool):
        self.enabled = enabled and total > 0
        self._progress: Any = None
        self._task: Any = None
        self.total = total
        self.description = description

    def __enter__(self) -> _Progress:
        if self.enabled:
            from .progress import progress

            self._progress = progress()
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=self.total)
        return self

    def advance(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._task)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def inputs_fingerprint(data: Any) -> str:
    """Content hash of arbitrary JSON-able inputs (records index fingerprints)."""
    return content_hash(data, length=20)


__all__ = [
    "OVERWRITE_STAGES",
    "EXAMPLE_KEYS",
    "AutoInterp",
    "DryRunPlan",
    "Outcome",
    "outcome",
    "PlanRow",
    "RecordSet",
    "RunReport",
    "StageStats",
    "estimate_tokens",
    "example_options",
    "canonical_hookpoint",
    "dictionary_sites_text",
    "find_dictionaries",
    "records_hookpoint",
    "sparse_model_path",
    "sites_at",
    "make_explainer",
    "make_run_provider",
    "make_scorers",
    "record_set",
    "scorer_names",
    "fit_to_context",
    "flat_rows",
    "inputs_fingerprint",
    "load_records",
    "plan",
    "print_plan",
    "print_summary",
    "read_index",
    "save_records",
    "summarize",
    "write_summary",
]


def _max_tokens(component: Explainer | Scorer | None) -> int:
    """The answer budget an explainer or scorer asks for (its per-call params, e.g. chain of thought)."""
    if component is None:
        return 0
    value = component.call_params().get("max_tokens")
    return int(value) if isinstance(value, (int, float)) else 0
