"""JumpReLU's straight-through estimators, shared by ``jumprelu`` and ``clt``: a private module of this
plugin package, not an entry point.

``pre * H(pre - theta)`` and ``H(pre - theta)`` with the threshold gradient of Rajamanoharan et al. 2024
(eqs. 11-12): a rectangle kernel of width ``bandwidth`` around the threshold. ``theta`` broadcasts
against ``pre [batch, ...]``; its gradient is summed over the batch (dimension 0).
"""

from __future__ import annotations

from typing import Any

import torch


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """``pre * H(pre - theta)``; d/dpre = H, d/dtheta = -(theta / eps) K((pre - theta) / eps)."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > theta)
        grad_theta = (-(theta / eps) * _rectangle((pre - theta) / eps) * grad).sum(0)
        return grad_pre, grad_theta, None


class _Step(torch.autograd.Function):
    """``H(pre - theta)``; d/dpre = 0, d/dtheta = -(1 / eps) K((pre - theta) / eps)."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = (-(1.0 / eps) * _rectangle((pre - theta) / eps) * grad).sum(0)
        return None, grad_theta, None


def jumprelu(pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """``pre * H(pre - theta)`` with the straight-through threshold gradient."""
    return _JumpReLU.apply(pre, theta, bandwidth)


def step(pre: torch.Tensor, theta: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """``H(pre - theta)`` (the L0 count's summand) with the straight-through threshold gradient."""
    return _Step.apply(pre, theta, bandwidth)
