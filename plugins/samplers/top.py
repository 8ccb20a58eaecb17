"""Sampler ``top``: the strongest activating windows."""

from __future__ import annotations

import torch
from saelab import Sampler, hookimpl
from saelab.examples import Candidates


class TopSampler(Sampler):
    """The ``n`` windows with the highest max activation."""

    name = "top"

    def sample(self, candidates: Candidates, n: int, generator: torch.Generator) -> torch.Tensor:
        """Indices of the ``n`` strongest candidates (candidates are sorted strongest first)."""
        order = torch.argsort(candidates.value, descending=True, stable=True)
        return order[: max(0, n)]


@hookimpl
def register_samplers(register):
    register(TopSampler)
