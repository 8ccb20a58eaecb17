"""The ``np_max_act`` explainer: a concise label from max-activating examples and top logits."""

from __future__ import annotations

import json

from pydantic import Field
from saelab import hookimpl
from saelab.autointerp import ExplainerOptions, LLMExplainer, highlighted_text, number_examples
from saelab.prompts import SYSTEM_PLACEHOLDERS, Placeholders, fill
from saelab.records import LatentRecord, TokenValues


class NpMaxActOptions(ExplainerOptions):
    """Options of the ``np_max_act`` explainer."""

    n_examples: int = Field(default=10, ge=1)
    """Max-activating examples shown (the strongest train examples)."""
    n_logits: int = Field(default=10, ge=0)
    """Promoted / suppressed tokens shown."""
    max_words: int = Field(default=8, ge=1)
    """Labels longer than this many words are cut."""
    max_tokens: int = Field(default=60, ge=1)
    """Longest answer, in tokens."""


def _tokens(values: TokenValues | None, n: int) -> str:
    if values is None or not values.tokens or n == 0:
        return "(not available)"
    return ", ".join(json.dumps(t, ensure_ascii=False) for t in values.tokens[:n])


class NpMaxActExplainer(LLMExplainer):
    """Concise noun-phrase label from the strongest examples and the tokens the latent promotes."""

    name = "np_max_act"
    aliases = ("np-max-act",)
    Options = NpMaxActOptions
    prompt_prefix = "explainers.np_max_act"
    prompt_file = "np_max_act.yaml"
    prompt_key_aliases = {"explainers.np_max_act.system_concise": "system"}  # AutoInterp Full's key
    prompt_placeholders = {"system": SYSTEM_PLACEHOLDERS,
                           "user": Placeholders(required=("examples",), optional=("top_logits", "bottom_logits"))}

    def user_message(self, record: LatentRecord) -> str:
        strongest = sorted(record.train, key=lambda e: -(e.max_activation or 0.0))[: self.options.n_examples]
        return fill(str(self.prompts["explainers.np_max_act.user"]),
                    examples=number_examples([highlighted_text(e, self.options.threshold) for e in strongest]),
                    top_logits=_tokens(record.top_logits, self.options.n_logits),
                    bottom_logits=_tokens(record.bottom_logits, self.options.n_logits))

    def parse(self, text: str) -> tuple[str, bool]:
        """The label after ``[EXPLANATION]:`` (or, without it, the first non-empty line), trailing
        punctuation removed and cut to ``max_words`` words; an empty answer is a failure."""
        label, parsed = super().parse(text)
        if not parsed:
            lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
            label = lines[0] if lines else ""
            parsed = bool(label)
        label = label.strip().strip("\"'`").rstrip(".").strip()
        words = label.split()
        return " ".join(words[: self.options.max_words]), parsed and bool(words)


@hookimpl
def register_explainers(register):
    register(NpMaxActExplainer)
