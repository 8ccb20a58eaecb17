"""The ``topk`` architecture: TopK SAE (Gao et al. 2024) with the AuxK dead-latent loss."""

from __future__ import annotations

from saelab import hookimpl

from ._topk_family import TopKDictionary, TopKOptions


class TopKSAEOptions(TopKOptions):
    """Options of the ``topk`` architecture."""


class TopKSAE(TopKDictionary):
    """TopK SAE (Gao et al.): the k largest pre-activations per token, AuxK for dead latents."""

    name = "topk"
    Options = TopKSAEOptions


@hookimpl
def register_architectures(register):
    """Register the ``topk`` architecture."""
    register(TopKSAE)
