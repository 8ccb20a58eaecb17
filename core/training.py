"""The generic dictionary trainer: one shared stream of activations, one or several dictionaries.

Every architecture (:class:`~saelab.SparseDictionary`) trains through this module. The trainer

* streams ``{hookpoint: [rows, d]}`` batches from a :class:`BatchSource` (an activation cache, in-memory
  tensors, or the LM on the fly), deterministic in ``(seed, epoch)``;
* **normalises** activations (``normalise="norm"``), per site: each input site ``i`` of a dictionary is
  multiplied by ``input_scales[i] = sqrt(d_in / E[|x_i|^2])`` and each output site ``j`` by
  ``output_scales[j]`` (the same for an autoencoder), estimated on ``init_rows`` rows of the stream,
  so that the mean squared norm of a site's row equals its width. Losses, FVU and learning rates are
  therefore comparable across models and layers. The scales are folded back into the saved weights
  (``SparseDictionary.fold_scaling``, checked before the first step): a saved dictionary takes and
  returns **raw** activations, and ``cfg.json`` records the scales;
* initialises the dictionary from data (``initialize_from_data``: e.g. ``b_dec`` at the geometric median);
* minimises ``sum(output.losses.values())`` with Adam (fused kernel), linear warm-up and a linear or
  cosine decay to 0 over the last ``decay_fraction`` of the run; the default learning rate is 4e-3,
  scaled down as ``1 / sqrt(d_sae / 16384)`` above 16384 latents (measurements in ``TrainerConfig.lr``);
* tracks, per latent, the tokens since it last fired; latents silent for ``dead_tokens`` tokens form the
  ``dead_mask`` passed to ``forward`` (AuxK for the TopK family);
* logs loss terms, FVU, L0 and dead fraction to a JSONL file per dictionary, to a rich progress display
  and optionally to Weights & Biases;
* checkpoints every ``checkpoint_every`` steps and every ``checkpoint_every_minutes`` of wall time
  (weights, Adam state, schedule, RNG, data position; safetensors + JSON, no pickle) and resumes from the
  latest checkpoint so that a killed run ends equal to an uninterrupted one; a resume says so on stderr
  ("resumed from step N") and in the training log (an ``{"event": "resumed", "step": N}`` line);
* runs data-parallel under ``torchrun`` (see :func:`init_distributed`).

Massive activations: SmolLM2 (and many LMs) put residual norms of ~26k (median ~170) on the first
positions of every context; those 0.04% of rows carry ~90% of the variance and would dominate both the
normalisation and the loss. ``exclude_positions`` (default: the model's declaration,
``ActivationSource.excluded_positions``; ``(0, 1, 2, 3)`` for smollm2) drops them when streaming from a
cache or the LM: position 0 is the BOS token (the same input in every window, so a constant vector) and
positions 1-3 hold the massive activations. ``exclude_bos`` drops BOS tokens anywhere. The rule is
:class:`saelab.positions.PositionFilter`'s.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .errors import UsageError
from .fileio import safetensors_os_errors
from .interfaces import ActivationSource, SiteSpec, SparseDictionary
from .memory import release_free_heap
from .options import Options
from .positions import PositionFilter

Batch = dict[str, torch.Tensor]
"""One batch of activations: ``{hookpoint: [rows, d]}`` (rows aligned across hookpoints)."""

CHECKPOINT_DIR = "checkpoints"
"""Sub-directory of a dictionary's output directory that holds its checkpoints."""
TRAINING_LOG = "training_log.jsonl"
"""Name of the per-dictionary JSONL training log."""


class TrainerConfig(Options):
    """Options of the trainer (shared by every dictionary trained on one stream). Each field is a flag of
    ``saelab train`` with its docstring as help text (``batch_size`` is ``--train_batch_size``; ``seed``,
    ``device`` and ``exclude_bos`` come from the command's ``--seed``, ``--device`` and ``--filter_bos``)."""

    batch_size: int = 4096
    """Tokens (activation rows) per optimisation step, across all data-parallel ranks."""
    lr: float | None = None
    """Adam learning rate [default: ``min(4e-3, 4e-3 / sqrt(d_sae / 16384))``, see ``auto_lr``]. Chosen on
    real smollm2 layers.15 activations (positions 0-3 dropped, 94 steps of 4096 = 385k tokens, k 32,
    d_sae 16384, held-out FVU): lr 2e-4 (OpenAI/sparsify's Adam rule, made for runs of 100M+ tokens)
    FVU 0.567; 2e-3 0.301; 4e-3 0.269 (no latent that never fired, 6.5% silent over the last tenth);
    8e-3 0.261 but 74% silent over the last tenth. At d_sae 4096, 4e-3 gives 0.278 (1.5% silent) and
    8e-3 0.266 (22% silent), hence no increase below 16384 latents. sparsify (SignSGD, lr 5e-3) on the
    same data: see bench/train_throughput.py."""
    epochs: int = 1
    """Passes over the data (a cache or in-memory tensors; the LM on the fly is re-run per epoch)."""
    max_steps: int | None = None
    """Stop after this many steps [default: epochs x full batches per epoch]."""
    warmup_steps: int | None = None
    """Linear learning-rate warm-up steps [default: min(1000, 5% of the run)]."""
    lr_decay: Literal["linear", "cosine", "none"] = "linear"
    """Learning-rate decay to 0 over the last `decay_fraction` of the run ('none' keeps it constant)."""
    decay_fraction: float = 0.2
    """Fraction of the run over which the learning rate decays to 0."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    seed: int = 0
    """Seed of the data order (shuffling is deterministic in seed and epoch) and of torch's RNG (``saelab
    train`` sets it from ``--seed``, whose default is 22)."""
    normalise: Literal["norm", "none"] = "norm"
    """'norm': scale inputs (and targets) so that the mean squared row norm equals the width, estimated
    on `init_rows` rows; folded back into the saved weights. 'none': train on raw activations."""
    init_rows: int = 65536
    """Rows sampled from the stream to estimate the normalisation and initialise the dictionary (b_dec);
    lowered for a dictionary whose float32 inputs and targets would take more than ``INIT_SAMPLE_BYTES``
    at this many rows (a 30-layer CLT at d=576: 15,534 rows, not 18 GB)."""
    exclude_positions: tuple[int, ...] | None = None
    """Window positions never trained on (cache / on-the-fly streams; negative ones count from the end;
    empty, or 'none' on the command line: none) [default: the model's declaration
    (``ActivationSource.excluded_positions``): 0, the BOS token, for most models; 0-3 for smollm2, whose
    positions 1-3 carry massive activations, norms ~26k vs a median ~170]. Recorded in each dictionary's
    ``cfg.json`` (``metadata.positions``)."""
    exclude_bos: bool = False
    """Also drop BOS tokens wherever they occur (cache / on-the-fly streams; ``--filter_bos``). Position 0,
    where every window's BOS sits, is already excluded by default."""
    dead_tokens: int | None = None
    """A latent is dead after this many tokens without firing (drives AuxK) [default: a tenth of the run's
    tokens, clamped to [batch_size, 10M]; sparsify uses 10M, which a short run never reaches]."""
    checkpoint_every: int = 1000
    """Save a resumable checkpoint every N steps (0: not by step count; see `checkpoint_every_minutes`)."""
    checkpoint_every_minutes: float = 10.0
    """Also save one when this many minutes of training have passed since the last checkpoint (or the
    start), so a killed run loses at most that much; fractions allowed (0.5 = 30 s; 0: never). Checked
    every `log_every` steps; under torchrun rank 0's clock decides and tells the other ranks."""
    keep_checkpoints: int = 1
    """Checkpoints kept per dictionary (older ones are deleted after a new one is complete)."""
    log_every: int = 10
    """Steps per entry of the JSONL training log (and W&B / progress refresh)."""
    wandb_project: str | None = None
    """Log to this Weights & Biases project (requires `pip install wandb`; WANDB_MODE=offline works)."""
    device: str = "auto"
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    rank_split: Literal["rows", "shards"] = "rows"
    """Under torchrun: 'rows' gives every rank its slice of the same global batch (results equal a
    single-process run); 'shards' lets every rank read only its own cache shards (less I/O, other order)."""
    shuffle_buffer_shards: int = 4
    """Cache shards mixed by the shuffle buffer (memory grows with it)."""


def _fingerprint_fields(config: TrainerConfig) -> dict[str, Any]:
    """Config fields that change the trained values (checked when resuming)."""
    ignored = {"checkpoint_every", "checkpoint_every_minutes", "keep_checkpoints", "log_every", "wandb_project",
               "device"}
    return {k: v for k, v in config.model_dump(mode="json").items() if k not in ignored}


def auto_lr(d_sae: int) -> float:
    """Default learning rate for ``d_sae`` latents: ``4e-3``, scaled by ``1 / sqrt(d_sae / 16384)`` above
    16384 latents (the width rule of OpenAI/sparsify); measurements in ``TrainerConfig.lr``."""
    return 4e-3 / math.sqrt(max(1.0, d_sae / 16384))


def lr_lambda(step: int, total_steps: int, warmup_steps: int, decay: str, decay_fraction: float) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based): warm-up, plateau, decay to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "none" or decay_fraction <= 0:
        return 1.0
    decay_steps = max(1, round(total_steps * decay_fraction))
    start = total_steps - decay_steps
    if step < start:
        return 1.0
    progress = min(1.0, (step - start + 1) / decay_steps)
    if decay == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


# --------------------------------------------------------------------------------------------------
# Distributed


@dataclass
class DistContext:
    """Data-parallel context: rank and world size (1 process: rank 0 of 1, every collective a no-op)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the rank that writes files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when there is more than one process."""
        return self.world_size > 1

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce (``sum``, ``mean``, ``max`` or ``min``); returns ``tensor``."""
        if not self.active:
            return tensor
        import torch.distributed as dist

        ops = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
               "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, op=ops[op])
        if op == "mean":
            tensor.div_(self.world_size)
        return tensor

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average ``tensor`` across ranks in place (what ``SparseDictionary.synchronize`` receives)."""
        return self.all_reduce(tensor, "mean")

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``tensor`` in place with rank ``src``'s values."""
        if self.active:
            import torch.distributed as dist

            dist.broadcast(tensor, src=src)
        return tensor

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.active:
            import torch.distributed as dist

            dist.barrier()


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1): NCCL on CUDA, gloo on
    CPU. Returns the context (rank 0 of 1 when not distributed)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = resolve_device(device).type == "cuda"
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(rank=rank, world_size=world, local_rank=local_rank)


def current_dist() -> DistContext:
    """The context of an already initialised process group (rank 0 of 1 otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistContext()


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA (the local rank's GPU) when available, else CPU; other values as torch reads them."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"bad device {device!r}; accepted: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} asked for but CUDA is not available; use --device cpu or auto")
    return dev


# --------------------------------------------------------------------------------------------------
# Batch sources


class BatchSource(ABC):
    """A stream of activation batches, deterministic in ``(seed, epoch)``; resumable at a batch index.

    ``batch_size`` is the number of rows per batch **for one rank**. With ``world_size > 1``,
    ``rank_split="rows"`` gives each rank its slice of the same global batch of
    ``batch_size * world_size`` rows (so the union of the ranks' batches is the single-process batch),
    ``"shards"`` gives each rank its own part of the data. Only full batches are yielded.
    """

    hookpoints: list[str]
    """Hookpoints every batch holds."""

    @abstractmethod
    def n_batches(self, batch_size: int, *, rank: int = 0, world_size: int = 1,
                  rank_split: str = "rows") -> int | None:
        """Full batches of ``batch_size`` rows per epoch for ``rank`` (None when unknown)."""

    @abstractmethod
    def batches(self, batch_size: int, *, epoch: int, seed: int, start_batch: int = 0, rank: int = 0,
                world_size: int = 1, rank_split: str = "rows") -> Iterator[Batch]:
        """Batches of one epoch, from batch index ``start_batch`` on."""

    def sample(self, n_rows: int, *, seed: int) -> Batch:
        """About ``n_rows`` rows for normalisation and data-dependent initialisation (the same on every
        rank): the first rows of epoch 0's stream."""
        parts: dict[str, list[torch.Tensor]] = {}
        got = 0
        size = min(n_rows, 4096)
        while size > 1 and self.n_batches(size) == 0:
            size //= 2
        for batch in self.batches(size, epoch=0, seed=seed):
            for hp, t in batch.items():
                parts.setdefault(hp, []).append(t)
            got += next(iter(batch.values())).shape[0]
            if got >= n_rows:
                break
        if not parts:
            raise UsageError("the activation stream is empty: no rows to train on")
        return {hp: torch.cat(ts)[:n_rows] for hp, ts in parts.items()}

    def identity(self) -> dict[str, Any]:
        """What identifies the data (checked when resuming)."""
        return {"kind": type(self).__name__, "hookpoints": self.hookpoints}


def _slice_rows(batch: Batch, rank: int, size: int) -> Batch:
    return {hp: t[rank * size:(rank + 1) * size] for hp, t in batch.items()}


class TensorSource(BatchSource):
    """In-memory activations ``{hookpoint: [N, d]}`` shuffled per epoch (synthetic data, tests)."""

    def __init__(self, data: Mapping[str, torch.Tensor], shuffle: bool = True):
        self.data = {hp: t.detach() for hp, t in data.items()}
        sizes = {t.shape[0] for t in self.data.values()}
        if len(sizes) != 1:
            raise UsageError(f"in-memory activations have different row counts: {sorted(sizes)}")
        self.n_rows = sizes.pop()
        self.hookpoints = list(self.data)
        self.shuffle = shuffle

    def n_batches(self, batch_size: int, *, rank: int = 0, world_size: int = 1,
                  rank_split: str = "rows") -> int:
        return (self.n_rows // world_size) // batch_size if rank_split == "shards" else \
            self.n_rows // (batch_size * world_size)

    def _order(self, epoch: int, seed: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n_rows)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(self.n_rows, generator=gen)

    def batches(self, batch_size: int, *, epoch: int, seed: int, start_batch: int = 0, rank: int = 0,
                world_size: int = 1, rank_split: str = "rows") -> Iterator[Batch]:
        order = self._order(epoch, seed)
        n = self.n_batches(batch_size, rank=rank, world_size=world_size, rank_split=rank_split)
        if rank_split == "shards":
            order, step, offset = order[rank::world_size], batch_size, 0
        else:
            step, offset = batch_size * world_size, rank * batch_size
        for i in range(start_batch, n):
            idx = order[i * step + offset:i * step + offset + batch_size]
            yield {hp: t[idx] for hp, t in self.data.items()}

    def sample(self, n_rows: int, *, seed: int) -> Batch:
        idx = self._order(0, seed + 1)[:n_rows]
        return {hp: t[idx] for hp, t in self.data.items()}

    def identity(self) -> dict[str, Any]:
        return {"kind": "tensors", "hookpoints": self.hookpoints, "rows": self.n_rows}


class CacheSource(BatchSource):
    """Shuffled batches from an activation cache (``saelab.activation_cache.ActivationCache``)."""

    def __init__(self, cache: Any, hookpoints: Sequence[str], *, exclude_positions: Sequence[int] = (),
                 exclude_bos: bool = False, shuffle_buffer_shards: int = 4):
        self.cache = cache
        self.hookpoints = list(hookpoints)
        missing = [hp for hp in self.hookpoints if hp not in cache.hookpoints]
        if missing:
            raise UsageError(f"hookpoint {missing[0]!r} is not in the activation cache {cache.path}; "
                             f"cached hookpoints: {', '.join(cache.hookpoints)}")
        self.exclude_positions = tuple(exclude_positions)
        self.exclude_bos = exclude_bos
        self.shuffle_buffer_shards = shuffle_buffer_shards

    def _args(self, rank: int, world_size: int, rank_split: str) -> dict[str, Any]:
        return {"rank": rank, "world_size": world_size, "rank_split": rank_split, "drop_last": True,
                "exclude_positions": self.exclude_positions, "exclude_bos": self.exclude_bos}

    def n_batches(self, batch_size: int, *, rank: int = 0, world_size: int = 1,
                  rank_split: str = "rows") -> int:
        return self.cache.n_batches(batch_size, **self._args(rank, world_size, rank_split))

    def batches(self, batch_size: int, *, epoch: int, seed: int, start_batch: int = 0, rank: int = 0,
                world_size: int = 1, rank_split: str = "rows") -> Iterator[Batch]:
        yield from self.cache.iter_batches(
            self.hookpoints, batch_size, shuffle=True, seed=seed, epoch=epoch,
            shuffle_buffer_shards=self.shuffle_buffer_shards, dtype=torch.float32, start_batch=start_batch,
            **self._args(rank, world_size, rank_split))

    def identity(self) -> dict[str, Any]:
        return {"kind": "cache", "fingerprint": self.cache.path.name, "hookpoints": self.hookpoints,
                "n_tokens": self.cache.n_tokens, "exclude_positions": list(self.exclude_positions),
                "exclude_bos": self.exclude_bos, "shuffle_buffer_shards": self.shuffle_buffer_shards}


class LMSource(BatchSource):
    """Activations computed on the fly by a language model (``--on_the_fly``): no cache on disk.

    ``windows()`` yields token windows ``[ctx_len]`` (the same sequence on every call). The activations
    of ``buffer_sequences`` windows are gathered, the excluded positions dropped, the rows shuffled
    (deterministically in seed, epoch and buffer index) and cut into batches. Resuming re-runs the LM
    over the part already consumed (correct, not free). Under torchrun every rank runs the LM on every
    window with ``rank_split="rows"``, on its share of the windows with ``"shards"``.
    """

    def __init__(self, source: ActivationSource, windows: Callable[[], Iterable[torch.Tensor]], hookpoints: Sequence[str],
                 *, n_rows: int | None = None, lm_batch_size: int = 32, buffer_sequences: int = 256,
                 exclude_positions: Sequence[int] = (), exclude_bos: bool = False):
        self.source = source
        self.windows = windows
        self.hookpoints = list(hookpoints)
        self.n_rows = n_rows
        self.lm_batch_size = lm_batch_size
        self.buffer_sequences = buffer_sequences
        self.exclude_positions = tuple(exclude_positions)
        self.exclude_bos = exclude_bos

    def n_batches(self, batch_size: int, *, rank: int = 0, world_size: int = 1,
                  rank_split: str = "rows") -> int | None:
        return None if self.n_rows is None else (self.n_rows // world_size) // batch_size

    def count_rows(self) -> int:
        """Rows one epoch holds (tokenises the data once, without running the LM)."""
        return sum(int(self._keep_mask(w.reshape(1, -1)).sum()) for w in self.windows())

    def _keep_mask(self, ids: torch.Tensor) -> torch.Tensor:
        bos = getattr(self.source.tokenizer, "bos_token_id", None)
        return PositionFilter.of(self.exclude_positions, self.exclude_bos).keep_mask(ids, bos)

    def _flush(self, pending: list[torch.Tensor], gen: torch.Generator) -> Batch:
        ids = torch.stack(pending)
        keep = self._keep_mask(ids)
        out: dict[str, list[torch.Tensor]] = {hp: [] for hp in self.hookpoints}
        with torch.no_grad():
            for i in range(0, ids.shape[0], self.lm_batch_size):
                acts = self.source.activations(ids[i:i + self.lm_batch_size], self.hookpoints)
                k = keep[i:i + self.lm_batch_size]
                for hp in self.hookpoints:
                    out[hp].append(acts[hp][k.to(acts[hp].device)].float().cpu())
        rows = {hp: torch.cat(v) for hp, v in out.items()}
        perm = torch.randperm(next(iter(rows.values())).shape[0], generator=gen)
        return {hp: t[perm] for hp, t in rows.items()}

    def _buffers(self, epoch: int, seed: int, rank: int, world_size: int) -> Iterator[Batch]:
        pending: list[torch.Tensor] = []
        n_buffer = 0
        for index, window in enumerate(self.windows()):
            if index % world_size != rank:
                continue
            pending.append(window.reshape(-1))
            if len(pending) >= self.buffer_sequences:
                yield self._flush(pending, torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 10_007
                                                                         + n_buffer))
                pending, n_buffer = [], n_buffer + 1
        if pending:
            yield self._flush(pending, torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 10_007 + n_buffer))

    def batches(self, batch_size: int, *, epoch: int, seed: int, start_batch: int = 0, rank: int = 0,
                world_size: int = 1, rank_split: str = "rows") -> Iterator[Batch]:
        limit = self.n_batches(batch_size, rank=rank, world_size=world_size, rank_split=rank_split)
        if rank_split == "shards":
            step, buffers = batch_size, self._buffers(epoch, seed, rank, world_size)
        else:
            step, buffers = batch_size * world_size, self._buffers(epoch, seed, 0, 1)
        carry: Batch | None = None
        index = 0
        for buf in buffers:
            if carry is not None:
                buf = {hp: torch.cat([carry[hp], buf[hp]]) for hp in buf}
            full = next(iter(buf.values())).shape[0] // step
            for b in range(full):
                if limit is not None and index >= limit:
                    return
                if index >= start_batch:
                    batch = {hp: t[b * step:(b + 1) * step] for hp, t in buf.items()}
                    yield batch if rank_split == "shards" else _slice_rows(batch, rank, batch_size)
                index += 1
            carry = {hp: t[full * step:] for hp, t in buf.items()}

    def identity(self) -> dict[str, Any]:
        return {"kind": "on_the_fly", "model": self.source.identity(), "hookpoints": self.hookpoints, "rows": self.n_rows,
                "exclude_positions": list(self.exclude_positions), "exclude_bos": self.exclude_bos}


# --------------------------------------------------------------------------------------------------
# Jobs, results and per-dictionary state


@dataclass
class DictionaryJob:
    """One dictionary to train on the shared stream."""

    name: str
    """Dictionary name (directory name under ``dictionaries/``, key in logs)."""
    module: SparseDictionary
    """The architecture instance (trained in place, in the normalised space until folded)."""
    lr: float | None = None
    """Learning rate overriding the trainer's (sweeps over learning rates)."""
    out_dir: Path | None = None
    """Where cfg.json, weights, the training log and checkpoints go (None: nothing written)."""
    extra_cfg: dict[str, Any] = field(default_factory=dict)
    """Extra entries for cfg.json (e.g. the model and the activation cache used)."""


@dataclass
class TrainResult:
    """What training one dictionary gave."""

    name: str
    module: SparseDictionary
    """The trained dictionary (maps raw activations to raw targets once ``folded``)."""
    steps: int
    tokens: int
    metrics: dict[str, float]
    """Averages over the last logging window: loss terms, ``fvu``, ``l0``, ``dead_frac``."""
    dead_final_epoch: float
    """Fraction of latents that never fired during the final epoch (the whole run when 1 epoch)."""
    input_scales: list[float]
    """One normalisation scale per input site (``SiteSpec`` order); 1.0 when not normalised."""
    output_scales: list[float]
    """One normalisation scale per output site (equal to ``input_scales`` for an autoencoder)."""
    folded: bool
    lr: float = 0.0
    """Base learning rate (before warm-up and decay)."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """Every JSONL log entry of this run (since the start or the resumed checkpoint)."""
    out_dir: Path | None = None
    tokens_since_fired: torch.Tensor | None = None
    """``[d_sae]`` tokens since each latent last fired, at the end of the run (the AuxK counters)."""
    resumed_from_step: int | None = None
    """The checkpoint step this run resumed from (None: it started afresh)."""

    @property
    def input_scale(self) -> float:
        """The input scale when every input site has the same one (a single site); see ``input_scales``."""
        return _single_scale(self.input_scales, "input")

    @property
    def output_scale(self) -> float:
        """The output scale when every output site has the same one (a single site); see ``output_scales``."""
        return _single_scale(self.output_scales, "output")


def _single_scale(scales: Sequence[float], what: str) -> float:
    if len(set(scales)) != 1:
        raise ValueError(f"the {len(scales)} {what} sites have different scales {list(scales)}; "
                         f"read {what}_scales")
    return scales[0]


class _JobState:
    """Optimizer, schedule, scales, dead-latent counters and metric accumulators of one dictionary."""

    def __init__(self, job: DictionaryJob, config: TrainerConfig, total_steps: int, device: torch.device):
        self.job = job
        self.module = job.module.to(device)
        self.module.train()
        self.sites: SiteSpec = job.module.sites
        self.lr = job.lr if job.lr is not None else (config.lr if config.lr is not None
                                                     else auto_lr(job.module.d_sae))
        params = [p for p in self.module.parameters() if p.requires_grad]
        # The fused kernel (CPU and CUDA) updates 10M-parameter tensors ~10x faster than the default loop;
        # it reads parameters, gradients and moments as flat memory, so only for contiguous parameters
        # (gradients are made contiguous in _train_step).
        fused = all(p.is_floating_point() and p.is_contiguous() and p.device.type in ("cpu", "cuda")
                    for p in params)
        self.fused = fused
        self.optimizer = torch.optim.Adam(params, lr=self.lr, betas=(config.adam_beta1, config.adam_beta2),
                                          eps=config.adam_eps, fused=fused or None)
        warmup = config.warmup_steps if config.warmup_steps is not None else min(1000, total_steps // 20)
        self.warmup = warmup
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_lambda(s, total_steps, warmup, config.lr_decay, config.decay_fraction))
        d_sae = job.module.d_sae
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.fired_epoch = torch.zeros(d_sae, dtype=torch.bool, device=device)
        self.input_scales = [1.0] * len(self.sites.inputs)
        self.output_scales = [1.0] * len(self.sites.outputs)
        self.acc: dict[str, torch.Tensor] = {}
        self.acc_steps = 0
        self.last: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []

    def fingerprint(self, config: TrainerConfig, source_identity: dict[str, Any]) -> str:
        payload = {"trainer": _fingerprint_fields(config), "dictionary": self.module.config(),
                   "lr": self.lr, "data": source_identity}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def stack(self, batch: Batch, sites: Sequence[str], scales: Sequence[float], device: torch.device) -> torch.Tensor:
        return _scaled(torch.stack([batch[hp] for hp in sites], dim=1).to(device, non_blocking=True), scales)

    def scales_folded(self) -> bool:
        """Whether some site was scaled (then ``fold_scaling`` must run at the end)."""
        return any(s != 1.0 for s in (*self.input_scales, *self.output_scales))


class Trainer:
    """Trains several dictionaries (a sweep, several hookpoints) on one stream of activations."""

    def __init__(self, jobs: Sequence[DictionaryJob], config: TrainerConfig | None = None, *,
                 dist: DistContext | None = None, progress: bool = True, run_name: str | None = None,
                 clock: Callable[[], float] = time.monotonic):
        """``clock`` (seconds) times ``checkpoint_every_minutes``; only rank 0's is read."""
        if not jobs:
            raise UsageError("nothing to train: no dictionaries given")
        names = [j.name for j in jobs]
        if len(set(names)) != len(names):
            raise UsageError(f"dictionary names must be unique; got {names}")
        self.jobs = list(jobs)
        self.config = config or TrainerConfig()
        for job in self.jobs:  # a missing method is named now, not after the last step
            type(job.module).check_contract(
                fold_scaling=self.config.normalise == "norm",
                why=" (normalised training, the default, folds its scales into the saved weights with it; "
                    "implement it or train with --normalise none)")
        self.dist = dist or current_dist()
        self.progress = progress
        self.run_name = run_name
        self.clock = clock
        self.resumed_from_step: int | None = None
        self.device = resolve_device(self.config.device, self.dist.local_rank)
        if self.config.batch_size % self.dist.world_size:
            raise UsageError(f"batch_size {self.config.batch_size} is not divisible by the "
                             f"{self.dist.world_size} data-parallel processes")
        for name, value in (("batch_size", self.config.batch_size), ("epochs", self.config.epochs),
                            ("log_every", self.config.log_every), ("init_rows", self.config.init_rows)):
            if value < 1:
                raise UsageError(f"bad value {value} for {name}; it must be a positive integer")
        if self.config.checkpoint_every < 0:
            raise UsageError(f"bad value {self.config.checkpoint_every} for checkpoint_every; accepted: a number "
                             "of steps >= 0 (0: no checkpoints by step count)")
        minutes = self.config.checkpoint_every_minutes
        if not (math.isfinite(minutes) and minutes >= 0):
            raise UsageError(f"bad value {minutes} for checkpoint_every_minutes; accepted: minutes >= 0, "
                             "fractions allowed (0: no checkpoints by wall time)")

    # -- data plumbing -------------------------------------------------------------------------

    def _local_batch_size(self) -> int:
        return self.config.batch_size // self.dist.world_size

    def _split_args(self) -> dict[str, Any]:
        return {"rank": self.dist.rank, "world_size": self.dist.world_size, "rank_split": self.config.rank_split}

    def _steps_per_epoch(self, source: BatchSource) -> int | None:
        n = source.n_batches(self._local_batch_size(), **self._split_args())
        if n is not None and self.dist.active:  # every rank must take the same number of steps
            n = int(self.dist.all_reduce(torch.tensor(n, dtype=torch.long, device=self.device), "min").item())
        return n

    def _epoch_batches(self, source: BatchSource, epoch: int, start_batch: int) -> Iterator[Batch]:
        return source.batches(self._local_batch_size(), epoch=epoch, seed=self.config.seed,
                              start_batch=start_batch, **self._split_args())

    # -- main loop -----------------------------------------------------------------------------

    def fit(self, source: BatchSource, *, resume: bool = True) -> list[TrainResult]:
        """Train every dictionary on ``source``; resume from the latest common checkpoint if ``resume``."""
        cfg = self.config
        for job in self.jobs:
            for hp in {*job.module.sites.inputs, *job.module.sites.outputs}:
                if hp not in source.hookpoints:
                    raise UsageError(f"dictionary {job.name!r} needs hookpoint {hp!r}, which the activation "
                                     f"stream lacks; it has: {', '.join(source.hookpoints)}")
        steps_per_epoch = self._steps_per_epoch(source)
        if steps_per_epoch is None and cfg.max_steps is None:
            raise UsageError("the length of the activation stream is unknown: give max_steps (--max_steps)")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise UsageError(f"batch_size {cfg.batch_size} is larger than the data: not one full batch per "
                             "epoch; lower --batch_size or cache more tokens")
        total = steps_per_epoch * cfg.epochs if steps_per_epoch is not None else cfg.max_steps
        assert total is not None
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        total_tokens = total * cfg.batch_size
        dead_tokens = cfg.dead_tokens if cfg.dead_tokens is not None else int(
            min(10_000_000, max(cfg.batch_size, total_tokens // 10)))
        torch.manual_seed(cfg.seed)
        states = [_JobState(job, cfg, total, self.device) for job in self.jobs]
        source_identity = source.identity()
        fingerprints = [st.fingerprint(cfg, source_identity) for st in states]

        step, epoch, batch_in_epoch = 0, 0, 0
        ckpt = self._find_resume_step(states) if resume else None
        self.resumed_from_step = None
        if ckpt is not None:
            step, epoch, batch_in_epoch = self._load_checkpoints(states, fingerprints, ckpt)
            self.resumed_from_step = step
            self._announce_resume(states, step, epoch, total)
        else:
            self._initialise(states, source)
            for st in states:
                self._reset_log(st, 0)
        self.dead_tokens = dead_tokens

        wandb_run = self._wandb_init(states, total) if cfg.wandb_project and self.dist.is_main else None
        display = _Display(states, total, step, enabled=self.progress and self.dist.is_main)
        t_start, tokens_start = time.perf_counter(), step * cfg.batch_size
        last_checkpoint_time = self.clock()
        try:
            with display:
                while step < total and epoch < cfg.epochs:
                    if batch_in_epoch == 0:
                        for st in states:
                            st.fired_epoch.zero_()
                    got_batch = False
                    for batch in self._epoch_batches(source, epoch, batch_in_epoch):
                        got_batch = True
                        for st in states:
                            self._train_step(st, batch, dead_tokens)
                        del batch
                        release_free_heap()  # flat peak RSS: a step's freed buffers go back to the OS
                        step += 1
                        batch_in_epoch += 1
                        epoch_done = steps_per_epoch is not None and batch_in_epoch >= steps_per_epoch
                        if step % cfg.log_every == 0 or step == total:
                            elapsed = max(1e-9, time.perf_counter() - t_start)
                            rate = (step * cfg.batch_size - tokens_start) / elapsed
                            for st in states:
                                entry = self._log(st, step, epoch, rate)
                                if wandb_run is not None:
                                    wandb_run.log({f"{st.job.name}/{k}": v for k, v in entry.items()
                                                   if isinstance(v, (int, float))}, step=step)
                        display.update(step)
                        if step < total and self._checkpoint_due(step, last_checkpoint_time):
                            position = (epoch + 1, 0) if epoch_done else (epoch, batch_in_epoch)
                            self._save_checkpoints(states, fingerprints, step, *position)
                            last_checkpoint_time = self.clock()
                        if step >= total or epoch_done:
                            break
                    if not got_batch and batch_in_epoch == 0:
                        break  # the stream is empty
                    epoch, batch_in_epoch = epoch + 1, 0
        finally:
            if wandb_run is not None:
                wandb_run.finish()
        return [self._finish(st, step) for st in states]

    def _checkpoint_due(self, step: int, last_checkpoint_time: float) -> bool:
        """True when a checkpoint is due after ``step``: every ``checkpoint_every`` steps, or once
        ``checkpoint_every_minutes`` have passed since ``last_checkpoint_time``. The clock is read on
        logging steps only (``log_every``), which already wait for the device: reading a broadcast flag
        every step would stall a GPU. Rank 0's clock decides and is broadcast: ranks' clocks differ, and
        every rank must enter the checkpoint's barrier."""
        cfg = self.config
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            return True
        if not cfg.checkpoint_every_minutes or step % cfg.log_every:
            return False
        due = self.clock() - last_checkpoint_time >= 60.0 * cfg.checkpoint_every_minutes
        if self.dist.active:
            flag = torch.tensor([1 if due else 0], dtype=torch.uint8, device=self.device)
            due = bool(self.dist.broadcast(flag, src=0).item())
        return due

    def _announce_resume(self, states: list[_JobState], step: int, epoch: int, total: int) -> None:
        """Say on stderr and in each training log that this run continues from checkpoint ``step``."""
        if not self.dist.is_main:
            return
        names = ", ".join(st.job.name for st in states)
        print(f"resumed from step {step} of {total} ({names}: {CHECKPOINT_DIR}/step_{step:09d})",
              file=sys.stderr, flush=True)
        for st in states:
            assert st.job.out_dir is not None
            entry = {"event": "resumed", "step": step, "tokens": step * self.config.batch_size, "epoch": epoch,
                     "checkpoint": f"{CHECKPOINT_DIR}/step_{step:09d}"}
            with open(st.job.out_dir / TRAINING_LOG, "a") as fh:
                fh.write(json.dumps(entry) + "\n")

    def _initialise(self, states: list[_JobState], source: BatchSource) -> None:
        cfg = self.config
        sample = source.sample(init_rows(cfg.init_rows, [st.sites for st in states]), seed=cfg.seed)
        for st in states:
            sites = st.sites
            x = torch.stack([sample[hp] for hp in sites.inputs], dim=1).float().to(self.device)
            y = x if sites.is_autoencoder else torch.stack([sample[hp] for hp in sites.outputs], dim=1).float().to(self.device)
            if cfg.normalise == "norm":
                st.input_scales = _norm_scales(x, self.dist)
                st.output_scales = list(st.input_scales) if sites.is_autoencoder else _norm_scales(y, self.dist)
            x = _scaled(x, st.input_scales, inplace=True)  # stacked: fresh tensors
            y = x if sites.is_autoencoder else _scaled(y, st.output_scales, inplace=True)
            with torch.no_grad():
                st.module.initialize_from_data(x, y)
            del x, y
            # Every rank must start from rank 0's weights.
            for t in st.module.state_dict().values():
                self.dist.broadcast(t)
        del sample
        release_free_heap()

    def _train_step(self, st: _JobState, batch: Batch, dead_tokens: int) -> None:
        sites = st.sites
        x = st.stack(batch, sites.inputs, st.input_scales, self.device)
        y = None if sites.is_autoencoder else st.stack(batch, sites.outputs, st.output_scales, self.device)
        dead_mask = st.tokens_since_fired >= dead_tokens
        out = st.module(x, target=y, dead_mask=dead_mask)
        loss = sum(out.losses.values())
        st.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.dist.active:
            _all_reduce_grads(st.module, self.dist)
        if st.fused:
            for p in st.module.parameters():
                if p.grad is not None and not p.grad.is_contiguous():
                    p.grad = p.grad.contiguous()
        st.module.before_optimizer_step()
        st.optimizer.step()
        st.scheduler.step()
        st.module.after_optimizer_step()
        if self.dist.active:
            st.module.synchronize(self.dist.all_reduce_mean)
        with torch.no_grad():
            target = x if y is None else y
            fired = out.fired()  # from the sparse codes when there are some: no dense [batch, d_sae]
            if self.dist.active:
                fired = self.dist.all_reduce(fired.to(torch.uint8), "max").bool()
            st.tokens_since_fired.add_(self.config.batch_size).masked_fill_(fired, 0)
            st.fired_epoch |= fired
            err = (out.reconstruction - target).pow(2).sum()
            var = (target - target.mean(0)).pow(2).sum()
            values = {"loss": loss.detach(), **{k: v.detach() for k, v in out.losses.items()},
                      "fvu": err / var.clamp_min(1e-12),
                      "l0": out.l0(),
                      "dead_frac": dead_mask.float().mean()}
            for k, v in values.items():
                v = v.float()
                st.acc[k] = st.acc[k] + v if k in st.acc else v.clone()
        st.acc_steps += 1

    # -- logging -------------------------------------------------------------------------------

    def _log(self, st: _JobState, step: int, epoch: int, rate: float) -> dict[str, Any]:
        keys = sorted(st.acc)
        if keys:
            vec = torch.stack([st.acc[k] for k in keys]) / max(1, st.acc_steps)
            self.dist.all_reduce_mean(vec)
            st.last = dict(zip(keys, vec.tolist(), strict=True))
        st.acc, st.acc_steps = {}, 0
        entry = {"step": step, "tokens": step * self.config.batch_size, "epoch": epoch,
                 "lr": st.optimizer.param_groups[0]["lr"], **st.last, "tokens_per_s": rate}
        st.history.append(entry)
        if self.dist.is_main and st.job.out_dir is not None:
            with open(st.job.out_dir / TRAINING_LOG, "a") as fh:
                fh.write(json.dumps(entry) + "\n")
        return entry

    def _reset_log(self, st: _JobState, keep_until_step: int) -> None:
        """Start the JSONL log afresh, or cut it back to the resumed step."""
        if not self.dist.is_main or st.job.out_dir is None:
            return
        st.job.out_dir.mkdir(parents=True, exist_ok=True)
        path = st.job.out_dir / TRAINING_LOG
        kept: list[str] = []
        if keep_until_step and path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= keep_until_step:
                        kept.append(line)
                except ValueError:
                    break  # a line torn by a kill
        path.write_text("".join(line + "\n" for line in kept))

    def _wandb_init(self, states: list[_JobState], total: int) -> Any:
        try:
            import wandb
        except ImportError:
            raise UsageError("Weights & Biases logging asked for (wandb_project) but wandb is not installed; "
                             "pip install wandb, or drop --wandb_project") from None
        config = {"trainer": self.config.model_dump(mode="json"), "total_steps": total,
                  "dictionaries": {st.job.name: {**st.module.config(), "lr": st.lr} for st in states}}
        out = next((st.job.out_dir for st in states if st.job.out_dir is not None), None)
        return wandb.init(project=self.config.wandb_project, name=self.run_name, config=config,
                          dir=str(out.parent) if out is not None else None)

    # -- checkpoints ---------------------------------------------------------------------------

    def _save_checkpoints(self, states: list[_JobState], fingerprints: list[str], step: int, epoch: int,
                          batch_in_epoch: int) -> None:
        if self.dist.is_main:
            for st, fp in zip(states, fingerprints, strict=True):
                if st.job.out_dir is None:
                    continue
                save_checkpoint(st, st.job.out_dir / CHECKPOINT_DIR, step=step, epoch=epoch,
                                batch_in_epoch=batch_in_epoch, fingerprint=fp,
                                keep=self.config.keep_checkpoints)
        self.dist.barrier()

    def _find_resume_step(self, states: list[_JobState]) -> int | None:
        common: set[int] | None = None
        for st in states:
            if st.job.out_dir is None:
                return None
            steps = set(list_checkpoints(st.job.out_dir / CHECKPOINT_DIR))
            common = steps if common is None else common & steps
        return max(common) if common else None

    def _load_checkpoints(self, states: list[_JobState], fingerprints: list[str],
                          step: int) -> tuple[int, int, int]:
        position = (0, 0, 0)
        for st, fp in zip(states, fingerprints, strict=True):
            assert st.job.out_dir is not None
            meta = load_checkpoint(st, st.job.out_dir / CHECKPOINT_DIR / f"step_{step:09d}", fingerprint=fp,
                                   device=self.device)
            position = (meta["step"], meta["epoch"], meta["batch_in_epoch"])
            self._reset_log(st, step)
        return position

    # -- end -----------------------------------------------------------------------------------

    def _finish(self, st: _JobState, step: int) -> TrainResult:
        module = st.module
        module.eval()
        if st.scales_folded():
            with torch.no_grad():
                module.fold_scaling(torch.tensor(st.input_scales, dtype=torch.float64),
                                    torch.tensor(st.output_scales, dtype=torch.float64))
        result = TrainResult(
            name=st.job.name, module=module, steps=step, tokens=step * self.config.batch_size,
            metrics=dict(st.last), dead_final_epoch=float(1.0 - st.fired_epoch.float().mean().item()),
            input_scales=list(st.input_scales), output_scales=list(st.output_scales), folded=True, lr=st.lr, history=st.history,
            out_dir=st.job.out_dir, tokens_since_fired=st.tokens_since_fired.detach().cpu(),
            resumed_from_step=self.resumed_from_step)
        if self.dist.is_main and st.job.out_dir is not None:
            save_trained(result, self.config, st, extra_cfg=st.job.extra_cfg, dead_tokens=self.dead_tokens)
        self.dist.barrier()
        return result


class _Display:
    """Rich progress: one row per dictionary with loss, FVU, L0 and dead %."""

    def __init__(self, states: list[_JobState], total: int, start: int, enabled: bool):
        self.states = states
        self.enabled = enabled
        self.prog = None
        if enabled:
            from rich.progress import TextColumn

            from .progress import progress

            self.prog = progress(TextColumn("{task.fields[metrics]}"))
            self.tasks = [self.prog.add_task(st.job.name, total=total, completed=start, metrics="")
                          for st in states]

    def __enter__(self) -> _Display:
        if self.prog is not None:
            self.prog.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.prog is not None:
            self.prog.__exit__(*exc)

    def update(self, step: int) -> None:
        if self.prog is None:
            return
        for st, task in zip(self.states, self.tasks, strict=True):
            m = st.last
            text = (f"loss {m.get('loss', float('nan')):.4g}  FVU {m.get('fvu', float('nan')):.3f}  "
                    f"L0 {m.get('l0', float('nan')):.1f}  dead {100 * m.get('dead_frac', 0.0):.1f}%") if m else ""
            self.prog.update(task, completed=step, metrics=text)


def _norm_scales(x: torch.Tensor, dist: DistContext) -> list[float]:
    """``sqrt(d / E|x_i|^2)`` for each site ``i`` of ``x [N, n_sites, d]`` (averaged over ranks)."""
    scales = []
    for i in range(x.shape[1]):
        mean_sq = x[:, i:i + 1].pow(2).sum(-1).mean().reshape(1).double()
        dist.all_reduce_mean(mean_sq)
        value = float(mean_sq.item())
        if not math.isfinite(value) or value <= 0:
            raise UsageError(f"cannot normalise activations of site {i}: their mean squared norm is zero or "
                             f"not finite")
        scales.append(math.sqrt(x.shape[-1] / value))
    return scales


def _scaled(x: torch.Tensor, scales: Sequence[float], inplace: bool = False) -> torch.Tensor:
    """``x [N, n_sites, d]`` with site ``i`` multiplied by ``scales[i]`` (one Python-float product when
    every site shares a scale, so a single site is scaled exactly as by a scalar); ``inplace`` overwrites
    ``x`` (no second copy of a large sample)."""
    factor = scales[0] if len(set(scales)) == 1 else torch.tensor(scales, dtype=x.dtype, device=x.device)[:, None]
    return x.mul_(factor) if inplace else x * factor


INIT_SAMPLE_BYTES = 2 * 1024**3
"""Most memory the initialisation sample of one dictionary may take as float32 inputs and targets."""


def init_rows(requested: int, dictionaries: Sequence[SiteSpec]) -> int:
    """Rows of the initialisation sample: ``requested``, lowered so that the widest dictionary's float32
    inputs and targets fit ``INIT_SAMPLE_BYTES`` (never below 1024)."""
    row_bytes = max(4 * (len(s.inputs) * s.d_in + (0 if s.is_autoencoder else len(s.outputs) * s.d_out))
                    for s in dictionaries)
    return min(requested, max(1024, INIT_SAMPLE_BYTES // row_bytes))


def _all_reduce_grads(module: nn.Module, dist: DistContext) -> None:
    """Average gradients across ranks with one flat all-reduce."""
    params = [p for p in module.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce_mean(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


# --------------------------------------------------------------------------------------------------
# Checkpoints (safetensors + JSON; no pickle)


def list_checkpoints(directory: Path) -> list[int]:
    """Steps of the complete checkpoints in ``directory`` (a checkpoint is complete once renamed)."""
    if not directory.is_dir():
        return []
    steps = []
    for child in directory.iterdir():
        if child.is_dir() and child.name.startswith("step_") and not child.name.endswith(".tmp"):
            if (child / "state.json").is_file() and (child / "state.safetensors").is_file():
                steps.append(int(child.name[5:]))
    return sorted(steps)


def save_checkpoint(st: _JobState, directory: Path, *, step: int, epoch: int, batch_in_epoch: int,
                    fingerprint: str, keep: int) -> Path:
    """Write one checkpoint atomically (temporary directory renamed when complete); prune old ones."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{step:09d}"
    tmp = directory / f"step_{step:09d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors: dict[str, torch.Tensor] = {}
    for k, v in st.module.state_dict().items():
        tensors[f"model.{k}"] = v
    opt = st.optimizer.state_dict()
    opt_meta: dict[str, Any] = {"param_groups": opt["param_groups"], "state": {}}
    for idx, pstate in opt["state"].items():
        opt_meta["state"][str(idx)] = {}
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
                opt_meta["state"][str(idx)][key] = "tensor"
            else:
                opt_meta["state"][str(idx)][key] = value
    tensors["trainer.tokens_since_fired"] = st.tokens_since_fired
    tensors["trainer.fired_epoch"] = st.fired_epoch.to(torch.uint8)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    for k, v in st.acc.items():
        tensors[f"acc.{k}"] = v.reshape(1)
    try:
        with safetensors_os_errors(tmp / "state.safetensors"):  # a full disk: the CLI's one-line error
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sched = st.scheduler.state_dict()  # lr_lambdas are plain functions: stored as None
    meta = {"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "fingerprint": fingerprint,
            "input_scales": st.input_scales, "output_scales": st.output_scales, "optimizer": opt_meta,
            "scheduler": sched, "acc_steps": st.acc_steps, "last": st.last, "dictionary": st.module.config()}
    (tmp / "state.json").write_text(json.dumps(meta, default=str))
    _fsync_dir(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(directory)
    for old in list_checkpoints(directory)[:-max(1, keep)]:
        shutil.rmtree(directory / f"step_{old:09d}", ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    for child in path.iterdir() if path.is_dir() else []:
        if child.is_file():
            with open(child, "rb") as fh:
                os.fsync(fh.fileno())
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(st: _JobState, path: Path, *, fingerprint: str, device: torch.device) -> dict[str, Any]:
    """Restore one dictionary's training state from ``path``; returns the checkpoint's JSON data."""
    from safetensors.torch import load_file

    meta = json.loads((path / "state.json").read_text())
    if meta.get("fingerprint") != fingerprint:
        raise UsageError(f"checkpoint {path} was written by a run with other options or data; "
                         "train with the same options, or start afresh (--overwrite train)")
    tensors = load_file(str(path / "state.safetensors"))
    model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    st.module.load_state_dict(model_state)
    opt_meta = meta["optimizer"]
    state: dict[int, dict[str, Any]] = {}
    for idx, entries in opt_meta["state"].items():
        state[int(idx)] = {key: (tensors[f"optim.{idx}.{key}"] if value == "tensor" else value)
                           for key, value in entries.items()}
    st.optimizer.load_state_dict({"state": state, "param_groups": opt_meta["param_groups"]})
    st.scheduler.load_state_dict(meta["scheduler"])
    st.tokens_since_fired = tensors["trainer.tokens_since_fired"].to(device)
    st.fired_epoch = tensors["trainer.fired_epoch"].bool().to(device)
    st.input_scales = _checkpoint_scales(meta, "input", len(st.sites.inputs), path)
    st.output_scales = _checkpoint_scales(meta, "output", len(st.sites.outputs), path)
    st.acc = {k[4:]: v.reshape(()).to(device) for k, v in tensors.items() if k.startswith("acc.")}
    st.acc_steps, st.last = meta["acc_steps"], meta["last"]
    torch.set_rng_state(tensors["rng.cpu"])
    if torch.cuda.is_available():
        cuda_states = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count())
                       if f"rng.cuda.{i}" in tensors]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
    return meta


def _checkpoint_scales(meta: Mapping[str, Any], what: str, n_sites: int, path: Path) -> list[float]:
    """A checkpoint's per-site scales; a checkpoint from before per-site scales holds one scalar
    (``input_scale``), which applied to every site."""
    if f"{what}_scales" in meta:
        scales = [float(s) for s in meta[f"{what}_scales"]]
    elif f"{what}_scale" in meta:
        scales = [float(meta[f"{what}_scale"])] * n_sites
    else:
        raise UsageError(f"checkpoint {path} has no {what}_scales; start afresh (--overwrite train)")
    if len(scales) != n_sites:
        raise UsageError(f"checkpoint {path} has {len(scales)} {what} scales for {n_sites} {what} sites; "
                         "start afresh (--overwrite train)")
    return scales


# --------------------------------------------------------------------------------------------------
# Saving


def save_trained(result: TrainResult, config: TrainerConfig, st: _JobState | None = None, *,
                 extra_cfg: Mapping[str, Any] | None = None, dead_tokens: int | None = None) -> Path:
    """Save a trained (folded) dictionary to ``result.out_dir`` in the saelab format, with the
    normalisation and training summary in ``cfg.json``."""
    from .dictionary import save_dictionary

    assert result.out_dir is not None
    training = {
        "steps": result.steps, "tokens": result.tokens, "final_metrics": result.metrics,
        "dead_final_epoch": result.dead_final_epoch, "dead_tokens": dead_tokens,
        "lr": st.lr if st is not None else None, "warmup_steps": st.warmup if st is not None else None,
        "trainer": config.model_dump(mode="json"),
    }
    extra = {
        **dict(extra_cfg or {}),
        "normalisation": {
            "method": config.normalise, "input_scales": result.input_scales,
            "output_scales": result.output_scales, "folded": result.folded,
            "note": "training saw each input site i as x_i*input_scales[i] and each output site j as "
                    "y_j*output_scales[j]; the scales are folded into the saved weights, which take and "
                    "return raw activations",
        },
        "training": training,
    }
    save_dictionary(result.module, result.out_dir, extra)
    return result.out_dir


# --------------------------------------------------------------------------------------------------
# In-memory convenience


def train_on_tensors(
    dictionary: SparseDictionary | Sequence[SparseDictionary],
    x: torch.Tensor | Mapping[str, torch.Tensor],
    target: torch.Tensor | None = None,
    config: TrainerConfig | Mapping[str, Any] | None = None,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
    resume: bool = True,
    **overrides: Any,
) -> TrainResult | list[TrainResult]:
    """Train dictionaries in place on in-memory activations (synthetic data, tests, notebooks).

    ``x`` is ``[N, d_in]`` (one input site), ``[N, n_inputs, d_in]``, or ``{hookpoint: [N, d]}`` covering
    every site of every dictionary; ``target`` (``[N, d_out]`` / ``[N, n_outputs, d_out]``) is for
    dictionaries that reconstruct another site (transcoders). ``config`` fields may also be given as
    keyword ``overrides`` (``train_on_tensors(sae, x, batch_size=256, epochs=5)``). After training the
    normalisation is folded in: each module maps raw inputs to raw targets. With ``out_dir``, each
    dictionary is saved (and checkpointed) under ``out_dir/<i or name>/``. Returns one
    :class:`TrainResult` (several for a list of dictionaries).
    """
    single = isinstance(dictionary, SparseDictionary)
    modules = [dictionary] if single else list(dictionary)  # type: ignore[list-item]
    base = config.model_dump() if isinstance(config, TrainerConfig) else dict(config or {})
    cfg = TrainerConfig.parse({**base, **overrides}, where="trainer")
    data = _tensor_batches(modules[0].sites, x, target)
    root = Path(out_dir) if out_dir is not None else None
    names = [modules[0].name] if single else [f"{i}_{m.name}" for i, m in enumerate(modules)]
    jobs = [DictionaryJob(name=n, module=m, out_dir=root / n if root is not None else None)
            for n, m in zip(names, modules, strict=True)]
    results = Trainer(jobs, cfg, progress=progress).fit(TensorSource(data), resume=resume)
    return results[0] if single else results


def _tensor_batches(sites: SiteSpec, x: torch.Tensor | Mapping[str, torch.Tensor],
                    target: torch.Tensor | None) -> dict[str, torch.Tensor]:
    if isinstance(x, Mapping):
        return {hp: t.float() for hp, t in x.items()}
    data: dict[str, torch.Tensor] = {}

    def put(names: Sequence[str], t: torch.Tensor, what: str) -> None:
        if t.dim() == 2:
            t = t.unsqueeze(1)
        if t.dim() != 3 or t.shape[1] != len(names):
            raise UsageError(f"{what} must be [N, d] or [N, {len(names)}, d] for sites {list(names)}; "
                             f"got shape {tuple(t.shape)}")
        for i, hp in enumerate(names):
            data[hp] = t[:, i].float()

    put(sites.inputs, x, "x")
    if not sites.is_autoencoder:
        if target is None:
            raise UsageError(f"dictionary reads {sites.inputs} and writes {sites.outputs}: give target=")
        put(sites.outputs, target, "target")
    elif target is not None:
        raise UsageError("target= is only for dictionaries whose outputs differ from their inputs")
    return data

