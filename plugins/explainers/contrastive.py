"""The ``contrastive`` explainer: ACTIVATING and NON-ACTIVATING examples side by side."""

from __future__ import annotations

from pydantic import Field
from saelab import hookimpl
from saelab.autointerp import ExplainerOptions, LLMExplainer, highlighted_text, number_examples, plain_text
from saelab.prompts import SYSTEM_PLACEHOLDERS, Placeholders, fill
from saelab.records import Example, LatentRecord


class ContrastiveExplainerOptions(ExplainerOptions):
    """Options of the ``contrastive`` explainer."""

    max_non_activating: int | None = Field(default=None, ge=1)
    """Show at most this many non-activating examples (None: all)."""


class ContrastiveExplainer(LLMExplainer):
    """Explains what distinguishes activating examples (highlighted) from non-activating ones.

    Uses the record's ``train_non_activating`` examples; when the sampler provided none it falls back
    to ``non_activating`` (the scoring negatives), which the explainer then has seen.
    """

    name = "contrastive"
    Options = ContrastiveExplainerOptions
    prompt_prefix = "explainers.contrastive"
    prompt_file = "contrastive.yaml"
    prompt_key_aliases = {"explainers.default.system_contrastive": "system"}  # AutoInterp Full's key
    prompt_placeholders = {"system": SYSTEM_PLACEHOLDERS, "user": Placeholders(required=("activating", "non_activating"))}

    def negatives(self, record: LatentRecord) -> list[Example]:
        """The non-activating examples shown."""
        pool = record.train_non_activating or record.non_activating
        limit = self.options.max_non_activating
        return list(pool[:limit] if limit else pool)

    def user_message(self, record: LatentRecord) -> str:
        activating = number_examples([highlighted_text(e, self.options.threshold) for e in self.train_examples(record)])
        negatives = number_examples([plain_text(e) for e in self.negatives(record)]) or "(none)"
        return fill(str(self.prompts["explainers.contrastive.user"]), activating=activating,
                    non_activating=negatives)


@hookimpl
def register_explainers(register):
    register(ContrastiveExplainer)
