"""Sampler ``mix``: a share of top windows, the rest spread over quantiles."""

from __future__ import annotations

import torch
from pydantic import Field
from saelab import Options, Sampler, hookimpl
from saelab.examples import Candidates, spread_over_quantiles


class MixOptions(Options):
    """Options of the mix sampler."""

    ratio_top: float = Field(default=0.2, ge=0, le=1)
    """Share of the examples taken from the top (``--ratio_top``)."""
    n_quantiles: int = Field(default=10, ge=1)
    """Quantiles the rest is spread over (recorded; labels come with the candidates)."""


class MixSampler(Sampler):
    """``round(ratio_top * n)`` strongest windows, the rest evenly over the quantiles of the others."""

    name = "mix"
    Options = MixOptions

    def sample(self, candidates: Candidates, n: int, generator: torch.Generator) -> torch.Tensor:
        """Indices of the top share plus a quantile sample of the remaining candidates."""
        n = min(max(0, n), len(candidates))
        n_top = int(round(self.options.ratio_top * n))
        order = torch.argsort(candidates.value, descending=True, stable=True)
        top, rest = order[:n_top], order[n_top:]
        more = spread_over_quantiles(rest, candidates.quantile[rest], n - n_top, generator)
        return torch.cat([top, more]).sort().values


@hookimpl
def register_samplers(register):
    register(MixSampler)
