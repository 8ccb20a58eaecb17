"""Public bases of explainer and scorer plugins: LLM calls, answer parsing, batching and base classes.

Builtin and third-party explainer/scorer plugins subclass :class:`LLMExplainer` (one prompt per latent,
``[EXPLANATION]:`` answers), :class:`PromptScorer` (examples shuffled into prompts, sent concurrently) or
:class:`BinaryPromptScorer` (a 0/1 answer per example), or the bare :class:`saelab.Explainer` /
:class:`saelab.Scorer`, and reuse the parsers and example formatting here; the builtins use them exactly
as a third party would. Each plugin ships its prompts next to its module (``prompt_file``, see
:mod:`saelab.prompts`). Scorer prompts for one latent are sent concurrently (``asyncio.gather``); the
provider's own concurrency limit bounds what is in flight. :func:`checked_result` is how the engine
rejects a plugin result of the wrong type.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import Field

from .errors import UsageError, wrong_return_type
from .highlight import (
    display_spans,
    highlight,
    span_activations,
    span_texts,
    visible,
)
from .interfaces import Explainer, Provider, Scorer
from .metrics import binary_metrics, probability_of_one
from .options import Options
from .prompts import PromptValue, chat_prompt, fill
from .records import (
    Example,
    Explanation,
    Failures,
    LatentRecord,
    Prediction,
    ScoreResult,
    Usage,
    content_hash,
)

if TYPE_CHECKING:
    from .llm import Completion

Messages = list[dict[str, str]]

_Result = TypeVar("_Result", Explanation, ScoreResult)
_OptionsT = TypeVar("_OptionsT", bound=Options)


def checked_result(value: object, expected: type[_Result], kind: str, plugin: Explainer | Scorer) -> _Result:
    """``value`` when it is an ``expected`` instance (what :meth:`saelab.Explainer.explain` /
    :meth:`saelab.Scorer.score` must return), else a one-line :class:`saelab.UsageError` naming the plugin."""
    if isinstance(value, expected):
        return value
    method = "explain" if kind == "explainer" else "score"
    raise wrong_return_type(kind, plugin, value, f"saelab.records.{expected.__name__}", method)


def typed_options(plugin: Explainer | Scorer, base: type[_OptionsT], kind: str) -> _OptionsT:
    """``plugin.options`` when it is a ``base`` instance (the fields :class:`LLMExplainer` /
    :class:`PromptScorer` read), else a one-line :class:`saelab.UsageError` naming the plugin."""
    if isinstance(plugin.options, base):
        return plugin.options
    cls = type(plugin)
    raise UsageError(f"{kind} {plugin.name!r} ({cls.__module__}.{cls.__qualname__}) has options "
                     f"{type(plugin.options).__qualname__}, which do not subclass saelab.autointerp.{base.__name__}; "
                     f"its Options must subclass {base.__name__}")

# --------------------------------------------------------------------------------------------------
# LLM calls


@dataclass
class CallResult:
    """A finished LLM call: the completion, or the error that ended it after retries."""

    completion: Completion | None
    """The provider's completion, or None when the request failed."""
    error: str | None = None
    """The provider's one-line error when the request failed."""

    @property
    def text(self) -> str:
        """The answer text ('' on failure)."""
        return "" if self.completion is None else str(self.completion.text or "")


async def call_llm(provider: Provider, messages: Messages, **params: Any) -> CallResult:
    """One chat completion; a provider failure (after its retries) is returned, not raised, so one bad
    prompt does not lose a latent's other prompts."""
    from .llm import ProviderError, check_completion

    try:
        return CallResult(check_completion(provider, await provider.generate(messages, **params)))
    except ProviderError as exc:
        return CallResult(None, str(exc))


def accepts_answer_format(provider: Provider | None) -> bool:
    """True when ``provider.generate`` takes ``answer_format`` (every :class:`saelab.llm.LLMProvider`
    does: it enforces the format where it can and ignores it elsewhere)."""
    return provider is not None and provider.takes_answer_format


def provider_names(provider: Provider | None) -> tuple[str, str]:
    """``(provider name, model)`` of a provider (empty strings when None)."""
    if provider is None:
        return "", ""
    return provider.name, provider.model


def provider_identity(provider: Provider | None) -> dict[str, object]:
    """The provider's :meth:`~saelab.Provider.identity` for fingerprints (``{}`` when None)."""
    if provider is None:
        return {}
    return dict(provider.identity())


def explanation_fingerprint(record: LatentRecord, explainer: Explainer, provider: Provider | None) -> str:
    """Hash of everything an explanation depends on: the examples it was shown, the explainer (name,
    options, prompts) and the provider/model."""
    return content_hash({
        "hookpoint": record.hookpoint, "latent": record.latent,
        "examples": [e.to_dict() for e in (*record.train, *record.train_non_activating)],
        "top_logits": None if record.top_logits is None else record.top_logits.to_dict(),
        "bottom_logits": None if record.bottom_logits is None else record.bottom_logits.to_dict(),
        "explainer": explainer.identity(), "provider": provider_identity(provider),
    })


def score_fingerprint(record: LatentRecord, explanation: str, scorer: Scorer, provider: Provider | None) -> str:
    """Hash of everything a score depends on: test and non-activating examples, the explanation text,
    the scorer (name, options, prompts) and the provider/model."""
    return content_hash({
        "hookpoint": record.hookpoint, "latent": record.latent,
        "examples": [e.to_dict() for e in (*record.test, *record.non_activating)],
        "explanation": explanation, "scorer": scorer.identity(),
        "provider": provider_identity(provider) if scorer.uses_provider else {},
    })


# --------------------------------------------------------------------------------------------------
# Answer parsing

_EXPLANATION = re.compile(r"\[?\s*EXPLANATION\s*\]?\s*:", re.IGNORECASE)


def parse_explanation(text: str) -> tuple[str, bool]:
    """``(explanation, parsed)``: the text after the last ``[EXPLANATION]:`` (first non-empty line of
    it). Without the marker, ``parsed`` is False and the fallback is the answer's last non-empty line."""
    matches = list(_EXPLANATION.finditer(text or ""))
    if matches:
        after = text[matches[-1].end():].strip()
        line = next((ln.strip() for ln in after.splitlines() if ln.strip()), "")
        if line:
            return _clean(line), True
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return (_clean(lines[-1]) if lines else ""), False


def _clean(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


# --------------------------------------------------------------------------------------------------
# Few-shot copies

COPY_MIN_WORDS = 4
"""An explanation quoting this many consecutive (normalised) words of a few-shot example copies it."""

_GENERIC_WORDS_TEXT = (
    "a an the and or but nor of in on at to for from by with about as into onto over under after before than "
    "then so such that this these those it its is are was were be been being has have had do does did not no "
    "any all some each every other more most very can could will would may might must should which who whom "
    "what when where why how there here their they them he she his her we our you your i my me one ones "
    "word words token tokens text example examples phrase phrases mention mentions related like")

_LABEL = re.compile(r"^\s*(?:example\s+\d+\s*(?:\(\d+\s+tokens\))?\s*:|\(\d+\))", re.IGNORECASE)
_WORD = re.compile(r"[a-z0-9]+")
_EXAMPLE_LABEL = re.compile(r"^\s*example\s+\d+\b", re.IGNORECASE)


def _stem(word: str) -> str:
    for suffix, shortest in (("ing", 6), ("ed", 5), ("s", 4)):
        if word.endswith(suffix) and len(word) >= shortest and not word.endswith("ss"):
            return word[: -len(suffix)]
    return word


def normalised_words(text: str) -> list[str]:
    """Lower-case, crudely stemmed words of ``text``: punctuation, ``<<delimiters>>``, spacing and
    ``Example N:`` labels do not count."""
    lines = (_LABEL.sub(" ", line) for line in _EXPLANATION.sub(" ", text or "").splitlines())
    return [_stem(w) for w in _WORD.findall(" ".join(lines).lower())]


_GENERIC_WORDS = frozenset(normalised_words(_GENERIC_WORDS_TEXT))
"""Words that do not make a run of words distinctive (a run made only of these is never a copy)."""


@dataclass(frozen=True)
class FewShotContent:
    """What an explainer's few-shot messages show: their answers and their example texts."""

    answers: tuple[str, ...] = ()
    """The few-shot explanations (after ``[EXPLANATION]:``)."""
    texts: tuple[str, ...] = ()
    """The few-shot example texts: the ``Example N:`` lines of the user messages (every line of a user
    message without such labels); headers, questions and ``Activations:`` lines are prompt scaffolding."""

    @classmethod
    def from_messages(cls, messages: Messages) -> FewShotContent:
        """Split few-shot chat messages into answers (assistant) and example texts (user)."""
        answers: list[str] = []
        texts: list[str] = []
        for message in messages:
            content = str(message.get("content") or "")
            if message.get("role") == "assistant":
                answer, parsed = parse_explanation(content)
                if parsed and answer:
                    answers.append(answer)
                continue
            lines = [ln for ln in content.splitlines() if ln.strip()]
            labelled = [ln for ln in lines if _EXAMPLE_LABEL.match(ln)]
            texts += labelled or [ln for ln in lines if not ln.lstrip().startswith("Activations:")]
        return cls(tuple(answers), tuple(texts))

    def copied_by(self, explanation: str, min_words: int = COPY_MIN_WORDS) -> str | None:
        """The few-shot answer or example words that ``explanation`` repeats (compared as
        :func:`normalised_words`), or None when it copies nothing: it equals or contains a few-shot answer,
        or holds ``min_words`` consecutive words of an answer or a text, not all of them generic. A short
        answer (under 3 words, e.g. "Years.") is a copy only when repeated exactly."""
        words = normalised_words(explanation)
        if not words:
            return None
        joined = f" {' '.join(words)} "
        for answer in self.answers:
            answer_words = normalised_words(answer)
            if answer_words == words or (len(answer_words) >= 3 and f" {' '.join(answer_words)} " in joined):
                return answer
        runs = {tuple(words[i:i + min_words]) for i in range(len(words) - min_words + 1)}
        runs = {run for run in runs if any(w not in _GENERIC_WORDS for w in run)}
        for source in (*self.answers, *self.texts):
            source_words = normalised_words(source)
            for i in range(len(source_words) - min_words + 1):
                run = tuple(source_words[i:i + min_words])
                if run in runs:
                    return " ".join(run)
        return None


_LIST = re.compile(r"\[([^\[\]]*)\]")
_BIT = re.compile(r"(?<![\w.])([01])(?![\w.])")


def parse_binary_list(text: str, n: int) -> list[int] | None:
    """The answer's list of ``n`` 0/1 values: the last ``[...]`` holding exactly ``n`` of them, else
    exactly ``n`` bare 0/1 tokens in the whole answer; None when neither is found (a failure)."""
    for match in reversed(list(_LIST.finditer(text or ""))):
        items = [item.strip().strip("'\"") for item in match.group(1).split(",") if item.strip()]
        if len(items) == n and all(item in ("0", "1") for item in items):
            return [int(item) for item in items]
    bits = _BIT.findall(text or "")
    if len(bits) == n and "[" not in (text or ""):
        return [int(b) for b in bits]
    return None


def _digit(token: str) -> str:
    return token.strip().strip("[],'\" ")


def binary_probabilities(completion: Completion | None, n: int) -> list[float | None] | None:
    """P(1) / (P(0) + P(1)) for each of the ``n`` answer positions from the completion's logprobs:
    the last ``n`` generated tokens that read ``0`` or ``1`` (ignoring brackets, commas and spaces),
    each using its ``top_logprobs`` (a class missing from them has probability 0; with no
    alternatives, the chosen token's probability p gives ``1 - p`` to the other class). None when
    logprobs are missing or fewer than ``n`` such tokens were generated."""
    entries = completion.logprobs if completion is not None else None
    if not entries:
        return None
    positions = [e for e in entries if _digit(e.token) in ("0", "1")]
    if len(positions) < n:
        return None
    out: list[float | None] = []
    for entry in positions[-n:]:
        lp: dict[str, float | None] = {"0": None, "1": None}
        for token, logprob in (entry.top_logprobs or {}).items():
            digit = _digit(token)
            if digit in lp and logprob is not None:
                known = lp[digit]
                lp[digit] = logprob if known is None else _logaddexp(known, logprob)
        if lp["0"] is None and lp["1"] is None:
            p = math.exp(entry.logprob)
            out.append(p if _digit(entry.token) == "1" else 1.0 - p)
        else:
            out.append(probability_of_one(lp["1"], lp["0"]))
    return out


def _logaddexp(a: float, b: float) -> float:
    top = max(a, b)
    return top + math.log(math.exp(a - top) + math.exp(b - top))


# --------------------------------------------------------------------------------------------------
# Example formatting


def display_tokens(example: Example) -> list[str]:
    """The example's display spans as text, control characters made visible (``\\n``, ``\\x00``...) so each
    example stays on one line. A span is one token, or the tokens of a character split across several
    (``example.char_spans``) shown once, whole; :func:`display_activations` gives their activations."""
    return [visible(t) for t in span_texts(example.token_strs, display_spans(len(example.tokens), example.char_spans))]


def display_activations(example: Example) -> list[float]:
    """The activation of each of :func:`display_tokens`' spans: the max over its tokens."""
    return span_activations(example.activations, display_spans(len(example.tokens), example.char_spans))


def plain_text(example: Example) -> str:
    """The example as one line of plain text."""
    return "".join(display_tokens(example))


def highlighted_text(example: Example, threshold: float = 0.3) -> str:
    """The example with its activating spans in ``<<...>>`` (a split character is highlighted whole)."""
    return highlight(display_tokens(example), display_activations(example), threshold)


def number_examples(texts: Sequence[str], start: int = 1) -> str:
    """``Example 1: ...`` lines."""
    return "\n".join(f"Example {i}: {t}" for i, t in enumerate(texts, start))


def latent_rng(seed: int, *parts: Any) -> random.Random:
    """A deterministic RNG for one latent and purpose (same seed and parts -> same draws)."""
    return random.Random(":".join(str(p) for p in (seed, *parts)))


def batched(items: Sequence[Any], size: int) -> list[list[Any]]:
    """Consecutive batches of ``size``; the last one may be shorter (it is scored like any other)."""
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


# --------------------------------------------------------------------------------------------------
# Explainers


class ExplainerOptions(Options):
    """Options shared by the LLM explainers."""

    threshold: float = Field(default=0.3, ge=0.0, le=1.0)
    """Tokens above this fraction of an example's max activation are highlighted."""
    max_examples: int | None = Field(default=None, ge=1)
    """Show at most this many train examples (None: all the sampler chose)."""
    few_shot: bool = True
    """Send the prompt file's few-shot examples before the question."""
    temperature: float = Field(default=0.0, ge=0.0)
    """Sampling temperature."""
    max_tokens: int = Field(default=100, ge=1)
    """Longest answer, in tokens (an explanation is one short line; a small local model that loops is cut
    here)."""
    constrain_answer: bool = True
    """Ask for one line starting with ``[EXPLANATION]:`` (``answer_format`` ``prefixed_line``): the local
    ``transformers`` provider enforces it by constrained decoding, API providers ignore it."""


EXPLANATION_PREFIX = "[EXPLANATION]:"
"""The marker an explanation answer carries before the explanation."""


class LLMExplainer(Explainer):
    """An explainer that sends one chat prompt per latent and parses ``[EXPLANATION]:`` from the answer.

    Subclasses set ``prompt_prefix`` and implement :meth:`user_message` (and may override
    :meth:`system_message`, :meth:`few_shot` and :meth:`parse`).
    """

    Options: ClassVar[type[ExplainerOptions]] = ExplainerOptions

    def __init__(self, options: Options | Mapping[str, object] | None = None,
                 prompts: Mapping[str, PromptValue] | None = None):
        super().__init__(options, prompts)
        self.options: ExplainerOptions = typed_options(self, ExplainerOptions, "explainer")
        """The validated options (an :class:`ExplainerOptions`)."""

    def system_message(self) -> str:
        """The system prompt."""
        return str(self.prompts[f"{self.prompt_prefix}.system"])

    def few_shot(self) -> Messages:
        """Few-shot messages (empty when ``few_shot`` is off)."""
        if not self.options.few_shot:
            return []
        return self.prompts.few_shot(self.prompt_prefix)

    def user_message(self, record: LatentRecord) -> str:
        """The question about ``record``."""
        raise NotImplementedError

    def train_examples(self, record: LatentRecord) -> list[Example]:
        """The train examples shown, at most ``max_examples``."""
        limit = self.options.max_examples
        return list(record.train[:limit] if limit else record.train)

    def messages(self, record: LatentRecord) -> list[Messages]:
        """The single prompt sent for ``record`` (a system template holding ``{prompt}`` gets the user
        message there; see :func:`saelab.prompts.chat_prompt`)."""
        return [chat_prompt(self.system_message(), self.few_shot(), self.user_message(record))]

    def parse(self, text: str) -> tuple[str, bool]:
        """``(explanation, parsed)`` from the answer."""
        return parse_explanation(text)

    def copied_few_shot(self, explanation: str) -> str | None:
        """What ``explanation`` copies from the few-shot messages sent (see
        :meth:`FewShotContent.copied_by`), or None. Such an explanation fails with ``copied_few_shot``."""
        return FewShotContent.from_messages(self.few_shot()).copied_by(explanation)

    def call_params(self) -> dict[str, Any]:
        """Per-call provider parameters."""
        return {"temperature": self.options.temperature, "max_tokens": self.options.max_tokens}

    def answer_format(self) -> dict[str, Any] | None:
        """The ``answer_format`` requested (one ``[EXPLANATION]:`` line), None when ``constrain_answer`` is off."""
        if not self.options.constrain_answer:
            return None
        return {"type": "prefixed_line", "prefix": EXPLANATION_PREFIX}

    def provider_params(self, provider: Provider) -> dict[str, Any]:
        """:meth:`call_params` plus the answer format where the provider takes one."""
        params = self.call_params()
        answer_format = self.answer_format()
        if answer_format is not None and accepts_answer_format(provider):
            params["answer_format"] = answer_format
        return params

    async def explain(self, record: LatentRecord, provider: Provider) -> Explanation:
        """Ask the LLM and parse its answer; a failed request gives an explanation with ``error`` set."""
        usage = Usage()
        raw: list[str] = []
        text, parsed, error = "", False, None
        for messages in self.messages(record):
            result = await call_llm(provider, messages, **self.provider_params(provider))
            if result.completion is None:
                error = result.error
                continue
            usage.add(result.completion)
            raw.append(result.text)
            text, parsed = self.parse(result.text)
        failure = None if parsed or error else "unparsed"
        if parsed and self.copied_few_shot(text) is not None:
            parsed, failure = False, "copied_few_shot"
        name, model = provider_names(provider)
        return Explanation(
            hookpoint=record.hookpoint, latent=record.latent, text=text, explainer=self.name,
            provider=name, model=model, prompt_version=self.prompt_version(), raw_responses=raw,
            usage=usage, parse_failed=not parsed, failure=failure, error=error,
            fingerprint=explanation_fingerprint(record, self, provider),
            options=self.options.model_dump(mode="json"),
        )


# --------------------------------------------------------------------------------------------------
# Scorers


class ScorerOptions(Options):
    """Options shared by the prompt-based scorers."""

    num_examples_per_scorer_prompt: int = Field(default=5, ge=1)
    """Examples per prompt (delphi's ``--num_examples_per_scorer_prompt``)."""
    seed: int = 22
    """Seed of the deterministic shuffle of examples into prompts."""
    log_probs: bool = False
    """Request logprobs and compute AUC from P(1)/(P(0)+P(1)) (where the provider offers them)."""
    top_logprobs: int = Field(default=5, ge=1, le=20)
    """Alternatives per token requested with ``log_probs``."""
    few_shot: bool = True
    """Send the prompt file's few-shot examples before the question."""
    temperature: float = Field(default=0.0, ge=0.0)
    """Sampling temperature."""
    max_tokens: int = Field(default=200, ge=1)
    """Longest answer, in tokens."""
    constrain_answer: bool = True
    """Ask for the answer's exact shape (``answer_format``, e.g. a list of as many 0/1 as examples): the local
    ``transformers`` provider enforces it by constrained decoding, API providers ignore it."""


def explanation_text(explanation: Explanation | str | None) -> str:
    """The text of an explanation given as a record or a string."""
    if explanation is None:
        return ""
    return explanation.text if isinstance(explanation, Explanation) else str(explanation)


@dataclass
class ScoringItem:
    """An example as placed in a scorer prompt: its truth and how it is shown."""

    example: Example
    truth: int
    shown: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class PromptScorer(Scorer):
    """A scorer that shuffles test and non-activating examples into prompts of
    ``num_examples_per_scorer_prompt`` and sends them concurrently.

    Subclasses set ``prompt_prefix`` and implement :meth:`show` (how an example is written) and
    :meth:`parse_batch` (answer -> per-example predictions), and may override :meth:`metrics`.
    """

    Options: ClassVar[type[ScorerOptions]] = ScorerOptions

    def __init__(self, options: Options | Mapping[str, object] | None = None,
                 prompts: Mapping[str, PromptValue] | None = None):
        super().__init__(options, prompts)
        self.options: ScorerOptions = typed_options(self, ScorerOptions, "scorer")
        """The validated options (a :class:`ScorerOptions`)."""

    # -- building prompts

    def items(self, record: LatentRecord) -> list[ScoringItem]:
        """Test examples (truth 1) and non-activating ones (truth 0), shown and shuffled deterministically."""
        rng = latent_rng(self.options.seed, self.name, record.hookpoint, record.latent)
        items = [ScoringItem(e, 1) for e in record.test] + [ScoringItem(e, 0) for e in record.non_activating]
        self.prepare(record, items, rng)
        rng.shuffle(items)
        return items

    def prepare(self, record: LatentRecord, items: list[ScoringItem], rng: random.Random) -> None:
        """Fill ``item.shown`` for every item (the default: :meth:`show`)."""
        for item in items:
            item.shown = self.show(item.example, item.truth, rng)

    def show(self, example: Example, truth: int, rng: random.Random) -> str:
        """How ``example`` is written in the prompt."""
        return plain_text(example)

    def format_examples(self, batch: Sequence[ScoringItem]) -> str:
        """The examples block of one prompt."""
        return number_examples([item.shown for item in batch])

    def prompt(self, explanation: str, batch: Sequence[ScoringItem]) -> Messages:
        """One chat prompt for ``batch``."""
        few_shot = self.prompts.few_shot(self.prompt_prefix) if self.options.few_shot else []
        user = fill(str(self.prompts[f"{self.prompt_prefix}.user"]), explanation=explanation,
                    examples=self.format_examples(batch))
        return chat_prompt(str(self.prompts[f"{self.prompt_prefix}.system"]), few_shot, user)

    def batches(self, record: LatentRecord) -> list[list[ScoringItem]]:
        """The shuffled items cut into prompts."""
        return batched(self.items(record), self.options.num_examples_per_scorer_prompt)

    def messages(self, record: LatentRecord, explanation: Explanation | None) -> list[Messages]:
        """Every prompt :meth:`score` sends."""
        text = explanation_text(explanation)
        return [self.prompt(text, batch) for batch in self.batches(record)]

    def call_params(self) -> dict[str, Any]:
        """Per-call provider parameters (logprobs when ``log_probs``)."""
        params: dict[str, Any] = {"temperature": self.options.temperature, "max_tokens": self.options.max_tokens}
        if self.options.log_probs:
            params.update(logprobs=True, top_logprobs=self.options.top_logprobs)
        return params

    def answer_format(self, batch: Sequence[ScoringItem]) -> dict[str, Any] | None:
        """The ``answer_format`` of the prompt for ``batch`` (None: free text, the default)."""
        return None

    def batch_params(self, batch: Sequence[ScoringItem], provider: Provider) -> dict[str, Any]:
        """:meth:`call_params` plus the batch's answer format where ``constrain_answer`` is on and the
        provider takes one."""
        params = self.call_params()
        answer_format = self.answer_format(batch) if self.options.constrain_answer else None
        if answer_format is not None and accepts_answer_format(provider):
            params["answer_format"] = answer_format
        return params

    # -- parsing and metrics

    def parse_batch(self, batch: Sequence[ScoringItem], result: CallResult) -> list[Prediction]:
        """Per-example predictions of one prompt; unparseable answers give ``parse_failed`` predictions."""
        raise NotImplementedError

    def metrics(self, predictions: Sequence[Prediction], record: LatentRecord) -> dict[str, float | None]:
        """Classification metrics (AUC from probabilities where any exists)."""
        probs = [p.probability for p in predictions]
        return binary_metrics([p.truth for p in predictions], [p.prediction for p in predictions],
                              probs if any(x is not None for x in probs) else None)

    def failed_predictions(self, batch: Sequence[ScoringItem], index: int, raw: str | None) -> list[Prediction]:
        """Predictions for a prompt whose answer could not be used."""
        return [Prediction(example_id=item.example.id, truth=item.truth, quantile=item.example.quantile,
                           raw=raw, parse_failed=True, prompt_index=index) for item in batch]

    async def score(self, record: LatentRecord, explanation: Explanation | None,
                    provider: Provider | None) -> ScoreResult:
        """Send every prompt concurrently, parse each answer, compute metrics and count failures."""
        if provider is None:
            raise UsageError(f"scorer {self.name!r} needs an LLM provider")
        text = explanation_text(explanation)
        batches = self.batches(record)
        results = await asyncio.gather(*(call_llm(provider, self.prompt(text, b), **self.batch_params(b, provider))
                                         for b in batches))
        usage, failures = Usage(), Failures()
        predictions: list[Prediction] = []
        raw: list[str] = []
        errors: list[str] = []
        for index, (batch, result) in enumerate(zip(batches, results, strict=True)):
            if result.completion is None:
                failures.requests += 1
                errors.append(result.error or "request failed")
                preds = self.failed_predictions(batch, index, None)
            else:
                usage.add(result.completion)
                preds = self.parse_batch(batch, result)
                for p in preds:
                    p.prompt_index = index
            raw.append(result.text)
            failed = sum(p.parse_failed for p in preds)
            failures.examples += failed
            failures.prompts += int(failed > 0)
            predictions += preds
        name, model = provider_names(provider)
        return ScoreResult(
            scorer=self.name, hookpoint=record.hookpoint, latent=record.latent, explanation=text,
            predictions=predictions, metrics=self.metrics(predictions, record), failures=failures,
            n_prompts=len(batches), raw_responses=raw, errors=errors, usage=usage, provider=name, model=model,
            prompt_version=self.prompt_version(),
            fingerprint=score_fingerprint(record, text, self, provider),
            options=self.options.model_dump(mode="json"),
        )


class BinaryPromptScorer(PromptScorer):
    """A prompt scorer whose answer is a list of 0/1, one per example (detection, fuzz)."""

    def answer_format(self, batch: Sequence[ScoringItem]) -> dict[str, Any] | None:
        """A list of ``len(batch)`` 0/1 values."""
        return {"type": "binary_list", "length": len(batch)}

    def parse_batch(self, batch: Sequence[ScoringItem], result: CallResult) -> list[Prediction]:
        """Parse the 0/1 list; with logprobs, attach P(1) per example."""
        values = parse_binary_list(result.text, len(batch))
        if values is None:
            return self.failed_predictions(batch, 0, result.text)
        probs: list[float | None] | None = None
        if self.options.log_probs:
            probs = binary_probabilities(result.completion, len(batch))
        out = []
        for i, (item, value) in enumerate(zip(batch, values, strict=True)):
            out.append(Prediction(
                example_id=item.example.id, truth=item.truth, prediction=value,
                probability=None if probs is None else probs[i], correct=value == item.truth,
                quantile=item.example.quantile, raw=result.text))
        return out


__all__ = [
    "EXPLANATION_PREFIX",
    "BinaryPromptScorer",
    "CallResult",
    "ExplainerOptions",
    "LLMExplainer",
    "PromptScorer",
    "ScorerOptions",
    "ScoringItem",
    "accepts_answer_format",
    "batched",
    "binary_probabilities",
    "call_llm",
    "checked_result",
    "display_activations",
    "display_tokens",
    "explanation_fingerprint",
    "explanation_text",
    "highlighted_text",
    "latent_rng",
    "number_examples",
    "parse_binary_list",
    "parse_explanation",
    "plain_text",
    "provider_identity",
    "provider_names",
    "score_fingerprint",
    "typed_options",
]
