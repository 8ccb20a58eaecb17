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
from .interfaces import DictionaryOutput, SiteSpec, SparseDictionary, SparseLatents
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


class LatentGroups:
    """The entries of a sparse code grouped by latent: one stable sort shared by every backward.

    ``perm`` orders the entries by latent (stable, so rows stay increasing within a latent),
    ``rows`` are the entries' batch rows in that order and ``offsets [d_sae]`` where each latent's
    entries start. Gradients with respect to ``W_enc`` and ``W_dec`` are then one ``F.embedding_bag``
    each (a gather-sum of batch rows per latent), with no sparse-tensor coalescing sort and no
    ``[nnz, width]`` temporary.
    """

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, d_sae: int):
        order = torch.sort(cols, stable=True).indices
        counts = torch.bincount(cols, minlength=d_sae)
        self.perm = order
        self.rows = rows.index_select(0, order)
        self.offsets = torch.cumsum(counts, 0) - counts

    def scatter_rows(self, weights: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        """``out[j] = sum over entries e of latent j of weights[e] * data[rows[e]]`` as ``[d_sae, width]``."""
        return F.embedding_bag(self.rows, data, self.offsets, mode="sum",
                               per_sample_weights=weights.index_select(0, self.perm))


class _SelectedPreacts(torch.autograd.Function):
    """Pre-activations at selected (row, latent) entries, with a sparse backward.

    Forward returns the selected values computed without autograd from the dense pre-activations.
    Backward never builds a dense ``[batch, d_sae]`` gradient: the ``W_enc`` gradient is a per-latent
    gather-sum of input rows (:class:`LatentGroups`), the bias gradients are index-adds.
    """

    @staticmethod
    def forward(ctx: Any, selected: torch.Tensor, x: torch.Tensor, b_pre: torch.Tensor | None,
                W_enc: torch.Tensor, b_enc: torch.Tensor, codes: SparseCodes) -> torch.Tensor:
        ctx.save_for_backward(x, b_pre, W_enc)
        ctx.codes = codes
        ctx.has_b_pre = b_pre is not None
        return selected.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, b_pre, W_enc = ctx.saved_tensors
        codes: SparseCodes = ctx.codes
        grad = grad.contiguous()
        d_sae = W_enc.shape[1]
        grad_x = grad_b_pre = grad_W = grad_b_enc = None
        needs_b = ctx.needs_input_grad[4] or (ctx.has_b_pre and ctx.needs_input_grad[2])
        grad_b = grad.new_zeros(d_sae).index_add_(0, codes.cols, grad) if needs_b else None
        if ctx.needs_input_grad[4]:
            grad_b_enc = grad_b
        if ctx.needs_input_grad[3]:
            x_in = x if b_pre is None else x - b_pre
            # [d_sae, d_in] per latent, then W_enc's [d_in, d_sae] layout (a contiguous gradient keeps
            # the optimizer step fast).
            grad_W = codes.groups().scatter_rows(grad, x_in).T.contiguous()
        if ctx.has_b_pre and ctx.needs_input_grad[2]:
            grad_b_pre = -(W_enc @ grad_b)
        if ctx.needs_input_grad[1]:
            contrib = W_enc.T.index_select(0, codes.cols) * grad[:, None]
            grad_x = torch.zeros_like(x).index_add_(0, codes.rows, contrib)
        return None, grad_x, grad_b_pre, grad_W, grad_b_enc, None


def selected_preacts(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, codes: SparseCodes,
                     selected: torch.Tensor, b_pre: torch.Tensor | None = None) -> torch.Tensor:
    """Differentiable ``((x - b_pre) @ W_enc + b_enc)[codes.rows, codes.cols]`` given those values
    ``selected`` (read without autograd from the dense product): gradients reach ``x``, ``b_pre``,
    ``W_enc`` and ``b_enc`` sparsely."""
    return _SelectedPreacts.apply(selected, x, b_pre, W_enc, b_enc, codes)


class _SparseDecode(torch.autograd.Function):
    """``sum_e values[e] * W_dec[cols[e]]`` per batch row, with a sparse backward (see :func:`sparse_decode`)."""

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, W_dec: torch.Tensor, codes: SparseCodes) -> torch.Tensor:
        ctx.save_for_backward(values, W_dec)
        ctx.codes = codes
        indices, offsets = codes.bags()
        weights = values if codes.k is None else values.view(codes.batch, codes.k)
        return F.embedding_bag(indices, W_dec, offsets, mode="sum", per_sample_weights=weights)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        values, W_dec = ctx.saved_tensors
        codes: SparseCodes = ctx.codes
        grad = grad.contiguous()
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            # d/dvalues[e] = grad[rows[e]] . W_dec[cols[e]] (what embedding_bag's own backward computes).
            grad_values = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad, W_dec, codes.cols, codes.row_offsets(), codes.rows, 0, -1)
        if ctx.needs_input_grad[1]:
            grad_W = codes.groups().scatter_rows(values, grad)
        return grad_values, grad_W, None


def offsets_from_rows(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``embedding_bag`` offsets for sorted row indices (bag ``i`` holds the entries of row ``i``)."""
    counts = torch.bincount(rows, minlength=n_rows)
    return torch.cumsum(counts, 0) - counts


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor,
                  offsets: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_j values[b, j] * W_dec[indices[b, j]]`` without a dense latent matrix.

    ``indices``/``values`` are ``[batch, k]``, or flat ``[nnz]`` with ``offsets [batch]`` giving where
    each row's entries start (rows in order). Returns ``[batch, W_dec.shape[1]]`` (no bias). The
    backward is sparse: ``W_dec``'s gradient is a per-latent gather-sum (:class:`LatentGroups`)
    instead of ``embedding_bag``'s sorting dense backward.
    """
    if indices.dim() == 2:
        batch, k = indices.shape
        rows = torch.arange(batch, device=indices.device).repeat_interleave(k)
        codes = SparseCodes(rows, indices.reshape(-1), values.reshape(-1), batch, W_dec.shape[0], k)
    else:
        if offsets is None:
            raise ValueError("flat indices need offsets (where each row's entries start)")
        counts = torch.diff(offsets, append=offsets.new_tensor([indices.numel()]))
        rows = torch.arange(offsets.numel(), device=indices.device).repeat_interleave(counts)
        codes = SparseCodes(rows, indices, values, offsets.numel(), W_dec.shape[0])
    return codes.decode(W_dec)


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
            W_enc = W_dec.T.contiguous()  # row-major, like its gradients (a fused optimizer needs that)
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


def auxk_loss(dictionary: LinearDictionary, x_flat: torch.Tensor, pre: torch.Tensor, dead_mask: torch.Tensor,
              residual: torch.Tensor, target_var: torch.Tensor, k_aux: int, alpha: float,
              b_pre: torch.Tensor | None = None) -> torch.Tensor:
    """AuxK (OpenAI, as in sparsify): the ``k_aux`` largest pre-activations among dead latents
    reconstruct the detached residual error ``residual [batch, width]`` (no bias). Its MSE is
    normalised by the residual's variance, multiplied by the target variance so that it stands to
    ``"mse"`` as OpenAI's normalised AuxK term stands to their normalised MSE, scaled by
    ``min(n_dead / k_aux, 1)`` and by ``alpha``. ``pre`` are the detached pre-activations of
    ``(x_flat - b_pre) @ W_enc + b_enc``; they are reused (columns of dead latents, top-k_aux per row),
    so AuxK costs a few ``[batch, n_dead]`` products and nothing when no latent is dead."""
    dead = dead_mask.nonzero().squeeze(1)
    n_dead = int(dead.numel())
    if n_dead == 0 or alpha == 0:
        return pre.new_zeros(())
    k = min(k_aux, n_dead)
    scale = min(n_dead / k_aux, 1.0)
    with torch.no_grad():
        pre_dead = pre.index_select(1, dead)
        vals, idx = (None, None) if k == n_dead else pre_dead.topk(k, dim=1, sorted=False)
    if idx is not None and vals is not None and n_dead > AUXK_DENSE_MAX_RATIO * k:
        # Many dead latents: the k_aux picks per row through the sparse machinery of the main path.
        batch = x_flat.shape[0]
        rows = torch.arange(batch, device=pre.device).repeat_interleave(k)
        codes = SparseCodes(rows, dead[idx].reshape(-1), None, batch, dictionary.d_sae, k)
        codes.values = F.relu(selected_preacts(x_flat, dictionary.W_enc, dictionary.b_enc, codes,
                                               vals.reshape(-1), b_pre))
        e_hat = codes.decode(dictionary.W_dec)
    else:
        e_hat = _AuxKDecode.apply(pre_dead, idx, x_flat, b_pre, dictionary.W_enc, dictionary.b_enc,
                                  dictionary.W_dec, dead)
    residual = residual.detach()
    aux_mse = (e_hat - residual).pow(2).sum(-1).mean()
    resid_var = (residual - residual.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
    return alpha * scale * aux_mse * (target_var.detach() / resid_var)


class SparseCodes:
    """Selected latents of a batch in row-major COO form: ``rows``, ``cols`` (latent ids) and
    ``values`` (differentiable); ``k`` is set when every row holds exactly ``k`` entries.

    Decoding (:meth:`decode`) and the encoder's :func:`selected_preacts` share one grouping of the
    entries by latent (:meth:`groups`, computed once, on the first backward that needs it).
    """

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor | None, batch: int,
                 d_sae: int, k: int | None = None):
        self.rows, self.cols, self.batch, self.d_sae, self.k = rows, cols, batch, d_sae, k
        self.values = values if values is not None else cols.new_zeros(0, dtype=torch.float32)
        self._groups: LatentGroups | None = None
        self._row_offsets: torch.Tensor | None = None

    def groups(self) -> LatentGroups:
        """The entries grouped by latent (cached)."""
        if self._groups is None:
            self._groups = LatentGroups(self.rows, self.cols, self.d_sae)
        return self._groups

    def row_offsets(self) -> torch.Tensor:
        """Where each batch row's entries start (cached)."""
        if self._row_offsets is None:
            if self.k is not None:
                self._row_offsets = torch.arange(0, self.batch * self.k, self.k, device=self.cols.device)
            else:
                self._row_offsets = offsets_from_rows(self.rows, self.batch)
        return self._row_offsets

    def bags(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(indices, offsets)`` for ``F.embedding_bag``: ``[batch, k]`` indices, or flat ones with offsets."""
        if self.k is not None:
            return self.cols.view(self.batch, self.k), None
        return self.cols, self.row_offsets()

    def decode(self, W_dec: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """``[batch, width]`` reconstruction without bias (``values`` overrides, e.g. masked ones)."""
        return _SparseDecode.apply(self.values if values is None else values, W_dec, self)

    def dense(self, d_sae: int | None = None) -> torch.Tensor:
        """Dense latents ``[batch, d_sae]`` (differentiable in ``values``)."""
        out = self.values.new_zeros(self.batch, d_sae or self.d_sae)
        return out.index_put((self.rows, self.cols), self.values)

    def latents(self) -> SparseLatents:
        """The detached codes as :class:`saelab.interfaces.SparseLatents` (for ``DictionaryOutput``)."""
        return SparseLatents(self.rows, self.cols, self.values.detach(), self.batch, self.d_sae)


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
    "LatentGroups",
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
