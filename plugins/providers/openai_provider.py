"""The ``openai`` provider: any OpenAI-compatible chat-completions API (OpenAI, llama.cpp, a vLLM server...).

The implementation (:class:`~saelab.plugins.providers._openai_wire.OpenAIProvider`) is shared with the
``vllm`` and ``openrouter`` plugins, which register it with other default base URLs and API key variables.
"""

from __future__ import annotations

from collections.abc import Callable

from saelab import hookimpl

from ._openai_wire import OpenAIOptions, OpenAIProvider

__all__ = ["OpenAIOptions", "OpenAIProvider"]


@hookimpl
def register_providers(register: Callable[[type], type]) -> None:
    """Register the ``openai`` provider."""
    register(OpenAIProvider)
