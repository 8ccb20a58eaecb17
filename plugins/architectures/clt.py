"""The ``clt`` architecture: a cross-layer transcoder (Anthropic 2025, "Circuit Tracing"; OpenMOSS
Llamascopium's ``train_clt``; circuit-tracer's ``CrossLayerTranscoder``).

L layers. The sites are layers in forward order: input site ``i`` (e.g. ``layers.i.mlp.input``) feeds
encoder ``i``, output site ``j`` (e.g. ``layers.j.mlp``) is reconstructed from the latents of every layer
``i <= j``::

    a_i     = act(x_i W_enc[i] + b_enc[i])                          W_enc [L, d_in, F], b_enc [L, F]
    y_hat_j = sum_{i <= j} a_i W_dec_i[:, j - i] + b_dec[j]  (+ x_j W_skip[j])

Decoders are stored per source layer, ``W_dec_i [F, L - i, d_out]`` (targets ``i..L-1``, L(L+1)/2 blocks
of ``[F, d_out]`` in all), as circuit-tracer lays them out, so that the rows of active latents can be
read alone. Latent ``f`` of layer ``i`` has the global index ``i * F + f`` (``d_sae = L * F``).

Activations, penalty, AuxK, the sparse and dense decode paths, folding and save/load are those of
:class:`~saelab.plugins.architectures._layer_transcoder.LayerTranscoder` (shared with ``transcoder_set``,
whose latents write to their own layer only); see that module for the details.
"""

from __future__ import annotations

import torch
from saelab import hookimpl

from ._layer_transcoder import LayerTranscoder, LayerTranscoderOptions


class CLTOptions(LayerTranscoderOptions):
    """Options of the ``clt`` architecture."""

    zero_init_off_diagonal: bool = False
    """Start every decoder block to a later layer (i -> j > i) at zero: training begins as a set of
    per-layer transcoders."""


class CrossLayerTranscoder(LayerTranscoder):
    """Cross-layer transcoder: layer i's latents write to every layer j >= i (JumpReLU, ReLU or TopK family)."""

    name = "clt"
    aliases = ("cross-layer-transcoder",)
    Options = CLTOptions
    cross_layer = True

    def _initial_decoder(self, W: torch.Tensor) -> torch.Tensor:
        """Zero the blocks to later layers with ``zero_init_off_diagonal``."""
        if self.options.zero_init_off_diagonal:
            W[:, 1:] = 0
        return W


@hookimpl
def register_architectures(register):
    """Register the ``clt`` architecture."""
    register(CrossLayerTranscoder)
