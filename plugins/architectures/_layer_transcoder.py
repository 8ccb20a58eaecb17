"""Layer-spanning transcoders shared by ``clt`` and ``transcoder_set``: a private module of this plugin
package, not an entry point.

L layers. The sites are layers in forward order: input site ``i`` (e.g. ``layers.i.mlp.input``) feeds
encoder ``i``, output site ``j`` (e.g. ``layers.j.mlp``) is reconstructed from the latents of the layers
whose decoders reach it::

    a_i     = act(x_i W_enc[i] + b_enc[i])                          W_enc [L, d_in, F], b_enc [L, F]
    y_hat_j = sum_{i <= j} a_i W_dec_i[:, j - i] + b_dec[j]  (+ x_j W_skip[j])

Decoders are stored per source layer, ``W_dec_i [F, n_targets(i), d_out]`` (block ``t`` writes to layer
``i + t``), as circuit-tracer lays them out, so that the rows of active latents can be read alone. A
cross-layer transcoder (``cross_layer = True``) has ``n_targets(i) = L - i`` (targets ``i..L-1``,
L(L+1)/2 blocks of ``[F, d_out]`` in all); a transcoder set (``cross_layer = False``) has
``n_targets(i) = 1``: layer i's latents write to layer i only (L blocks). Every other path (activations,
penalty, AuxK, sparse/dense decoding, folding, save/load) is the same code for both. Latent ``f`` of
layer ``i`` has the global index ``i * F + f`` (``d_sae = L * F``).

Activations (``activation``): ``jumprelu`` (learned per-latent thresholds, straight-through estimator,
as the ``jumprelu`` architecture) and ``relu``, both with the tanh sparsity penalty on latents weighted
by the norm of their concatenated decoders, ``l0_coefficient * sum tanh(tanh_scale * a * ||W_dec_i[f]||)``
(free decoder norms); the TopK family ``topk`` (k per layer and token), ``topk_across_layers`` (k per
token over all L*F latents) and ``batchtopk`` (k*batch per layer over the batch in training, a learned
per-layer threshold at inference), with unit-norm concatenated decoder rows and the AuxK dead-latent
loss. Loss: squared error summed over width, summed (``loss_reduction="sum"``, Anthropic) or averaged
(``"mean"``, Llamascopium) over target layers, averaged over tokens; the penalty is reduced the same way.

Decoding scales with the active (latent, target) pairs: when the fraction of active latents is at most
``sparse_max_density`` each source layer's active latents are gathered and their decoder rows summed
into the target layers (``F.embedding_bag`` with a sparse backward, :meth:`saelab.dictionary.SparseCodes.decode`);
above it, a dense ``[batch, F] @ [F, n_targets(i) d]`` product per source layer. Both give the same outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from saelab import (
    DictionaryOutput,
    LayerReplacement,
    Options,
    SiteSpec,
    SparseDictionary,
    SparseLatents,
    UsageError,
)
from saelab.dictionary import (
    DictionaryOptions,
    SparseCodes,
    geometric_median,
    selected_preacts,
    site_scales,
    use_sparse_decode,
)
from torch import nn

from ._jumprelu import jumprelu

Activation = Literal["jumprelu", "relu", "topk", "topk_across_layers", "batchtopk"]
TOPK_FAMILY = ("topk", "topk_across_layers", "batchtopk")
"""Activations that select latents (unit-norm decoders, AuxK)."""


class LayerTranscoderOptions(DictionaryOptions):
    """Options shared by the ``clt`` and ``transcoder_set`` architectures."""

    d_sae: int | None = Field(default=None, ge=1)
    """Latents per layer (F); the dictionary has ``L * F`` latents. When unset, ``expansion_factor * d_in``."""
    input_site: Literal["mlp.input", "resid_mid"] = "mlp.input"
    """What encoder ``i`` reads when the layers are given (``saelab train --layers``): ``mlp.input`` (block
    i's MLP input, after its norm) or ``resid_mid`` (the residual stream between block i's attention and
    MLP, before the norm; circuit-tracer's ``hook_resid_mid``). Every layer writes its MLP output."""
    activation: Activation = "jumprelu"
    """``jumprelu`` (learned thresholds, tanh penalty; Anthropic), ``relu`` (tanh penalty), ``topk`` (k
    latents per layer and token), ``topk_across_layers`` (k latents per token over all layers;
    Llamascopium's recipe) or ``batchtopk`` (k*batch latents per layer over the batch in training, a
    learned per-layer threshold at inference)."""
    k: int = Field(default=32, ge=1)
    """Latents kept per token: per layer (``topk``; ``batchtopk`` on average), over all layers
    (``topk_across_layers``). Unused by ``jumprelu`` and ``relu``."""
    auxk_alpha: float = Field(default=1 / 32, ge=0)
    """Coefficient of the AuxK dead-latent loss of the TopK family (OpenAI/sparsify: 1/32); 0 turns it off."""
    auxk_k: int | None = Field(default=None, ge=1)
    """Dead latents used by AuxK per token; default half the width of all output sites together."""
    threshold_momentum: float = Field(default=0.05, gt=0, le=1)
    """``batchtopk``: weight of each batch's smallest kept activation in a layer's running inference
    threshold (after a plain running mean over the first ``1/threshold_momentum`` steps)."""
    l0_coefficient: float = Field(default=1.0, ge=0)
    """Weight lambda of the tanh sparsity penalty of ``jumprelu`` and ``relu``:
    ``lambda * sum_i tanh(tanh_scale * a_i * ||W_dec_i||)`` with the norm of the latent's decoders to all
    its target layers concatenated (a smooth count of active latents). In the trainer's normalised units
    (E|y_j|^2 = d_out per layer)."""
    tanh_scale: float = Field(default=4.0, gt=0)
    """The constant c inside the tanh penalty (Llamascopium: 4)."""
    l0_warmup_steps: int = Field(default=0, ge=0)
    """Optimizer steps over which the penalty grows linearly from 0 (0: full from the start)."""
    initial_threshold: float = Field(default=0.5, gt=0)
    """``jumprelu``: starting threshold of every latent."""
    bandwidth: float = Field(default=0.1, gt=0)
    """``jumprelu``: width of the rectangle kernel of the straight-through threshold gradient."""
    loss_reduction: Literal["sum", "mean"] = "sum"
    """How the reconstruction error (squared error summed over width, averaged over tokens) and the
    penalty combine over layers: ``sum`` over target layers (Anthropic; the ``mse`` term then equals the
    error summed over every output site) or ``mean`` (Llamascopium: divided by L)."""
    skip_connection: bool = False
    """Add a linear skip path per layer, ``x_j @ W_skip[j]`` (``W_skip [L, d_in, d_out]``, zero at start)."""
    encoder_init_scale: float = Field(default=1.0, gt=0)
    """Multiplier of the encoder's initial weights, ``U(+-1/sqrt(F))`` (Anthropic/Llamascopium). With few
    latents per layer for the width (F < d), that init gives encoder columns of norm ``sqrt(d / 3F) > 1``
    whose random part decays slowly; a small scale there (tests/test_clt.py: 0.03) lets them align with the features."""
    decode: Literal["auto", "sparse", "dense"] = "auto"
    """Decoder path: ``sparse`` (gather the active latents' decoder rows), ``dense`` (one matmul per source
    layer) or ``auto`` (sparse when at most ``sparse_max_density`` of the latents are active)."""
    sparse_max_density: float = Field(default=0.05, gt=0, le=1)
    """``decode="auto"``: the largest fraction of active latents decoded through the sparse path. On 2 CPU
    cores (bench/clt_decode.py) sparse is 2.6x faster at 1.6% and the paths cross between 6% and 12%."""


class LayerTranscoder(SparseDictionary):
    """Transcoders over L layers trained as one dictionary: layer i's latents write to every layer j >= i
    (``cross_layer``) or to layer i only (JumpReLU, ReLU or TopK family). Not registered itself: ``clt`` and
    ``transcoder_set`` subclass it."""

    Options: ClassVar[type[LayerTranscoderOptions]] = LayerTranscoderOptions
    per_layer_sites: ClassVar[bool] = True
    """The sites are layers: input site ``i`` and output site ``i`` belong to layer ``i``, in forward order."""
    cross_layer: ClassVar[bool] = True
    """True: source layer i decodes to every layer ``j >= i`` (a cross-layer transcoder); False: to layer i
    only (a transcoder set, ``W_dec_i [F, 1, d_out]``)."""

    @classmethod
    def sites_for_layers(cls, layers: Sequence[int], options: Options) -> tuple[list[str], list[str]]:
        """``layers.i.<input_site>`` for every layer i, and ``layers.i.mlp``."""
        site = options.input_site if isinstance(options, LayerTranscoderOptions) else LayerTranscoderOptions().input_site
        return [f"layers.{i}.{site}" for i in layers], [f"layers.{i}.mlp" for i in layers]

    def __init__(self, sites: SiteSpec, options: LayerTranscoderOptions):
        if sites.is_autoencoder:
            raise UsageError(f"a {self.name} reads one site per layer and reconstructs another (each layer's MLP "
                             f"output); got the same sites {sites.inputs} for inputs and outputs")
        if len(sites.inputs) != len(sites.outputs) or not sites.inputs:
            raise UsageError(f"a {self.name} needs one input and one output site per layer; got "
                             f"{len(sites.inputs)} inputs {sites.inputs} and {len(sites.outputs)} outputs {sites.outputs}")
        super().__init__(sites, options)
        L, d_in, d_out = len(sites.inputs), sites.d_in, sites.d_out
        n = options.resolve_d_sae(d_in)
        self.n_layers = L
        """Number of layers L."""
        self.d_sae_per_layer = n
        """Latents per layer F."""
        limit = L * n if options.activation == "topk_across_layers" else n
        if options.activation in TOPK_FAMILY and options.k > limit:
            raise UsageError(f"k={options.k} is larger than the {limit} latents it is chosen from "
                             f"(activation {options.activation!r}, d_sae={n} per layer, {L} layers)")
        enc_bound = options.encoder_init_scale / math.sqrt(n)
        self.W_enc = nn.Parameter(torch.empty(L, d_in, n).uniform_(-enc_bound, enc_bound))
        self.b_enc = nn.Parameter(torch.zeros(L, n))
        bound = 1 / math.sqrt((L if self.cross_layer else 1) * d_out)
        for i in range(L):
            W = self._initial_decoder(torch.empty(n, self.n_targets(i), d_out).uniform_(-bound, bound))
            if self.unit_norm_decoder:
                W = F.normalize(W.reshape(n, -1), dim=1).reshape(W.shape)
            setattr(self, f"W_dec_{i}", nn.Parameter(W))
        self.b_dec = nn.Parameter(torch.zeros(L, d_out))
        if options.skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(L, d_in, d_out))
        if options.activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((L, n), math.log(options.initial_threshold)))
        if options.activation == "batchtopk":
            self.register_buffer("threshold", torch.full((L,), -1.0))
            self.register_buffer("threshold_updates", torch.tensor(0, dtype=torch.long))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))
        self.extra_config: dict[str, object] = {}
        """Free-form metadata saved under ``"metadata"`` in ``cfg.json`` (normalisation, hookpoints...)."""

    def _initial_decoder(self, W: torch.Tensor) -> torch.Tensor:
        """A source layer's decoders ``[F, n_targets, d_out]`` at initialisation, before unit-norm
        projection (TopK family); subclasses may change them (``clt``: zero off-diagonal blocks)."""
        return W

    # -- shape and weights ---------------------------------------------------------------------------

    def n_targets(self, i: int) -> int:
        """Number of layers source layer ``i`` writes to: ``L - i`` (``cross_layer``) or 1."""
        return self.n_layers - i if self.cross_layer else 1

    @property
    def d_sae(self) -> int:
        """Number of latents, ``L * F`` (latent ``f`` of layer ``i`` is ``i * F + f``)."""
        return self.n_layers * self.d_sae_per_layer

    @property
    def unit_norm_decoder(self) -> bool:
        """The TopK family keeps each latent's concatenated decoder rows unit-norm; ReLU/JumpReLU do not."""
        return self.options.activation in TOPK_FAMILY

    @property
    def latent_activation(self) -> Literal["relu", "topk", "threshold", "unknown"]:
        """How latents come from pre-activations: ``relu``, ``threshold`` (JumpReLU; BatchTopK at
        inference) or ``topk``."""
        act = self.options.activation
        return "relu" if act == "relu" else "threshold" if act in ("jumprelu", "batchtopk") else "topk"

    def decoder(self, i: int) -> torch.Tensor:
        """Decoders of source layer ``i``: ``[F, n_targets(i), d_out]`` (block ``t`` writes to layer ``i + t``)."""
        return getattr(self, f"W_dec_{i}")

    def decoder_norms(self) -> torch.Tensor:
        """``[L, F]`` norm of each latent's decoders to all its target layers, concatenated."""
        F_ = self.d_sae_per_layer
        return torch.stack([self.decoder(i).reshape(F_, -1).norm(dim=1) for i in range(self.n_layers)])

    @torch.no_grad()
    def output_directions(self, outputs: Sequence[int] | None = None) -> torch.Tensor:
        """Each latent's decoder blocks summed over the target layers in ``outputs`` (default all),
        float32 ``[L * F, d_out]``, one source layer at a time (never a ``[L * F, L * d_out]`` matrix)."""
        F_, L = self.d_sae_per_layer, self.n_layers
        wanted = set(range(L)) if outputs is None else {int(j) for j in outputs}
        out = torch.zeros(L * F_, self.sites.d_out, device=self.b_dec.device)
        for i in range(L):
            blocks = [t for t in range(self.n_targets(i)) if i + t in wanted]
            if blocks:
                out[i * F_:(i + 1) * F_] = self.decoder(i)[:, blocks].float().sum(1)
        return out

    @torch.no_grad()
    def decoder_norms_by_output(self) -> torch.Tensor:
        """Norm of each latent's decoder block to each layer, float32 ``[L * F, L]`` (zero below its own layer)."""
        F_, L = self.d_sae_per_layer, self.n_layers
        out = torch.zeros(L * F_, L, device=self.b_dec.device)
        for i in range(L):
            T = self.n_targets(i)
            out[i * F_:(i + 1) * F_, i:i + T] = self.decoder(i).float().norm(dim=-1)
        return out

    @property
    def threshold_values(self) -> torch.Tensor:
        """``jumprelu``: per-latent thresholds ``[L, F]``."""
        return self.log_threshold.exp()

    # -- encoding ------------------------------------------------------------------------------------

    def _layer_major(self, x: torch.Tensor, n: int, d: int, what: str) -> torch.Tensor:
        if x.dim() == 2 and n == 1:
            x = x[:, None, :]
        if x.dim() != 3 or x.shape[1] != n or x.shape[2] != d:
            raise ValueError(f"{what} must have shape [batch, {n}, {d}], got {list(x.shape)}")
        return x.transpose(0, 1).contiguous()

    def _preacts(self, xl: torch.Tensor) -> torch.Tensor:
        """Pre-activations ``[L, batch, F]`` from layer-major inputs ``[L, batch, d_in]``."""
        return torch.baddbmm(self.b_enc.unsqueeze(1), xl, self.W_enc)

    def _layer_preacts(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations ``[batch, F]`` of layer ``i`` from its input ``[batch, d_in]``."""
        return torch.addmm(self.b_enc[i], x, self.W_enc[i])

    def _split(self, rows: torch.Tensor, gcols: torch.Tensor, vals: torch.Tensor,
               batch: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Entries with global latent indices as per-layer ``(rows, cols, vals)``, each row-major."""
        F_, L = self.d_sae_per_layer, self.n_layers
        layer = torch.div(gcols, F_, rounding_mode="floor")
        order = torch.sort(layer * batch + rows, stable=True).indices
        counts = torch.bincount(layer, minlength=L).tolist()
        rows, gcols, vals, layer = rows[order], gcols[order], vals[order], layer[order]
        cols = gcols - layer * F_
        return list(zip(rows.split(counts), cols.split(counts), vals.split(counts), strict=True))

    def _select(self, pre: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | None]]:
        """TopK family: active entries per layer, ``(rows, cols, pre[rows, cols], k)`` from detached
        pre-activations ``[L, batch, F]`` (``k`` set when every row holds exactly ``k``)."""
        act, k = self.options.activation, self.options.k
        L, B, F_ = pre.shape
        if act == "topk":
            vals, idx = pre.topk(k, dim=2, sorted=False)
            rows = torch.arange(B, device=pre.device).repeat_interleave(k)
            return [(rows, idx[i].reshape(-1), vals[i].reshape(-1), k) for i in range(L)]
        if act == "topk_across_layers":
            flat = pre.permute(1, 0, 2).reshape(B, L * F_)
            vals, idx = flat.topk(k, dim=1, sorted=False)
            rows = torch.arange(B, device=pre.device).repeat_interleave(k)
            return [(r, c, v, None) for r, c, v in self._split(rows, idx.reshape(-1), vals.reshape(-1), B)]
        return [self._select_layer(pre[i], i) for i in range(L)]  # batchtopk

    def _select_layer(self, pre: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | None]:
        """``topk`` or ``batchtopk``: the active entries of layer ``i`` alone, as :meth:`_select`, from its
        detached pre-activations ``[batch, F]``."""
        k = self.options.k
        B, F_ = pre.shape
        if self.options.activation == "topk":
            vals, idx = pre.topk(k, dim=1, sorted=False)
            return torch.arange(B, device=pre.device).repeat_interleave(k), idx.reshape(-1), vals.reshape(-1), k
        if self.training or float(self.threshold[i]) < 0:
            n = min(B * F_, k * B)
            vals, flat = pre.reshape(-1).topk(n, sorted=False)
            keep = vals > 0
            flat, order = flat[keep].sort()
            return torch.div(flat, F_, rounding_mode="floor"), flat % F_, vals[keep][order], None
        rows, cols = (pre > self.threshold[i]).nonzero(as_tuple=True)
        return rows, cols, pre[rows, cols], None

    def _layer_code(self, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
                    selected: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | None]) -> SparseCodes:
        """One layer's codes with differentiable ReLU'd values (sparse encoder backward) from its input
        ``x [batch, d_in]``, its encoder and the selected ``(rows, cols, pre[rows, cols], k)``."""
        rows, cols, vals, k = selected
        c = SparseCodes(rows, cols, None, x.shape[0], self.d_sae_per_layer, k)
        c.values = F.relu(selected_preacts(x, W_enc, b_enc, c, vals))
        return c

    def _codes(self, xl: torch.Tensor, selected: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | None]],
               batch: int) -> list[SparseCodes]:
        """Per-layer codes with differentiable ReLU'd values (sparse encoder backward)."""
        W_enc, b_enc = self.W_enc.unbind(0), self.b_enc.unbind(0)
        return [self._layer_code(xl[i], W_enc[i], b_enc[i], sel) for i, sel in enumerate(selected)]

    def _encode_layer(self, i: int, x: torch.Tensor) -> SparseCodes:
        """Codes of layer ``i`` from its input ``x [batch, d_in]`` alone (every activation but
        ``topk_across_layers``, whose selection reads all layers): the layer's share of :meth:`encode`."""
        pre = self._layer_preacts(i, x)
        act = self.options.activation
        if act in TOPK_FAMILY:
            return self._layer_code(x, self.W_enc[i], self.b_enc[i], self._select_layer(pre.detach(), i))
        z = F.relu(pre) if act == "relu" else jumprelu(pre, self.threshold_values[i], self.options.bandwidth)
        rows, cols = z.nonzero(as_tuple=True)
        return SparseCodes(rows, cols, z[rows, cols], x.shape[0], self.d_sae_per_layer)

    def _dense_latents(self, pre: torch.Tensor) -> torch.Tensor:
        """ReLU / JumpReLU latents ``[batch, L, F]`` (differentiable) from pre-activations ``[L, batch, F]``."""
        pre = pre.transpose(0, 1)
        if self.options.activation == "relu":
            return F.relu(pre)
        return jumprelu(pre, self.threshold_values, self.options.bandwidth)

    def _encode(self, xl: torch.Tensor) -> tuple[torch.Tensor | None, list[SparseCodes] | None, torch.Tensor]:
        """``(dense latents [batch, L, F] or None, per-layer codes or None, detached pre [L, batch, F])``."""
        if self.options.activation in TOPK_FAMILY:
            with torch.no_grad():
                pre = self._preacts(xl)
            return None, self._codes(xl, self._select(pre), xl.shape[1]), pre
        pre = self._preacts(xl)
        return self._dense_latents(pre), None, pre.detach()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents ``[batch, L * F]`` for inputs ``[batch, L, d_in]``."""
        xl = self._layer_major(x, self.n_layers, self.sites.d_in, "input")
        z, codes, _ = self._encode(xl)
        if z is None:
            assert codes is not None
            z = torch.stack([c.dense() for c in codes], dim=1)
        return z.reshape(x.shape[0], self.d_sae)

    # -- decoding ------------------------------------------------------------------------------------

    def decode_sparse(self, codes: list[SparseCodes]) -> torch.Tensor:
        """``[batch, L, d_out]`` (no bias) from per-layer codes: each source layer's active decoder rows
        are gathered and summed into its targets (cost proportional to active (latent, target) pairs)."""
        out = self.b_dec.new_zeros(codes[0].batch, self.n_layers, self.sites.d_out)
        for i, c in enumerate(codes):
            if c.rows.numel():
                out[:, i:i + self.n_targets(i)] += self._decode_source(i, c, sparse=True)
        return out

    def _decode_source(self, i: int, c: SparseCodes, sparse: bool) -> torch.Tensor:
        """``[batch, n_targets(i), d_out]`` what source layer ``i``'s codes write to its target layers (no
        bias): the decoder rows of its active latents summed (``sparse``), or a dense matmul."""
        W = self.decoder(i).reshape(self.d_sae_per_layer, -1)
        out = c.decode(W) if sparse else c.dense() @ W
        return out.view(c.batch, self.n_targets(i), self.sites.d_out)

    def decode_dense(self, z: torch.Tensor) -> torch.Tensor:
        """``[batch, L, d_out]`` (no bias) from dense latents ``[batch, L, F]``: a matmul per source layer."""
        L, F_, d = self.n_layers, self.d_sae_per_layer, self.sites.d_out
        out = z.new_zeros(z.shape[0], L, d)
        for i in range(L):
            t = self.n_targets(i)
            out[:, i:i + t] += (z[:, i] @ self.decoder(i).reshape(F_, -1)).view(-1, t, d)
        return out

    def _decode(self, z: torch.Tensor | None, codes: list[SparseCodes] | None,
                support: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction without bias through the sparse or the dense path (see ``decode``). Dense latents
        ``z [batch, L, F]`` are gathered on ``support`` (default ``z != 0``): the entries whose gradient
        matters (JumpReLU adds the inactive ones within the threshold kernel)."""
        o = self.options
        if codes is not None:
            nnz = sum(int(c.rows.numel()) for c in codes)
            if use_sparse_decode(o.decode, o.sparse_max_density, nnz, codes[0].batch * self.d_sae):
                return self.decode_sparse(codes)
            return self.decode_dense(torch.stack([c.dense() for c in codes], dim=1))
        assert z is not None
        if support is None:
            support = z.detach() != 0
        if not use_sparse_decode(o.decode, o.sparse_max_density, int(support.sum()), z.shape[0] * self.d_sae):
            return self.decode_dense(z)
        codes = []
        for i in range(self.n_layers):
            zi = z[:, i]
            rows, cols = support[:, i].nonzero(as_tuple=True)
            codes.append(SparseCodes(rows, cols, zi[rows, cols], z.shape[0], self.d_sae_per_layer))
        return self.decode_sparse(codes)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[batch, L, d_out]`` from latents ``[batch, L * F]`` (bias, no skip path)."""
        z = latents.reshape(latents.shape[0], self.n_layers, self.d_sae_per_layer)
        return self._decode(z, None) + self.b_dec

    def layer_replacement(self, inputs: torch.Tensor, targets: torch.Tensor | None = None) -> LayerReplacement:
        """A closed-loop pass that encodes each layer once (:class:`LayerTranscoderReplacement`)."""
        return LayerTranscoderReplacement(self, inputs, targets)

    # -- forward and losses --------------------------------------------------------------------------

    def _sparse_latents(self, codes: list[SparseCodes], batch: int) -> SparseLatents:
        F_ = self.d_sae_per_layer
        rows = torch.cat([c.rows for c in codes])
        cols = torch.cat([c.cols + i * F_ for i, c in enumerate(codes)])
        vals = torch.cat([c.values.detach() for c in codes])
        order = torch.sort(rows, stable=True).indices
        return SparseLatents(rows[order], cols[order], vals[order], batch, self.d_sae)

    def _reduce_layers(self, per_layer: torch.Tensor) -> torch.Tensor:
        """``[batch, L]`` -> scalar: summed or averaged over layers (``loss_reduction``), averaged over rows."""
        return (per_layer.sum(-1) if self.options.loss_reduction == "sum" else per_layer.mean(-1)).mean()

    def penalty_scale(self) -> float:
        """Current fraction of ``l0_coefficient`` (linear warm-up)."""
        warm = self.options.l0_warmup_steps
        return 1.0 if warm == 0 else min(1.0, (int(self.steps) + 1) / warm)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None,
                dead_mask: torch.Tensor | None = None) -> DictionaryOutput:
        """Encode, decode (sparse or dense path), and with ``target`` the losses ``mse``, ``sparsity``
        (ReLU/JumpReLU) and ``auxk`` (TopK family, when ``dead_mask`` is given). Without ``target``
        (inference) the output has no losses."""
        L = self.n_layers
        xl = self._layer_major(x, L, self.sites.d_in, "input")
        batch = xl.shape[1]
        z, codes, pre = self._encode(xl)
        if codes is not None and self.training and self.options.activation == "batchtopk":
            self._observe(codes)
        support = None
        if z is not None and self.options.activation == "jumprelu" and self.training:
            near = (pre.transpose(0, 1) - self.threshold_values.detach()).abs() < self.options.bandwidth / 2
            support = (z.detach() != 0) | near
        recon = self._decode(z, codes, support) + self.b_dec
        if self.options.skip_connection:
            recon = recon + torch.bmm(xl, self.W_skip).transpose(0, 1)
        if codes is not None:
            out = DictionaryOutput(recon, sparse_latents=self._sparse_latents(codes, batch))
        else:
            assert z is not None
            out = DictionaryOutput(recon, z.detach().reshape(batch, self.d_sae))
        if target is None:
            return out
        y = self._layer_major(target, L, self.sites.d_out, "target").transpose(0, 1)
        losses = {"mse": self._reduce_layers((recon - y).pow(2).sum(-1))}
        if z is not None:
            weighted = z * self.decoder_norms()
            tanh = torch.tanh(self.options.tanh_scale * weighted).sum(-1)
            losses["sparsity"] = self.options.l0_coefficient * self.penalty_scale() * self._reduce_layers(tanh)
        elif dead_mask is not None and self.options.auxk_alpha > 0:
            losses["auxk"] = self._auxk(xl, pre, dead_mask.to(pre.device, torch.bool), y, recon)
        out.losses = losses
        return out

    def _auxk(self, xl: torch.Tensor, pre: torch.Tensor, dead_mask: torch.Tensor, y: torch.Tensor,
              recon: torch.Tensor) -> torch.Tensor:
        """AuxK (OpenAI, as the ``topk`` architecture's): the ``auxk_k`` largest pre-activations per token
        among dead latents of every layer, decoded to their target layers, reconstruct the detached
        residual; normalised by the residual's variance times the target's, scaled by
        ``min(n_dead / auxk_k, 1)`` and ``auxk_alpha`` (and by 1/L under ``loss_reduction="mean"``).
        Costs one ``[batch, n_dead]`` gather and the decode of ``auxk_k`` latents per token, through the
        path ``decode`` picks for that density (at the default ``auxk_k`` it is often past
        ``sparse_max_density``: dense)."""
        dead = dead_mask.nonzero().squeeze(1)
        n_dead = int(dead.numel())
        if n_dead == 0:
            return pre.new_zeros(())
        L, B = self.n_layers, xl.shape[1]
        k_aux = self.options.auxk_k or max(1, L * self.sites.d_out // 2)
        k = min(k_aux, n_dead)
        with torch.no_grad():
            pre_dead = pre.permute(1, 0, 2).reshape(B, self.d_sae).index_select(1, dead)
            vals, idx = pre_dead.topk(k, dim=1, sorted=False)
            rows = torch.arange(B, device=pre.device).repeat_interleave(k)
            split = self._split(rows, dead[idx].reshape(-1), vals.reshape(-1), B)
        codes = self._codes(xl, [(r, c, v, None) for r, c, v in split], B)
        e_hat = self._decode(None, codes)
        residual = (y - recon).detach()
        aux = (e_hat - residual).pow(2).sum((1, 2)).mean()
        resid_var = (residual - residual.mean(0)).pow(2).sum((1, 2)).mean().clamp_min(1e-12)
        target_var = (y - y.mean(0)).pow(2).sum((1, 2)).mean()
        per_layer = 1.0 if self.options.loss_reduction == "sum" else 1.0 / L
        return self.options.auxk_alpha * min(n_dead / k_aux, 1.0) * per_layer * aux * (target_var / resid_var)

    @torch.no_grad()
    def _observe(self, codes: list[SparseCodes]) -> None:
        """BatchTopK: update each layer's running inference threshold with its smallest kept activation."""
        step = int(self.threshold_updates) + 1
        weight = max(1.0 / step, self.options.threshold_momentum)
        for i, c in enumerate(codes):
            if c.values.numel() == 0:
                continue
            smallest = c.values.detach().min()
            if step == 1 or float(self.threshold[i]) < 0:
                self.threshold[i] = smallest
            else:
                self.threshold[i] = (1 - weight) * self.threshold[i] + weight * smallest
        self.threshold_updates.add_(1)

    # -- training hooks ------------------------------------------------------------------------------

    @torch.no_grad()
    def initialize_from_data(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """Set each layer's ``b_dec`` from a sample of its targets (``b_dec_init``: geometric median,
        mean or zeros)."""
        y = self._layer_major(target, self.n_layers, self.sites.d_out, "target").float()
        for j in range(self.n_layers):
            how = self.options.b_dec_init
            value = (geometric_median(y[j]) if how == "geometric_median" else y[j].mean(0) if how == "mean"
                     else torch.zeros_like(self.b_dec[j]))
            self.b_dec[j].copy_(value)

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """TopK family: remove from each decoder gradient the part parallel to the latent's (unit-norm)
        concatenated decoder row."""
        if not self.unit_norm_decoder:
            return
        F_ = self.d_sae_per_layer
        for i in range(self.n_layers):
            W = self.decoder(i)
            if W.grad is None:
                continue
            rows = F.normalize(W.reshape(F_, -1), dim=1)
            grad = W.grad.reshape(F_, -1)
            grad.sub_((grad * rows).sum(1, keepdim=True) * rows)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """TopK family: renormalise each latent's concatenated decoder row; count steps (penalty warm-up)."""
        if self.unit_norm_decoder:
            F_ = self.d_sae_per_layer
            for i in range(self.n_layers):
                W = self.decoder(i).data.reshape(F_, -1)
                W.div_(W.norm(dim=1, keepdim=True).clamp_min(1e-8))
        self.steps.add_(1)

    def synchronize(self, all_reduce_mean: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Average BatchTopK's per-layer inference thresholds across data-parallel ranks."""
        if self.options.activation == "batchtopk":
            self.threshold.copy_(all_reduce_mean(self.threshold.clone()))

    @torch.no_grad()
    def fold_scaling(self, input_scales: torch.Tensor, output_scales: torch.Tensor) -> None:
        """Make the module map raw inputs to raw outputs after training on ``x_i * input_scales[i]`` ->
        ``y_j * output_scales[j]``: ``W_enc[i]`` absorbs ``input_scales[i]``, every decoder block to layer
        ``j`` and ``b_dec[j]`` absorb ``1 / output_scales[j]``, ``W_skip[j]`` both. Latents (hence
        thresholds and k) are unchanged; decoder rows are no longer unit-norm."""
        s_in = site_scales(input_scales, self.n_layers, "input_scales")
        s_out = site_scales(output_scales, self.n_layers, "output_scales")
        for i, s in enumerate(s_in):
            self.W_enc[i].mul_(s)
        for i in range(self.n_layers):
            W = self.decoder(i)
            for t in range(self.n_targets(i)):
                W[:, t].div_(s_out[i + t])
        for j, s in enumerate(s_out):
            self.b_dec[j].div_(s)
            if self.options.skip_connection:
                self.W_skip[j].mul_(s_in[j] / s)
        self.extra_config["scaling_folded"] = {"input_scales": s_in, "output_scales": s_out}

    def config(self) -> dict[str, object]:
        """Architecture name, sites, options, ``d_sae`` (``L * F``), ``n_layers`` and metadata, as JSON data."""
        cfg = super().config()
        cfg["d_sae"] = self.d_sae
        cfg["n_layers"] = self.n_layers
        if self.extra_config:
            cfg["metadata"] = dict(self.extra_config)
        return cfg


class LayerTranscoderReplacement(LayerReplacement):
    """Closed-loop pass of a :class:`LayerTranscoder` at the cost of about one forward: when output site
    ``j`` is written, the layers read since the last write are encoded once and what their decoders write
    is added to every target layer (``pending``); layer ``j``'s reconstruction is what has been added to it,
    plus its bias and skip path. TopK across layers chooses each token's latents over all layers'
    pre-activations (kept per layer, recomputed when a layer is read; layers not read yet: from their
    clean inputs), so there every write selects again and decodes block ``i -> j`` of each layer ``i <= j``.
    Gives the outputs of the generic pass, which runs the whole dictionary at every output site."""

    module: LayerTranscoder

    def __init__(self, module: LayerTranscoder, inputs: torch.Tensor, targets: torch.Tensor | None = None):
        super().__init__(module, inputs, targets)
        self.codes: list[SparseCodes] = []
        """Codes of layers ``0..len(codes) - 1``, encoded from the inputs they read in this forward."""
        self.pending = inputs.new_zeros(inputs.shape[0], module.n_layers, module.sites.d_out)
        """``[N, L, d_out]`` what the encoded layers' decoders write to each layer (no bias)."""
        coupled = module.options.activation == "topk_across_layers"
        self.pre = module._preacts(self.inputs.transpose(0, 1).contiguous()) if coupled else None
        """``[L, N, F]`` every layer's pre-activations (TopK across layers only)."""

    def read(self, i: int, x: torch.Tensor) -> None:
        super().read(i, x)
        if self.pre is not None:
            self.pre[i] = self.module._layer_preacts(i, x)

    def write(self, j: int) -> torch.Tensor:
        m, N = self.module, self.inputs.shape[0]
        o = m.options
        if self.pre is not None:
            self.codes = m._codes(self.inputs.transpose(0, 1).contiguous(), m._select(self.pre), N)
            y = torch.zeros_like(self.pending[:, j])
            for i in range(j + 1):
                if j - i < m.n_targets(i) and self.codes[i].rows.numel():
                    y += self.codes[i].decode(m.decoder(i)[:, j - i])
        else:
            for i in range(len(self.codes), j + 1):
                c = m._encode_layer(i, self.inputs[:, i])
                self.codes.append(c)
                if c.rows.numel():
                    sparse = use_sparse_decode(o.decode, o.sparse_max_density, c.rows.numel(), N * m.d_sae_per_layer)
                    self.pending[:, i:i + m.n_targets(i)] += m._decode_source(i, c, sparse)
            y = self.pending[:, j]
        y = y + m.b_dec[j]
        if o.skip_connection:
            y = y + self.inputs[:, j] @ m.W_skip[j]
        return y

    def latents(self) -> torch.Tensor:
        if len(self.codes) < self.module.n_layers:
            raise RuntimeError("latents are known after the last output site is written")
        return torch.cat([c.dense() for c in self.codes], dim=1)
