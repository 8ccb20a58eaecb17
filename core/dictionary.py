"""Shared machinery of linear sparse dictionaries (SAEs, transcoders) and dictionary files.

Architectures (builtin or third-party) build on these public pieces:

- :class:`DictionaryOptions`, :class:`TopKOptions`, :class:`BatchTopKOptions`: typed options shared by
  several architectures (``d_sae`` or ``expansion_factor``, ``k``, AuxK settings, ``b_dec`` init...).
- :class:`LinearDictionary`: weights ``W_enc [n_in*d_in, d_sae]``, ``b_enc [d_sae]``,
  ``W_dec [d_sae, n_out*d_out]``, ``b_dec [n_out*d_out]`` (SAELens layout), data-dependent ``b_dec``
  init, unit-norm decoder rows, folding of activation scaling, an optional skip connection ``W_skip``.
- :class:`TopKDictionary` and :class:`BatchTopKDictionary`: the TopK family with a sparse forward
  (a dense encoder matmul, then only the selected pre-activations carry gradients, see
  :func:`selected_preacts`; decoding through ``F.embedding_bag``, see :func:`sparse_decode`) and the
  AuxK dead-latent loss (:func:`auxk_loss`).
- Helpers: :func:`geometric_median`, :func:`unit_norm_decoder_`, :func:`remove_parallel_grad_`,
  :func:`mmcs`, :func:`build_dictionary`, :func:`save_dictionary`, :func:`load_dictionary`.

Loss conventions (the trainer minimises ``sum(losses.values())``): ``"mse"`` is the squared error
summed over sites and width, averaged over the batch, in the space the module is trained in; other
terms are already weighted by their coefficients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from .errors import UsageError, format_choices
from .interfaces import DictionaryOutput, SiteSpec, SparseDictionary
from .options import Options

FORMAT_NAME = "saelab"
"""Name of saelab's own dictionary format (``cfg.json`` + ``dictionary.safetensors``)."""


# --------------------------------------------------------------------------------------------------
# Options


class DictionaryOptions(Options):
    """Options shared by every linear dictionary."""

    d_sae: int | None = Field(default=None, ge=1)
    """Number of latents; when unset, ``expansion_factor * d_in``."""
    expansion_factor: float = Field(default=32.0, gt=0)
    """Latents per input dimension, used when ``d_sae`` is unset (sparsify's default, 32)."""
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """How ``initialize_from_data`` sets the decoder bias: geometric median (Weiszfeld), mean, or zeros."""

    def resolve_d_sae(self, d_in: int) -> int:
        """The number of latents for inputs of width ``d_in``."""
        return self.d_sae if self.d_sae is not None else max(1, int(round(self.expansion_factor * d_in)))


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
        if self.d_sae is not None and self.k > self.d_sae:
            raise UsageError(f"k={self.k} is larger than d_sae={self.d_sae}; k must be at most d_sae")
        return self


class BatchTopKOptions(TopKOptions):
    """Options of BatchTopK-family dictionaries."""

    threshold_momentum: float = Field(default=0.05, gt=0, le=1)
    """Weight of each batch's minimum kept activation in the running inference threshold (after a
    plain running mean over the first ``1/threshold_momentum`` steps)."""


def check_k(k: int, d_sae: int) -> None:
    """One-line error when ``k`` exceeds the number of latents."""
    if k > d_sae:
        raise UsageError(f"k={k} is larger than d_sae={d_sae}; k must be at most d_sae")


# --------------------------------------------------------------------------------------------------
# Numerical helpers


def geometric_median(x: torch.Tensor, iters: int = 20, eps: float = 1e-8, tol: float = 1e-6) -> torch.Tensor:
    """Geometric median of the rows of ``x [n, d]`` by Weiszfeld's iterations (started at the mean)."""
    x = x.detach().float()
    median = x.mean(0)
    for _ in range(iters):
        weights = 1.0 / (x - median).norm(dim=1).clamp_min(eps)
        new = (weights[:, None] * x).sum(0) / weights.sum()
        shift = (new - median).norm()
        median = new
        if shift <= tol * median.norm().clamp_min(eps):
            break
    return median


@torch.no_grad()
def unit_norm_decoder_(W_dec: torch.Tensor, eps: float = 1e-8) -> None:
    """Scale each row of ``W_dec [d_sae, d]`` to unit norm, in place."""
    W_dec.div_(W_dec.norm(dim=1, keepdim=True).clamp_min(eps))


@torch.no_grad()
def remove_parallel_grad_(W_dec: torch.Tensor) -> None:
    """Remove from ``W_dec.grad`` the component parallel to each (unit-norm) decoder row, in place."""
    if W_dec.grad is None:
        return
    rows = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
    parallel = (W_dec.grad * rows).sum(1, keepdim=True)
    W_dec.grad.sub_(parallel * rows)


@torch.no_grad()
def mmcs(learned: torch.Tensor, truth: torch.Tensor, chunk: int = 4096) -> float:
    """Mean max cosine similarity: for each true direction (rows of ``truth [m, d]``), the best cosine
    with any learned direction (rows of ``learned [n, d]``), averaged over the true directions."""
    learned = F.normalize(learned.detach().float(), dim=1)
    truth = F.normalize(truth.detach().float(), dim=1)
    best = torch.cat([(truth[i : i + chunk] @ learned.T).max(dim=1).values for i in range(0, len(truth), chunk)])
    return float(best.mean())


class _SelectedPreacts(torch.autograd.Function):
    """Pre-activations at selected (row, latent) pairs with a sparse backward.

    Forward reads them from the dense ``pre`` computed without autograd. Backward never builds a dense
    ``[batch, d_sae]`` gradient: the ``W_enc`` gradient is one sparse-dense product.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, b_pre: torch.Tensor | None, W_enc: torch.Tensor, b_enc: torch.Tensor,
                rows: torch.Tensor, cols: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, b_pre, W_enc, rows, cols)
        ctx.has_b_pre = b_pre is not None
        return pre[rows, cols]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, b_pre, W_enc, rows, cols = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        grad_x = grad_b_pre = grad_W = grad_b_enc = None
        grad_b = torch.zeros(d_sae, dtype=grad.dtype, device=grad.device).index_add_(0, cols, grad)
        if ctx.needs_input_grad[3]:
            grad_b_enc = grad_b
        if ctx.needs_input_grad[2]:
            x_in = x if b_pre is None else x - b_pre
            # grad_W_enc.T = G.T @ x_in with G [batch, d_sae] holding the grads at the selected pairs;
            # a sparse product avoids both a dense G and a [nnz, d_in] copy of the inputs.
            G_t = torch.sparse_coo_tensor(torch.stack([cols, rows]), grad, (d_sae, x.shape[0]),
                                          check_invariants=False)
            grad_W = torch.sparse.mm(G_t, x_in).T
        if ctx.has_b_pre and ctx.needs_input_grad[1]:
            grad_b_pre = -(W_enc @ grad_b)
        if ctx.needs_input_grad[0]:
            contrib = W_enc.T[cols] * grad[:, None]
            grad_x = torch.zeros_like(x).index_add_(0, rows, contrib)
        return grad_x, grad_b_pre, grad_W, grad_b_enc, None, None, None


def selected_preacts(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, rows: torch.Tensor,
                     cols: torch.Tensor, pre: torch.Tensor, b_pre: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable ``((x - b_pre) @ W_enc + b_enc)[rows, cols]`` given that product ``pre``
    (computed without autograd): gradients reach ``x``, ``b_pre``, ``W_enc`` and ``b_enc`` sparsely."""
    return _SelectedPreacts.apply(x, b_pre, W_enc, b_enc, rows, cols, pre)


def offsets_from_rows(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``embedding_bag`` offsets for sorted row indices (bag ``i`` holds the entries of row ``i``)."""
    counts = torch.bincount(rows, minlength=n_rows)
    return torch.cumsum(counts, 0) - counts


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor,
                  offsets: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_j values[b, j] * W_dec[indices[b, j]]`` without a dense latent matrix.

    ``indices``/``values`` are ``[batch, k]``, or flat ``[nnz]`` with ``offsets [batch]`` giving where
    each row's entries start (rows in order). Returns ``[batch, W_dec.shape[1]]`` (no bias).
    """
    return F.embedding_bag(indices, W_dec, offsets, mode="sum", per_sample_weights=values)


# --------------------------------------------------------------------------------------------------
# Linear dictionaries


def _as_sites(x: torch.Tensor, n: int, d: int, what: str) -> torch.Tensor:
    if x.dim() == 2 and n == 1:
        x = x[:, None, :]
    if x.dim() != 3 or x.shape[1] != n or x.shape[2] != d:
        raise ValueError(f"{what} must have shape [batch, {n}, {d}], got {list(x.shape)}")
    return x


class LinearDictionary(SparseDictionary):
    """A dictionary with a linear encoder and decoder (SAELens weight layout).

    Subclasses set ``unit_norm_decoder`` (rows of ``W_dec`` kept unit-norm during training),
    ``pre_encoder_bias`` (an autoencoder subtracts ``b_dec`` from its input before encoding) and
    ``skip_connection`` (adds ``x @ W_skip``), and implement ``encode``/``forward``.
    """

    unit_norm_decoder: ClassVar[bool] = True
    """Keep decoder rows unit-norm (gradient projection before, renormalisation after each step)."""
    pre_encoder_bias: ClassVar[bool] = True
    """Autoencoders encode ``x - b_dec`` (ignored when inputs and outputs differ)."""
    skip_connection: ClassVar[bool] = False
    """Add a linear skip path ``x @ W_skip [n_in*d_in, n_out*d_out]`` (skip transcoders)."""
    Options: ClassVar[type[DictionaryOptions]] = DictionaryOptions

    def __init__(self, sites: SiteSpec, options: DictionaryOptions):
        super().__init__(sites, options)
        self.n_in, self.n_out = len(sites.inputs), len(sites.outputs)
        if self.n_in < 1 or self.n_out < 1:
            raise UsageError("a dictionary needs at least one input and one output site")
        self._d_sae = options.resolve_d_sae(sites.d_in)
        in_width, out_width = self.n_in * sites.d_in, self.n_out * sites.d_out
        W_dec = torch.randn(self._d_sae, out_width)
        unit_norm_decoder_(W_dec)
        if in_width == out_width:
            W_enc = W_dec.T.clone()
        else:
            W_enc = F.normalize(torch.randn(in_width, self._d_sae), dim=0)
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(self._d_sae))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(out_width))
        if self.skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(in_width, out_width))
        self.extra_config: dict[str, Any] = {}
        """Free-form metadata saved under ``"metadata"`` in ``cfg.json`` (normalisation, hookpoints...)."""

    @property
    def d_sae(self) -> int:
        """Number of latents."""
        return self._d_sae

    @property
    def uses_pre_encoder_bias(self) -> bool:
        """Whether the encoder reads ``x - b_dec``."""
        return self.pre_encoder_bias and self.sites.is_autoencoder and self.sites.d_in == self.sites.d_out

    def flat_input(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs ``[batch, n_in, d_in]`` (or ``[batch, d_in]`` for one site) as ``[batch, n_in*d_in]``."""
        return _as_sites(x, self.n_in, self.sites.d_in, "input").reshape(x.shape[0], -1)

    def flat_target(self, target: torch.Tensor) -> torch.Tensor:
        """Targets ``[batch, n_out, d_out]`` as ``[batch, n_out*d_out]``."""
        return _as_sites(target, self.n_out, self.sites.d_out, "target").reshape(target.shape[0], -1)

    def unflatten_output(self, y: torch.Tensor) -> torch.Tensor:
        """``[batch, n_out*d_out]`` as ``[batch, n_out, d_out]``."""
        return y.reshape(y.shape[0], self.n_out, self.sites.d_out)

    def encoder_input(self, x_flat: torch.Tensor) -> torch.Tensor:
        """What the encoder matmul reads: ``x - b_dec`` for autoencoders with a pre-encoder bias."""
        return x_flat - self.b_dec if self.uses_pre_encoder_bias else x_flat

    def preacts(self, x_flat: torch.Tensor) -> torch.Tensor:
        """Dense pre-activations ``[batch, d_sae]`` (differentiable)."""
        return torch.addmm(self.b_enc, self.encoder_input(x_flat), self.W_enc)

    def skip(self, x_flat: torch.Tensor) -> torch.Tensor | float:
        """The skip path's contribution (0 without one)."""
        return x_flat @ self.W_skip if self.skip_connection else 0.0

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Dense decode: ``latents @ W_dec + b_dec`` as ``[batch, n_out, d_out]`` (no skip path)."""
        return self.unflatten_output(torch.addmm(self.b_dec, latents, self.W_dec))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Full inference path: ``[batch, n_out, d_out]`` from inputs (includes the skip path)."""
        return self.forward(x).reconstruction

    def mse(self, recon_flat: torch.Tensor, target_flat: torch.Tensor) -> torch.Tensor:
        """Squared error summed over width, averaged over the batch."""
        return (recon_flat - target_flat).pow(2).sum(-1).mean()

    # -- training hooks ------------------------------------------------------------------------------

    @torch.no_grad()
    def initialize_from_data(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """Set ``b_dec`` from a sample of targets: geometric median, mean or zeros (``b_dec_init``)."""
        y = self.flat_target(target).float()
        how = self.options.b_dec_init
        if how == "geometric_median":
            self.b_dec.copy_(geometric_median(y))
        elif how == "mean":
            self.b_dec.copy_(y.mean(0))
        else:
            self.b_dec.zero_()

    def before_optimizer_step(self) -> None:
        """Project out the gradient component parallel to decoder rows (unit-norm architectures)."""
        if self.unit_norm_decoder:
            remove_parallel_grad_(self.W_dec)

    def after_optimizer_step(self) -> None:
        """Renormalise decoder rows (unit-norm architectures)."""
        if self.unit_norm_decoder:
            unit_norm_decoder_(self.W_dec.data)

    @torch.no_grad()
    def fold_scaling(self, input_scale: float, output_scale: float) -> None:
        """Make the module map raw inputs to raw outputs after training on ``x*input_scale`` ->
        ``y*output_scale``. Latent values (hence thresholds and k) are unchanged; the decoder absorbs
        ``1/output_scale`` (so its rows are no longer unit-norm)."""
        s_in, s_out = float(input_scale), float(output_scale)
        if self.uses_pre_encoder_bias and not math.isclose(s_in, s_out, rel_tol=1e-5):
            raise ValueError(f"an autoencoder with a pre-encoder bias needs one scale, got {s_in} and {s_out}")
        self.W_enc.mul_(s_in)
        self.W_dec.div_(s_out)
        self.b_dec.div_(s_out)
        if self.skip_connection:
            self.W_skip.mul_(s_in / s_out)
        self.extra_config["scaling_folded"] = {"input_scale": s_in, "output_scale": s_out}

    def config(self) -> dict[str, Any]:
        """Architecture name, sites, options, ``d_sae`` and metadata, as JSON data."""
        cfg = super().config()
        cfg["d_sae"] = self.d_sae
        if self.extra_config:
            cfg["metadata"] = dict(self.extra_config)
        return cfg


# --------------------------------------------------------------------------------------------------
# TopK family


def auxk_loss(dictionary: LinearDictionary, x_flat: torch.Tensor, pre: torch.Tensor, dead_mask: torch.Tensor,
              residual: torch.Tensor, target_var: torch.Tensor, k_aux: int, alpha: float,
              b_pre: torch.Tensor | None = None) -> torch.Tensor:
    """AuxK (OpenAI, as in sparsify): the ``k_aux`` largest pre-activations among dead latents
    reconstruct the detached residual error ``residual [batch, width]`` (no bias). Its MSE is
    normalised by the residual's variance, multiplied by the target variance so that it stands to
    ``"mse"`` as OpenAI's normalised AuxK term stands to their normalised MSE, scaled by
    ``min(n_dead / k_aux, 1)`` and by ``alpha``. ``pre`` are the detached pre-activations of
    ``(x_flat - b_pre) @ W_enc + b_enc``."""
    dead = dead_mask.nonzero().squeeze(1)
    n_dead = int(dead.numel())
    if n_dead == 0 or alpha == 0:
        return pre.new_zeros(())
    k = min(k_aux, n_dead)
    scale = min(n_dead / k_aux, 1.0)
    # Dense over the dead columns only: four [batch, n_dead, d] matmuls beat gathering k_aux rows
    # per token (k_aux is large: half the width) unless nearly every latent is dead.
    with torch.no_grad():
        _, idx = pre.index_select(1, dead).topk(k, dim=1, sorted=False)
    x_in = x_flat if b_pre is None else x_flat - b_pre
    pre_dead = torch.addmm(dictionary.b_enc.index_select(0, dead), x_in, dictionary.W_enc.index_select(1, dead))
    z = torch.zeros_like(pre_dead).scatter(1, idx, F.relu(pre_dead.gather(1, idx)))
    e_hat = z @ dictionary.W_dec.index_select(0, dead)
    residual = residual.detach()
    aux_mse = (e_hat - residual).pow(2).sum(-1).mean()
    resid_var = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
    return alpha * scale * aux_mse * (target_var.detach() / resid_var)


class SparseCodes:
    """Selected latents of a batch in row-major COO form: ``rows``, ``cols`` (latent ids) and
    ``values`` (differentiable); ``k`` is set when every row holds exactly ``k`` entries."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, batch: int,
                 k: int | None = None):
        self.rows, self.cols, self.values, self.batch, self.k = rows, cols, values, batch, k

    def decode(self, W_dec: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """``[batch, width]`` reconstruction without bias (``values`` overrides, e.g. masked ones)."""
        vals = self.values if values is None else values
        if self.k is not None:
            return sparse_decode(self.cols.view(self.batch, self.k), vals.view(self.batch, self.k), W_dec)
        return sparse_decode(self.cols, vals, W_dec, offsets_from_rows(self.rows, self.batch))

    def dense(self, d_sae: int) -> torch.Tensor:
        """Dense latents ``[batch, d_sae]`` (differentiable in ``values``)."""
        out = self.values.new_zeros(self.batch, d_sae)
        return out.index_put((self.rows, self.cols), self.values)


class TopKDictionary(LinearDictionary):
    """TopK SAE (Gao et al. 2024): keep the ``k`` largest pre-activations per token (ReLU'd).

    ``forward`` is sparse: one dense encoder matmul without autograd, then only the selected entries
    carry gradients, and decoding goes through ``F.embedding_bag``. With ``dead_mask`` it adds the
    AuxK loss.
    """

    Options: ClassVar[type[TopKOptions]] = TopKOptions

    def __init__(self, sites: SiteSpec, options: TopKOptions):
        super().__init__(sites, options)
        check_k(options.k, self.d_sae)

    @property
    def k(self) -> int:
        """Latents kept per token."""
        return self.options.k

    def select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """Choose the active ``(rows, cols)`` from detached pre-activations; returns ``k`` when fixed."""
        _, idx = pre.topk(self.k, dim=1, sorted=False)
        rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(self.k)
        return rows, idx.reshape(-1), self.k

    def observe(self, codes: SparseCodes) -> None:
        """Training-time hook on each batch's codes (BatchTopK updates its threshold here)."""

    def sparse_encode(self, x_flat: torch.Tensor) -> tuple[SparseCodes, torch.Tensor]:
        """Codes and the detached dense pre-activations."""
        b_pre = self.b_dec if self.uses_pre_encoder_bias else None
        with torch.no_grad():
            pre = torch.addmm(self.b_enc, x_flat if b_pre is None else x_flat - b_pre, self.W_enc)
        rows, cols, k = self.select(pre)
        vals = F.relu(selected_preacts(x_flat, self.W_enc, self.b_enc, rows, cols, pre, b_pre))
        return SparseCodes(rows, cols, vals, x_flat.shape[0], k), pre

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents ``[batch, d_sae]``."""
        codes, _ = self.sparse_encode(self.flat_input(x))
        return codes.dense(self.d_sae)

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
        """Sparse encode/decode; losses ``mse`` (+ ``auxk`` when ``dead_mask`` is given)."""
        x_flat = self.flat_input(x)
        if target is None and not self.sites.is_autoencoder:
            raise ValueError(f"a {self.name} needs the target (output-site) activations")
        y = x_flat if target is None else self.flat_target(target)
        codes, pre = self.sparse_encode(x_flat)
        if self.training:
            self.observe(codes)
        recon = self.decode_codes(codes, x_flat)
        losses = {"mse": self.mse(recon, y)}
        need_var = dead_mask is not None or type(self).extra_losses is not TopKDictionary.extra_losses
        target_var = (y - y.mean(0)).pow(2).sum(-1).mean().detach() if need_var else y.new_zeros(())
        losses.update(self.extra_losses(codes, recon, y, target_var))
        if dead_mask is not None and self.options.auxk_alpha > 0:
            k_aux = self.options.auxk_k or max(1, y.shape[1] // 2)
            b_pre = self.b_dec if self.uses_pre_encoder_bias else None
            losses["auxk"] = auxk_loss(self, x_flat, pre, dead_mask.to(pre.device, torch.bool), y - recon,
                                       target_var, k_aux, self.options.auxk_alpha, b_pre)
        latents = codes.dense(self.d_sae).detach()
        return DictionaryOutput(self.unflatten_output(recon), latents, losses)


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

    def select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """Batch top-k in training (or before a threshold exists), the threshold in eval mode."""
        if self.training or float(self.threshold) < 0:
            n = min(pre.numel(), self.k * pre.shape[0])
            kth = pre.reshape(-1).topk(n, sorted=False).values.min()
            mask = (pre >= kth) & (pre > 0)
        else:
            mask = pre > self.threshold
        rows, cols = mask.nonzero(as_tuple=True)
        return rows, cols, None

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


def decoder_weighted_l1(latents: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """``sum_i z_i * ||W_dec[i]||`` averaged over the batch (Anthropic's April 2024 SAE penalty)."""
    return (latents * W_dec.norm(dim=1)).sum(-1).mean()


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

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents ``[batch, d_sae]``."""
        if self.options.activation == "relu":
            return F.relu(self.preacts(self.flat_input(x)))
        return super().encode(x)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None,
                dead_mask: torch.Tensor | None = None) -> DictionaryOutput:
        """TopK path, or for ``relu``: dense encode/decode with losses ``mse`` and ``l1``."""
        if self.options.activation == "topk":
            return super().forward(x, target, dead_mask)
        if target is None:
            raise ValueError(f"a {self.name} needs the target (output-site) activations")
        x_flat, y = self.flat_input(x), self.flat_target(target)
        z = F.relu(self.preacts(x_flat))
        recon = torch.addmm(self.b_dec, z, self.W_dec) + self.skip(x_flat)
        losses = {"mse": self.mse(recon, y), "l1": self.options.l1_coefficient * decoder_weighted_l1(z, self.W_dec)}
        return DictionaryOutput(self.unflatten_output(recon), z.detach(), losses)


# --------------------------------------------------------------------------------------------------
# Building, saving and loading


def site_spec(data: SiteSpec | Mapping[str, Any]) -> SiteSpec:
    """A :class:`SiteSpec` from itself or its JSON form (``inputs``, ``outputs``, ``d_in``, ``d_out``)."""
    if isinstance(data, SiteSpec):
        return data
    return SiteSpec(inputs=list(data["inputs"]), outputs=list(data["outputs"]), d_in=int(data["d_in"]),
                    d_out=int(data["d_out"]))


def build_dictionary(architecture: str, sites: SiteSpec | Mapping[str, Any],
                     options: Options | Mapping[str, Any] | None = None) -> SparseDictionary:
    """Instantiate a registered architecture; options are validated (one-line errors)."""
    from .manager import registry

    cls = registry("architecture").get(architecture)
    if not isinstance(options, Options):
        options = cls.Options.parse(dict(options or {}), where=f"architecture {cls.name!r}")
    return cls(site_spec(sites), options)


def dictionary_formats() -> list[str]:
    """Registered dictionary-format names."""
    from .manager import registry

    return registry("dictionary_format").names()


def detect_format(path: str | Path) -> str:
    """Name of the registered dictionary format that recognises ``path`` (one-line error if none)."""
    from .manager import registry

    path = Path(path)
    if not path.exists():
        raise UsageError(f"dictionary path {str(path)!r} does not exist")
    for entry in registry("dictionary_format").entries():
        if entry.cls.detect(path):
            return entry.name
    raise UsageError(f"{str(path)!r} is not a dictionary directory in any known format; "
                     f"known formats: {format_choices(dictionary_formats())}")


def save_dictionary(dictionary: SparseDictionary, path: str | Path, extra_cfg: Mapping[str, Any] | None = None,
                    format: str = FORMAT_NAME) -> Path:
    """Write ``dictionary`` to directory ``path`` in ``format`` (default saelab's own);
    ``extra_cfg`` is merged into the dictionary's ``extra_config`` metadata first."""
    from .manager import registry

    if extra_cfg:
        meta = getattr(dictionary, "extra_config", None)
        if meta is None:
            meta = {}
            dictionary.extra_config = meta  # type: ignore[attr-defined]
        meta.update(extra_cfg)
    path = Path(path)
    registry("dictionary_format").get(format)().save(dictionary, path)
    return path


def load_dictionary(path: str | Path, device: str | torch.device = "cpu",
                    format: str | None = None) -> SparseDictionary:
    """Load a dictionary directory in any registered format (detected unless ``format`` is given),
    in eval mode."""
    from .manager import registry

    name = format or detect_format(path)
    module = registry("dictionary_format").get(name)().load(Path(path), device=device)
    return module.eval()


__all__ = [
    "FORMAT_NAME",
    "BatchTopKDictionary",
    "BatchTopKOptions",
    "DictionaryOptions",
    "LinearDictionary",
    "SparseCodes",
    "TopKDictionary",
    "TopKOptions",
    "TranscoderDictionary",
    "TranscoderOptions",
    "decoder_weighted_l1",
    "auxk_loss",
    "build_dictionary",
    "check_k",
    "detect_format",
    "dictionary_formats",
    "geometric_median",
    "load_dictionary",
    "mmcs",
    "offsets_from_rows",
    "remove_parallel_grad_",
    "save_dictionary",
    "selected_preacts",
    "site_spec",
    "sparse_decode",
    "unit_norm_decoder_",
]

LinearDictionaryMixin = LinearDictionary
"""Alias of :class:`LinearDictionary` (the name used in the architecture contract)."""
