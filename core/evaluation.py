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

Transcoders and other dictionaries whose outputs differ from their inputs: the inputs are read in a
clean forward pass, and the output site(s) are replaced by the dictionary applied to those inputs.

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from .errors import UsageError
from .interfaces import ActivationSource, SparseDictionary
from .layout import RunLayout
from .options import Options
from .positions import PositionFilter, dictionary_filter

EVAL_FILE = "eval.json"
"""Name of the evaluation results file written next to a dictionary's ``cfg.json``."""


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
    """Streaming sums of CE and KL over predicted positions."""

    n: int = 0
    ce: dict[str, float] = field(default_factory=lambda: {"clean": 0.0, "spliced": 0.0, "zero": 0.0})
    kl: dict[str, float] = field(default_factory=lambda: {"spliced": 0.0, "zero": 0.0})

    def add(self, logits: Mapping[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor) -> None:
        """``logits[name] [B, T, V]``; predictions at positions ``t < T-1`` where ``mask`` is true."""
        pred_mask = mask[:, :-1]
        n = int(pred_mask.sum())
        if n == 0:
            return
        labels = ids[:, 1:][pred_mask]
        logp = {k: F.log_softmax(v[:, :-1][pred_mask].float(), dim=-1) for k, v in logits.items()}
        self.n += n
        for name in self.ce:
            self.ce[name] += float(F.nll_loss(logp[name], labels, reduction="sum"))
        p_clean = logp["clean"].exp()
        for name in self.kl:
            self.kl[name] += float((p_clean * (logp["clean"] - logp[name])).sum())

    def metrics(self) -> dict[str, float | None]:
        if self.n == 0:
            return {}
        ce = {k: v / self.n for k, v in self.ce.items()}
        gap = ce["zero"] - ce["clean"]
        recovered = (ce["zero"] - ce["spliced"]) / gap if abs(gap) > 1e-12 else None
        return {"ce_clean": ce["clean"], "ce_spliced": ce["spliced"], "ce_zero": ce["zero"],
                "ce_loss_recovered": recovered, "ce_loss_increase": ce["spliced"] - ce["clean"],
                "kl_spliced": self.kl["spliced"] / self.n, "kl_zero": self.kl["zero"] / self.n,
                "predicted_tokens": self.n}


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
        self.l0_sum += float(active.sum())
        self.fire_counts += active.sum(0).double()
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

        clean = source.logits(ids) if clean_logits is None else clean_logits
        spliced = source.logits(ids, {h: replacement(i, False) for i, h in enumerate(sites.outputs)})
        zero = source.logits(ids, {h: replacement(i, True) for i, h in enumerate(sites.outputs)})
        ids_cpu = ids.cpu()
        self.downstream.add({"clean": clean.cpu(), "spliced": spliced.cpu(), "zero": zero.cpu()}, ids_cpu,
                            mask.cpu())

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
        return out


def evaluate(modules: Mapping[str, SparseDictionary], source: ActivationSource,
             windows: Iterable[torch.Tensor], config: EvalConfig | None = None,
             progress: Any = None) -> dict[str, dict[str, Any]]:
    """Evaluate several dictionaries on the same windows (``[T]`` int64 tensors, batched here).

    Returns ``{name: metrics}``. ``progress`` (optional) is called with the number of windows done.
    """
    config = config or EvalConfig()
    evaluators = {name: DictionaryEvaluator(m.to(config.device), config, position_filter(config, m, source))
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
        clean = source.logits(ids) if config.downstream else None
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
    Keys: ``model``, ``dataset_repo`` (or ``dataset``), ``dataset_split``, ``dataset_name``,
    ``dataset_column``, ``n_tokens``, ``ctx_len`` (or ``cache_ctx_len``); missing ones are None."""
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
    return {"model": model, "dataset_repo": dataset, "dataset_split": _lookup(sources, "dataset_split", "split"),
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
    """Write ``eval.json`` (metrics + how they were computed) next to the dictionary's ``cfg.json``."""
    path = Path(dictionary_dir) / EVAL_FILE
    payload = {"metrics": dict(metrics), **dict(info)}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    tmp.replace(path)
    return path


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
    return table


__all__ = ["DATA_KEYS", "EVAL_FILE", "DictionaryEvaluator", "EvalConfig", "evaluate", "heldout_windows",
           "position_filter", "results_table", "skip_tokens_for", "training_data", "write_eval"]
