"""The ``transcoder_set`` architecture: L per-layer transcoders trained in one pass and saved, loaded and
evaluated as one dictionary (circuit-tracer's ``model_kind: transcoder_set``): the cheaper baseline of a
cross-layer transcoder.

Encoder ``i`` reads layer i's input site, decoder ``i`` writes layer i's output site only::

    a_i     = act(x_i W_enc[i] + b_enc[i])                 W_enc [L, d_in, F], b_enc [L, F]
    y_hat_i = a_i W_dec_i[:, 0] + b_dec[i]  (+ x_i W_skip[i])      W_dec_i [F, 1, d_out]

It is the ``clt`` code with the cross-layer blocks left out (``cross_layer = False``): the same
activations (``jumprelu``, ``relu``, ``topk`` per layer, ``topk_across_layers``, ``batchtopk``), tanh
penalty, AuxK, sparse/dense decoding, folding and layout, so that both train on the same tokens with the
same options. Decoder blocks start at ``U(+-1/sqrt(d_out))`` (the CLT's ``1/sqrt(L d_out)`` accounts for L
source layers per target), which gives each latent the same initial decoder norm as a CLT latent of layer 0.
Latent ``f`` of layer ``i`` has the global index ``i * F + f`` (``d_sae = L * F``).
"""

from __future__ import annotations

from saelab import hookimpl

from ._layer_transcoder import LayerTranscoder, LayerTranscoderOptions


class TranscoderSetOptions(LayerTranscoderOptions):
    """Options of the ``transcoder_set`` architecture (those of ``clt`` without the cross-layer blocks)."""


class TranscoderSet(LayerTranscoder):
    """A set of per-layer transcoders as one dictionary: layer i's latents write to layer i only."""

    name = "transcoder_set"
    Options = TranscoderSetOptions
    cross_layer = False


@hookimpl
def register_architectures(register):
    """Register the ``transcoder_set`` architecture."""
    register(TranscoderSet)
