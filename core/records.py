"""Record types of auto-interpretation: examples, latent records, explanations and scores.

Every type is a dataclass with ``to_dict``/``from_dict`` and ``to_json``/``from_json``; files hold one
JSON object per latent (schemas documented in ``docs/schemas.md``). ``LatentRecord`` is what the
latent analysis and samplers produce and what explainers and scorers consume; ``Explanation`` is
written to ``explanations/<hook>/latent_<i>.json`` and ``ScoreResult`` to
``scores/<scorer>/<hook>/latent_<i>.json``.

The ``schema`` key of each file names the type and its version (``saelab.explanation/1``); readers
reject files with another type and accept older versions of the same type.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict, TypeVar

from .errors import UsageError
from .fileio import json_default as _json_default
from .fileio import json_sha256, now_iso, write_json_atomic

if TYPE_CHECKING:
    from .llm import Completion

EXAMPLE_SCHEMA = "saelab.example/1"
LATENT_RECORD_SCHEMA = "saelab.latent_record/1"
EXPLANATION_SCHEMA = "saelab.explanation/1"
SCORE_SCHEMA = "saelab.score/1"

T = TypeVar("T", bound="_Record")


def content_hash(value: Any, length: int = 16) -> str:
    """sha256 (hex, first ``length`` chars) of ``value`` serialised as canonical JSON."""
    return json_sha256(value, length)


def _finite(value: float | None) -> float | None:
    """JSON has no NaN/inf: store them as null."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class _Record:
    """Shared JSON plumbing; subclasses define ``SCHEMA``, ``to_dict`` and ``_from_dict``."""

    SCHEMA: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (with the ``schema`` key)."""
        raise NotImplementedError

    @classmethod
    def _from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
        raise NotImplementedError

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
        """Build from a dict written by :meth:`to_dict` (one-line error on a wrong schema or field)."""
        schema = data.get("schema", cls.SCHEMA)
        if str(schema).split("/")[0] != cls.SCHEMA.split("/")[0]:
            raise UsageError(f"expected a {cls.SCHEMA.split('/')[0]!r} record, got schema {schema!r}")
        try:
            return cls._from_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"malformed {cls.SCHEMA} record: {type(exc).__name__}: {exc}") from None

    def to_json(self, indent: int | None = None) -> str:
        """The record as a JSON string."""
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=indent, default=_json_default)

    @classmethod
    def from_json(cls: type[T], text: str | bytes) -> T:
        """Parse a record from a JSON string."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"malformed {cls.SCHEMA} JSON: {exc}") from None
        if not isinstance(data, dict):
            raise UsageError(f"malformed {cls.SCHEMA} JSON: expected an object")
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the record to ``path`` atomically."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls: type[T], path: str | os.PathLike[str]) -> T:
        """Read a record written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise UsageError(f"record file {str(path)!r} does not exist")
        return cls.from_json(path.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------------
# Examples and latent records


@dataclass
class Example(_Record):
    """A window of tokens with one latent's activation on each token."""

    SCHEMA = EXAMPLE_SCHEMA

    id: str
    """Unique id within the latent record (stable: e.g. ``"s12:p40"``), used by per-example predictions."""
    sequence: int
    """Index of the sequence in the latent cache's token array."""
    start: int
    """Position of the window's first token in that sequence."""
    tokens: list[int]
    """Token ids of the window."""
    token_strs: list[str]
    """Decoded text of each token (same length as ``tokens``); a character split over several tokens is
    stored whole on the first token of its :attr:`char_spans` range, the range's other tokens hold ''."""
    activations: list[float]
    """The latent's activation on each token (same length as ``tokens``; 0 where it is off)."""
    max_activation: float | None = None
    """Largest activation in the window (computed from ``activations`` when not given)."""
    quantile: int | None = None
    """Activation quantile the example was drawn from (0 = weakest); None for non-activating ones."""
    is_activating: bool = True
    """True for examples where the latent fires; False for non-activating (negative) examples."""
    source: str = ""
    """Where the example came from: sampler or non-activating source name (``top``, ``random``...)."""
    char_spans: list[tuple[int, int]] = field(default_factory=list)
    """Token ranges ``[start, stop)`` decoded together because a character is split across their tokens
    (byte-level BPE); shown as one piece of text, with the max activation of its tokens. Empty when
    no character is split (and in records written before this field existed)."""
    site_shares: dict[str, float] | None = None
    """For a dictionary whose input sites each add a share to the pre-activation (a crosscoder): each input
    site's share ``x_h W_enc[h]`` of the latent's pre-activation at the example's max-activating token, as a
    fraction of the shares' sum (may be negative or above 1 when a site pushes against the others), by site
    name. None otherwise, for non-activating examples, and in records written before this field existed."""

    def __post_init__(self) -> None:
        if len(self.token_strs) != len(self.tokens) or len(self.activations) != len(self.tokens):
            raise ValueError(
                f"example {self.id!r}: tokens ({len(self.tokens)}), token_strs ({len(self.token_strs)}) and "
                f"activations ({len(self.activations)}) must have the same length"
            )
        self.char_spans = [(int(a), int(b)) for a, b in self.char_spans]
        last = 0
        for start, stop in self.char_spans:
            if not last <= start < stop - 1 < len(self.tokens):
                raise ValueError(f"example {self.id!r}: char span [{start}, {stop}) must cover at least 2 tokens "
                                 f"within 0..{len(self.tokens)}, in order and without overlap")
            last = stop
        self.activations = [float(a) for a in self.activations]
        if self.max_activation is None:
            self.max_activation = max(self.activations, default=0.0)

    @property
    def text(self) -> str:
        """The window as plain text."""
        return "".join(self.token_strs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (no ``schema`` key: examples are nested in records)."""
        return {
            "id": self.id,
            "sequence": int(self.sequence),
            "start": int(self.start),
            "tokens": [int(t) for t in self.tokens],
            "token_strs": list(self.token_strs),
            "activations": [_finite(a) or 0.0 for a in self.activations],
            "max_activation": _finite(self.max_activation),
            "quantile": self.quantile,
            "is_activating": self.is_activating,
            "source": self.source,
            # only when a character is split, so records (and fingerprints) of other text are unchanged
            **({"char_spans": [[a, b] for a, b in self.char_spans]} if self.char_spans else {}),
            **({"site_shares": {str(k): _finite(v) for k, v in self.site_shares.items()}}
               if self.site_shares is not None else {}),
        }

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any]) -> Example:
        return cls(
            id=str(data["id"]),
            sequence=int(data["sequence"]),
            start=int(data["start"]),
            tokens=[int(t) for t in data["tokens"]],
            token_strs=[str(t) for t in data["token_strs"]],
            activations=[float(a) for a in data["activations"]],
            max_activation=data.get("max_activation"),
            quantile=data.get("quantile"),
            is_activating=bool(data.get("is_activating", True)),
            source=str(data.get("source", "")),
            char_spans=[(int(a), int(b)) for a, b in data.get("char_spans") or []],
            site_shares=None if data.get("site_shares") is None
            else {str(k): float("nan") if v is None else float(v) for k, v in data["site_shares"].items()},
        )


@dataclass
class LatentStats:
    """Per-latent statistics from the latent analysis."""

    frequency: float
    """Fraction of analysed tokens on which the latent fires."""
    max_activation: float
    """Largest activation seen."""
    firing_count: int
    """Number of tokens on which the latent fires."""
    n_tokens: int | None = None
    """Tokens analysed (the denominator of ``frequency``)."""
    quantile_bounds: list[float] | None = None
    """Lower activation bound of each quantile, weakest first (None when not computed)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "frequency": _finite(self.frequency),
            "max_activation": _finite(self.max_activation),
            "firing_count": int(self.firing_count),
            "n_tokens": self.n_tokens,
            "quantile_bounds": None if self.quantile_bounds is None
            else [_finite(b) for b in self.quantile_bounds],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatentStats:
        """Build from :meth:`to_dict` output."""
        return cls(
            frequency=float(data.get("frequency") or 0.0),
            max_activation=float(data.get("max_activation") or 0.0),
            firing_count=int(data.get("firing_count") or 0),
            n_tokens=data.get("n_tokens"),
            quantile_bounds=data.get("quantile_bounds"),
        )


@dataclass
class TokenValues:
    """Tokens with one value each (top positive / negative logits of a latent)."""

    tokens: list[str]
    """Token strings."""
    values: list[float]
    """Value of each token (e.g. the logit boost through the unembedding)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"tokens": list(self.tokens), "values": [_finite(v) for v in self.values]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> TokenValues | None:
        """Build from :meth:`to_dict` output (None stays None)."""
        if data is None:
            return None
        return cls(tokens=[str(t) for t in data["tokens"]], values=[float(v) for v in data["values"]])


@dataclass
class Neighbour:
    """A related latent and its similarity (co-occurrence Jaccard, decoder or encoder cosine)."""

    latent: int
    """Index of the neighbour latent."""
    similarity: float
    """Similarity to the record's latent."""
    kind: str = ""
    """How the similarity was measured (``co-occurrence``, ``decoder_similarity``...)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"latent": int(self.latent), "similarity": _finite(self.similarity), "kind": self.kind}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Neighbour:
        """Build from :meth:`to_dict` output."""
        return cls(latent=int(data["latent"]), similarity=float(data.get("similarity") or 0.0),
                   kind=str(data.get("kind", "")))


LatentDiffing = TypedDict("LatentDiffing", {"relative_norm": float | None, "cosine": float | None, "class": str})
"""A latent's model diffing (:attr:`LatentRecord.diffing`): relative decoder norm ``||d_B|| / (||d_A|| +
||d_B||)``, cosine of the two decoders (None where undefined) and class (``a_only``, ``b_only``, ``shared``,
``other``)."""


@dataclass
class LatentRecord(_Record):
    """Everything explainers and scorers need about one latent.

    ``train`` examples go to the explainer; ``test`` (activating) and ``non_activating`` examples go
    to the scorers. Train and test examples must be disjoint (the sampler guarantees it).
    """

    SCHEMA = LATENT_RECORD_SCHEMA

    hookpoint: str
    """Hookpoint (or dictionary name) the latent belongs to."""
    latent: int
    """Latent index."""
    train: list[Example] = field(default_factory=list)
    """Activating examples shown to the explainer."""
    test: list[Example] = field(default_factory=list)
    """Activating examples held out for scoring."""
    non_activating: list[Example] = field(default_factory=list)
    """Examples where the latent is silent (scoring negatives)."""
    train_non_activating: list[Example] = field(default_factory=list)
    """Non-activating examples shown to contrastive explainers, disjoint from ``non_activating`` so
    scorers never test on a negative the explainer saw (empty when no contrastive explainer runs)."""
    stats: LatentStats | None = None
    """Firing statistics."""
    top_logits: TokenValues | None = None
    """Tokens whose logits the latent's decoder direction raises most (None when not computed)."""
    bottom_logits: TokenValues | None = None
    """Tokens whose logits it lowers most (None when not computed)."""
    neighbours: list[Neighbour] | None = None
    """Related latents (None when not computed)."""
    decoder_norms: dict[str, float] | None = None
    """Norm of the latent's decoder to each output site, by site name in site order (a cross-layer
    transcoder latent of layer i: to every layer, zero below i); None for dictionaries whose sites are
    not layers. Stored only when set, so older records keep their fingerprint."""
    top_logits_by_model: dict[str, TokenValues] | None = None
    """For a dictionary over several models' sites (``HOOKPOINT@LABEL``): by model label, the tokens whose
    logits the latent's decoder to that model's sites raises most, through that model's own unembedding.
    None otherwise; stored only when set."""
    bottom_logits_by_model: dict[str, TokenValues] | None = None
    """Like :attr:`top_logits_by_model`, the tokens whose logits it lowers most."""
    diffing: LatentDiffing | None = None
    """For a dictionary over exactly two output sites (A, B): ``{"relative_norm": float|None, "cosine":
    float|None, "class": str}`` from :func:`saelab.diffing.decoder_diff` (site 0 as A, site 1 as B).
    None otherwise; stored only when set."""

    def examples(self) -> list[Example]:
        """Every example: train, test, non-activating, then train non-activating."""
        return [*self.train, *self.test, *self.non_activating, *self.train_non_activating]

    def fingerprint(self) -> str:
        """Content hash of the record (its examples, stats, logits and neighbours)."""
        return content_hash(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        out: dict[str, Any] = {
            "schema": self.SCHEMA,
            "hookpoint": self.hookpoint,
            "latent": int(self.latent),
            "stats": None if self.stats is None else self.stats.to_dict(),
            "top_logits": None if self.top_logits is None else self.top_logits.to_dict(),
            "bottom_logits": None if self.bottom_logits is None else self.bottom_logits.to_dict(),
            "neighbours": None if self.neighbours is None else [n.to_dict() for n in self.neighbours],
            "train": [e.to_dict() for e in self.train],
            "test": [e.to_dict() for e in self.test],
            "non_activating": [e.to_dict() for e in self.non_activating],
            "train_non_activating": [e.to_dict() for e in self.train_non_activating],
        }
        if self.decoder_norms is not None:
            out["decoder_norms"] = {str(k): float(v) for k, v in self.decoder_norms.items()}
        for key in ("top_logits_by_model", "bottom_logits_by_model"):
            by_model = getattr(self, key)
            if by_model is not None:
                out[key] = {str(label): values.to_dict() for label, values in by_model.items()}
        if self.diffing is not None:
            out["diffing"] = {"relative_norm": _finite(self.diffing.get("relative_norm")),
                              "cosine": _finite(self.diffing.get("cosine")), "class": str(self.diffing["class"])}
        return out

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any]) -> LatentRecord:
        neighbours = data.get("neighbours")
        norms = data.get("decoder_norms")
        return cls(
            hookpoint=str(data["hookpoint"]),
            latent=int(data["latent"]),
            train=[Example._from_dict(e) for e in data.get("train", [])],
            test=[Example._from_dict(e) for e in data.get("test", [])],
            non_activating=[Example._from_dict(e) for e in data.get("non_activating", [])],
            train_non_activating=[Example._from_dict(e) for e in data.get("train_non_activating", [])],
            stats=None if data.get("stats") is None else LatentStats.from_dict(data["stats"]),
            top_logits=TokenValues.from_dict(data.get("top_logits")),
            bottom_logits=TokenValues.from_dict(data.get("bottom_logits")),
            neighbours=None if neighbours is None else [Neighbour.from_dict(n) for n in neighbours],
            decoder_norms=None if norms is None else {str(k): float(v) for k, v in norms.items()},
            top_logits_by_model=_by_model(data.get("top_logits_by_model")),
            bottom_logits_by_model=_by_model(data.get("bottom_logits_by_model")),
            diffing=None if data.get("diffing") is None else LatentDiffing(**data["diffing"]),
        )


def _by_model(data: Mapping[str, Any] | None) -> dict[str, TokenValues] | None:
    """``{label: TokenValues}`` from its JSON form (None stays None)."""
    if data is None:
        return None
    return {str(label): TokenValues.from_dict(values) for label, values in data.items()}  # type: ignore[misc]


# --------------------------------------------------------------------------------------------------
# LLM usage shared by explanations and scores


@dataclass
class Usage:
    """LLM usage: calls, tokens and cost. The one accumulator of saelab: a provider's running totals
    (:attr:`saelab.llm.LLMProvider.usage`, counted with :meth:`record`), the share of one invocation
    (``after - before``) and the usage of one explanation or score (counted with :meth:`add`)."""

    calls: int = 0
    """LLM requests: in a result, every answer it used (cache hits included); in provider totals, the
    answers obtained from the backend."""
    cached_calls: int = 0
    """Answers served from the response cache."""
    prompt_tokens: int = 0
    """Prompt tokens over the counted calls."""
    completion_tokens: int = 0
    """Completion tokens over the counted calls."""
    cost: float | None = None
    """Cost in USD of the calls with known prices; None when no price is known."""
    failed_calls: int = 0
    """``generate`` calls that raised after retries (provider totals)."""
    retries: int = 0
    """Attempts that were retried: 429, 5xx, timeouts... (provider totals)."""
    unpriced_calls: int = 0
    """Calls whose cost is unknown, not in ``cost`` (provider totals)."""

    RESULT_KEYS: ClassVar[tuple[str, ...]] = ("calls", "cached_calls", "prompt_tokens", "completion_tokens", "cost")
    """The keys stored in explanation and score files (:meth:`to_dict`)."""

    def _count(self, completion: Completion) -> None:
        self.prompt_tokens += int(completion.prompt_tokens or 0)
        self.completion_tokens += int(completion.completion_tokens or 0)
        if completion.cost is not None:
            self.cost = (self.cost or 0.0) + float(completion.cost)

    def add(self, completion: Completion) -> None:
        """Count one answer a result used: every answer is a call (a cache hit in ``cached_calls`` too),
        with its tokens and cost (the :attr:`RESULT_KEYS`)."""
        self.calls += 1
        self.cached_calls += int(bool(completion.cached))
        self._count(completion)

    def record(self, completion: Completion) -> None:
        """Count one answer a provider served: a cache hit only in ``cached_calls`` (it cost nothing), a
        backend answer in ``calls``, tokens and cost, or ``unpriced_calls`` when its cost is unknown."""
        if completion.cached:
            self.cached_calls += 1
            return
        self.calls += 1
        self._count(completion)
        self.unpriced_calls += int(completion.cost is None)

    def __add__(self, other: Usage) -> Usage:
        values = {}
        for name in (f.name for f in fields(self)):
            a, b = getattr(self, name), getattr(other, name)
            values[name] = a if b is None else b if a is None else a + b
        return Usage(**values)

    def __sub__(self, other: Usage) -> Usage:
        """What was counted since ``other`` (an earlier :meth:`snapshot` of the same totals)."""
        values = {}
        for name in (f.name for f in fields(self)):
            a, b = getattr(self, name), getattr(other, name)
            values[name] = a if a is None or b is None else a - b
        return Usage(**values)

    def snapshot(self) -> Usage:
        """A copy of the counts now (subtract it from a later state to get what happened in between)."""
        return replace(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of a result's usage: the :attr:`RESULT_KEYS`."""
        return {key: getattr(self, key) for key in self.RESULT_KEYS}

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict of every count (provider totals, a run summary's ``usage``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Usage:
        """Build from :meth:`to_dict` or :meth:`to_json` output."""
        data = data or {}
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


# --------------------------------------------------------------------------------------------------
# Explanations


@dataclass
class Explanation(_Record):
    """The explanation of one latent, with everything needed to reproduce or audit it."""

    @property
    def usable(self) -> bool:
        """True when the explanation can be scored: the request succeeded and the answer is usable."""
        return not self.error and not self.parse_failed

    SCHEMA = EXPLANATION_SCHEMA

    hookpoint: str
    """Hookpoint of the latent."""
    latent: int
    """Latent index."""
    text: str
    """The explanation (empty when the answer could not be parsed; see ``parse_failed``)."""
    explainer: str = ""
    """Explainer plugin name."""
    provider: str = ""
    """Provider plugin name."""
    model: str = ""
    """LLM that wrote the explanation."""
    prompt_version: str = ""
    """Hash of the prompts used (:func:`saelab.prompts.prompt_version`)."""
    raw_responses: list[str] = field(default_factory=list)
    """Raw LLM answers, in order."""
    usage: Usage = field(default_factory=Usage)
    """Calls, tokens and cost."""
    parse_failed: bool = False
    """True when the answer gave no usable explanation (``text`` then holds the fallback); ``failure``
    says why. Such an explanation is not scored."""
    failure: str | None = None
    """Why a parsed answer is unusable: ``unparsed`` (no ``[EXPLANATION]:`` line) or ``copied_few_shot``
    (it repeats a few-shot answer or quotes a few-shot example); None when usable."""
    error: str | None = None
    """Why the LLM request failed for good (after retries); None on success. Such explanations
    should not be cached as final: a re-run retries them."""
    fingerprint: str = ""
    """Hash of the inputs (examples, explainer and options, provider, model, prompts)."""
    options: dict[str, Any] = field(default_factory=dict)
    """The explainer's resolved options."""
    created_at: str = field(default_factory=now_iso)
    """UTC creation time (ISO 8601)."""

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens over all calls."""
        return self.usage.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        """Completion tokens over all calls."""
        return self.usage.completion_tokens

    @property
    def cost(self) -> float | None:
        """Cost in USD, where known."""
        return self.usage.cost

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "schema": self.SCHEMA,
            "hookpoint": self.hookpoint,
            "latent": int(self.latent),
            "text": self.text,
            "explainer": self.explainer,
            "provider": self.provider,
            "model": self.model,
            "prompt_version": self.prompt_version,
            "parse_failed": self.parse_failed,
            "failure": self.failure,
            "error": self.error,
            "usage": self.usage.to_dict(),
            "fingerprint": self.fingerprint,
            "options": self.options,
            "created_at": self.created_at,
            "raw_responses": list(self.raw_responses),
        }

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any]) -> Explanation:
        return cls(
            hookpoint=str(data["hookpoint"]),
            latent=int(data["latent"]),
            text=str(data["text"]),
            explainer=str(data.get("explainer", "")),
            provider=str(data.get("provider", "")),
            model=str(data.get("model", "")),
            prompt_version=str(data.get("prompt_version", "")),
            raw_responses=[str(r) for r in data.get("raw_responses", [])],
            usage=Usage.from_dict(data.get("usage")),
            parse_failed=bool(data.get("parse_failed", False)),
            failure=data.get("failure") or ("unparsed" if data.get("parse_failed") else None),
            error=data.get("error"),
            fingerprint=str(data.get("fingerprint", "")),
            options=dict(data.get("options") or {}),
            created_at=str(data.get("created_at", "")),
        )


# --------------------------------------------------------------------------------------------------
# Scores


@dataclass
class Prediction:
    """A scorer's verdict on one example (or, for the intruder scorer, on one prompt)."""

    example_id: str
    """Id of the example (:attr:`Example.id`)."""
    truth: int
    """Ground truth: 1 for activating (or, for intruder, the example is the intruder), 0 otherwise."""
    prediction: int | None = None
    """Predicted label (0/1); None when the answer could not be parsed."""
    probability: float | None = None
    """P(1) / (P(0) + P(1)) from the answer's logprobs; None when logprobs are unavailable."""
    score: float | None = None
    """A continuous per-example score (simulation: correlation; embedding: similarity; surprisal:
    loss decrease); None for scorers without one."""
    correct: bool | None = None
    """``prediction == truth``; None when there is no prediction."""
    quantile: int | None = None
    """Activation quantile of the example (None for non-activating ones)."""
    values: list[float] | None = None
    """Per-token predictions (simulation: 0-10 per token)."""
    raw: str | None = None
    """Raw LLM answer of the prompt this example was in."""
    parse_failed: bool = False
    """True when the prompt's answer could not be parsed for this example."""
    prompt_index: int | None = None
    """Index of the prompt (batch) this example was sent in."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "example_id": self.example_id,
            "truth": int(self.truth),
            "prediction": self.prediction,
            "probability": _finite(self.probability),
            "score": _finite(self.score),
            "correct": self.correct,
            "quantile": self.quantile,
            "values": None if self.values is None else [_finite(v) for v in self.values],
            "raw": self.raw,
            "parse_failed": self.parse_failed,
            "prompt_index": self.prompt_index,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Prediction:
        """Build from :meth:`to_dict` output."""
        return cls(
            example_id=str(data["example_id"]),
            truth=int(data["truth"]),
            prediction=data.get("prediction"),
            probability=data.get("probability"),
            score=data.get("score"),
            correct=data.get("correct"),
            quantile=data.get("quantile"),
            values=data.get("values"),
            raw=data.get("raw"),
            parse_failed=bool(data.get("parse_failed", False)),
            prompt_index=data.get("prompt_index"),
        )


@dataclass
class Failures:
    """Real failure counts of one score (delphi's are always 0)."""

    prompts: int = 0
    """Prompts whose answer could not be parsed (or whose request failed)."""
    examples: int = 0
    """Examples left without a prediction because of those prompts."""
    requests: int = 0
    """Requests that raised after all retries (a subset of ``prompts``)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Failures:
        """Build from :meth:`to_dict` output."""
        data = data or {}
        return cls(**{k: int(data[k]) for k in ("prompts", "examples", "requests") if k in data})


@dataclass
class ScoreResult(_Record):
    """One scorer's verdict on one latent's explanation: per-example predictions and metrics."""

    SCHEMA = SCORE_SCHEMA

    scorer: str
    """Scorer plugin name."""
    hookpoint: str
    """Hookpoint of the latent."""
    latent: int
    """Latent index."""
    explanation: str
    """The explanation text that was scored (empty for explanation-free scorers such as intruder)."""
    predictions: list[Prediction] = field(default_factory=list)
    """Per-example predictions."""
    metrics: dict[str, float | None] = field(default_factory=dict)
    """Metrics (``balanced_accuracy``, ``precision``, ``recall``, ``f1``, ``auc``, ``correlation``...);
    None where undefined (e.g. AUC without logprobs)."""
    failures: Failures = field(default_factory=Failures)
    """Real failure counts."""
    n_prompts: int = 0
    """Prompts sent (or local LM batches scored)."""
    raw_responses: list[str] = field(default_factory=list)
    """Raw LLM answers, in prompt order ('' for a failed request)."""
    errors: list[str] = field(default_factory=list)
    """Provider errors of failed requests (one line each)."""
    usage: Usage = field(default_factory=Usage)
    """Calls, tokens and cost."""
    provider: str = ""
    """Provider plugin name (or the local model's id for local scorers)."""
    model: str = ""
    """Model that scored."""
    prompt_version: str = ""
    """Hash of the prompts used."""
    fingerprint: str = ""
    """Hash of the inputs (examples, explanation, scorer and options, provider, model, prompts)."""
    options: dict[str, Any] = field(default_factory=dict)
    """The scorer's resolved options."""
    created_at: str = field(default_factory=now_iso)
    """UTC creation time (ISO 8601)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "schema": self.SCHEMA,
            "scorer": self.scorer,
            "hookpoint": self.hookpoint,
            "latent": int(self.latent),
            "explanation": self.explanation,
            "metrics": {k: _finite(v) for k, v in self.metrics.items()},
            "failures": self.failures.to_dict(),
            "n_prompts": self.n_prompts,
            "provider": self.provider,
            "model": self.model,
            "prompt_version": self.prompt_version,
            "usage": self.usage.to_dict(),
            "fingerprint": self.fingerprint,
            "options": self.options,
            "created_at": self.created_at,
            "predictions": [p.to_dict() for p in self.predictions],
            "raw_responses": list(self.raw_responses),
            "errors": list(self.errors),
        }

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any]) -> ScoreResult:
        return cls(
            scorer=str(data["scorer"]),
            hookpoint=str(data["hookpoint"]),
            latent=int(data["latent"]),
            explanation=str(data.get("explanation", "")),
            predictions=[Prediction.from_dict(p) for p in data.get("predictions", [])],
            metrics=dict(data.get("metrics") or {}),
            failures=Failures.from_dict(data.get("failures")),
            n_prompts=int(data.get("n_prompts", 0)),
            raw_responses=[str(r) for r in data.get("raw_responses", [])],
            errors=[str(e) for e in data.get("errors", [])],
            usage=Usage.from_dict(data.get("usage")),
            provider=str(data.get("provider", "")),
            model=str(data.get("model", "")),
            prompt_version=str(data.get("prompt_version", "")),
            fingerprint=str(data.get("fingerprint", "")),
            options=dict(data.get("options") or {}),
            created_at=str(data.get("created_at", "")),
        )


def score_is_current(score: ScoreResult, explanation: Explanation | None) -> bool:
    """True when ``score`` was computed from ``explanation`` as it stands: an explanation-free score
    (``score.explanation == ""``, e.g. intruder) always is; any other needs a usable explanation with
    the same text. Scores of replaced or failed explanations are neither shown nor counted."""
    if not score.explanation:
        return True
    return explanation is not None and explanation.usable and explanation.text == score.explanation


def load_record(path: str | os.PathLike[str]) -> LatentRecord | Explanation | ScoreResult:
    """Read any record file, dispatching on its ``schema`` key."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"record file {str(path)!r} does not exist")
    data = json.loads(path.read_text(encoding="utf-8"))
    by_schema: dict[str, type[Any]] = {c.SCHEMA.split("/")[0]: c
                                       for c in (LatentRecord, Explanation, ScoreResult)}
    schema = str(data.get("schema", "")).split("/")[0]
    if schema not in by_schema:
        raise UsageError(f"{str(path)!r} has unknown schema {data.get('schema')!r}; known: "
                         + ", ".join(sorted(by_schema)))
    return by_schema[schema].from_dict(data)


def examples_fingerprint(examples: Sequence[Example]) -> str:
    """Content hash of a list of examples (for explanation and score fingerprints)."""
    return content_hash([e.to_dict() for e in examples])
