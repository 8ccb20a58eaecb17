"""Model diffing with a crosscoder: which latents belong to model A, to model B, or to both.

A crosscoder over two models (or two groups of sites) has one decoder per site for every latent. This module
reads them through the :class:`~saelab.SparseDictionary` interface only (:meth:`decoder_directions`,
:meth:`encode`, :meth:`decode`, ``sites``, ``extra_config``) and computes, per latent:

* the decoder norm per site ``[F, H]``, in **training units**: a saved dictionary has its normalisation folded
  into the weights (site ``h``'s decoder divided by ``output_scales[h]``), so each site's raw norm is multiplied
  back by ``extra_config["scaling_folded"]["output_scales"][h]`` when that record is present. Norms of the two
  models are then comparable even when their activations have different scales;
* the relative decoder norm ``||d_B|| / (||d_A|| + ||d_B||)`` (Anthropic's crosscoder model diffing) for two
  disjoint groups of sites ``A`` and ``B`` (a model may own several sites: ``||d_A||`` is the norm of the
  concatenation of its sites' decoders), NaN where both are zero;
* the cosine between the A and B decoders (the concatenations, with the sites of the two groups paired in
  the order given; the groups must have the same number of sites), NaN where either is zero;
* the class: ``a_only`` (relative norm < :data:`A_ONLY_BELOW`), ``b_only`` (> :data:`B_ONLY_ABOVE`), ``shared``
  (in [:data:`SHARED_LOW`, :data:`SHARED_HIGH`]), ``other`` (the rest, and NaN);
* **latent scaling** (Minder et al. 2025, "Overcoming sparsity artifacts in crosscoders to interpret
  chat-tuning"): the closed-form least-squares scale ``beta_i = d_i^T sum_n f_ni y_n / (||d_i||^2 sum_n f_ni^2)``
  of each latent against each model's reconstruction and error, from one streaming pass over activations.

Latent scaling follows the paper's code (science-of-finetuning): the direction ``d_i`` is the decoder of the
model the latent leans to (its "own" model: B when the relative norm is >= 0.5, else A; for the paper's
chat-only latents that is the chat decoder) and is used for **both** models' fits. The targets, for model
``m`` with data ``x_m``, reconstruction ``x̂_m = decode(encode(x))_m`` (decoder bias included) and latent
``i``'s own decoder in that model ``d_i^m``:

* error: ``x_m - x̂_m + f_i d_i^m`` (the model's reconstruction error with latent ``i``'s own contribution
  added back: what the latent could explain if it were free to);
* reconstruction: ``x̂_m``.

The ratios ``nu_error = beta_error[other] / beta_error[own]`` and ``nu_reconstruction =
beta_reconstruction[other] / beta_reconstruction[own]`` are near 0 for a latent that is truly specific to its
own model and near 1 when the other model carries the same direction: a high ``nu_error`` means the other
model's error still holds the latent (Complete Shrinkage: the L1 penalty zeroed a decoder the other model
needed); a high ``nu_reconstruction`` means other latents rebuild it there (Latent Decoupling). Betas are
fitted in training units, as the norms.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import UsageError
from .interfaces import SparseDictionary

LatentClass = Literal["a_only", "b_only", "shared", "other"]
"""Diffing class of a latent, from its relative decoder norm."""

CLASSES: tuple[LatentClass, ...] = ("a_only", "b_only", "shared", "other")
"""Every class, in report order."""

A_ONLY_BELOW = 0.1
"""A latent whose relative norm is below this (strictly) is ``a_only``."""
B_ONLY_ABOVE = 0.9
"""A latent whose relative norm is above this (strictly) is ``b_only``."""
SHARED_LOW = 0.4
"""Lower bound (inclusive) of the ``shared`` class."""
SHARED_HIGH = 0.6
"""Upper bound (inclusive) of the ``shared`` class."""

ARTIFACT_NU_THRESHOLD = 0.3
"""A model-specific latent (``a_only`` / ``b_only``) is flagged as a likely training artifact when its
``nu_error`` or its ``nu_reconstruction`` exceeds this. The paper separates the two clusters of the
``(nu_error, nu_reconstruction)`` plane (truly specific latents near 0, shared concepts near 1) without a fixed
cut; 0.3 is our choice: a concept the other model carries at a third of its strength or more is flagged."""

DEFAULT_BINS = 50
"""Bins of the relative-norm histogram over [0, 1]."""


# --------------------------------------------------------------------------------------------------
# Decoder geometry


def output_scales(dictionary: SparseDictionary) -> torch.Tensor:
    """Float32 ``[H]``: the output normalisation scale of each site that was folded into the saved decoders
    (``extra_config["scaling_folded"]["output_scales"]``), ones when none was folded."""
    n = len(dictionary.sites.outputs)
    folded = dictionary.extra_config.get("scaling_folded")
    scales = folded.get("output_scales") if isinstance(folded, dict) else None
    if scales is None:
        return torch.ones(n)
    if not isinstance(scales, (list, tuple)) or len(scales) != n:
        raise UsageError(f"extra_config['scaling_folded']['output_scales'] = {scales!r} does not hold one "
                         f"scale per output site ({n})")
    return torch.tensor([float(s) for s in scales], dtype=torch.float32)


def site_decoders(dictionary: SparseDictionary) -> torch.Tensor:
    """Float32 ``[F, H, d]``: each latent's decoder to each output site in training units (the saved decoder
    times the site's folded output scale, see :func:`output_scales`), detached, on the dictionary's device."""
    weight = dictionary.decoder_directions()
    n, d = len(dictionary.sites.outputs), dictionary.sites.d_out
    if weight is None or weight.dim() != 2 or weight.shape[-1] != n * d:
        shape = None if weight is None else tuple(weight.shape)
        raise UsageError(f"architecture {dictionary.name!r} has no decoder matrix [d_sae, {n} * {d}] to diff "
                         f"(decoder_directions() gave {shape}); model diffing needs a crosscoder")
    blocks = weight.detach().float().reshape(-1, n, d)
    return blocks * output_scales(dictionary).to(blocks.device)[None, :, None]


def site_decoder_norms(dictionary: SparseDictionary) -> torch.Tensor:
    """Float32 ``[F, H]``: norm of each latent's decoder to each output site, in training units."""
    return site_decoders(dictionary).norm(dim=-1)


def check_groups(n_sites: int, a_sites: Sequence[int], b_sites: Sequence[int], *, paired: bool = False) -> None:
    """One-line :class:`~saelab.UsageError` unless ``a_sites`` and ``b_sites`` are non-empty, disjoint lists of
    site indices in ``[0, n_sites)`` without repeats (and, with ``paired``, of the same length)."""
    for label, group in (("A", a_sites), ("B", b_sites)):
        if not group or len(set(group)) != len(group) or any(not 0 <= int(h) < n_sites for h in group):
            raise UsageError(f"site group {label} = {list(group)} is not a non-empty list of distinct site "
                             f"indices in 0..{n_sites - 1}")
    if set(a_sites) & set(b_sites):
        raise UsageError(f"site groups A = {list(a_sites)} and B = {list(b_sites)} overlap; they must be disjoint")
    if paired and len(a_sites) != len(b_sites):
        raise UsageError(f"site groups A = {list(a_sites)} and B = {list(b_sites)} must have the same number of "
                         f"sites (paired in order) for decoder cosines and latent scaling")


def group_norms(norms: torch.Tensor, sites: Sequence[int]) -> torch.Tensor:
    """``[F]``: norm of the concatenation of each latent's decoders to ``sites``, from per-site norms
    ``[F, H]``."""
    return norms[:, list(sites)].pow(2).sum(-1).sqrt()


def relative_decoder_norm(norms: torch.Tensor, a_sites: Sequence[int], b_sites: Sequence[int]) -> torch.Tensor:
    """Float64 ``[F]``: ``||d_B|| / (||d_A|| + ||d_B||)`` from per-site norms ``[F, H]`` (0: only A, 1: only
    B); NaN where both are zero. Float64, so that a ratio that is exactly a class bound lands on it."""
    check_groups(norms.shape[-1], a_sites, b_sites)
    norms = norms.double()
    a, b = group_norms(norms, a_sites), group_norms(norms, b_sites)
    total = a + b
    return torch.where(total > 0, b / total.clamp_min(torch.finfo(total.dtype).tiny), torch.nan)


def decoder_cosines(decoders: torch.Tensor, a_sites: Sequence[int], b_sites: Sequence[int]) -> torch.Tensor:
    """``[F]``: cosine between each latent's A and B decoders from ``[F, H, d]`` decoders (the concatenations
    over the sites of each group, paired in the order given); NaN where either is zero."""
    check_groups(decoders.shape[1], a_sites, b_sites, paired=True)
    a, b = decoders[:, list(a_sites)].flatten(1), decoders[:, list(b_sites)].flatten(1)
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    ok = (na > 0) & (nb > 0)
    cos = (a * b).sum(-1) / (na * nb).clamp_min(torch.finfo(a.dtype).tiny)
    return torch.where(ok, cos, torch.nan)


def classify(relative: torch.Tensor) -> list[LatentClass]:
    """The class of each latent from its relative norm (see the module constants); NaN is ``other``."""
    out: list[LatentClass] = []
    for r in relative.tolist():
        if r < A_ONLY_BELOW:
            out.append("a_only")
        elif r > B_ONLY_ABOVE:
            out.append("b_only")
        elif SHARED_LOW <= r <= SHARED_HIGH:
            out.append("shared")
        else:
            out.append("other")
    return out


def class_counts(classes: Sequence[LatentClass]) -> dict[LatentClass, int]:
    """Number of latents in each class (every class present, in :data:`CLASSES` order)."""
    counts: dict[LatentClass, int] = dict.fromkeys(CLASSES, 0)
    for c in classes:
        counts[c] += 1
    return counts


@dataclass(frozen=True)
class Histogram:
    """Counts of relative norms in equal bins over [0, 1] (the last bin includes 1)."""

    edges: list[float]
    """``bins + 1`` bin edges, from 0 to 1."""
    counts: list[int]
    """Latents per bin."""
    undefined: int
    """Latents left out: NaN relative norm (zero decoder in both groups)."""


def relative_norm_histogram(relative: torch.Tensor, bins: int = DEFAULT_BINS) -> Histogram:
    """Histogram of relative norms ``[F]`` in ``bins`` equal bins over [0, 1]."""
    if bins < 1:
        raise UsageError(f"histogram bins = {bins} is not a positive integer")
    finite = relative[torch.isfinite(relative)].double().clamp(0.0, 1.0)
    index = (finite * bins).floor().long().clamp_max(bins - 1)
    counts = torch.bincount(index, minlength=bins)
    return Histogram(edges=[i / bins for i in range(bins + 1)], counts=[int(c) for c in counts.tolist()],
                     undefined=int(relative.numel() - finite.numel()))


@dataclass(frozen=True)
class DecoderDiff:
    """The decoder-only diffing analysis of one crosscoder (see :func:`decoder_diff`)."""

    a_sites: list[int]
    """Site indices of model A."""
    b_sites: list[int]
    """Site indices of model B."""
    norms: torch.Tensor
    """Float32 ``[F, H]``: decoder norm per site, training units."""
    relative: torch.Tensor
    """Float64 ``[F]``: ``||d_B|| / (||d_A|| + ||d_B||)``; NaN where both are zero."""
    cosine: torch.Tensor | None
    """Float32 ``[F]``: cosine between the A and B decoders (NaN where either is zero); None when the groups
    have different numbers of sites."""
    classes: list[LatentClass]
    """Class of each latent."""
    counts: dict[LatentClass, int]
    """Latents per class."""
    histogram: Histogram
    """Histogram of :attr:`relative`."""

    def latents_of(self, cls: LatentClass) -> list[int]:
        """Indices of the latents of class ``cls``."""
        if cls not in CLASSES:
            raise UsageError(f"diffing class {cls!r} is not one of {', '.join(CLASSES)}")
        return [i for i, c in enumerate(self.classes) if c == cls]


def decoder_diff(dictionary: SparseDictionary, a_sites: Sequence[int], b_sites: Sequence[int],
                 bins: int = DEFAULT_BINS) -> DecoderDiff:
    """Per-site norms, relative norms, cosines, classes and the relative-norm histogram of ``dictionary``'s
    latents between the site groups ``a_sites`` (model A) and ``b_sites`` (model B)."""
    decoders = site_decoders(dictionary)
    n_sites = decoders.shape[1]
    check_groups(n_sites, a_sites, b_sites)
    norms = decoders.norm(dim=-1).cpu()
    relative = relative_decoder_norm(norms, a_sites, b_sites)
    cosine = decoder_cosines(decoders, a_sites, b_sites).cpu() if len(a_sites) == len(b_sites) else None
    classes = classify(relative)
    return DecoderDiff(a_sites=[int(h) for h in a_sites], b_sites=[int(h) for h in b_sites], norms=norms,
                       relative=relative, cosine=cosine, classes=classes, counts=class_counts(classes),
                       histogram=relative_norm_histogram(relative, bins))


# --------------------------------------------------------------------------------------------------
# Latent scaling


@dataclass(frozen=True)
class LatentScaling:
    """Closed-form latent scaling of the latents ``latents`` (see the module docstring). Tensors are float64
    ``[len(latents)]`` on the CPU; a beta is NaN for a latent that never fired (or has a zero direction)."""

    latents: list[int]
    """Latent indices analysed, in order."""
    own_is_b: torch.Tensor
    """Bool: the direction used is the latent's B decoder (relative norm >= 0.5), else its A decoder."""
    beta_error_a: torch.Tensor
    """Beta fitted on model A's error (with the latent's own A contribution added back)."""
    beta_error_b: torch.Tensor
    """Beta fitted on model B's error (with the latent's own B contribution added back)."""
    beta_reconstruction_a: torch.Tensor
    """Beta fitted on model A's reconstruction."""
    beta_reconstruction_b: torch.Tensor
    """Beta fitted on model B's reconstruction."""
    nu_error: torch.Tensor
    """``beta_error[other] / beta_error[own]``: near 0 when the other model's error lacks the latent."""
    nu_reconstruction: torch.Tensor
    """``beta_reconstruction[other] / beta_reconstruction[own]``: near 0 when other latents do not rebuild
    it in the other model."""
    active: torch.Tensor
    """Int64: rows on which the latent fired."""
    classes: list[LatentClass]
    """The latents' diffing classes (from the relative decoder norm)."""
    artifact: torch.Tensor
    """Bool: the latent is ``a_only`` or ``b_only`` and ``nu_error`` or ``nu_reconstruction`` exceeds
    :attr:`threshold`: its model-specific class looks like a training artifact."""
    threshold: float
    """The ratio threshold used for :attr:`artifact` (default :data:`ARTIFACT_NU_THRESHOLD`)."""
    rows: int
    """Activation rows seen."""


class LatentScalingAccumulator:
    """Streams activation batches ``[B, H, d]`` (raw units, what the dictionary encodes) through the
    dictionary and accumulates, per latent, the sums the closed-form betas need: O(B * F) memory per batch
    and site (the ``[B, F]`` projections of each target on the latents' directions), never ``[N, F, d]``.

    Per model ``m`` and latent ``i`` with direction ``D_i`` (training units): ``sum_n f_ni D_i.(x_m - x̂_m)``,
    ``sum_n f_ni D_i.x̂_m``, ``sum_n f_ni^2`` and the fire count; the error target's added-back term is
    ``(D_i.d_i^m) sum_n f_ni^2``, applied in :meth:`result`."""

    def __init__(self, dictionary: SparseDictionary, a_sites: Sequence[int], b_sites: Sequence[int],
                 latents: Sequence[int] | None = None):
        decoders = site_decoders(dictionary)
        n_sites, d_sae = decoders.shape[1], decoders.shape[0]
        check_groups(n_sites, a_sites, b_sites, paired=True)
        if dictionary.sites.inputs != dictionary.sites.outputs:
            raise UsageError(f"latent scaling needs an autoencoder (inputs == outputs); got inputs "
                             f"{dictionary.sites.inputs} and outputs {dictionary.sites.outputs}")
        idx = list(range(d_sae)) if latents is None else [int(i) for i in latents]
        bad = [i for i in idx if not 0 <= i < d_sae]
        if bad:
            raise UsageError(f"latents {bad[:5]} are out of range; the dictionary has {d_sae} latents")
        self.dictionary = dictionary
        self.a_sites, self.b_sites = [int(h) for h in a_sites], [int(h) for h in b_sites]
        self.latents = idx
        self.device = decoders.device
        self.input_dtype = next((p.dtype for p in dictionary.parameters() if p.is_floating_point()), torch.float32)
        self.dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self.index = torch.tensor(idx, dtype=torch.long, device=self.device)
        norms = decoders.norm(dim=-1)
        relative = relative_decoder_norm(norms, a_sites, b_sites)[self.index]
        self.classes = classify(relative)
        self.own_is_b = torch.nan_to_num(relative, nan=0.0) >= 0.5
        dec = decoders[self.index]
        dec_a, dec_b = dec[:, self.a_sites].flatten(1), dec[:, self.b_sites].flatten(1)
        self.direction = torch.where(self.own_is_b[:, None], dec_b, dec_a)
        self.scales = output_scales(dictionary).to(self.device)
        direction = self.direction.to(self.dtype)
        self.dir_sq = direction.pow(2).sum(-1)
        self.dir_dot = {m: (direction * dec_m.to(self.dtype)).sum(-1) for m, dec_m in (("a", dec_a), ("b", dec_b))}
        n = len(idx)
        self.sum_f2 = torch.zeros(n, dtype=self.dtype, device=self.device)
        self.active = torch.zeros(n, dtype=torch.long, device=self.device)
        self.err = {m: torch.zeros(n, dtype=self.dtype, device=self.device) for m in ("a", "b")}
        self.rec = {m: torch.zeros(n, dtype=self.dtype, device=self.device) for m in ("a", "b")}
        self.rows = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor, latents: torch.Tensor | None = None,
               reconstruction: torch.Tensor | None = None) -> None:
        """Add one batch of activations ``[B, H, d]``; the dictionary's ``latents [B, F]`` and
        ``reconstruction [B, H, d]`` of it when already computed, else the dictionary is run (in eval mode)."""
        sites = self.dictionary.sites
        if x.dim() != 3 or x.shape[1] != len(sites.inputs) or x.shape[2] != sites.d_in:
            raise UsageError(f"activation batch of shape {tuple(x.shape)} is not [batch, {len(sites.inputs)}, "
                             f"{sites.d_in}]")
        x = x.to(self.device, self.input_dtype)
        if latents is None or reconstruction is None:
            was_training = self.dictionary.training
            self.dictionary.eval()
            try:
                f_all = self.dictionary.encode(x)
                recon = self.dictionary.decode(f_all).float()
            finally:
                self.dictionary.train(was_training)
        else:
            f_all, recon = latents.to(self.device), reconstruction.to(self.device).float()
        f = f_all[:, self.index].float()
        scale = self.scales[None, :, None]
        xs, rs = recon * scale, (x - recon) * scale
        direction_t = self.direction.T
        for m, group in (("a", self.a_sites), ("b", self.b_sites)):
            rec_proj = xs[:, group].flatten(1) @ direction_t
            err_proj = rs[:, group].flatten(1) @ direction_t
            self.rec[m] += (f * rec_proj).sum(0, dtype=self.dtype)
            self.err[m] += (f * err_proj).sum(0, dtype=self.dtype)
        self.sum_f2 += f.pow(2).sum(0, dtype=self.dtype)
        self.active += (f != 0).sum(0)
        self.rows += len(x)

    def result(self, threshold: float = ARTIFACT_NU_THRESHOLD) -> LatentScaling:
        """Betas, ratios and artifact flags from what was accumulated."""
        denom = self.dir_sq * self.sum_f2
        ok = denom > 0

        def beta(num: torch.Tensor) -> torch.Tensor:
            safe = denom.clamp_min(torch.finfo(denom.dtype).tiny)
            return torch.where(ok, num / safe, torch.nan).cpu().double()

        err = {m: beta(self.err[m] + self.dir_dot[m] * self.sum_f2) for m in ("a", "b")}
        rec = {m: beta(self.rec[m]) for m in ("a", "b")}
        own_b = self.own_is_b.cpu()

        def ratio(betas: dict[str, torch.Tensor]) -> torch.Tensor:
            own = torch.where(own_b, betas["b"], betas["a"])
            other = torch.where(own_b, betas["a"], betas["b"])
            return torch.where(own != 0, other / own, torch.nan)

        nu_err, nu_rec = ratio(err), ratio(rec)
        specific = torch.tensor([c in ("a_only", "b_only") for c in self.classes], dtype=torch.bool)
        artifact = specific & ((nu_err > threshold) | (nu_rec > threshold))
        return LatentScaling(latents=list(self.latents), own_is_b=own_b, beta_error_a=err["a"],
                             beta_error_b=err["b"], beta_reconstruction_a=rec["a"],
                             beta_reconstruction_b=rec["b"], nu_error=nu_err,
                             nu_reconstruction=nu_rec, active=self.active.cpu(), classes=list(self.classes),
                             artifact=artifact, threshold=float(threshold), rows=self.rows)


def latent_scaling(dictionary: SparseDictionary, batches: Iterable[torch.Tensor], a_sites: Sequence[int],
                   b_sites: Sequence[int], latents: Sequence[int] | None = None,
                   threshold: float = ARTIFACT_NU_THRESHOLD) -> LatentScaling:
    """Closed-form latent scaling of ``latents`` (default all) over activation batches ``[B, H, d]`` in one
    streaming pass (see :class:`LatentScalingAccumulator` and the module docstring)."""
    if not math.isfinite(threshold) or threshold < 0:
        raise UsageError(f"latent-scaling threshold {threshold} is not a finite number >= 0")
    acc = LatentScalingAccumulator(dictionary, a_sites, b_sites, latents)
    for x in batches:
        acc.update(x)
    if acc.rows == 0:
        raise UsageError("latent scaling got no activation batches")
    return acc.result(threshold)


def class_latents(dictionary: SparseDictionary, latent_class: LatentClass,
                  among: Sequence[int] | None = None) -> list[int]:
    """The latents of ``latent_class`` (site 0 as A, site 1 as B) of a dictionary over exactly two sites, in
    index order (only those in ``among`` when given); a one-line error for another number of sites."""
    n_sites = len(dictionary.sites.outputs)
    if n_sites != 2:
        raise UsageError(f"a diffing class needs a dictionary over two sites (A, B); this one writes {n_sites}: "
                         f"{', '.join(dictionary.sites.outputs)}")
    latents = decoder_diff(dictionary, [0], [1]).latents_of(latent_class)
    if among is not None:
        wanted = set(among)
        latents = [i for i in latents if i in wanted]
    return latents


def _finite(values: torch.Tensor) -> list[float | None]:
    """Floats for JSON: NaN and infinities become None."""
    return [v if math.isfinite(v) else None for v in values.double().tolist()]


def diffing_columns(dictionary: SparseDictionary) -> dict[str, list] | None:
    """Per latent ``relative_norm``, ``cosine`` (None when undefined for the groups) and ``class`` (site 0 as A, site 1 as B; :func:`decoder_diff`)
    of a dictionary over exactly two sites that reconstructs what it reads (a crosscoder), as JSON-ready
    lists (non-finite values None); None for other dictionaries and decoders without per-site blocks."""
    outputs = list(dictionary.sites.outputs)
    if len(outputs) != 2 or list(dictionary.sites.inputs) != outputs:
        return None
    try:
        diff = decoder_diff(dictionary, [0], [1])
    except UsageError:
        return None
    return {"relative_norm": _finite(diff.relative), "cosine": None if diff.cosine is None else _finite(diff.cosine),
            "class": list(diff.classes)}


def diffing_report(dictionary: SparseDictionary, a_sites: Sequence[int], b_sites: Sequence[int],
                   scaling: LatentScaling, fired: torch.Tensor,
                   bins: int = DEFAULT_BINS) -> tuple[dict[str, object], dict[str, object]]:
    """JSON data of a two-group diffing: a summary (the sites of each group, class counts over the latents
    that ``fired`` (``[F]`` fire counts) and over all latents, the relative-norm histogram of the fired
    ones, how many fired latents latent scaling flags) and per-latent columns (relative norm, cosine, class,
    fire count, betas, ratios, artifact flag; index = latent). ``scaling`` covers every latent, in order."""
    diff = decoder_diff(dictionary, a_sites, b_sites, bins)
    alive = fired.cpu() > 0
    if scaling.latents != list(range(len(diff.classes))):
        raise UsageError("diffing_report needs latent scaling over every latent, in order")
    hist = relative_norm_histogram(diff.relative[alive], bins)
    sites = dictionary.sites.inputs
    summary: dict[str, object] = {
        "a_sites": [sites[i] for i in a_sites], "b_sites": [sites[i] for i in b_sites],
        "latents_fired": int(alive.sum()),
        "counts": class_counts([c for c, a in zip(diff.classes, alive.tolist(), strict=True) if a]),
        "counts_all_latents": diff.counts,
        "histogram": {"edges": hist.edges, "counts": hist.counts, "undefined": hist.undefined},
        "artifacts": int((scaling.artifact & alive).sum()), "artifact_threshold": scaling.threshold,
        "bounds": {"a_only_below": A_ONLY_BELOW, "b_only_above": B_ONLY_ABOVE,
                   "shared": [SHARED_LOW, SHARED_HIGH]}}
    per_latent: dict[str, object] = {
        "relative_norm": _finite(diff.relative),
        "cosine": None if diff.cosine is None else _finite(diff.cosine),
        "class": list(diff.classes), "fired": [int(v) for v in fired.tolist()],
        "beta_error_a": _finite(scaling.beta_error_a), "beta_error_b": _finite(scaling.beta_error_b),
        "beta_reconstruction_a": _finite(scaling.beta_reconstruction_a),
        "beta_reconstruction_b": _finite(scaling.beta_reconstruction_b),
        "nu_error": _finite(scaling.nu_error), "nu_reconstruction": _finite(scaling.nu_reconstruction),
        "artifact": [bool(v) for v in scaling.artifact.tolist()]}
    return summary, per_latent


__all__ = [
    "ARTIFACT_NU_THRESHOLD",
    "A_ONLY_BELOW",
    "B_ONLY_ABOVE",
    "CLASSES",
    "DEFAULT_BINS",
    "SHARED_HIGH",
    "SHARED_LOW",
    "DecoderDiff",
    "Histogram",
    "LatentClass",
    "LatentScaling",
    "LatentScalingAccumulator",
    "check_groups",
    "class_counts",
    "class_latents",
    "classify",
    "decoder_cosines",
    "decoder_diff",
    "diffing_columns",
    "diffing_report",
    "group_norms",
    "latent_scaling",
    "output_scales",
    "relative_decoder_norm",
    "relative_norm_histogram",
    "site_decoder_norms",
    "site_decoders",
]
