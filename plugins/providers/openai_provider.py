"""The ``openai`` provider: any OpenAI-compatible chat-completions API (OpenAI, vLLM, OpenRouter, llama.cpp...).

Uses ``openai.AsyncOpenAI`` (one client per event loop, posting the request body as JSON through its
low-level ``post``) with the client's own retries off (``max_retries=0``): saelab's retry loop
(:func:`saelab.llm.with_retries`) handles 429/5xx with ``Retry-After``, timeouts and connection errors.

The HTTP transport is the SDK's aiohttp-backed client (``openai.DefaultAioHttpClient``) when the
``httpx-aiohttp`` package is installed, else its default httpx one: httpcore's connection pool costs client
CPU that grows with the requests in flight, aiohttp's does not (``http_client`` option).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import weakref
from collections.abc import AsyncIterator
from typing import Any, ClassVar, Literal

from saelab import hookimpl
from saelab.errors import UsageError
from saelab.llm import (
    Completion,
    LLMProvider,
    ProviderOptions,
    TransientError,
    classify_openai_error,
    completion_from_openai,
)

OPENAI_URL = "https://api.openai.com/v1"
HTTP_CLIENTS = ("auto", "aiohttp", "httpx")


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
    """Any OpenAI-compatible chat API (``--explainer_provider openai|vllm|openrouter``)."""

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

    async def _complete(self, messages: list[dict[str, str]], params: dict[str, Any]) -> Completion:
        request: dict[str, Any] = {"model": self.model, "messages": messages}
        for key, value in params.items():
            if key == "top_logprobs" and not params.get("logprobs"):
                continue
            request[key] = value
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


@hookimpl
def register_providers(register: Any) -> None:
    """Register the ``openai`` provider."""
    register(OpenAIProvider)
