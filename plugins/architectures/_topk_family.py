"""Machinery shared by the TopK family (``topk``, ``batchtopk``, ``matryoshka``, ``transcoder``,
``skip-transcoder``): a private module of this plugin package, not an entry point.

- :class:`TopKOptions` / :class:`BatchTopKOptions`: ``k`` and the AuxK settings (plus BatchTopK's
  threshold momentum).
- :class:`TopKDictionary`: the sparse forward of a dictionary that selects a few latents per row (one
  dense encoder matmul without autograd, then only the selected pre-activations carry gradients, see
  :func:`saelab.dictionary.selected_preacts`; decoding through ``F.embedding_bag``), per-token top-k
  selection, and the AuxK dead-latent loss (:func:`auxk_loss`).
- :class:`BatchTopKDictionary`: batch-level top-k selection in training and a learned global threshold
  at inference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal, Protocol

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from saelab import DictionaryOutput, SiteSpec
from saelab.dictionary import DictionaryOptions, LinearDictionary, SparseCodes, check_k, selected_preacts


class TopKOptions(DictionaryOptions):
    """Options of TopK-family dictionaries."""

    k: int = Field(default=32, ge=1)
    """Latents kept per token (on average over the batch for BatchTopK)."""
    auxk_alpha: float = Field(default=1 / 32, ge=0)
    """Coefficient of the AuxK dead-latent loss (OpenAI/sparsify: 1/32); 0 turns it off."""
    auxk_k: int | None = Field(default=None, ge=1)
    """Dead latents used by AuxK per token; default half the output width (as sparsify)."""

    @model_validator(mode="after")
    def _k_fits(self) -> TopKOptions:
        if self.d_sae is not None:
            check_k(self.k, self.d_sae)
        return self


class BatchTopKOptions(TopKOptions):
    """Options of BatchTopK-family dictionaries."""

    threshold_momentum: float = Field(default=0.05, gt=0, le=1)
    """Weight of each batch's minimum kept activation in the running inference threshold (after a
    plain running mean over the first ``1/threshold_momentum`` steps)."""


# --------------------------------------------------------------------------------------------------
# AuxK


class _AuxKDecode(torch.autograd.Function):
    """AuxK's reconstruction ``z_dead @ W_dec[dead]`` from the dead latents' already computed
    pre-activations ``pre_dead [batch, n_dead]``: ``z_dead`` holds ReLU'd values at ``idx``
    (``[batch, k_aux]`` positions in ``dead``; None: every dead latent). No encoder matmul is repeated;
    backward is three ``[batch, n_dead]``-sized matmuls. Gradients reach ``W_enc``, ``b_enc``,
    ``W_dec`` and ``b_pre``, not the input (data, in training)."""

    @staticmethod
    def forward(ctx: Any, pre_dead: torch.Tensor, idx: torch.Tensor | None, x: torch.Tensor,
                b_pre: torch.Tensor | None, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                dead: torch.Tensor) -> torch.Tensor:
        if idx is None:
            z = F.relu(pre_dead)
        else:
            z = torch.zeros_like(pre_dead).scatter_(1, idx, F.relu(pre_dead.gather(1, idx)))
        ctx.save_for_backward(z, x, b_pre, W_enc, W_dec, dead)
        return z @ W_dec.index_select(0, dead)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        z, x, b_pre, W_enc, W_dec, dead = ctx.saved_tensors
        grad_W_enc = grad_b_pre = grad_b_enc = grad_W_dec = None
        G = (grad @ W_dec.index_select(0, dead).T).mul_(z > 0)
        grad_b = G.sum(0)
        if ctx.needs_input_grad[6]:
            grad_W_dec = torch.zeros_like(W_dec).index_copy_(0, dead, z.T @ grad)
        if ctx.needs_input_grad[4]:
            x_in = x if b_pre is None else x - b_pre
            grad_W_enc = torch.zeros_like(W_enc).index_copy_(1, dead, x_in.T @ G)
        if ctx.needs_input_grad[5]:
            grad_b_enc = torch.zeros_like(W_enc[0]).index_copy_(0, dead, grad_b)
        if b_pre is not None and ctx.needs_input_grad[3]:
            grad_b_pre = -(W_enc.index_select(1, dead) @ grad_b)
        return None, None, None, grad_b_pre, grad_W_enc, grad_b_enc, grad_W_dec, None


AUXK_DENSE_MAX_RATIO = 4.0
"""AuxK works densely over the dead latents' columns (three ``[batch, n_dead]`` products) while
``n_dead <= AUXK_DENSE_MAX_RATIO * k_aux``, and on the ``k_aux`` picks per row (sparse gathers, a cost
independent of ``n_dead``) beyond."""


class FlatWeights(Protocol):
    """What :func:`auxk_loss` reads of a dictionary: ``W_enc [width_in, d_sae]``, ``b_enc [d_sae]``,
    ``W_dec [d_sae, width_out]`` and ``d_sae`` (a :class:`LinearDictionary`, or a flat view of another layout)."""

    @property
    def W_enc(self) -> torch.Tensor: ...
    @property
    def b_enc(self) -> torch.Tensor: ...
    @property
    def W_dec(self) -> torch.Tensor: ...
    @property
    def d_sae(self) -> int: ...


def auxk_loss(dictionary: FlatWeights, x_flat: torch.Tensor, pre: torch.Tensor, dead_mask: torch.Tensor,
              residual: torch.Tensor, target_var: torch.Tensor, k_aux: int, alpha: float,
              b_pre: torch.Tensor | None = None, rank: torch.Tensor | None = None) -> torch.Tensor:
    """AuxK (OpenAI, as in sparsify): the ``k_aux`` largest pre-activations among dead latents
    reconstruct the detached residual error ``residual [batch, width]`` (no bias). Its MSE is
    normalised by the residual's variance, multiplied by the target variance so that it stands to
    ``"mse"`` as OpenAI's normalised AuxK term stands to their normalised MSE, scaled by
    ``min(n_dead / k_aux, 1)`` and by ``alpha``. ``pre`` are the detached pre-activations of
    ``(x_flat - b_pre) @ W_enc + b_enc``; they are reused (columns of dead latents, top-k_aux per row),
    so AuxK costs a few ``[batch, n_dead]`` products and nothing when no latent is dead. ``rank``
    (detached, shaped like ``pre``; default ``pre``) chooses the ``k_aux`` dead latents of each row, e.g.
    decoder-norm-weighted pre-activations; their values are still ReLU'd pre-activations."""
    dead = dead_mask.nonzero().squeeze(1)
    n_dead = int(dead.numel())
    if n_dead == 0 or alpha == 0:
        return pre.new_zeros(())
    k = min(k_aux, n_dead)
    scale = min(n_dead / k_aux, 1.0)
    with torch.no_grad():
        pre_dead = pre.index_select(1, dead)
        scores = pre_dead if rank is None else rank.index_select(1, dead)
        idx = None if k == n_dead else scores.topk(k, dim=1, sorted=False).indices
    if idx is not None and n_dead > AUXK_DENSE_MAX_RATIO * k:
        # Many dead latents: the k_aux picks per row through the sparse machinery of the main path.
        batch = x_flat.shape[0]
        rows = torch.arange(batch, device=pre.device).repeat_interleave(k)
        codes = SparseCodes(rows, dead[idx].reshape(-1), None, batch, dictionary.d_sae, k)
        codes.values = F.relu(selected_preacts(x_flat, dictionary.W_enc, dictionary.b_enc, codes,
                                               pre_dead.gather(1, idx).reshape(-1), b_pre))
        e_hat = codes.decode(dictionary.W_dec)
    else:
        e_hat = _AuxKDecode.apply(pre_dead, idx, x_flat, b_pre, dictionary.W_enc, dictionary.b_enc,
                                  dictionary.W_dec, dead)
    residual = residual.detach()
    aux_mse = (e_hat - residual).pow(2).sum(-1).mean()
    resid_var = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
    return alpha * scale * aux_mse * (target_var.detach() / resid_var)


# --------------------------------------------------------------------------------------------------
# Dictionaries


class TopKDictionary(LinearDictionary):
    """TopK SAE (Gao et al. 2024): keep the ``k`` largest pre-activations per token (ReLU'd).

    ``forward`` is sparse: one dense encoder matmul without autograd, then only the selected entries
    carry gradients (:func:`selected_preacts`), decoding goes through ``F.embedding_bag``
    (:func:`sparse_decode`), and the latents are returned in COO form (no dense ``[batch, d_sae]``
    tensor unless asked for). With ``dead_mask`` it adds the AuxK loss (:func:`auxk_loss`).
    Without a target, a dictionary whose outputs differ from its inputs (a transcoder) only infers:
    the output has no losses.
    """

    Options: ClassVar[type[TopKOptions]] = TopKOptions

    def __init__(self, sites: SiteSpec, options: TopKOptions):
        super().__init__(sites, options)
        check_k(options.k, self.d_sae)
        self._rows_cache: torch.Tensor | None = None

    @property
    def k(self) -> int:
        """Latents kept per token."""
        return self.options.k

    @property
    def latent_activation(self) -> Literal["relu", "topk", "threshold", "unknown"]:
        """``"topk"``: the ``k`` largest pre-activations per row, ReLU'd."""
        return "topk"

    def _rows(self, batch: int, device: torch.device) -> torch.Tensor:
        rows = self._rows_cache
        if rows is None or rows.numel() != batch * self.k or rows.device != device:
            rows = torch.arange(batch, device=device).repeat_interleave(self.k)
            self._rows_cache = rows
        return rows

    def select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | None]:
        """Choose the active entries from detached pre-activations: ``(rows, cols, pre[rows, cols], k)``,
        row-major, ``k`` set when every row holds exactly ``k`` entries."""
        vals, idx = pre.topk(self.k, dim=1, sorted=False)
        return self._rows(pre.shape[0], pre.device), idx.reshape(-1), vals.reshape(-1), self.k

    def observe(self, codes: SparseCodes) -> None:
        """Training-time hook on each batch's codes (BatchTopK updates its threshold here)."""

    def sparse_encode(self, x_flat: torch.Tensor) -> tuple[SparseCodes, torch.Tensor]:
        """Codes and the detached dense pre-activations."""
        b_pre = self.b_dec if self.uses_pre_encoder_bias else None
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, x_flat if b_pre is None else x_flat - b_pre, self.W_enc)
        rows, cols, selected, k = self.select(pre)
        codes = SparseCodes(rows, cols, None, x_flat.shape[0], self.d_sae, k)
        codes.values = F.relu(selected_preacts(x_flat, self.W_enc, self.b_enc, codes, selected, b_pre))
        return codes, pre

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents ``[batch, d_sae]``."""
        codes, _ = self.sparse_encode(self.flat_input(x))
        return codes.dense()

    def decode_codes(self, codes: SparseCodes, x_flat: torch.Tensor) -> torch.Tensor:
        """Flat reconstruction ``[batch, width]`` from codes (bias and skip path included)."""
        out = codes.decode(self.W_dec) + self.b_dec
        if self.skip_connection:
            out = out + x_flat @ self.W_skip
        return out

    def extra_losses(self, codes: SparseCodes, recon: torch.Tensor, target: torch.Tensor,
                     target_var: torch.Tensor) -> dict[str, torch.Tensor]:
        """Architecture-specific loss terms besides ``mse`` and ``auxk`` (Matryoshka's prefixes)."""
        return {}

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None,
                dead_mask: torch.Tensor | None = None) -> DictionaryOutput:
        """Sparse encode/decode; losses ``mse`` (+ ``auxk`` when ``dead_mask`` is given). A transcoder
        without ``target`` returns the reconstruction and latents with no losses (inference)."""
        x_flat = self.flat_input(x)
        codes, pre = self.sparse_encode(x_flat)
        if self.training:
            self.observe(codes)
        recon = self.decode_codes(codes, x_flat)
        out = DictionaryOutput(self.unflatten_output(recon), sparse_latents=codes.latents())
        if target is None and not self.sites.is_autoencoder:
            return out
        y = x_flat if target is None else self.flat_target(target)
        losses = {"mse": self.mse(recon, y)}
        need_var = dead_mask is not None or type(self).extra_losses is not TopKDictionary.extra_losses
        target_var = (y - y.mean(0)).pow(2).sum(-1).mean().detach() if need_var else y.new_zeros(())
        losses.update(self.extra_losses(codes, recon, y, target_var))
        if dead_mask is not None and self.options.auxk_alpha > 0:
            k_aux = self.options.auxk_k or max(1, y.shape[1] // 2)
            b_pre = self.b_dec if self.uses_pre_encoder_bias else None
            losses["auxk"] = auxk_loss(self, x_flat, pre, dead_mask.to(pre.device, torch.bool), y - recon,
                                       target_var, k_aux, self.options.auxk_alpha, b_pre)
        out.losses = losses
        return out


class BatchTopKDictionary(TopKDictionary):
    """BatchTopK (Bussmann et al. 2024): keep the ``batch*k`` largest activations of the whole batch.

    In training mode it also tracks a running average of the smallest kept activation; in eval mode
    latents fire where their pre-activation exceeds that threshold (a JumpReLU with one global
    threshold), so inference does not depend on the batch.
    """

    Options: ClassVar[type[BatchTopKOptions]] = BatchTopKOptions

    def __init__(self, sites: SiteSpec, options: BatchTopKOptions):
        super().__init__(sites, options)
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.register_buffer("threshold_updates", torch.tensor(0, dtype=torch.long))

    @property
    def latent_activation(self) -> Literal["relu", "topk", "threshold", "unknown"]:
        """``"threshold"``: at inference, latents fire above the learned global threshold."""
        return "threshold"

    def select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | None]:
        """Batch top-k (positive values) in training or before a threshold exists, the threshold in eval
        mode; entries row-major."""
        if self.training or float(self.threshold) < 0:
            n = min(pre.numel(), self.k * pre.shape[0])
            vals, flat = pre.reshape(-1).topk(n, sorted=False)
            keep = vals > 0
            flat, order = flat[keep].sort()
            vals = vals[keep][order]
            return flat // pre.shape[1], flat % pre.shape[1], vals, None
        rows, cols = (pre > self.threshold).nonzero(as_tuple=True)
        return rows, cols, pre[rows, cols], None

    @torch.no_grad()
    def observe(self, codes: SparseCodes) -> None:
        """Update the running inference threshold with the smallest kept positive activation."""
        if codes.values.numel() == 0:
            return
        smallest = codes.values.detach().min()
        step = int(self.threshold_updates) + 1
        weight = max(1.0 / step, self.options.threshold_momentum)
        if step == 1:
            self.threshold.copy_(smallest)
        else:
            self.threshold.mul_(1 - weight).add_(weight * smallest)
        self.threshold_updates.add_(1)

    def synchronize(self, all_reduce_mean: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Average the inference threshold across data-parallel ranks."""
        self.threshold.copy_(all_reduce_mean(self.threshold.clone()))


__all__ = ["AUXK_DENSE_MAX_RATIO", "BatchTopKDictionary", "BatchTopKOptions", "TopKDictionary", "TopKOptions",
           "auxk_loss"]
