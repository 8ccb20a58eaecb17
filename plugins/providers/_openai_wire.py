"""The OpenAI wire format and the OpenAI-compatible provider class, shared by the provider plugins.

Private to ``saelab.plugins.providers`` (not an entry point): the ``openai`` plugin registers
:class:`OpenAIProvider`, the ``vllm`` and ``openrouter`` plugins register subclasses with their own default
base URL and API key variable, and the ``litellm`` plugin parses litellm's (OpenAI-shaped) answers and
errors with :func:`completion_from_openai` / :func:`classify_openai_error`. Prices come from litellm's
bundled cost map (:func:`litellm_prices`), read as a file without importing litellm.

:class:`OpenAIProvider` uses ``openai.AsyncOpenAI`` (one client per event loop, posting the request body as
JSON through its low-level ``post``) with the client's own retries off (``max_retries=0``): saelab's retry
loop (:func:`saelab.llm.with_retries`) handles 429/5xx with ``Retry-After``, timeouts and connection errors.
The HTTP transport is the SDK's aiohttp-backed client (``openai.DefaultAioHttpClient``) when the
``httpx-aiohttp`` package is installed, else its default httpx one: httpcore's connection pool costs client
CPU that grows with the requests in flight, aiohttp's does not (``http_client`` option).
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import json
import os
import weakref
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from saelab.errors import UsageError
from saelab.fileio import canonical_json
from saelab.llm import (
    RETRYABLE_STATUS,
    ChatMessage,
    Completion,
    LLMProvider,
    ProviderError,
    ProviderOptions,
    TokenLogprob,
    TransientError,
    parse_retry_after,
)

# --------------------------------------------------------------------------------------------------
# Wire format


def openai_request(model: str, messages: list[ChatMessage], params: Mapping[str, Any]) -> dict[str, Any]:
    """The body of a chat-completions request: ``model``, ``messages`` and the resolved ``params``
    (``top_logprobs`` only when ``logprobs`` is on)."""
    request: dict[str, Any] = {"model": model, "messages": messages}
    for key, value in params.items():
        if key == "top_logprobs" and not params.get("logprobs"):
            continue
        request[key] = value
    return request


def completion_from_openai(data: Mapping[str, Any]) -> Completion:
    """A :class:`Completion` from an OpenAI chat-completion response (JSON data); a malformed one raises
    :class:`TransientError` (servers under load sometimes answer garbage; it is retried)."""
    if not isinstance(data, Mapping):
        raise TransientError(f"malformed answer: expected a JSON object, got {type(data).__name__}")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        raise TransientError(f"malformed answer: no choices in {canonical_json(data, default=str)[:200]}")
    choice = choices[0]
    message = choice.get("message")
    text = message.get("content") if isinstance(message, Mapping) else None
    if not isinstance(text, str):
        raise TransientError(
            f"malformed answer: choice has no message content: {canonical_json(choice, default=str)[:200]}")
    logprobs = None
    content = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), Mapping) else None
    if isinstance(content, list):
        logprobs = []
        for entry in content:
            if not isinstance(entry, Mapping) or "token" not in entry or entry.get("logprob") is None:
                continue
            tops = {str(t["token"]): float(t["logprob"]) for t in entry.get("top_logprobs") or []
                    if isinstance(t, Mapping) and "token" in t and t.get("logprob") is not None}
            logprobs.append(TokenLogprob(str(entry["token"]), float(entry["logprob"]), tops))
    usage = data.get("usage") if isinstance(data.get("usage"), Mapping) else {}
    return Completion(
        text=text,
        logprobs=logprobs,
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        raw=dict(data),
        finish_reason=choice.get("finish_reason"),
    )


def _connection_cause(exc: BaseException) -> str:
    """The innermost cause of a connection error (e.g. ``connection refused``) and the URL it was for."""
    cause: BaseException = exc
    seen: set[int] = set()
    while id(cause) not in seen and (cause.__cause__ or cause.__context__) is not None:
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    if isinstance(cause, OSError) and (cause.errno or cause.strerror):
        reason = os.strerror(cause.errno) if cause.errno else str(cause.strerror)
        text = reason[0].lower() + reason[1:]
    else:
        text = str(cause).splitlines()[0] if str(cause).strip() else str(exc)
    request = getattr(exc, "request", None)
    url = getattr(request, "url", None)
    return f"{text} at {url}" if url is not None else text


def classify_openai_error(exc: BaseException, timeout_s: float | None = None) -> BaseException | None:
    """Map an ``openai`` (or litellm, whose errors subclass openai's) exception to :class:`TransientError`
    (429/5xx with ``Retry-After``, timeouts, connection errors, unparseable answers) or
    :class:`ProviderError` (other statuses: bad request, auth...); None when ``exc`` is not one of them."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return TransientError(f"timed out after {timeout_s:g} s" if timeout_s else "timed out")
    if isinstance(exc, openai.APIConnectionError):
        return TransientError(f"connection error: {_connection_cause(exc)}")
    if isinstance(exc, openai.APIResponseValidationError):
        return TransientError(f"malformed answer: {exc}")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        headers: Mapping[str, str] | None = None
        response = getattr(exc, "response", None)
        if response is not None and getattr(response, "headers", None) is not None:
            headers = response.headers
        extra = getattr(exc, "litellm_response_headers", None)
        if not headers and extra is not None:
            headers = extra
        message = str(getattr(exc, "message", "") or exc).splitlines()[0][:300]
        if status in RETRYABLE_STATUS:
            return TransientError(f"HTTP {status}: {message}", parse_retry_after(headers), status)
        return ProviderError(f"HTTP {status}: {message}")
    return None


# --------------------------------------------------------------------------------------------------
# Prices


@functools.lru_cache(maxsize=1)
def _litellm_cost_map() -> dict[str, Any]:
    try:
        spec = importlib.util.find_spec("litellm")
    except (ImportError, ValueError):
        return {}
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / "model_prices_and_context_window_backup.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def litellm_prices(model: str) -> tuple[float, float] | None:
    """USD per 1k (prompt, completion) tokens of ``model`` from litellm's bundled cost map (read as a file,
    without importing litellm), trying ``model`` and the name without its ``provider/`` prefix."""
    cost_map = _litellm_cost_map()
    candidates = [model]
    if "/" in model:
        candidates.append(model.split("/", 1)[1])
    for name in candidates:
        entry = cost_map.get(name)
        if isinstance(entry, dict) and "input_cost_per_token" in entry and "output_cost_per_token" in entry:
            try:
                return float(entry["input_cost_per_token"]) * 1000, float(entry["output_cost_per_token"]) * 1000
            except (TypeError, ValueError):
                return None
    return None


# --------------------------------------------------------------------------------------------------
# The OpenAI-compatible provider


OPENAI_URL = "https://api.openai.com/v1"
"""Default base URL of the ``openai`` provider."""
HTTP_CLIENTS = ("auto", "aiohttp", "httpx")
"""Values of the ``http_client`` option."""


def aiohttp_available() -> bool:
    """True when the SDK's aiohttp transport can be used (``httpx-aiohttp`` installed, an ``openai`` that has
    ``DefaultAioHttpClient``)."""
    if importlib.util.find_spec("httpx_aiohttp") is None:
        return False
    import openai

    return hasattr(openai, "DefaultAioHttpClient")


class OpenAIOptions(ProviderOptions):
    """Options of the ``openai`` provider."""

    http_client: Literal["auto", "aiohttp", "httpx"] = "auto"
    """HTTP transport: ``aiohttp`` (the SDK's ``DefaultAioHttpClient``, needs the ``httpx-aiohttp`` package;
    its client CPU per request stays flat with many requests in flight), ``httpx`` (the SDK's default), or
    ``auto``: aiohttp when installed, else httpx. Answers, timeouts, retries and errors are the same."""


class OpenAIProvider(LLMProvider):
    """Any OpenAI-compatible chat API (``--explainer_provider openai``; ``vllm`` and ``openrouter`` are
    subclasses with their own defaults)."""

    name: ClassVar[str] = "openai"
    Options: ClassVar[type[ProviderOptions]] = OpenAIOptions
    default_concurrency: ClassVar[int] = 8
    extra_params: ClassVar[tuple[str, ...] | None] = None  # passed through (stop, seed, response_format...)
    default_api_key_env: ClassVar[str | None] = "OPENAI_API_KEY"

    def __init__(self, options: ProviderOptions | dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(options, **kwargs)
        base_url = self.options.base_url
        hosted = base_url is None or "api.openai.com" in base_url or "openrouter.ai" in base_url
        # Local servers (vLLM, llama.cpp) accept any key; the hosted APIs need a real one.
        self._key = self.api_key(required=hosted) or "EMPTY"
        choice = getattr(self.options, "http_client", "auto")
        if choice == "aiohttp" and not aiohttp_available():
            raise UsageError(f"provider {self.name!r}: http_client 'aiohttp' needs the httpx-aiohttp package "
                             f"(pip install httpx-aiohttp); accepted: {', '.join(HTTP_CLIENTS)}")
        self.http_client: str = "aiohttp" if choice != "httpx" and aiohttp_available() else "httpx"
        """The transport in use: ``aiohttp`` or ``httpx``."""
        # per loop: the client and an async generator that closes it when the loop shuts down
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[Any, AsyncIterator[None]]] = (
            weakref.WeakKeyDictionary())

    def price_table(self) -> tuple[float, float] | None:
        """litellm's cost map for ``model`` (with or without its ``provider/`` prefix)."""
        return litellm_prices(self.model)

    async def _client(self) -> Any:
        loop = asyncio.get_running_loop()
        entry = self._clients.get(loop)
        if entry is None:
            import openai

            http_client = openai.DefaultAioHttpClient() if self.http_client == "aiohttp" else None
            client = openai.AsyncOpenAI(base_url=self.options.base_url or OPENAI_URL, api_key=self._key,
                                        max_retries=0, timeout=self.options.timeout_s, http_client=http_client)
            # ``asyncio.run`` closes live async generators before it closes the loop: the client is closed on
            # its own loop even when nobody calls ``aclose`` (an aiohttp session left open logs errors at exit)
            closer = _close_at_loop_end(client)
            self._clients[loop] = entry = (client, closer)
            await anext(closer)
        return entry[0]

    async def _complete(self, messages: list[ChatMessage], params: dict[str, Any]) -> Completion:
        request = openai_request(self.model, messages, params)
        import httpx

        try:
            # The client's low-level POST, not ``chat.completions.create``: same headers, auth, timeout and
            # error classes, without the SDK's per-request typed-dict transform of the messages (the bulk of
            # its client-side cost). The raw response: we parse the JSON ourselves, so a malformed body is a
            # clean retryable error.
            client = await self._client()
            response = await client.post("/chat/completions", body=request, cast_to=httpx.Response,
                                         options={"timeout": self.options.timeout_s})
            body = response.content
        except Exception as exc:
            mapped = classify_openai_error(_unmask_connection_error(exc), self.options.timeout_s)
            if mapped is None:
                raise
            raise mapped from None
        try:
            data = json.loads(body)
        except ValueError:
            raise TransientError(f"malformed answer: not JSON: {body[:200]!r}") from None
        return completion_from_openai(data)

    async def aclose(self) -> None:
        """Close the HTTP client of the running loop."""
        loop = asyncio.get_running_loop()
        entry = self._clients.pop(loop, None)
        if entry is not None:
            await entry[1].aclose()  # type: ignore[attr-defined]


async def _close_at_loop_end(client: Any) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await client.close()


def _unmask_connection_error(exc: BaseException) -> BaseException:
    """``exc``, except that a connection failure (refused, dropped) that httpx-aiohttp reports as a connect
    timeout becomes the ``openai.APIConnectionError`` the httpx transport raises for it."""
    import openai

    if isinstance(exc, openai.APITimeoutError) and exc.__cause__ is not None:
        root = exc.__cause__.__cause__
        if root is not None and type(root).__module__.startswith("aiohttp."):
            import aiohttp

            if isinstance(root, aiohttp.ClientConnectionError) and not isinstance(root, TimeoutError):
                unmasked = openai.APIConnectionError(request=exc.request)
                unmasked.__cause__ = root
                return unmasked
    return exc
