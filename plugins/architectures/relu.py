"""The ``relu`` architecture: ReLU SAE with an L1 penalty weighted by decoder row norms
(Anthropic, "Circuits Updates - April 2024"): ``f = ReLU(W_enc x + b_enc)``, ``x_hat = f W_dec + b_dec``,
loss ``||x - x_hat||^2 + l1_coefficient * sum_i f_i ||W_dec[i]||``, decoder norms free. The penalty
coefficient ramps up linearly over ``l1_warmup_steps`` optimizer steps (counted by the module)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from saelab import DictionaryOutput, SiteSpec, hookimpl
from saelab.dictionary import DictionaryOptions, LinearDictionary

from ._penalties import decoder_weighted_l1


class ReLUOptions(DictionaryOptions):
    """Options of the ``relu`` architecture."""

    l1_coefficient: float = Field(default=1.0, ge=0)
    """Weight of the decoder-norm-weighted L1 penalty, in the trainer's normalised units (E|x|^2 = d_in).
    Anthropic used 5 on their data; on the synthetic benchmark (tests/test_synthetic_recovery.py) 1 gives
    MMCS 0.96, 2 gives 0.91 with a lower L0, 5 shrinks too much (FVU 0.89)."""
    l1_warmup_steps: int = Field(default=0, ge=0)
    """Optimizer steps over which the penalty grows linearly from 0 (0: full from the start)."""
    decoder_init_norm: float = Field(default=0.1, gt=0)
    """Initial norm of every decoder row (the encoder starts as the decoder's transpose)."""


class ReLUSAE(LinearDictionary):
    """ReLU SAE with a decoder-norm-weighted L1 penalty (Anthropic April 2024 update)."""

    name = "relu"
    Options = ReLUOptions
    unit_norm_decoder = False
    pre_encoder_bias = False

    def __init__(self, sites: SiteSpec, options: ReLUOptions):
        super().__init__(sites, options)
        with torch.no_grad():
            self.W_dec.mul_(options.decoder_init_norm)
            if self.W_enc.shape[0] == self.W_dec.shape[1]:
                self.W_enc.copy_(self.W_dec.T)
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))

    @property
    def latent_activation(self) -> Literal["relu", "topk", "threshold", "unknown"]:
        """``"relu"``."""
        return "relu"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``ReLU(x W_enc + b_enc)`` as ``[batch, d_sae]``."""
        return F.relu(self.preacts(self.flat_input(x)))

    def penalty_scale(self) -> float:
        """Current fraction of ``l1_coefficient`` (linear warm-up)."""
        warm = self.options.l1_warmup_steps
        return 1.0 if warm == 0 else min(1.0, (int(self.steps) + 1) / warm)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None,
                dead_mask: torch.Tensor | None = None) -> DictionaryOutput:
        """Losses ``mse`` and ``l1`` (decoder-norm-weighted, warm-up applied)."""
        x_flat = self.flat_input(x)
        y = x_flat if target is None else self.flat_target(target)
        z = F.relu(self.preacts(x_flat))
        recon = torch.addmm(self.b_dec, z, self.W_dec)
        l1 = self.options.l1_coefficient * self.penalty_scale() * decoder_weighted_l1(z, self.W_dec)
        return DictionaryOutput(self.unflatten_output(recon), z.detach(), {"mse": self.mse(recon, y), "l1": l1})

    def after_optimizer_step(self) -> None:
        """Count optimizer steps (for the penalty warm-up)."""
        self.steps.add_(1)


@hookimpl
def register_architectures(register):
    """Register the ``relu`` architecture."""
    register(ReLUSAE)
