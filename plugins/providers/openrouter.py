"""The ``openrouter`` provider: OpenRouter's OpenAI-compatible API (``https://openrouter.ai/api/v1``), key in
``OPENROUTER_API_KEY``."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from saelab import hookimpl
from saelab.llm import ProviderOptions

from ._openai_wire import OpenAIOptions, OpenAIProvider

OPENROUTER_URL = "https://openrouter.ai/api/v1"
"""OpenRouter's OpenAI-compatible endpoint (the default base URL)."""


class OpenRouterOptions(OpenAIOptions):
    """Options of the ``openrouter`` provider (those of ``openai``, with OpenRouter's URL and key variable)."""

    base_url: str | None = OPENROUTER_URL
    """Base URL of OpenRouter's OpenAI-compatible API."""
    api_key_env: str | None = "OPENROUTER_API_KEY"
    """Environment variable holding the OpenRouter API key."""


class OpenRouterProvider(OpenAIProvider):
    """OpenRouter (``--explainer_provider openrouter``): the ``openai`` provider at OpenRouter's URL."""

    name: ClassVar[str] = "openrouter"
    Options: ClassVar[type[ProviderOptions]] = OpenRouterOptions
    preset_of: ClassVar[str | None] = "openai"


@hookimpl
def register_providers(register: Callable[[type], type]) -> None:
    """Register the ``openrouter`` provider."""
    register(OpenRouterProvider)
