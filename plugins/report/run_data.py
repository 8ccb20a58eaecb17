"""Reading a run directory for the HTML report: records, explanations, current scores, evaluations and
latent-cache statistics, gathered per hookpoint and latent (:func:`load_run`).

The layout read is the one :mod:`saelab.pipeline` writes (``records/``, ``explanations/``, ``scores/``,
``latents/``, ``dictionaries/``, ``run_config.json``, ``summary.json``). Nothing here writes HTML.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saelab.errors import UsageError
from saelab.layout import INDEX, RunLayout, latent_filename
from saelab.records import Explanation, LatentRecord, ScoreResult, score_is_current

MAIN_METRICS: dict[str, str] = {
    "detection": "balanced_accuracy",
    "fuzz": "balanced_accuracy",
    "simulation": "correlation",
    "intruder": "accuracy",
    "surprisal": "auc",
    "embedding": "auc",
}
"""The per-latent score shown for each scorer (other scorers: ``balanced_accuracy``, else ``auc``, else
``accuracy``, else ``correlation``, whichever the score has)."""


def histogram(values: Sequence[float], lo: float, hi: float, bins: int) -> tuple[list[int], list[float]]:
    """Counts of ``values`` in ``bins`` equal bins over ``[lo, hi]`` (values outside are clamped in)."""
    width = (hi - lo) / bins if hi > lo else 1.0
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, max(0, int((v - lo) / width)))] += 1
    return counts, [lo + i * width for i in range(bins + 1)]


def failure_note(score: ScoreResult) -> str | None:
    """``"failed 10/10 prompts"`` when some of the score's prompts failed (no answer or no parse), else None."""
    failed = score.failures.prompts
    if failed <= 0:
        return None
    total = max(score.n_prompts, failed)
    return f"failed {failed}/{total} prompt{'s' if total != 1 else ''}"


def main_metric(scorer: str, metrics: Mapping[str, Any]) -> tuple[str | None, float | None]:
    """(metric name, value) of the per-latent score shown for ``scorer`` (see :data:`MAIN_METRICS`)."""
    names = [MAIN_METRICS[scorer]] if scorer in MAIN_METRICS else []
    names += ["balanced_accuracy", "auc", "accuracy", "correlation"]
    for name in names:
        value = metrics.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return name, float(value)
    return (names[0] if names else None), None


@dataclass
class LatentEntry:
    """Everything the report knows about one latent."""

    hookpoint: str
    latent: int
    record: LatentRecord | None = None
    explanation: Explanation | None = None
    scores: dict[str, ScoreResult] = field(default_factory=dict)
    frequency: float | None = None
    max_activation: float | None = None
    histogram: tuple[list[float], float, float] | None = None
    """Activation histogram: (counts, low, high) with equal bins over [low, high]."""
    problems: list[str] = field(default_factory=list)
    """Files of this latent that could not be read (shown on its page)."""


@dataclass
class HookData:
    """One hookpoint (dictionary) of the run."""

    hookpoint: str
    dirname: str
    stats: dict[str, Any] | None = None
    """The latent cache's ``stats.json`` (None when there is no latent cache)."""
    latents: dict[int, LatentEntry] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    """Latents skipped while building records, with the reason."""


@dataclass
class RunData:
    """A run directory read for the report."""

    root: Path
    config: dict[str, Any]
    evals: list[dict[str, Any]]
    summary: dict[str, Any] | None
    hooks: list[HookData]

    @property
    def scorers(self) -> list[str]:
        """Every scorer with at least one score in the report, in first-seen order."""
        out: list[str] = []
        for hook in self.hooks:
            for entry in hook.latents.values():
                out += [s for s in entry.scores if s not in out]
        return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _latent_ids(directory: Path) -> set[int]:
    out = set()
    if directory.is_dir():
        for p in directory.glob("latent_*.json"):
            try:
                out.add(int(p.stem.split("_", 1)[1]))
            except ValueError:
                continue
    return out


def _stats_arrays(latents_dir: Path) -> Any:
    """A lazy reader of ``stats.safetensors`` (None when absent or unreadable)."""
    path = latents_dir / "stats.safetensors"
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        return safe_open(str(path), framework="pt")
    except Exception:  # safetensors raises several types for damaged files
        return None


def _evals(root: Path, config: Mapping[str, Any]) -> list[dict[str, Any]]:
    dirs: list[Path] = []
    base = RunLayout(root).dictionaries_dir
    if base.is_dir():
        dirs += sorted(p.parent for p in base.glob("**/eval.json"))
    extra = config.get("dictionaries")
    if isinstance(extra, Mapping):
        dirs += [Path(str(p)) for p in extra.values() if (Path(str(p)) / "eval.json").is_file()]
    rows, seen = [], set()
    for d in dirs:
        key = d.resolve()
        if key in seen:
            continue
        seen.add(key)
        data = _read_json(d / "eval.json")
        if not isinstance(data, Mapping):
            continue
        cfg = _read_json(d / "cfg.json") or {}
        try:
            name = str(d.relative_to(base))
        except ValueError:
            name = str(d)
        rows.append({"name": name, "architecture": cfg.get("architecture") or cfg.get("arch") or "",
                     "d_sae": cfg.get("d_sae") or cfg.get("num_latents"),
                     "metrics": dict(data.get("metrics") or {}), "held_out": data.get("held_out")})
    return rows


def load_run(run_dir: str | os.PathLike[str], max_latents: int | None = None) -> RunData:
    """Read what the report shows from ``run_dir``; at most ``max_latents`` latent pages per hookpoint
    (the first ones by index). Unreadable per-latent files are noted on the latent's page, not fatal."""
    from saelab.config import read_run_config

    root = Path(run_dir)
    if not root.is_dir():
        raise UsageError(f"run directory {str(root)!r} does not exist; give a run name under results/ or a "
                         f"run directory")
    config = read_run_config(root)
    layout = RunLayout(root)
    names: dict[str, str] = {}  # dirname -> hookpoint
    dirnames: list[str] = []

    def add(dirname: str, hookpoint: str | None = None) -> None:
        if dirname not in dirnames:
            dirnames.append(dirname)
        if hookpoint and dirname not in names:
            names[dirname] = hookpoint

    for index in sorted(layout.records_root.glob(f"*/{INDEX}")):
        data = _read_json(index)
        add(index.parent.name, (data or {}).get("hookpoint"))
    for d in sorted(p for p in layout.explanations_root.glob("*") if p.is_dir()):
        add(d.name)
    for d in sorted(p for p in layout.scores_root.glob("*/*") if p.is_dir()):
        add(d.name)
    for stats in sorted(layout.latents_root.glob("*/stats.json")):
        data = _read_json(stats)
        add(stats.parent.name, (data or {}).get("hookpoint"))

    hooks = []
    score_dirs = sorted(p for p in layout.scores_root.glob("*") if p.is_dir())
    for dirname in dirnames:
        index = _read_json(layout.records_root / dirname / INDEX) or {}
        ids: list[int] = [int(i) for i in index.get("latents", [])]
        extra = _latent_ids(layout.explanations_root / dirname)
        for sd in score_dirs:
            extra |= _latent_ids(sd / dirname)
        extra |= _latent_ids(layout.records_root / dirname) - set(ids)
        ids += sorted(extra - set(ids))
        if max_latents is not None:
            ids = ids[:max_latents]
        stats = _read_json(layout.latents_root / dirname / "stats.json")
        hook = HookData(names.get(dirname, dirname), dirname, stats if isinstance(stats, dict) else None,
                        skipped={str(k): str(v) for k, v in (index.get("skipped") or {}).items()})
        arrays = _stats_arrays(layout.latents_root / dirname)
        per = (hook.stats or {}).get("latents") or {}
        for i in ids:
            entry = LatentEntry(hook.hookpoint, i)
            entry.record = _load(LatentRecord, layout.records_root / dirname / latent_filename(i), entry)
            entry.explanation = _load(Explanation, layout.explanations_root / dirname / latent_filename(i), entry)
            for sd in score_dirs:
                score = _load(ScoreResult, sd / dirname / latent_filename(i), entry)
                if score is not None and score_is_current(score, entry.explanation):
                    entry.scores[score.scorer or sd.name] = score
            if entry.record is not None and names.get(dirname) is None:
                hook.hookpoint = entry.hookpoint = entry.record.hookpoint
            _fill_stats(entry, per, arrays)
            hook.latents[i] = entry
        hooks.append(hook)
    summary = _read_json(layout.summary_json)
    return RunData(root, config, _evals(root, config), summary if isinstance(summary, dict) else None, hooks)


def _load(cls: Any, path: Path, entry: LatentEntry) -> Any:
    if not path.is_file():
        return None
    try:
        return cls.load(path)
    except (UsageError, OSError, ValueError) as exc:
        entry.problems.append(f"{path.name} in {path.parent}: {exc}")
        return None


def _fill_stats(entry: LatentEntry, per: Mapping[str, Any], arrays: Any) -> None:
    i = entry.latent
    freq, vmax = per.get("frequency") or [], per.get("max_activation") or []
    if i < len(freq):
        entry.frequency = float(freq[i])
    if i < len(vmax):
        entry.max_activation = float(vmax[i])
    stats = entry.record.stats if entry.record is not None else None
    if stats is not None:
        entry.frequency = stats.frequency if entry.frequency is None else entry.frequency
        entry.max_activation = stats.max_activation if entry.max_activation is None else entry.max_activation
    if arrays is not None:
        try:
            counts = arrays.get_slice("histogram")[i : i + 1].tolist()[0]
            lo, hi = arrays.get_slice("histogram_range")[i : i + 1].tolist()[0]
            entry.histogram = ([float(c) for c in counts], float(lo), float(hi))
        except Exception:  # missing keys or a latent beyond the arrays: no histogram
            entry.histogram = None
    if entry.histogram is None and entry.record is not None:  # fall back on the examples' activations
        values = [a for e in entry.record.train + entry.record.test for a in e.activations if a > 0]
        if values:
            counts, edges = histogram(values, 0.0, max(values), 20)
            entry.histogram = ([float(c) for c in counts], edges[0], edges[-1])


__all__ = [
    "MAIN_METRICS",
    "HookData",
    "LatentEntry",
    "RunData",
    "failure_note",
    "histogram",
    "load_run",
    "main_metric",
]
