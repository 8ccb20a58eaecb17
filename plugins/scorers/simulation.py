"""The ``simulation`` scorer: the LLM predicts 0-10 per token from the explanation; the score is the
correlation of its predictions with the true activations.

"Tokens" here are the display spans of :func:`saelab.autointerp.display_tokens`: a character split
across several tokens is one item, whose true activation is the max over its tokens."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from pydantic import Field
from saelab import hookimpl
from saelab.autointerp import (
    CallResult,
    PromptScorer,
    ScorerOptions,
    ScoringItem,
    display_activations,
    display_tokens,
)
from saelab.metrics import binary_metrics, pearson
from saelab.prompts import SYSTEM_PLACEHOLDERS, Placeholders
from saelab.records import LatentRecord, Prediction


class SimulationOptions(ScorerOptions):
    """Options of the ``simulation`` scorer."""

    positive_threshold: int = Field(default=1, ge=0, le=10)
    """An example is predicted activating when its largest predicted value reaches this."""
    max_tokens: int = Field(default=1000, ge=1)
    """Longest answer, in tokens (one integer per example token)."""


_LINE = re.compile(r"Example\s*(\d+)\s*:\s*\[([^\[\]]*)\]", re.IGNORECASE)


def parse_simulation(text: str, lengths: Sequence[int]) -> list[list[int] | None]:
    """Per example, its list of integers (clipped to 0-10) from ``Example N: [..]`` lines, or None when
    that line is missing, malformed or has the wrong number of values (the last line per N wins)."""
    found: dict[int, str] = {int(m.group(1)): m.group(2) for m in _LINE.finditer(text or "")}
    out: list[list[int] | None] = []
    for number, length in enumerate(lengths, 1):
        body = found.get(number)
        values: list[int] | None = None
        if body is not None:
            try:
                parsed = [int(float(v.strip())) for v in body.split(",") if v.strip()]
                values = [min(10, max(0, v)) for v in parsed] if len(parsed) == length else None
            except ValueError:
                values = None
        out.append(values)
    return out


class SimulationScorer(PromptScorer):
    """Per-token 0-10 predictions; metrics: pooled Pearson correlation over all tokens (``correlation``),
    mean per-example correlation of activating examples, and classification metrics where an example
    counts as predicted activating when its largest prediction reaches ``positive_threshold`` (AUC from
    that largest prediction)."""

    name = "simulation"
    Options = SimulationOptions
    prompt_prefix = "scorers.simulation"
    prompt_file = "simulation.yaml"
    prompt_placeholders = {"system": SYSTEM_PLACEHOLDERS, "user": Placeholders(required=("explanation", "examples"))}

    def format_examples(self, batch: Sequence[ScoringItem]) -> str:
        lines = []
        for i, item in enumerate(batch, 1):
            tokens = display_tokens(item.example)
            lines.append(f"Example {i} ({len(tokens)} tokens): {json.dumps(tokens, ensure_ascii=False)}")
        return "\n".join(lines)

    def parse_batch(self, batch: Sequence[ScoringItem], result: CallResult) -> list[Prediction]:
        parsed = parse_simulation(result.text, [len(display_tokens(item.example)) for item in batch])
        out = []
        for item, values in zip(batch, parsed, strict=True):
            if values is None:
                out.append(Prediction(example_id=item.example.id, truth=item.truth, quantile=item.example.quantile,
                                      raw=result.text, parse_failed=True))
                continue
            predicted = int(max(values, default=0) >= self.options.positive_threshold)
            out.append(Prediction(
                example_id=item.example.id, truth=item.truth, prediction=predicted,
                probability=None, score=pearson([float(v) for v in values], display_activations(item.example)),
                correct=predicted == item.truth, quantile=item.example.quantile,
                values=[float(v) for v in values], raw=result.text))
        return out

    def metrics(self, predictions: Sequence[Prediction], record: LatentRecord) -> dict[str, float | None]:
        ok = [p for p in predictions if p.values is not None]
        truths_by_id = {e.id: display_activations(e) for e in (*record.test, *record.non_activating)}
        xs = [v for p in ok for v in p.values or []]
        ys = [a for p in ok for a in truths_by_id[p.example_id]]
        per_example = [p.score for p in ok if p.truth and p.score is not None]
        metrics = binary_metrics([p.truth for p in predictions], [p.prediction for p in predictions],
                                 [max(p.values) / 10 if p.values else None for p in predictions])
        metrics["correlation"] = pearson(xs, ys)
        metrics["mean_example_correlation"] = sum(per_example) / len(per_example) if per_example else None
        return metrics


@hookimpl
def register_scorers(register):
    register(SimulationScorer)
