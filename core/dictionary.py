"""The linear-dictionary base that architectures build on, its shared sparse kernels, and dictionary files.

Architectures (the builtins under ``saelab.plugins.architectures`` and third-party ones alike) build on
these public pieces:

- :class:`DictionaryOptions`: options every linear dictionary shares (``d_sae`` or ``expansion_factor``,
  ``b_dec`` init).
- :class:`LinearDictionary`: weights ``W_enc [n_in*d_in, d_sae]``, ``b_enc [d_sae]``,
  ``W_dec [d_sae, n_out*d_out]``, ``b_dec [n_out*d_out]`` (SAELens layout), data-dependent ``b_dec``
  init, unit-norm decoder rows, per-site folding of activation scaling, an optional skip connection
  ``W_skip``. A subclass implements ``encode`` (and usually ``forward``, to add its loss terms).
- Sparse kernels for architectures that select a few latents per row (the TopK family):
  :class:`SparseCodes` (selected entries in COO form), :func:`selected_preacts` (differentiable
  pre-activations at the selected entries, sparse backward), :func:`sparse_decode` and
  :func:`offsets_from_rows` (decoding through ``F.embedding_bag``), :class:`LatentGroups`.
- Helpers: :func:`geometric_median`, :func:`unit_norm_decoder_`, :func:`remove_parallel_grad_`,
  :func:`check_k`, :func:`build_dictionary`, :func:`save_dictionary`, :func:`load_dictionary`,
  :func:`detect_format`.

Loss conventions (the trainer minimises ``sum(losses.values())``): ``"mse"`` is the squared error
summed over sites and width, averaged over the batch, in the space the module is trained in; other
terms are already weighted by their coefficients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
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


# --------------------------------------------------------------------------------------------------
# Sparse kernels (selected latents in COO form)


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
                W_enc: torch.Tensor, b_enc: torch.Tensor, codes: SparsityPattern) -> torch.Tensor:
        ctx.save_for_backward(x, b_pre, W_enc)
        ctx.codes = codes
        ctx.has_b_pre = b_pre is not None
        return selected.detach().clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, b_pre, W_enc = ctx.saved_tensors
        codes: SparsityPattern = ctx.codes
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
    return _SelectedPreacts.apply(selected, x, b_pre, W_enc, b_enc, codes.pattern)


class _SparseDecode(torch.autograd.Function):
    """``sum_e values[e] * W_dec[cols[e]]`` per batch row, with a sparse backward (see :func:`sparse_decode`)."""

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor, W_dec: torch.Tensor, codes: SparsityPattern) -> torch.Tensor:
        ctx.save_for_backward(values, W_dec)
        ctx.codes = codes
        indices, offsets = codes.bags()
        weights = values if codes.k is None else values.view(codes.batch, codes.k)
        return F.embedding_bag(indices, W_dec, offsets, mode="sum", per_sample_weights=weights)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        values, W_dec = ctx.saved_tensors
        codes: SparsityPattern = ctx.codes
        grad = grad.contiguous()
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            # d/dvalues[e] = grad[rows[e]] . W_dec[cols[e]] (what embedding_bag's own backward computes).
            grad_values = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad, W_dec, codes.cols, codes.row_offsets(), codes.rows, 0, -1)
        if ctx.needs_input_grad[1]:
            grad_W = codes.groups().scatter_rows(values, grad)
        return grad_values, grad_W, None


def use_sparse_decode(decode: str, sparse_max_density: float, nnz: int, n_entries: int) -> bool:
    """Whether ``nnz`` active entries of ``n_entries`` (batch x latents) are decoded through the sparse
    path: ``decode`` ``"sparse"`` or ``"dense"`` forces it, ``"auto"`` picks sparse at a density of at
    most ``sparse_max_density`` (the multi-site architectures' ``decode`` option)."""
    if decode != "auto":
        return decode == "sparse"
    return nnz <= sparse_max_density * n_entries


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


class SparsityPattern:
    """Which ``(row, latent)`` entries of a batch are active, in row-major COO form, with the groupings
    the sparse kernels share (cached). The autograd contexts of :func:`selected_preacts` and
    :meth:`SparseCodes.decode` keep this, never the codes: codes hold the differentiable ``values``,
    whose autograd graph holds those contexts, a cycle through C++ that Python's garbage collector does
    not break, and every training step's codes and saved activations leaked (~0.1 GB per CLT step)."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, batch: int, d_sae: int, k: int | None = None):
        self.rows, self.cols, self.batch, self.d_sae, self.k = rows, cols, batch, d_sae, k
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


class SparseCodes:
    """Selected latents of a batch: their :class:`SparsityPattern` (``rows``, ``cols``: latent ids; ``k``
    set when every row holds exactly ``k`` entries) and their ``values`` (differentiable).

    Decoding (:meth:`decode`) and the encoder's :func:`selected_preacts` share one grouping of the
    entries by latent (``pattern.groups()``, computed once, on the first backward that needs it).
    """

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor | None, batch: int,
                 d_sae: int, k: int | None = None):
        self.pattern = SparsityPattern(rows, cols, batch, d_sae, k)
        self.values = values if values is not None else cols.new_zeros(0, dtype=torch.float32)

    @property
    def rows(self) -> torch.Tensor:
        """Batch row of each entry."""
        return self.pattern.rows

    @property
    def cols(self) -> torch.Tensor:
        """Latent id of each entry."""
        return self.pattern.cols

    @property
    def batch(self) -> int:
        """Rows in the batch."""
        return self.pattern.batch

    @property
    def d_sae(self) -> int:
        """Latents of the dictionary."""
        return self.pattern.d_sae

    @property
    def k(self) -> int | None:
        """Entries per row when every row holds the same number, else ``None``."""
        return self.pattern.k

    def decode(self, W_dec: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """``[batch, width]`` reconstruction without bias (``values`` overrides, e.g. masked ones)."""
        return _SparseDecode.apply(self.values if values is None else values, W_dec, self.pattern)

    def dense(self, d_sae: int | None = None) -> torch.Tensor:
        """Dense latents ``[batch, d_sae]`` (differentiable in ``values``)."""
        out = self.values.new_zeros(self.batch, d_sae or self.d_sae)
        return out.index_put((self.rows, self.cols), self.values)

    def latents(self) -> SparseLatents:
        """The detached codes as :class:`saelab.interfaces.SparseLatents` (for ``DictionaryOutput``)."""
        return SparseLatents(self.rows, self.cols, self.values.detach(), self.batch, self.d_sae)


# --------------------------------------------------------------------------------------------------
# Linear dictionaries


def _as_sites(x: torch.Tensor, n: int, d: int, what: str) -> torch.Tensor:
    if x.dim() == 2 and n == 1:
        x = x[:, None, :]
    if x.dim() != 3 or x.shape[1] != n or x.shape[2] != d:
        raise ValueError(f"{what} must have shape [batch, {n}, {d}], got {list(x.shape)}")
    return x


def site_scales(scales: torch.Tensor, n: int, what: str) -> list[float]:
    """``scales`` (a 1-D tensor of ``n`` positive finite values, one per site: the arguments of
    :meth:`~saelab.SparseDictionary.fold_scaling`) as Python floats; one-line error otherwise."""
    if not isinstance(scales, torch.Tensor) or scales.dim() != 1 or scales.numel() != n:
        shape = list(scales.shape) if isinstance(scales, torch.Tensor) else type(scales).__name__
        raise UsageError(f"{what} must be a 1-D tensor with one scale per site ({n}), got {shape}")
    values = [float(v) for v in scales.detach().double().cpu().tolist()]
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise UsageError(f"{what}={values} must be positive and finite")
    return values


class LinearDictionary(SparseDictionary):
    """A dictionary with a linear encoder and decoder (SAELens weight layout): the base class of every
    builtin architecture, for third-party ones to build on the same way.

    A subclass must implement ``encode`` (``[batch, n_in, d_in]`` -> ``[batch, d_sae]``, e.g.
    ``F.relu(self.preacts(self.flat_input(x)))``); it usually overrides ``forward`` to add its loss terms
    (the default is a dense encode/decode with ``mse`` only). Everything else works as inherited:
    ``d_sae``, dense ``decode``, data-dependent ``b_dec`` init, unit-norm decoder hooks, per-site
    ``fold_scaling``, ``config``, saving and loading. Class attributes: ``unit_norm_decoder`` (rows of
    ``W_dec`` kept unit-norm during training), ``pre_encoder_bias`` (an autoencoder subtracts ``b_dec``
    from its input before encoding), ``skip_connection`` (adds ``x @ W_skip``); the ``latent_activation``
    property tells exporters (SAELens, sparsify) how latents come from pre-activations.
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
    def latent_activation(self) -> Literal["relu", "topk", "threshold", "unknown"]:
        """How latents come from the pre-activations ``pre``, for exporters: ``"relu"`` (``ReLU(pre)``),
        ``"topk"`` (the ``self.k`` largest per row, ReLU'd), ``"threshold"`` (``pre`` where above a
        per-latent or global threshold, stored as ``threshold`` or ``log_threshold``), ``"unknown"``
        (the default: not exportable unless a ``threshold`` weight says otherwise)."""
        return "unknown"

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

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None,
                dead_mask: torch.Tensor | None = None) -> DictionaryOutput:
        """Dense ``encode``, linear decode (plus the skip path) and the ``mse`` loss; a dictionary whose
        outputs differ from its inputs, called without ``target``, only infers (no losses)."""
        x_flat = self.flat_input(x)
        z = self.encode(x)
        recon = torch.addmm(self.b_dec, z, self.W_dec) + self.skip(x_flat)
        if target is None and not self.sites.is_autoencoder:
            return DictionaryOutput(self.unflatten_output(recon), z.detach())
        y = x_flat if target is None else self.flat_target(target)
        return DictionaryOutput(self.unflatten_output(recon), z.detach(), {"mse": self.mse(recon, y)})

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
    def fold_scaling(self, input_scales: torch.Tensor, output_scales: torch.Tensor) -> None:
        """Make the module map raw inputs to raw outputs after training on ``x[:, i] * input_scales[i]``
        -> ``y[:, j] * output_scales[j]`` (one scale per site, in ``SiteSpec`` order). Latent values
        (hence thresholds and k) are unchanged: ``W_enc``'s rows of input site ``i`` absorb
        ``input_scales[i]``, the decoder's columns of output site ``j`` (and ``b_dec``) absorb
        ``1/output_scales[j]`` (so its rows are no longer unit-norm), ``W_skip`` both."""
        s_in = site_scales(input_scales, self.n_in, "input_scales")
        s_out = site_scales(output_scales, self.n_out, "output_scales")
        if self.uses_pre_encoder_bias and not all(math.isclose(a, b, rel_tol=1e-5)
                                                  for a, b in zip(s_in, s_out, strict=True)):
            raise UsageError(f"an autoencoder with a pre-encoder bias needs the same scale for a site's input "
                             f"and output; got input_scales={s_in} and output_scales={s_out}")
        d_in, d_out = self.sites.d_in, self.sites.d_out
        # Python-float scalars per site block: one site gives exactly the arithmetic of a scalar scale.
        for i, s in enumerate(s_in):
            self.W_enc[i * d_in:(i + 1) * d_in].mul_(s)
        for j, s in enumerate(s_out):
            self.W_dec[:, j * d_out:(j + 1) * d_out].div_(s)
            self.b_dec[j * d_out:(j + 1) * d_out].div_(s)
        if self.skip_connection:
            for i, a in enumerate(s_in):
                for j, b in enumerate(s_out):
                    self.W_skip[i * d_in:(i + 1) * d_in, j * d_out:(j + 1) * d_out].mul_(a / b)
        self.extra_config["scaling_folded"] = {"input_scales": s_in, "output_scales": s_out}

    def config(self) -> dict[str, Any]:
        """Architecture name, sites, options, ``d_sae`` and metadata, as JSON data."""
        cfg = super().config()
        cfg["d_sae"] = self.d_sae
        if self.extra_config:
            cfg["metadata"] = dict(self.extra_config)
        return cfg


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
    """Instantiate a registered architecture; options are validated and a class that lacks a required
    method of :class:`~saelab.SparseDictionary` is refused (one-line errors)."""
    from .manager import registry

    cls = registry("architecture").get(architecture)
    cls.check_contract()
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
        dictionary.extra_config.update(extra_cfg)
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
    "DictionaryOptions",
    "LatentGroups",
    "LinearDictionary",
    "SparseCodes",
    "SparsityPattern",
    "build_dictionary",
    "check_k",
    "detect_format",
    "dictionary_formats",
    "geometric_median",
    "load_dictionary",
    "offsets_from_rows",
    "remove_parallel_grad_",
    "save_dictionary",
    "selected_preacts",
    "site_scales",
    "site_spec",
    "sparse_decode",
    "unit_norm_decoder_",
    "use_sparse_decode",
]
