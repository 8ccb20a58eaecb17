"""LLM providers: the call convention, options, retries, concurrency, response cache and usage accounting.

Call convention (every provider plugin, used by explainers and scorers)::

    provider = make_provider("openai", model="gpt-4o-mini", base_url=..., max_concurrency=16)
    completion = await provider.generate(
        [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}],
        temperature=0.0, max_tokens=64, logprobs=True, top_logprobs=5,   # optional per-call overrides
        answer_format={"type": "binary_list", "length": 5},              # optional: see check_answer_format
    )
    completion.text, completion.logprobs, completion.cost, completion.cached

``generate`` never returns a partial answer: it returns a :class:`Completion` or raises
:class:`ProviderError` (one line, after retries). Calls may run concurrently (``asyncio.gather``); each
provider instance limits how many are in flight (``max_concurrency``) and retries 429/5xx, timeouts and
connection errors with exponential backoff that waits at least the server's ``Retry-After``.
Answers are cached on disk by content hash (provider, model, messages, params) unless ``cache=False``.
API keys are read from the environment only, and never logged, cached or written (they are redacted
from raw responses and error messages).

A provider plugin subclasses :class:`LLMProvider` and implements ``_complete`` (one attempt, mapping its
backend's failures to :class:`TransientError` / :class:`ProviderError`); the builtin ``openai``, ``vllm``,
``openrouter``, ``litellm``, ``transformers`` and ``offline`` providers are plugins built on it exactly so.
Each registers under its own name; :func:`make_provider` resolves names through the registry only.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import os
import random
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, TypeAlias, TypedDict, TypeVar

from pydantic import Field

from .config import redact
from .errors import SaelabError, UsageError, wrong_return_type
from .fileio import json_sha256, write_json_atomic
from .interfaces import Provider
from .options import Options
from .records import Usage

__all__ = [
    "CALL_PARAMS",
    "ChatMessage",
    "Completion",
    "LLMProvider",
    "ParamValue",
    "ProviderError",
    "ProviderOptions",
    "ResponseCache",
    "TokenLogprob",
    "TransientError",
    "answer_format_bound",
    "cache_key",
    "check_answer_format",
    "check_completion",
    "make_provider",
    "parse_retry_after",
    "with_retries",
]

T = TypeVar("T")
log = logging.getLogger("saelab.llm")

# --------------------------------------------------------------------------------------------------
# Messages and results


class ChatMessage(TypedDict):
    """One chat message: ``{"role": "system" | "user" | "assistant", "content": "..."}``."""

    role: str
    content: str


ParamValue: TypeAlias = str | int | float | bool | list[str] | dict[str, str | int | list[str]] | None
"""Value of a per-call parameter of ``generate`` (``temperature``, ``stop``, ``answer_format``...)."""


@dataclass
class TokenLogprob:
    """Log probability of one generated token, with the most likely alternatives at that position."""

    token: str
    logprob: float
    top_logprobs: dict[str, float] = field(default_factory=dict)
    """``{token: logprob}`` of the most likely tokens at this position (includes ``token`` when offered)."""


@dataclass
class Completion:
    """One chat completion: what ``Provider.generate`` returns."""

    text: str
    """The assistant message."""
    logprobs: list[TokenLogprob] | None = None
    """Per generated token, when requested and offered by the backend; else None."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float | None = None
    """USD cost of the call when prices are known (0 for local models), else None."""
    cached: bool = False
    """True when the answer came from the on-disk response cache (no request was made)."""
    raw: dict[str, Any] = field(default_factory=dict)
    """The backend's raw response (JSON data), secrets redacted."""
    provider: str = ""
    """Name of the provider that answered (for a preset such as ``vllm``, the one it presets: ``openai``)."""
    model: str = ""
    """The model that answered."""
    finish_reason: str | None = None
    """Why generation stopped (``stop``, ``length``...), when the backend says."""

    def to_json(self) -> dict[str, Any]:
        """JSON data (the cache format)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Completion:
        """Inverse of :meth:`to_json`."""
        values = dict(data)
        if values.get("logprobs") is not None:
            values["logprobs"] = [TokenLogprob(**entry) for entry in values["logprobs"]]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in values.items() if k in known})


# --------------------------------------------------------------------------------------------------
# Errors and retries


class ProviderError(SaelabError):
    """An LLM call that failed for good (after retries, or a non-retryable answer such as 401)."""


class TransientError(Exception):
    """A failure worth retrying (429, 5xx, timeout, connection error, malformed answer)."""

    def __init__(self, reason: str, retry_after: float | None = None, status: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        """Seconds the server asked to wait (``Retry-After``), if any."""
        self.status = status


def parse_retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds to wait from ``Retry-After`` (seconds or an HTTP date) or ``retry-after-ms``; None if absent."""
    if not headers:
        return None
    lowered = {str(k).lower(): str(v) for k, v in headers.items()}
    ms = lowered.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = lowered.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    current = datetime.now(timezone.utc).timestamp() if now is None else now
    return max(0.0, when.timestamp() - current)


RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})
"""HTTP statuses retried with backoff (429 and 5xx-like); other 4xx fail at once."""


async def with_retries(
    attempt: Callable[[], Awaitable[T]],
    *,
    max_retries: int,
    backoff_base_s: float = 1.0,
    backoff_max_s: float = 60.0,
    what: str = "LLM request",
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
    jitter: Callable[[], float] = random.random,
) -> T:
    """Run ``attempt`` until it succeeds, retrying :class:`TransientError`, timeouts and connection errors.

    The n-th retry waits ``min(backoff_max_s, backoff_base_s * 2**n)`` scaled by a jitter in [0.5, 1],
    and never less than the error's ``retry_after``. After ``max_retries`` retries, raises one
    :class:`ProviderError` naming ``what``, the attempts and the last failure. ``ProviderError`` from
    ``attempt`` is raised at once.
    """
    retries = 0
    while True:
        try:
            return await attempt()
        except ProviderError:
            raise
        except (TransientError, TimeoutError, asyncio.TimeoutError, ConnectionError) as exc:
            if retries >= max_retries:
                reason = exc.reason if isinstance(exc, TransientError) else (
                    f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
                raise ProviderError(f"{what} failed after {retries + 1} attempts: {reason}") from None
            backoff = min(backoff_max_s, backoff_base_s * (2**retries)) * (0.5 + 0.5 * jitter())
            retry_after = exc.retry_after if isinstance(exc, TransientError) else None
            delay = max(backoff, retry_after or 0.0)
            if on_retry is not None:
                on_retry(retries, exc, delay)
            retries += 1
            await sleep(delay)


# --------------------------------------------------------------------------------------------------
# Response cache


def cache_key(provider: str, model: str, messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> str:
    """sha256 of (provider, model, messages, params) in canonical JSON."""
    material = {"provider": provider, "model": model, "messages": list(messages), "params": dict(params)}
    return json_sha256(material, default=str)


class ResponseCache:
    """On-disk completion cache: one JSON file per entry, ``<root>/<key[:2]>/<key>.json``, written atomically."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        """File of one entry."""
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Completion | None:
        """The cached completion, or None (a corrupt entry is removed and treated as a miss)."""
        path = self.path(key)
        try:
            data = json.loads(path.read_text())
            return Completion.from_json(data["completion"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, completion: Completion, request: Mapping[str, Any] | None = None) -> None:
        """Store ``completion`` (and the request it answers, for inspection)."""
        payload = {"key": key, "request": dict(request or {}), "completion": completion.to_json()}
        write_json_atomic(self.path(key), payload, indent=None, default=str)

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*/*.json")) if self.root.exists() else 0


# --------------------------------------------------------------------------------------------------
# Options and the provider base class


class ProviderOptions(Options):
    """Options shared by every LLM provider."""

    model: str | None = None
    """Model name or id (provider default when unset)."""
    base_url: str | None = None
    """Base URL of an OpenAI-compatible API (e.g. ``http://localhost:8002/v1``)."""
    api_key_env: str | None = None
    """Environment variable holding the API key (default OPENAI_API_KEY; OPENROUTER_API_KEY for openrouter)."""
    max_concurrency: int | None = Field(default=None, ge=1)
    """Requests in flight at once for this provider (default 8 for APIs; local: prompts batched per generate)."""
    timeout_s: float = Field(default=120.0, gt=0)
    """Seconds before one request is abandoned (and retried)."""
    max_retries: int = Field(default=5, ge=0)
    """Retries after the first attempt on 429, 5xx, timeouts, connection errors and malformed answers."""
    backoff_base_s: float = Field(default=1.0, ge=0)
    """First retry delay; doubles each retry (with jitter), never below the server's Retry-After."""
    backoff_max_s: float = Field(default=60.0, ge=0)
    """Largest backoff delay (a longer Retry-After is still honoured)."""
    temperature: float = Field(default=0.0, ge=0)
    """Sampling temperature (0 = greedy)."""
    max_tokens: int = Field(default=512, ge=1)
    """Largest number of generated tokens."""
    logprobs: bool = False
    """Request log probabilities of generated tokens (where the backend offers them)."""
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    """Alternatives returned per generated token when logprobs are on."""
    cache: bool = True
    """Cache responses on disk by (provider, model, messages, params)."""
    cache_dir: str | None = None
    """Response cache directory (default: ``<saelab cache dir>/llm_responses``)."""
    input_price_per_1k: float | None = Field(default=None, ge=0)
    """USD per 1k prompt tokens (default: the provider's price table, e.g. litellm's cost map for the API
    providers, when the model is in it)."""
    output_price_per_1k: float | None = Field(default=None, ge=0)
    """USD per 1k completion tokens (default: the provider's price table when the model is in it)."""


CALL_PARAMS = ("temperature", "max_tokens", "logprobs", "top_logprobs", "answer_format")
"""Per-call overrides every provider accepts in ``generate(**params)``."""

ANSWER_FORMAT_TYPES = ("binary_list", "choice", "prefixed_line")
"""Kinds of ``answer_format`` (see :func:`check_answer_format`)."""


def check_answer_format(value: Any) -> dict[str, Any]:
    """A validated, normalised ``answer_format`` (the shape an answer must take); a bad one raises
    :class:`UsageError`. Kinds:

    - ``{"type": "binary_list", "length": N}``: a list of N 0/1 values, written ``[1, 0, 1]``
      (``", "`` or ``","`` between values, an optional space before ``[``);
    - ``{"type": "choice", "options": ["1", "2", ...]}``: exactly one of the option strings;
    - ``{"type": "prefixed_line", "prefix": "[EXPLANATION]:"}``: one line of text that starts with
      ``prefix`` (the answer ends at its first newline).

    Providers that can enforce a format (``LLMProvider.answer_formats``; the local ``transformers``
    provider constrains decoding) do; the others receive the prompt alone and ignore it.
    """
    if not isinstance(value, Mapping) or value.get("type") not in ANSWER_FORMAT_TYPES:
        raise UsageError(f"bad answer_format {value!r:.80}; accepted: a dict with 'type' one of "
                         f"{', '.join(ANSWER_FORMAT_TYPES)}")
    kind = value["type"]
    if kind == "binary_list":
        length = value.get("length")
        if not isinstance(length, int) or isinstance(length, bool) or length < 1 or set(value) != {"type", "length"}:
            raise UsageError(f"bad answer_format {value!r:.80}; binary_list takes 'length', an integer >= 1")
        return {"type": kind, "length": length}
    if kind == "choice":
        options = value.get("options")
        if (not isinstance(options, (list, tuple)) or not options or set(value) != {"type", "options"}
                or not all(isinstance(o, str) and o and "\n" not in o for o in options)):
            raise UsageError(f"bad answer_format {value!r:.80}; choice takes 'options', a list of non-empty "
                             f"one-line strings")
        return {"type": kind, "options": list(dict.fromkeys(options))}
    prefix = value.get("prefix")
    if not isinstance(prefix, str) or not prefix or "\n" in prefix or set(value) != {"type", "prefix"}:
        raise UsageError(f"bad answer_format {value!r:.80}; prefixed_line takes 'prefix', a non-empty one-line "
                         f"string")
    return {"type": kind, "prefix": prefix}


def answer_format_bound(answer_format: Mapping[str, Any]) -> int | None:
    """Most characters an answer of this (checked) format can have; None when unbounded."""
    if answer_format["type"] == "binary_list":
        return 3 * int(answer_format["length"]) + 1  # " [" + N digits + (N - 1) ", " + "]"
    if answer_format["type"] == "choice":
        return 1 + max(len(o) for o in answer_format["options"])
    return None


class LLMProvider(Provider):
    """Base class of saelab's providers: caching, concurrency limit, retries and accounting around
    ``_complete`` (one attempt of one chat completion)."""

    Options: ClassVar[type[ProviderOptions]] = ProviderOptions
    default_model: ClassVar[str | None] = None
    """Model used when ``options.model`` is unset (None: the option is required)."""
    default_concurrency: ClassVar[int] = 8
    """``max_concurrency`` when unset."""
    extra_params: ClassVar[tuple[str, ...] | None] = ("stop", "seed")
    """Per-call params accepted besides :data:`CALL_PARAMS`; None accepts any (passed to the backend)."""
    takes_answer_format: ClassVar[bool] = True
    answer_formats: ClassVar[frozenset[str]] = frozenset()
    """``answer_format`` kinds this provider enforces; for other kinds (and by default) the parameter is
    accepted, kept in the response-cache key and not passed to ``_complete`` (nothing non-standard is
    sent to an API)."""
    default_api_key_env: ClassVar[str | None] = None
    """Environment variable of the API key when ``api_key_env`` is unset (None: no key)."""
    preset_of: ClassVar[str | None] = None
    """For a provider that is another one with other defaults (``vllm`` and ``openrouter`` of ``openai``,
    ``offline`` of ``transformers``): that provider's name. Fingerprints and response-cache keys use it, so
    answers and stored results are shared with it."""

    def __init__(self, options: ProviderOptions | Mapping[str, Any] | None = None, **kwargs: Any):
        if options is None or isinstance(options, Mapping):
            options = self.Options.parse({**dict(options or {}), **kwargs}, where=f"provider {self.name}")
        elif kwargs:
            options = options.model_copy(update=kwargs)
        self.options: ProviderOptions = options
        model = options.model or self.default_model
        if not model:
            raise UsageError(f"provider {self.name!r} needs a model; give one with --explainer_model")
        self.model: str = model
        self.max_concurrency: int = options.max_concurrency or self.default_concurrency
        self.usage: Usage = Usage(cost=0.0)
        """Calls, tokens and cost so far (a response-cache hit counts only in ``cached_calls``)."""
        self.response_cache: ResponseCache | None = None
        if options.cache:
            from .paths import cache_dir

            root = Path(options.cache_dir) if options.cache_dir else cache_dir() / "llm_responses"
            self.response_cache = ResponseCache(root)
        self._secrets: list[str] = []
        self._semaphores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary())
        self._cooldown_until = 0.0

    # -- identity and secrets

    @property
    def backend_name(self) -> str:
        """The name this provider's answers are keyed by: ``preset_of``, else ``name``."""
        return self.preset_of or self.name

    def identity(self) -> dict[str, Any]:
        """What identifies this provider's answers (for input fingerprints): provider, model, base URL."""
        return {"provider": self.backend_name, "model": self.model, "base_url": self.options.base_url}

    def api_key(self, required: bool = False) -> str | None:
        """The API key from ``options.api_key_env`` (or the provider default); remembered for redaction."""
        env = self.options.api_key_env or self.default_api_key_env
        key = os.environ.get(env) if env else None
        if not key and (required or self.options.api_key_env):
            raise UsageError(f"provider {self.name!r} needs an API key: environment variable "
                             f"{env or 'OPENAI_API_KEY'!r} is not set or empty (name another with --api_key_env)")
        if key and key not in self._secrets:
            self._secrets.append(key)
        return key

    def redact(self, value: T) -> T:
        """``value`` (a raw response or an error message) with this provider's API keys, bearer tokens and
        ``api_key=...`` values replaced by ``<redacted>`` (:func:`saelab.config.redact`)."""
        return redact(value, secrets=self._secrets, by_key=False)  # type: ignore[no-any-return]

    # -- the call

    def resolve_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Options defaults overridden by per-call ``params``; unknown names raise a one-line error."""
        allowed = set(CALL_PARAMS) | set(self.extra_params or ())
        if self.extra_params is not None:
            unknown = sorted(set(params) - allowed)
            if unknown:
                raise UsageError(f"provider {self.name!r} does not accept parameter {unknown[0]!r}; "
                                 f"accepted: {', '.join(sorted(allowed))}")
        resolved: dict[str, Any] = {
            "temperature": self.options.temperature,
            "max_tokens": self.options.max_tokens,
            "logprobs": self.options.logprobs,
            "top_logprobs": self.options.top_logprobs,
        }
        resolved.update({k: v for k, v in params.items()})
        if resolved.get("answer_format") is not None:
            resolved["answer_format"] = check_answer_format(resolved["answer_format"])
        if not resolved["logprobs"]:
            resolved["top_logprobs"] = None
        return {k: v for k, v in resolved.items() if v is not None}

    @staticmethod
    def check_messages(messages: object) -> list[ChatMessage]:
        """Validate chat messages (a list of ``{"role", "content"}`` with string content)."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise UsageError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.80}")
        out = []
        for message in messages:
            if (not isinstance(message, Mapping) or not isinstance(message.get("role"), str)
                    or not isinstance(message.get("content"), str)):
                raise UsageError(f"bad chat message {message!r:.80}; each needs a 'role' and a string 'content'")
            out.append(ChatMessage(role=message["role"], content=message["content"]))
        return out

    def cache_key(self, messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> str:
        """Response-cache key of one call (``params`` as resolved, ``answer_format`` included)."""
        return cache_key(self.backend_name, self.model, messages, params)

    def backend_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The resolved params passed to ``_complete``: ``answer_format`` only when enforced here."""
        out = dict(params)
        fmt = out.get("answer_format")
        if fmt is not None and fmt["type"] not in self.answer_formats:
            del out["answer_format"]
        return out

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        sem = self._semaphores.get(loop)
        if sem is None:
            sem = self._semaphores[loop] = asyncio.Semaphore(self.max_concurrency)
        return sem

    async def generate(self, messages: Sequence[ChatMessage], **params: ParamValue) -> Completion:
        """One chat completion (cached, concurrency-limited, retried); see the module docstring."""
        messages = self.check_messages(messages)
        resolved = self.resolve_params(params)
        key = self.cache_key(messages, resolved)
        backend = self.backend_params(resolved)
        if self.response_cache is not None:
            hit = self.response_cache.get(key)
            if hit is not None:
                hit.cached = True
                self.usage.record(hit)
                return hit

        async def attempt() -> Completion:
            async with self._semaphore():
                wait = self._cooldown_until - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                try:
                    return await self._complete(messages, backend)
                except TransientError as exc:
                    exc.reason = self.redact(exc.reason)
                    if exc.retry_after:
                        self._cooldown_until = max(self._cooldown_until, time.monotonic() + exc.retry_after)
                    raise
                except ProviderError as exc:
                    raise ProviderError(self.redact(f"{what} failed: {exc}")) from None

        what = f"{self.name} request to model {self.model!r}"

        def count_retry(_n: int, exc: BaseException, delay: float) -> None:
            self.usage.retries += 1
            reason = exc.reason if isinstance(exc, TransientError) else f"{type(exc).__name__}: {exc}"
            log.info("%s: %s; retrying in %.2f s", what, self.redact(reason), delay)

        try:
            completion = await with_retries(
                attempt,
                max_retries=self.options.max_retries,
                backoff_base_s=self.options.backoff_base_s,
                backoff_max_s=self.options.backoff_max_s,
                what=what,
                on_retry=count_retry,
            )
        except ProviderError as exc:
            self.usage.failed_calls += 1
            raise ProviderError(self.redact(str(exc))) from None
        completion.raw = self.redact(completion.raw)
        completion.provider = completion.provider or self.backend_name
        completion.model = completion.model or self.model
        completion.cached = False
        if completion.cost is None:
            completion.cost = self.cost_of(completion.prompt_tokens, completion.completion_tokens)
        if self.response_cache is not None:
            self.response_cache.put(key, completion, {"provider": self.name, "model": self.model,
                                                      "messages": messages, "params": resolved})
        self.usage.record(completion)
        return completion

    def generate_sync(self, messages: Sequence[ChatMessage], **params: ParamValue) -> Completion:
        """Blocking :meth:`generate` (runs its own event loop)."""
        return asyncio.run(self.generate(messages, **params))

    def prices(self) -> tuple[float, float] | None:
        """USD per 1k (prompt, completion) tokens: the options' prices, else :meth:`price_table`'s."""
        if self.options.input_price_per_1k is not None or self.options.output_price_per_1k is not None:
            return (self.options.input_price_per_1k or 0.0, self.options.output_price_per_1k or 0.0)
        return self.price_table()

    def price_table(self) -> tuple[float, float] | None:
        """The provider's own prices of ``model`` (USD per 1k prompt, completion tokens); None: unknown.
        Override to price a backend (the ``openai`` and ``litellm`` providers read litellm's cost map)."""
        return None

    def cost_of(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        """USD cost of a call, None when prices are unknown."""
        prices = self.prices()
        if prices is None:
            return None
        return (prompt_tokens * prices[0] + completion_tokens * prices[1]) / 1000.0

    async def _complete(self, messages: list[ChatMessage], params: dict[str, Any]) -> Completion:
        """One attempt; raise :class:`TransientError` for retryable failures, :class:`ProviderError` else."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release clients and background tasks."""


# --------------------------------------------------------------------------------------------------
# Construction and the engine's check


def make_provider(name: str, **options: Any) -> Provider:
    """The registered provider ``name`` (``openai``, ``vllm``, ``openrouter``, ``litellm``, ``transformers``,
    ``offline`` or a third party's) built with ``options``, validated by its options model (an unknown key
    is a one-line :class:`UsageError`). Options that are None are left at their defaults."""
    from .manager import resolve

    cls = resolve("provider", name.strip())
    opts = cls.Options.parse({k: v for k, v in options.items() if v is not None}, where=f"provider {cls.name!r}")
    return cls(opts)


def check_completion(provider: Provider, value: object) -> Completion:
    """``value`` when it is the :class:`Completion` a provider's ``generate`` must return, else a one-line
    :class:`UsageError` naming the provider and the expected type (the engine never guesses at a
    provider's answer)."""
    if isinstance(value, Completion):
        return value
    raise wrong_return_type("provider", provider, value, "saelab.llm.Completion", "generate")
