"""The ``single-token`` explainer: what the strongest token of each example has in common."""

from __future__ import annotations

import json
from collections import Counter

from pydantic import Field
from saelab import hookimpl
from saelab.autointerp import (
    ExplainerOptions,
    LLMExplainer,
    display_activations,
    display_tokens,
    highlighted_text,
    number_examples,
)
from saelab.prompts import SYSTEM_PLACEHOLDERS, Placeholders, fill
from saelab.records import LatentRecord


class SingleTokenExplainerOptions(ExplainerOptions):
    """Options of the ``single-token`` explainer."""

    max_contexts: int = Field(default=10, ge=0)
    """Highlighted contexts shown after the token list."""


class SingleTokenExplainer(LLMExplainer):
    """Lists each train example's max-activating token with counts, plus a few highlighted contexts."""

    name = "single-token"
    aliases = ("single_token",)
    Options = SingleTokenExplainerOptions
    prompt_prefix = "explainers.single_token"
    prompt_file = "single_token.yaml"
    prompt_key_aliases = {"explainers.default.system_single_token": "system"}  # AutoInterp Full's key
    prompt_placeholders = {"system": SYSTEM_PLACEHOLDERS,
                           "user": Placeholders(required=("tokens",), optional=("examples",))}

    def top_tokens(self, record: LatentRecord) -> list[tuple[str, int]]:
        """``(token, count)`` of the examples' max-activating tokens, most frequent first (ties: first seen)."""
        counts: Counter[str] = Counter()
        for example in self.train_examples(record):
            if example.activations:
                activations = display_activations(example)  # per display span: a split character counts whole
                best = max(range(len(activations)), key=activations.__getitem__)
                counts[display_tokens(example)[best]] += 1
        return counts.most_common()

    def user_message(self, record: LatentRecord) -> str:
        tokens = "\n".join(f"{json.dumps(tok, ensure_ascii=False)} (x{n})" for tok, n in self.top_tokens(record))
        contexts = [highlighted_text(e, self.options.threshold)
                    for e in self.train_examples(record)[: self.options.max_contexts]]
        return fill(str(self.prompts["explainers.single_token.user"]), tokens=tokens,
                    examples=number_examples(contexts) or "(none)")


@hookimpl
def register_explainers(register):
    register(SingleTokenExplainer)
