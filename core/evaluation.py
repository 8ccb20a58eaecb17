"""Evaluation of sparse dictionaries on held-out tokens: reconstruction, sparsity and downstream loss.

For every dictionary the evaluator streams token windows through the LM and measures, over the
evaluated token rows:

* ``mse``: mean over tokens of ``||y - y_hat||^2`` (summed over output sites and width);
* ``fvu``: fraction of variance unexplained, ``sum ||y - y_hat||^2 / sum ||y - mean(y)||^2`` pooled over
  all evaluated tokens (sparsify's definition); ``explained_variance = 1 - fvu`` (SAELens 6's
  definition); ``cosine``: mean cosine similarity of ``y`` and ``y_hat``;
* ``l0``: mean number of non-zero latents per token; ``dead_frac``: latents that never fired on the
  evaluated tokens; ``dense_frac``: latents firing on more than ``dense_threshold`` of them;
* ``ce_clean``, ``ce_spliced``, ``ce_zero``: next-token cross-entropy of the clean LM, of the LM with the
  reconstruction spliced in at the dictionary's output hookpoint(s) and with those activations set to
  zero; ``ce_loss_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean)``; ``kl_spliced`` and
  ``kl_zero``: mean KL divergence of the clean next-token distribution to the spliced / ablated one.

Massive activations. SmolLM2-like models put residual norms of ~26k (median ~170) at absolute
positions 1-3 of every context: those rows hold ~90% of the variance, so a raw FVU mostly measures
them. By default the headline metrics leave out the positions the dictionary's training left out (its
``cfg.json`` record; else the model's declaration: ``(0, 1, 2, 3)`` on smollm2, position 0 being the BOS
token; :func:`position_filter`) and use the other rows; the same metrics over **every** position are reported with
an ``_all`` suffix (``fvu_all``, ``mse_all``...). When splicing, excluded positions keep their clean
activation (``splice_excluded=False``; the dictionary was not trained there) and the CE/KL metrics are
averaged over predictions made at included positions (predictions at excluded positions would be
identical in all three runs and only dilute the differences).

A dictionary over two models' sites (``HOOKPOINT@A``, ``HOOKPOINT@B``, through a :class:`saelab.paired.PairedSource`)
has no pooled downstream keys (no one forward holds both models); ``per_model`` gives, per model label, the
keys above (``ce_clean``, ``ce_spliced``, ``ce_zero``, ``ce_loss_recovered``, ``kl_spliced``...) with that
model's sites spliced in (or zeroed) against its own clean forward, and ``per_site`` entries compare with
their model's clean forward.

Transcoders and other dictionaries whose outputs differ from their inputs: the inputs are read in a
clean forward pass, and the output site(s) are replaced by the dictionary applied to those inputs.

Dictionaries that write several sites and are not layer transcoders (a crosscoder over layers or models, an
SAE on concatenated sites) also get ``per_site``: one entry per output site with ``site`` and ``fvu``,
``explained_variance``, ``mse``, ``cosine``, ``tokens`` of that site, and with the downstream passes
``ce_spliced``, ``ce_zero``, ``ce_loss_recovered``, ``kl_spliced`` when that site **alone** is replaced (two
more forwards per site and batch). These are open-loop: the dictionary reads the clean forward at every
site, including sites after the replaced one, so no closed loop exists for it (``per_site_loop``:
``"open_loop"``). An autoencoder on exactly two sites (a crosscoder over two layers or two models) also gets
``diffing`` (:func:`saelab.diffing.diffing_report`, site 0 as A and site 1 as B, latent scaling fitted on the
evaluated rows): class counts of the latents that fired, the relative-norm histogram, the number flagged by
latent scaling; its per-latent columns go to ``diffing.json`` beside ``eval.json``.

Dictionaries whose sites are layers (``per_layer_sites``: a cross-layer transcoder, a transcoder set; L
layers, input site ``i`` and output site ``i`` of layer ``i``, latent ``f`` of layer ``i`` at ``i * F + f``) are
evaluated as a **replacement model** (:class:`ReplacementEvaluator`). The keys above stay, computed
**open-loop** (every encoder reads the clean forward; all L output sites replaced together, so
``ce_spliced`` is the open-loop replacement's CE and ``ce_zero`` zeroes all L outputs), and ``eval.json``'s
``metrics`` gain:

* ``per_layer``: one entry per layer: ``layer``, ``input``, ``output`` (hookpoints), ``tokens`` and, with
  suffix ``_open_loop`` and ``_closed_loop``, ``fvu``, ``explained_variance``, ``mse``, ``cosine`` (that
  layer's output site), ``l0`` (active latents of that layer's encoder per token) and ``dead_frac`` (that
  layer's latents that never fired on the evaluated tokens);
* totals: ``n_layers``; ``l0_open_loop`` (= ``l0``, all layers), ``fvu_open_loop`` (= ``fvu``),
  ``l0_closed_loop``, ``fvu_closed_loop`` and ``dead_frac_closed_loop`` (pooled over layers); and for each
  ``<loop>`` in ``open_loop`` / ``closed_loop``: ``ce_<loop>`` (CE loss of the LM with all L output sites
  replaced at once; ``ce_open_loop`` = ``ce_spliced``), ``kl_<loop>`` (KL of the clean next-token
  distribution to it), ``top1_<loop>`` (fraction of predictions whose argmax token is the clean model's)
  and ``ce_loss_recovered_<loop>`` (against ``ce_zero``, all L outputs zeroed).

**Closed-loop** is the headline (Anthropic's replacement model): one forward with replacements, which
run in forward order; at input site ``i`` the current activation is kept as encoder ``i``'s input, at
output site ``j`` the dictionary's reconstruction from the layers ``<= j`` replaces the activation
(:func:`closed_loop_forward`), so each encoder reads the residual stream already changed by the replaced
layers below it (layers not reached yet hold their clean inputs, which matters only to an encoder that
couples layers: the CLT's TopK across layers chooses layer ``j``'s latents with them). Its per-layer FVU compares the reconstruction with what the model's own MLP outputs on
that changed stream. Excluded positions keep the MLP's own output (``splice_excluded`` replaces them too)
and do not count. The closed loop costs one more LM forward and L dictionary passes per batch; with
``downstream=False`` it is skipped (only the open-loop per-layer keys are written).

Held-out tokens. Windows come from the dataset in its fixed order (:func:`saelab.data.iter_windows`).
The first ``skip_tokens`` stream tokens are skipped; by default that is the number of tokens the
training activation cache used (``n_windows * ctx_len`` from the dictionary's or run's recorded data
settings, see :func:`training_data`), so evaluation reads the windows right after the training ones.
When nothing is recorded and ``skip_tokens`` is not given, evaluation starts at the beginning and
``eval.json`` says ``"held_out": false``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from .diffing import LatentScalingAccumulator, diffing_report
from .errors import UsageError
from .hookpoints import parse_hookpoint
from .interfaces import ActivationSource, SparseDictionary
from .layout import RunLayout
from .options import Options
from .paired import PairedSource, split_site
from .positions import PositionFilter, dictionary_filter

EVAL_FILE = "eval.json"
"""Name of the evaluation results file written next to a dictionary's ``cfg.json``."""
DIFFING_FILE = "diffing.json"
"""Per-latent model-diffing columns of a two-site autoencoder, written next to ``eval.json``."""
DIFFING_LATENTS = "diffing_latents"
"""Key of the per-latent diffing columns in :meth:`DictionaryEvaluator.metrics` (written to :data:`DIFFING_FILE`,
not to ``eval.json``)."""


class EvalConfig(Options):
    """Options of ``saelab evaluate`` (each field's docstring is its flag's help text)."""

    n_tokens: int = Field(default=32768, ge=1)
    """Held-out tokens to evaluate (whole windows: rounded up to a multiple of ctx_len)."""
    ctx_len: int | None = Field(default=None, ge=2)
    """Tokens per window [default: the training cache's ctx_len when recorded, else 256]."""
    batch_size: int = Field(default=8, ge=1)
    """Windows per LM forward pass."""
    skip_tokens: int | None = Field(default=None, ge=0)
    """Dataset stream tokens skipped before the evaluated windows [default: the tokens the training cache
    used, so that the evaluated tokens are held out]."""
    exclude_positions: tuple[int, ...] | None = None
    """Positions left out of the headline metrics (metrics over every position are reported as *_all)
    [default: those the dictionary's training recorded in its cfg.json, else the model's declaration: 0 1 2 3
    on smollm2, whose positions 1-3 carry massive activations, 0 (the BOS) elsewhere]. Negative positions
    count from the window's end; on the command line they are dropped, so -1 alone means none."""
    exclude_bos: bool | None = None
    """Also leave BOS tokens out of the headline metrics wherever they occur [default: as recorded at
    training, else keep them]."""
    splice_excluded: bool = False
    """Splice the reconstruction at excluded positions too (default: they keep their clean activation)."""
    dense_threshold: float = Field(default=0.1, gt=0, le=1)
    """A latent is dense when it fires on more than this fraction of the evaluated tokens."""
    downstream: bool = True
    """Compute CE loss / KL with the reconstruction spliced into the LM (three extra forward passes)."""
    device: str = "cpu"
    """Device for the dictionary (the LM stays where its source put it)."""


@dataclass
class _Moments:
    """Streaming sums for MSE/FVU over one set of rows (float64)."""

    n: int = 0
    sse: float = 0.0
    sum_sq: float = 0.0
    cos: float = 0.0
    sum_y: torch.Tensor | None = None

    def add(self, y: torch.Tensor, y_hat: torch.Tensor) -> None:
        if y.shape[0] == 0:
            return
        y64, err = y.double(), (y - y_hat).double()
        self.n += y.shape[0]
        self.sse += float(err.pow(2).sum())
        self.sum_sq += float(y64.pow(2).sum())
        s = y64.sum(0)
        self.sum_y = s if self.sum_y is None else self.sum_y + s
        self.cos += float(F.cosine_similarity(y.float(), y_hat.float(), dim=-1, eps=1e-12).sum())

    def metrics(self) -> dict[str, float | None]:
        if self.n == 0 or self.sum_y is None:
            return {"mse": None, "fvu": None, "explained_variance": None, "cosine": None, "tokens": 0}
        variance = self.sum_sq - float(self.sum_y.pow(2).sum()) / self.n
        fvu = self.sse / variance if variance > 0 else math.nan
        return {"mse": self.sse / self.n, "fvu": fvu, "explained_variance": 1.0 - fvu,
                "cosine": self.cos / self.n, "tokens": self.n}


@dataclass
class _Downstream:
    """Streaming sums over predicted positions of the CE of every forward (``clean``, ``spliced``, ``zero``,
    and a replacement model's ``closed_loop``), of the KL of the clean next-token distribution to each other
    one, and of top-1 agreement with the clean model for the forwards in ``agreement``
    (``{metric suffix: forward}``: the replacement model's open and closed loop)."""

    agreement: Mapping[str, str] = field(default_factory=dict)
    n: int = 0
    ce: dict[str, float] = field(default_factory=dict)
    kl: dict[str, float] = field(default_factory=dict)
    top1: dict[str, float] = field(default_factory=dict)

    def add(self, logits: Mapping[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor) -> None:
        """``logits[name] [B, T, V]`` (``clean`` among them); predictions at positions ``t < T-1`` where
        ``mask`` is true."""
        pred_mask = mask[:, :-1]
        n = int(pred_mask.sum())
        if n == 0:
            return
        labels = ids[:, 1:][pred_mask]
        logp_clean = F.log_softmax(logits["clean"][:, :-1][pred_mask].float(), dim=-1)
        p_clean = logp_clean.exp()
        top_clean = logp_clean.argmax(-1) if self.agreement else None
        compared = set(self.agreement.values())
        self.n += n
        for name, value in logits.items():
            logp = logp_clean if name == "clean" else F.log_softmax(value[:, :-1][pred_mask].float(), dim=-1)
            self.ce[name] = self.ce.get(name, 0.0) + float(F.nll_loss(logp, labels, reduction="sum"))
            if name != "clean":
                self.kl[name] = self.kl.get(name, 0.0) + float((p_clean * (logp_clean - logp)).sum())
            if name in compared:
                self.top1[name] = self.top1.get(name, 0.0) + float((logp.argmax(-1) == top_clean).sum())

    def metrics(self) -> dict[str, float | None]:
        if self.n == 0:
            return {}
        ce = {k: v / self.n for k, v in self.ce.items()}
        gap = ce["zero"] - ce["clean"]

        def recovered(name: str) -> float | None:
            return (ce["zero"] - ce[name]) / gap if abs(gap) > 1e-12 else None

        out: dict[str, float | None] = {
            "ce_clean": ce["clean"], "ce_spliced": ce["spliced"], "ce_zero": ce["zero"],
            "ce_loss_recovered": recovered("spliced"), "ce_loss_increase": ce["spliced"] - ce["clean"],
            "kl_spliced": self.kl["spliced"] / self.n, "kl_zero": self.kl["zero"] / self.n,
            "predicted_tokens": self.n}
        for suffix, name in self.agreement.items():
            out.update({f"ce_{suffix}": ce[name], f"ce_loss_recovered_{suffix}": recovered(name),
                        f"kl_{suffix}": self.kl[name] / self.n, f"top1_{suffix}": self.top1[name] / self.n})
        return out


def position_filter(config: EvalConfig, module: SparseDictionary, source: ActivationSource) -> PositionFilter:
    """The positions ``module``'s headline metrics leave out: the config's where given, else what its
    training recorded in ``cfg.json`` (:func:`saelab.positions.recorded_filter`), else the model's declaration
    (``source.excluded_positions``) without BOS filtering."""
    return dictionary_filter(module, source, config.exclude_positions, config.exclude_bos)


class DictionaryEvaluator:
    """Accumulates every metric of one dictionary over batches of token windows."""

    def __init__(self, module: SparseDictionary, config: EvalConfig, positions: PositionFilter | None = None):
        self.module = module.eval()
        self.config = config
        self.positions = positions or PositionFilter.of(config.exclude_positions or (), bool(config.exclude_bos))
        """The positions left out of the headline metrics."""
        self.sites = module.sites
        self.kept = _Moments()
        self.all = _Moments()
        self.l0_sum = 0.0
        self.fire_counts = torch.zeros(module.d_sae, dtype=torch.float64)
        self.downstream = _Downstream()
        several = len(self.sites.outputs) > 1 and not module.per_layer_sites
        self.site_moments = [_Moments() for _ in self.sites.outputs] if several else []
        """Per output site reconstruction sums (``per_site``), for dictionaries writing several sites."""
        two_sites = self.sites.is_autoencoder and len(self.sites.inputs) == 2
        self.model_downstream: dict[str, _Downstream] = {}
        """Downstream sums per model label (a dictionary over two models' sites, :class:`PairedSource`)."""
        self.scaling = (LatentScalingAccumulator(module, [0], [1])
                        if two_sites and module.decoder_directions() is not None else None)
        """Latent scaling sums (``diffing``) of a two-site autoencoder: site 0 is A, site 1 is B."""

    def _apply(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction ``[N, n_out, d_out]`` and latents ``[N, d_sae]`` for inputs ``[N, n_in, d_in]``
        (the targets ``y`` only feed the loss terms some architectures insist on computing)."""
        device = torch.device(self.config.device)
        out = self.module(x.to(device), y.to(device))
        return out.reconstruction.float().cpu(), out.latents.float().cpu()

    @property
    def hookpoints(self) -> list[str]:
        """Hookpoints this dictionary reads and writes."""
        return list(dict.fromkeys([*self.sites.inputs, *self.sites.outputs]))

    @torch.no_grad()
    def add_batch(self, source: ActivationSource, ids: torch.Tensor, bos_token_id: int | None,
                  acts: Mapping[str, torch.Tensor] | None = None, clean_logits: torch.Tensor | None = None) -> None:
        """Evaluate one batch of windows ``ids [B, T]``; ``acts`` (clean activations at
        :attr:`hookpoints`) and ``clean_logits`` are computed here when not given."""
        cfg, sites = self.config, self.sites
        if acts is None:
            acts = source.activations(ids, self.hookpoints)
        acts = {k: acts[k].float().cpu() for k in self.hookpoints}
        B, T = ids.shape
        x = torch.stack([acts[h] for h in sites.inputs], dim=2).reshape(B * T, len(sites.inputs), sites.d_in)
        y = torch.stack([acts[h] for h in sites.outputs], dim=2).reshape(B * T, len(sites.outputs), sites.d_out)
        recon, latents = self._apply(x, y)
        mask = self.positions.keep_mask(ids, bos_token_id)
        flat_mask = mask.reshape(-1).cpu()
        y_flat, r_flat = y.reshape(B * T, -1), recon.reshape(B * T, -1)
        self.all.add(y_flat, r_flat)
        self.kept.add(y_flat[flat_mask], r_flat[flat_mask])
        active = latents[flat_mask] != 0
        if self.scaling is not None:
            self.scaling.update(x[flat_mask], latents[flat_mask], recon[flat_mask])
        self.l0_sum += float(active.sum())
        self.fire_counts += active.sum(0).double()
        self._add_layers(y, recon, latents, flat_mask)
        if not cfg.downstream:
            return
        splice_mask = torch.ones_like(mask) if cfg.splice_excluded else mask
        recon_seq = recon.reshape(B, T, len(sites.outputs), sites.d_out)

        def replacement(i: int, zero: bool):
            def fn(act: torch.Tensor) -> torch.Tensor:
                m = splice_mask.to(act.device)[..., None]
                new = torch.zeros_like(act) if zero else recon_seq[:, :, i].to(act.device, act.dtype)
                return torch.where(m, new, act)
            return fn

        if isinstance(source, PairedSource):
            self._add_paired(source, ids, replacement, mask)
            return
        clean = source.logits(ids) if clean_logits is None else clean_logits
        spliced = source.logits(ids, {h: replacement(i, False) for i, h in enumerate(sites.outputs)})
        zero = source.logits(ids, {h: replacement(i, True) for i, h in enumerate(sites.outputs)})
        runs = {"clean": clean.cpu(), "spliced": spliced.cpu(), "zero": zero.cpu(),
                **self._add_replacement(source, ids, x, y, mask, splice_mask)}
        for i, h in enumerate(sites.outputs if self.site_moments else ()):
            runs[f"site{i}_spliced"] = source.logits(ids, {h: replacement(i, False)}).cpu()
            runs[f"site{i}_zero"] = source.logits(ids, {h: replacement(i, True)}).cpu()
        self.downstream.add(runs, ids.cpu(), mask.cpu())

    def _add_paired(self, source: PairedSource, ids: torch.Tensor,
                    replacement: Callable[[int, bool], Callable[[torch.Tensor], torch.Tensor]],
                    mask: torch.Tensor) -> None:
        """Downstream passes of a dictionary over two models' sites: per model, its clean forward and its
        output sites spliced in (and zeroed) together, and each of them alone (``per_site``), against that
        model's own clean logits."""
        by_model: dict[str, list[int]] = {}
        for i, h in enumerate(self.sites.outputs):
            by_model.setdefault(str(split_site(h)[1]), []).append(i)
        for label, outputs in by_model.items():
            def logits(replaced: Mapping[int, bool], label: str = label) -> torch.Tensor:
                fns = {split_site(self.sites.outputs[i])[0]: replacement(i, zero) for i, zero in replaced.items()}
                return source.logits_of(label, ids, fns).cpu()

            runs = {"clean": logits({}), "spliced": logits(dict.fromkeys(outputs, False)),
                    "zero": logits(dict.fromkeys(outputs, True))}
            for i in outputs:
                one = len(outputs) == 1
                runs[f"site{i}_spliced"] = runs["spliced"] if one else logits({i: False})
                runs[f"site{i}_zero"] = runs["zero"] if one else logits({i: True})
            self.model_downstream.setdefault(label, _Downstream()).add(runs, ids.cpu(), mask.cpu())

    def _add_layers(self, y: torch.Tensor, recon: torch.Tensor, latents: torch.Tensor,
                    flat_mask: torch.Tensor) -> None:
        """Per output site reconstruction sums of a batch (``per_site``; :class:`ReplacementEvaluator`: per layer)."""
        for i, moments in enumerate(self.site_moments):
            moments.add(y[flat_mask, i], recon[flat_mask, i])

    def _add_replacement(self, source: ActivationSource, ids: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                         mask: torch.Tensor, splice_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Replacement-model metrics of a batch and the logits of the other forwards it ran, by name
        (:class:`ReplacementEvaluator`); nothing here."""
        return {}

    def metrics(self) -> dict[str, Any]:
        """All metrics (headline over kept rows; ``*_all`` over every position)."""
        kept = self.kept.metrics()
        out: dict[str, Any] = dict(kept)
        for key, value in self.all.metrics().items():
            out[f"{key}_all"] = value
        n = max(self.kept.n, 1)
        freq = self.fire_counts / n
        out["l0"] = self.l0_sum / n
        out["dead_frac"] = float((self.fire_counts == 0).double().mean())
        out["dense_frac"] = float((freq > self.config.dense_threshold).double().mean())
        out["d_sae"] = int(self.module.d_sae)
        out.update(self.downstream.metrics())
        if self.model_downstream:
            out["per_model"] = {label: d.metrics() for label, d in self.model_downstream.items()}
        if self.site_moments:
            out["per_site"] = [self._site_metrics(i) for i in range(len(self.site_moments))]
            out["per_site_loop"] = "open_loop"
        if self.scaling is not None and self.scaling.rows:
            out["diffing"], out[DIFFING_LATENTS] = diffing_report(self.module, [0], [1], self.scaling.result(),
                                                                   self.fire_counts)
        return out

    def _site_metrics(self, i: int) -> dict[str, Any]:
        """``per_site`` entry of output site ``i``: its reconstruction metrics and, after downstream passes,
        CE / KL with that site alone replaced by the reconstruction (``ce_spliced``) or by zeros."""
        row: dict[str, Any] = {"site": self.sites.outputs[i], **self.site_moments[i].metrics()}
        d = self.model_downstream.get(str(split_site(self.sites.outputs[i])[1]), self.downstream)
        if d.n and f"site{i}_spliced" in d.ce:
            clean, spliced, zero = (d.ce[name] / d.n for name in ("clean", f"site{i}_spliced", f"site{i}_zero"))
            gap = zero - clean
            row.update({"ce_spliced": spliced, "ce_zero": zero, "kl_spliced": d.kl[f"site{i}_spliced"] / d.n,
                        "ce_loss_recovered": (zero - spliced) / gap if abs(gap) > 1e-12 else None})
        return row


# --------------------------------------------------------------------------------------------------
# Dictionaries whose sites are layers (per_layer_sites): the replacement model, open- and closed-loop


@dataclass
class ClosedLoopForward:
    """One closed-loop forward of the replacement model (:func:`closed_loop_forward`); rows are the
    batch's tokens in ``[B * T]`` order."""

    logits: torch.Tensor
    """``[B, T, vocab]`` float32 logits of the LM with every output site replaced."""
    reconstruction: torch.Tensor
    """``[B * T, L, d_out]`` what the dictionary returned for each output site (before the position mask)."""
    targets: torch.Tensor
    """``[B * T, L, d_out]`` the model's own activation at each output site in this forward (the MLP's
    output on the changed residual stream)."""
    inputs: torch.Tensor
    """``[B * T, L, d_in]`` what each input site held in this forward (what encoder ``i`` read)."""
    latents: torch.Tensor
    """``[B * T, d_sae]`` the latents of every layer on those inputs."""


def check_layer_order(module: SparseDictionary) -> None:
    """One-line :class:`UsageError` unless ``module``'s sites run in forward order layer by layer: input
    site ``i`` no later than output site ``i``, and output site ``i`` before input site ``i + 1`` (what a
    closed-loop replacement needs)."""
    ins, outs = module.sites.inputs, module.sites.outputs
    if len(ins) != len(outs):
        raise UsageError(f"a dictionary whose sites are layers needs one input and one output site per layer; "
                         f"got inputs {ins} and outputs {outs}")
    order = [(parse_hookpoint(h).order, k) for pair in zip(ins, outs, strict=True) for k, h in enumerate(pair)]
    for (prev, _), (cur, kind) in zip(order, order[1:], strict=False):
        if cur < prev or (cur == prev and kind == 0):
            raise UsageError(f"the sites of a dictionary whose sites are layers must run in forward order (input i, "
                             f"output i, input i+1...) for closed-loop evaluation; got inputs {ins} and outputs {outs}")


@torch.no_grad()
def closed_loop_forward(module: SparseDictionary, source: ActivationSource, ids: torch.Tensor,
                        splice_mask: torch.Tensor, inputs: torch.Tensor | None = None,
                        targets: torch.Tensor | None = None, device: str | torch.device = "cpu") -> ClosedLoopForward:
    """The LM with all L output sites of a ``per_layer_sites`` dictionary replaced at once, each encoder
    reading the residual stream already changed by the replaced layers below it (one forward with
    replacements, which run in forward order: at input site ``i`` the current activation is handed to
    the dictionary's :class:`~saelab.LayerReplacement` as layer ``i``'s input; at output site ``j`` layer
    ``j``'s reconstruction from the inputs reached so far replaces the activation where ``splice_mask
    [B, T]`` is true, elsewhere the model keeps its own).

    The pass comes from ``module.layer_replacement``: the builtin layer transcoders encode each layer once,
    so a pass costs about one forward of the dictionary. Layers not reached yet hold their clean
    ``inputs`` (``[B * T, L, d_in]``; read from ``source`` when None): they do not change the
    reconstruction of an earlier layer unless the encoder couples layers (TopK across layers: there layer
    ``j``'s latents are chosen with the clean inputs of the later layers). ``targets`` (clean outputs) only
    feed loss terms some architectures compute; ``device`` is where the dictionary runs (in eval mode, set
    by the caller)."""
    check_layer_order(module)
    sites = module.sites
    L, (B, T) = len(sites.inputs), ids.shape
    N, dev = B * T, torch.device(device)
    if inputs is None:
        acts = source.activations(ids, list(dict.fromkeys(sites.inputs)))
        inputs = torch.stack([acts[h].float().cpu() for h in sites.inputs], dim=2).reshape(N, L, sites.d_in)
    y = targets.to(dev, torch.float32) if targets is not None else None
    replacement = module.layer_replacement(inputs.to(dev, torch.float32), y)
    recon = torch.zeros(N, L, sites.d_out)
    own = torch.zeros(N, L, sites.d_out)

    def read(i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(act: torch.Tensor) -> torch.Tensor:
            replacement.read(i, act.reshape(N, sites.d_in).to(dev, torch.float32))
            return act
        return fn

    def write(j: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(act: torch.Tensor) -> torch.Tensor:
            y_hat = replacement.write(j).float()
            recon[:, j] = y_hat.cpu()
            own[:, j] = act.reshape(N, sites.d_out).float().cpu()
            m = splice_mask.to(act.device)[..., None]
            return torch.where(m, y_hat.reshape(B, T, sites.d_out).to(act.device, act.dtype), act)
        return fn

    steps: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {}
    for i, h in enumerate(sites.inputs):
        steps.setdefault(h, []).append(read(i))
    for j, h in enumerate(sites.outputs):
        steps.setdefault(h, []).append(write(j))

    def chain(fns: list[Callable[[torch.Tensor], torch.Tensor]]) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(act: torch.Tensor) -> torch.Tensor:
            for f in fns:
                act = f(act)
            return act
        return fn

    logits = source.logits(ids, {h: chain(fns) for h, fns in steps.items()})
    return ClosedLoopForward(logits.float().cpu(), recon, own, replacement.inputs.cpu(),
                             replacement.latents().float().cpu())


class ReplacementEvaluator(DictionaryEvaluator):
    """Evaluator of a dictionary whose sites are layers (``per_layer_sites``: cross-layer transcoders,
    transcoder sets): the metrics of :class:`DictionaryEvaluator` (open loop, pooled over layers) plus
    per-layer FVU / L0 / dead latents and the replacement model's CE, KL and top-1 agreement, open- and
    closed-loop (see the module docstring)."""

    def __init__(self, module: SparseDictionary, config: EvalConfig, positions: PositionFilter | None = None):
        super().__init__(module, config, positions)
        L = len(self.sites.inputs)
        if len(self.sites.outputs) != L or module.d_sae % L:
            raise UsageError(f"a dictionary whose sites are layers needs as many input as output sites and d_sae "
                             f"divisible by their number; got {L} inputs, {len(self.sites.outputs)} outputs, "
                             f"d_sae={module.d_sae}")
        check_layer_order(module)
        self.n_layers = L
        """Number of layers L."""
        self.d_sae_per_layer = module.d_sae // L
        """Latents per layer F (latent ``f`` of layer ``i`` is ``i * F + f``)."""
        self.open_layers = [_Moments() for _ in range(L)]
        self.closed_layers = [_Moments() for _ in range(L)]
        self.closed = _Moments()
        self.l0_open = torch.zeros(L, dtype=torch.float64)
        self.l0_closed = torch.zeros(L, dtype=torch.float64)
        self.fire_closed = torch.zeros(module.d_sae, dtype=torch.float64)
        self.n_closed = 0
        self.downstream = _Downstream(agreement={"open_loop": "spliced", "closed_loop": "closed_loop"})

    def _per_layer_l0(self, latents: torch.Tensor) -> torch.Tensor:
        """``[L]`` active latents per layer, summed over the rows of ``latents [N, d_sae]``."""
        active = (latents != 0).reshape(latents.shape[0], self.n_layers, self.d_sae_per_layer)
        return active.sum((0, 2)).double()

    def _add_layers(self, y: torch.Tensor, recon: torch.Tensor, latents: torch.Tensor,
                    flat_mask: torch.Tensor) -> None:
        for j, moments in enumerate(self.open_layers):
            moments.add(y[flat_mask, j], recon[flat_mask, j])
        self.l0_open += self._per_layer_l0(latents[flat_mask])

    def _add_replacement(self, source: ActivationSource, ids: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                         mask: torch.Tensor, splice_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        run = closed_loop_forward(self.module, source, ids, splice_mask, x, y, self.config.device)
        flat_mask = mask.reshape(-1).cpu()
        for j, moments in enumerate(self.closed_layers):
            moments.add(run.targets[flat_mask, j], run.reconstruction[flat_mask, j])
        rows = flat_mask.sum()
        self.closed.add(run.targets[flat_mask].reshape(int(rows), -1), run.reconstruction[flat_mask].reshape(int(rows), -1))
        kept = run.latents[flat_mask]
        self.l0_closed += self._per_layer_l0(kept)
        self.fire_closed += (kept != 0).sum(0).double()
        self.n_closed += int(rows)
        return {"closed_loop": run.logits.cpu()}

    def metrics(self) -> dict[str, Any]:
        """The metrics of :class:`DictionaryEvaluator` plus the per-layer table (``per_layer``) and the
        open-/closed-loop totals."""
        out = super().metrics()
        L, F_ = self.n_layers, self.d_sae_per_layer
        n_open, n_closed = max(self.kept.n, 1), max(self.n_closed, 1)
        layers = []
        for j in range(L):
            row: dict[str, Any] = {"layer": j, "input": self.sites.inputs[j], "output": self.sites.outputs[j]}
            loops = [("open_loop", self.open_layers[j], self.l0_open[j] / n_open, self.fire_counts)]
            if self.n_closed:
                loops.append(("closed_loop", self.closed_layers[j], self.l0_closed[j] / n_closed, self.fire_closed))
            for loop, moments, l0, fired in loops:
                m = moments.metrics()
                for key in ("fvu", "explained_variance", "mse", "cosine"):
                    row[f"{key}_{loop}"] = m[key]
                row[f"l0_{loop}"] = float(l0)
                row[f"dead_frac_{loop}"] = float((fired[j * F_:(j + 1) * F_] == 0).double().mean())
            row["tokens"] = self.open_layers[j].n
            layers.append(row)
        out["per_layer"] = layers
        out["n_layers"] = L
        out["l0_open_loop"] = out["l0"]
        out["fvu_open_loop"] = out["fvu"]
        if self.n_closed:
            closed = self.closed.metrics()
            out["fvu_closed_loop"] = closed["fvu"]
            out["l0_closed_loop"] = float(self.l0_closed.sum() / n_closed)
            out["dead_frac_closed_loop"] = float((self.fire_closed == 0).double().mean())
        return out


def evaluator_for(module: SparseDictionary, config: EvalConfig,
                  positions: PositionFilter | None = None) -> DictionaryEvaluator:
    """The evaluator of ``module``: :class:`ReplacementEvaluator` when its sites are layers
    (``per_layer_sites``), else :class:`DictionaryEvaluator`."""
    cls = ReplacementEvaluator if module.per_layer_sites else DictionaryEvaluator
    return cls(module, config, positions)


def evaluate(modules: Mapping[str, SparseDictionary], source: ActivationSource,
             windows: Iterable[torch.Tensor], config: EvalConfig | None = None,
             progress: Any = None) -> dict[str, dict[str, Any]]:
    """Evaluate several dictionaries on the same windows (``[T]`` int64 tensors, batched here).

    Returns ``{name: metrics}`` (:func:`evaluator_for`: a dictionary whose sites are layers also gets the
    per-layer and replacement-model metrics). ``progress`` (optional) is called with the number of windows done.
    """
    config = config or EvalConfig()
    evaluators = {name: evaluator_for(m.to(config.device), config, position_filter(config, m, source))
                  for name, m in modules.items()}
    bos = getattr(source.tokenizer, "bos_token_id", None)
    batch: list[torch.Tensor] = []
    done = 0

    def flush() -> None:
        nonlocal done, batch
        if not batch:
            return
        ids = torch.stack(batch)
        needed = list(dict.fromkeys(h for ev in evaluators.values() for h in ev.hookpoints))
        acts = source.activations(ids, needed)
        # a paired source's clean forwards are per model (DictionaryEvaluator._add_paired runs them)
        clean = source.logits(ids) if config.downstream and not isinstance(source, PairedSource) else None
        for ev in evaluators.values():
            ev.add_batch(source, ids, bos, acts, clean)
        done += len(batch)
        batch = []
        if progress is not None:
            progress(done)

    for window in windows:
        batch.append(window)
        if len(batch) == config.batch_size:
            flush()
    flush()
    if done == 0:
        raise UsageError("no evaluation windows: the dataset has no tokens after the skipped ones; "
                         "lower --skip_tokens or use another --dataset_split")
    return {name: ev.metrics() for name, ev in evaluators.items()}


# --------------------------------------------------------------------------------------------------
# Where the training data came from (for held-out windows)


DATA_KEYS = ("model", "dataset_repo", "dataset_split", "dataset_name", "dataset_column", "n_tokens", "ctx_len")
"""Keys :func:`training_data` returns."""


def _lookup(sources: Sequence[Mapping[str, Any]], *names: str) -> Any:
    for src in sources:
        for name in names:
            if isinstance(src, Mapping) and src.get(name) not in (None, ""):
                return src[name]
    return None


def training_data(dictionary_dir: Path) -> dict[str, Any]:
    """Model and training-data settings recorded for a dictionary, looked up (first hit wins) in its
    ``cfg.json`` ``metadata`` (top level, then ``data``/``cache``/``activation_cache``/``run`` entries) and
    in ``run_config.json`` of the enclosing run (``results/<name>/``, top level then ``cache``/``data``).
    Keys: ``model``, ``models`` (``{label: model}`` of a dictionary trained on two models' sites),
    ``dataset_repo`` (or ``dataset``), ``dataset_split``, ``dataset_name``, ``dataset_column``, ``n_tokens``,
    ``ctx_len`` (or ``cache_ctx_len``); missing ones are None."""
    sources: list[Mapping[str, Any]] = []
    cfg_path = dictionary_dir / "cfg.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except ValueError:
            cfg = {}
        meta = cfg.get("metadata") or {}
        sources += [meta] + [meta[k] for k in ("data", "cache", "activation_cache", "run")
                             if isinstance(meta.get(k), Mapping)]
        if isinstance(meta.get("saelens_cfg"), Mapping):  # SAELens cfg: model_name, context_size...
            lens = meta["saelens_cfg"]
            sources.append({"model": lens.get("model_name"), "dataset_repo": lens.get("dataset_path"),
                            "ctx_len": lens.get("context_size")})
    for parent in (dictionary_dir.parent, dictionary_dir.parent.parent):
        run_cfg = RunLayout(parent).run_config
        if run_cfg.is_file():
            try:
                run = json.loads(run_cfg.read_text())
            except ValueError:
                continue
            sources += [run] + [run[k] for k in ("cache", "data", "config", "options") if isinstance(run.get(k), Mapping)]
            break
    model = _lookup(sources, "model", "model_id", "model_name")
    if isinstance(model, Mapping):
        model = model.get("id") or model.get("model_id")
    dataset = _lookup(sources, "dataset_repo", "dataset")
    if isinstance(dataset, Mapping):
        dataset = dataset.get("repo") or dataset.get("id")
    models = _lookup(sources, "models")
    return {"model": model, "models": dict(models) if isinstance(models, Mapping) else None,
            "dataset_repo": dataset, "dataset_split": _lookup(sources, "dataset_split", "split"),
            "dataset_name": _lookup(sources, "dataset_name"), "dataset_column": _lookup(sources, "dataset_column", "column"),
            "n_tokens": _lookup(sources, "n_tokens"), "ctx_len": _lookup(sources, "ctx_len", "cache_ctx_len")}


def skip_tokens_for(n_tokens: int | None, ctx_len: int | None) -> int | None:
    """Dataset stream tokens used by a training cache of ``n_tokens`` in windows of ``ctx_len``
    (an upper bound: whole windows, BOS included), or None when unknown."""
    if not n_tokens or not ctx_len:
        return None
    return -(-int(n_tokens) // int(ctx_len)) * int(ctx_len)


def heldout_windows(source: ActivationSource, dataset: Any, ctx_len: int, n_tokens: int,
                    skip_tokens: int) -> Iterable[torch.Tensor]:
    """Windows of ``ctx_len`` tokens covering ``n_tokens`` tokens of ``dataset``, after skipping the
    windows that hold the first ``skip_tokens`` stream tokens."""
    from .data import WindowSpec, iter_windows, n_windows_for

    spec = WindowSpec.for_tokenizer(source.tokenizer, ctx_len)
    body = ctx_len - (1 if spec.bos_token_id is not None else 0)
    skip_windows = -(-int(skip_tokens) // body)
    return iter_windows(dataset.texts(), source.tokenizer, spec, max_windows=n_windows_for(n_tokens, ctx_len),
                        skip_windows=skip_windows)


def write_eval(dictionary_dir: Path, metrics: Mapping[str, Any], info: Mapping[str, Any]) -> Path:
    """Write ``eval.json`` (metrics + how they were computed) next to the dictionary's ``cfg.json``, and the
    per-latent diffing columns, when ``metrics`` has them, to ``diffing.json`` (with the ``diffing`` summary)."""
    metrics = dict(metrics)
    per_latent = metrics.pop(DIFFING_LATENTS, None)
    path = Path(dictionary_dir) / EVAL_FILE
    _write_json(path, {"metrics": metrics, **dict(info)})
    if per_latent is not None:
        _write_json(Path(dictionary_dir) / DIFFING_FILE, {"summary": metrics.get("diffing"), "latents": per_latent})
    return path


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, (Path, torch.device)):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


TABLE_METRICS = ("fvu", "fvu_all", "explained_variance", "mse", "cosine", "l0", "dead_frac", "dense_frac",
                 "ce_clean", "ce_spliced", "ce_zero", "ce_loss_recovered", "kl_spliced", "kl_zero", "tokens")
"""Metrics shown in the printed table, in order."""
REPLACEMENT_TABLE_METRICS = ("ce_closed_loop", "kl_closed_loop", "top1_closed_loop", "ce_loss_recovered_closed_loop",
                             "l0_closed_loop", "fvu_closed_loop", "ce_open_loop", "kl_open_loop", "top1_open_loop",
                             "ce_loss_recovered_open_loop")
"""Rows added to the printed table when a dictionary's sites are layers (the replacement-model totals)."""
LAYER_TABLE_COLUMNS = (("fvu_closed_loop", "FVU closed"), ("fvu_open_loop", "FVU open"),
                       ("explained_variance_closed_loop", "EV closed"), ("l0_closed_loop", "L0 closed"),
                       ("l0_open_loop", "L0 open"), ("dead_frac_closed_loop", "dead closed"),
                       ("dead_frac_open_loop", "dead open"))
"""Columns of the per-layer table (``per_layer`` key, header)."""


def results_table(results: Mapping[str, Mapping[str, Any]]) -> Any:
    """A rich table with one column per dictionary and one row per metric."""
    from rich.table import Table

    from .progress import format_value

    table = Table(title="Evaluation (headline metrics exclude the configured positions; *_all include them)",
                  title_justify="left")
    table.add_column("metric")
    for name in results:
        table.add_column(name)
    for metric in TABLE_METRICS:
        table.add_row(metric, *(format_value(r.get(metric)) for r in results.values()))
    for metric in REPLACEMENT_TABLE_METRICS:
        if any(metric in r for r in results.values()):
            table.add_row(metric, *(format_value(r.get(metric)) for r in results.values()))
    return table


SITE_TABLE_COLUMNS = (("fvu", "FVU"), ("explained_variance", "expl. var"), ("cosine", "cosine"),
                      ("ce_spliced", "CE spliced"), ("ce_loss_recovered", "CE recovered"), ("kl_spliced", "KL"))
"""Columns of :func:`sites_table`: (``per_site`` key, header)."""


def sites_table(name: str, metrics: Mapping[str, Any]) -> Any:
    """A rich table of a multi-site dictionary's ``per_site`` metrics, one row per output site (None when
    ``metrics`` has none)."""
    from rich.table import Table

    from .progress import format_value

    rows = metrics.get("per_site")
    if not rows:
        return None
    table = Table(title=f"{name}: per site (each site spliced alone; open loop: the dictionary reads the clean "
                        f"forward at every site, so no closed loop exists)", title_justify="left")
    for header in ("site", *(h for _, h in SITE_TABLE_COLUMNS)):
        table.add_column(header)
    for row in rows:
        table.add_row(row["site"], *(format_value(row.get(key)) for key, _ in SITE_TABLE_COLUMNS))
    return table


def layers_table(name: str, metrics: Mapping[str, Any]) -> Any:
    """A rich table of a ``per_layer_sites`` dictionary's ``per_layer`` metrics, one row per layer (None when
    ``metrics`` has none); the closed-loop columns are empty when the downstream passes were skipped."""
    from rich.table import Table

    from .progress import format_value

    rows = metrics.get("per_layer")
    if not rows:
        return None
    table = Table(title=f"{name}: per layer (closed loop: each encoder reads the stream changed by the replaced "
                        f"layers below; open loop: the clean stream)", title_justify="left")
    for header in ("layer", "sites", *(h for _, h in LAYER_TABLE_COLUMNS)):
        table.add_column(header)
    for row in rows:
        table.add_row(str(row["layer"]), f"{row['input']} -> {row['output']}",
                      *(format_value(row.get(key)) for key, _ in LAYER_TABLE_COLUMNS))
    return table


__all__ = ["DATA_KEYS", "DIFFING_FILE", "DIFFING_LATENTS", "EVAL_FILE", "ClosedLoopForward", "DictionaryEvaluator", "EvalConfig", "ReplacementEvaluator",
           "check_layer_order", "closed_loop_forward", "evaluate", "evaluator_for", "heldout_windows", "layers_table",
           "position_filter", "results_table", "sites_table", "skip_tokens_for", "training_data", "write_eval"]
