"""The ``openai`` provider: any OpenAI-compatible chat-completions API (OpenAI, vLLM, OpenRouter, llama.cpp...).

Uses ``openai.AsyncOpenAI`` (one client per event loop, posting the request body as JSON through its
low-level ``post``) with the client's own retries off (``max_retries=0``): saelab's retry loop
(:func:`saelab.llm.with_retries`) handles 429/5xx with ``Retry-After``, timeouts and connection errors.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from typing import Any, ClassVar

from saelab import hookimpl
from saelab.llm import (
    Completion,
    LLMProvider,
    ProviderOptions,
    TransientError,
    classify_openai_error,
    completion_from_openai,
)

OPENAI_URL = "https://api.openai.com/v1"


class OpenAIOptions(ProviderOptions):
    """Options of the ``openai`` provider."""


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
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()

    def _client(self) -> Any:
        import openai

        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = openai.AsyncOpenAI(base_url=self.options.base_url or OPENAI_URL, api_key=self._key,
                                        max_retries=0, timeout=self.options.timeout_s)
            self._clients[loop] = client
        return client

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
            response = await self._client().post("/chat/completions", body=request, cast_to=httpx.Response,
                                                 options={"timeout": self.options.timeout_s})
            body = response.content
        except Exception as exc:
            mapped = classify_openai_error(exc, self.options.timeout_s)
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
        client = self._clients.pop(loop, None)
        if client is not None:
            await client.close()


@hookimpl
def register_providers(register: Any) -> None:
    """Register the ``openai`` provider."""
    register(OpenAIProvider)
