"""The ``default`` explainer: delphi's highlighted examples, optional activations and chain of thought."""

from __future__ import annotations

from typing import Any

from pydantic import Field
from saelab import hookimpl
from saelab.autointerp import (
    ExplainerOptions,
    LLMExplainer,
    display_activations,
    display_tokens,
    highlighted_text,
)
from saelab.highlight import activation_line
from saelab.prompts import NO_PLACEHOLDERS, SYSTEM_PLACEHOLDERS, Placeholders, fill
from saelab.records import LatentRecord


class DefaultExplainerOptions(ExplainerOptions):
    """Options of the ``default`` explainer."""

    show_activations: bool = False
    """Follow each example with ``Activations: ("tok", 7), ...`` (0-10 scale, the latent's max = 10)."""
    cot: bool = False
    """Ask for step-by-step reasoning before the ``[EXPLANATION]:`` line (the answer is then not constrained
    to one line)."""
    cot_max_tokens: int = Field(default=500, ge=1)
    """Longest answer with ``cot`` (reasoning needs more than ``max_tokens``)."""
    max_activation_tokens: int | None = 10
    """At most this many tokens per ``Activations:`` line (None: all highlighted tokens)."""


def record_max_activation(record: LatentRecord) -> float:
    """The latent's max activation: from its stats, else the max over its activating examples."""
    if record.stats is not None and record.stats.max_activation > 0:
        return float(record.stats.max_activation)
    return max((e.max_activation or 0.0 for e in (*record.train, *record.test)), default=0.0)


class DefaultExplainer(LLMExplainer):
    """Highlighted <<tokens>> of the train examples; the answer is parsed after [EXPLANATION]:."""

    name = "default"
    Options = DefaultExplainerOptions
    prompt_prefix = "explainers.default"
    prompt_file = "default.yaml"
    prompt_placeholders = {"system": SYSTEM_PLACEHOLDERS, "activations": NO_PLACEHOLDERS, "cot": NO_PLACEHOLDERS,
                           "user": Placeholders(required=("examples",))}

    def system_message(self) -> str:
        parts = [str(self.prompts["explainers.default.system"])]
        if self.options.show_activations:
            parts.append(str(self.prompts["explainers.default.activations"]))
        if self.options.cot:
            parts.append(str(self.prompts["explainers.default.cot"]))
        return "\n\n".join(parts)

    def few_shot(self) -> list[dict[str, str]]:
        if not self.options.few_shot:
            return []
        user_key = "user_activations" if self.options.show_activations else "user"
        answer_keys = ("assistant_cot", "assistant") if self.options.cot else ("assistant",)
        return self.prompts.few_shot(self.prompt_prefix, user_key, answer_keys)

    def call_params(self) -> dict[str, Any]:
        params = super().call_params()
        if self.options.cot:
            params["max_tokens"] = self.options.cot_max_tokens
        return params

    def answer_format(self) -> dict[str, Any] | None:
        return None if self.options.cot else super().answer_format()

    def user_message(self, record: LatentRecord) -> str:
        top = record_max_activation(record)
        blocks = []
        for i, example in enumerate(self.train_examples(record), 1):
            block = f"Example {i}: {highlighted_text(example, self.options.threshold)}"
            if self.options.show_activations:
                block += "\n" + activation_line(display_tokens(example), display_activations(example),
                                                self.options.threshold, top or None,
                                                self.options.max_activation_tokens)
            blocks.append(block)
        return fill(str(self.prompts["explainers.default.user"]), examples="\n".join(blocks))


@hookimpl
def register_explainers(register):
    register(DefaultExplainer)
