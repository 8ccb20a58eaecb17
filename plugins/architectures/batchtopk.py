"""The ``batchtopk`` architecture: BatchTopK SAE (Bussmann et al. 2024) with an inference threshold."""

from __future__ import annotations

from saelab import hookimpl

from ._topk_family import BatchTopKDictionary, BatchTopKOptions


class BatchTopKSAEOptions(BatchTopKOptions):
    """Options of the ``batchtopk`` architecture."""


class BatchTopKSAE(BatchTopKDictionary):
    """BatchTopK SAE: batch*k activations per batch in training, a learned global threshold at inference."""

    name = "batchtopk"
    Options = BatchTopKSAEOptions


@hookimpl
def register_architectures(register):
    """Register the ``batchtopk`` architecture."""
    register(BatchTopKSAE)
