"""The ``crosscoder`` architecture: one latent space read from and written to H sites (Anthropic 2024,
"Sparse Crosscoders for Cross-Layer Features and Model Diffing"; science-of-finetuning's
crosscoder_learning ``CrossCoder`` / ``BatchTopKCrossCoder``; OpenMOSS Llamascopium's crosscoder).

The sites are H same-width hookpoints: several layers of one model (``layers.3``, ``layers.4``...) or one
layer of several models; the architecture does not read their names. It is an autoencoder (inputs ==
outputs). Every site has its own encoder and decoder; the pre-activation is shared::

    h       = sum_h x_h W_enc[h] + b_enc                              W_enc [H, d, F], b_enc [F]
    x_hat_h = f W_dec[h] + b_dec[h]                                   W_dec [H, F, d], b_dec [H, d]

Decoder norms are free for every activation. ``N[h, i] = norm_scales[h] * ||W_dec[h, i]||`` is latent i's
decoder norm at site h in training units (``norm_scales``, a buffer of ones, absorbs the output scales
when the normalisation is folded in, so gating and penalties do not move); the gating norm ``n_i``
(``decoder_norm``) is ``sum_h N[h, i]`` (the paper), ``sqrt(sum_h N[h, i]^2)`` (the concatenated
decoders) or 1.

Activations (``activation``), all from ``f = relu(h)``: ``relu`` with the penalty
``l0_coefficient * sum_i f_i n_i`` (the paper); ``jumprelu`` (``h * 1[h > exp(log_threshold)]``,
straight-through threshold gradient) with ``l0_coefficient * sum_i tanh(tanh_scale * f_i n_i)``;
``topk`` (per token, the k latents with the largest ``f * n`` keep their value ``f``) and ``batchtopk``
(the k*batch largest ``f * n`` of the batch in training; at inference ``f * 1[f * n > threshold]`` with
``threshold`` the running mean of each training batch's smallest kept ``f * n``), both with the AuxK
dead-latent loss (dead latents ranked by ``pre * n``). The TopK family's forward is sparse: one encoder
product without autograd, then only the selected pre-activations carry gradients.

Loss: squared error summed over width and over the H sites (``loss_reduction="sum"``; ``"mean"`` divides
it, the penalty and AuxK by H), averaged over tokens. Decoding goes through the sparse path (the active
latents' decoder rows per site, :meth:`saelab.dictionary.SparseCodes.decode`) when at most
``sparse_max_density`` of the latents are active, else one dense product; both give the same outputs.

Init: each site's decoder rows random with norm ``decoder_init_norm`` (default 0.1 for ReLU, as the
``relu`` architecture; else ``1/sqrt(H)``: unit-norm concatenated rows), the encoder
the decoder's transpose (crosscoder_learning's ``init_with_transpose``), biases zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from saelab import DictionaryOutput, Options, SiteSpec, SparseDictionary, UsageError, hookimpl
from saelab.dictionary import (
    DictionaryOptions,
    SparseCodes,
    check_k,
    geometric_median,
    selected_preacts,
    site_scales,
    use_sparse_decode,
)
from torch import nn

from ._jumprelu import jumprelu
from ._topk_family import auxk_loss

TOPK_FAMILY = ("topk", "batchtopk")
"""Activations that select latents (sparse forward, AuxK)."""


class CrosscoderOptions(DictionaryOptions):
    """Options of the ``crosscoder`` architecture."""

    d_sae: int | None = Field(default=None, ge=1)
    """Number of latents F, shared by all sites. When unset, ``expansion_factor * d`` (d: one site's width)."""
    activation: Literal["relu", "jumprelu", "topk", "batchtopk"] = "relu"
    """``relu`` (L1 penalty on ``f * n``; Anthropic), ``jumprelu`` (learned thresholds on h, tanh penalty),
    ``topk`` (k latents per token, ranked by ``f * n``) or ``batchtopk`` (k*batch latents over the batch in
    training, a learned threshold on ``f * n`` at inference; the model-diffing recipe)."""
    decoder_norm: Literal["sum", "concat", "none"] = "sum"
    """The gating norm n of a latent, from its per-site decoder norms ``N[h]``: ``sum`` (``sum_h N[h]``; the
    paper), ``concat`` (``sqrt(sum_h N[h]^2)``, the norm of the concatenated decoders) or ``none`` (1: plain
    activations; with ``relu``/``jumprelu`` the penalty then no longer holds the decoder norms down)."""
    k: int = Field(default=32, ge=1)
    """Latents kept per token (``topk``; ``batchtopk`` on average). Unused by ``relu`` and ``jumprelu``."""
    auxk_alpha: float = Field(default=1 / 32, ge=0)
    """Coefficient of the AuxK dead-latent loss of the TopK family (OpenAI/sparsify: 1/32); 0 turns it off."""
    auxk_k: int | None = Field(default=None, ge=1)
    """Dead latents used by AuxK per token; default half of one site's width (``d / 2``, as crosscoder_learning;
    sparsify's ``d / 2`` for one site)."""
    threshold_momentum: float = Field(default=0.05, gt=0, le=1)
    """``batchtopk``: weight of each batch's smallest kept ``f * n`` in the running inference threshold
    (after a plain running mean over the first ``1/threshold_momentum`` steps)."""
    l0_coefficient: float = Field(default=1.0, ge=0)
    """Weight lambda of the sparsity penalty: ``relu``: ``lambda * sum_i f_i n_i``; ``jumprelu``:
    ``lambda * sum_i tanh(tanh_scale * f_i n_i)``. In the trainer's normalised units (E|x_h|^2 = d per site)."""
    tanh_scale: float = Field(default=4.0, gt=0)
    """``jumprelu``: the constant c inside the tanh penalty (Llamascopium: 4)."""
    l0_warmup_steps: int = Field(default=0, ge=0)
    """Optimizer steps over which the penalty grows linearly from 0 (0: full from the start)."""
    initial_threshold: float = Field(default=0.5, gt=0)
    """``jumprelu``: starting threshold of every latent (on the pre-activation h)."""
    bandwidth: float = Field(default=0.1, gt=0)
    """``jumprelu``: width of the rectangle kernel of the straight-through threshold gradient."""
    loss_reduction: Literal["sum", "mean"] = "sum"
    """How the reconstruction error (squared error summed over width, averaged over tokens) combines over the
    H sites: ``sum`` (Anthropic; the penalty is not divided by H) or ``mean`` (the error, the penalty and
    AuxK are all divided by H: the same optimum, gradients H times smaller)."""
    decode: Literal["auto", "sparse", "dense"] = "auto"
    """Decoder path: ``sparse`` (gather the active latents' decoder rows per site), ``dense`` (one product)
    or ``auto`` (sparse when at most ``sparse_max_density`` of the latents are active)."""
    sparse_max_density: float = Field(default=0.05, gt=0, le=1)
    """``decode="auto"``: the largest fraction of active latents decoded through the sparse path (as ``clt``)."""
    layer_site: Literal["", "resid_mid", "mlp", "mlp.input", "self_attn", "self_attn.input"] = ""
    """The sites of ``saelab train --layers``: block i's output ``layers.i`` (""), else ``layers.i.<layer_site>``."""
    decoder_init_norm: float | None = Field(default=None, gt=0)
    """Initial norm of each latent's decoder row at each site; default 0.1 for ``relu`` (as the ``relu``
    architecture), else ``1/sqrt(H)`` (unit-norm concatenated rows: O(1) pre-activations, which
    ``jumprelu``'s ``initial_threshold`` and the TopK family's defaults assume)."""


class _FlatView(NamedTuple):
    """The crosscoder as one flat linear dictionary (for :func:`auxk_loss`): ``W_enc [H*d, F]`` (a view),
    ``b_enc``, ``W_dec [F, H*d]`` (a differentiable copy), ``d_sae``."""

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    d_sae: int


class Crosscoder(SparseDictionary):
    """Crosscoder: per-site encoders summed into one shared pre-activation, per-site decoders (ReLU,
    JumpReLU, TopK or BatchTopK on decoder-norm-weighted activations)."""

    name = "crosscoder"
    Options: ClassVar[type[CrosscoderOptions]] = CrosscoderOptions
    unit_norm_decoder: ClassVar[bool] = False
    """Decoder norms are free (they weight the ranking, gating and penalty)."""

    @classmethod
    def sites_for_layers(cls, layers: Sequence[int], options: Options) -> tuple[list[str], list[str]]:
        """``layers.i`` (or ``layers.i.<layer_site>``) for every layer i, as both inputs and outputs."""
        site = options.layer_site if isinstance(options, CrosscoderOptions) else ""
        names = [f"layers.{i}.{site}" if site else f"layers.{i}" for i in layers]
        return names, list(names)

    def __init__(self, sites: SiteSpec, options: CrosscoderOptions):
        if not sites.is_autoencoder or sites.d_in != sites.d_out:
            raise UsageError(f"a crosscoder reconstructs the sites it reads (inputs == outputs, one width); got "
                             f"inputs {sites.inputs} (d={sites.d_in}) and outputs {sites.outputs} (d={sites.d_out})")
        super().__init__(sites, options)
        H, d = len(sites.inputs), sites.d_in
        n = options.resolve_d_sae(d)
        self.n_sites = H
        """Number of sites H."""
        self._d_sae = n
        if options.activation in TOPK_FAMILY:
            check_k(options.k, n)
        norm = options.decoder_init_norm or (0.1 if options.activation == "relu" else 1 / math.sqrt(H))
        W = F.normalize(torch.randn(H, n, d), dim=-1) * norm
        self.W_enc = nn.Parameter(W.transpose(1, 2).contiguous())
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.W_dec = nn.Parameter(W)
        self.b_dec = nn.Parameter(torch.zeros(H, d))
        if options.activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((n,), math.log(options.initial_threshold)))
        if options.activation == "batchtopk":
            self.register_buffer("threshold", torch.tensor(-1.0))
            self.register_buffer("threshold_updates", torch.tensor(0, dtype=torch.long))
        self.register_buffer("norm_scales", torch.ones(H))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))
        self.extra_config: dict[str, object] = {}
        """Free-form metadata saved under ``"metadata"`` in ``cfg.json`` (normalisation, hookpoints...)."""

    # -- shape and weights ---------------------------------------------------------------------------

    @property
    def d_sae(self) -> int:
        """Number of latents F."""
        return self._d_sae

    @property
    def latent_activation(self) -> Literal["relu", "topk", "threshold", "unknown"]:
        """``relu``, ``threshold`` (JumpReLU, on h; BatchTopK at inference, on ``f * n``: an exporter must
        weight by :meth:`gating_norms`) or ``topk`` (ranked on ``f * n``)."""
        act = self.options.activation
        return "relu" if act == "relu" else "threshold" if act in ("jumprelu", "batchtopk") else "topk"

    @property
    def threshold_values(self) -> torch.Tensor:
        """``jumprelu``: per-latent thresholds on h, ``[F]``."""
        return self.log_threshold.exp()

    def _site_norms(self) -> torch.Tensor:
        """Differentiable ``N [H, F]`` in training units."""
        return self.norm_scales[:, None] * self.W_dec.norm(dim=-1)

    @torch.no_grad()
    def site_decoder_norms(self) -> torch.Tensor:
        """Each latent's decoder norm at each site in training units, float32 ``[F, H]``
        (``norm_scales[h] * ||W_dec[h, i]||``: unchanged by folding the normalisation)."""
        return self._site_norms().float().T.contiguous()

    def gating_norms(self) -> torch.Tensor:
        """The gating norm n of every latent, ``[F]`` (differentiable; see ``decoder_norm``)."""
        how = self.options.decoder_norm
        if how == "none":
            return self.W_dec.new_ones(self.d_sae)
        N = self._site_norms()
        return N.sum(0) if how == "sum" else N.pow(2).sum(0).sqrt()

    def site_preactivations(self, x: torch.Tensor) -> torch.Tensor:
        """Each site's share of the pre-activation, ``x_h @ W_enc[h]`` as ``[batch, H, F]`` (no bias: they
        sum to ``h - b_enc``)."""
        return torch.einsum("bhd,hdf->bhf", self._sites(x, "input"), self.W_enc)

    @torch.no_grad()
    def decoder_directions(self) -> torch.Tensor:
        """Each latent's decoders to all sites, ``[F, H * d]`` (site-major within a row)."""
        return self.W_dec.transpose(0, 1).reshape(self.d_sae, -1)

    @torch.no_grad()
    def encoder_directions(self) -> torch.Tensor:
        """Each latent's encoders from all sites, ``[F, H * d]`` (site-major within a row)."""
        return self.W_enc.reshape(-1, self.d_sae).T

    def _flat(self) -> _FlatView:
        return _FlatView(self.W_enc.reshape(-1, self.d_sae), self.b_enc,
                         self.W_dec.transpose(0, 1).reshape(self.d_sae, -1), self.d_sae)

    # -- encoding ------------------------------------------------------------------------------------

    def _sites(self, x: torch.Tensor, what: str) -> torch.Tensor:
        H, d = self.n_sites, self.sites.d_in
        if x.dim() == 2 and H == 1:
            x = x[:, None, :]
        if x.dim() != 3 or x.shape[1] != H or x.shape[2] != d:
            raise ValueError(f"{what} must have shape [batch, {H}, {d}], got {list(x.shape)}")
        return x

    def _select(self, pre: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | None]:
        """TopK family: ``(rows, cols, pre[rows, cols], k)`` (row-major) ranked on ``relu(pre) * n`` (detached)."""
        B, F_ = pre.shape
        weighted = pre * n
        if self.options.activation == "topk":
            k = self.options.k
            idx = weighted.topk(k, dim=1, sorted=False).indices
            rows = torch.arange(B, device=pre.device).repeat_interleave(k)
            cols = idx.reshape(-1)
            return rows, cols, pre[rows, cols], k
        if self.training or float(self.threshold) < 0:
            vals, flat = weighted.reshape(-1).topk(min(B * F_, self.options.k * B), sorted=False)
            flat = flat[vals > 0].sort().values
            rows, cols = torch.div(flat, F_, rounding_mode="floor"), flat % F_
        else:
            rows, cols = (weighted > self.threshold).nonzero(as_tuple=True)
        return rows, cols, pre[rows, cols], None

    def _encode(self, x_flat: torch.Tensor, n: torch.Tensor | None = None
                ) -> tuple[torch.Tensor | None, SparseCodes | None, torch.Tensor]:
        """``(dense latents [batch, F] or None, codes or None, detached pre [batch, F])``; the TopK family
        ranks with the detached gating norms ``n`` (computed when not given)."""
        W_enc = self.W_enc.reshape(-1, self.d_sae)
        if self.options.activation in TOPK_FAMILY:
            with torch.no_grad():
                pre = torch.addmm(self.b_enc, x_flat, W_enc)
                rows, cols, vals, k = self._select(pre, self.gating_norms() if n is None else n)
            codes = SparseCodes(rows, cols, None, x_flat.shape[0], self.d_sae, k)
            codes.values = F.relu(selected_preacts(x_flat, W_enc, self.b_enc, codes, vals))
            return None, codes, pre
        pre = torch.addmm(self.b_enc, x_flat, W_enc)
        z = F.relu(pre) if self.options.activation == "relu" else jumprelu(pre, self.threshold_values,
                                                                            self.options.bandwidth)
        return z, None, pre.detach()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents ``[batch, F]`` for inputs ``[batch, H, d]``."""
        z, codes, _ = self._encode(self._sites(x, "input").reshape(x.shape[0], -1))
        if z is None:
            assert codes is not None
            z = codes.dense()
        return z

    # -- decoding ------------------------------------------------------------------------------------

    def decode_sparse(self, codes: SparseCodes) -> torch.Tensor:
        """``[batch, H, d]`` (no bias): each site's active decoder rows gathered and summed."""
        return torch.stack([codes.decode(W) for W in self.W_dec.unbind(0)], dim=1)

    def decode_dense(self, z: torch.Tensor) -> torch.Tensor:
        """``[batch, H, d]`` (no bias) from dense latents ``[batch, F]``."""
        return torch.matmul(z, self.W_dec).transpose(0, 1)

    def _decode(self, z: torch.Tensor | None, codes: SparseCodes | None,
                support: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction without bias through the sparse or the dense path. Dense latents ``z`` are
        gathered on ``support`` (default ``z != 0``): the entries whose gradient matters (JumpReLU adds
        the inactive ones within the threshold kernel)."""
        o = self.options
        if codes is not None:
            if use_sparse_decode(o.decode, o.sparse_max_density, int(codes.rows.numel()), codes.batch * self.d_sae):
                return self.decode_sparse(codes)
            return self.decode_dense(codes.dense())
        assert z is not None
        if support is None:
            support = z.detach() != 0
        if not use_sparse_decode(o.decode, o.sparse_max_density, int(support.sum()), z.shape[0] * self.d_sae):
            return self.decode_dense(z)
        rows, cols = support.nonzero(as_tuple=True)
        return self.decode_sparse(SparseCodes(rows, cols, z[rows, cols], z.shape[0], self.d_sae))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[batch, H, d]`` from latents ``[batch, F]`` (bias included)."""
        return self._decode(latents, None) + self.b_dec

    # -- forward and losses --------------------------------------------------------------------------

    def penalty_scale(self) -> float:
        """Current fraction of ``l0_coefficient`` (linear warm-up)."""
        warm = self.options.l0_warmup_steps
        return 1.0 if warm == 0 else min(1.0, (int(self.steps) + 1) / warm)

    def _per_site(self) -> float:
        return 1.0 if self.options.loss_reduction == "sum" else 1.0 / self.n_sites

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None,
                dead_mask: torch.Tensor | None = None) -> DictionaryOutput:
        """Encode, decode (sparse or dense path) and the losses ``mse``, ``sparsity`` (ReLU/JumpReLU) and
        ``auxk`` (TopK family, when ``dead_mask`` marks dead latents); ``target`` defaults to ``x``. The
        BatchTopK threshold is updated in training mode only."""
        xs = self._sites(x, "input")
        batch = xs.shape[0]
        x_flat = xs.reshape(batch, -1)
        n = None
        if self.options.activation in TOPK_FAMILY:
            with torch.no_grad():
                n = self.gating_norms()
        z, codes, pre = self._encode(x_flat, n)
        if codes is not None and n is not None and self.training and self.options.activation == "batchtopk":
            self._observe(codes, n)
        support = None
        if z is not None and self.options.activation == "jumprelu" and self.training:
            near = (pre - self.threshold_values.detach()).abs() < self.options.bandwidth / 2
            support = (z.detach() != 0) | near
        recon = self._decode(z, codes, support) + self.b_dec
        if codes is not None:
            out = DictionaryOutput(recon, sparse_latents=codes.latents())
        else:
            assert z is not None
            out = DictionaryOutput(recon, z.detach())
        y = xs if target is None else self._sites(target, "target")
        losses = {"mse": (recon - y).pow(2).sum((1, 2)).mean() * self._per_site()}
        if z is not None:
            weighted = z * self.gating_norms()
            terms = weighted if self.options.activation == "relu" else torch.tanh(self.options.tanh_scale * weighted)
            coef = self.options.l0_coefficient * self.penalty_scale() * self._per_site()
            losses["sparsity"] = coef * terms.sum(-1).mean()
        elif n is not None and dead_mask is not None and self.options.auxk_alpha > 0:
            dead_mask = dead_mask.to(pre.device, torch.bool)
            if bool(dead_mask.any()):
                y_flat = y.reshape(batch, -1)
                target_var = (y_flat - y_flat.mean(0)).pow(2).sum(-1).mean()
                k_aux = self.options.auxk_k or max(1, self.sites.d_in // 2)
                losses["auxk"] = self._per_site() * auxk_loss(
                    self._flat(), x_flat, pre, dead_mask, (y - recon).reshape(batch, -1), target_var, k_aux,
                    self.options.auxk_alpha, rank=pre * n)
        out.losses = losses
        return out

    @torch.no_grad()
    def _observe(self, codes: SparseCodes, n: torch.Tensor) -> None:
        """BatchTopK: update the running inference threshold with the batch's smallest kept ``f * n``."""
        if codes.values.numel() == 0:
            return
        smallest = (codes.values.detach() * n[codes.cols]).min()
        step = int(self.threshold_updates) + 1
        weight = max(1.0 / step, self.options.threshold_momentum)
        if step == 1 or float(self.threshold) < 0:
            self.threshold.copy_(smallest)
        else:
            self.threshold.mul_(1 - weight).add_(weight * smallest)
        self.threshold_updates.add_(1)

    # -- training hooks ------------------------------------------------------------------------------

    @torch.no_grad()
    def initialize_from_data(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """Set each site's ``b_dec`` from a sample of it (``b_dec_init``: geometric median, mean or zeros)."""
        y = self._sites(target, "target").float()
        how = self.options.b_dec_init
        for h in range(self.n_sites):
            value = (geometric_median(y[:, h]) if how == "geometric_median" else y[:, h].mean(0) if how == "mean"
                     else torch.zeros_like(self.b_dec[h]))
            self.b_dec[h].copy_(value)

    def after_optimizer_step(self) -> None:
        """Count optimizer steps (penalty warm-up)."""
        self.steps.add_(1)

    def synchronize(self, all_reduce_mean: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Average BatchTopK's inference threshold across data-parallel ranks."""
        if self.options.activation == "batchtopk":
            self.threshold.copy_(all_reduce_mean(self.threshold.clone()))

    @torch.no_grad()
    def fold_scaling(self, input_scales: torch.Tensor, output_scales: torch.Tensor) -> None:
        """Make the module map raw activations to raw reconstructions after training on ``x_h * s_in[h]`` ->
        ``x_h * s_out[h]``: ``W_enc[h]`` absorbs ``s_in[h]``, ``W_dec[h]`` and ``b_dec[h]`` absorb
        ``1 / s_out[h]`` and ``norm_scales[h]`` takes ``s_out[h]``, so latents, thresholds, rankings and the
        training-unit decoder norms are unchanged."""
        s_in = site_scales(input_scales, self.n_sites, "input_scales")
        s_out = site_scales(output_scales, self.n_sites, "output_scales")
        for h in range(self.n_sites):
            self.W_enc[h].mul_(s_in[h])
            self.W_dec[h].div_(s_out[h])
            self.b_dec[h].div_(s_out[h])
            self.norm_scales[h].mul_(s_out[h])
        self.extra_config["scaling_folded"] = {"input_scales": s_in, "output_scales": s_out}

    def config(self) -> dict[str, object]:
        """Architecture name, sites, options, ``d_sae`` and metadata, as JSON data."""
        cfg = super().config()
        cfg["d_sae"] = self.d_sae
        if self.extra_config:
            cfg["metadata"] = dict(self.extra_config)
        return cfg


@hookimpl
def register_architectures(register):
    """Register the ``crosscoder`` architecture."""
    register(Crosscoder)
