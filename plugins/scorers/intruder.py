"""The ``intruder`` scorer (explanation-free): can the LLM spot the one example that does not belong?"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from pydantic import Field
from saelab import hookimpl
from saelab.autointerp import (
    CallResult,
    PromptScorer,
    ScorerOptions,
    ScoringItem,
    highlighted_text,
    latent_rng,
    plain_text,
)
from saelab.prompts import SYSTEM_PLACEHOLDERS, Placeholders
from saelab.records import Example, LatentRecord, Prediction

from ._highlighting import mean_highlighted, random_highlight


class IntruderOptions(ScorerOptions):
    """Options of the ``intruder`` scorer."""

    highlight: bool = True
    """Highlight activating tokens (and as many random tokens in the intruder), as delphi does."""
    threshold: float = Field(default=0.3, ge=0.0, le=1.0)
    """Activating tokens above this fraction of the example's max are highlighted."""
    max_tokens: int = Field(default=300, ge=1)
    """Longest answer, in tokens."""


_RESPONSE = re.compile(r"\[?\s*RESPONSE\s*\]?\s*:\s*(?:Example\s*)?(\d+)", re.IGNORECASE)


def parse_intruder(text: str, n: int) -> int | None:
    """The 1-based example number after the last ``[RESPONSE]:``, or a bare number as the whole
    answer; None when missing or out of range."""
    matches = _RESPONSE.findall(text or "")
    if matches:
        value = int(matches[-1])
    elif (text or "").strip().isdigit():
        value = int(text.strip())
    else:
        return None
    return value if 1 <= value <= n else None


class IntruderScorer(PromptScorer):
    """Each prompt: ``num_examples_per_scorer_prompt - 1`` activating test examples of similar
    quantile plus one non-activating intruder at a random position. One prediction per prompt (on the
    intruder); ``accuracy`` is the share of prompts where the intruder was found."""

    name = "intruder"
    Options = IntruderOptions
    prompt_prefix = "scorers.intruder"
    prompt_file = "intruder.yaml"
    prompt_placeholders = {"system": SYSTEM_PLACEHOLDERS, "user": Placeholders(required=("examples",))}
    requires_explanation = False

    def batches(self, record: LatentRecord) -> list[list[ScoringItem]]:
        rng = latent_rng(self.options.seed, self.name, record.hookpoint, record.latent)
        if not record.test or not record.non_activating:
            return []
        size = max(1, self.options.num_examples_per_scorer_prompt - 1)
        activating = list(record.test)
        rng.shuffle(activating)
        activating.sort(key=lambda e: -1 if e.quantile is None else e.quantile)  # stable: shuffled within quantile
        intruders = list(record.non_activating)
        rng.shuffle(intruders)
        n_random = mean_highlighted(record.test, self.options.threshold)
        batches = []
        for index, start in enumerate(range(0, len(activating), size)):
            group = [ScoringItem(e, 0, self._show(e)) for e in activating[start:start + size]]
            intruder = intruders[index % len(intruders)]
            shown = random_highlight(intruder, n_random, rng) if self.options.highlight else plain_text(intruder)
            group.insert(rng.randrange(len(group) + 1), ScoringItem(intruder, 1, shown))
            batches.append(group)
        return batches

    def _show(self, example: Example) -> str:
        return highlighted_text(example, self.options.threshold) if self.options.highlight else plain_text(example)

    def failed_predictions(self, batch: Sequence[ScoringItem], index: int, raw: str | None) -> list[Prediction]:
        intruder = next(item for item in batch if item.truth)
        return [Prediction(example_id=intruder.example.id, truth=1, quantile=_quantile(batch), raw=raw,
                           parse_failed=True, prompt_index=index)]

    def parse_batch(self, batch: Sequence[ScoringItem], result: CallResult) -> list[Prediction]:
        choice = parse_intruder(result.text, len(batch))
        if choice is None:
            return self.failed_predictions(batch, 0, result.text)
        intruder = next(item for item in batch if item.truth)
        found = batch[choice - 1] is intruder
        return [Prediction(example_id=intruder.example.id, truth=1, prediction=int(found), correct=found,
                           score=float(choice), quantile=_quantile(batch), raw=result.text)]

    def metrics(self, predictions: Sequence[Prediction], record: LatentRecord) -> dict[str, float | None]:
        parsed = [p for p in predictions if p.correct is not None]
        return {"accuracy": sum(bool(p.correct) for p in parsed) / len(parsed) if parsed else None,
                "n_prompts_parsed": len(parsed)}


def _quantile(batch: Sequence[ScoringItem]) -> int | None:
    quantiles = [item.example.quantile for item in batch if not item.truth and item.example.quantile is not None]
    return Counter(quantiles).most_common(1)[0][0] if quantiles else None


@hookimpl
def register_scorers(register):
    register(IntruderScorer)
