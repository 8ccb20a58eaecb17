"""Transcoders shared by ``transcoder`` and ``skip-transcoder``: a private module of this plugin package,
not an entry point. A transcoder encodes its input sites and reconstructs different output sites, with a
TopK activation (the TopK family's sparse forward and AuxK) or a ReLU with the decoder-norm-weighted L1
penalty."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from saelab import DictionaryOutput, SiteSpec, UsageError

from ._penalties import decoder_weighted_l1
from ._topk_family import TopKDictionary, TopKOptions


class TranscoderOptions(TopKOptions):
    """Options of transcoders (read one site, reconstruct another)."""

    activation: Literal["topk", "relu"] = "topk"
    """``topk`` (k latents per token, AuxK, unit-norm decoder) or ``relu`` (ReLU with a
    decoder-norm-weighted L1 penalty, free decoder norms)."""
    l1_coefficient: float = Field(default=1.0, ge=0)
    """Coefficient of the decoder-norm-weighted L1 penalty (``relu`` activation only; see ``relu``)."""


class TranscoderDictionary(TopKDictionary):
    """A transcoder: encodes the input sites and reconstructs different output sites.

    With ``activation="topk"`` it is a TopK dictionary (sparse forward, AuxK); with ``"relu"`` a dense
    ReLU dictionary with the decoder-norm-weighted L1 penalty. It needs inputs different from outputs.
    """

    Options: ClassVar[type[TranscoderOptions]] = TranscoderOptions

    def __init__(self, sites: SiteSpec, options: TranscoderOptions):
        if sites.is_autoencoder:
            raise UsageError(f"a {self.name} reads one site and reconstructs another; got the same sites "
                             f"{sites.inputs} for inputs and outputs (use an SAE architecture instead)")
        super().__init__(sites, options)
        self.unit_norm_decoder = options.activation == "topk"

    @property
    def latent_activation(self) -> Literal["relu", "topk", "threshold", "unknown"]:
        """The ``activation`` option: ``"topk"`` or ``"relu"``."""
        return self.options.activation

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents ``[batch, d_sae]``."""
        if self.options.activation == "relu":
            return F.relu(self.preacts(self.flat_input(x)))
        return super().encode(x)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None,
                dead_mask: torch.Tensor | None = None) -> DictionaryOutput:
        """TopK path, or for ``relu``: dense encode/decode with losses ``mse`` and ``l1``. Without
        ``target`` (inference) the output has no losses."""
        if self.options.activation == "topk":
            return super().forward(x, target, dead_mask)
        x_flat = self.flat_input(x)
        z = F.relu(self.preacts(x_flat))
        recon = torch.addmm(self.b_dec, z, self.W_dec) + self.skip(x_flat)
        if target is None:  # inference
            return DictionaryOutput(self.unflatten_output(recon), z.detach())
        y = self.flat_target(target)
        losses = {"mse": self.mse(recon, y), "l1": self.options.l1_coefficient * decoder_weighted_l1(z, self.W_dec)}
        return DictionaryOutput(self.unflatten_output(recon), z.detach(), losses)
