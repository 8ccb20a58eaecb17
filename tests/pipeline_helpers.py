"""Helpers for the pipeline and delphi-CLI tests: a small TopK dictionary on the tiny GPT-2 saved to disk,
a scripted LLM handler that answers explainer and scorer prompts, and the command line of a small run."""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures.tiny_models import TINY_GPT2, lee_corpus  # noqa: E402
from llm_server import Reply  # noqa: E402

API_KEY = "sk-pipeline-test-key-0123456789"
"""The fake API key the tests put in OPENAI_API_KEY; it must never reach results/ or logs."""

_EXAMPLE = re.compile(r"^Example (\d+):", re.MULTILINE)


def make_dictionary(path: Path, hookpoint: str = "layers.0", d_sae: int = 32, k: int = 4, seed: int = 0) -> Path:
    """A random TopK dictionary on the tiny GPT-2 (width 64), centred on real activations so that
    different latents win on different tokens, saved in saelab's format at ``path``."""
    from saelab.data import WindowSpec, iter_windows
    from saelab.dictionary import build_dictionary, save_dictionary
    from saelab.models import load_activation_source

    torch.manual_seed(seed)
    d = build_dictionary("topk", {"inputs": [hookpoint], "outputs": [hookpoint], "d_in": 64, "d_out": 64},
                         {"d_sae": d_sae, "k": k})
    source = load_activation_source(str(TINY_GPT2))
    spec = WindowSpec.for_tokenizer(source.tokenizer, 64)
    ids = torch.stack(list(iter_windows(lee_corpus()[:10], source.tokenizer, spec, max_windows=8)))
    x = source.activations(ids, [hookpoint])[hookpoint].reshape(-1, 64)
    with torch.no_grad():
        d.b_dec.copy_(x.mean(0))
        d.W_enc.mul_(1.0 / (x - x.mean(0)).norm(dim=1).mean())
    save_dictionary(d.eval(), path)
    return path


def kind_of(request: dict[str, Any]) -> str:
    """``explain``, ``simulation``, ``intruder`` or ``binary`` (detection/fuzz) from the system prompt."""
    system = str(request["messages"][0]["content"])
    if "investigating the latents" in system or "label the latents" in system:
        return "explain"
    if "simulating a latent" in system:
        return "simulation"
    if "intruder" in system:
        return "intruder"
    return "binary"


class SmartHandler:
    """Answers every saelab prompt sensibly: an explanation, or a 0/1 list with one entry per example.
    Counts requests per kind; ``delay_s`` slows every answer."""

    def __init__(self, delay_s: float = 0.0, explanation: str = "the letter e"):
        self.delay_s = delay_s
        self.explanation = explanation
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, request: dict[str, Any]) -> Reply:
        kind = kind_of(request)
        with self._lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
        if kind == "explain":
            return Reply(text=f"[EXPLANATION]: {self.explanation}", delay_s=self.delay_s)
        n = len(_EXAMPLE.findall(str(request["messages"][-1]["content"])))
        if kind == "intruder":
            return Reply(text="[ANSWER]: 1", delay_s=self.delay_s)
        bits = ", ".join("1" if i % 2 == 0 else "0" for i in range(n))
        return Reply(text=f"[{bits}]", delay_s=self.delay_s)


def run_args(dictionary: Path, name: str, base_url: str, *extra: str) -> list[str]:
    """A small delphi-style run of the tiny GPT-2 against the scripted server."""
    return [
        str(TINY_GPT2), str(dictionary), "--name", name, "--hookpoints", "layers.0",
        "--dataset_repo", "news-sample", "--n_tokens", "2048", "--cache_ctx_len", "64", "--batch_size", "8",
        "--n_splits", "2", "--min_examples", "4", "--n_examples_train", "3", "--n_examples_test", "2",
        "--n_non_activating", "2", "--example_ctx_len", "8", "--max_latents", "3",
        "--explainer_provider", "openai", "--explainer_api_base_url", base_url, "--explainer_model", "test-model",
        "--scorers", "detection", "fuzz", "--num_gpus", "0", "--verbose", "false", *extra,
    ]
