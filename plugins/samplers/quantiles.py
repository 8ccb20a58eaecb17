"""Sampler ``quantiles``: the same number of windows from each activation quantile (delphi's default)."""

from __future__ import annotations

import torch
from pydantic import Field
from saelab import Options, Sampler, hookimpl
from saelab.examples import Candidates, spread_over_quantiles


class QuantilesOptions(Options):
    """Options of the quantiles sampler."""

    n_quantiles: int = Field(default=10, ge=1)
    """Quantiles (the candidates' labels come from the latent cache's ``--n_quantiles``; this is recorded
    for reproducibility)."""


class QuantilesSampler(Sampler):
    """Equal numbers of windows from each activation quantile (short quantiles topped up by others)."""

    name = "quantiles"
    Options = QuantilesOptions

    def sample(self, candidates: Candidates, n: int, generator: torch.Generator) -> torch.Tensor:
        """Indices spread evenly over the candidates' quantile labels."""
        return spread_over_quantiles(torch.arange(len(candidates)), candidates.quantile, n, generator)


@hookimpl
def register_samplers(register):
    register(QuantilesSampler)
