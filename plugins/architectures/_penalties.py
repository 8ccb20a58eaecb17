"""Sparsity penalties shared by several architectures (``relu``, the transcoders): a private module of
this plugin package, not an entry point."""

from __future__ import annotations

import torch


def decoder_weighted_l1(latents: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """``sum_i z_i * ||W_dec[i]||`` averaged over the batch (Anthropic's April 2024 SAE penalty)."""
    return (latents * W_dec.norm(dim=1)).sum(-1).mean()
