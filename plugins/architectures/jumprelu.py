"""The ``jumprelu`` architecture: JumpReLU SAE (Rajamanoharan et al. 2024, Gemma Scope).

``f = pre * H(pre - theta)`` with ``pre = x W_enc + b_enc`` and a learned per-latent threshold
``theta = exp(log_threshold)``; loss ``mse + l0_coefficient * sum_i H(pre_i - theta_i)``. The step
function has no gradient; theta learns through straight-through pseudo-derivatives with a rectangle
kernel of width ``bandwidth`` (the paper's eqs. 11-12). Decoder rows are kept unit-norm."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from saelab import DictionaryOutput, SiteSpec, hookimpl
from saelab.dictionary import DictionaryOptions, LinearDictionary

from ._jumprelu import _JumpReLU, _Step


class JumpReLUOptions(DictionaryOptions):
    """Options of the ``jumprelu`` architecture."""

    l0_coefficient: float = Field(default=1.0, ge=0)
    """Weight of the L0 penalty (active latents per token). A latent whose removal costs less than this
    in squared error is pushed off, so with the trainer's normalisation (E|x|^2 = d_in) 1.0 prunes
    activations below ~1."""
    bandwidth: float = Field(default=0.1, gt=0)
    """Width of the rectangle kernel of the straight-through threshold gradient."""
    initial_threshold: float = Field(default=0.5, gt=0)
    """Starting threshold of every latent (pre-activations are O(1) after normalisation)."""
    l0_warmup_steps: int = Field(default=0, ge=0)
    """Optimizer steps over which the L0 penalty grows linearly from 0 (0: full from the start)."""


class JumpReLUSAE(LinearDictionary):
    """JumpReLU SAE: learned per-latent thresholds (straight-through estimator) and an L0 penalty."""

    name = "jumprelu"
    Options = JumpReLUOptions
    pre_encoder_bias = False

    def __init__(self, sites: SiteSpec, options: JumpReLUOptions):
        super().__init__(sites, options)
        self.log_threshold = torch.nn.Parameter(torch.full((self.d_sae,), math.log(options.initial_threshold)))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))

    @property
    def latent_activation(self) -> Literal["relu", "topk", "threshold", "unknown"]:
        """``"threshold"``: the learned per-latent thresholds."""
        return "threshold"

    @property
    def threshold(self) -> torch.Tensor:
        """Per-latent thresholds ``[d_sae]``."""
        return self.log_threshold.exp()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``pre * (pre > threshold)`` as ``[batch, d_sae]``."""
        return _JumpReLU.apply(self.preacts(self.flat_input(x)), self.threshold, self.options.bandwidth)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None,
                dead_mask: torch.Tensor | None = None) -> DictionaryOutput:
        """Losses ``mse`` and ``l0`` (weighted, warm-up applied)."""
        x_flat = self.flat_input(x)
        y = x_flat if target is None else self.flat_target(target)
        pre = self.preacts(x_flat)
        theta = self.threshold
        z = _JumpReLU.apply(pre, theta, self.options.bandwidth)
        recon = torch.addmm(self.b_dec, z, self.W_dec)
        warm = self.options.l0_warmup_steps
        scale = 1.0 if warm == 0 else min(1.0, (int(self.steps) + 1) / warm)
        l0 = _Step.apply(pre, theta, self.options.bandwidth).sum(-1).mean()
        losses = {"mse": self.mse(recon, y), "l0": self.options.l0_coefficient * scale * l0}
        return DictionaryOutput(self.unflatten_output(recon), z.detach(), losses)

    def after_optimizer_step(self) -> None:
        """Renormalise decoder rows and count steps (for the penalty warm-up)."""
        super().after_optimizer_step()
        self.steps.add_(1)


@hookimpl
def register_architectures(register):
    """Register the ``jumprelu`` architecture."""
    register(JumpReLUSAE)
