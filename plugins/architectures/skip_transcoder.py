"""The ``skip-transcoder`` architecture: a transcoder plus a linear skip connection ``x @ W_skip``
(Paulo et al. 2025, as in sparsify); ``W_skip`` starts at zero and is trained with the rest."""

from __future__ import annotations

from saelab import hookimpl

from ._transcoder import TranscoderDictionary, TranscoderOptions


class SkipTranscoderOptions(TranscoderOptions):
    """Options of the ``skip-transcoder`` architecture."""


class SkipTranscoder(TranscoderDictionary):
    """Skip transcoder: a transcoder whose reconstruction adds a learned linear map of its input."""

    name = "skip-transcoder"
    Options = SkipTranscoderOptions
    skip_connection = True


@hookimpl
def register_architectures(register):
    """Register the ``skip-transcoder`` architecture."""
    register(SkipTranscoder)
