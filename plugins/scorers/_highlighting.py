"""Random highlighting shared by the ``fuzz`` and ``intruder`` scorers (private: not an entry point)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from saelab.autointerp import display_activations, display_tokens
from saelab.highlight import highlight_mask, highlight_tokens, random_mask
from saelab.records import Example


def mean_highlighted(examples: Sequence[Example], threshold: float) -> int:
    """Rounded mean number of highlighted spans (tokens) per activating example (at least 1)."""
    counts = [sum(highlight_mask(display_activations(e), threshold)) for e in examples]
    return max(1, round(sum(counts) / len(counts))) if counts else 1


def random_highlight(example: Example, n_tokens: int, rng: random.Random) -> str:
    """``example`` with ``n_tokens`` random spans (tokens) highlighted."""
    tokens = display_tokens(example)
    return highlight_tokens(tokens, random_mask(len(tokens), n_tokens, rng))
