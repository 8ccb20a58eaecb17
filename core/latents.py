"""The latent cache: sparse latent activations of a dictionary over a dataset, streamed to disk, and
per-latent statistics.

A latent cache lives in ``results/<name>/latents/<hook>/``::

    manifest.json                         rewritten atomically after every chunk (resume point)
    tokens/000000.safetensors             {"tokens": int32 [n_seq_chunk, ctx_len]} (only when no
                                          activation cache supplied the tokens)
    split_0/000000.safetensors            {"token": int32 [nnz], "latent": int32 [nnz], "value": float32 [nnz]}
    ...
    stats.json                            summary + per-latent firing counts, frequencies, max activations
    stats.safetensors                     per-latent quantile bounds, histograms, top/bottom logits
    vocab.json                            token strings of the ids in the top/bottom logits
    .lock                                 held (flock) by the process writing the cache

* A dictionary with per-site pre-activation shares (a crosscoder,
  :meth:`~saelab.interfaces.SparseDictionary.site_preactivations`) also stores ``site_share`` float32
  ``[nnz, n_inputs]`` in each split file: every nonzero's share ``x_h W_enc[h]`` per input site (for the
  records' per-example shares; one more encoder matmul per token, no second LM pass). ``stats.json`` then
  carries ``diffing`` columns (two sites) and ``logit_models`` (per-model logits in ``stats.safetensors``
  as ``top_logit_ids@LABEL``...) for a dictionary over several models' sites.
* ``token`` is the flat index ``seq * ctx_len + pos`` into the token array (int32: at most 2**31 tokens);
  ``latent`` is the global latent index. Each split holds the latents of one contiguous range
  (``--n_splits`` ranges of equal size, like delphi), so reading one latent loads one split only.
  Inside a chunk file entries are sorted by (latent, token).
* Chunks are written per flush (``flush_nonzeros``, at batch boundaries): the writer never holds more
  than one chunk of nonzeros, so memory is flat in ``n_tokens``.
* Tokens are stored once: the activation cache's token shards when the latents were computed from one
  (the manifest names it), else the ``tokens/`` chunk files here. Never copied into the splits.
* Resume: a killed build restarts after the last chunk listed in the manifest; the fingerprint
  (model, dictionary weights, data, exclusions, ``n_splits``) decides whether an existing cache is
  reused, resumed, or rebuilt (a different fingerprint is rebuilt from scratch).
* ``filter_bos`` drops BOS positions, ``exclude_positions`` drops absolute positions (e.g. SmolLM2's
  massive-activation positions 1-3): their latent activations are not stored and they are not counted
  in frequencies.

Statistics are computed after the last chunk in two streaming passes (counts/extrema, then a
256-bin histogram per latent over ``[min(0, min), max]``): quantile bounds are interpolated from that
histogram (exact up to 1/256 of the latent's range); the stored histograms have :data:`HIST_BINS` bins.
Top and bottom logits (direct logit attribution) are the decoder row times the unembedding, summed over
output sites that add into the residual stream (``embed``, ``layers.N``, ``layers.N.mlp``,
``layers.N.self_attn``; not ``.input`` sites), without the final norm.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from .activation_cache import find_activation_cache
from .errors import CorruptCacheError, UsageError
from .fileio import (
    DirectoryLock,
    json_sha256,
    now_iso,
    read_manifest,
    save_safetensors_atomic,
    write_json_atomic,
)
from .interfaces import ActivationSource, Dataset, SparseDictionary
from .options import Options
from .paired import PairedSource, split_site
from .positions import PositionFilter, dictionary_filter

if TYPE_CHECKING:
    from .activation_cache import ActivationCache
    from .records import LatentDiffing

FORMAT = "saelab-latent-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STATS_JSON = "stats.json"
STATS_ARRAYS = "stats.safetensors"
VOCAB_JSON = "vocab.json"
STATS_SCHEMA = "saelab.latent_stats/1"
FINE_BINS = 256
"""Bins of the internal per-latent histogram the quantiles are interpolated from."""
HIST_BINS = 32
"""Bins of the stored per-latent activation histogram."""
DEFAULT_FLUSH_NONZEROS = 4_000_000
"""Nonzeros buffered before a chunk is written (about 48 MB)."""
MAX_TOKENS = 2**31 - 1


# --------------------------------------------------------------------------------------------------
# Small helpers


def _write_json_atomic(path: Path, data: Any) -> None:
    write_json_atomic(path, data, default=str, fsync=True)


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_safetensors_atomic(path, tensors, metadata={"format": FORMAT})


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:  # safetensors raises several types for damaged files
        raise CorruptCacheError(f"latent cache file {path} cannot be read ({type(exc).__name__}); "
                                f"rebuild with --overwrite cache") from None


def _hash(data: Any) -> str:
    return json_sha256(data, 20, ensure_ascii=True, default=str)


def split_bounds(d_sae: int, n_splits: int) -> list[tuple[int, int]]:
    """Latent ranges ``[(lo, hi), ...]`` of the ``n_splits`` splits (equal sizes, the last one shorter)."""
    if n_splits < 1:
        raise UsageError(f"bad --n_splits {n_splits}; accepted: a positive integer")
    n_splits = min(n_splits, d_sae)
    size = -(-d_sae // n_splits)
    return [(lo, min(lo + size, d_sae)) for lo in range(0, d_sae, size)]


def dictionary_identity(dictionary: SparseDictionary) -> dict[str, Any]:
    """Architecture, sites, options and a sha256 of the weights (for fingerprints)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(dictionary.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    try:
        config = dictionary.config()
    except Exception:  # a third-party architecture without a JSON config still gets a weights hash
        config = {"architecture": dictionary.name}
    return {"config": config, "weights_sha256": digest.hexdigest()}


def residual_output_sites(sites: Sequence[str]) -> list[int]:
    """Indices of output sites whose values add into the residual stream (DLA applies to them); a paired
    site ``HOOKPOINT@LABEL`` by its hookpoint."""
    return [i for i, s in enumerate(sites) if not split_site(s)[0].endswith(".input")]


# --------------------------------------------------------------------------------------------------
# Reader


@dataclass
class LatentActivations:
    """Where one latent fires: parallel arrays sorted by (sequence, position)."""

    latent: int
    """Latent index."""
    seq: torch.Tensor
    """Sequence index (int64) of each activation."""
    pos: torch.Tensor
    """Position in the sequence (int64)."""
    value: torch.Tensor
    """Activation (float32)."""
    site_share: torch.Tensor | None = None
    """``[n, n_inputs]`` float32: each input site's share ``x_h W_enc[h]`` of the pre-activation at each
    activation, for a dictionary with per-site shares (:meth:`~saelab.interfaces.SparseDictionary.site_preactivations`);
    None otherwise."""

    def __len__(self) -> int:
        return int(self.value.numel())


@dataclass
class _SplitIndex:
    lo: int
    offsets: torch.Tensor  # [n_latents + 1] into token/value
    token: torch.Tensor  # int64, grouped by latent, token order inside a latent
    value: torch.Tensor
    site_share: torch.Tensor | None = None  # [nnz, n_inputs] in the same order, when stored


class LatentCache:
    """A complete latent cache on disk (see the module docstring); read one split at a time."""

    def __init__(self, path: Path, manifest: dict[str, Any], max_loaded_splits: int = 2):
        self.path = Path(path)
        """The cache directory."""
        self.manifest = manifest
        """The parsed ``manifest.json``."""
        self.hookpoint: str = manifest["hookpoint"]
        """Name the latents are stored under (``latents/<hook>``)."""
        self.d_sae: int = int(manifest["d_sae"])
        """Number of latents."""
        layers = manifest.get("layers")
        self.layers: tuple[int, int] | None = (int(layers[0]), int(layers[1])) if layers else None
        """``(L, F)`` of a dictionary whose latents belong to layers (:func:`latent_layers`), else None."""
        self.ctx_len: int = int(manifest["ctx_len"])
        """Tokens per sequence."""
        self.n_sequences: int = int(manifest["n_sequences"])
        """Sequences analysed."""
        self.bos_token_id: int | None = manifest.get("bos_token_id")
        """BOS token id of the tokenizer (None without one)."""
        self.filter_bos: bool = bool(manifest.get("filter_bos", False))
        """Whether BOS positions were dropped."""
        self.exclude_positions: list[int] = list(manifest.get("exclude_positions", []))
        """Absolute positions dropped (normalised to ``0 <= p < ctx_len``)."""
        self.splits: list[tuple[int, int]] = [tuple(b) for b in manifest["splits"]]  # type: ignore[misc]
        """Latent range of each split."""
        self.build_info: dict[str, Any] = {"status": "opened"}
        """How :func:`build_latent_cache` got this cache: ``status`` (reused, resumed, built, rebuilt)."""
        self._loaded: OrderedDict[int, _SplitIndex] = OrderedDict()
        self._max_loaded = max(1, max_loaded_splits)
        self._tokens: torch.Tensor | None = None
        self._stats: dict[str, Any] | None = None
        self._arrays: dict[str, torch.Tensor] | None = None
        self._vocab: dict[int, str] | None = None

    @classmethod
    def open(cls, path: str | Path, max_loaded_splits: int = 2) -> LatentCache:
        """Open a complete latent cache directory (one-line error when missing or incomplete)."""
        path = Path(path)
        if not (path / MANIFEST).is_file():
            raise UsageError(f"latent cache {str(path)!r} does not exist (no {MANIFEST}); build it with `saelab latents`")
        manifest = _read_manifest(path)
        if not manifest.get("complete"):
            raise UsageError(f"latent cache {str(path)!r} is incomplete; rerun the same `saelab latents` command "
                             f"to resume it")
        return cls(path, manifest, max_loaded_splits)

    @property
    def n_splits(self) -> int:
        """Number of splits."""
        return len(self.splits)

    @property
    def n_tokens(self) -> int:
        """Tokens in the token array (``n_sequences * ctx_len``, excluded positions included)."""
        return self.n_sequences * self.ctx_len

    @property
    def n_analysed(self) -> int:
        """Tokens whose latents were stored (the denominator of frequencies)."""
        return int(self.manifest["n_analysed"])

    @property
    def fingerprint(self) -> str:
        """The cache's fingerprint."""
        return str(self.manifest["fingerprint"])

    @property
    def activation_cache_path(self) -> str | None:
        """The activation cache the latents were computed from (its tokens are read from it), or None
        when they were computed from the model's forward pass."""
        tokens = self.manifest.get("tokens") or {}
        return str(tokens["path"]) if tokens.get("kind") == "activation_cache" else None

    def split_of(self, latent: int) -> int:
        """Index of the split holding ``latent``."""
        if not 0 <= latent < self.d_sae:
            raise UsageError(f"latent {latent} out of range; this dictionary has latents 0..{self.d_sae - 1}")
        return int(latent // (self.splits[0][1] - self.splits[0][0]))

    # ---- sparse activations

    def chunk_files(self, split: int) -> list[Path]:
        """Chunk files of one split, in token order."""
        return [self.path / c["splits"][split]["path"] for c in self.manifest["chunks"]]

    def _split(self, split: int) -> _SplitIndex:
        if split in self._loaded:
            self._loaded.move_to_end(split)
            return self._loaded[split]
        while len(self._loaded) >= self._max_loaded:
            self._loaded.popitem(last=False)
        lo, hi = self.splits[split]
        tokens, latents, values, shares = [], [], [], []
        for path in self.chunk_files(split):
            data = _load(path)
            tokens.append(data["token"])
            latents.append(data["latent"])
            values.append(data["value"])
            if "site_share" in data:
                shares.append(data["site_share"])
        token = torch.cat(tokens).long() if tokens else torch.zeros(0, dtype=torch.long)
        latent = torch.cat(latents).long() if latents else torch.zeros(0, dtype=torch.long)
        value = torch.cat(values).float() if values else torch.zeros(0)
        order = torch.sort(latent, stable=True).indices  # chunks are in token order: stays sorted by token
        counts = torch.bincount(latent - lo, minlength=hi - lo)
        offsets = torch.zeros(hi - lo + 1, dtype=torch.long)
        offsets[1:] = counts.cumsum(0)
        share = torch.cat(shares).float()[order] if shares and len(shares) == len(tokens) else None
        index = _SplitIndex(lo, offsets, token[order], value[order], share)
        self._loaded[split] = index
        return index

    def latent(self, latent: int) -> LatentActivations:
        """Where ``latent`` fires (loads its split only; the last ``max_loaded_splits`` stay in memory)."""
        index = self._split(self.split_of(latent))
        a, b = int(index.offsets[latent - index.lo]), int(index.offsets[latent - index.lo + 1])
        token = index.token[a:b]
        share = None if index.site_share is None else index.site_share[a:b]
        return LatentActivations(latent, token // self.ctx_len, token % self.ctx_len, index.value[a:b], share)

    def iter_chunks(self, splits: Sequence[int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(token, latent, value)`` (int64, int64, float32) of each chunk over ``splits`` (default all),
        in token order, one chunk in memory at a time."""
        chosen = range(self.n_splits) if splits is None else splits
        for chunk in self.manifest["chunks"]:
            parts = [_load(self.path / chunk["splits"][s]["path"]) for s in chosen]
            yield (torch.cat([p["token"] for p in parts]).long(), torch.cat([p["latent"] for p in parts]).long(),
                   torch.cat([p["value"] for p in parts]).float())

    def dense(self, latents: Sequence[int] | None = None) -> torch.Tensor:
        """Dense activations ``[n_sequences, ctx_len, len(latents)]`` (small caches and tests only)."""
        latents = list(range(self.d_sae)) if latents is None else list(latents)
        out = torch.zeros(self.n_tokens, len(latents))
        for j, lat in enumerate(latents):
            acts = self.latent(lat)
            out[acts.seq * self.ctx_len + acts.pos, j] = acts.value
        return out.reshape(self.n_sequences, self.ctx_len, len(latents))

    # ---- tokens

    def tokens(self) -> torch.Tensor:
        """The token array ``[n_sequences, ctx_len]`` (int32)."""
        if self._tokens is None:
            source = self.manifest["tokens"]
            if source["kind"] == "activation_cache":
                from .activation_cache import ActivationCache

                cache_path = Path(source["path"])
                if not (cache_path / "manifest.json").is_file():
                    raise UsageError(f"latent cache {self.path} reads its tokens from activation cache {cache_path}, "
                                     f"which is gone; rebuild with --overwrite cache")
                tokens = ActivationCache.open(cache_path).tokens()[: self.n_sequences]
            else:
                parts = [_load(self.path / c["tokens"])["tokens"] for c in self.manifest["chunks"]]
                tokens = torch.cat(parts) if parts else torch.zeros(0, self.ctx_len, dtype=torch.int32)
            if tokens.shape != (self.n_sequences, self.ctx_len):
                raise CorruptCacheError(f"latent cache {self.path}: token array has shape {tuple(tokens.shape)}, "
                                        f"expected {(self.n_sequences, self.ctx_len)}; rebuild with --overwrite cache")
            self._tokens = tokens.to(torch.int32)
        return self._tokens

    # ---- statistics

    def stats(self) -> dict[str, Any]:
        """The parsed ``stats.json``."""
        if self._stats is None:
            self._stats = json.loads((self.path / STATS_JSON).read_text(encoding="utf-8"))
        return self._stats

    def arrays(self) -> dict[str, torch.Tensor]:
        """``stats.safetensors``: ``quantile_bounds [d_sae, n_quantiles]``, ``histogram [d_sae, HIST_BINS]``,
        ``histogram_range [d_sae, 2]``, and (when computed) ``top_logit_ids``/``top_logit_values``/
        ``bottom_logit_ids``/``bottom_logit_values`` ``[d_sae, k]``."""
        if self._arrays is None:
            self._arrays = _load(self.path / STATS_ARRAYS)
        return self._arrays

    def latent_stats(self, latent: int) -> Any:
        """The :class:`saelab.records.LatentStats` of ``latent``."""
        from .records import LatentStats

        per = self.stats()["latents"]
        bounds = self.arrays()["quantile_bounds"][latent].tolist()
        return LatentStats(frequency=float(per["frequency"][latent]), max_activation=float(per["max_activation"][latent]),
                           firing_count=int(per["firing_count"][latent]), n_tokens=self.n_analysed,
                           quantile_bounds=bounds)

    def logits(self, latent: int) -> tuple[Any, Any]:
        """``(top, bottom)`` :class:`saelab.records.TokenValues` of ``latent``; ``(None, None)`` when the
        dictionary does not write to the residual stream or the model has no unembedding."""
        from .records import TokenValues

        arrays = self.arrays()
        if "top_logit_ids" not in arrays:
            return None, None
        if self._vocab is None:
            self._vocab = {int(k): v for k, v in json.loads((self.path / VOCAB_JSON).read_text(encoding="utf-8")).items()}
        out = []
        for which in ("top", "bottom"):
            ids = arrays[f"{which}_logit_ids"][latent].tolist()
            vals = arrays[f"{which}_logit_values"][latent].tolist()
            out.append(TokenValues([self._vocab.get(i, str(i)) for i in ids], vals))
        return out[0], out[1]

    def logits_by_model(self, latent: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """``(top, bottom)``: by model label, the :class:`saelab.records.TokenValues` of ``latent``'s decoder
        to that model's sites through its own unembedding, for a dictionary over several models' sites;
        None when not computed."""
        from .records import TokenValues

        labels = self.stats().get("logit_models")
        if not labels:
            return None
        arrays = self.arrays()
        if self._vocab is None:
            self._vocab = {int(k): v for k, v in json.loads((self.path / VOCAB_JSON).read_text(encoding="utf-8")).items()}
        out: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
        for label in labels:
            for which, target in zip(("top", "bottom"), out, strict=True):
                ids = arrays[f"{which}_logit_ids@{label}"][latent].tolist()
                vals = arrays[f"{which}_logit_values@{label}"][latent].tolist()
                target[label] = TokenValues([self._vocab.get(i, str(i)) for i in ids], vals)
        return out

    def diffing(self, latent: int) -> LatentDiffing | None:
        """``{"relative_norm", "cosine", "class"}`` of ``latent`` for a dictionary over two output sites
        (site 0 as A, site 1 as B; :func:`saelab.diffing.decoder_diff`); None when not computed."""
        from .records import LatentDiffing

        columns = self.stats().get("diffing")
        if not columns:
            return None
        cosine = columns.get("cosine")
        return LatentDiffing(relative_norm=columns["relative_norm"][latent],
                             cosine=None if cosine is None else cosine[latent], **{"class": columns["class"][latent]})

    def __repr__(self) -> str:
        return (f"LatentCache({str(self.path)!r}, hookpoint={self.hookpoint!r}, d_sae={self.d_sae}, "
                f"n_tokens={self.n_tokens}, n_splits={self.n_splits})")


def _read_manifest(directory: Path) -> dict[str, Any]:
    return read_manifest(directory, fmt=FORMAT, version=FORMAT_VERSION, what="latent cache", name=MANIFEST)


# --------------------------------------------------------------------------------------------------
# Writer


def latent_layers(dictionary: SparseDictionary) -> tuple[int, int] | None:
    """``(L, F)`` of a dictionary whose latents belong to layers (``per_layer_sites``: latent ``f`` of layer
    ``l`` is ``l * F + f``); None for any other dictionary."""
    n = len(dictionary.sites.inputs)
    if not dictionary.per_layer_sites or n < 1 or dictionary.d_sae % n:
        return None
    return n, dictionary.d_sae // n


@dataclass
class LatentCacheJob:
    """One dictionary's latent cache for :func:`build_latent_caches`."""

    dictionary: SparseDictionary
    """The dictionary whose latents are cached."""
    out_dir: str | Path
    """The cache directory (``latents/<hook>/`` of a run)."""
    hookpoint: str | None = None
    """Name the cache is stored under (default: the dictionary's first input site)."""
    exclude_positions: Sequence[int] = ()
    """Positions left out (:class:`~saelab.positions.PositionFilter`)."""
    activation_cache: ActivationCache | None = None
    """A complete activation cache holding the dictionary's input sites to read instead of running the LM."""


def build_latent_cache(
    source: ActivationSource,
    dictionary: SparseDictionary,
    out_dir: str | Path,
    *,
    hookpoint: str | None = None,
    dataset: Dataset | None = None,
    n_tokens: int | None = None,
    ctx_len: int = 256,
    activation_cache: ActivationCache | None = None,
    exclude_positions: Sequence[int] = (),
    **options: Any,
) -> LatentCache:
    """Build (or reuse, or resume) the latent cache of ``dictionary`` in ``out_dir``.

    Data comes from ``activation_cache`` (an :class:`~saelab.activation_cache.ActivationCache` holding the
    dictionary's input hookpoints; its tokens are reused) or from ``dataset`` tokenised into ``n_tokens``
    tokens of ``ctx_len``-token windows (:mod:`saelab.data`) run through ``source``. ``hookpoint`` names
    the cache (default: the dictionary's first input site); ``options`` are those of
    :func:`build_latent_caches`. See the module docstring for the format.
    """
    job = LatentCacheJob(dictionary, out_dir, hookpoint, exclude_positions, activation_cache)
    return build_latent_caches(source, [job], dataset=dataset, n_tokens=n_tokens, ctx_len=ctx_len, **options)[0]


def build_latent_caches(
    source: ActivationSource,
    jobs: Sequence[LatentCacheJob],
    *,
    dataset: Dataset | None = None,
    n_tokens: int | None = None,
    ctx_len: int = 256,
    n_splits: int = 5,
    batch_size: int = 32,
    filter_bos: bool = False,
    n_quantiles: int = 10,
    top_logits: int = 10,
    flush_nonzeros: int = DEFAULT_FLUSH_NONZEROS,
    encode_rows: int = 4096,
    overwrite: bool = False,
    progress: bool = True,
) -> list[LatentCache]:
    """Build (or reuse, or resume) the latent caches of several dictionaries over the same data, in the
    order of ``jobs``. The jobs without an activation cache share one pass of the LM over ``dataset``
    (one forward per batch reading every site they need, as if each had been built alone: the same
    batches, values and files); a job with one reads its activation cache."""
    if batch_size < 1:
        raise UsageError(f"bad --batch_size {batch_size}; accepted: a positive integer")
    if n_quantiles < 1:
        raise UsageError(f"bad --n_quantiles {n_quantiles}; accepted: a positive integer")
    if flush_nonzeros < 1:
        raise UsageError(f"bad flush_nonzeros {flush_nonzeros}; accepted: a positive integer")
    started = time.perf_counter()
    caches: list[LatentCache | None] = []
    building: list[tuple[int, _Writer, str]] = []
    with contextlib.ExitStack() as locks:
        for job in jobs:
            prepared = _prepare(source, job, locks, dataset=dataset, n_tokens=n_tokens, ctx_len=ctx_len,
                                n_splits=n_splits, batch_size=batch_size, filter_bos=filter_bos,
                                n_quantiles=n_quantiles, top_logits=top_logits, flush_nonzeros=flush_nonzeros,
                                encode_rows=encode_rows, overwrite=overwrite, started=started)
            if isinstance(prepared, LatentCache):
                caches.append(prepared)
                continue
            building.append((len(caches), *prepared))
            caches.append(None)
        writers = [writer for _, writer, _ in building]
        for writer in writers:
            if writer.activation_cache is not None:
                writer.run(progress)
        streamed = [writer for writer in writers if writer.activation_cache is None]
        if len(streamed) == 1:
            streamed[0].run(progress)
        elif streamed:
            _run_together(streamed, source, dataset, progress)  # type: ignore[arg-type]
        for index, writer, status in building:
            resumed_from = writer.resumed_from
            _write_stats(writer.out, writer.manifest, n_quantiles, source, writer.dictionary, top_logits)
            writer.manifest["complete"] = True
            writer.save_manifest()
            cache = LatentCache.open(writer.out)
            cache.build_info = {"status": "built" if resumed_from == 0 and status == "resumed" else status,
                                "seconds": time.perf_counter() - started, "resumed_from_sequences": resumed_from}
            caches[index] = cache
    return [cache for cache in caches if cache is not None]


def _prepare(source: ActivationSource, job: LatentCacheJob, locks: contextlib.ExitStack, *,
             dataset: Dataset | None, n_tokens: int | None, ctx_len: int, n_splits: int, batch_size: int,
             filter_bos: bool, n_quantiles: int, top_logits: int, flush_nonzeros: int, encode_rows: int,
             overwrite: bool, started: float) -> LatentCache | tuple[_Writer, str]:
    """The complete cache of ``job`` when it can be reused; else its writer (``job``'s directory locked in
    ``locks``) and the status it will report (built, rebuilt or resumed)."""
    dictionary, activation_cache = job.dictionary, job.activation_cache
    if dictionary.requires_sequences:
        raise UsageError(f"architecture {dictionary.name!r} reads whole sequences; latent caching supports "
                         f"token-wise dictionaries only")
    from .data import WindowSpec, n_windows_for, tokenizer_identity

    inputs = list(dictionary.sites.inputs)
    source.check_hookpoints(inputs)
    hookpoint = job.hookpoint or inputs[0]
    if activation_cache is not None:
        missing = [h for h in inputs if h not in activation_cache.hookpoints]
        if missing:
            raise UsageError(f"activation cache {activation_cache.path} lacks hookpoint(s) {', '.join(missing)}; "
                             f"cached: {', '.join(activation_cache.hookpoints)}")
        ctx_len = activation_cache.ctx_len
        target = activation_cache.n_sequences
        bos = activation_cache.bos_token_id
        data = {"activation_cache": activation_cache.fingerprint, "n_sequences": target}
    else:
        if dataset is None or n_tokens is None:
            raise UsageError("build_latent_cache needs an activation cache, or a dataset and n_tokens")
        spec = WindowSpec.for_tokenizer(source.tokenizer, ctx_len)
        target = n_windows_for(n_tokens, ctx_len)
        bos = spec.bos_token_id
        data = {"dataset": dataset.identity(), "tokenization": spec.identity(), "n_tokens": int(n_tokens),
                "tokenizer": tokenizer_identity(source.tokenizer)}
    if target * ctx_len > MAX_TOKENS:
        raise UsageError(f"{target * ctx_len} tokens exceed the latent cache's int32 token index (2**31); "
                         f"use fewer --n_tokens")
    positions = PositionFilter.of(job.exclude_positions, filter_bos).positions(ctx_len)
    splits = split_bounds(dictionary.d_sae, n_splits)
    inputs_fp = {
        "format_version": FORMAT_VERSION, "model": source.identity(), "dictionary": dictionary_identity(dictionary),
        "data": data, "ctx_len": ctx_len, "filter_bos": bool(filter_bos), "exclude_positions": positions,
        "splits": splits,
    }
    if has_site_shares(dictionary):  # only then, so other caches keep their fingerprint
        inputs_fp["site_shares"] = True
    fp = _hash(inputs_fp)
    out = Path(job.out_dir)
    status = "built"
    if (out / MANIFEST).is_file():
        old = None
        try:
            old = _read_manifest(out)
        except CorruptCacheError:
            pass
        if overwrite or old is None or old.get("fingerprint") != fp:
            with DirectoryLock(out, "latent cache"):
                pass  # refuse to delete a cache another process is writing
            shutil.rmtree(out)
            status = "rebuilt"
        elif old.get("complete"):
            with DirectoryLock(out, "latent cache"):
                if _stored_quantiles(out) != n_quantiles:
                    _write_stats(out, old, n_quantiles, source, dictionary, top_logits)
            cache = LatentCache.open(out)
            cache.build_info = {"status": "reused", "seconds": time.perf_counter() - started}
            return cache
        else:
            status = "resumed"
    out.mkdir(parents=True, exist_ok=True)
    locks.enter_context(DirectoryLock(out, "latent cache"))
    writer = _Writer(source, dictionary, out, hookpoint, inputs, splits, ctx_len, target, bos, filter_bos,
                     positions, fp, inputs_fp, activation_cache, dataset, batch_size, flush_nonzeros, encode_rows)
    return writer, status


def _run_together(writers: Sequence[_Writer], source: ActivationSource, dataset: Dataset, show_progress: bool) -> None:
    """Feed every writer from one pass of the LM over ``dataset`` (from the writer furthest behind), each
    forward reading the sites of all of them."""
    inputs = list(dict.fromkeys(site for writer in writers for site in writer.inputs))
    first = min(writer.done for writer in writers)
    first_writer = writers[0]
    batches = _model_batches(source, dataset, inputs, first_writer.ctx_len, first, first_writer.target,
                             first_writer.batch_size)
    label = ", ".join(writer.manifest["hookpoint"] for writer in writers)
    _consume(writers, batches, first, show_progress, label)


def _model_batches(source: ActivationSource, dataset: Dataset, inputs: Sequence[str], ctx_len: int, first: int,
                   target: int, batch_size: int) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """``(tokens [B, ctx], {site: [B, ctx, d]})`` of windows ``first`` to ``target`` run through ``source``."""
    import itertools

    from .data import WindowSpec, iter_windows

    if first >= target:
        return
    spec = WindowSpec.for_tokenizer(source.tokenizer, ctx_len)
    windows = iter_windows(dataset.texts(), source.tokenizer, spec, max_windows=target - first, skip_windows=first)
    device = source.device
    while True:
        batch = list(itertools.islice(windows, batch_size))
        if not batch:
            return
        ids = torch.stack(batch)
        with torch.no_grad():
            acts = source.activations(ids if device is None else ids.to(device), list(inputs))
        yield ids, acts
        if len(batch) < batch_size:
            return


def _consume(writers: Sequence[_Writer], batches: Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]],
             first: int, show_progress: bool, label: str) -> None:
    """Hand every batch (sequences ``first`` on) to the writers still missing its sequences, then finish them."""
    from .progress import progress as make_progress

    ctx_len, target = writers[0].ctx_len, writers[0].target
    bar = make_progress() if show_progress else None
    task = None
    if bar is not None:
        bar.start()
        task = bar.add_task(f"latents {label}", total=target * ctx_len, completed=first * ctx_len)
    try:
        seq = first
        for tokens, acts in batches:
            n = tokens.shape[0]
            for writer in writers:
                offset = writer.done - seq
                if 0 <= offset < n:
                    writer.consume(tokens[offset:], {site: acts[site][offset:] for site in writer.inputs})
            seq += n
            del acts
            if bar is not None:
                bar.update(task, advance=n * ctx_len)
        for writer in writers:
            writer.flush()
    finally:
        if bar is not None:
            bar.stop()
    for writer in writers:
        writer.finish()


class _Writer:
    """Streams one latent cache to disk chunk by chunk, resuming after the last listed chunk."""

    def __init__(self, source: ActivationSource, dictionary: SparseDictionary, out: Path, hookpoint: str,
                 inputs: list[str], splits: list[tuple[int, int]], ctx_len: int, target: int, bos: int | None,
                 filter_bos: bool, positions: list[int], fp: str, inputs_fp: dict[str, Any], activation_cache: Any,
                 dataset: Dataset | None, batch_size: int, flush_nonzeros: int, encode_rows: int):
        self.source, self.dictionary, self.out, self.inputs = source, dictionary, out, inputs
        self.splits, self.ctx_len, self.target, self.bos = splits, ctx_len, target, bos
        self.filter_bos, self.positions = filter_bos, positions
        self.activation_cache, self.dataset = activation_cache, dataset
        self.batch_size, self.flush_nonzeros, self.encode_rows = batch_size, flush_nonzeros, encode_rows
        self.bounds = torch.tensor([lo for lo, _ in splits[1:]], dtype=torch.long)
        if (out / MANIFEST).is_file():
            self.manifest = _read_manifest(out)
            self._clean_unlisted()
        else:
            tokens = ({"kind": "activation_cache", "path": str(Path(activation_cache.path).resolve()),
                       "fingerprint": activation_cache.fingerprint} if activation_cache is not None
                      else {"kind": "chunks"})
            self.manifest = {
                "format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": fp, "fingerprint_inputs": inputs_fp,
                "complete": False, "hookpoint": hookpoint, "sites": {"inputs": inputs,
                                                                     "outputs": list(dictionary.sites.outputs)},
                "d_sae": int(dictionary.d_sae), "layers": latent_layers(dictionary), "ctx_len": ctx_len,
                "n_sequences_target": target,
                "bos_token_id": bos, "filter_bos": bool(filter_bos), "exclude_positions": positions,
                "splits": [list(s) for s in splits], "tokens": tokens, "n_sequences": 0, "n_analysed": 0,
                "n_nonzeros": 0, "data_exhausted": False, "chunks": [], "created": now_iso(),
            }
        self.done = int(self.manifest["n_sequences"])
        self.resumed_from = self.done
        """Sequences already written when this writer started."""
        self._buffer: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.site_shares = has_site_shares(dictionary)
        self._buffered = 0
        self._tokens: list[torch.Tensor] = []
        self._chunk_start = self.done
        self._chunk_analysed = 0

    def _clean_unlisted(self) -> None:
        listed = {c["tokens"] for c in self.manifest["chunks"] if c.get("tokens")}
        listed |= {s["path"] for c in self.manifest["chunks"] for s in c["splits"]}
        for sub in self.out.iterdir():
            if sub.is_dir() and (sub.name == "tokens" or sub.name.startswith("split_")):
                for path in sub.iterdir():
                    if str(path.relative_to(self.out)) not in listed:
                        path.unlink()

    def save_manifest(self) -> None:
        """Write the manifest atomically."""
        self.manifest["updated"] = now_iso()
        _write_json_atomic(self.out / MANIFEST, self.manifest)

    # ---- data

    def _batches(self) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """``(tokens [B, ctx], {hookpoint: [B, ctx, d]})`` from sequence ``self.done`` on."""
        if self.done >= self.target:
            return
        if self.activation_cache is not None:
            cache, seen = self.activation_cache, 0
            for index, shard in enumerate(cache.shards):
                n = int(shard["n_sequences"])
                if seen + n <= self.done:
                    seen += n
                    continue
                offset = max(0, self.done - seen)
                tokens = cache.shard_tokens(index)
                acts = {h: cache.shard_activations(h, index) for h in self.inputs}
                for a in range(offset, n, self.batch_size):
                    b = min(n, a + self.batch_size)
                    yield tokens[a:b], {h: t[a:b].float() for h, t in acts.items()}
                seen += n
                del tokens, acts
            return
        yield from _model_batches(self.source, self.dataset, self.inputs, self.ctx_len,  # type: ignore[arg-type]
                                  self.done, self.target, self.batch_size)

    # ---- encoding and flushing

    def _keep_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        return PositionFilter.of(self.positions, self.filter_bos).keep_mask(tokens.cpu(), self.bos).flatten()

    @torch.no_grad()
    def _encode(self, tokens: torch.Tensor, acts: dict[str, torch.Tensor], first_seq: int) -> None:
        B = tokens.shape[0]
        x = torch.stack([acts[h].reshape(B * self.ctx_len, -1) for h in self.inputs], dim=1)
        param = next(self.dictionary.parameters(), None)
        if param is not None and param.device != x.device:
            x = x.to(param.device)
        keep = self._keep_mask(tokens).to(x.device)
        base = first_seq * self.ctx_len
        for a in range(0, x.shape[0], self.encode_rows):
            lat = self.dictionary.encode(x[a:a + self.encode_rows].to(param.dtype if param is not None else x.dtype))
            lat = lat * keep[a:a + self.encode_rows, None]
            rows, cols = lat.nonzero(as_tuple=True)
            values = lat[rows, cols].float().cpu()
            shares = None
            if self.site_shares:
                shares = _shares_at(self.dictionary, x[a:a + self.encode_rows].to(lat.dtype), rows, cols)
            self._buffer.append(((rows.cpu() + base + a).to(torch.int64), cols.cpu().to(torch.int64), values, shares))
            self._buffered += int(values.numel())
        self._chunk_analysed += int(keep.sum())

    def _flush(self) -> None:
        n_seq = self.done - self._chunk_start
        if n_seq == 0:
            return
        index = len(self.manifest["chunks"])
        name = f"{index:06d}.safetensors"
        token = torch.cat([b[0] for b in self._buffer]) if self._buffer else torch.zeros(0, dtype=torch.long)
        latent = torch.cat([b[1] for b in self._buffer]) if self._buffer else torch.zeros(0, dtype=torch.long)
        value = torch.cat([b[2] for b in self._buffer]) if self._buffer else torch.zeros(0)
        share = None
        if self.site_shares:
            share = (torch.cat([b[3] for b in self._buffer]) if self._buffer  # type: ignore[misc]
                     else torch.zeros(0, len(self.inputs)))
        self._buffer.clear()
        order = torch.argsort(latent * MAX_TOKENS + token)
        token, latent, value = token[order], latent[order], value[order]
        share = None if share is None else share[order]
        cuts = [0, *torch.searchsorted(latent, self.bounds).tolist(), int(latent.numel())]
        entry: dict[str, Any] = {"index": index, "seq_start": self._chunk_start, "seq_stop": self.done,
                                 "n_analysed": self._chunk_analysed, "splits": []}
        for s in range(len(self.splits)):
            a, b = cuts[s], cuts[s + 1]
            rel = f"split_{s}/{name}"
            arrays = {"token": token[a:b].to(torch.int32), "latent": latent[a:b].to(torch.int32),
                      "value": value[a:b].to(torch.float32)}
            if share is not None:
                arrays["site_share"] = share[a:b].to(torch.float32).contiguous()
            _save(arrays, self.out / rel)
            entry["splits"].append({"path": rel, "nnz": b - a})
        if self.activation_cache is None:
            rel = f"tokens/{name}"
            _save({"tokens": torch.cat(self._tokens).to(torch.int32)}, self.out / rel)
            entry["tokens"] = rel
        self._tokens.clear()
        self.manifest["chunks"].append(entry)
        self.manifest["n_sequences"] = self.done
        self.manifest["n_analysed"] += self._chunk_analysed
        self.manifest["n_nonzeros"] += int(token.numel())
        self.save_manifest()
        self._buffered, self._chunk_start, self._chunk_analysed = 0, self.done, 0

    def consume(self, tokens: torch.Tensor, acts: dict[str, torch.Tensor]) -> None:
        """Encode the next sequences (``tokens [B, ctx]`` and their input sites), flushing a full chunk."""
        self._encode(tokens, acts, self.done)
        if self.activation_cache is None:
            self._tokens.append(tokens.to(torch.int32).cpu())
        self.done += tokens.shape[0]
        if self._buffered >= self.flush_nonzeros:
            self._flush()

    def flush(self) -> None:
        """Write the buffered sequences as a chunk."""
        self._flush()

    def finish(self) -> None:
        """Record how far the data went (one-line error when it held no whole window)."""
        if self.done == 0:
            raise UsageError("no tokens to analyse: the dataset holds fewer tokens than one context window")
        self.manifest["data_exhausted"] = self.done < self.target
        self.save_manifest()

    def run(self, show_progress: bool) -> None:
        """Encode the missing sequences and write their chunks."""
        _consume([self], self._batches(), self.done, show_progress, self.manifest["hookpoint"])


def has_site_shares(dictionary: SparseDictionary) -> bool:
    """Whether ``dictionary`` splits its pre-activation into per-input-site shares (a crosscoder): then the
    latent cache stores each nonzero's shares (``site_share``), which costs one more encoder matmul per
    token instead of a second LM pass over the record examples' windows."""
    if len(dictionary.sites.inputs) < 2:
        return False
    param = next(dictionary.parameters(), None)
    probe = torch.zeros(1, len(dictionary.sites.inputs), dictionary.sites.d_in,
                        dtype=param.dtype if param is not None else torch.float32,
                        device=param.device if param is not None else None)
    with torch.no_grad():
        return dictionary.site_preactivations(probe) is not None


_SHARE_ELEMENTS = 1 << 24
"""At most this many ``[rows, n_inputs, d_sae]`` elements of per-site pre-activations exist at once."""


@torch.no_grad()
def _shares_at(dictionary: SparseDictionary, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Each input site's pre-activation share ``[nnz, n_inputs]`` (float32, CPU) at the nonzeros ``(rows,
    cols)`` (row-major order, as ``nonzero`` gives) of ``x [n, n_inputs, d_in]``, in row blocks."""
    n_in = x.shape[1]
    step = max(1, _SHARE_ELEMENTS // max(1, n_in * dictionary.d_sae))
    out = torch.zeros(rows.numel(), n_in)
    cuts = torch.searchsorted(rows, torch.arange(0, x.shape[0] + step, step, device=rows.device)).tolist()
    for block, r0 in enumerate(range(0, x.shape[0], step)):
        i0, i1 = cuts[block], cuts[block + 1]
        if i0 == i1:
            continue
        pre = dictionary.site_preactivations(x[r0:r0 + step])
        if pre is None:
            raise RuntimeError(f"architecture {dictionary.name!r} stopped returning site pre-activations")
        out[i0:i1] = pre[rows[i0:i1] - r0, :, cols[i0:i1]].float().cpu()
    return out


# --------------------------------------------------------------------------------------------------
# Statistics


def _write_stats(out: Path, manifest: dict[str, Any], n_quantiles: int, source: ActivationSource,
                 dictionary: SparseDictionary, top_k: int) -> None:
    cache = LatentCache(out, manifest)
    d_sae = cache.d_sae
    counts = torch.zeros(d_sae, dtype=torch.long)
    vmax = torch.full((d_sae,), float("-inf"))
    vmin = torch.full((d_sae,), float("inf"))
    total = torch.zeros(d_sae, dtype=torch.float64)
    for s in range(cache.n_splits):  # pass 1: counts and extrema, one chunk file at a time
        for path in cache.chunk_files(s):
            data = _load(path)
            lat, val = data["latent"].long(), data["value"].float()
            counts += torch.bincount(lat, minlength=d_sae)
            vmax.scatter_reduce_(0, lat, val, "amax")
            vmin.scatter_reduce_(0, lat, val, "amin")
            total.index_add_(0, lat, val.double())
    fired = counts > 0
    hi = torch.where(fired, vmax.clamp_min(0), torch.zeros(()))
    lo = torch.where(fired, vmin.clamp_max(0), torch.zeros(()))
    width = (hi - lo).clamp_min(1e-12)
    bounds = torch.zeros(d_sae, n_quantiles)
    hist = torch.zeros(d_sae, HIST_BINS, dtype=torch.int32)
    for s, (a, b) in enumerate(cache.splits):  # pass 2: fine histograms, one split's latents at a time
        fine = torch.zeros((b - a) * FINE_BINS, dtype=torch.long)
        for path in cache.chunk_files(s):
            data = _load(path)
            lat, val = data["latent"].long(), data["value"].float()
            bins = ((val - lo[lat]) / width[lat] * FINE_BINS).long().clamp(0, FINE_BINS - 1)
            fine += torch.bincount((lat - a) * FINE_BINS + bins, minlength=(b - a) * FINE_BINS)
        fine = fine.reshape(b - a, FINE_BINS)
        hist[a:b] = fine.reshape(b - a, HIST_BINS, FINE_BINS // HIST_BINS).sum(-1).to(torch.int32)
        bounds[a:b] = _quantile_bounds(fine, lo[a:b], width[a:b], vmin[a:b], n_quantiles)
    n = max(1, int(manifest["n_analysed"]))
    freq = counts.double() / n
    alive = int(fired.sum())
    log_freq = torch.log10(freq[fired]) if alive else torch.zeros(0, dtype=torch.float64)
    edges = torch.linspace(-8, 0, 33, dtype=torch.float64)
    freq_hist = torch.histc(log_freq.clamp(-8, 0), bins=32, min=-8, max=0).long().tolist() if alive else [0] * 32
    arrays: dict[str, torch.Tensor] = {
        "firing_count": counts, "max_activation": torch.where(fired, vmax, torch.zeros(())),
        "mean_activation": torch.where(fired, (total / counts.clamp_min(1)).float(), torch.zeros(())),
        "quantile_bounds": bounds, "histogram": hist, "histogram_range": torch.stack([lo, hi], 1),
    }
    vocab_ids: set[int] = set()
    dla = _direct_logits(source, dictionary, top_k)
    if dla is not None:
        arrays.update(dla)
        vocab_ids = set(dla["top_logit_ids"].flatten().tolist()) | set(dla["bottom_logit_ids"].flatten().tolist())
    by_model = _direct_logits_by_model(source, dictionary, top_k)
    for label, part in by_model.items():
        arrays.update({f"{key}@{label}": value for key, value in part.items()})
        vocab_ids |= set(part["top_logit_ids"].flatten().tolist()) | set(part["bottom_logit_ids"].flatten().tolist())
    _save(arrays, out / STATS_ARRAYS)
    if dla is not None or by_model:
        tok = source.tokenizer
        _write_json_atomic(out / VOCAB_JSON, {str(i): tok.decode([i]) for i in sorted(vocab_ids)})
    sorted_freq = freq[fired].sort().values
    stats = {
        "schema": STATS_SCHEMA,
        "hookpoint": manifest["hookpoint"],
        "d_sae": d_sae,
        "n_sequences": int(manifest["n_sequences"]),
        "ctx_len": cache.ctx_len,
        "n_tokens": int(manifest["n_sequences"]) * cache.ctx_len,
        "n_analysed": int(manifest["n_analysed"]),
        "n_nonzeros": int(manifest["n_nonzeros"]),
        "n_splits": cache.n_splits,
        "n_quantiles": n_quantiles,
        "histogram_bins": HIST_BINS,
        "summary": {
            "alive": alive,
            "dead": d_sae - alive,
            "dead_fraction": (d_sae - alive) / d_sae,
            "mean_l0": float(counts.sum()) / n,
            "mean_frequency": float(freq.mean()),
            "median_frequency_alive": float(sorted_freq[len(sorted_freq) // 2]) if alive else None,
            "log10_frequency_histogram": {"edges": edges.tolist(), "counts": freq_hist},
        },
        "has_logits": dla is not None,
        **({"logit_models": list(by_model)} if by_model else {}),
        **({"diffing": diffing} if (diffing := _diffing_columns(dictionary)) is not None else {}),
        "latents": {
            "firing_count": counts.tolist(),
            "frequency": [float(f) for f in freq.tolist()],
            "max_activation": [round(float(v), 6) for v in arrays["max_activation"].tolist()],
        },
    }
    _write_json_atomic(out / STATS_JSON, stats)


@torch.no_grad()
def _direct_logits_by_model(source: ActivationSource, dictionary: SparseDictionary,
                            k: int) -> dict[str, dict[str, torch.Tensor]]:
    """For a dictionary over several models' sites (``HOOKPOINT@LABEL``, every output site labelled, two or
    more labels) and a source holding those models (``source.source(label)``, a
    :class:`~saelab.paired.PairedSource`): by label, the top and bottom ``k`` logits of each latent's
    decoder to that model's residual-stream sites through that model's own unembedding. Empty otherwise
    (and for a model whose unembedding is unavailable: released, or of another width)."""
    by_label: dict[str, list[int]] = {}
    for i, site in enumerate(dictionary.sites.outputs):
        hookpoint, label = split_site(site)
        if label is None:
            return {}
        if not hookpoint.endswith(".input"):
            by_label.setdefault(label, []).append(i)
    if k < 1 or len(by_label) < 2 or not isinstance(source, PairedSource):
        return {}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for label, outputs in by_label.items():
        try:
            W_U = source.source(label).unembedding()
        except UsageError:
            continue
        if W_U is None or W_U.shape[0] != dictionary.sites.d_out:
            continue
        directions = dictionary.output_directions(outputs)
        if directions is not None:
            out[label] = _top_bottom(directions, W_U, k)
    return out


def _diffing_columns(dictionary: SparseDictionary) -> dict[str, Any] | None:
    """:func:`saelab.diffing.diffing_columns` with the sites and values to 6 digits (the stats' record)."""
    from .diffing import diffing_columns

    columns = diffing_columns(dictionary)
    if columns is None:
        return None
    outputs = list(dictionary.sites.outputs)

    def rounded(values: list[float | None] | None) -> list[float | None] | None:
        return None if values is None else [None if v is None else round(v, 6) for v in values]

    return {"a_sites": outputs[:1], "b_sites": outputs[1:], "relative_norm": rounded(columns["relative_norm"]),
            "cosine": rounded(columns["cosine"]), "class": columns["class"]}


def _stored_quantiles(out: Path) -> int | None:
    try:
        return int(json.loads((out / STATS_JSON).read_text(encoding="utf-8"))["n_quantiles"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _quantile_bounds(fine: torch.Tensor, lo: torch.Tensor, width: torch.Tensor, vmin: torch.Tensor,
                     n_quantiles: int) -> torch.Tensor:
    """Lower bound of each of ``n_quantiles`` equal-count quantiles, interpolated in the fine histogram."""
    n_lat = fine.shape[0]
    cum = fine.cumsum(1).double()
    total = cum[:, -1:]
    out = torch.zeros(n_lat, n_quantiles)
    out[:, 0] = torch.where(total[:, 0] > 0, vmin, torch.zeros(()))
    if n_quantiles == 1:
        return out
    targets = total * torch.arange(1, n_quantiles, dtype=torch.float64) / n_quantiles  # [n_lat, q-1]
    idx = torch.searchsorted(cum, targets).clamp(max=FINE_BINS - 1)
    before = torch.where(idx > 0, cum.gather(1, (idx - 1).clamp_min(0)), torch.zeros((), dtype=torch.float64))
    in_bin = fine.gather(1, idx).double().clamp_min(1)
    frac = ((targets - before) / in_bin).clamp(0, 1)
    values = lo[:, None].double() + (idx.double() + frac) / FINE_BINS * width[:, None].double()
    out[:, 1:] = torch.where(total > 0, values, torch.zeros((), dtype=torch.float64)).float()
    return out


@torch.no_grad()
def _direct_logits(source: ActivationSource, dictionary: SparseDictionary, k: int,
                   chunk: int = 512) -> dict[str, torch.Tensor] | None:
    """Top and bottom ``k`` logits of each latent's decoder direction through the unembedding: its decoder
    rows summed over the output sites that write into the residual stream
    (:meth:`~saelab.interfaces.SparseDictionary.output_directions`; a CLT latent's over the layers it writes to)."""
    if k < 1:
        return None
    W_U = source.unembedding()
    writing = residual_output_sites(list(dictionary.sites.outputs))
    if W_U is None or not writing or W_U.shape[0] != dictionary.sites.d_out:
        return None
    directions = dictionary.output_directions(writing)  # summed over the sites that write the residual stream
    if directions is None:
        return None
    return _top_bottom(directions, W_U, k, chunk)


def _top_bottom(directions: torch.Tensor, W_U: torch.Tensor, k: int, chunk: int = 512) -> dict[str, torch.Tensor]:
    """Top and bottom ``k`` of ``directions @ W_U`` per row (ids int32, values float32)."""
    W_U = W_U.detach().float().cpu()
    W = directions.detach().float().cpu()
    k = min(k, W_U.shape[1])
    parts: dict[str, list[torch.Tensor]] = {"top_logit_ids": [], "top_logit_values": [], "bottom_logit_ids": [],
                                            "bottom_logit_values": []}
    for a in range(0, W.shape[0], chunk):
        logits = W[a:a + chunk] @ W_U
        top = logits.topk(k, dim=1)
        bottom = logits.topk(k, dim=1, largest=False)
        parts["top_logit_ids"].append(top.indices.to(torch.int32))
        parts["top_logit_values"].append(top.values)
        parts["bottom_logit_ids"].append(bottom.indices.to(torch.int32))
        parts["bottom_logit_values"].append(bottom.values)
    return {key: torch.cat(v) for key, v in parts.items()}


__all__ = [
    "DEFAULT_FLUSH_NONZEROS",
    "FORMAT",
    "HIST_BINS",
    "LatentActivations",
    "LatentCache",
    "LatentCacheJob",
    "build_latent_cache",
    "build_latent_caches",
    "dictionary_identity",
    "has_site_shares",
    "find_activation_cache",
    "latent_caches_for_run",
    "latent_layers",
    "latents_dir",
    "residual_output_sites",
    "select_dictionaries",
    "split_bounds",
]


# --------------------------------------------------------------------------------------------------
# Commands and pipelines


def select_dictionaries(sparse_model: str | Path, hookpoints: Sequence[str] = (),
                        device: str = "cpu") -> list[tuple[str, SparseDictionary, Path]]:
    """``(hook name, dictionary, directory)`` for each dictionary at ``sparse_model`` (a dictionary
    directory in any format, a sparsify run, a saelab run) selected by ``hookpoints``, loaded on ``device``.

    The selection and the hook names (which name the ``latents/<hook>/`` directories) are those of
    :func:`saelab.formats.dictionaries_by_hookpoint`, the one discovery ``saelab run`` uses too.
    """
    from .dictionary import load_dictionary
    from .formats import dictionaries_by_hookpoint

    loaded: dict[Path, SparseDictionary] = {}
    found = dictionaries_by_hookpoint(sparse_model, hookpoints, loaded=loaded)
    return [(hook, loaded[path].to(device) if path in loaded else load_dictionary(path, device=device), path)
            for hook, path in found.items()]


def latents_dir(run_directory: str | Path, hook: str) -> Path:
    """``results/<name>/latents/<hook>/`` (the hook's directory name: path separators replaced)."""
    from .layout import RunLayout

    return RunLayout(Path(run_directory)).latents_dir(hook)


def _default_exclusions(given: Sequence[int] | None, dictionary: SparseDictionary,
                        source: ActivationSource) -> tuple[int, ...]:
    """``--exclude_positions`` when given (``[]``: none), else what the dictionary's training recorded in
    ``cfg.json``, else the model's declaration (``ActivationSource.excluded_positions``)."""
    return dictionary_filter(dictionary, source, given).exclude_positions


def latent_caches_for_run(values: Mapping[str, Any] | Options, source: ActivationSource,
                          dictionaries: Mapping[str, SparseDictionary], run_directory: str | Path, *,
                          store: str | Path | None = None) -> dict[str, LatentCache]:
    """Build, resume or reuse ``latents/<hook>/`` of a run for each ``{hook: dictionary}`` from resolved
    command values (the ``--dataset_*``, ``--n_tokens``, ``--cache_ctx_len``, ``--batch_size``,
    ``--filter_bos``, ``--exclude_positions``, ``--n_splits``, ``--n_quantiles``, ``--overwrite``,
    ``--store``, ``--dtype``, ``--verify`` options): the one path of ``saelab latents`` and ``saelab run``.

    A complete activation cache in ``store`` covering a dictionary's input sites over the same model and
    data (see :func:`find_activation_cache`) is read instead of running the LM; the other dictionaries'
    latents are computed from one shared forward pass of the model, batch by batch, and no dense
    activation is written to disk. ``--overwrite cache`` always recomputes from the model.
    :attr:`LatentCache.activation_cache_path` says which was used."""
    from pydantic import SecretStr

    from .data import load_dataset_source
    from .layout import activation_store

    get = (values.model_dump() if isinstance(values, Options) else values).get
    token = get("hf_token")
    if isinstance(token, SecretStr):
        token = token.get_secret_value()
    dataset = load_dataset_source(get("dataset_repo"), split=get("dataset_split"), name=get("dataset_name") or None,
                                  column=get("dataset_column", "text"), hf_token=token)
    overwrite = "cache" in (get("overwrite") or ())
    jobs = []
    for hook, dictionary in dictionaries.items():
        activation_cache = None if overwrite else find_activation_cache(
            source, dataset, list(dictionary.sites.inputs), n_tokens=get("n_tokens"), ctx_len=get("cache_ctx_len"),
            store=store or get("store") or activation_store(), dtype=get("dtype") or "float32",
            checksums=bool(get("verify")))
        jobs.append(LatentCacheJob(dictionary, latents_dir(run_directory, hook), hook,
                                   _default_exclusions(get("exclude_positions"), dictionary, source), activation_cache))
    caches = build_latent_caches(
        source, jobs, dataset=dataset, n_tokens=get("n_tokens"), ctx_len=get("cache_ctx_len"),
        n_splits=get("n_splits", 5), batch_size=get("batch_size", 32), filter_bos=bool(get("filter_bos", False)),
        n_quantiles=get("n_quantiles", 10), overwrite=overwrite, progress=bool(get("verbose", True)))
    return dict(zip(dictionaries, caches, strict=True))
