"""Sampler ``random``: uniformly drawn activating windows."""

from __future__ import annotations

import torch
from saelab import Sampler, hookimpl
from saelab.examples import Candidates


class RandomSampler(Sampler):
    """``n`` windows drawn uniformly without replacement."""

    name = "random"

    def sample(self, candidates: Candidates, n: int, generator: torch.Generator) -> torch.Tensor:
        """Indices of ``n`` random candidates (all of them when there are fewer), sorted."""
        perm = torch.randperm(len(candidates), generator=generator)
        return perm[: max(0, n)].sort().values


@hookimpl
def register_samplers(register):
    register(RandomSampler)
