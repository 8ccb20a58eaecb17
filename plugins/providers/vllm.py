"""The ``vllm`` provider: a vLLM server's OpenAI-compatible API (``vllm serve``; default
``http://localhost:8000/v1``, any API key or none)."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from saelab import hookimpl
from saelab.llm import ProviderOptions

from ._openai_wire import OpenAIOptions, OpenAIProvider

VLLM_URL = "http://localhost:8000/v1"
"""Default base URL (``vllm serve``'s default port)."""


class VLLMOptions(OpenAIOptions):
    """Options of the ``vllm`` provider (those of ``openai``, with vLLM's default base URL)."""

    base_url: str | None = VLLM_URL
    """Base URL of the vLLM server's OpenAI-compatible API (e.g. ``http://localhost:8002/v1``)."""


class VLLMProvider(OpenAIProvider):
    """A vLLM server (``--explainer_provider vllm``): the ``openai`` provider at ``http://localhost:8000/v1``."""

    name: ClassVar[str] = "vllm"
    Options: ClassVar[type[ProviderOptions]] = VLLMOptions
    preset_of: ClassVar[str | None] = "openai"


@hookimpl
def register_providers(register: Callable[[type], type]) -> None:
    """Register the ``vllm`` provider."""
    register(VLLMProvider)
