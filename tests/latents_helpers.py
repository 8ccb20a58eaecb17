"""Helpers for the latent-cache, example and neighbour tests: the tiny GPT-2 with a small TopK
dictionary over a few hundred Lee-corpus tokens."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from saelab import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fixtures.tiny_models import TINY_GPT2, lee_corpus  # noqa: E402


class ListDataset(Dataset):
    """Documents from a Python list (test only)."""

    name = "test-list"

    def __init__(self, texts: list[str]):
        super().__init__("test-list")
        self._texts = texts

    def texts(self) -> Iterator[str]:
        """The documents."""
        yield from self._texts

    def identity(self) -> dict[str, Any]:
        """A hash of the documents."""
        return {"repo": "test-list", "n": len(self._texts), "first": self._texts[0][:40] if self._texts else ""}


def lee_dataset(n_docs: int = 40) -> ListDataset:
    """The first ``n_docs`` Lee articles."""
    return ListDataset(lee_corpus()[:n_docs])


def tiny_source() -> Any:
    """The tiny GPT-2 activation source (loaded once per process)."""
    global _SOURCE
    if _SOURCE is None:
        from saelab.models import load_activation_source

        _SOURCE = load_activation_source(str(TINY_GPT2))
    return _SOURCE


_SOURCE = None


def tiny_dictionary(hookpoint: str = "layers.0", d_sae: int = 48, k: int = 4, seed: int = 0) -> Any:
    """A random TopK dictionary on the tiny GPT-2 (width 64)."""
    from saelab.data import WindowSpec, iter_windows
    from saelab.dictionary import build_dictionary

    torch.manual_seed(seed)
    d = build_dictionary("topk", {"inputs": [hookpoint], "outputs": [hookpoint], "d_in": 64, "d_out": 64},
                         {"d_sae": d_sae, "k": k})
    source = tiny_source()
    ids = torch.stack(list(iter_windows(lee_corpus()[:10], source.tokenizer, WindowSpec.for_tokenizer(source.tokenizer, 64),
                                        max_windows=8)))
    x = source.activations(ids, [hookpoint])[hookpoint].reshape(-1, 64)
    with torch.no_grad():  # centre the inputs so that different latents win on different tokens
        d.b_dec.copy_(x.mean(0))
        d.W_enc.mul_(1.0 / (x - x.mean(0)).norm(dim=1).mean())
    return d.eval()


class PatternSource:
    """An activation source (duck-typed) whose activations depend on the position only: row
    ``pattern[pos]`` at every hookpoint; uses the tiny GPT-2 tokenizer."""

    name = "pattern"
    model_id = "pattern"
    device = None  # what saelab.ActivationSource declares: inputs stay on the CPU

    def __init__(self, pattern: torch.Tensor):
        self.pattern = pattern
        self.tokenizer = tiny_source().tokenizer

    def identity(self) -> dict[str, Any]:
        """Hash of the pattern."""
        return {"model": "pattern", "pattern": self.pattern.tolist()}

    def check_hookpoints(self, hookpoints: Any) -> list[str]:
        """Any names."""
        return list(hookpoints)

    def hookpoint_dim(self, hookpoint: str) -> int:
        """Width of the pattern."""
        return self.pattern.shape[1]

    def activations(self, input_ids: torch.Tensor, hookpoints: Any, attention_mask: Any = None) -> dict[str, torch.Tensor]:
        """The pattern for every sequence."""
        return {h: self.pattern[None].expand(input_ids.shape[0], -1, -1).clone() for h in hookpoints}

    def unembedding(self) -> None:
        """No unembedding."""
        return None


def passthrough_dictionary(d: int) -> Any:
    """A dictionary whose latents are the ReLU of its input (``d_sae = d``)."""
    from saelab import SiteSpec, SparseDictionary
    from saelab.options import Options

    class PassThrough(SparseDictionary):
        name = "passthrough"

        def __init__(self) -> None:
            super().__init__(SiteSpec(["layers.0"], ["layers.0"], d, d), Options())
            self.W_dec = torch.nn.Parameter(torch.eye(d))

        @property
        def d_sae(self) -> int:
            return d

        def encode(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x.reshape(x.shape[0], -1))

        def decode(self, latents: torch.Tensor) -> torch.Tensor:
            return (latents @ self.W_dec)[:, None]

    return PassThrough()
