"""Helpers for explainer/scorer tests: hand-made latent records and an ``openai`` provider pointed at
the scripted local server (tests/llm_server.py)."""

from __future__ import annotations

import re
from typing import Any

from saelab.llm import make_provider
from saelab.records import Example, LatentRecord, LatentStats, TokenValues

WORD = "cat"
"""The word the hand-made latent fires on."""


def make_example(eid: str, words: list[str], acts: list[float] | None = None, *, activating: bool = True,
                 quantile: int | None = None, seq: int = 0) -> Example:
    """An example whose tokens are ``words`` (each after the first with a leading space); activations
    default to 1.0 on every ``cat`` token (scaled by position) and 0 elsewhere."""
    strs = [w if i == 0 else " " + w for i, w in enumerate(words)]
    if acts is None:
        acts = [float(2 + i) if w == WORD else 0.0 for i, w in enumerate(words)]
    return Example(id=eid, sequence=seq, start=0, tokens=list(range(len(words))), token_strs=strs,
                   activations=acts, quantile=quantile if activating else None, is_activating=activating,
                   source="test" if activating else "random")


def make_record(n_test: int = 7, n_non: int = 6, n_train: int = 4) -> LatentRecord:
    """A latent on ``cat``: activating examples contain it, non-activating ones do not. Each example
    has a distinct filler word so tests can tell them apart."""
    def act(i: int, prefix: str) -> Example:
        words = ["the", f"w{prefix}{i}", WORD, "sat", "on", "mats"][: 3 + i % 4]
        return make_example(f"{prefix}{i}", words, quantile=i % 3, seq=i)

    train = [act(i, "tr") for i in range(n_train)]
    test = [act(i, "te") for i in range(n_test)]
    non = [make_example(f"na{i}", ["a", f"wna{i}", "dog", "ran"], activating=False, seq=100 + i)
           for i in range(n_non)]
    return LatentRecord(hookpoint="layers.1", latent=7, train=train, test=test, non_activating=non,
                        stats=LatentStats(frequency=0.01, max_activation=10.0, firing_count=42, n_tokens=4200),
                        top_logits=TokenValues([" cat", " kitten"], [2.0, 1.5]),
                        bottom_logits=TokenValues([" dog"], [-1.0]))


def openai_provider(server: Any, monkeypatch: Any, **options: Any) -> Any:
    """The real ``openai`` provider against ``server``, response cache off, no retries by default."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-secret")
    params = {"model": "test-model", "base_url": server.base_url, "cache": False, "max_retries": 0,
              "max_concurrency": 16, "timeout_s": 10}
    params.update(options)
    return make_provider("openai", **params)


EXAMPLE_LINE = re.compile(r"^Example (\d+): (.*)$", re.MULTILINE)


def user_examples(request: dict[str, Any]) -> list[str]:
    """The ``Example N: text`` lines of the last user message of a chat request, in order."""
    return [m.group(2) for m in EXAMPLE_LINE.finditer(request["messages"][-1]["content"])]


def filler(text: str) -> str | None:
    """The distinct filler word (``wte3``, ``wna2``...) in an example's text, i.e. its id."""
    m = re.search(r"\bw((?:te|tr|na)\d+)\b", text)
    return m.group(1) if m else None
