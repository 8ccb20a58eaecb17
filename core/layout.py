"""The run layout: the one place that spells the paths of ``results/<name>/``.

Every command that reads or writes a run goes through :class:`RunLayout`::

    results/                          results_dir(): --results root, $SAELAB_RESULTS_DIR or ./results
      .activations/<fingerprint>/     activation_store(): the shared activation caches
      <name>/                         run_dir(name) == RunLayout.named(name).root
        run_config.json               what each command ran with (saelab.config)
        run_history.jsonl             one line per invocation and its outcome
        dictionaries/<dict>/          trained dictionaries (cfg.json, weights, eval.json)
        latents/<hook>/               the sparse latent cache and its statistics
        latents/<hook>/records/       records built by ``saelab latents --max_latents``
        records/<hook>/               latent records and their index.json
        explanations/<hook>/          one explanation per latent
        scores/<scorer>/<hook>/       one score per latent and scorer
        llm_cache/                    this run's LLM response cache
        summary.json, summary.csv     the run's summary
        report/                       the static HTML report
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

RESULTS_ENV = "SAELAB_RESULTS_DIR"
"""Environment variable naming the results root."""

ACTIVATIONS = ".activations"
RUN_CONFIG = "run_config.json"
RUN_HISTORY = "run_history.jsonl"
DICTIONARIES = "dictionaries"
LATENTS = "latents"
RECORDS = "records"
EXPLANATIONS = "explanations"
SCORES = "scores"
LLM_CACHE = "llm_cache"
SUMMARY_JSON = "summary.json"
SUMMARY_CSV = "summary.csv"
REPORT = "report"
INDEX = "index.json"
"""File name of a records index (``records/<hook>/index.json``)."""

RUN_MARKERS = (RECORDS, EXPLANATIONS, SCORES, LATENTS, DICTIONARIES)
"""Sub-directories whose presence marks a directory as a run directory."""


def results_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """Root of run directories: ``root``, else ``$SAELAB_RESULTS_DIR``, else ``./results``."""
    return Path(root or os.environ.get(RESULTS_ENV) or "results")


def run_dir(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """``results/<name>/``."""
    if not name or "/" in name or name in (".", "..") or name.startswith(ACTIVATIONS):
        raise UsageError(f"bad run name {name!r}; use a plain directory name such as 'demo'")
    return results_dir(root) / name


def activation_store(root: str | os.PathLike[str] | None = None) -> Path:
    """Shared activation-cache store: ``results/.activations/``."""
    return results_dir(root) / ACTIVATIONS


def hook_dirname(hookpoint: str) -> str:
    """Directory name of a hookpoint (or dictionary name): path separators replaced."""
    name = str(hookpoint).replace("/", "_").replace("\\", "_").replace(":", "__")
    if not name or name in (".", ".."):
        raise UsageError(f"bad hookpoint name {hookpoint!r} for a directory")
    return name


def latent_filename(latent: int) -> str:
    """``latent_<i>.json``."""
    return f"latent_{int(latent)}.json"


@dataclass
class RunLayout:
    """Paths inside one run directory."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @classmethod
    def named(cls, name: str, root: str | os.PathLike[str] | None = None) -> RunLayout:
        """The layout of ``results/<name>/`` (a bad name is a :class:`UsageError`)."""
        return cls(run_dir(name, root))

    def looks_like_run(self) -> bool:
        """Whether ``root`` holds a run config or one of a run's sub-directories."""
        return self.run_config.is_file() or any((self.root / d).is_dir() for d in RUN_MARKERS)

    @property
    def run_config(self) -> Path:
        """``run_config.json``."""
        return self.root / RUN_CONFIG

    @property
    def run_history(self) -> Path:
        """``run_history.jsonl``."""
        return self.root / RUN_HISTORY

    @property
    def dictionaries_dir(self) -> Path:
        """``dictionaries/``."""
        return self.root / DICTIONARIES

    def dictionary_dir(self, name: str) -> Path:
        """``dictionaries/<name>/`` (``name`` may hold ``/`` for nested sweeps)."""
        return self.dictionaries_dir / name

    @property
    def latents_root(self) -> Path:
        """``latents/``."""
        return self.root / LATENTS

    def latents_dir(self, hookpoint: str) -> Path:
        """``latents/<hook>/``: the latent cache of ``hookpoint``."""
        return self.latents_root / hook_dirname(hookpoint)

    def latent_records_dir(self, hookpoint: str) -> Path:
        """``latents/<hook>/records/``: records written by ``saelab latents``."""
        return self.latents_dir(hookpoint) / RECORDS

    @property
    def records_root(self) -> Path:
        """``records/``."""
        return self.root / RECORDS

    def record_dir(self, hookpoint: str) -> Path:
        """``records/<hook>/``."""
        return self.records_root / hook_dirname(hookpoint)

    def record_index(self, hookpoint: str) -> Path:
        """``records/<hook>/index.json``."""
        return self.record_dir(hookpoint) / INDEX

    def record_path(self, hookpoint: str, latent: int) -> Path:
        """``records/<hook>/latent_<i>.json``."""
        return self.record_dir(hookpoint) / latent_filename(latent)

    @property
    def explanations_root(self) -> Path:
        """``explanations/``."""
        return self.root / EXPLANATIONS

    def explanation_path(self, hookpoint: str, latent: int) -> Path:
        """``explanations/<hook>/latent_<i>.json``."""
        return self.explanations_root / hook_dirname(hookpoint) / latent_filename(latent)

    @property
    def scores_root(self) -> Path:
        """``scores/``."""
        return self.root / SCORES

    def score_path(self, scorer: str, hookpoint: str, latent: int) -> Path:
        """``scores/<scorer>/<hook>/latent_<i>.json``."""
        return self.scores_root / scorer / hook_dirname(hookpoint) / latent_filename(latent)

    @property
    def llm_cache(self) -> Path:
        """This run's LLM response cache."""
        return self.root / LLM_CACHE

    @property
    def summary_json(self) -> Path:
        """``summary.json``."""
        return self.root / SUMMARY_JSON

    @property
    def summary_csv(self) -> Path:
        """``summary.csv``."""
        return self.root / SUMMARY_CSV

    @property
    def report_dir(self) -> Path:
        """``report/``: the static HTML report."""
        return self.root / REPORT

    def hookpoints_with_records(self) -> list[str]:
        """Hookpoints whose records index exists (their names as stored in the index)."""
        base = self.records_root
        out = []
        for index in sorted(base.glob(f"*/{INDEX}")) if base.is_dir() else []:
            try:
                out.append(str(json.loads(index.read_text())["hookpoint"]))
            except (ValueError, KeyError, OSError):
                continue
        return out


__all__ = [
    "ACTIVATIONS",
    "DICTIONARIES",
    "EXPLANATIONS",
    "INDEX",
    "LATENTS",
    "LLM_CACHE",
    "RECORDS",
    "REPORT",
    "RESULTS_ENV",
    "RUN_CONFIG",
    "RUN_HISTORY",
    "RUN_MARKERS",
    "SCORES",
    "SUMMARY_CSV",
    "SUMMARY_JSON",
    "RunLayout",
    "activation_store",
    "hook_dirname",
    "latent_filename",
    "results_dir",
    "run_dir",
]
