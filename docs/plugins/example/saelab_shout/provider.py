"""The ``shout-provider`` plugin module (entry point ``shout-provider``): the ``shout`` LLM provider."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from saelab import Provider, hookimpl
from saelab.llm import ChatMessage, Completion, ParamValue
from saelab.options import Options
from saelab.records import Usage

from saelab_shout.text import words


class ShoutProviderOptions(Options):
    """Options of the ``shout`` provider."""

    model: str | None = None
    """Ignored name of a model (the provider has none); recorded with each answer."""


class ShoutProvider(Provider):
    """Answers without a network or a model: the most frequent word of the last message, shouted as an
    ``[EXPLANATION]:`` line (deterministic; for trying pipelines offline)."""

    name = "shout"
    Options = ShoutProviderOptions

    def __init__(self, options: ShoutProviderOptions | None = None) -> None:
        self.options = options or ShoutProviderOptions()
        self.usage = Usage()
        """Running totals of the answers given (shown in the run summary)."""

    async def generate(self, messages: Sequence[ChatMessage], **params: ParamValue) -> Completion:
        """One deterministic completion; token counts are whitespace word counts."""
        found = words(messages[-1]["content"]) if messages else []
        top = Counter(found).most_common(1)
        text = f"[EXPLANATION]: {top[0][0].upper() if top else 'NOTHING'}"
        reply = Completion(text=text, prompt_tokens=sum(len(m["content"].split()) for m in messages),
                           completion_tokens=len(text.split()), cost=0.0, provider=self.name,
                           model=self.options.model or "shout")
        self.usage.record(reply)
        return reply


@hookimpl
def register_providers(register):  # noqa: ANN001 - the hookspec documents the signature
    register(ShoutProvider)
