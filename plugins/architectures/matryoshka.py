"""The ``matryoshka`` architecture: nested-prefix BatchTopK SAE (Bussmann et al. 2025; as in HypotheSAEs
and SAELens). Every prefix of the latents (widths ``prefixes``) must reconstruct the input alone; the
loss is the sum of the prefix reconstruction losses (``mse`` for the full width + ``matryoshka`` for the
smaller prefixes)."""

from __future__ import annotations

import torch
from pydantic import field_validator
from saelab import SiteSpec, UsageError, hookimpl
from saelab.dictionary import SparseCodes

from ._topk_family import BatchTopKDictionary, BatchTopKOptions


class MatryoshkaOptions(BatchTopKOptions):
    """Options of the ``matryoshka`` architecture."""

    prefixes: list[int] | None = None
    """Increasing nested widths; the last is ``d_sae`` (appended if missing). Default:
    ``d_sae/8, d_sae/4, d_sae/2, d_sae``."""

    @field_validator("prefixes")
    @classmethod
    def _increasing(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            if not value or any(w < 1 for w in value) or any(b <= a for a, b in zip(value, value[1:], strict=False)):
                raise UsageError(f"prefixes={value} must be a non-empty, strictly increasing list of positive widths")
        return value


class MatryoshkaSAE(BatchTopKDictionary):
    """Matryoshka BatchTopK SAE: nested latent prefixes that each reconstruct the input."""

    name = "matryoshka"
    Options = MatryoshkaOptions

    def __init__(self, sites: SiteSpec, options: MatryoshkaOptions):
        super().__init__(sites, options)
        widths = list(options.prefixes) if options.prefixes else [self.d_sae // 8, self.d_sae // 4, self.d_sae // 2]
        if widths and widths[-1] > self.d_sae:
            raise UsageError(f"prefixes={widths} has widths above d_sae={self.d_sae}; the last prefix is d_sae")
        widths = sorted({w for w in widths if 1 <= w < self.d_sae} | {self.d_sae})
        self.prefixes = widths
        """Nested widths, increasing, ending with ``d_sae``."""

    def extra_losses(self, codes: SparseCodes, recon: torch.Tensor, target: torch.Tensor,
                     target_var: torch.Tensor) -> dict[str, torch.Tensor]:
        """``matryoshka``: summed MSE of the reconstructions from each smaller prefix."""
        if len(self.prefixes) == 1:
            return {}
        partial = self.b_dec.expand_as(target)
        total = target.new_zeros(())
        start = 0
        for width in self.prefixes[:-1]:
            band = (codes.cols >= start) & (codes.cols < width)
            partial = partial + codes.decode(self.W_dec, codes.values * band)
            total = total + self.mse(partial, target)
            start = width
        return {"matryoshka": total}


@hookimpl
def register_architectures(register):
    """Register the ``matryoshka`` architecture."""
    register(MatryoshkaSAE)
