"""The ``transcoder`` architecture: reads one site (e.g. ``layers.8.mlp.input``), reconstructs another
(``layers.8.mlp``); TopK by default, ReLU + decoder-weighted L1 with ``-o activation relu``."""

from __future__ import annotations

from saelab import hookimpl

from ._transcoder import TranscoderDictionary, TranscoderOptions


class TranscoderSAEOptions(TranscoderOptions):
    """Options of the ``transcoder`` architecture."""


class Transcoder(TranscoderDictionary):
    """Transcoder: encodes an input site, decodes a different output site (TopK or ReLU)."""

    name = "transcoder"
    Options = TranscoderSAEOptions


@hookimpl
def register_architectures(register):
    """Register the ``transcoder`` architecture."""
    register(Transcoder)
