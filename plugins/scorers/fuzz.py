"""The ``fuzz`` scorer: does the explanation tell correct highlighting from random highlighting?"""

from __future__ import annotations

import random

from pydantic import Field
from saelab import hookimpl
from saelab.autointerp import BinaryPromptScorer, ScorerOptions, ScoringItem, highlighted_text
from saelab.prompts import SYSTEM_PLACEHOLDERS, Placeholders
from saelab.records import LatentRecord

from ._highlighting import mean_highlighted, random_highlight


class FuzzOptions(ScorerOptions):
    """Options of the ``fuzz`` scorer."""

    threshold: float = Field(default=0.3, ge=0.0, le=1.0)
    """Activating tokens above this fraction of the example's max are highlighted."""


class FuzzScorer(BinaryPromptScorer):
    """Activating examples highlighted where the latent fires; non-activating ones with as many random
    tokens highlighted as activating examples have on average; the LLM answers 0/1 per example."""

    name = "fuzz"
    Options = FuzzOptions
    prompt_prefix = "scorers.fuzz"
    prompt_file = "fuzz.yaml"
    prompt_placeholders = {"system": SYSTEM_PLACEHOLDERS, "user": Placeholders(required=("explanation", "examples"))}

    def prepare(self, record: LatentRecord, items: list[ScoringItem], rng: random.Random) -> None:
        n_random = mean_highlighted(record.test, self.options.threshold)
        for item in items:
            if item.truth:
                item.shown = highlighted_text(item.example, self.options.threshold)
            else:
                item.shown = random_highlight(item.example, n_random, rng)
                item.extra["n_highlighted"] = n_random


@hookimpl
def register_scorers(register):
    register(FuzzScorer)
