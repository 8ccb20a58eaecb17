"""The ``detection`` scorer (old name ``recall``): does the explanation tell activating text from the rest?"""

from __future__ import annotations

from saelab import hookimpl
from saelab.autointerp import BinaryPromptScorer
from saelab.prompts import SYSTEM_PLACEHOLDERS, Placeholders


class DetectionScorer(BinaryPromptScorer):
    """Plain-text test and non-activating examples, shuffled; the LLM answers 0/1 per example."""

    name = "detection"
    aliases = ("recall",)
    prompt_prefix = "scorers.detection"
    prompt_file = "detection.yaml"
    prompt_placeholders = {"system": SYSTEM_PLACEHOLDERS, "user": Placeholders(required=("explanation", "examples"))}


@hookimpl
def register_scorers(register):
    register(DetectionScorer)
