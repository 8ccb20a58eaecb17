"""The streamed activation cache: writer, reader, manifest, fingerprint, verification and resume.

A cache lives in ``<store>/<fingerprint>/`` (default store ``results/.activations/``)::

    manifest.json                                   rewritten atomically after every shard
    tokens/000000.safetensors                       {"tokens": int32 [n_seq, ctx_len]}
    activations/<hookpoint>/000000.safetensors      {"activations": float32|float16 [n_seq, ctx_len, d]}
    .lock                                           held (flock) by the process writing the cache

The fingerprint hashes everything that changes the cached values: model identity (id, weights
hash or revision, dtype), tokenizer, hookpoints, dataset identity (repo, name, split, column and a
content hash for local data), the tokenisation scheme (BOS/EOS handling, :mod:`saelab.data`),
``n_tokens``, ``ctx_len`` and the cache dtype. Batch size and shard size are not in it: any run with
the same inputs reuses the cache whatever its name, and so does a run asking for fewer hookpoints of a
complete cache (:func:`find_activation_cache`; it reads only the hookpoints it asks for).

Each batch's activations are appended to the open shard files as soon as they are computed (the
writer holds one batch, never a shard or the cache; :class:`~saelab.fileio.StreamedSafetensorsFile`),
a shard's files appear under their names when it is complete, and the manifest lists each finished
shard with its files' sizes and sha256. A killed run resumes after its last listed shard: batches
restart at every shard boundary, so the resumed cache is byte-identical to an uninterrupted one
with the same batch size.

A paired cache of two models (:mod:`saelab.paired`) stores the tokens once and one folder per labelled
site (``activations/layers.6@A/``, ``activations/layers.6@B/``); built in two passes
(``paired_pass="two"``), model B's files are added to the shards model A wrote, and a shard is listed with
B's files once they are all complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import SecretStr
from rich.progress import ProgressColumn
from rich.text import Text
from safetensors import safe_open

from .data import WindowSpec, iter_windows, n_windows_for, tokenizer_identity, warn_data_exhausted
from .errors import CorruptCacheError, UsageError
from .fileio import (
    DirectoryLock,
    StreamedSafetensorsFile,
    file_sha256,
    json_sha256,
    now_iso,
    read_manifest,
    remove_stale_temporaries,
    save_safetensors_atomic,
    temporary_owner,
    write_json_atomic,
)
from .interfaces import ActivationSource, Dataset
from .memory import release_free_heap
from .options import Options
from .paired import LABELS, PairedSource, paired_sites, split_site
from .positions import PositionFilter

FORMAT = "saelab-activation-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FP16_MAX = 65504.0
DTYPES = {"float32": torch.float32, "float16": torch.float16}
"""Accepted cache dtypes."""
SHARD_TARGET_BYTES = 128 * 2**20
"""Default shard size: about this many bytes per hookpoint file."""


class Fp16RangeWarning(UserWarning):
    """Activations beyond the float16 range were clamped to +-65504 while caching in float16."""


class PartialDataRemovedWarning(UserWarning):
    """Partial files of an interrupted (killed) cache run were deleted before rebuilding."""


REQUESTS_DIR = ".requests"
"""Store subdirectory mapping request keys (the flags as given) to the fingerprint directory being built,
so that a second run of the same request finds the lock before it loads the model."""


# --------------------------------------------------------------------------------------------------
# Fingerprint and manifest helpers


def fingerprint_inputs(
    source: ActivationSource,
    dataset: Dataset,
    hookpoints: Sequence[str],
    *,
    n_tokens: int,
    ctx_len: int,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Everything that changes the cached values, as JSON data (hashed by :func:`fingerprint`)."""
    return {
        "format_version": FORMAT_VERSION,
        "model": source.identity(),
        "tokenizer": tokenizer_identity(source.tokenizer),
        "hookpoints": sorted(hookpoints),
        "dataset": dataset.identity(),
        "tokenization": WindowSpec.for_tokenizer(source.tokenizer, ctx_len).identity(),
        "n_tokens": int(n_tokens),
        "ctx_len": int(ctx_len),
        "dtype": dtype,
    }


def fingerprint(inputs: dict[str, Any]) -> str:
    """Short stable hash of fingerprint inputs (canonical JSON, sha256, 20 hex digits)."""
    return json_sha256(inputs, 20, ensure_ascii=True, default=str)


def _shard_name(index: int) -> str:
    return f"{index:06d}.safetensors"


def _file_entry(root: Path, rel: str) -> dict[str, Any]:
    path = root / rel
    return {"path": rel, "size": path.stat().st_size, "sha256": file_sha256(path)}


def _shard_files(shard: dict[str, Any]) -> list[dict[str, Any]]:
    return [shard["files"]["tokens"], *shard["files"]["activations"].values()]


def _check_file(root: Path, entry: dict[str, Any], checksums: bool) -> None:
    path = root / entry["path"]
    if not path.is_file():
        raise CorruptCacheError(f"activation cache shard {path} is missing; rebuild with --overwrite cache")
    size = path.stat().st_size
    if size != entry["size"]:
        raise CorruptCacheError(
            f"activation cache shard {path} is truncated or altered ({size} bytes, manifest says "
            f"{entry['size']}); rebuild with --overwrite cache"
        )
    if checksums and file_sha256(path) != entry["sha256"]:
        raise CorruptCacheError(
            f"activation cache shard {path} is corrupted (sha256 differs from the manifest); "
            f"rebuild with --overwrite cache"
        )


def _read_manifest(directory: Path) -> dict[str, Any]:
    return read_manifest(directory, fmt=FORMAT, version=FORMAT_VERSION, what="activation cache", name=MANIFEST)


def _seed(*parts: Any) -> int:
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


# --------------------------------------------------------------------------------------------------
# Reader


class ActivationCache:
    """A complete activation cache on disk, read shard by shard.

    ``iter_batches`` yields shuffled rows (one row = one token position) of several hookpoints at
    once, aligned across hookpoints, with memory bounded by ``shuffle_buffer_shards`` shards.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = Path(path)
        """The cache directory."""
        self.manifest = manifest
        """The parsed ``manifest.json``."""
        self.hookpoints: list[str] = list(manifest["hookpoints"])
        """Cached hookpoints, in the order they were requested."""
        self.ctx_len: int = int(manifest["ctx_len"])
        """Tokens per cached sequence."""
        self.n_sequences: int = int(manifest["n_sequences"])
        """Cached sequences."""
        self.n_tokens: int = self.n_sequences * self.ctx_len
        """Cached tokens (``n_sequences * ctx_len``; may be below the request if the data ran out)."""
        self._tokens: torch.Tensor | None = None
        self.build_info: dict[str, Any] = {"status": "opened"}
        """How :func:`build_activation_cache` got this cache: ``status`` (reused, resumed, built, or
        opened when read with :meth:`open`), ``seconds`` and ``tokens_written``; a reused cache that holds
        more hookpoints than were asked for adds ``covering: True`` and ``requested_hookpoints``."""

    # ---- opening and metadata

    @classmethod
    def open(cls, path: Path | str, *, checksums: bool = False) -> ActivationCache:
        """Open a complete cache directory (or its ``manifest.json``); checks file sizes, and sha256
        too when ``checksums``. Missing or incomplete caches are one-line errors."""
        path = Path(path)
        if path.name == MANIFEST:
            path = path.parent
        if not (path / MANIFEST).is_file():
            raise UsageError(
                f"activation cache {str(path)!r} does not exist (no {MANIFEST}); build one with `saelab cache`"
            )
        manifest = _read_manifest(path)
        if not manifest.get("complete"):
            raise UsageError(
                f"activation cache {str(path)!r} is incomplete ({len(manifest.get('shards', []))} shards written); "
                f"rerun the same `saelab cache` command to resume it"
            )
        cache = cls(path, manifest)
        cache.verify(checksums=checksums)
        return cache

    @property
    def fingerprint(self) -> str:
        """The cache's fingerprint (its directory name in the store)."""
        return str(self.manifest["fingerprint"])

    def size_on_disk(self) -> int:
        """Bytes of the cache's shard files (tokens and activations), as its manifest lists them."""
        return sum(f["size"] for shard in self.shards
                   for f in (shard["files"]["tokens"], *shard["files"]["activations"].values()))

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the activations."""
        return DTYPES[self.manifest["dtype"]]

    @property
    def bos_token_id(self) -> int | None:
        """The BOS token at position 0 of every sequence, if the tokenizer has one."""
        return self.manifest["tokenization"]["bos_token_id"]

    @property
    def shards(self) -> list[dict[str, Any]]:
        """Manifest entries of the shards, in order."""
        return list(self.manifest["shards"])

    def dim(self, hookpoint: str) -> int:
        """Width of the activations at ``hookpoint``."""
        self._check_hookpoints([hookpoint])
        return int(self.manifest["dims"][hookpoint])

    def verify(self, checksums: bool = True) -> None:
        """Check every shard file against the manifest (size; sha256 when ``checksums``);
        a missing, truncated or corrupted shard raises :class:`CorruptCacheError` naming it."""
        total = 0
        for shard in self.manifest["shards"]:
            for entry in _shard_files(shard):
                _check_file(self.path, entry, checksums)
            total += shard["n_sequences"]
        if total != self.n_sequences:
            raise CorruptCacheError(
                f"activation cache manifest {self.path / MANIFEST} is inconsistent: shards hold {total} "
                f"sequences, manifest says {self.n_sequences}"
            )

    def _check_hookpoints(self, hookpoints: Sequence[str]) -> list[str]:
        if isinstance(hookpoints, str):
            hookpoints = [hookpoints]
        if not hookpoints:
            raise UsageError(f"no hookpoints asked of activation cache {self.path}; cached: {', '.join(self.hookpoints)}")
        for hp in hookpoints:
            if hp not in self.hookpoints:
                raise UsageError(
                    f"hookpoint {hp!r} is not in activation cache {self.path}; cached hookpoints: "
                    f"{', '.join(self.hookpoints)}"
                )
        return list(hookpoints)

    # ---- raw shard access

    def _load(self, entry: dict[str, Any], key: str) -> torch.Tensor:
        path = self.path / entry["path"]
        try:
            with safe_open(str(path), framework="pt") as fh:
                return fh.get_tensor(key)
        except Exception as exc:  # safetensors raises several types for damaged files
            raise CorruptCacheError(
                f"activation cache shard {path} cannot be read ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); rebuild with --overwrite cache"
            ) from None

    def shard_tokens(self, shard: int) -> torch.Tensor:
        """Tokens ``[n_seq, ctx_len]`` (int32) of one shard."""
        return self._load(self.manifest["shards"][shard]["files"]["tokens"], "tokens")

    def shard_activations(self, hookpoint: str, shard: int) -> torch.Tensor:
        """Activations ``[n_seq, ctx_len, d]`` (storage dtype) of one shard."""
        self._check_hookpoints([hookpoint])
        entry = self.manifest["shards"][shard]["files"]["activations"][hookpoint]
        tensor = self._load(entry, "activations")
        expected = (self.manifest["shards"][shard]["n_sequences"], self.ctx_len, self.dim(hookpoint))
        if tuple(tensor.shape) != expected:
            raise CorruptCacheError(
                f"activation cache shard {self.path / entry['path']} has shape {tuple(tensor.shape)}, "
                f"manifest says {expected}; rebuild with --overwrite cache"
            )
        return tensor

    def tokens(self) -> torch.Tensor:
        """All cached tokens ``[n_sequences, ctx_len]`` (int32), in cache order."""
        if self._tokens is None:
            parts = [self.shard_tokens(i) for i in range(len(self.manifest["shards"]))]
            self._tokens = torch.cat(parts) if parts else torch.zeros(0, self.ctx_len, dtype=torch.int32)
        return self._tokens

    def iter_sequences(
        self, hookpoints: Sequence[str], batch_size: int, *, dtype: torch.dtype = torch.float32
    ) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """Whole sequences in cache order: ``(tokens [B, ctx_len], {hookpoint: [B, ctx_len, d]})``,
        one shard in memory at a time (for latent statistics and example windows)."""
        hookpoints = self._check_hookpoints(hookpoints)
        if batch_size < 1:
            raise UsageError(f"bad batch size {batch_size}; accepted: a positive integer")
        for index in range(len(self.manifest["shards"])):
            tokens = self.shard_tokens(index)
            acts = {hp: self.shard_activations(hp, index) for hp in hookpoints}
            for start in range(0, tokens.shape[0], batch_size):
                yield tokens[start:start + batch_size], {
                    hp: a[start:start + batch_size].to(dtype) for hp, a in acts.items()
                }

    # ---- row selection

    def _kept_rows(self, shard: int, exclude_positions: Sequence[int], exclude_bos: bool) -> torch.Tensor:
        """Flat row indices (into ``n_seq * ctx_len``) of one shard that survive the exclusions
        (:class:`saelab.positions.PositionFilter`)."""
        filt = PositionFilter.of(exclude_positions, exclude_bos)
        if filt.exclude_bos and self.bos_token_id is not None:
            keep = filt.keep_mask(self.shard_tokens(shard), self.bos_token_id)
        else:
            n_seq = self.manifest["shards"][shard]["n_sequences"]
            keep = filt.keep_mask(torch.empty(n_seq, self.ctx_len, dtype=torch.uint8), None)  # tokens unread
        return keep.flatten().nonzero().squeeze(1)

    def _shard_counts(self, exclude_positions: Sequence[int], exclude_bos: bool) -> list[int]:
        filt = PositionFilter.of(exclude_positions, exclude_bos)
        counts = []
        for index, shard in enumerate(self.manifest["shards"]):
            if filt.exclude_bos and self.bos_token_id is not None:
                counts.append(int(self._kept_rows(index, exclude_positions, True).numel()))
            else:
                counts.append(filt.kept_count(shard["n_sequences"], self.ctx_len))
        return counts

    # ---- batches

    def _plan(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        exclude_positions: Sequence[int],
        exclude_bos: bool,
        shuffle_buffer_shards: int,
        rank_split: str,
        drop_last: bool,
    ) -> tuple[list[tuple[list[int], int, int]], Iterator[tuple[int, int]], int]:
        """Groups ``(shards, stream_start, stream_stop)``, this rank's batch ranges over the group
        stream, and its row count."""
        if batch_size < 1:
            raise UsageError(f"bad batch size {batch_size}; accepted: a positive integer")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UsageError(f"bad rank {rank} for world size {world_size}; accepted: 0 <= rank < world_size")
        if shuffle_buffer_shards < 1:
            raise UsageError(f"bad shuffle_buffer_shards {shuffle_buffer_shards}; accepted: an integer >= 1")
        if rank_split not in ("rows", "shards"):
            raise UsageError(f"bad rank_split {rank_split!r}; accepted: rows, shards")
        counts = self._shard_counts(exclude_positions, exclude_bos)
        order = list(range(len(counts)))
        if shuffle:
            gen = torch.Generator().manual_seed(_seed(seed, epoch, "shards"))
            order = torch.randperm(len(order), generator=gen).tolist()

        def groups_of(shards: list[int]) -> list[tuple[list[int], int, int]]:
            groups, pos = [], 0
            for i in range(0, len(shards), shuffle_buffer_shards):
                members = shards[i:i + shuffle_buffer_shards]
                n = sum(counts[s] for s in members)
                groups.append((members, pos, pos + n))
                pos += n
            return groups

        if world_size == 1 or rank_split == "shards":
            mine = order[rank::world_size]
            groups = groups_of(mine)
            total = groups[-1][2] if groups else 0
            if world_size == 1:
                n_batches = total // batch_size if drop_last else math.ceil(total / batch_size)
            else:  # every rank yields the same number of full batches (lockstep for DDP)
                n_batches = min(sum(counts[s] for s in order[r::world_size]) for r in range(world_size)) // batch_size
            ranges = ((b * batch_size, min((b + 1) * batch_size, total)) for b in range(n_batches))
            n_rows = min(total, n_batches * batch_size)
            return groups, ranges, n_rows

        groups = groups_of(order)
        total = groups[-1][2] if groups else 0
        global_batch = batch_size * world_size
        full, rest = divmod(total, global_batch)
        split_rest = rest >= world_size and not drop_last

        def rows_ranges() -> Iterator[tuple[int, int]]:
            for b in range(full):
                start = b * global_batch + rank * batch_size
                yield start, start + batch_size
            if split_rest:  # the final partial global batch, split evenly over the ranks
                base = full * global_batch
                size, extra = divmod(rest, world_size)
                start = base + rank * size + min(rank, extra)
                yield start, start + size + (1 if rank < extra else 0)

        n_rows = full * batch_size
        if split_rest:
            n_rows += rest // world_size + (1 if rank < rest % world_size else 0)
        return groups, rows_ranges(), n_rows

    def n_rows(
        self,
        exclude_positions: Sequence[int] = (),
        exclude_bos: bool = False,
        rank: int = 0,
        world_size: int = 1,
        *,
        batch_size: int | None = None,
        rank_split: str = "rows",
        drop_last: bool = False,
    ) -> int:
        """Rows ``iter_batches`` yields to ``rank`` in one epoch with the same arguments.

        Without ``batch_size`` (and ``world_size > 1``) this is the count for ``batch_size=1``:
        ``total // world_size`` rows for every rank.
        """
        _, _, n = self._plan(
            batch_size or 1, shuffle=False, seed=0, epoch=0, rank=rank, world_size=world_size,
            exclude_positions=exclude_positions, exclude_bos=exclude_bos, shuffle_buffer_shards=1,
            rank_split=rank_split, drop_last=drop_last if batch_size else world_size > 1,
        )
        return n

    def n_batches(self, batch_size: int, **kwargs: Any) -> int:
        """Batches ``iter_batches(batch_size=..., **kwargs)`` yields in one epoch (``start_batch`` ignored)."""
        kwargs.pop("start_batch", None)
        kwargs.pop("dtype", None)
        kwargs.pop("hookpoints", None)
        args = {"shuffle": False, "seed": 0, "epoch": 0, "rank": 0, "world_size": 1, "exclude_positions": (),
                "exclude_bos": False, "shuffle_buffer_shards": 1, "rank_split": "rows", "drop_last": False}
        args.update(kwargs)
        _, ranges, _ = self._plan(batch_size, **args)
        return sum(1 for _ in ranges)

    def iter_batches(
        self,
        hookpoints: Sequence[str],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        exclude_positions: Sequence[int] = (),
        exclude_bos: bool = False,
        shuffle_buffer_shards: int = 4,
        dtype: torch.dtype = torch.float32,
        start_batch: int = 0,
        rank_split: str = "rows",
        drop_last: bool = False,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches ``{hookpoint: [B, d]}`` of token rows, the same rows for every hookpoint.

        - Shuffling is deterministic in ``(seed, epoch)``: shards are permuted, then read
          ``shuffle_buffer_shards`` at a time and their rows permuted within that buffer, so memory
          stays bounded by the buffer (plus one batch) whatever the cache size.
        - ``exclude_positions`` drops token positions (e.g. ``(1, 2, 3)`` for SmolLM2's massive
          activations; negative positions count from the end); ``exclude_bos`` drops BOS tokens (one rule:
          :class:`saelab.positions.PositionFilter`).
        - Distributed: with ``rank_split="rows"`` (default) every rank walks the same shuffled stream
          cut into global batches of ``batch_size * world_size`` rows and takes its slice, so the
          union of the ranks' batches equals the single-process batch of ``batch_size * world_size``
          and every rank yields the same number of batches. ``rank_split="shards"`` gives each rank
          its own shards (each reads only its share; batch counts equalised by dropping rows).
        - The last batch may be smaller unless ``drop_last``; with ``world_size > 1`` a final partial
          global batch is split evenly over the ranks (dropped if it has fewer rows than ranks).
        - ``start_batch`` skips that many of this rank's batches without reading their shards
          (resuming a trainer mid-epoch yields exactly the batches it had not consumed).
        """
        hookpoints = self._check_hookpoints(hookpoints)
        groups, ranges, _ = self._plan(
            batch_size, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
            exclude_positions=exclude_positions, exclude_bos=exclude_bos,
            shuffle_buffer_shards=shuffle_buffer_shards, rank_split=rank_split, drop_last=drop_last,
        )
        exclude_positions = tuple(exclude_positions)
        loaded: dict[str, Any] = {"index": -1}

        def group(gi: int) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
            if loaded["index"] != gi:
                loaded.clear()  # drop the previous buffer before reading the next
                loaded["index"] = gi
                members = groups[gi][0]
                kept = [self._kept_rows(s, exclude_positions, exclude_bos) for s in members]
                tensors = {}
                for hp in hookpoints:
                    n = sum(k.numel() for k in kept)
                    buf = torch.empty(n, self.dim(hp), dtype=self.dtype)
                    pos = 0
                    for shard, rows in zip(members, kept, strict=True):
                        acts = self.shard_activations(hp, shard).reshape(-1, self.dim(hp))
                        torch.index_select(acts, 0, rows, out=buf[pos:pos + rows.numel()])
                        pos += rows.numel()
                        del acts
                    tensors[hp] = buf
                perm = None
                if shuffle:
                    gen = torch.Generator().manual_seed(_seed(seed, epoch, "group", gi, rank if rank_split == "shards" else 0))
                    perm = torch.randperm(groups[gi][2] - groups[gi][1], generator=gen)
                loaded["tensors"], loaded["perm"] = tensors, perm
            return loaded["tensors"], loaded["perm"]

        gi = 0
        for b, (start, stop) in enumerate(ranges):
            if b < start_batch:
                continue
            pieces: dict[str, list[torch.Tensor]] = {hp: [] for hp in hookpoints}
            pos = start
            while pos < stop:
                while groups[gi][2] <= pos:
                    gi += 1
                tensors, perm = group(gi)
                g0, g1 = groups[gi][1], groups[gi][2]
                take = min(stop, g1) - pos
                local = torch.arange(pos - g0, pos - g0 + take) if perm is None else perm[pos - g0:pos - g0 + take]
                for hp in hookpoints:
                    pieces[hp].append(tensors[hp].index_select(0, local))
                pos += take
            yield {hp: (p[0] if len(p) == 1 else torch.cat(p)).to(dtype) for hp, p in pieces.items()}

    def __repr__(self) -> str:
        return (f"ActivationCache({str(self.path)!r}, hookpoints={self.hookpoints}, n_tokens={self.n_tokens}, "
                f"ctx_len={self.ctx_len}, dtype={self.manifest['dtype']})")


# --------------------------------------------------------------------------------------------------
# Writer


def cache_dir_for(store: Path | str, inputs: dict[str, Any]) -> Path:
    """The directory a cache with these fingerprint inputs lives in: ``<store>/<fingerprint>/``."""
    return Path(store) / fingerprint(inputs)


def default_shard_size_tokens(dims: Sequence[int], dtype: str, ctx_len: int) -> int:
    """About :data:`SHARD_TARGET_BYTES` per hookpoint file, a whole number of sequences."""
    bytes_per_token = max(dims) * DTYPES[dtype].itemsize
    return max(ctx_len, (SHARD_TARGET_BYTES // bytes_per_token) // ctx_len * ctx_len)


# --------------------------------------------------------------------------------------------------
# Finding a complete cache that covers a request


def find_activation_cache(source: ActivationSource, dataset: Dataset, hookpoints: Sequence[str], *, n_tokens: int,
                          ctx_len: int, store: str | Path, dtype: str = "float32", other_dtypes: bool = True,
                          checksums: bool = False) -> ActivationCache | None:
    """A complete activation cache in ``store`` over the same model, data, ``n_tokens`` and ``ctx_len`` that
    holds ``hookpoints`` (exactly, or more of them), or None; looking writes nothing.

    The cache of exactly ``hookpoints`` is looked up by fingerprint first, then the store's manifests are
    read for a cache holding more hookpoints (fewest extra first). Storage ``dtype`` comes first; with
    ``other_dtypes`` (what ``saelab latents`` / ``run`` accept) a cache of the other storage dtype follows,
    without it only ``dtype`` is accepted (what ``saelab cache`` / ``train`` accept, so that the trained
    values never depend on which caches the store happens to hold). ``checksums`` checks every shard's
    sha256 of the cache found; a damaged cache is skipped."""
    dtypes = [dtype, *(d for d in DTYPES if d != dtype and other_dtypes)] if dtype in DTYPES else list(DTYPES)
    wanted = fingerprint_inputs(source, dataset, hookpoints, n_tokens=n_tokens, ctx_len=ctx_len, dtype=dtypes[0])
    return _find_covering(Path(store), wanted, dtypes, checksums)


def _find_covering(store: Path, wanted: dict[str, Any], dtypes: Sequence[str],
                   checksums: bool) -> ActivationCache | None:
    """The first complete, undamaged cache of :func:`find_activation_cache`'s order for fingerprint inputs
    ``wanted`` (of storage dtype ``dtypes[0]``)."""
    candidates = [cache_dir_for(store, {**wanted, "dtype": d}) for d in dtypes]
    candidates += covering_caches(store, wanted, dtypes)
    for directory in dict.fromkeys(candidates):
        if (directory / MANIFEST).is_file():
            try:
                return ActivationCache.open(directory, checksums=checksums)
            except (UsageError, CorruptCacheError):
                continue
    return None


def covering_caches(store: Path | str, wanted: Mapping[str, Any], dtypes: Sequence[str]) -> list[Path]:
    """Complete caches in ``store`` whose fingerprint inputs equal ``wanted`` but for more hookpoints and a
    storage dtype among ``dtypes``: in ``dtypes`` order, then fewest hookpoints first."""
    same = json.loads(json.dumps({k: v for k, v in wanted.items() if k not in ("hookpoints", "dtype")}, default=str))
    hookpoints = set(wanted["hookpoints"])
    found: list[tuple[int, int, str, Path]] = []
    try:
        directories = [p for p in Path(store).iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        return []
    for directory in directories:
        try:
            manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
            inputs = dict(manifest["fingerprint_inputs"])
            held = set(inputs.pop("hookpoints"))
            stored_dtype = inputs.pop("dtype")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if manifest.get("complete") and held > hookpoints and inputs == same and stored_dtype in dtypes:
            found.append((list(dtypes).index(stored_dtype), len(held), directory.name, directory))
    return [directory for *_, directory in sorted(found)]


def build_activation_cache(
    source: ActivationSource,
    dataset: Dataset,
    hookpoints: Sequence[str],
    *,
    n_tokens: int,
    ctx_len: int,
    batch_size: int,
    store: Path | str,
    dtype: str = "float32",
    overwrite: bool = False,
    shard_size_tokens: int | None = None,
    progress: bool = True,
    verify_checksums: bool = False,
    request_key: str | None = None,
    paired_pass: str = "one",
) -> ActivationCache:
    """Build (or reuse, or resume) the activation cache of ``hookpoints`` over ``dataset``.

    A complete cache with the same fingerprint is reused (file sizes checked; sha256 too with
    ``verify_checksums``); else a complete cache of the same storage ``dtype`` holding more hookpoints
    (:func:`find_activation_cache`) is reused, and ``build_info["covering"]`` says so; else a partial cache
    of the same fingerprint is resumed after its last complete shard. ``overwrite`` deletes the cache of
    this fingerprint and builds it, never reusing another. ``shard_size_tokens`` (rounded down to whole sequences) defaults to about
    128 MiB per hookpoint file; a resumed cache keeps the shard size it was started with.
    Temporary files of killed runs are deleted first (one :class:`PartialDataRemovedWarning` line).
    ``request_key`` (see :func:`check_request_not_being_built`) is recorded while building.

    A :class:`~saelab.paired.PairedSource` caches labelled sites (``layers.6@A``, ``layers.6@B``) of its
    models over one tokenisation (tokens stored once); its tokenizers are checked before the first shard
    (:meth:`~saelab.paired.PairedSource.check_tokenizers`). ``paired_pass="two"`` builds the same cache
    (same fingerprint and files) in two passes: model A writes every shard's tokens and its sites, is
    released, then model B adds its sites to each stored shard (:func:`paired_passes`), so that only one
    model is loaded at a time when the sources load their weights on first use. Either mode resumes a
    cache the other left unfinished.
    """
    if dtype not in DTYPES:
        raise UsageError(f"bad cache dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
    if batch_size < 1:
        raise UsageError(f"bad --batch_size {batch_size}; accepted: a positive integer")
    hookpoints = source.check_hookpoints(list(dict.fromkeys(hookpoints)))
    passes = paired_passes(source, hookpoints, paired_pass)
    spec = WindowSpec.for_tokenizer(source.tokenizer, ctx_len)
    target = n_windows_for(n_tokens, ctx_len)
    inputs = fingerprint_inputs(source, dataset, hookpoints, n_tokens=n_tokens, ctx_len=ctx_len, dtype=dtype)
    directory = cache_dir_for(store, inputs)
    if overwrite and directory.exists():
        with DirectoryLock(directory, "activation cache"):
            pass  # refuse to delete a cache another process is writing
        shutil.rmtree(directory)
    started = time.perf_counter()
    if (directory / MANIFEST).is_file():
        manifest = _read_manifest(directory)
        if manifest.get("complete"):
            cache = ActivationCache.open(directory, checksums=verify_checksums)
            cache.build_info = {"status": "reused", "seconds": time.perf_counter() - started, "tokens_written": 0}
            return cache
    if not overwrite:
        covering = _find_covering(Path(store), inputs, [dtype], verify_checksums)
        if covering is not None:
            covering.build_info = {"status": "reused", "seconds": time.perf_counter() - started, "tokens_written": 0,
                                   "covering": True, "requested_hookpoints": list(hookpoints)}
            return covering
    written = int(_read_manifest(directory).get("n_sequences", 0)) if (directory / MANIFEST).is_file() else 0
    check_free_disk(Path(store), cache_bytes([source.hookpoint_dim(h) for h in hookpoints], target - written,
                                             ctx_len, dtype), f"the activation cache of {', '.join(hookpoints)}")
    if isinstance(source, PairedSource):
        source.check_tokenizers(dataset, spec)
    directory.mkdir(parents=True, exist_ok=True)
    with DirectoryLock(directory, "activation cache"):
        if request_key:
            _record_request(Path(store), request_key, directory)
        removed = remove_stale_temporaries(directory, writers_gone=True)
        removed += _sweep_store(Path(store), directory)
        writer = _Writer(source, dataset, hookpoints, spec, target, inputs, directory, dtype, batch_size,
                         shard_size_tokens, n_tokens, passes=passes,
                         after_pass=_release_pass_models(source) if len(passes) > 1 else None)
        resumed_from = int(writer.manifest["n_sequences"])
        removed += writer.removed
        if removed:
            n_bytes = sum(size for _, size in removed)
            warnings.warn(
                f"activation cache {directory}: threw away partial data of an interrupted run "
                f"({len(removed)} file{'s' if len(removed) != 1 else ''}, {_size(n_bytes)}); "
                + (f"resuming after the {resumed_from * spec.ctx_len} tokens of its complete shards"
                   if resumed_from else "rebuilding it"),
                PartialDataRemovedWarning, stacklevel=2)
        writer.run(progress)
    cache = ActivationCache.open(directory)
    cache.build_info = {
        "status": "resumed" if resumed_from else "built",
        "seconds": time.perf_counter() - started,
        "tokens_written": cache.n_tokens - resumed_from * cache.ctx_len,
        "resumed_from_tokens": resumed_from * cache.ctx_len,
    }
    return cache


PAIRED_PASSES = ("one", "two")
"""How a paired cache is built: ``one`` pass running both models per batch, or ``two`` (model A over the
data, then model B over the stored token shards)."""


def paired_passes(source: ActivationSource, hookpoints: Sequence[str], paired_pass: str = "one") -> list[list[str]]:
    """The hookpoint groups of each pass over the data: all of ``hookpoints`` in one pass, or with
    ``paired_pass="two"`` (a :class:`~saelab.paired.PairedSource` only) one pass per model label, in the
    source's label order."""
    if paired_pass not in PAIRED_PASSES:
        raise UsageError(f"bad --paired_pass {paired_pass!r}; accepted: {', '.join(PAIRED_PASSES)}")
    if paired_pass == "one":
        return [list(hookpoints)]
    if not isinstance(source, PairedSource):
        raise UsageError(f"--paired_pass two needs two models (--model_b); model {source.model_id!r} is one")
    groups = {label: [hp for hp in hookpoints if split_site(hp)[1] == label] for label in source.labels}
    return [group for group in groups.values() if group]


def _release_pass_models(source: ActivationSource) -> Callable[[list[str]], None]:
    """``after_pass`` of a two-pass paired build: release the model whose sites the pass computed."""

    def release(hookpoints: list[str]) -> None:
        if isinstance(source, PairedSource):
            for label in dict.fromkeys(split_site(hp)[1] for hp in hookpoints):
                if label is not None:
                    source.release(label)

    return release


def cache_bytes(dims: Sequence[int], n_sequences: int, ctx_len: int, dtype: str) -> int:
    """Bytes on disk of ``n_sequences`` cached sequences of sites of widths ``dims`` (activations in storage
    ``dtype`` and int32 tokens; headers left out)."""
    return max(0, n_sequences) * ctx_len * (sum(dims) * DTYPES[dtype].itemsize + 4)


def free_disk(where: Path | str) -> int:
    """Free bytes on the disk holding ``where`` (or its nearest existing parent)."""
    folder = Path(where).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_free_disk(where: Path, n_bytes: int, what: str) -> None:
    """One-line :class:`UsageError` when the disk holding ``where`` has less than ``n_bytes`` free for ``what``."""
    free = free_disk(where)
    if n_bytes > free:
        raise UsageError(f"{what} needs {human_bytes(n_bytes)} but {where} has {human_bytes(free)} free; "
                         f"free some space, use another --store, fewer --n_tokens or --dtype float16")


def human_bytes(n_bytes: float) -> str:
    """``n_bytes`` as ``512 B``, ``12.3 MiB``, ``4.5 GiB``..."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n_bytes < 1024 or unit == "TiB":
            return f"{n_bytes:.1f} {unit}" if unit != "B" else f"{int(n_bytes)} B"
        n_bytes /= 1024
    return f"{n_bytes:.1f} TiB"


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB" if n_bytes >= 2**20 else f"{n_bytes / 1024:.0f} KiB"


def request_path(store: Path | str, request_key: str) -> Path:
    """Where a request key's note (the fingerprint directory it is building) lives in ``store``."""
    return Path(store) / REQUESTS_DIR / f"{request_key}.json"


def _record_request(store: Path, request_key: str, directory: Path) -> None:
    with contextlib.suppress(OSError):  # only an early warning for a second run: never a failure
        write_json_atomic(request_path(store, request_key), {"fingerprint": directory.name})


def check_request_not_being_built(store: Path | str, request_key: str) -> None:
    """Before loading a model: a one-line :class:`UsageError` naming the lock and its holder's PID when
    the cache that a previous run of the same request (``request_key``: the flags as given) built is
    being written by another process right now. Unknown requests and idle caches pass."""
    try:
        fingerprint_name = json.loads(request_path(store, request_key).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return
    if not isinstance(fingerprint_name, str) or not fingerprint_name or "/" in fingerprint_name:
        return
    directory = Path(store) / fingerprint_name
    if DirectoryLock.holder(directory) is not None:
        raise UsageError(DirectoryLock.busy_message(directory, "activation cache")
                         + f" (lock {directory / '.lock'})")


def _sweep_store(store: Path, current: Path) -> list[tuple[Path, int]]:
    """Remove temporaries of killed runs in the other cache directories of ``store`` that no process is
    writing (each is locked while it is cleaned, so a live writer's files are never touched)."""
    removed: list[tuple[Path, int]] = []
    try:
        siblings = [p for p in store.iterdir() if p.is_dir() and p != current and not p.name.startswith(".")]
    except OSError:
        return removed
    for sibling in siblings:
        if not any(temporary_owner(p.name) is not None for p in sibling.rglob(".*")):
            continue
        try:
            with DirectoryLock(sibling, "activation cache", patience_s=0):
                removed += remove_stale_temporaries(sibling, writers_gone=True)
        except (UsageError, OSError):
            continue  # being written, or not ours to clean
    return removed


class _Writer:
    """Writes one cache directory shard by shard, resuming after the last shard in its manifest.

    ``passes`` (default: one pass over ``hookpoints``) splits the hookpoints into passes over the data:
    new shards are written with the first pass's hookpoints, then each pass in turn adds the hookpoints a
    listed shard lacks, computed from its stored tokens (:meth:`_add_sites`); ``after_pass`` is called with
    a pass's hookpoints before the next pass (a two-pass paired build releases model A there). The manifest
    is marked complete once every shard holds every hookpoint.
    """

    def __init__(self, source: ActivationSource, dataset: Dataset, hookpoints: list[str], spec: WindowSpec,
                 target: int, inputs: dict[str, Any], directory: Path, dtype: str, batch_size: int,
                 shard_size_tokens: int | None, n_tokens: int, passes: Sequence[Sequence[str]] | None = None,
                 after_pass: Callable[[list[str]], None] | None = None):
        self.source, self.dataset, self.hookpoints, self.spec = source, dataset, hookpoints, spec
        self.passes = [list(group) for group in passes] if passes else [list(hookpoints)]
        self.after_pass = after_pass
        self.target, self.directory, self.dtype, self.batch_size = target, directory, dtype, batch_size
        self.dims = {hp: int(source.hookpoint_dim(hp)) for hp in hookpoints}
        self.removed: list[tuple[Path, int]] = []
        """Files of unfinished shards deleted before resuming (path, bytes)."""
        if (directory / MANIFEST).is_file():
            self.manifest = _read_manifest(directory)
            self._check_resumable()
        else:
            if shard_size_tokens is None:
                shard_size_tokens = default_shard_size_tokens(list(self.dims.values()), dtype, spec.ctx_len)
            if shard_size_tokens < 1:
                raise UsageError(f"bad shard size {shard_size_tokens}; accepted: a positive number of tokens")
            self.manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "fingerprint": fingerprint(inputs),
                "fingerprint_inputs": inputs,
                "complete": False,
                "hookpoints": list(hookpoints),
                "dims": self.dims,
                "dtype": dtype,
                "ctx_len": spec.ctx_len,
                "n_tokens_requested": int(n_tokens),
                "n_sequences_target": target,
                "shard_size_sequences": max(1, shard_size_tokens // spec.ctx_len),
                "tokenization": spec.identity(),
                "model": inputs["model"],
                "dataset": inputs["dataset"],
                "n_sequences": 0,
                "n_tokens": 0,
                "data_exhausted": False,
                "fp16_clamped": {},
                "shards": [],
                "created": now_iso(),
            }
        self.shard_seqs = int(self.manifest["shard_size_sequences"])
        self.clamped: dict[str, int] = dict(self.manifest.get("fp16_clamped", {}))

    def _check_resumable(self) -> None:
        """Verify the finished shards (size and sha256) and delete files the manifest does not list."""
        if self.manifest["fingerprint"] != self.directory.name:
            raise CorruptCacheError(
                f"activation cache {self.directory} holds fingerprint {self.manifest['fingerprint']}; "
                f"rebuild with --overwrite cache"
            )
        listed = set()
        for shard in self.manifest["shards"]:
            for entry in _shard_files(shard):
                _check_file(self.directory, entry, checksums=True)
                listed.add(entry["path"])
        for sub in ("tokens", "activations"):
            root = self.directory / sub
            if not root.exists():
                continue
            for path in root.rglob("*"):
                if path.is_file() and str(path.relative_to(self.directory)) not in listed:
                    self.removed.append((path, path.stat().st_size))
                    path.unlink()

    def _save_manifest(self) -> None:
        self.manifest["updated"] = now_iso()
        write_json_atomic(self.directory / MANIFEST, self.manifest, default=str, fsync=True)

    def _write_shard(self, size: int, windows: Iterator[torch.Tensor], on_batch: Callable[[int], None],
                     hookpoints: list[str] | None = None) -> int:
        """Write the next shard, of up to ``size`` sequences from ``windows``, batch by batch into its
        files (of ``hookpoints``, default all), and list it in the manifest; returns the sequences written
        (fewer: the data ran out)."""
        hookpoints = self.hookpoints if hookpoints is None else hookpoints
        index = len(self.manifest["shards"])
        ctx = self.spec.ctx_len
        tokens = torch.empty(size, ctx, dtype=torch.int64)
        device = self.source.device
        files: dict[str, StreamedSafetensorsFile] = {}
        n = 0
        try:
            for hp in hookpoints:
                files[hp] = self._shard_file(hp, index, size)
            while n < size:
                batch = list(itertools.islice(windows, min(self.batch_size, size - n)))
                if not batch:
                    break
                ids = torch.stack(batch)
                tokens[n:n + len(batch)] = ids
                acts = self.source.activations(ids if device is None else ids.to(device), hookpoints)
                for hp, file in files.items():
                    file.write(self._converted(hp, acts[hp]).reshape(len(batch), ctx, self.dims[hp]))
                del acts
                release_free_heap()  # flat peak RSS: freed forward buffers go back to the OS
                n += len(batch)
                on_batch(len(batch))
            if n:
                self._list_shard(index, tokens[:n], files)
        finally:
            for file in files.values():
                file.abort()  # no-op for closed files; removes partial ones
        return n

    def _shard_file(self, hp: str, index: int, size: int) -> StreamedSafetensorsFile:
        """The open activation file of hookpoint ``hp`` in shard ``index`` (``size`` sequences at most)."""
        return StreamedSafetensorsFile(
            self.directory / "activations" / hp / _shard_name(index), "activations", DTYPES[self.dtype],
            (size, self.spec.ctx_len, self.dims[hp]), metadata={"format": FORMAT})

    def _missing_sites(self, shard: dict[str, Any], hookpoints: Sequence[str]) -> list[str]:
        """The hookpoints among ``hookpoints`` whose files shard entry ``shard`` does not list yet."""
        return [hp for hp in hookpoints if hp not in shard["files"]["activations"]]

    def _add_sites(self, index: int, hookpoints: list[str], on_batch: Callable[[int], None]) -> None:
        """Compute ``hookpoints`` for listed shard ``index`` from its stored tokens, batch by batch as
        :meth:`_write_shard` does (so the files are the ones a single pass writes), and list their files;
        a shard gains its new files all at once, or none of them."""
        shard = self.manifest["shards"][index]
        n, ctx = int(shard["n_sequences"]), self.spec.ctx_len
        path = self.directory / shard["files"]["tokens"]["path"]
        with safe_open(str(path), framework="pt") as fh:
            tokens = fh.get_tensor("tokens").to(torch.int64)
        device = self.source.device
        files: dict[str, StreamedSafetensorsFile] = {}
        try:
            for hp in hookpoints:
                files[hp] = self._shard_file(hp, index, n)
            for start in range(0, n, self.batch_size):
                ids = tokens[start:start + self.batch_size]
                acts = self.source.activations(ids if device is None else ids.to(device), hookpoints)
                for hp, file in files.items():
                    file.write(self._converted(hp, acts[hp]).reshape(len(ids), ctx, self.dims[hp]))
                del acts
                release_free_heap()
                on_batch(len(ids))
            for hp, file in files.items():
                file.close(n)
                shard["files"]["activations"][hp] = _file_entry(self.directory,
                                                                str(file.path.relative_to(self.directory)))
        finally:
            for file in files.values():
                file.abort()

    def _list_shard(self, index: int, tokens: torch.Tensor, files: dict[str, StreamedSafetensorsFile]) -> None:
        """Close the shard's activation files at ``len(tokens)`` sequences, write its tokens, and list it."""
        n = len(tokens)
        entries: dict[str, Any] = {"activations": {}}
        for hp, file in files.items():
            file.close(n)
            entries["activations"][hp] = _file_entry(self.directory, str(file.path.relative_to(self.directory)))
        rel = f"tokens/{_shard_name(index)}"
        save_safetensors_atomic(self.directory / rel, {"tokens": tokens.to(torch.int32).contiguous()},
                                metadata={"format": FORMAT})
        entries["tokens"] = _file_entry(self.directory, rel)
        self.manifest["shards"].append({"index": index, "n_sequences": n, "files": entries})
        self.manifest["n_sequences"] += n
        self.manifest["n_tokens"] = self.manifest["n_sequences"] * self.spec.ctx_len

    def _converted(self, hp: str, acts: torch.Tensor) -> torch.Tensor:
        """``acts`` on the CPU in the cache dtype, float16 overflow clamped (and counted)."""
        acts = acts.detach().to("cpu")
        if self.dtype == "float16":
            over = int((acts.abs() > FP16_MAX).sum())
            if over:
                self.clamped[hp] = self.clamped.get(hp, 0) + over
                acts = acts.clamp(-FP16_MAX, FP16_MAX)
        return acts.to(DTYPES[self.dtype])

    def run(self, show_progress: bool) -> None:
        """Produce the missing shards, then mark the manifest complete."""
        done = int(self.manifest["n_sequences"])
        ctx = self.spec.ctx_len
        windows = iter_windows(self.dataset.texts(), self.source.tokenizer, self.spec,
                               max_windows=self.target - done, skip_windows=done)
        from .progress import progress as make_progress

        bar = make_progress(TokensPerSecondColumn()) if show_progress else None
        task = None
        if bar is not None:
            bar.start()
            task = bar.add_task("caching activations", total=self.target * ctx, completed=done * ctx)

        def on_batch(n_sequences: int) -> None:
            if bar is not None:
                bar.update(task, advance=n_sequences * ctx)

        try:
            exhausted = bool(self.manifest["data_exhausted"])  # set once the first pass has read all the data
            while done < self.target and not exhausted:
                size = min(self.shard_seqs, self.target - done)
                written = self._write_shard(size, windows, on_batch, self.passes[0])
                done += written
                exhausted = written < size
                finished = done >= self.target or exhausted
                self.manifest["fp16_clamped"] = dict(self.clamped)
                if finished:
                    self.manifest["complete"] = not self._pending_passes()
                    self.manifest["data_exhausted"] = done < self.target
                self._save_manifest()
            for number, hookpoints in enumerate(self.passes):
                self._run_pass(hookpoints, bar)
                if self.after_pass is not None and number + 1 < len(self.passes):
                    self.after_pass(hookpoints)
            if not self.manifest["complete"]:  # resumed a cache whose shards were all written
                self.manifest["complete"] = True
                self._save_manifest()
        finally:
            if bar is not None:
                bar.stop()
        if done == 0:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise UsageError(f"dataset {self.dataset_name()} holds fewer than {ctx} tokens; nothing to cache")
        if self.manifest["data_exhausted"]:
            warn_data_exhausted(self.dataset_name(), done, self.target, ctx)
        for hp, count in self.clamped.items():
            warnings.warn(
                f"{count} activation values at {hp} were beyond the float16 range and clamped to "
                f"+-{FP16_MAX:g}; cache in float32 (--dtype float32) to keep them",
                Fp16RangeWarning,
                stacklevel=3,
            )

    def _pending_passes(self) -> bool:
        """Whether a listed shard lacks a hookpoint (a later pass, or an interrupted one, still has to add it)."""
        return any(self._missing_sites(shard, self.hookpoints) for shard in self.manifest["shards"])

    def _run_pass(self, hookpoints: list[str], bar: Any) -> None:
        """Add ``hookpoints`` to every listed shard that lacks some of them (saving the manifest after each
        shard)."""
        todo = [i for i, shard in enumerate(self.manifest["shards"]) if self._missing_sites(shard, hookpoints)]
        task = None
        if bar is not None and todo:
            total = sum(int(self.manifest["shards"][i]["n_sequences"]) for i in todo) * self.spec.ctx_len
            task = bar.add_task(f"caching {', '.join(hookpoints)}", total=total)

        def on_batch(n_sequences: int) -> None:
            if task is not None:
                bar.update(task, advance=n_sequences * self.spec.ctx_len)

        for index in todo:
            missing = self._missing_sites(self.manifest["shards"][index], hookpoints)
            self._add_sites(index, missing, on_batch)
            self.manifest["fp16_clamped"] = dict(self.clamped)
            self._save_manifest()

    def dataset_name(self) -> str:
        """The dataset's repo for messages."""
        return str(self.dataset.identity().get("repo", self.dataset.repo))


class TokensPerSecondColumn(ProgressColumn):
    """Rich progress column: ``1234 tok/s``."""

    def render(self, task: Any) -> Text:
        """Render the task's speed in tokens per second."""
        speed = task.finished_speed or task.speed
        return Text("? tok/s" if speed is None else f"{speed:,.0f} tok/s", style="progress.data.speed")


# --------------------------------------------------------------------------------------------------
# The cache a command asks for


def open_or_build_cache(values: Mapping[str, Any] | Options, *, source: ActivationSource | None = None,
                        results_root: str | Path | None = None) -> ActivationCache:
    """The activation cache for resolved command values: reused (by fingerprint, or a complete cache of
    more hookpoints: :func:`build_activation_cache`), resumed, or built.

    ``values`` holds the :class:`saelab.cli_options.CacheCommandOptions` fields (the train and run commands pass
    theirs); ``source`` reuses an already loaded LM. Returns an :class:`~saelab.activation_cache.ActivationCache`
    whose ``build_info`` says whether it was ``reused``, ``resumed`` or ``built``.

    With a second model (``values["model_b"]``, loaded with the first model's options) the cache is paired
    (:func:`paired_request`): each plain hookpoint becomes ``<hookpoint>@A`` and ``<hookpoint>@B``, and
    ``values["paired_pass"]`` (``one``, the default, or ``two``) says how it is built.
    """
    from .data import load_dataset_source
    from .layout import activation_store
    from .models import load_activation_source, source_options

    if isinstance(values, Options):
        values = values.model_dump()
    if not values.get("hookpoints"):
        raise UsageError("no --hookpoints given; e.g. --hookpoints layers.15 (list them: saelab hookpoints MODEL)")
    token = values.get("hf_token")
    if isinstance(token, SecretStr):
        token = token.get_secret_value()
    store = Path(values.get("store") or activation_store(results_root))
    request_key = cache_request_key(values)
    check_request_not_being_built(store, request_key)  # before the model loads: fail in seconds, not minutes
    if source is None:
        source = load_activation_source(values["model"], **source_options(values))
    hookpoints = list(values["hookpoints"])
    if values.get("model_b"):
        source, hookpoints = paired_request(values, source)
    dataset = load_dataset_source(
        values["dataset_repo"], split=values["dataset_split"], name=values.get("dataset_name") or None,
        column=values["dataset_column"], hf_token=token,
    )
    return build_activation_cache(
        source, dataset, hookpoints, n_tokens=values["n_tokens"], ctx_len=values["cache_ctx_len"],
        batch_size=values["batch_size"], store=store, dtype=values.get("dtype", "float32"),
        overwrite="cache" in (values.get("overwrite") or ()), shard_size_tokens=values.get("shard_size_tokens"),
        progress=bool(values.get("verbose", True)), verify_checksums=bool(values.get("verify", False)),
        request_key=request_key, paired_pass=values.get("paired_pass") or "one",
    )


def paired_request(values: Mapping[str, Any], source: ActivationSource) -> tuple[PairedSource, list[str]]:
    """The paired source (model A: ``source``, model B: ``values["model_b"]`` loaded with the same source
    options; B's weights load on its first forward pass) and the labelled sites of ``values["hookpoints"]``
    (a plain hookpoint for both models, a labelled one as given); unequal widths are a one-line error."""
    from .models import load_activation_source, source_options

    if not isinstance(source, PairedSource):
        model_b = load_activation_source(values["model_b"], **source_options(values))
        source = PairedSource({LABELS[0]: source, LABELS[1]: model_b})
    named = list(dict.fromkeys(values["hookpoints"]))
    hookpoints = [name for name in named if split_site(name)[1] is not None]
    plain = [name for name in named if split_site(name)[1] is None]
    hookpoints = [*paired_sites(plain, source.labels), *hookpoints]
    hookpoints = source.check_hookpoints(hookpoints)
    source.check_widths(plain)
    return source, hookpoints


def cache_request_key(values: Mapping[str, Any]) -> str:
    """A short hash of the cache flags as given (model, revision, model dtype, hookpoints, dataset, split,
    name, column, n_tokens, ctx_len, cache dtype, and model B of a paired request; local paths made absolute).
    Unlike the fingerprint it needs no model, so a second run of the same request can find the cache lock
    before loading one."""

    def where(value: Any) -> Any:
        path = Path(str(value)).expanduser()
        return str(path.resolve()) if value and path.exists() else value

    key = {
        "model": where(values.get("model")), "revision": values.get("revision"),
        "model_dtype": values.get("model_dtype"), "load_in_8bit": bool(values.get("load_in_8bit")),
        "hookpoints": list(dict.fromkeys(values.get("hookpoints") or ())),
        "dataset": where(values.get("dataset_repo")), "split": values.get("dataset_split"),
        "name": values.get("dataset_name") or None, "column": values.get("dataset_column"),
        "n_tokens": values.get("n_tokens"), "ctx_len": values.get("cache_ctx_len"),
        "dtype": values.get("dtype", "float32"),
    }
    if values.get("model_b"):  # a paired request (single-model keys are unchanged)
        key["model_b"] = where(values["model_b"])
    return json_sha256(key, 24)
