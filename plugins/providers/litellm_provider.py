"""The ``litellm`` provider: any litellm model string (``openai/<model>``, ``anthropic/...``, ``ollama/...``).

litellm takes seconds to import, so it is imported inside the first call, never at module import;
``LITELLM_LOCAL_MODEL_COST_MAP=True`` is set first (unless already set) so that it does not fetch its cost
map from the network. litellm's own retries are off; saelab's retry loop handles 429/5xx/timeouts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, ClassVar

from saelab import hookimpl
from saelab.llm import (
    ChatMessage,
    Completion,
    LLMProvider,
    ProviderError,
    ProviderOptions,
    TransientError,
)

from ._openai_wire import classify_openai_error, completion_from_openai, litellm_prices, openai_request


class LiteLLMOptions(ProviderOptions):
    """Options of the ``litellm`` provider (``base_url`` is litellm's ``api_base``)."""


def _import_litellm() -> Any:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        import litellm
    except ImportError:  # pragma: no cover - litellm is a declared dependency
        raise ProviderError("the litellm provider needs the 'litellm' package: pip install litellm") from None
    litellm.suppress_debug_info = True
    return litellm


class LiteLLMProvider(LLMProvider):
    """Any model litellm supports, by its model string (e.g. ``openai/gpt-4o-mini``)."""

    name: ClassVar[str] = "litellm"
    Options: ClassVar[type[ProviderOptions]] = LiteLLMOptions
    default_concurrency: ClassVar[int] = 8
    extra_params: ClassVar[tuple[str, ...] | None] = None  # passed through to litellm.acompletion

    def __init__(self, options: ProviderOptions | dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(options, **kwargs)
        # litellm reads each backend's own key variable; a named variable overrides it.
        self._key = self.api_key() if self.options.api_key_env else None
        if (self._key is None and self.options.base_url and self.model.startswith("openai/")
                and not os.environ.get("OPENAI_API_KEY")):
            self._key = "EMPTY"  # a local OpenAI-compatible server (vLLM...) accepts any key

    def price_table(self) -> tuple[float, float] | None:
        """litellm's cost map for ``model`` (used when litellm reports no cost for a call)."""
        return litellm_prices(self.model)

    async def _complete(self, messages: list[ChatMessage], params: dict[str, Any]) -> Completion:
        litellm = _import_litellm()
        request: dict[str, Any] = {"model": self.model, "messages": messages, "timeout": self.options.timeout_s,
                                   "num_retries": 0, "max_retries": 0}
        if self.options.base_url:
            request["api_base"] = self.options.base_url
        if self._key:
            request["api_key"] = self._key
        request.update(openai_request(self.model, messages, params))
        try:
            response = await litellm.acompletion(**request)
        except Exception as exc:
            mapped = classify_openai_error(exc, self.options.timeout_s)
            if mapped is None:
                if isinstance(exc, (TimeoutError, ConnectionError)):
                    raise TransientError(f"{type(exc).__name__}: {exc}") from None
                raise ProviderError(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from None
            raise mapped from None
        data = response.model_dump(mode="json") if hasattr(response, "model_dump") else dict(response)
        completion = completion_from_openai(data)
        hidden = getattr(response, "_hidden_params", None) or {}
        cost = hidden.get("response_cost") if isinstance(hidden, dict) else None
        if cost is not None and self.options.input_price_per_1k is None and self.options.output_price_per_1k is None:
            completion.cost = float(cost)
        return completion


@hookimpl
def register_providers(register: Callable[[type], type]) -> None:
    """Register the ``litellm`` provider."""
    register(LiteLLMProvider)
